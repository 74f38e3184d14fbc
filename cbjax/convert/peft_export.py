"""Write a training run's adapters as a PEFT LoRA adapter that `peft.PeftModel.from_pretrained` loads.

PEFT names each adapter after the module it wraps in the base model, under `base_model.model.`,
and stores `lora_A.weight` as (r, in) and `lora_B.weight` as (out, r): the transposes of cbjax's
`lora_a` (in, r) and `lora_b` (r, out). GPT-2's `Conv1D` keeps its weight as (in, out), so PEFT
needs `fan_in_fan_out` to merge into it, but the adapter matrices have the same orientation.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from cbjax.convert.run_adapters import adapter_pairs
from cbjax.convert.staging import staged_directory
from cbjax.models.config import ModelConfig
from cbjax.run import TrainedRun
from cbjax.weights.mapping import tensor_specs
from cbjax.weights.safetensors_io import save_file

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
# The module-list name in front of the layer index, which PEFT's layers_to_transform matches.
LAYERS_PATTERN = {"llama": "layers", "mistral": "layers", "gpt2": "h"}


def export_peft(run: TrainedRun, config: ModelConfig, out: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write `adapter_config.json` and `adapter_model.safetensors` for the adapters of `run` into `out`."""
    tensors = peft_tensors(run, config)
    with staged_directory(out, overwrite) as stage:
        save_file(tensors, stage / ADAPTER_WEIGHTS_FILE, metadata={"format": "pt"})
        text = json.dumps(adapter_config(run, config), indent=2, sort_keys=True) + "\n"
        (stage / ADAPTER_CONFIG_FILE).write_text(text)
    return Path(out)


def peft_tensors(run: TrainedRun, config: ModelConfig) -> dict[str, np.ndarray]:
    kernel_names = {spec.path: spec.hf_name for spec in tensor_specs(config)}
    tensors = {}
    for module, (lora_a, lora_b) in sorted(adapter_pairs(run).items(), key=lambda item: str(item[0])):
        hf_name = kernel_names.get((*module, "kernel"))
        if hf_name is None:
            raise ValueError(
                f"adapter on {'.'.join(map(str, module))} has no weight in the {config.family} checkpoint layout"
            )
        prefix = "base_model.model." + hf_name.removesuffix(".weight")
        tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(lora_a.T)
        tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(lora_b.T)
    return tensors


def adapter_config(run: TrainedRun, config: ModelConfig) -> dict:
    lora = run.config.lora
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(run.model_path),
        "r": lora.r,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": sorted(lora.targets_for(config.family)),
        "layers_to_transform": sorted(run.adapted_layers),
        "layers_pattern": LAYERS_PATTERN[config.family],
        "fan_in_fan_out": config.family == "gpt2",
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "inference_mode": True,
    }

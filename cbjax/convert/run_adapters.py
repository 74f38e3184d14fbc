"""The LoRA adapters of a training run as numpy arrays: (lora_a, lora_b) pairs, and deltas to merge."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from flax import nnx

from cbjax.convert.orbax_params import flatten
from cbjax.run import TrainedRun
from cbjax.weights.mapping import ParamPath


def is_training_run(path: str | os.PathLike) -> bool:
    """Return whether `path` is the `train.output_dir` of a training run."""
    path = Path(path)
    return (path / "config.yaml").is_file() and (path / "checkpoints").is_dir()


def adapter_pairs(run: TrainedRun) -> dict[ParamPath, tuple[np.ndarray, np.ndarray]]:
    """Return {module path: (lora_a (in, r), lora_b (r, out))}, e.g. ("layers", 0, "self_attn", "q_proj")."""
    leaves: dict[ParamPath, dict[str, np.ndarray]] = {}
    for path, value in flatten(nnx.to_pure_dict(run.adapters)).items():
        leaves.setdefault(path[:-1], {})[path[-1]] = np.asarray(value)
    return {module: (pair["lora_a"], pair["lora_b"]) for module, pair in leaves.items()}


def lora_deltas(run: TrainedRun) -> dict[ParamPath, np.ndarray]:
    """Return {kernel path: (lora_alpha / r) * lora_a @ lora_b}, (in, out) in float32.

    The product is taken in float32, as `cbjax.lora.merge_lora` does.
    """
    scale = np.float32(run.config.lora.scale)
    return {
        (*module, "kernel"): scale * (lora_a.astype(np.float32) @ lora_b.astype(np.float32))
        for module, (lora_a, lora_b) in adapter_pairs(run).items()
    }

"""GPT-2 tensor names in Hugging Face checkpoints and their cbjax parameter paths.

`GPT2LMHeadModel.save_pretrained` writes names under `transformer.`. `GPT2Model` writes them
without the prefix, as do the original `openai-community/gpt2` files. transformers 5.25 loads both
into `GPT2LMHeadModel`, and so does cbjax. The LM head is tied to `wte`, so no `lm_head.weight` is
expected. `Conv1D` weights are already (in, out), so nothing is transposed.
"""

from __future__ import annotations

from collections.abc import Iterable

from cbjax.models.config import ModelConfig
from cbjax.weights.mapping import TensorSpec

PREFIX = "transformer."

LINEARS = (("attn", "c_attn"), ("attn", "c_proj"), ("mlp", "c_fc"), ("mlp", "c_proj"))
NORMS = ("ln_1", "ln_2")


def checkpoint_prefix(names: Iterable[str]) -> str:
    """Return `transformer.` when any tensor name uses it, else the empty prefix."""
    return PREFIX if any(name.startswith(PREFIX) for name in names) else ""


def gpt2_specs(config: ModelConfig, prefix: str = PREFIX) -> list[TensorSpec]:
    specs = [
        TensorSpec(f"{prefix}wte.weight", ("wte", "weight")),
        TensorSpec(f"{prefix}wpe.weight", ("wpe", "weight")),
    ]
    for i in range(config.num_layers):
        block = f"{prefix}h.{i}"
        for norm in NORMS:
            for param in ("weight", "bias"):
                specs.append(TensorSpec(f"{block}.{norm}.{param}", ("layers", i, norm, param)))
        for module, name in LINEARS:
            specs.append(TensorSpec(f"{block}.{module}.{name}.weight", ("layers", i, module, name, "kernel")))
            specs.append(TensorSpec(f"{block}.{module}.{name}.bias", ("layers", i, module, name, "bias")))
    for param in ("weight", "bias"):
        specs.append(TensorSpec(f"{prefix}ln_f.{param}", ("ln_f", param)))
    return specs

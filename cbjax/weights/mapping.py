"""One mapping per model family between Hugging Face tensor names and cbjax parameter paths.

Both directions (loading and exporting) use these specs, so a name or transpose is defined once.
Linear kernels are stored (in, out) in cbjax and (out, in) in Hugging Face's `nn.Linear`, hence
`transpose=True`; GPT-2's `Conv1D` already stores (in, out).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable

from cbjax.models.config import ModelConfig

ParamPath = tuple[str | int, ...]


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    hf_name: str
    path: ParamPath
    transpose: bool = False


# Non-parameter buffers that some checkpoints contain; skipped by name, never by a catch-all.
IGNORED_BUFFERS = {
    "llama": (re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"),),
    "mistral": (re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"),),
    "gpt2": (re.compile(r"(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)"),),
}


def tensor_specs(config: ModelConfig, checkpoint_names: Iterable[str] | None = None) -> list[TensorSpec]:
    """Every tensor a checkpoint of this architecture must contain, in checkpoint order.

    `checkpoint_names` are the tensor names of the checkpoint being loaded, for families whose
    names vary between checkpoints (GPT-2's optional `transformer.` prefix). Without them the
    specs use the names transformers' `save_pretrained` writes for the LM-head model.
    """
    if config.family in ("llama", "mistral"):
        return _llama_specs(config)
    if config.family == "gpt2":
        from cbjax.weights.gpt2_mapping import PREFIX, checkpoint_prefix, gpt2_specs

        prefix = PREFIX if checkpoint_names is None else checkpoint_prefix(checkpoint_names)
        return gpt2_specs(config, prefix)
    raise ValueError(f"no weight mapping for family {config.family!r}")


# Top-level parameters after the last layer, which a model with dropped layers does not build.
OUTPUT_PARAMETERS = ("norm", "lm_head", "ln_f")


def is_built(config: ModelConfig, spec: TensorSpec) -> bool:
    """Return whether the model of `config` builds the parameter of `spec`, which layer dropping may leave out."""
    if spec.path[0] == "layers":
        return spec.path[1] < config.built_layers
    if spec.path[0] in OUTPUT_PARAMETERS:
        return config.builds_output
    return True


def is_ignored_buffer(config: ModelConfig, hf_name: str) -> bool:
    return any(p.fullmatch(hf_name) for p in IGNORED_BUFFERS.get(config.family, ()))


LLAMA_LINEARS = (
    ("self_attn", "q_proj"),
    ("self_attn", "k_proj"),
    ("self_attn", "v_proj"),
    ("self_attn", "o_proj"),
    ("mlp", "gate_proj"),
    ("mlp", "up_proj"),
    ("mlp", "down_proj"),
)


def _llama_specs(config: ModelConfig) -> list[TensorSpec]:
    specs = [TensorSpec("model.embed_tokens.weight", ("embed_tokens", "weight"))]
    for i in range(config.num_layers):
        prefix = f"model.layers.{i}"
        specs.append(TensorSpec(f"{prefix}.input_layernorm.weight", ("layers", i, "input_layernorm", "weight")))
        for block, name in LLAMA_LINEARS:
            specs.append(TensorSpec(f"{prefix}.{block}.{name}.weight", ("layers", i, block, name, "kernel"), True))
            bias = config.attention_bias if block == "self_attn" else config.mlp_bias
            if bias:
                specs.append(TensorSpec(f"{prefix}.{block}.{name}.bias", ("layers", i, block, name, "bias")))
        specs.append(
            TensorSpec(f"{prefix}.post_attention_layernorm.weight", ("layers", i, "post_attention_layernorm", "weight"))
        )
    specs.append(TensorSpec("model.norm.weight", ("norm", "weight")))
    if not config.tie_word_embeddings:
        specs.append(TensorSpec("lm_head.weight", ("lm_head", "kernel"), True))
    return specs

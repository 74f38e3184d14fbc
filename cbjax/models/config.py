"""Model configuration shared by every family, built from a Hugging Face `config.json`."""

from __future__ import annotations

import dataclasses
from typing import Any

SUPPORTED_FAMILIES = ("llama", "mistral", "gpt2")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Rotary-embedding frequency scaling (`rope_type` other than `default`)."""

    rope_type: str
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of one decoder-only model; hashable so that it can be a static jit argument."""

    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    sliding_window: int | None = None
    attention_bias: bool = False
    mlp_bias: bool = False
    # GPT-2 only: the activation of the MLP.
    activation: str = "silu"
    # Layer dropping: build only the first `kept_layers` layers. `num_layers` stays the depth of
    # the checkpoint, so hidden-state indices keep their meaning.
    kept_layers: int | None = None

    def __post_init__(self):
        if self.family not in SUPPORTED_FAMILIES:
            raise ValueError(f"unsupported model family {self.family!r}; expected one of {SUPPORTED_FAMILIES}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )

    def check_layer(self, layer: int, what: str) -> None:
        """Raise if `layer` is not a hidden-state index of this model (0 = embeddings .. num_layers)."""
        if not 0 <= layer <= self.num_layers:
            raise ValueError(
                f"{what} {layer} is out of range: this {self.family} model has {self.num_layers} layers, "
                f"so hidden-state indices run from 0 (embeddings) to {self.num_layers}"
            )

    @property
    def built_layers(self) -> int:
        return self.num_layers if self.kept_layers is None else self.kept_layers

    @property
    def builds_output(self) -> bool:
        """Whether the final norm and the LM head are built.

        A model with dropped layers never reaches them, and for untied 8B models the LM head alone
        is about a billion bytes in bf16 that training would hold for nothing.
        """
        return self.built_layers == self.num_layers

    def with_layers(self, kept_layers: int) -> ModelConfig:
        """Return the same architecture with only the first `kept_layers` layers built."""
        self.check_layer(kept_layers, "kept layer count")
        return dataclasses.replace(self, kept_layers=kept_layers)


def _rope_scaling(hf: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    # transformers 5 writes `rope_parameters` (theta included); older configs have `rope_theta` and
    # an optional `rope_scaling` dict.
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    merged = {**scaling, **params}
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type == "llama3":
        return theta, RopeScaling(
            rope_type="llama3",
            factor=float(merged["factor"]),
            low_freq_factor=float(merged["low_freq_factor"]),
            high_freq_factor=float(merged["high_freq_factor"]),
            original_max_position_embeddings=int(merged["original_max_position_embeddings"]),
        )
    if rope_type == "linear":
        return theta, RopeScaling(rope_type="linear", factor=float(merged["factor"]))
    raise ValueError(f"config.json: rope_type {rope_type!r} is not supported (supported: default, linear, llama3)")


def from_hf_config(hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """Build a `ModelConfig` from a Hugging Face config dict; `source` names the file in errors."""
    model_type = hf.get("model_type")
    try:
        if model_type in ("llama", "mistral"):
            return _llama_family(hf, model_type)
        if model_type == "gpt2":
            return _gpt2(hf)
    except KeyError as err:
        raise ValueError(f"{source}: missing field {err.args[0]!r} for model_type {model_type!r}") from None
    raise ValueError(
        f"{source}: model_type {model_type!r} is not supported; expected one of {SUPPORTED_FAMILIES}"
    )


def _llama_family(hf: dict[str, Any], model_type: str) -> ModelConfig:
    num_heads = int(hf["num_attention_heads"])
    hidden = int(hf["hidden_size"])
    theta, scaling = _rope_scaling(hf)
    return ModelConfig(
        family=model_type,
        vocab_size=int(hf["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
        head_dim=int(hf.get("head_dim") or hidden // num_heads),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        rope_theta=theta,
        rope_scaling=scaling,
        sliding_window=hf.get("sliding_window") if model_type == "mistral" else None,
        attention_bias=bool(hf.get("attention_bias", False)),
        mlp_bias=bool(hf.get("mlp_bias", False)),
        activation=hf.get("hidden_act", "silu"),
    )


# GPT-2 config options whose non-default values change the forward; cbjax implements only the defaults.
GPT2_FIXED_OPTIONS = {
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "add_cross_attention": False,
    "tie_word_embeddings": True,
}


def _gpt2(hf: dict[str, Any]) -> ModelConfig:
    for option, supported in GPT2_FIXED_OPTIONS.items():
        if bool(hf.get(option, supported)) != supported:
            raise ValueError(f"GPT-2 {option}={hf[option]!r} is not supported; cbjax supports only {supported}")
    hidden = int(hf["n_embd"])
    num_heads = int(hf["n_head"])
    return ModelConfig(
        family="gpt2",
        vocab_size=int(hf["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(hf.get("n_inner") or 4 * hidden),
        num_layers=int(hf["n_layer"]),
        num_heads=num_heads,
        num_kv_heads=num_heads,
        head_dim=hidden // num_heads,
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        max_position_embeddings=int(hf.get("n_positions", 1024)),
        tie_word_embeddings=True,
        attention_bias=True,
        mlp_bias=True,
        activation=hf.get("activation_function", "gelu_new"),
    )

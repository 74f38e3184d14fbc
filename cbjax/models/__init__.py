"""Model families and the factory that builds one from a `ModelConfig`."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from cbjax.models.config import ModelConfig, from_hf_config
from cbjax.models.output import ModelOutput


def model_class(config: ModelConfig) -> type[nnx.Module]:
    if config.family in ("llama", "mistral"):
        from cbjax.models.llama import LlamaForCausalLM

        return LlamaForCausalLM
    if config.family == "gpt2":
        from cbjax.models.gpt2 import GPT2LMHeadModel

        return GPT2LMHeadModel
    raise ValueError(f"no model class for family {config.family!r}")


def build_model(config: ModelConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, seed: int = 0) -> nnx.Module:
    """Build a randomly initialised model (tests, benchmarks); loaders replace the weights."""
    return model_class(config)(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(seed))


def abstract_model(config: ModelConfig, *, dtype=jnp.float32, param_dtype=jnp.float32) -> nnx.Module:
    """Build the model with shape-only parameters, so loading never allocates random weights."""
    return nnx.eval_shape(lambda: build_model(config, dtype=dtype, param_dtype=param_dtype))


__all__ = ["ModelConfig", "ModelOutput", "abstract_model", "build_model", "from_hf_config", "model_class"]

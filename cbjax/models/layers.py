"""Building blocks shared by the model families: a LoRA-ready linear layer, norms, embeddings."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class LoRAParam(nnx.Param):
    """A LoRA adapter matrix. Its own Variable type lets `nnx.split` keep adapters in a separate tree."""


class Linear(nnx.Module):
    """`y = x @ kernel + bias`, plus an optional LoRA term `(lora_alpha / r) * dropout(x) @ lora_a @ lora_b`.

    The kernel is stored (in_features, out_features); Hugging Face's `nn.Linear.weight` is its transpose,
    and the weight converters are the one place that transposes.
    """

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool, dtype, param_dtype, rngs: nnx.Rngs):
        init = jax.nn.initializers.normal(0.02)
        self.kernel = nnx.Param(init(rngs.params(), (in_features, out_features), param_dtype))
        self.bias = nnx.data(nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else None)
        self.dtype = dtype
        # Set by `cbjax.lora.add_lora`; None means no adapter on this layer.
        self.lora_a: LoRAParam | None = nnx.data(None)
        self.lora_b: LoRAParam | None = nnx.data(None)
        self.lora_scale = 0.0
        self.lora_dropout = 0.0

    def __call__(self, x: jax.Array, *, use_lora: bool = True, dropout_rng: jax.Array | None = None) -> jax.Array:
        x = x.astype(self.dtype)
        y = x @ self.kernel[...].astype(self.dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        if use_lora and self.lora_a is not None:
            y = y + self._lora_delta(x, dropout_rng)
        return y

    def _lora_delta(self, x: jax.Array, dropout_rng: jax.Array | None) -> jax.Array:
        if self.lora_dropout > 0.0 and dropout_rng is not None:
            keep = 1.0 - self.lora_dropout
            mask = jax.random.bernoulli(dropout_rng, keep, x.shape)
            x = jnp.where(mask, x / keep, 0).astype(x.dtype)
        lora_a = self.lora_a[...].astype(self.dtype)
        lora_b = self.lora_b[...].astype(self.dtype)
        return ((x @ lora_a) @ lora_b) * jnp.asarray(self.lora_scale, self.dtype)


class RMSNorm(nnx.Module):
    """RMSNorm in the operation order of transformers' `LlamaRMSNorm`: normalise in fp32, cast, then scale."""

    def __init__(self, dim: int, *, eps: float, dtype, param_dtype):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        input_dtype = x.dtype
        x32 = x.astype(jnp.float32)
        variance = jnp.mean(x32 * x32, axis=-1, keepdims=True)
        normed = (x32 * jax.lax.rsqrt(variance + self.eps)).astype(input_dtype)
        return (self.weight[...].astype(self.dtype) * normed).astype(self.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm with statistics in fp32 (GPT-2)."""

    def __init__(self, dim: int, *, eps: float, dtype, param_dtype):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        centred = x32 - mean
        variance = jnp.mean(centred * centred, axis=-1, keepdims=True)
        normed = centred * jax.lax.rsqrt(variance + self.eps)
        out = normed * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return out.astype(self.dtype)


class Embed(nnx.Module):
    """Token (or position) embedding table of shape (num_embeddings, features), also usable as a tied LM head."""

    def __init__(self, num_embeddings: int, features: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        init = jax.nn.initializers.normal(0.02)
        self.weight = nnx.Param(init(rngs.params(), (num_embeddings, features), param_dtype))
        self.dtype = dtype

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.weight[...], ids, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        return x.astype(self.dtype) @ self.weight[...].astype(self.dtype).T

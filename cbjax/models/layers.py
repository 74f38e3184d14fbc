"""Building blocks shared by the model families: a LoRA-ready linear layer, norms, embeddings."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from cbjax.models.dropout import keep_mask


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
        # The matmuls run on (tokens, features). With the batch and sequence axes kept apart,
        # XLA:CPU's backward transposes whole activations to contract over both, which took a
        # third of the benchmark's train step there.
        lead_shape = x.shape[:-1]
        x_TxI = x.reshape(-1, x.shape[-1]).astype(self.dtype)
        y_TxO = x_TxI @ self.kernel[...].astype(self.dtype)
        if self.bias is not None:
            y_TxO = y_TxO + self.bias[...].astype(self.dtype)
        if use_lora and self.lora_a is not None:
            y_TxO = y_TxO + self._lora_delta(x_TxI, dropout_rng)
        return y_TxO.reshape(*lead_shape, y_TxO.shape[-1])

    def _lora_delta(self, x_TxI: jax.Array, dropout_rng: jax.Array | None) -> jax.Array:
        keep_TxI = None
        if self.lora_dropout > 0.0 and dropout_rng is not None:
            keep_TxI = keep_mask(dropout_rng, x_TxI.shape, 1.0 - self.lora_dropout)
        lora_a = self.lora_a[...].astype(self.dtype)
        lora_b = self.lora_b[...].astype(self.dtype)
        return lora_product(x_TxI, lora_a, lora_b, keep_TxI, self.lora_scale, 1.0 - self.lora_dropout)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def lora_product(x_TxI, lora_a_IxR, lora_b_RxO, keep_TxI, scale: float, keep_prob: float):
    """`scale * dropout(x) @ lora_a @ lora_b`, where `keep_TxI` (or None) is the dropout's keep mask.

    The backward keeps x, the boolean mask and the rank-r product, and recomputes the dropped-out
    input. Autodiff would keep the mask's 32-bit random draws and a dropped-out copy of x for
    every projection: 8 bytes per input element instead of 1.
    """
    return _lora_forward(x_TxI, lora_a_IxR, lora_b_RxO, keep_TxI, scale, keep_prob)[0]


def _dropped(x_TxI, keep_TxI, keep_prob):
    if keep_TxI is None:
        return x_TxI
    return jnp.where(keep_TxI, x_TxI / jnp.asarray(keep_prob, x_TxI.dtype), 0).astype(x_TxI.dtype)


def _lora_forward(x_TxI, lora_a_IxR, lora_b_RxO, keep_TxI, scale, keep_prob):
    down_TxR = _dropped(x_TxI, keep_TxI, keep_prob) @ lora_a_IxR
    y_TxO = (down_TxR @ lora_b_RxO) * jnp.asarray(scale, x_TxI.dtype)
    return y_TxO, (x_TxI, keep_TxI, lora_a_IxR, lora_b_RxO, down_TxR)


def _lora_backward(scale, keep_prob, residuals, d_y_TxO):
    x_TxI, keep_TxI, lora_a_IxR, lora_b_RxO, down_TxR = residuals
    d_y_TxO = d_y_TxO * jnp.asarray(scale, d_y_TxO.dtype)

    d_down_TxR = d_y_TxO @ lora_b_RxO.T
    d_lora_b = down_TxR.T @ d_y_TxO
    d_lora_a = _dropped(x_TxI, keep_TxI, keep_prob).T @ d_down_TxR
    d_x_TxI = _dropped(d_down_TxR @ lora_a_IxR.T, keep_TxI, keep_prob)
    return d_x_TxI, d_lora_a, d_lora_b, None


lora_product.defvjp(_lora_forward, _lora_backward)


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

"""Rotary position embeddings in the rotate-half layout used by transformers' Llama and Mistral."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from cbjax.models.config import ModelConfig


def inverse_frequencies(config: ModelConfig) -> np.ndarray:
    """Return the fp32 inverse frequencies, with llama3 or linear scaling applied as transformers does."""
    dim = config.head_dim
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (1.0 / (np.float32(config.rope_theta) ** exponents)).astype(np.float32)
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return (inv_freq / np.float32(scaling.factor)).astype(np.float32)

    # llama3: keep high frequencies, divide low ones by `factor`, interpolate in between.
    old_context = scaling.original_max_position_embeddings
    low_freq_wavelen = old_context / scaling.low_freq_factor
    high_freq_wavelen = old_context / scaling.high_freq_factor
    wavelen = (2 * math.pi / inv_freq).astype(np.float32)
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / np.float32(scaling.factor), inv_freq)
    smooth = (old_context / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / np.float32(scaling.factor) + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def rotary_cos_sin(positions_BxS: jax.Array, inv_freq: np.ndarray, dtype) -> tuple[jax.Array, jax.Array]:
    """Return cos and sin of shape (B, S, head_dim), computed in fp32 and cast to `dtype`."""
    freqs = positions_BxS.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_rotary(x_BxSxHxD: jax.Array, cos_BxSxD: jax.Array, sin_BxSxD: jax.Array) -> jax.Array:
    half = x_BxSxHxD.shape[-1] // 2
    rotated = jnp.concatenate([-x_BxSxHxD[..., half:], x_BxSxHxD[..., :half]], axis=-1)
    return x_BxSxHxD * cos_BxSxD[:, :, None, :] + rotated * sin_BxSxD[:, :, None, :]

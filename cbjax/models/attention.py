"""Attention masks and the attention product, shared by all families."""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from cbjax.models.xla_attention import grouped_attention
from cbjax.sharding import KEY_VALUE_AXES, QUERY_AXES, constrain

# `xla`: the einsum below. `dot_product_attention`: `jax.nn.dot_product_attention` with
# implementation=None, which jax 0.10.2 resolves to its XLA path on every backend. `cudnn`: the
# same function with implementation="cudnn" (NVIDIA GPUs, fp16 or bf16 only). `splash`: the Pallas
# splash-attention kernel for TPU (see `cbjax.models.splash_attention`).
ATTENTION_IMPLEMENTATIONS = ("xla", "dot_product_attention", "cudnn", "splash")

if TYPE_CHECKING:
    from cbjax.models.config import ModelConfig
    from cbjax.models.kv_cache import KVCache


def positions_from_mask(mask_BxS: jax.Array) -> jax.Array:
    """Position ids that count only real tokens, as transformers' `generate` derives them.

    Padding slots get position 0 (their value does not matter: they are masked out as keys).
    """
    mask = mask_BxS.astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)


def attention_mask(
    query_index_S: jax.Array,
    key_index_T: jax.Array,
    key_valid_BxT: jax.Array,
    sliding_window: int | None = None,
) -> jax.Array:
    """Boolean (B, 1, S, T) mask: causal over slot indices, padding keys hidden, optional sliding window.

    The window follows transformers' Mistral: query i sees key j when i - window < j <= i.
    """
    q = query_index_S[:, None]
    k = key_index_T[None, :]
    allowed = k <= q
    if sliding_window is not None:
        allowed = allowed & (k > q - sliding_window)
    return allowed[None, None, :, :] & key_valid_BxT[:, None, None, :].astype(bool)


def mask_and_positions(
    config: ModelConfig,
    attention_mask_BxS: jax.Array | None,
    position_ids_BxS: jax.Array | None,
    cache: KVCache | None,
    batch: int,
    seq: int,
) -> tuple[jax.Array, jax.Array, KVCache | None]:
    """Return the (B, 1, S, T) attention mask, the position ids and the cache with the new mask slots.

    Without a cache the keys are the inputs themselves. With one, the inputs occupy slots
    `cache.index ..` and attend to every valid slot before them, so causality and the sliding
    window both count slots, padding included, as transformers does with its cache positions.
    Default positions count real tokens only.
    """
    if attention_mask_BxS is None:
        attention_mask_BxS = jnp.ones((batch, seq), jnp.int32)
    if cache is None:
        if position_ids_BxS is None:
            position_ids_BxS = positions_from_mask(attention_mask_BxS)
        query_index_S = jnp.arange(seq)
        mask = attention_mask(query_index_S, query_index_S, attention_mask_BxS, config.sliding_window)
        return mask, position_ids_BxS, None

    cache = cache.extend_mask(attention_mask_BxS)
    if position_ids_BxS is None:
        position_ids_BxS = cache.positions_of_new(seq)
    query_index_S = cache.index + jnp.arange(seq)
    key_index_T = jnp.arange(cache.max_length)
    mask = attention_mask(query_index_S, key_index_T, cache.key_valid, config.sliding_window)
    return mask, position_ids_BxS, cache


def dot_product_attention(
    q_BxSxHxD: jax.Array,
    k_BxTxKxD: jax.Array,
    v_BxTxKxD: jax.Array,
    mask_Bx1xSxT: jax.Array,
) -> jax.Array:
    """Grouped-query attention without repeating keys and values (see `grouped_attention`)."""
    batch, seq, num_heads, head_dim = q_BxSxHxD.shape
    num_kv_heads = k_BxTxKxD.shape[2]
    q_BxSxKxGxD = q_BxSxHxD.reshape(batch, seq, num_kv_heads, num_heads // num_kv_heads, head_dim)
    out = grouped_attention(q_BxSxKxGxD, k_BxTxKxD, v_BxTxKxD, mask_Bx1xSxT[:, :, None, :, :])
    return out.reshape(batch, seq, num_heads, head_dim)


def attend(
    q_BxSxHxD,
    k_BxTxKxD,
    v_BxTxKxD,
    mask_Bx1xSxT,
    implementation: str = "xla",
    sliding_window: int | None = None,
) -> jax.Array:
    """Attention by the chosen implementation; every one of them keeps padded query rows finite.

    `sliding_window` must be the window that `mask_Bx1xSxT` was built with: only splash reads it.
    Splash needs self-attention over the whole sequence, so with a KV cache (queries and keys of
    different lengths) it falls back to `xla`.
    """
    q = constrain(q_BxSxHxD, QUERY_AXES)
    k = constrain(k_BxTxKxD, KEY_VALUE_AXES)
    v = constrain(v_BxTxKxD, KEY_VALUE_AXES)
    if implementation == "xla" or (implementation == "splash" and q.shape[1] != k.shape[1]):
        out = dot_product_attention(q, k, v, mask_Bx1xSxT)
    elif implementation in ("dot_product_attention", "cudnn"):
        out = library_attention(q, k, v, mask_Bx1xSxT, None if implementation == "dot_product_attention" else "cudnn")
    elif implementation == "splash":
        from cbjax.models.splash_attention import splash_attention

        out = splash_attention(q, k, v, mask_Bx1xSxT, sliding_window)
    else:
        raise ValueError(f"attention implementation {implementation!r} is unknown; expected one of {ATTENTION_IMPLEMENTATIONS}")
    return constrain(out, QUERY_AXES)


def library_attention(q_BxSxHxD, k_BxTxKxD, v_BxTxKxD, mask_Bx1xSxT, implementation: str | None) -> jax.Array:
    """Call `jax.nn.dot_product_attention` with fully masked query rows opened to every key.

    A left-padding query has no valid key. Opening its row keeps the softmax finite whatever the
    kernel does with an all-masked row, and the row is padding, so its value is never used.
    """
    has_key = jnp.any(mask_Bx1xSxT, axis=-1, keepdims=True)
    mask = mask_Bx1xSxT | ~has_key
    return jax.nn.dot_product_attention(q_BxSxHxD, k_BxTxKxD, v_BxTxKxD, mask=mask, implementation=implementation)

"""Training-time self-attention through the Pallas splash-attention kernel (TPU).

The kernel takes no dense (B, 1, S, S) mask, so the mask is rebuilt from parts it understands.
A static causal or sliding-window mask comes first. Segment ids that are 1 for real tokens and
0 for padding then make a real token attend only to real keys. The diagonal of the dense mask
is exactly the key validity, because every valid query attends to itself. A padding query
attends only to padding keys (at least to itself), so its row stays finite. The kernel works on
blocks of 128 positions, so sequences are padded to a multiple of 128 with padding tokens. On
backends other than TPU the kernel runs in Pallas interpret mode: correct but slow, meant for
tests.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec as P

from cbjax.sharding import KEY_VALUE_AXES, QUERY_AXES, active_rules, partition_spec

BLOCK = 128


def splash_attention(q_BxSxHxD, k_BxSxKxD, v_BxSxKxD, mask_Bx1xSxS, sliding_window: int | None = None) -> jax.Array:
    """Compute attention through the splash kernel, equal to `dot_product_attention` on real query rows.

    Under `cbjax.sharding.logical_rules` the kernel runs per shard in `shard_map`, split over
    the batch and, when query and key heads split alike, over heads.
    """
    batch, seq, _, head_dim = q_BxSxHxD.shape
    segments_BxS = jnp.diagonal(mask_Bx1xSxS[:, 0], axis1=1, axis2=2).astype(jnp.int32)
    padded = -(-seq // BLOCK) * BLOCK
    pad = [(0, 0), (0, padded - seq), (0, 0), (0, 0)]
    q = jnp.pad(q_BxSxHxD * jnp.asarray(head_dim**-0.5, q_BxSxHxD.dtype), pad)
    k, v = jnp.pad(k_BxSxKxD, pad), jnp.pad(v_BxSxKxD, pad)
    segments = jnp.pad(segments_BxS, [(0, 0), (0, padded - seq)])

    run = functools.partial(_attend_shard, sliding_window=sliding_window)
    active = active_rules()
    if active is not None:
        mesh, rules = active
        q_spec = partition_spec(QUERY_AXES, q.shape, mesh.shape, rules)
        kv_spec = partition_spec(KEY_VALUE_AXES, k.shape, mesh.shape, rules)
        if q_spec[2] != kv_spec[2]:
            q_spec, kv_spec = P(q_spec[0], None, None, None), P(kv_spec[0], None, None, None)
        run = jax.shard_map(
            run,
            mesh=mesh,
            in_specs=(q_spec, kv_spec, kv_spec, P(q_spec[0], None)),
            out_specs=q_spec,
            check_vma=False,
        )
    return run(q, k, v, segments)[:, :seq]


def _attend_shard(q_BxSxHxD, k_BxSxKxD, v_BxSxKxD, segments_BxS, *, sliding_window):
    kernel = _kernel(q_BxSxHxD.shape[2], q_BxSxHxD.shape[1], sliding_window, jax.default_backend() != "tpu")

    def one_row(q_SxHxD, k_SxKxD, v_SxKxD, segments_S):
        ids = splash.SegmentIds(q=segments_S, kv=segments_S)
        out_HxSxD = kernel(q_SxHxD.swapaxes(0, 1), k_SxKxD.swapaxes(0, 1), v_SxKxD.swapaxes(0, 1), segment_ids=ids)
        return out_HxSxD.swapaxes(0, 1)

    return jax.vmap(one_row)(q_BxSxHxD, k_BxSxKxD, v_BxSxKxD, segments_BxS)


@functools.lru_cache(maxsize=32)
def _kernel(num_heads: int, seq: int, sliding_window: int | None, interpret: bool):
    if sliding_window is None:
        head_mask = splash.CausalMask((seq, seq))
    else:
        # Query i attends to key j when i - window < j <= i, as in `attention_mask`.
        head_mask = splash.LocalMask((seq, seq), window_size=(sliding_window - 1, 0), offset=0)
    mask = splash.MultiHeadMask([head_mask] * num_heads)
    # The kernel stores its block tables as jax arrays. Built eagerly, they are constants that
    # the cached kernel can reuse in later traces; built during a trace, they would be tracers.
    with jax.ensure_compile_time_eval():
        return splash.make_splash_mha(mask, head_shards=1, q_seq_shards=1, interpret=interpret)

"""The `xla` attention product, with a backward pass that recomputes the probabilities.

Autodiff of the plain einsum-softmax-einsum keeps the scores, the masked scores and the
probabilities of every layer until the backward pass, each (B, H, S, T) in fp32. For
SmolLM2-135M and 256 tokens that is about 40 MB per layer and pass, more than all the
projections together. This backward keeps q, k, v, the output and each row's maximum and sum,
and recomputes the probabilities from them one layer at a time, as flash attention does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_MASKED = jnp.finfo(jnp.float32).min


def _masked_scores(q_BxSxKxGxD, k_BxTxKxD, mask_BxKxGxSxT):
    head_dim = q_BxSxKxGxD.shape[-1]
    scores = jnp.einsum("bskgd,btkd->bkgst", q_BxSxKxGxD, k_BxTxKxD) * (head_dim**-0.5)
    return jnp.where(mask_BxKxGxSxT, scores.astype(jnp.float32), _MASKED)


@jax.custom_vjp
def grouped_attention(q_BxSxKxGxD, k_BxTxKxD, v_BxTxKxD, mask_Bx1x1xSxT):
    """Attend each group of query heads to its shared key/value head, with the softmax in fp32.

    Masked scores take fp32's minimum rather than -inf, so a row whose keys are all masked (a
    padding query) gets a uniform softmax and stays finite, as in transformers' eager attention.
    """
    return _forward(q_BxSxKxGxD, k_BxTxKxD, v_BxTxKxD, mask_Bx1x1xSxT)[0]


def _forward(q, k, v, mask):
    scores = _masked_scores(q, k, mask)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    unnormalised = jnp.exp(scores - row_max)
    row_sum = jnp.sum(unnormalised, axis=-1, keepdims=True)
    probs = (unnormalised / row_sum).astype(v.dtype)
    out = jnp.einsum("bkgst,btkd->bskgd", probs, v)
    return out, (row_max, row_sum)


def _forward_with_residuals(q, k, v, mask):
    out, row_statistics = _forward(q, k, v, mask)
    return out, (q, k, v, mask, out, row_statistics)


def _backward(residuals, d_out):
    q, k, v, mask, out, (row_max, row_sum) = residuals
    head_dim = q.shape[-1]

    # The residuals are the maximum and the sum rather than their log-sum-exp. For an all-masked
    # row the maximum is fp32's minimum, and log(sum) added to it would round away.
    probs = jnp.exp(_masked_scores(q, k, mask) - row_max) / row_sum
    d_v = jnp.einsum("bkgst,bskgd->btkd", probs.astype(v.dtype), d_out)

    d_probs = jnp.einsum("bskgd,btkd->bkgst", d_out, v).astype(jnp.float32)
    row_dot = jnp.einsum("bskgd,bskgd->bkgs", d_out.astype(jnp.float32), out.astype(jnp.float32))
    # The mask's `where` passes no gradient to masked scores.
    d_scores = jnp.where(mask, probs * (d_probs - row_dot[..., None]), 0.0) * (head_dim**-0.5)
    d_scores = d_scores.astype(q.dtype)

    d_q = jnp.einsum("bkgst,btkd->bskgd", d_scores, k)
    d_k = jnp.einsum("bkgst,bskgd->btkd", d_scores, q)
    return d_q, d_k, d_v, None


grouped_attention.defvjp(_forward_with_residuals, _backward)

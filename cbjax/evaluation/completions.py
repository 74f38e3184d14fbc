"""Representation and likelihood metrics of the base and trained models on fixed texts.

Both models read the same (prompt, completion) rows. Per hidden-state index (0 = embeddings,
the last = after the final norm, as in `ModelOutput`), over the completion tokens:
the mean cosine between the trained and base hidden states, and the relative change of the mean
activation norm (mean trained norm / mean base norm - 1). Per model: the mean per-token negative
log-likelihood (nats) of the completion tokens given everything before them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cbjax.evaluation.models import ModelHandle
from cbjax.evaluation.texts import TextRows, batches
from cbjax.losses import cosine_similarity, safe_norm


def _forward(graphdef, state, ids, mask, use_lora):
    """Run the model; return every hidden state (L + 1, B, S, D) and each next token's log-probability (B, S - 1)."""
    model = nnx.merge(graphdef, state)
    out = model(ids, mask, use_lora=use_lora)
    log_probs = jax.nn.log_softmax(out.logits[:, :-1].astype(jnp.float32), axis=-1)
    token_log_probs = jnp.take_along_axis(log_probs, ids[:, 1:, None], axis=-1)[..., 0]
    return jnp.stack(out.hidden_states), token_log_probs


def _row_log_likelihood(token_log_probs, completion_mask):
    targets = completion_mask[:, 1:].astype(jnp.float32)
    return jnp.sum(token_log_probs * targets, axis=1), jnp.sum(targets, axis=1)


@functools.partial(jax.jit, static_argnames=("base_graph", "trained_graph", "base_lora", "trained_lora"))
def _compare_batch(base_graph, base_state, trained_graph, trained_state, ids, mask, completion_mask,
                   *, base_lora, trained_lora):
    base_hidden, base_log_probs = _forward(base_graph, base_state, ids, mask, base_lora)
    trained_hidden, trained_log_probs = _forward(trained_graph, trained_state, ids, mask, trained_lora)
    weights = completion_mask.astype(jnp.float32)
    base_log_likelihood, targets = _row_log_likelihood(base_log_probs, completion_mask)
    trained_log_likelihood, _ = _row_log_likelihood(trained_log_probs, completion_mask)
    # Sums per layer and row, so that the filler rows of the last batch can be dropped on the host.
    return {
        "cosine": jnp.sum(cosine_similarity(trained_hidden, base_hidden) * weights, axis=-1),
        "base_norm": jnp.sum(safe_norm(base_hidden) * weights, axis=-1),
        "trained_norm": jnp.sum(safe_norm(trained_hidden) * weights, axis=-1),
        "tokens": jnp.sum(weights, axis=-1),
        "base_log_likelihood": base_log_likelihood,
        "trained_log_likelihood": trained_log_likelihood,
        "targets": targets,
    }


@functools.partial(jax.jit, static_argnames=("graphdef", "use_lora"))
def _score_batch(graphdef, state, ids, mask, completion_mask, *, use_lora):
    model = nnx.merge(graphdef, state)
    logits = model(ids, mask, use_lora=use_lora).logits
    log_probs = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    token_log_probs = jnp.take_along_axis(log_probs, ids[:, 1:, None], axis=-1)[..., 0]
    return _row_log_likelihood(token_log_probs, completion_mask)


def compare_on_texts(base: ModelHandle, trained: ModelHandle, rows: TextRows, *, batch_size: int = 8) -> dict:
    """Compute per-layer cosines and norm changes, and both models' completion NLLs, over all rows."""
    base_graph, base_state = nnx.split(base.model)
    trained_graph, trained_state = nnx.split(trained.model)
    totals: dict[str, np.ndarray] = {}
    for batch, valid in batches(rows, batch_size):
        sums = _compare_batch(
            base_graph, base_state, trained_graph, trained_state,
            jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]), jnp.asarray(batch["completion_mask"]),
            base_lora=base.use_lora, trained_lora=trained.use_lora,
        )
        for key, value in jax.device_get(sums).items():
            totals[key] = totals.get(key, 0.0) + np.asarray(value)[..., :valid].sum(axis=-1)

    tokens = float(totals["tokens"])
    targets = max(float(totals["targets"]), 1.0)
    denominator = max(tokens, 1.0)
    base_norm = totals["base_norm"] / denominator
    trained_norm = totals["trained_norm"] / denominator
    return {
        "rows": len(rows),
        "completion_tokens": int(tokens),
        "cosine": (totals["cosine"] / denominator).tolist(),
        "base_norm": base_norm.tolist(),
        "trained_norm": trained_norm.tolist(),
        "norm_change": (trained_norm / np.where(base_norm > 0, base_norm, 1.0) - 1.0).tolist(),
        "base_nll": -float(totals["base_log_likelihood"]) / targets,
        "trained_nll": -float(totals["trained_log_likelihood"]) / targets,
    }


def mean_log_likelihoods(handle: ModelHandle, rows: TextRows, *, batch_size: int = 8) -> list[float | None]:
    """Compute each row's mean per-token log-likelihood of its completion (None for an empty completion)."""
    graphdef, state = nnx.split(handle.model)
    means: list[float | None] = []
    for batch, valid in batches(rows, batch_size):
        sums, counts = jax.device_get(_score_batch(
            graphdef, state,
            jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]), jnp.asarray(batch["completion_mask"]),
            use_lora=handle.use_lora,
        ))
        for total, count in zip(sums[:valid], counts[:valid]):
            means.append(float(total / count) if count > 0 else None)
    return means

"""The jitted circuit-breaker train step: frozen passes, adapted passes, losses, gradients, update.

One step is one optimizer update. With gradient accumulation the batch's rows are split into
`accumulation_steps` micro-batches that a `lax.scan` runs in sequence, and the loss schedule
advances once per optimizer step.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from cbjax.losses import LossConfig, coefficients, cosine_similarity, masked_mean, rerouting_loss, retain_loss, safe_norm

BATCH_KEYS = (
    "rerouting_input_ids",
    "rerouting_attention_mask",
    "rerouting_loss_mask",
    "retain_input_ids",
    "retain_attention_mask",
)


class TrainState(NamedTuple):
    adapters: nnx.State
    opt_state: optax.OptState
    step: jax.Array  # optimizer steps taken so far


@dataclasses.dataclass(frozen=True)
class StepConfig:
    loss: LossConfig
    total_steps: int
    accumulation_steps: int = 1
    seed: int = 0


def hidden_states(graphdef, adapters, frozen, input_ids, attention_mask, *, stop, use_lora, dropout_rng=None):
    """Hidden states 0..stop stacked as (stop + 1, B, S, D)."""
    model = nnx.merge(graphdef, adapters, frozen)
    out = model(
        input_ids,
        attention_mask,
        stop_after_layer=stop,
        return_logits=False,
        use_lora=use_lora,
        dropout_rng=dropout_rng,
    )
    return jnp.stack(out.hidden_states)


def retain_and_rerouting_states(graphdef, adapters, frozen, batch, *, stop, use_lora, dropout_rng=None):
    """Hidden states 0..stop of the retain rows and of the rerouting rows, each (stop + 1, B, S, D).

    The two sets run as separate passes even when their lengths match. One pass over both
    batches was 5-10% slower on XLA:CPU (SmolLM2 benchmark step, 2 cores).
    """
    kw = dict(stop=stop, use_lora=use_lora)
    retain_rng, rerouting_rng = (None, None) if dropout_rng is None else jax.random.split(dropout_rng)
    retain = hidden_states(
        graphdef, adapters, frozen, batch["retain_input_ids"], batch["retain_attention_mask"],
        dropout_rng=retain_rng, **kw,
    )
    rerouting = hidden_states(
        graphdef, adapters, frozen, batch["rerouting_input_ids"], batch["rerouting_attention_mask"],
        dropout_rng=rerouting_rng, **kw,
    )
    return retain, rerouting


def frozen_targets(graphdef, adapters, frozen, batch, config: LossConfig):
    """Compute the frozen model's retain hidden states (all layers) and rerouting hidden states (target layers)."""
    retain, rerouting = retain_and_rerouting_states(
        graphdef, adapters, frozen, batch, stop=config.max_target_layer, use_lora=False
    )
    targets = jnp.asarray(config.target_layers)
    return jax.lax.stop_gradient(retain), jax.lax.stop_gradient(rerouting[targets])


def loss_and_metrics(adapters, graphdef, frozen, batch, coefficients_pair, dropout_rng, config: LossConfig):
    """Weighted circuit-breaker loss of one micro-batch, with the metrics the trainer logs."""
    targets = jnp.asarray(config.target_layers)
    frozen_retain, frozen_rerouting = frozen_targets(graphdef, adapters, frozen, batch, config)
    adapted_retain, adapted_rerouting = retain_and_rerouting_states(
        graphdef, adapters, frozen, batch, stop=config.max_target_layer, use_lora=True, dropout_rng=dropout_rng
    )
    adapted_rerouting = adapted_rerouting[targets]

    rerouting_mask = batch["rerouting_loss_mask"]
    retain_mask = batch["retain_attention_mask"]
    rerouting_value = rerouting_loss(adapted_rerouting, frozen_rerouting, rerouting_mask, config)
    retain_value = retain_loss(adapted_retain, frozen_retain, retain_mask, config)
    rerouting_coeff, retain_coeff = coefficients_pair
    loss = rerouting_coeff * rerouting_value + retain_coeff * retain_value

    metrics = {
        "loss": loss,
        "rerouting_loss": rerouting_value,
        "retain_loss": retain_value,
        "rerouting_cosine": masked_mean(cosine_similarity(adapted_rerouting, frozen_rerouting), rerouting_mask),
        "retain_cosine": masked_mean(cosine_similarity(adapted_retain[targets], frozen_retain[targets]), retain_mask),
        "rerouting_norm": masked_mean(safe_norm(adapted_rerouting), rerouting_mask),
        "rerouting_frozen_norm": masked_mean(safe_norm(frozen_rerouting), rerouting_mask),
        "retain_norm": masked_mean(safe_norm(adapted_retain[targets]), retain_mask),
    }
    return loss, metrics


def split_micro_batches(batch: dict, accumulation_steps: int) -> dict:
    def reshape(x):
        rows = x.shape[0]
        if rows % accumulation_steps:
            raise ValueError(f"batch of {rows} rows does not split into {accumulation_steps} micro-batches")
        return x.reshape(accumulation_steps, rows // accumulation_steps, *x.shape[1:])

    return {k: reshape(batch[k]) for k in BATCH_KEYS}


def train_step(state: TrainState, frozen, batch: dict, *, graphdef, optimizer, config: StepConfig):
    """Run one optimizer update. The function is pure, so it can be jitted with explicit shardings."""
    step = state.step + 1
    pair = coefficients(step, config.total_steps, config.loss)
    step_rng = jax.random.fold_in(jax.random.key(config.seed), step)
    grad_fn = jax.value_and_grad(loss_and_metrics, has_aux=True)

    def micro_step(carry, inputs):
        grads_sum, index = carry
        micro_batch = inputs
        rng = jax.random.fold_in(step_rng, index)
        (_, metrics), grads = grad_fn(state.adapters, graphdef, frozen, micro_batch, pair, rng, config.loss)
        grads_sum = jax.tree.map(jnp.add, grads_sum, grads)
        return (grads_sum, index + 1), metrics

    zeros = jax.tree.map(jnp.zeros_like, state.adapters)
    micro = split_micro_batches(batch, config.accumulation_steps)
    (grads_sum, _), metrics = jax.lax.scan(micro_step, (zeros, jnp.int32(0)), micro)
    grads = jax.tree.map(lambda g: g / config.accumulation_steps, grads_sum)
    metrics = jax.tree.map(jnp.mean, metrics)

    updates, opt_state = optimizer.update(grads, state.opt_state, state.adapters)
    adapters = optax.apply_updates(state.adapters, updates)
    metrics.update(
        rerouting_coeff=pair[0],
        retain_coeff=pair[1],
        grad_norm=optax.global_norm(grads),
        step=step,
    )
    return TrainState(adapters, opt_state, step), metrics


def validation_metrics(adapters, frozen, batch: dict, *, graphdef, config: LossConfig) -> dict:
    """Cosines between adapted and frozen hidden states at the target layers on held-out rows."""
    stop = config.max_target_layer
    targets = jnp.asarray(config.target_layers)
    results = {}
    for name, ids_key, mask_key, loss_mask_key in (
        ("rerouting", "rerouting_input_ids", "rerouting_attention_mask", "rerouting_loss_mask"),
        ("retain", "retain_input_ids", "retain_attention_mask", "retain_attention_mask"),
    ):
        kw = dict(stop=stop)
        adapted = hidden_states(graphdef, adapters, frozen, batch[ids_key], batch[mask_key], use_lora=True, **kw)[targets]
        base = hidden_states(graphdef, adapters, frozen, batch[ids_key], batch[mask_key], use_lora=False, **kw)[targets]
        cosine = cosine_similarity(adapted, base)
        results[f"val_{name}_cosine"] = masked_mean(cosine, batch[loss_mask_key])
        results[f"val_{name}_norm_ratio"] = masked_mean(safe_norm(adapted), batch[loss_mask_key]) / masked_mean(
            safe_norm(base), batch[loss_mask_key]
        )
    return results

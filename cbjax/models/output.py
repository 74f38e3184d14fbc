"""The output every model family returns, and the hidden-state indexing it follows."""

from __future__ import annotations

from typing import NamedTuple

import jax

from cbjax.models.config import ModelConfig


class ModelOutput(NamedTuple):
    """Outputs of a forward pass.

    `hidden_states` follows transformers' `output_hidden_states=True`: entry 0 is the embedding
    output and entry i the output of layer i (1-based). When the whole model runs, the last entry
    is taken after the final norm, as in transformers. When the forward stops after layer L < the
    model's depth, there are L + 1 entries and none is normalised. `logits` is None when skipped.
    """

    hidden_states: tuple[jax.Array, ...]
    logits: jax.Array | None
    cache: object | None = None


def resolve_stop_layer(config: ModelConfig, stop_after_layer: int | None) -> int:
    """Return the number of layers to run. A model built with dropped layers stops after its last one."""
    if stop_after_layer is None:
        return config.built_layers
    config.check_layer(stop_after_layer, "stop_after_layer")
    if stop_after_layer > config.built_layers:
        raise ValueError(
            f"stop_after_layer {stop_after_layer} needs layers that were dropped: this model keeps "
            f"{config.built_layers} of {config.num_layers} layers"
        )
    return stop_after_layer


def collect_hidden_states(hidden_states: list[jax.Array], final: jax.Array | None) -> tuple[jax.Array, ...]:
    if final is not None:
        hidden_states = hidden_states[:-1] + [final]
    return tuple(hidden_states)

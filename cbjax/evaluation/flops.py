"""Matmul FLOPs that one circuit-breaker train step needs (Llama family), by part.

A step runs four passes through layers 1..L, L being the highest target layer: the frozen model
on the rerouting and the retain rows (no gradient), and the adapted model on both, followed by
their backward pass. Counted, at 2 FLOPs per multiply-add:

- frozen and adapted forwards: the projections of every layer;
- input gradients: dX = dY W^T of every projection from layer L down to the lowest adapted
  layer. Frozen weights need no weight gradient. In the lowest adapted layer, q, k and v read the
  layer input, which depends on no adapter, so their input gradients are left out;
- adapter terms: x A and (x A) B in the adapted forwards, and in the backward dB, d(xA), dA and
  the input gradient through A (left out where the input needs no gradient, as above);
- attention: Q K^T and P V over causal pairs only (query i attends to i + 1 keys) in all four forwards,
  and twice that in the backward of the adapted passes (dP, dV, dQ, dK).

Not counted: the LM head and layers above L (the step needs neither), norms, activations,
softmax, RoPE, the loss and the optimizer, which are elementwise. Every position of the laid-out
rows counts, padding included, because both implementations compute it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from cbjax.lora import LLAMA_TARGETS
from cbjax.models.config import ModelConfig

# Projections that read the decoder layer's input (through its first norm).
LAYER_INPUT_PROJECTIONS = ("q_proj", "k_proj", "v_proj")


@dataclasses.dataclass(frozen=True)
class StepShape:
    batch: int
    rerouting_length: int  # request + response tokens per rerouting row
    retain_length: int


def projection_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each projection of one decoder layer."""
    if config.family not in ("llama", "mistral"):
        raise ValueError(f"the FLOP count covers the Llama family only, not {config.family!r}")
    hidden, heads, kv_heads, head_dim = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
    return {
        "q_proj": (hidden, heads * head_dim),
        "k_proj": (hidden, kv_heads * head_dim),
        "v_proj": (hidden, kv_heads * head_dim),
        "o_proj": (heads * head_dim, hidden),
        "gate_proj": (hidden, config.intermediate_size),
        "up_proj": (hidden, config.intermediate_size),
        "down_proj": (config.intermediate_size, hidden),
    }


def causal_attention_flops(config: ModelConfig, length: int) -> int:
    """Forward Q K^T plus P V of one row in one layer: 2 FLOPs x heads x head_dim per (query, key) pair, twice."""
    pairs = length * (length + 1) // 2
    return 2 * 2 * config.num_heads * config.head_dim * pairs


def step_flops(
    config: ModelConfig,
    shape: StepShape,
    *,
    target_layers: Sequence[int],
    adapted_layers: Sequence[int],
    lora_r: int,
    lora_targets: Sequence[str] = LLAMA_TARGETS,
) -> dict[str, int]:
    """FLOPs of one step by part, plus their total."""
    depth = max(target_layers)
    lowest = min(adapted_layers)
    shapes = projection_shapes(config)
    adapted = {name: shapes[name] for name in shapes if name in lora_targets}
    tokens = shape.batch * (shape.rerouting_length + shape.retain_length)

    layer_flops = sum(2 * fan_in * fan_out for fan_in, fan_out in shapes.values())
    forward = tokens * depth * layer_flops
    backprop_layers = depth - lowest
    skipped_input_gradients = sum(2 * shapes[name][0] * shapes[name][1] for name in LAYER_INPUT_PROJECTIONS)
    input_gradient = tokens * (backprop_layers * layer_flops - skipped_input_gradients)

    adapter_layer = sum(2 * lora_r * (fan_in + fan_out) for fan_in, fan_out in adapted.values())
    adapter_forward = tokens * len(adapted_layers) * adapter_layer
    skipped_adapter = sum(2 * adapted[name][0] * lora_r for name in LAYER_INPUT_PROJECTIONS if name in adapted)
    adapter_backward = 2 * adapter_forward - tokens * skipped_adapter

    attention_pass = shape.batch * depth * (
        causal_attention_flops(config, shape.rerouting_length) + causal_attention_flops(config, shape.retain_length)
    )
    # Forward: frozen and adapted passes. Backward: twice the adapted forward, over the backprop layers.
    attention = 2 * attention_pass + 2 * attention_pass * backprop_layers // depth

    parts = {
        "frozen_forward": forward,
        "adapted_forward": forward,
        "input_gradient": input_gradient,
        "adapter": adapter_forward + adapter_backward,
        "attention": attention,
    }
    parts["total"] = sum(parts.values())
    return parts

"""LoRA adapters: attach them to chosen projections and layers, split them from the frozen weights, merge.

Adapters are `LoRAParam` variables on `Linear` modules, so `nnx.split(model, LoRAParam, ...)` gives
the trainable tree and the frozen tree in one call, and only the first receives gradients and
optimizer state. Delta = (lora_alpha / r) * lora_a @ lora_b with lora_b initialised to zero, so the
adapted model starts equal to the frozen one. The initialisation of lora_a follows PEFT:
uniform in +-1/sqrt(in_features).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from cbjax.models.layers import Linear, LoRAParam

logger = logging.getLogger(__name__)

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GPT2_TARGETS = ("c_attn", "attn.c_proj", "c_fc", "mlp.c_proj")
DEFAULT_TARGETS = {"llama": LLAMA_TARGETS, "mistral": LLAMA_TARGETS, "gpt2": GPT2_TARGETS}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    r: int = 16
    alpha: float = 16.0
    dropout: float = 0.05
    # Module names matched as PEFT does: the module's dotted path inside a layer equals the name
    # or ends with "." + name. None means the family's default projections.
    target_modules: tuple[str, ...] | None = None
    # 0-based indices of decoder layers (layer i produces hidden state i + 1). None means every
    # layer that training computes.
    layers: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.r <= 0:
            raise ValueError(f"lora.r must be a positive integer, got {self.r}")
        if self.alpha <= 0:
            raise ValueError(f"lora.alpha must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    def targets_for(self, family: str) -> tuple[str, ...]:
        return tuple(self.target_modules) if self.target_modules else DEFAULT_TARGETS[family]


def matches(module_path: str, targets: Sequence[str]) -> bool:
    return any(module_path == t or module_path.endswith("." + t) for t in targets)


def linear_modules(layer: nnx.Module) -> list[tuple[str, Linear]]:
    """List every `Linear` inside one decoder layer with its dotted path relative to the layer."""
    found = []
    for path, node in nnx.iter_graph(layer):
        if isinstance(node, Linear):
            found.append((".".join(str(p) for p in path), node))
    return found


def add_lora(model: nnx.Module, config: LoraConfig, layers: Sequence[int], seed: int = 0) -> list[str]:
    """Attach adapters in place to the target modules of `layers`; return the adapted module paths."""
    num_layers = len(model.layers)
    targets = config.targets_for(model.config.family)
    key = jax.random.key(seed)
    adapted = []
    for layer_index in layers:
        if not 0 <= layer_index < num_layers:
            raise ValueError(
                f"lora layer {layer_index} is out of range: the model computes layers 0..{num_layers - 1}"
            )
        for path, linear in linear_modules(model.layers[layer_index]):
            if not matches(path, targets):
                continue
            in_features, out_features = linear.kernel.get_value().shape
            dtype = linear.kernel.get_value().dtype
            key, sub = jax.random.split(key)
            bound = 1.0 / in_features**0.5
            linear.lora_a = LoRAParam(jax.random.uniform(sub, (in_features, config.r), dtype, -bound, bound))
            linear.lora_b = LoRAParam(jnp.zeros((config.r, out_features), dtype))
            linear.lora_scale = config.scale
            linear.lora_dropout = config.dropout
            adapted.append(f"layers.{layer_index}.{path}")
    if not adapted:
        raise ValueError(f"lora.target_modules {targets} matched no module in layers {list(layers)}")
    return adapted


def split_lora(model: nnx.Module):
    """Return (graphdef, adapters, frozen): the adapter tree and everything else."""
    return nnx.split(model, LoRAParam, ...)


def merge_lora(model: nnx.Module) -> nnx.Module:
    """Fold every adapter into its kernel in place and remove it: kernel += scale * lora_a @ lora_b.

    The product is taken in fp32 and cast once to the kernel's dtype.
    """
    for _, node in nnx.iter_graph(model):
        if isinstance(node, Linear) and node.lora_a is not None:
            kernel = node.kernel.get_value()
            delta = node.lora_scale * (
                node.lora_a.get_value().astype(jnp.float32) @ node.lora_b.get_value().astype(jnp.float32)
            )
            node.kernel.set_value((kernel.astype(jnp.float32) + delta).astype(kernel.dtype))
            node.lora_a = None
            node.lora_b = None
            node.lora_scale = 0.0
            node.lora_dropout = 0.0
    return model


def count_parameters(tree) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(tree))

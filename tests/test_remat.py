"""Rematerialised decoder layers give the loss and adapter gradients of the plain forward.

The sharded runs of tests/test_sharding.py repeat this comparison for all three families, with
gradient accumulation for Llama.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cbjax import lora as lora_lib
from cbjax.losses import LossConfig
from cbjax.models import build_model, from_hf_config
from cbjax.models.llama import set_execution
from cbjax.train_step import loss_and_metrics
from tests.sharding_worker import training_batch

TOLERANCE = 1e-5
# Unoptimised CPU code compiles about twice as fast, and all compared runs use the same options.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
CONFIG = from_hf_config(dict(
    model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
    num_attention_heads=4, num_key_value_heads=2,
))


def loss_and_gradients(remat: str):
    model = build_model(CONFIG)
    lora_lib.add_lora(model, lora_lib.LoraConfig(r=4, alpha=8.0, dropout=0.1), [0], seed=1)
    # Random lora_b, so that adapted and frozen states differ by more than rounding.
    key = jax.random.key(2)
    for _, node in nnx.iter_graph(model):
        if isinstance(node, lora_lib.Linear) and node.lora_b is not None:
            key, sub = jax.random.split(key)
            node.lora_b.set_value(0.05 * jax.random.normal(sub, node.lora_b.get_value().shape))
    set_execution(model, "xla", remat)
    graphdef, adapters, frozen = lora_lib.split_lora(model)
    batch = {k: jnp.asarray(v) for k, v in training_batch(0, rows=4).items()}
    value_and_grad = jax.jit(
        jax.value_and_grad(loss_and_metrics, has_aux=True), static_argnums=(1, 6), compiler_options=FAST_COMPILE
    )
    (loss, _), grads = value_and_grad(
        adapters, graphdef, frozen, batch, (jnp.float32(7.0), jnp.float32(3.0)), jax.random.key(0),
        LossConfig(target_layers=(1,)),
    )
    return float(loss), grads


@pytest.fixture(scope="module")
def plain():
    return loss_and_gradients("none")


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_keeps_loss_and_gradients(plain, remat):
    loss, grads = loss_and_gradients(remat)

    assert loss == pytest.approx(plain[0], abs=TOLERANCE)
    flat = dict(nnx.to_flat_state(grads))
    for path, expected in nnx.to_flat_state(plain[1]):
        diff = float(np.max(np.abs(np.asarray(flat[path]) - np.asarray(expected))))
        assert diff < TOLERANCE, f"{'.'.join(map(str, path))}: max abs diff {diff:.2e}"


def test_unknown_remat_rejected():
    model = build_model(CONFIG)
    with pytest.raises(ValueError, match="model.remat 'some' is unknown"):
        set_execution(model, "xla", "some")


def temporary_memory_of_gradient(remat: str) -> int:
    config = from_hf_config(dict(
        model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=256, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=2,
    ))
    model = build_model(config)
    lora_lib.add_lora(model, lora_lib.LoraConfig(r=4, alpha=8.0, dropout=0.1), range(6), seed=1)
    set_execution(model, "xla", remat)
    graphdef, adapters, frozen = lora_lib.split_lora(model)
    batch = {k: jnp.asarray(v) for k, v in training_batch(0, rows=4).items()}
    value_and_grad = jax.jit(jax.value_and_grad(loss_and_metrics, has_aux=True), static_argnums=(1, 6))
    compiled = value_and_grad.lower(
        adapters, graphdef, frozen, batch, (jnp.float32(7.0), jnp.float32(3.0)), jax.random.key(0),
        LossConfig(target_layers=(6,)),
    ).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_full_remat_lowers_temporary_memory():
    # XLA:CPU merges a plain `jax.checkpoint` recomputation back into the forward pass, so this
    # fails when the recomputation is not tied to the cotangent.
    plain_bytes = temporary_memory_of_gradient("none")
    remat_bytes = temporary_memory_of_gradient("full")
    assert remat_bytes < 0.5 * plain_bytes, f"full remat {remat_bytes} bytes vs none {plain_bytes} bytes"

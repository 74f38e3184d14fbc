"""The jitted train step on tiny random Llama models: gradients against PyTorch + PEFT, learning, accumulation."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model

from cbjax import lora as lora_lib
from cbjax.losses import LossConfig
from cbjax.train_step import StepConfig, TrainState, loss_and_metrics, train_step
from cbjax.weights.load import load_model
from tests import torch_reference
from tests.hf_reference import save_tiny_model
from tests.sharding_worker import training_batch
from tests.test_llama_parity import tiny_llama

STOP = 2
TARGETS = (1, 2)


def synthetic_batch(seed: int) -> dict:
    return training_batch(seed, rows=4)


def adapted_tiny_model(tmp_path, *, r=4, alpha=8.0, dropout=0.0, random_b=False):
    hf_model = tiny_llama(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    loaded = load_model(save_tiny_model(hf_model, tmp_path), num_layers=STOP)
    config = lora_lib.LoraConfig(r=r, alpha=alpha, dropout=dropout)
    lora_lib.add_lora(loaded.model, config, range(STOP), seed=1)
    if random_b:
        key = jax.random.key(2)
        for _, node in nnx.iter_graph(loaded.model):
            if isinstance(node, lora_lib.Linear) and node.lora_b is not None:
                key, sub = jax.random.split(key)
                node.lora_b.set_value(0.05 * jax.random.normal(sub, node.lora_b.get_value().shape))
    return hf_model, loaded


def test_lora_gradients_match_pytorch_peft(tmp_path):
    hf_model, loaded = adapted_tiny_model(tmp_path, random_b=True)
    graphdef, adapters, frozen = lora_lib.split_lora(loaded.model)
    batch = synthetic_batch(0)
    config = LossConfig(target_layers=TARGETS, alpha=10.0)
    pair = (jnp.float32(7.0), jnp.float32(3.0))

    (loss, _), grads = jax.value_and_grad(loss_and_metrics, has_aux=True)(
        adapters, graphdef, frozen, {k: jnp.asarray(v) for k, v in batch.items()}, pair, jax.random.key(0), config
    )

    peft_model = get_peft_model(
        hf_model,
        PeftLoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(lora_lib.LLAMA_TARGETS),
                       layers_to_transform=list(range(STOP))),
    )
    peft_params = dict(peft_model.named_parameters())
    with torch.no_grad():
        for path, node in nnx.iter_graph(loaded.model):
            if isinstance(node, lora_lib.Linear) and node.lora_a is not None:
                prefix = "base_model.model.model." + ".".join(map(str, path))
                peft_params[f"{prefix}.lora_A.default.weight"].copy_(torch.from_numpy(np.asarray(node.lora_a.get_value()).T))
                peft_params[f"{prefix}.lora_B.default.weight"].copy_(torch.from_numpy(np.asarray(node.lora_b.get_value()).T))

    def states(ids, mask):
        out = peft_model(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long(),
                         position_ids=torch.from_numpy(np.clip(np.cumsum(mask, 1) - 1, 0, None)).long(),
                         output_hidden_states=True)
        return torch.stack(out.hidden_states[: STOP + 1])

    with torch.no_grad(), peft_model.disable_adapter():
        frozen_rerouting = states(batch["rerouting_input_ids"], batch["rerouting_attention_mask"])
        frozen_retain = states(batch["retain_input_ids"], batch["retain_attention_mask"])
    adapted_rerouting = states(batch["rerouting_input_ids"], batch["rerouting_attention_mask"])
    adapted_retain = states(batch["retain_input_ids"], batch["retain_attention_mask"])
    targets = list(TARGETS)
    torch_loss = 7.0 * torch_reference.rerouting_cosine_loss(
        adapted_rerouting[targets], frozen_rerouting[targets], torch.from_numpy(batch["rerouting_loss_mask"])
    ) + 3.0 * torch_reference.retain_l2_loss(adapted_retain, frozen_retain, torch.from_numpy(batch["retain_attention_mask"]))
    torch_loss.backward()

    assert abs(float(loss) - float(torch_loss)) < 1e-5
    checked = 0
    flat_grads = {".".join(map(str, p)): np.asarray(v) for p, v in nnx.to_flat_state(grads)}
    for key, grad in flat_grads.items():
        module, leaf = key.rsplit(".", 1)
        peft_name = f"base_model.model.model.{module}.{'lora_A' if leaf == 'lora_a' else 'lora_B'}.default.weight"
        expected = peft_params[peft_name].grad.numpy().T
        diff = np.max(np.abs(grad - expected))
        assert diff < 1e-5, f"{key}: max abs diff {diff:.2e}"
        checked += 1
    assert checked == 2 * 7 * STOP


def make_step(graphdef, adapters, *, steps, accumulation=1, lr=3e-3, config=None):
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(lr, weight_decay=0.0))
    config = config or LossConfig(target_layers=TARGETS, alpha=10.0)
    step_config = StepConfig(config, total_steps=steps, accumulation_steps=accumulation, seed=0)
    fn = jax.jit(functools.partial(train_step, graphdef=graphdef, optimizer=optimizer, config=step_config))
    state = TrainState(adapters, optimizer.init(adapters), jnp.zeros((), jnp.int32))
    return fn, state


def test_training_reroutes_and_retains(tmp_path):
    _, loaded = adapted_tiny_model(tmp_path, dropout=0.05)
    graphdef, adapters, frozen = lora_lib.split_lora(loaded.model)
    steps = 60
    fn, state = make_step(graphdef, adapters, steps=steps)
    batch = {k: jnp.asarray(v) for k, v in synthetic_batch(0).items()}

    history = []
    for _ in range(steps):
        state, metrics = fn(state, frozen, batch)
        history.append(jax.device_get(metrics))

    assert np.isfinite(history[0]["loss"])
    # lora_b starts at zero, so the adapted model equals the frozen one up to XLA's fusion choices.
    assert history[0]["retain_loss"] < 1e-6
    assert history[0]["rerouting_cosine"] == pytest.approx(1.0, abs=1e-5)
    assert history[-1]["rerouting_loss"] < 0.5 * history[0]["rerouting_loss"]
    assert history[-1]["rerouting_cosine"] < 0.5
    assert history[-1]["retain_cosine"] >= 0.95
    assert int(history[-1]["step"]) == steps


def test_step_compiles_once(tmp_path):
    _, loaded = adapted_tiny_model(tmp_path)
    graphdef, adapters, frozen = lora_lib.split_lora(loaded.model)
    fn, state = make_step(graphdef, adapters, steps=5)
    for seed in range(3):
        state, _ = fn(state, frozen, {k: jnp.asarray(v) for k, v in synthetic_batch(seed).items()})
    assert fn._cache_size() == 1


def test_accumulation_matches_full_batch(tmp_path):
    _, loaded = adapted_tiny_model(tmp_path, random_b=True)
    graphdef, adapters, frozen = lora_lib.split_lora(loaded.model)
    batch = {k: jnp.asarray(v) for k, v in synthetic_batch(0).items()}
    # The retain loss averages over positions and the rerouting loss over valid tokens, so
    # equal-sized micro-batches with equal mask sums give the same mean as the full batch.
    batch["retain_attention_mask"] = jnp.ones_like(batch["retain_attention_mask"])

    full_fn, full_state = make_step(graphdef, adapters, steps=3)
    accum_fn, accum_state = make_step(graphdef, adapters, steps=3, accumulation=2)
    full_state, full_metrics = full_fn(full_state, frozen, batch)
    accum_state, accum_metrics = accum_fn(accum_state, frozen, batch)

    assert float(accum_metrics["loss"]) == pytest.approx(float(full_metrics["loss"]), abs=1e-5)
    for a, b in zip(jax.tree.leaves(full_state.adapters), jax.tree.leaves(accum_state.adapters)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    assert float(accum_metrics["rerouting_coeff"]) == float(full_metrics["rerouting_coeff"])


def test_lora_rank_must_be_positive():
    with pytest.raises(ValueError, match="lora.r must be a positive integer"):
        lora_lib.LoraConfig(r=0)

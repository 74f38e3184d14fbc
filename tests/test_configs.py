"""Every shipped config loads and validates against its architecture; each family trains."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

from cbjax import lora as lora_lib
from cbjax import preflight, trainer
from cbjax.config import load_config
from cbjax.losses import LossConfig
from cbjax.weights.load import load_model, peek_config
from tests.test_train_step import make_step, synthetic_batch

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# Stand-ins with each real model's depth and tiny widths: the real weights are not available here.
STAND_INS = {
    "smollm2_135m.yaml": lambda: LlamaForCausalLM(LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=30,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)),
    "llama3_8b.yaml": lambda: LlamaForCausalLM(LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=32,
        num_attention_heads=4, num_key_value_heads=2)),
    "mistral_7b.yaml": lambda: MistralForCausalLM(MistralConfig(
        vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=32,
        num_attention_heads=4, num_key_value_heads=2, sliding_window=None)),
    "gpt2.yaml": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=32, n_layer=12, n_head=4, n_positions=1024)),
}


def test_every_config_has_a_stand_in():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(STAND_INS)


@pytest.mark.parametrize("name", sorted(STAND_INS))
def test_config_validates_against_architecture(tmp_path, name):
    config = load_config(CONFIGS / name)
    STAND_INS[name]().save_pretrained(tmp_path)

    architecture = peek_config(tmp_path)
    preflight.check_target_layers(architecture, config)
    preflight.check_sequence_lengths(architecture, config)
    layers = trainer.lora_layers(config)

    assert max(layers) < config.loss.max_target_layer <= architecture.num_layers
    loaded = load_model(tmp_path, num_layers=config.loss.max_target_layer)
    adapted = lora_lib.add_lora(loaded.model, config.lora, layers)
    assert len(adapted) == len(layers) * len(config.lora.targets_for(architecture.family))


@pytest.mark.parametrize("name", sorted(STAND_INS))
def test_target_beyond_depth_is_an_error(tmp_path, name):
    STAND_INS[name]().save_pretrained(tmp_path)
    architecture = peek_config(tmp_path)
    config = load_config(CONFIGS / name, [f"loss.target_layers=[2, {architecture.num_layers + 1}]"])
    with pytest.raises(ValueError, match=f"entry {architecture.num_layers + 1} is out of range"):
        preflight.check_target_layers(architecture, config)


def test_rows_past_gpt2_positions_raise(tmp_path):
    STAND_INS["gpt2.yaml"]().save_pretrained(tmp_path)
    config = load_config(CONFIGS / "gpt2.yaml", ["data.retain_length=1025"])
    with pytest.raises(ValueError, match=r"retain rows \(data.retain_length\) are 1025 tokens long, .* 1024 learned"):
        preflight.check_sequence_lengths(peek_config(tmp_path), config)


FAMILIES = {
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=64, n_layer=3, n_head=4, n_positions=64)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, sliding_window=6)),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_trains(tmp_path, family):
    FAMILIES[family]().save_pretrained(tmp_path)
    loaded = load_model(tmp_path, num_layers=2)
    lora_lib.add_lora(loaded.model, lora_lib.LoraConfig(r=4, alpha=8, dropout=0.05), range(2), seed=1)
    graphdef, adapters, frozen = lora_lib.split_lora(loaded.model)
    fn, state = make_step(graphdef, adapters, steps=30, config=LossConfig(target_layers=(1, 2), alpha=10.0))
    batch = {k: jnp.asarray(v) for k, v in synthetic_batch(0).items()}

    history = []
    for _ in range(30):
        state, metrics = fn(state, frozen, batch)
        history.append(jax.device_get(metrics))

    assert all(np.isfinite(m["loss"]) for m in history)
    assert history[-1]["rerouting_loss"] < 0.5 * history[0]["rerouting_loss"]

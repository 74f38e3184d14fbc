"""Llama-family parity with transformers' PyTorch models built from tiny random configs."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from cbjax.weights.load import load_model
from tests.hf_reference import hf_forward, left_padded_batch, max_abs_diff_on_valid, save_tiny_model

TOLERANCE = 1e-4

CONFIGS = {
    "mha_untied": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False),
    "gqa_tied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "gqa_llama3_rope": dict(
        num_attention_heads=8,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        rope_theta=500000.0,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=64,
        ),
    ),
}


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        attn_implementation="eager",
        **overrides,
    )
    model = LlamaForCausalLM(config).eval()
    # Random init leaves norms at 1; perturb them so a misplaced norm weight shows.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("seq, lengths", [(12, [12, 7, 3]), (520, [520, 480])])
def test_llama_matches_transformers(tmp_path, name, seq, lengths):
    hf_model = tiny_llama(**CONFIGS[name])
    loaded = load_model(save_tiny_model(hf_model, tmp_path))
    ids, mask, positions = left_padded_batch(128, lengths, seq)

    expected_logits, expected_hidden = hf_forward(hf_model, ids, mask, positions)
    out = loaded.model(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(positions))

    assert len(out.hidden_states) == len(expected_hidden)
    for layer, (ours, theirs) in enumerate(zip(out.hidden_states, expected_hidden)):
        diff = max_abs_diff_on_valid(ours, theirs, mask)
        assert diff < TOLERANCE, f"hidden state {layer}: max abs diff {diff:.2e}"
    diff = max_abs_diff_on_valid(out.logits, expected_logits, mask)
    assert diff < TOLERANCE, f"logits: max abs diff {diff:.2e}"


def test_positions_default_from_mask(tmp_path):
    hf_model = tiny_llama(**CONFIGS["gqa_tied"])
    loaded = load_model(save_tiny_model(hf_model, tmp_path))
    ids, mask, positions = left_padded_batch(128, [9, 4], 9)

    explicit = loaded.model(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(positions))
    derived = loaded.model(jnp.asarray(ids), jnp.asarray(mask))

    np.testing.assert_array_equal(np.asarray(explicit.logits), np.asarray(derived.logits))


def test_padded_rows_stay_finite(tmp_path):
    hf_model = tiny_llama(**CONFIGS["gqa_tied"])
    loaded = load_model(save_tiny_model(hf_model, tmp_path))
    ids, mask, _ = left_padded_batch(128, [6, 1], 6)
    right_mask = mask[:, ::-1].copy()

    for m in (mask, right_mask):
        out = loaded.model(jnp.asarray(ids), jnp.asarray(m))
        assert np.isfinite(np.asarray(out.logits)).all()
        assert all(np.isfinite(np.asarray(h)).all() for h in out.hidden_states)


@pytest.mark.parametrize("stop", [0, 1, 2, 3])
def test_stop_after_layer_is_prefix_of_full_forward(tmp_path, stop):
    hf_model = tiny_llama(**CONFIGS["gqa_tied"])
    loaded = load_model(save_tiny_model(hf_model, tmp_path))
    ids, mask, _ = left_padded_batch(128, [8, 5], 8)

    full = loaded.model(jnp.asarray(ids), jnp.asarray(mask))
    partial = loaded.model(jnp.asarray(ids), jnp.asarray(mask), stop_after_layer=stop, return_logits=False)

    assert partial.logits is None
    assert len(partial.hidden_states) == stop + 1
    for layer, hidden in enumerate(partial.hidden_states):
        np.testing.assert_array_equal(np.asarray(hidden), np.asarray(full.hidden_states[layer]))


def test_bf16_forward_close_to_fp32(tmp_path):
    hf_model = tiny_llama(**CONFIGS["gqa_tied"])
    directory = save_tiny_model(hf_model, tmp_path)
    fp32 = load_model(directory)
    bf16 = load_model(directory, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    ids, mask, _ = left_padded_batch(128, [10, 6], 10)

    reference = np.asarray(fp32.model(jnp.asarray(ids), jnp.asarray(mask)).logits)
    low = bf16.model(jnp.asarray(ids), jnp.asarray(mask)).logits

    assert low.dtype == jnp.bfloat16
    assert max_abs_diff_on_valid(np.asarray(low, np.float32), reference, mask) < 0.05

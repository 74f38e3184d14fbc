"""Mistral parity with transformers: `LlamaForCausalLM` with and without a sliding window."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import MistralConfig, MistralForCausalLM
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from cbjax.models.attention import attention_mask
from cbjax.models.kv_cache import KVCache
from cbjax.models.llama import LlamaForCausalLM as CbjaxLlama
from cbjax.weights.load import load_model
from cbjax.weights.safetensors_io import CheckpointError
from tests.hf_reference import hf_forward, left_padded_batch, max_abs_diff_on_valid
from tests.parity_checks import (
    TOLERANCE,
    compare_with_transformers,
    perturb_norms_and_biases,
    rewrite_checkpoint,
    save_variant,
)

VOCAB = 128


def tiny_mistral(sliding_window: int | None, seed: int = 0, **overrides) -> MistralForCausalLM:
    torch.manual_seed(seed)
    config = MistralConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        sliding_window=sliding_window,
        attn_implementation="eager",
        **overrides,
    )
    model = MistralForCausalLM(config).eval()
    perturb_norms_and_biases(model, seed)
    return model


@pytest.mark.parametrize(
    "window, seq, lengths",
    [(None, 12, [12, 7, 3]), (5, 12, [12, 7, 3]), (None, 520, [520, 480]), (64, 520, [520, 480])],
)
def test_mistral_matches_transformers(tmp_path, window, seq, lengths):
    hf_model = tiny_mistral(window)
    loaded = load_model(save_variant(hf_model, tmp_path, "single")[0])
    ids, mask, positions = left_padded_batch(VOCAB, lengths, seq)

    assert isinstance(loaded.model, CbjaxLlama)
    assert loaded.config.sliding_window == window
    compare_with_transformers(loaded.model, hf_model, ids, mask, positions)


@pytest.mark.parametrize("variant", ["sharded", "bf16"])
def test_mistral_checkpoint_variants(tmp_path, variant):
    directory, reference = save_variant(tiny_mistral(5), tmp_path, variant)
    loaded = load_model(directory)
    ids, mask, positions = left_padded_batch(VOCAB, [12, 7, 3], 12)

    compare_with_transformers(loaded.model, reference, ids, mask, positions)


@pytest.mark.parametrize("window", [None, 3])
def test_mask_equals_transformers_mask(window):
    config = tiny_mistral(window).config
    ids, mask, positions = left_padded_batch(VOCAB, [9, 5, 1], 9)
    make_mask = create_causal_mask if window is None else create_sliding_window_causal_mask

    # allow_is_causal_skip=False makes transformers build the (B, 1, S, S) additive mask it would skip.
    additive = make_mask(
        config=config,
        inputs_embeds=torch.zeros(3, 9, config.hidden_size),
        attention_mask=torch.from_numpy(mask),
        cache=None,
        position_ids=torch.from_numpy(positions),
        allow_is_causal_skip=False,
    )
    ours = attention_mask(jnp.arange(9), jnp.arange(9), jnp.asarray(mask), window)

    np.testing.assert_array_equal(np.asarray(ours), (additive == 0).numpy())


def test_sliding_window_changes_output(tmp_path):
    # Guards the window tests against a window that is silently ignored.
    windowed = load_model(save_variant(tiny_mistral(5), tmp_path / "windowed", "single")[0]).model
    full = load_model(save_variant(tiny_mistral(None), tmp_path / "full", "single")[0]).model
    ids, mask, _ = left_padded_batch(VOCAB, [12], 12)

    a = np.asarray(windowed(jnp.asarray(ids), jnp.asarray(mask)).logits)
    b = np.asarray(full(jnp.asarray(ids), jnp.asarray(mask)).logits)

    np.testing.assert_array_equal(a[:, :5], b[:, :5])
    assert np.abs(a[:, 5:] - b[:, 5:]).max() > 1e-3


@pytest.mark.parametrize("window", [None, 4])
def test_mistral_cached_decoding_matches_transformers(tmp_path, window):
    """Prefill a left-padded prompt into the cache, feed the rest one token at a time, compare logits."""
    hf_model = tiny_mistral(window)
    model = load_model(save_variant(hf_model, tmp_path, "single")[0]).model
    prompt, total = 6, 14
    ids, mask, positions = left_padded_batch(VOCAB, [total, total - 3, total - 8], total)
    expected_logits, _ = hf_forward(hf_model, ids, mask, positions)

    config = model.config
    cache = KVCache.create(config.num_layers, len(ids), total, config.num_kv_heads, config.head_dim, jnp.float32)
    # Jitted, so the eight one-token steps share one compilation instead of running op by op.
    forward = nnx.jit(lambda model, ids, mask, cache: model(ids, mask, cache=cache))
    out = forward(model, jnp.asarray(ids[:, :prompt]), jnp.asarray(mask[:, :prompt]), cache)
    logits = [np.asarray(out.logits)]
    for slot in range(prompt, total):
        out = forward(model, jnp.asarray(ids[:, slot : slot + 1]), jnp.asarray(mask[:, slot : slot + 1]), out.cache)
        logits.append(np.asarray(out.logits))
    cached_logits = np.concatenate(logits, axis=1)

    diff = max_abs_diff_on_valid(cached_logits, expected_logits, mask)
    assert diff < TOLERANCE, f"cached logits: max abs diff {diff:.2e}"


def test_mistral_missing_tensor_rejected(tmp_path):
    tiny_mistral(5).save_pretrained(tmp_path)
    rewrite_checkpoint(tmp_path, drop=("model.layers.2.self_attn.k_proj.weight",))

    with pytest.raises(CheckpointError, match=r"missing tensors \(1\): model\.layers\.2\.self_attn\.k_proj\.weight"):
        load_model(tmp_path)


def test_mistral_unexpected_tensor_rejected(tmp_path):
    tiny_mistral(5).save_pretrained(tmp_path)
    rewrite_checkpoint(tmp_path, add={"model.layers.3.input_layernorm.weight": np.ones((64,), np.float32)})

    with pytest.raises(CheckpointError, match=r"unexpected tensors \(1\): model\.layers\.3\.input_layernorm\.weight"):
        load_model(tmp_path)

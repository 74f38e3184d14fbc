"""GPT-2 parity with transformers' `GPT2LMHeadModel` built from a tiny random config."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from cbjax.weights.load import load_model
from cbjax.weights.safetensors_io import CheckpointError
from tests.hf_reference import left_padded_batch
from tests.parity_checks import compare_with_transformers, perturb_norms_and_biases, rewrite_checkpoint, save_variant

VOCAB = 128


def tiny_gpt2(seed: int = 0, **overrides) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    settings = dict(vocab_size=VOCAB, n_embd=64, n_layer=3, n_head=4, n_positions=1024, attn_implementation="eager")
    config = GPT2Config(**{**settings, **overrides})
    model = GPT2LMHeadModel(config).eval()
    perturb_norms_and_biases(model, seed)
    return model


@pytest.mark.parametrize("variant", ["single", "sharded", "bf16"])
@pytest.mark.parametrize("seq, lengths", [(12, [12, 7, 3]), (520, [520, 480])])
def test_gpt2_matches_transformers(tmp_path, variant, seq, lengths):
    directory, reference = save_variant(tiny_gpt2(), tmp_path, variant)
    loaded = load_model(directory)
    ids, mask, positions = left_padded_batch(VOCAB, lengths, seq)

    compare_with_transformers(loaded.model, reference, ids, mask, positions)


def test_gpt2_loads_checkpoint_without_prefix(tmp_path):
    hf_model = tiny_gpt2()
    # GPT2Model (and the original openai-community/gpt2 files) name tensors without `transformer.`.
    hf_model.transformer.save_pretrained(tmp_path)
    loaded = load_model(tmp_path)
    ids, mask, positions = left_padded_batch(VOCAB, [10, 4], 10)

    compare_with_transformers(loaded.model, hf_model, ids, mask, positions)


def test_gpt2_positions_default_from_mask(tmp_path):
    loaded = load_model(save_variant(tiny_gpt2(), tmp_path, "single")[0])
    ids, mask, positions = left_padded_batch(VOCAB, [9, 4], 9)

    explicit = loaded.model(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(positions))
    derived = loaded.model(jnp.asarray(ids), jnp.asarray(mask))

    np.testing.assert_array_equal(np.asarray(explicit.logits), np.asarray(derived.logits))


@pytest.mark.parametrize("stop", [0, 1, 2, 3])
def test_gpt2_stop_after_layer_is_prefix(tmp_path, stop):
    loaded = load_model(save_variant(tiny_gpt2(), tmp_path, "single")[0])
    ids, mask, _ = left_padded_batch(VOCAB, [8, 5], 8)

    full = loaded.model(jnp.asarray(ids), jnp.asarray(mask))
    partial = loaded.model(jnp.asarray(ids), jnp.asarray(mask), stop_after_layer=stop, return_logits=False)

    assert partial.logits is None
    assert len(partial.hidden_states) == stop + 1
    for layer, hidden in enumerate(partial.hidden_states):
        np.testing.assert_array_equal(np.asarray(hidden), np.asarray(full.hidden_states[layer]))


def test_gpt2_layer_dropping_keeps_prefix(tmp_path):
    directory = save_variant(tiny_gpt2(), tmp_path, "single")[0]
    full = load_model(directory).model
    dropped = load_model(directory, num_layers=2).model
    ids, mask, _ = left_padded_batch(VOCAB, [8, 5], 8)

    expected = full(jnp.asarray(ids), jnp.asarray(mask)).hidden_states
    out = dropped(jnp.asarray(ids), jnp.asarray(mask), return_logits=False)

    assert len(dropped.layers) == 2
    assert dropped.ln_f is None
    assert len(out.hidden_states) == 3
    for layer, hidden in enumerate(out.hidden_states):
        np.testing.assert_array_equal(np.asarray(hidden), np.asarray(expected[layer]))


@pytest.mark.parametrize("prefix", ["transformer.", ""])
def test_gpt2_accepts_attention_buffers(tmp_path, prefix):
    hf_model = tiny_gpt2()
    if prefix:
        hf_model.save_pretrained(tmp_path)
    else:
        hf_model.transformer.save_pretrained(tmp_path)
    causal = np.tril(np.ones((1, 1, 1024, 1024), np.bool_))
    rewrite_checkpoint(
        tmp_path,
        add={f"{prefix}h.0.attn.bias": causal, f"{prefix}h.0.attn.masked_bias": np.array(-1e4, np.float32)},
    )

    loaded = load_model(tmp_path)

    assert loaded.config.num_layers == 3


def test_gpt2_missing_tensor_rejected(tmp_path):
    tiny_gpt2().save_pretrained(tmp_path)
    rewrite_checkpoint(tmp_path, drop=("transformer.h.1.mlp.c_fc.bias",))

    with pytest.raises(CheckpointError, match=r"missing tensors \(1\): transformer\.h\.1\.mlp\.c_fc\.bias"):
        load_model(tmp_path)


def test_gpt2_unexpected_tensor_rejected(tmp_path):
    tiny_gpt2().save_pretrained(tmp_path)
    rewrite_checkpoint(tmp_path, add={"lm_head.weight": np.zeros((VOCAB, 64), np.float32)})

    with pytest.raises(CheckpointError, match=r"unexpected tensors \(1\): lm_head\.weight"):
        load_model(tmp_path)


def test_gpt2_mixed_prefixes_rejected(tmp_path):
    tiny_gpt2().save_pretrained(tmp_path)
    rewrite_checkpoint(tmp_path, add={"h.0.ln_1.weight": np.ones((64,), np.float32)})

    with pytest.raises(CheckpointError, match=r"unexpected tensors \(1\): h\.0\.ln_1\.weight"):
        load_model(tmp_path)


def test_gpt2_unsupported_config_rejected(tmp_path):
    tiny_gpt2(scale_attn_by_inverse_layer_idx=True).save_pretrained(tmp_path)

    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx"):
        load_model(tmp_path)


@pytest.fixture
def gpt2_with_8_positions(tmp_path):
    return load_model(save_variant(tiny_gpt2(n_positions=8), tmp_path, "single")[0]).model


def test_gpt2_input_past_positions_raises(gpt2_with_8_positions):
    model = gpt2_with_8_positions
    ids = np.zeros((1, 9), np.int32)

    assert np.all(np.isfinite(np.asarray(model(ids[:, :8]).logits)))
    with pytest.raises(ValueError, match="8 learned positions .* input has 9 tokens"):
        model(ids)


def test_gpt2_generation_past_positions_raises(gpt2_with_8_positions):
    from cbjax.generate import generate

    ids = np.ones((1, 5), np.int32)

    with pytest.raises(ValueError, match="reaches 9 positions, but this GPT-2 model has only 8"):
        generate(gpt2_with_8_positions, ids, np.ones_like(ids), max_new_tokens=4, eos_token_ids=[0], pad_token_id=0)

"""Jitted KV-cache generation against transformers' `generate` and against uncached forwards."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from cbjax.generate import _generate_jit, generate, generate_text
from cbjax.lora import LoraConfig, add_lora
from cbjax.weights.load import load_model
from tests.hf_reference import left_padded_batch
from tests.test_gpt2_parity import tiny_gpt2
from tests.test_llama_parity import CONFIGS, tiny_llama
from tests.test_mistral_parity import tiny_mistral

VOCAB = 128
PAD = 0
EOS = 2
MAX_NEW = 12
PROMPT_LENGTHS = [9, 5, 2]

# With the default init (std 0.02) tiny models repeat one token, which would hide decoding errors.
WIDE_INIT = 0.2

FAMILIES = {
    "llama": lambda: tiny_llama(initializer_range=WIDE_INIT, **CONFIGS["gqa_tied"]),
    # The window of 4 is shorter than every prompt plus the 12 generated tokens.
    "mistral": lambda: tiny_mistral(sliding_window=4, initializer_range=WIDE_INIT),
    "gpt2": lambda: tiny_gpt2(initializer_range=WIDE_INIT),
}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """(transformers model, cbjax model) per family, both with the same weights."""
    result = {}
    for family, build in FAMILIES.items():
        hf_model = build()
        directory = tmp_path_factory.mktemp(family)
        hf_model.save_pretrained(directory)
        result[family] = (hf_model, load_model(directory).model)
    return result


def prompts(seed: int = 1):
    ids, mask, _ = left_padded_batch(VOCAB, PROMPT_LENGTHS, max(PROMPT_LENGTHS), seed=seed)
    ids[ids == EOS] = EOS + 1
    return ids, mask


def hf_greedy(hf_model, ids, mask, eos_token_ids) -> np.ndarray:
    with torch.no_grad():
        out = hf_model.generate(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            max_new_tokens=MAX_NEW,
            do_sample=False,
            eos_token_id=list(eos_token_ids),
            pad_token_id=PAD,
        )
    new = out[:, ids.shape[1] :].numpy()
    # transformers stops once every row is done; the remaining slots are padding.
    return np.pad(new, ((0, 0), (0, MAX_NEW - new.shape[1])), constant_values=PAD)


def uncached_greedy(model, ids, mask, steps, *, use_lora):
    """Greedy decoding by rerunning the full forward without a cache.

    The sequence has its final length from the start: causal attention keeps the placeholder
    tokens after slot t from affecting the logits at t, and the fixed shape avoids recompiling.
    """
    batch, seq = ids.shape
    ids = np.concatenate([ids, np.full((batch, steps), PAD, ids.dtype)], axis=1)
    mask = jnp.asarray(np.concatenate([mask, np.ones((batch, steps), mask.dtype)], axis=1))
    for step in range(steps):
        logits = model(jnp.asarray(ids), mask, use_lora=use_lora).logits[:, seq - 1 + step]
        ids[:, seq + step] = np.asarray(jnp.argmax(logits, axis=-1))
    return ids[:, seq:]


def truncate_after_stop(tokens_BxN, stop_ids):
    out = tokens_BxN.copy()
    for row in out:
        hits = np.flatnonzero(np.isin(row, stop_ids))
        if hits.size:
            row[hits[0] + 1 :] = PAD
    return out


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_greedy_matches_transformers(pairs, family):
    hf_model, model = pairs[family]
    ids, mask = prompts()

    ours = generate(model, ids, mask, max_new_tokens=MAX_NEW, eos_token_ids=[EOS], pad_token_id=PAD)
    expected = hf_greedy(hf_model, ids, mask, [EOS])

    assert ours.shape == (len(PROMPT_LENGTHS), MAX_NEW)
    np.testing.assert_array_equal(ours, expected)
    assert len(np.unique(expected)) > 3, "degenerate reference output would hide decoding errors"


def test_greedy_stops_each_row_at_eos(pairs):
    hf_model, model = pairs["llama"]
    ids, mask = prompts()
    unstopped = generate(model, ids, mask, max_new_tokens=MAX_NEW, eos_token_ids=[], pad_token_id=PAD)
    # A token that row 0 first emits at step 3 or later, so that the stop is visible.
    step = next(s for s in range(3, MAX_NEW) if unstopped[0, s] not in unstopped[0, :s])
    stop_ids = [int(unstopped[0, step]), VOCAB - 1]

    stopped = generate(model, ids, mask, max_new_tokens=MAX_NEW, eos_token_ids=stop_ids, pad_token_id=PAD)

    np.testing.assert_array_equal(stopped, truncate_after_stop(unstopped, stop_ids))
    np.testing.assert_array_equal(stopped, hf_greedy(hf_model, ids, mask, stop_ids))
    assert (stopped[0, step + 1 :] == PAD).all()


def test_sampling_reproducible_from_seed(pairs):
    _, model = pairs["llama"]
    ids, mask = prompts()
    kw = dict(max_new_tokens=MAX_NEW, eos_token_ids=[EOS], pad_token_id=PAD, temperature=1.0, top_p=0.9)

    first = generate(model, ids, mask, rng=jax.random.key(7), **kw)
    again = generate(model, ids, mask, rng=jax.random.key(7), **kw)
    other = generate(model, ids, mask, rng=jax.random.key(8), **kw)

    np.testing.assert_array_equal(first, again)
    assert (first != other).any()


def test_sampling_needs_rng(pairs):
    _, model = pairs["llama"]
    ids, mask = prompts()

    with pytest.raises(ValueError, match="needs an rng"):
        generate(model, ids, mask, max_new_tokens=2, eos_token_ids=[EOS], pad_token_id=PAD, temperature=1.0)


def test_tiny_top_p_is_greedy(pairs):
    _, model = pairs["llama"]
    ids, mask = prompts()
    kw = dict(max_new_tokens=MAX_NEW, eos_token_ids=[EOS], pad_token_id=PAD)

    greedy = generate(model, ids, mask, **kw)
    nucleus_of_one = generate(model, ids, mask, temperature=0.7, top_p=1e-6, rng=jax.random.key(0), **kw)

    np.testing.assert_array_equal(nucleus_of_one, greedy)


def test_sampled_tokens_lie_in_nucleus(pairs):
    _, model = pairs["llama"]
    ids, mask = prompts()
    temperature, top_p = 0.5, 0.3

    tokens = generate(
        model, ids, mask, max_new_tokens=MAX_NEW, eos_token_ids=[], pad_token_id=PAD,
        temperature=temperature, top_p=top_p, rng=jax.random.key(3),
    )
    full_ids = np.concatenate([ids, tokens], axis=1)
    full_mask = np.concatenate([mask, np.ones_like(tokens)], axis=1)
    logits = np.asarray(model(jnp.asarray(full_ids), jnp.asarray(full_mask)).logits, np.float64)
    step_logits_BxNxV = logits[:, ids.shape[1] - 1 : -1] / temperature

    probs = np.exp(step_logits_BxNxV - step_logits_BxNxV.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    sorted_probs = -np.sort(-probs, axis=-1)
    kept = ((np.cumsum(sorted_probs, -1) - sorted_probs) < top_p).sum(-1)
    smallest_kept = np.take_along_axis(sorted_probs, kept[..., None] - 1, -1)[..., 0]
    chosen = np.take_along_axis(probs, tokens[..., None], -1)[..., 0]
    # The slack covers the cached and uncached forwards differing in the last bits.
    assert (chosen >= smallest_kept - 1e-6).all()
    assert kept.max() < VOCAB // 2, "the nucleus should exclude most of the vocabulary"


def test_lora_adapters_follow_use_lora(tmp_path):
    hf_model = FAMILIES["llama"]()
    hf_model.save_pretrained(tmp_path)
    model = load_model(tmp_path).model
    ids, mask = prompts()
    kw = dict(max_new_tokens=MAX_NEW, eos_token_ids=[], pad_token_id=PAD)
    base = generate(model, ids, mask, **kw)
    add_lora(model, LoraConfig(r=4, alpha=8.0, dropout=0.0), layers=range(3))
    for i, layer in enumerate(model.layers):
        # lora_b starts at zero; a random one makes the adapters change the output.
        lora_b = layer.self_attn.q_proj.lora_b
        lora_b.set_value(0.5 * jax.random.normal(jax.random.key(i), lora_b.get_value().shape))

    without = generate(model, ids, mask, use_lora=False, **kw)
    with_adapters = generate(model, ids, mask, use_lora=True, **kw)

    np.testing.assert_array_equal(without, base)
    np.testing.assert_array_equal(with_adapters, uncached_greedy(model, ids, mask, MAX_NEW, use_lora=True))
    assert (with_adapters != base).any()


def test_generation_compiles_once_per_shape(pairs):
    _, model = pairs["mistral"]
    kw = dict(max_new_tokens=MAX_NEW, rng=jax.random.key(0))
    first_ids, mask = prompts(seed=1)
    second_ids, _ = prompts(seed=2)

    generate(model, first_ids, mask, eos_token_ids=[EOS], pad_token_id=PAD, temperature=0.7, top_p=0.9, **kw)
    compiled = _generate_jit._cache_size()
    generate(model, second_ids, mask, eos_token_ids=[EOS + 1], pad_token_id=1, temperature=1.3, top_p=0.5, **kw)

    assert _generate_jit._cache_size() == compiled


@pytest.mark.parametrize(
    "mask, message",
    [([[1, 1, 0]], "left-padded"), ([[0, 0, 0]], "left-padded"), ([[1, 0, 1]], "left-padded")],
)
def test_invalid_mask_rejected(pairs, mask, message):
    _, model = pairs["llama"]

    with pytest.raises(ValueError, match=message):
        generate(model, np.full((1, 3), 5), np.asarray(mask), max_new_tokens=2, eos_token_ids=[EOS], pad_token_id=PAD)


def test_gpt2_position_limit_rejected(pairs):
    _, model = pairs["gpt2"]
    ids, mask = prompts()

    with pytest.raises(ValueError, match="only 1024"):
        generate(model, ids, mask, max_new_tokens=1020, eos_token_ids=[EOS], pad_token_id=PAD)


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A 128-token word-level tokenizer with a chat template and no pad token."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": EOS, "<|user|>": 3, "<|assistant|>": 4}
    vocab.update({f"w{i}": i for i in range(5, VOCAB)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_special_tokens=["<|user|>", "<|assistant|>"],
    )
    tokenizer.chat_template = (
        "<s>{% for m in messages %}<|{{ m.role }}|> {{ m.content }} {% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    return tokenizer


@pytest.mark.parametrize("chat", [True, False])
def test_generate_text_matches_unpadded_transformers(pairs, chat):
    hf_model, model = pairs["llama"]
    tokenizer = word_tokenizer()
    texts = ["w10 w11 w12 w13 w14 w15", "w20", "w30 w31 w32"]

    outputs = generate_text(model, tokenizer, texts, chat=chat, max_new_tokens=MAX_NEW)

    assert len(tokenizer) == VOCAB
    for text, output in zip(texts, outputs):
        if chat:
            turn = [{"role": "user", "content": text}]
            formatted = tokenizer.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)
            ids = tokenizer(formatted, add_special_tokens=False)["input_ids"]
            assert ids[:2] == [1, 3]
        else:
            ids = tokenizer(text)["input_ids"]
        ids = np.asarray([ids])
        expected = hf_greedy(hf_model, ids, np.ones_like(ids), [EOS])[0]
        expected = expected[: np.flatnonzero(expected == EOS)[0]] if EOS in expected else expected
        assert output == tokenizer.decode(expected.tolist(), skip_special_tokens=True)

"""Jitted text generation with the KV cache: greedy or temperature / top-p sampling.

One compiled program per model structure, batch, prompt length, max_new_tokens, number of eos ids,
mode (greedy or sampling) and use_lora prefills the left-padded prompts into a fixed-size
`KVCache`, then decodes one token per iteration of a `jax.lax.while_loop`. The model enters as
`nnx.split` state, so its weights (LoRA adapters included) are arguments of the program rather
than constants baked into it.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cbjax.models.kv_cache import KVCache

logger = logging.getLogger(__name__)

# End-of-turn tokens of common chat templates, stopped at by `generate_text` when the tokenizer
# has them (Llama 3 `<|eot_id|>`, ChatML `<|im_end|>`, Gemma `<end_of_turn>`, Phi-3 `<|end|>`).
END_OF_TURN_TOKENS = ("<|eot_id|>", "<|im_end|>", "<end_of_turn>", "<|end|>")


def generate(
    model: nnx.Module,
    input_ids_BxS,
    attention_mask_BxS,
    *,
    max_new_tokens: int,
    eos_token_ids: Sequence[int],
    pad_token_id: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    rng: jax.Array | None = None,
    use_lora: bool = True,
) -> np.ndarray:
    """Generate up to `max_new_tokens` tokens per row after left-padded prompts.

    With `temperature == 0` each step takes the argmax. Otherwise each step samples from
    softmax(logits / temperature), restricted to the smallest set of most likely tokens whose
    probabilities sum to at least `top_p`, and `rng` (required) seeds it. A row stops after
    emitting any of `eos_token_ids` (the eos token is kept), and its later slots hold
    `pad_token_id`. Decoding ends early once every row has stopped. Returns int32
    (B, max_new_tokens).
    """
    ids = np.asarray(input_ids_BxS)
    mask = np.asarray(attention_mask_BxS)
    _check_prompts(model, ids, mask, max_new_tokens)
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    sample = temperature > 0
    if sample and rng is None:
        raise ValueError("sampling (temperature > 0) needs an rng key, e.g. rng=jax.random.key(0)")
    if rng is None:
        rng = jax.random.key(0)

    graphdef, state = nnx.split(model)
    tokens = _generate_jit(
        graphdef,
        state,
        jnp.asarray(ids, jnp.int32),
        jnp.asarray(mask, jnp.int32),
        rng,
        jnp.asarray(temperature if sample else 1.0, jnp.float32),
        jnp.asarray(top_p, jnp.float32),
        jnp.asarray([int(t) for t in eos_token_ids], jnp.int32),
        jnp.asarray(pad_token_id, jnp.int32),
        max_new_tokens=max_new_tokens,
        sample=sample,
        use_lora=use_lora,
    )
    return np.asarray(tokens)


def _check_prompts(model: nnx.Module, ids: np.ndarray, mask: np.ndarray, max_new_tokens: int) -> None:
    if ids.ndim != 2 or ids.shape != mask.shape:
        raise ValueError(f"input_ids {ids.shape} and attention_mask {mask.shape} must both be (batch, seq)")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    # Left padding keeps every row's last real token in the last slot, where prefill reads the logits.
    if not (mask[:, -1] == 1).all() or (np.diff(mask, axis=1) < 0).any():
        raise ValueError("attention_mask must be left-padded (zeros, then ones) with at least one real token per row")
    config = model.config
    longest = int(mask.sum(axis=1).max()) + max_new_tokens
    # Only GPT-2 has a position table, so only GPT-2 fails past max_position_embeddings.
    if config.family == "gpt2" and longest > config.max_position_embeddings:
        raise ValueError(
            f"prompt plus max_new_tokens reaches {longest} positions, but this GPT-2 model has only "
            f"{config.max_position_embeddings}; shorten the prompt or lower max_new_tokens"
        )


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "sample", "use_lora"))
def _generate_jit(
    graphdef, state, ids_BxS, mask_BxS, rng, temperature, top_p, eos_ids_E, pad_token_id,
    *, max_new_tokens, sample, use_lora,
):
    model = nnx.merge(graphdef, state)
    config = model.config
    batch, seq = ids_BxS.shape
    cache = KVCache.create(
        config.built_layers, batch, seq + max_new_tokens, config.num_kv_heads, config.head_dim, model.dtype
    )

    def next_token(logits_BxV, step, done_B):
        if sample:
            token = _sample(logits_BxV, jax.random.fold_in(rng, step), temperature, top_p)
        else:
            token = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
        token = jnp.where(done_B, pad_token_id, token)
        return token, done_B | jnp.isin(token, eos_ids_E)

    # Logits of the last slot only: a (B, S, vocab) array would dominate memory for long prompts.
    out = model(ids_BxS, mask_BxS, cache=cache, return_logits=False, use_lora=use_lora)
    logits_BxV = model.lm_logits(out.hidden_states[-1][:, -1:])[:, 0]
    token_B, done_B = next_token(logits_BxV, 0, jnp.zeros((batch,), bool))
    tokens_BxN = jnp.full((batch, max_new_tokens), pad_token_id).at[:, 0].set(token_B)

    def keep_going(carry):
        step, _, done_B, _, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done_B)

    def decode_step(carry):
        step, token_B, done_B, tokens_BxN, cache = carry
        out = model(token_B[:, None], jnp.ones((batch, 1), jnp.int32), cache=cache, use_lora=use_lora)
        token_B, done_B = next_token(out.logits[:, 0], step, done_B)
        tokens_BxN = jax.lax.dynamic_update_slice(tokens_BxN, token_B[:, None], (0, step))
        return step + 1, token_B, done_B, tokens_BxN, out.cache

    carry = (jnp.asarray(1, jnp.int32), token_B, done_B, tokens_BxN, out.cache)
    return jax.lax.while_loop(keep_going, decode_step, carry)[3]


def _sample(logits_BxV, key, temperature, top_p):
    """Sample from the nucleus: the highest-probability tokens whose probabilities first sum to >= top_p."""
    logits_BxV = logits_BxV.astype(jnp.float32) / temperature
    sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
    # The most likely token has mass_before 0, so at least one token always stays.
    kept_count_B = jnp.sum(mass_before_BxV < top_p, axis=-1)
    threshold_B = jnp.take_along_axis(sorted_BxV, kept_count_B[:, None] - 1, axis=-1)
    # NOTE: tokens tied with the smallest kept logit all stay, so the nucleus can exceed top_p.
    masked_BxV = jnp.where(logits_BxV >= threshold_B, logits_BxV, -jnp.inf)
    return jax.random.categorical(key, masked_BxV, axis=-1).astype(jnp.int32)


def generate_text(
    model: nnx.Module,
    tokenizer,
    prompts: list[str],
    *,
    chat: bool,
    max_new_tokens: int = 256,
    eos_token_ids: Sequence[int] | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    rng: jax.Array | None = None,
    use_lora: bool = True,
) -> list[str]:
    """Generate one completion per prompt and return the decoded texts, without the prompts.

    With `chat`, each prompt becomes a user turn in the tokenizer's chat template (plain text when
    the tokenizer has none). Prompts are left-padded with the pad token, or with eos when the
    tokenizer has no pad token; the vocabulary is never extended. By default generation stops at
    the tokenizer's eos and at the tokens of `END_OF_TURN_TOKENS` that its vocabulary contains.
    """
    if eos_token_ids is None:
        eos_token_ids = default_stop_tokens(tokenizer)
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_token_id is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token; pass a tokenizer with one of them")

    prompt_ids = [encode_prompt(tokenizer, prompt, chat=chat) for prompt in prompts]
    ids_BxS, mask_BxS = left_pad(prompt_ids, pad_token_id)
    tokens_BxN = generate(
        model,
        ids_BxS,
        mask_BxS,
        max_new_tokens=max_new_tokens,
        eos_token_ids=eos_token_ids,
        pad_token_id=pad_token_id,
        temperature=temperature,
        top_p=top_p,
        rng=rng,
        use_lora=use_lora,
    )
    return [tokenizer.decode(_until_stop(row, eos_token_ids), skip_special_tokens=True) for row in tokens_BxN]


def default_stop_tokens(tokenizer) -> list[int]:
    stop = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    vocab = tokenizer.get_vocab()
    stop += [vocab[token] for token in END_OF_TURN_TOKENS if token in vocab and vocab[token] not in stop]
    if not stop:
        raise ValueError("the tokenizer has no eos or end-of-turn token; pass eos_token_ids")
    return stop


def encode_prompt(tokenizer, prompt: str, *, chat: bool) -> list[int]:
    if chat and tokenizer.chat_template:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        # The template writes the special tokens (BOS included) itself.
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    if chat:
        logger.warning("the tokenizer has no chat template; generating from the plain prompt")
    return tokenizer(prompt)["input_ids"]


def left_pad(sequences: list[list[int]], pad_token_id: int) -> tuple[np.ndarray, np.ndarray]:
    seq = max(len(s) for s in sequences)
    ids_BxS = np.full((len(sequences), seq), pad_token_id, np.int32)
    mask_BxS = np.zeros((len(sequences), seq), np.int32)
    for row, tokens in enumerate(sequences):
        if tokens:
            ids_BxS[row, seq - len(tokens) :] = tokens
            mask_BxS[row, seq - len(tokens) :] = 1
    return ids_BxS, mask_BxS


def _until_stop(tokens: np.ndarray, stop_ids: Sequence[int]) -> list[int]:
    out = []
    for token in tokens.tolist():
        if token in stop_ids:
            break
        out.append(token)
    return out

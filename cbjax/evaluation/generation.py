"""Generation metrics: greedy responses of both models to a prompt set, labelled by the response rules.

On harmful prompts the share "refused or broken" is the share blocked; on benign prompts it is the
over-refusal rate. The broken rule's likelihood is always taken under the base model, which
reads fluent text as likely whatever the trained model has learned.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from cbjax.data.formatting import pad_token_id
from cbjax.data.sources import Example
from cbjax.evaluation.completions import mean_log_likelihoods
from cbjax.evaluation.judge import judge_shares, run_judge
from cbjax.evaluation.models import ModelHandle, ModelPair
from cbjax.evaluation.rules import ResponseRules, Verdict, classify_response, label_shares
from cbjax.evaluation.sets import EvalSet
from cbjax.evaluation.texts import text_rows
from cbjax.generate import default_stop_tokens, encode_prompt, generate


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 64
    batch_size: int = 8
    # Prompt length, in tokens, that generation pads to, and the request budget of the rows on
    # which the base model scores a response.
    request_length: int = 128
    rules: ResponseRules = ResponseRules()
    judge_command: str | None = None


def generate_responses(handle: ModelHandle, tokenizer, prompts: list[str], settings: GenerationSettings) -> list[str]:
    """Generate greedy responses to chat-formatted prompts, decoded up to the first stop token.

    Every batch has `batch_size` rows, left-padded to `request_length` tokens (or to the longest
    prompt, rounded up to a multiple of 16, when that is longer). So all batches, usually of all
    sets, share one compiled program.
    """
    encoded = [encode_prompt(tokenizer, prompt, chat=True) for prompt in prompts]
    length = max(settings.request_length, -(-max(len(ids) for ids in encoded) // 16) * 16)
    pad = pad_token_id(tokenizer)
    stop = default_stop_tokens(tokenizer)
    responses = []
    for start in range(0, len(encoded), settings.batch_size):
        chunk = encoded[start : start + settings.batch_size]
        rows = chunk + [chunk[-1]] * (settings.batch_size - len(chunk))
        ids = np.full((len(rows), length), pad, np.int32)
        mask = np.zeros((len(rows), length), np.int32)
        for row, tokens in enumerate(rows):
            ids[row, length - len(tokens) :] = tokens
            mask[row, length - len(tokens) :] = 1
        generated = generate(handle.model, ids, mask, max_new_tokens=settings.max_new_tokens, eos_token_ids=stop,
                             pad_token_id=pad, use_lora=handle.use_lora)
        for tokens in generated[: len(chunk)].tolist():
            end = next((i for i, token in enumerate(tokens) if token in stop), len(tokens))
            responses.append(tokenizer.decode(tokens[:end], skip_special_tokens=True))
    return responses


def classify_responses(
    scorer: ModelHandle, tokenizer, prompts: list[str], responses: list[str], settings: GenerationSettings
) -> list[Verdict]:
    """Label each response, with its mean log-likelihood under `scorer` (the base model)."""
    examples = [Example(prompt, response, "generated") for prompt, response in zip(prompts, responses)]
    rows = text_rows(tokenizer, examples, request_length=settings.request_length,
                     completion_length=settings.max_new_tokens + 8)
    log_likelihoods = mean_log_likelihoods(scorer, rows, batch_size=settings.batch_size)
    verdicts = []
    for response, log_likelihood in zip(responses, log_likelihoods):
        tokens = tokenizer(response, add_special_tokens=False)["input_ids"] if response.strip() else []
        verdicts.append(classify_response(response, tokens, log_likelihood, settings.rules))
    return verdicts


def evaluate_prompt_set(pair: ModelPair, eval_set: EvalSet, settings: GenerationSettings) -> dict:
    """Generate both models' responses and return them with their labels and the label shares per model."""
    prompts = eval_set.prompts
    result: dict = {"kind": eval_set.kind, "prompts": len(prompts)}
    responses = {}
    verdicts = {}
    for which, handle in (("base", pair.base), ("trained", pair.trained)):
        responses[which] = generate_responses(handle, pair.tokenizer, prompts, settings)
        verdicts[which] = classify_responses(pair.base, pair.tokenizer, prompts, responses[which], settings)
        result[which] = label_shares(verdicts[which])

    judge_labels = {}
    if settings.judge_command:
        for which in ("base", "trained"):
            judge_labels[which] = run_judge(settings.judge_command, prompts, responses[which], eval_set.kind)
        result["judge"] = {which: judge_shares(labels) for which, labels in judge_labels.items()}

    records = []
    for i, prompt in enumerate(prompts):
        record = {"prompt": prompt}
        for which in ("base", "trained"):
            judge_label = judge_labels[which][i] if which in judge_labels else None
            for field, value in response_record(responses[which][i], verdicts[which][i], judge_label).items():
                record[f"{which}_{field}"] = value
        records.append(record)
    result["responses"] = records
    return result


def response_record(response: str, verdict: Verdict, judge_label: str | None) -> dict:
    record = {
        "response": response,
        "label": verdict.label,
        "broken_reasons": list(verdict.broken_reasons),
        "refusal_phrase": verdict.refusal_phrase,
        "log_likelihood": verdict.log_likelihood,
        "repeat_rate": verdict.repeat_rate,
    }
    if judge_label is not None:
        record["judge_label"] = judge_label
    return record

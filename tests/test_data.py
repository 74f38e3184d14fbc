"""Tests of the data package: sources, chat formatting, truncation, row layout and batches.

Most tests use a tiny word-level tokenizer built here, on which one word is one token, so
expected ids can be written by hand. The SmolLM2 tests (fixture `smollm2_tokenizer` in conftest.py)
check the same rules on a real chat template.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from cbjax.data import CircuitBreakerData, DataConfig, DataSourceError, PlainTextTags, SourceConfig, load_source
from cbjax.data import demo_prompts
from cbjax.data.formatting import conversation_template, pad_token_id, tokenize_conversations
from cbjax.data.rows import rerouting_rows, retain_rows
from cbjax.data.sources import Example

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
WORDS = ["you", "are", "a", "test", "assistant", "User", "Assistant", ":", "hello", "bye"]
WORDS += [f"w{index:02d}" for index in range(100)]
TINY_TEMPLATE = (
    "{{ '<s><|system|> you are a test assistant <|end|>' }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|> ' + message['content'] + ' <|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
# Tokens of TINY_TEMPLATE around the contents: prefix `<s> <|system|> you are a test assistant
# <|end|> <|user|>`, middle `<|end|> <|assistant|>`, suffix `<|end|>`.
PREFIX_LENGTH, MIDDLE_LENGTH = 9, 2


def make_tokenizer(chat_template: bool = True, pad: bool = True, bos: bool = False) -> PreTrainedTokenizerFast:
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(SPECIAL_TOKENS)
    if bos:
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        eos_token="</s>",
        bos_token="<s>",
        pad_token="<pad>" if pad else None,
    )
    if chat_template:
        tokenizer.chat_template = TINY_TEMPLATE
    return tokenizer


def words(first: int, count: int) -> str:
    return " ".join(f"w{index:02d}" for index in range(first, first + count))


def tokens(tokenizer, ids) -> list[str]:
    return tokenizer.convert_ids_to_tokens([int(token_id) for token_id in ids])


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def data_config(tmp_path: Path, num_rerouting: int = 12, num_retain: int = 20, **overrides) -> DataConfig:
    rerouting = write_jsonl(
        tmp_path / "rerouting.jsonl",
        [{"prompt": f"w{index:02d} hello", "completion": f"bye w{index:02d}"} for index in range(num_rerouting)],
    )
    retain = write_jsonl(
        tmp_path / "retain.jsonl",
        [{"prompt": f"hello w{index:02d}", "completion": f"w{index:02d} bye"} for index in range(num_retain)],
    )
    fields = {
        "rerouting": [str(rerouting)],
        "retain": [str(retain)],
        "batch_size": 4,
        "request_length": 16,
        "response_length": 8,
        "retain_length": 24,
        "validation_fraction": 0.0,
        **overrides,
    }
    return DataConfig.from_dict(fields)


def shared_file(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"shared data file {path} not found (the public data folder next to the repository)")
    return path


# Formatting and truncation


def test_template_segments_tiny_tokenizer():
    tokenizer = make_tokenizer()
    template = conversation_template(tokenizer, PlainTextTags())
    [conversation] = tokenize_conversations(tokenizer, template, [Example("w01 w02", "w03", "test")])

    prefix = ["<s>", "<|system|>", "you", "are", "a", "test", "assistant", "<|end|>", "<|user|>"]
    assert tokens(tokenizer, conversation.prefix) == prefix
    assert tokens(tokenizer, conversation.user) == ["w01", "w02"]
    assert tokens(tokenizer, conversation.middle) == ["<|end|>", "<|assistant|>"]
    assert tokens(tokenizer, conversation.response) == ["w03", "<|end|>"]


def test_segments_match_apply_chat_template():
    tokenizer = make_tokenizer()
    template = conversation_template(tokenizer, PlainTextTags())
    [conversation] = tokenize_conversations(tokenizer, template, [Example("w01 hello", "bye w02", "test")])
    messages = [{"role": "user", "content": "w01 hello"}, {"role": "assistant", "content": "bye w02"}]
    expected = tokenizer.apply_chat_template(messages, tokenize=False)

    joined = [*conversation.prefix, *conversation.user, *conversation.middle, *conversation.response]
    assert joined == tokenizer(expected, add_special_tokens=False)["input_ids"]


def test_request_truncation_keeps_template():
    tokenizer = make_tokenizer()
    template = conversation_template(tokenizer, PlainTextTags())
    [conversation] = tokenize_conversations(tokenizer, template, [Example(words(0, 20), "w50", "test")])

    request, truncated = conversation.request(PREFIX_LENGTH + MIDDLE_LENGTH + 5)

    assert truncated
    assert tokens(tokenizer, request[:PREFIX_LENGTH]) == tokens(tokenizer, conversation.prefix)
    assert tokens(tokenizer, request[PREFIX_LENGTH:-MIDDLE_LENGTH]) == words(15, 5).split()
    assert tokens(tokenizer, request[-MIDDLE_LENGTH:]) == ["<|end|>", "<|assistant|>"]


def test_request_within_budget_not_truncated():
    tokenizer = make_tokenizer()
    template = conversation_template(tokenizer, PlainTextTags())
    [conversation] = tokenize_conversations(tokenizer, template, [Example(words(0, 3), "w50", "test")])

    request, truncated = conversation.request(32)

    assert not truncated
    assert len(request) == PREFIX_LENGTH + 3 + MIDDLE_LENGTH


def test_request_budget_below_template_raises():
    tokenizer = make_tokenizer()
    template = conversation_template(tokenizer, PlainTextTags())
    [conversation] = tokenize_conversations(tokenizer, template, [Example("w01", "w02", "test")])

    with pytest.raises(ValueError, match="chat template alone takes 11 tokens"):
        conversation.request(PREFIX_LENGTH + MIDDLE_LENGTH)


def test_response_truncated_at_end():
    tokenizer = make_tokenizer()
    template = conversation_template(tokenizer, PlainTextTags())
    [conversation] = tokenize_conversations(tokenizer, template, [Example("w01", words(40, 10), "test")])

    response, truncated = conversation.truncated_response(4)

    assert truncated
    assert tokens(tokenizer, response) == words(40, 4).split()


def test_plain_text_tags_without_chat_template():
    tokenizer = make_tokenizer(chat_template=False, bos=True)
    tags = PlainTextTags(system="hello ", user="User : ", assistant=" Assistant : ", separator=" bye")
    template = conversation_template(tokenizer, tags)
    [conversation] = tokenize_conversations(tokenizer, template, [Example(words(0, 6), "w50 w51", "test")])

    assert tokens(tokenizer, conversation.prefix) == ["<s>", "hello", "User", ":"]
    assert tokens(tokenizer, conversation.user) == words(0, 6).split()
    assert tokens(tokenizer, conversation.middle) == ["Assistant", ":"]
    assert tokens(tokenizer, conversation.response) == ["w50", "w51", "bye"]

    request, truncated = conversation.request(4 + 2 + 2)
    assert truncated
    assert tokens(tokenizer, request) == ["<s>", "hello", "User", ":", "w04", "w05", "Assistant", ":"]


def test_plain_text_tags_from_config(tmp_path):
    config = data_config(tmp_path, plain_text_tags={"user": "User : ", "assistant": " Assistant : "})
    tokenizer = make_tokenizer(chat_template=False)
    batch = CircuitBreakerData(config, tokenizer).batch(0)

    row = batch["retain_input_ids"][0][batch["retain_attention_mask"][0] == 1]
    assert tokens(tokenizer, row)[:2] == ["User", ":"]
    assert tokens(tokenizer, row)[4:6] == ["Assistant", ":"]


def test_pad_falls_back_to_eos():
    tokenizer = make_tokenizer(pad=False)
    vocabulary_size = len(tokenizer)

    assert pad_token_id(tokenizer) == tokenizer.eos_token_id
    assert len(tokenizer) == vocabulary_size


# Row layout and masks


def tiny_conversations(examples):
    tokenizer = make_tokenizer()
    template = conversation_template(tokenizer, PlainTextTags())
    return tokenizer, tokenize_conversations(tokenizer, template, examples)


def test_rerouting_row_padding_sides():
    tokenizer, conversations = tiny_conversations([Example("w01 w02", "w03 w04", "test")])
    pad = pad_token_id(tokenizer)
    rows = rerouting_rows(conversations, request_length=16, response_length=8, pad_id=pad, mask_shared_prefix=False)

    ids, attention = rows.input_ids[0], rows.attention_mask[0]
    request_tokens = PREFIX_LENGTH + 2 + MIDDLE_LENGTH
    assert rows.input_ids.shape == (1, 24)
    assert rows.input_ids.dtype == np.int32
    assert list(ids[: 16 - request_tokens]) == [pad] * (16 - request_tokens)
    assert tokens(tokenizer, ids[16 - request_tokens : 16])[-4:] == ["w01", "w02", "<|end|>", "<|assistant|>"]
    assert tokens(tokenizer, ids[16:19]) == ["w03", "w04", "<|end|>"]
    assert list(ids[19:]) == [pad] * 5
    assert list(attention) == [0] * (16 - request_tokens) + [1] * (request_tokens + 3) + [0] * 5
    assert list(rows.loss_mask[0]) == list(attention)


def test_shared_prefix_mask():
    tokenizer, conversations = tiny_conversations([Example("w01 w02", "w03", "test")])
    rows = rerouting_rows(conversations, 16, 8, pad_token_id(tokenizer), mask_shared_prefix=True)

    start = 16 - (PREFIX_LENGTH + 2 + MIDDLE_LENGTH)
    loss_mask = rows.loss_mask[0]
    assert not loss_mask[: start + PREFIX_LENGTH].any()
    assert loss_mask[start + PREFIX_LENGTH : 18].all()
    assert not loss_mask[18:].any()
    assert rows.attention_mask[0][start : start + PREFIX_LENGTH].all()


def test_response_only_rows_have_no_request():
    tokenizer, conversations = tiny_conversations([Example("w01 w02", "w03", "test")])
    rows = rerouting_rows(conversations, 16, 8, pad_token_id(tokenizer), mask_shared_prefix=True, response_only=True)

    assert not rows.attention_mask[0][:16].any()
    assert tokens(tokenizer, rows.input_ids[0][16:18]) == ["w03", "<|end|>"]
    assert list(rows.loss_mask[0]) == list(rows.attention_mask[0])


def test_retain_row_right_padded():
    tokenizer, conversations = tiny_conversations([Example("w01", "w02", "test")])
    pad = pad_token_id(tokenizer)
    rows = retain_rows(conversations, request_length=16, retain_length=20, pad_id=pad)

    length = PREFIX_LENGTH + 1 + MIDDLE_LENGTH + 2
    assert rows.input_ids.shape == (1, 20)
    assert list(rows.attention_mask[0]) == [1] * length + [0] * (20 - length)
    assert list(rows.input_ids[0][length:]) == [pad] * (20 - length)
    assert rows.truncated_requests == rows.truncated_responses == 0


def test_retain_row_truncated_keeps_template():
    tokenizer, conversations = tiny_conversations([Example(words(0, 30), words(50, 30), "test")])
    request_length = PREFIX_LENGTH + 4 + MIDDLE_LENGTH
    rows = retain_rows(conversations, request_length, retain_length=20, pad_id=pad_token_id(tokenizer))

    row = tokens(tokenizer, rows.input_ids[0])
    assert rows.attention_mask[0].all()
    assert row[:PREFIX_LENGTH] == tokens(tokenizer, conversations[0].prefix)
    assert row[PREFIX_LENGTH : PREFIX_LENGTH + 4] == words(26, 4).split()
    assert row[PREFIX_LENGTH + 4 : request_length] == ["<|end|>", "<|assistant|>"]
    assert row[request_length:] == words(50, 20 - request_length).split()
    assert rows.truncated_requests == rows.truncated_responses == 1


# Batches


def test_batch_keys_shapes_dtypes(tmp_path):
    data = CircuitBreakerData(data_config(tmp_path), make_tokenizer())
    batch = data.batch(0)

    expected = {
        "rerouting_input_ids": (4, 24),
        "rerouting_attention_mask": (4, 24),
        "rerouting_loss_mask": (4, 24),
        "retain_input_ids": (4, 24),
        "retain_attention_mask": (4, 24),
    }
    assert {key: value.shape for key, value in batch.items()} == expected
    for key, value in batch.items():
        assert value.dtype == np.int32, key


def test_batch_is_pure_function_of_step(tmp_path):
    config = data_config(tmp_path, response_only_fraction=0.5)
    first = CircuitBreakerData(config, make_tokenizer())
    second = CircuitBreakerData(config, make_tokenizer())

    later = [first.batch(step) for step in range(7)]
    for step in (5, 0, 6, 2):
        for key, value in second.batch(step).items():
            np.testing.assert_array_equal(value, later[step][key], err_msg=f"{key} at step {step}")


def test_batch_covers_each_epoch_once(tmp_path):
    tokenizer = make_tokenizer()
    data = CircuitBreakerData(data_config(tmp_path, num_rerouting=12), tokenizer)

    def epoch_rows(epoch: int) -> list[str]:
        rows = []
        for step in range(3 * epoch, 3 * epoch + 3):
            batch = data.batch(step)
            for ids, attention in zip(batch["rerouting_input_ids"], batch["rerouting_attention_mask"]):
                rows.append(" ".join(tokens(tokenizer, ids[attention == 1])))
        return rows

    first, second = epoch_rows(0), epoch_rows(1)
    assert len(set(first)) == 12
    assert sorted(first) == sorted(second)
    assert first != second


def test_batch_differs_with_seed(tmp_path):
    base = CircuitBreakerData(data_config(tmp_path, seed=0), make_tokenizer()).batch(0)
    other = CircuitBreakerData(data_config(tmp_path, seed=1), make_tokenizer()).batch(0)

    assert not np.array_equal(base["rerouting_input_ids"], other["rerouting_input_ids"])


def test_batch_straddles_epochs(tmp_path):
    data = CircuitBreakerData(data_config(tmp_path, num_rerouting=6, batch_size=4), make_tokenizer())
    rows = np.concatenate([data.batch(step)["rerouting_input_ids"] for step in range(3)])

    assert len({row.tobytes() for row in rows[:6]}) == 6
    assert len({row.tobytes() for row in rows[6:]}) == 6


def test_response_only_fraction(tmp_path):
    data = CircuitBreakerData(data_config(tmp_path, response_only_fraction=0.5), make_tokenizer())
    request_attention = np.concatenate([data.batch(step)["rerouting_attention_mask"][:, :16] for step in range(30)])

    response_only = ~request_attention.any(axis=1)
    assert 0.3 < response_only.mean() < 0.7


def test_no_response_only_by_default(tmp_path):
    data = CircuitBreakerData(data_config(tmp_path), make_tokenizer())

    for step in range(10):
        assert data.batch(step)["rerouting_attention_mask"][:, :16].any(axis=1).all()


def test_retain_mix_draws_from_every_set(tmp_path):
    borderline = write_jsonl(tmp_path / "borderline.jsonl", [{"prompt": "w90", "completion": "w91"}])
    refusal = write_jsonl(tmp_path / "refusal.jsonl", [{"prompt": "w92", "completion": "w93"}])
    config = data_config(
        tmp_path, num_retain=2, borderline_retain=[str(borderline)], refusal_retain=[str(refusal)]
    )
    tokenizer = make_tokenizer()
    data = CircuitBreakerData(config, tokenizer)

    seen = set()
    for step in range(4):
        for row in data.batch(step)["retain_input_ids"]:
            seen.update(tokens(tokenizer, row))
    assert {"w90", "w92", "w00", "w01"} <= seen
    assert data.summary()["rows"] == {"rerouting": 12, "retain": 2, "borderline_retain": 1, "refusal_retain": 1}


def test_validation_rows_held_out(tmp_path):
    data = CircuitBreakerData(data_config(tmp_path, num_validation=3), make_tokenizer())
    validation = data.validation_batch()

    assert validation["rerouting_input_ids"].shape == (3, 24)
    assert validation["retain_input_ids"].shape == (3, 24)
    held_out = {row.tobytes() for row in validation["rerouting_input_ids"]}
    held_out_retain = {row.tobytes() for row in validation["retain_input_ids"]}
    for step in range(20):
        batch = data.batch(step)
        assert not held_out & {row.tobytes() for row in batch["rerouting_input_ids"]}
        assert not held_out_retain & {row.tobytes() for row in batch["retain_input_ids"]}
    assert data.summary()["train_rows"] == {"rerouting": 9, "retain": 17}


def test_validation_fraction_rounds_up_to_one(tmp_path):
    data = CircuitBreakerData(data_config(tmp_path, num_rerouting=4, validation_fraction=0.1), make_tokenizer())

    assert data.summary()["validation_rows"] == 1


def test_no_validation_rows_raises(tmp_path):
    data = CircuitBreakerData(data_config(tmp_path), make_tokenizer())

    with pytest.raises(ValueError, match="no validation rows"):
        data.validation_batch()


def test_validation_too_large_raises(tmp_path):
    with pytest.raises(ValueError, match="leave no training rows"):
        CircuitBreakerData(data_config(tmp_path, num_rerouting=3, num_validation=3), make_tokenizer())


def test_summary_counts_truncated_rows(tmp_path):
    long_rows = [{"prompt": words(0, 12), "completion": words(40, 12)}, {"prompt": "w01", "completion": "w02"}]
    path = write_jsonl(tmp_path / "long.jsonl", long_rows)
    config = data_config(tmp_path, rerouting=[str(path)], retain=[str(path)], retain_length=20)
    data = CircuitBreakerData(config, make_tokenizer())

    truncated = data.summary()["truncated"]
    assert truncated["rerouting"] == {"requests": 1, "responses": 1}
    assert truncated["retain"] == {"requests": 1, "responses": 1}


def test_empty_rerouting_set_raises(tmp_path):
    config = dataclasses.replace(data_config(tmp_path), rerouting=[])

    with pytest.raises(ValueError, match="rerouting set has no rows"):
        CircuitBreakerData(config, make_tokenizer())


def test_empty_retain_mix_raises(tmp_path):
    config = dataclasses.replace(data_config(tmp_path), retain=[])

    with pytest.raises(ValueError, match="retain mix has no rows"):
        CircuitBreakerData(config, make_tokenizer())


def test_negative_step_raises(tmp_path):
    data = CircuitBreakerData(data_config(tmp_path), make_tokenizer())

    with pytest.raises(ValueError, match="step must be >= 0"):
        data.batch(-1)


# Config


def test_config_rejects_unknown_key():
    with pytest.raises(ValueError, match="unknown key 'batchsize'"):
        DataConfig.from_dict({"batchsize": 4})


def test_config_rejects_unknown_source_key():
    with pytest.raises(ValueError, match=r"rerouting\[1\]: unknown key 'columns'"):
        DataConfig.from_dict({"rerouting": ["a.jsonl", {"path": "b.jsonl", "columns": "x"}]})


def test_config_rejects_unknown_filter_key():
    with pytest.raises(ValueError, match="unknown key 'prefix'"):
        SourceConfig.from_dict({"path": "a.jsonl", "filter": {"type": {"prefix": "contrast_"}}})


def test_config_rejects_unknown_tag():
    with pytest.raises(ValueError, match="plain_text_tags: unknown key 'bot'"):
        DataConfig.from_dict({"plain_text_tags": {"bot": "Bot: "}})


def test_config_source_requires_path():
    with pytest.raises(ValueError, match="missing key 'path'"):
        SourceConfig.from_dict({"split": "train"})


def test_config_invalid_lengths_raise():
    with pytest.raises(ValueError, match="request_length must be a positive integer"):
        DataConfig.from_dict({"request_length": 0})
    with pytest.raises(ValueError, match=r"response_only_fraction must be in \[0, 1\)"):
        DataConfig.from_dict({"response_only_fraction": 1.5})


def test_config_defaults_without_sources():
    config = DataConfig()

    assert config.rerouting == []
    assert config.mask_shared_prefix is False
    assert config.response_only_fraction == 0.0


# Sources


def test_jsonl_invalid_line_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    lines = [json.dumps({"prompt": "p", "completion": "c"})] * 6 + ['{"prompt": "p", "completion": ']
    path.write_text("\n".join(lines) + "\n")

    with pytest.raises(DataSourceError, match=r"bad\.jsonl line 7: invalid JSON"):
        load_source(SourceConfig(path=str(path)))


def test_missing_column_names_line_and_field(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "p", "completion": "c"}, {"prompt": "p", "response": "c"}])

    with pytest.raises(DataSourceError, match=r"rows\.jsonl line 2: missing field 'completion'"):
        load_source(SourceConfig(path=str(path)))


def test_empty_text_names_line_and_field(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "p", "completion": "c"}, {"prompt": "  ", "completion": "c"}])

    with pytest.raises(DataSourceError, match=r"rows\.jsonl line 2: field 'prompt' is empty"):
        load_source(SourceConfig(path=str(path)))


def test_non_text_field_raises(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "p", "completion": 3}])

    with pytest.raises(DataSourceError, match=r"line 1: field 'completion' must be text, got int"):
        load_source(SourceConfig(path=str(path)))


def test_jsonl_line_not_object_raises(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('["p", "c"]\n')

    with pytest.raises(DataSourceError, match=r"rows\.jsonl line 1: expected a JSON object, got list"):
        load_source(SourceConfig(path=str(path)))


def test_json_invalid_names_line(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text('[\n{"prompt": "p", "completion": "c"},\n{"prompt": }\n]\n')

    with pytest.raises(DataSourceError, match=r"rows\.json line 3: invalid JSON"):
        load_source(SourceConfig(path=str(path)))


def test_json_not_a_list_raises(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text('{"prompt": "p", "completion": "c"}')

    with pytest.raises(DataSourceError, match="expected a JSON list of objects"):
        load_source(SourceConfig(path=str(path)))


def test_json_record_error_names_record(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([{"prompt": "p", "completion": "c"}, {"prompt": "p"}]))

    with pytest.raises(DataSourceError, match=r"rows\.json record 2: missing field 'completion'"):
        load_source(SourceConfig(path=str(path)))


def test_csv_rows_and_line_numbers(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text('prompt,output\n"multi\nline",c1\np2,\n')

    with pytest.raises(DataSourceError, match=r"rows\.csv line 4: field 'output' is empty"):
        load_source(SourceConfig(path=str(path), completion_column="output"))


def test_csv_loads_with_completion_column(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("prompt,response\np1,r1\np2,r2\n")

    examples = load_source(SourceConfig(path=str(path), completion_column="response"))

    assert [(example.prompt, example.completion) for example in examples] == [("p1", "r1"), ("p2", "r2")]
    assert examples[1].origin == f"{path} line 3"


def test_parquet_loads(tmp_path):
    import pyarrow
    import pyarrow.parquet

    path = tmp_path / "rows.parquet"
    pyarrow.parquet.write_table(pyarrow.table({"prompt": ["p1", "p2"], "completion": ["c1", "c2"]}), path)

    examples = load_source(SourceConfig(path=str(path)))

    assert [example.completion for example in examples] == ["c1", "c2"]


def test_parquet_invalid_file_raises(tmp_path):
    path = tmp_path / "rows.parquet"
    path.write_text('{"prompt": "p", "completion": "c"}\n')

    with pytest.raises(DataSourceError, match=r"rows\.parquet: not a valid Parquet file"):
        load_source(SourceConfig(path=str(path)))


def test_binary_file_raises(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b"\xff\xfe\x00binary")

    with pytest.raises(DataSourceError, match=r"rows\.jsonl: not UTF-8 text"):
        load_source(SourceConfig(path=str(path)))


def test_missing_file_raises(tmp_path):
    with pytest.raises(DataSourceError, match="data file not found"):
        load_source(SourceConfig(path=str(tmp_path / "absent.jsonl")))


def test_unsupported_suffix_raises(tmp_path):
    path = tmp_path / "rows.txt"
    path.write_text("p\tc\n")

    with pytest.raises(DataSourceError, match="unsupported file type '.txt'"):
        load_source(SourceConfig(path=str(path)))


def test_hub_failure_gives_clear_error(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("offline mode is enabled")

    monkeypatch.setattr(datasets, "load_dataset", offline)

    with pytest.raises(DataSourceError, match="could not load Hub dataset 'someone/some-set'.*local"):
        load_source(SourceConfig(path="someone/some-set"))


def test_filter_and_limit(tmp_path):
    rows = [
        {"prompt": "p1", "completion": "c1", "label": "keep", "type": "a"},
        {"prompt": "p2", "completion": "c2", "label": "drop", "type": "a"},
        {"prompt": "p3", "completion": "c3", "label": "keep", "type": "contrast_a"},
        {"prompt": "p4", "completion": "c4", "label": "keep", "type": "b"},
        {"prompt": "p5", "completion": "c5", "label": "keep", "type": "c"},
    ]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    source = SourceConfig.from_dict(
        {"path": str(path), "filter": {"label": ["keep"], "type": {"exclude_prefix": "contrast_"}}, "limit": 2}
    )

    assert [example.prompt for example in load_source(source)] == ["p1", "p4"]


def test_filter_on_missing_field_raises(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "p", "completion": "c"}])
    source = SourceConfig.from_dict({"path": str(path), "filter": {"label": ["keep"]}})

    with pytest.raises(DataSourceError, match=r"line 1: missing field 'label' used by the filter"):
        load_source(source)


def test_filter_leaving_no_rows_raises(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "p", "completion": "c", "label": "x"}])
    source = SourceConfig.from_dict({"path": str(path), "filter": {"label": ["y"]}})

    with pytest.raises(DataSourceError, match="no rows left after the filter"):
        load_source(source)


# Real data and a real chat template


def test_xstest_filter_on_shared_data():
    source = SourceConfig.from_dict(
        {
            "path": str(shared_file("xstest_borderline.jsonl")),
            "filter": {"label": ["1_full_compliance"], "type": {"exclude_prefix": "contrast_"}},
        }
    )
    examples = load_source(source)
    records = [json.loads(line) for line in Path(source.path).read_text().splitlines()]
    expected = [
        record["prompt"]
        for record in records
        if record["label"] == "1_full_compliance" and not record["type"].startswith("contrast_")
    ]

    assert [example.prompt for example in examples] == expected
    assert 0 < len(examples) < len(records)


@pytest.mark.slow
def test_smollm2_truncation_keeps_template(smollm2_tokenizer):
    tokenizer = smollm2_tokenizer
    template = conversation_template(tokenizer, PlainTextTags())
    prompt = "Start of a long request. " + "filler words here " * 40 + "Final instruction: say hi."
    [conversation] = tokenize_conversations(tokenizer, template, [Example(prompt, "Hi!", "test")])

    request, truncated = conversation.request(len(conversation.prefix) + len(conversation.middle) + 12)
    text = tokenizer.decode(request)

    assert truncated
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert "<|im_start|>user\n" in text
    assert text.endswith("Final instruction: say hi.<|im_end|>\n<|im_start|>assistant\n")
    assert "Start of a long request" not in text


@pytest.mark.slow
def test_smollm2_segments_match_chat_template(smollm2_tokenizer):
    tokenizer = smollm2_tokenizer
    template = conversation_template(tokenizer, PlainTextTags())
    [conversation] = tokenize_conversations(tokenizer, template, [Example("What is 2+2?", "It is 4.", "test")])
    messages = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 4."}]
    generation = [{"role": "user", "content": "What is 2+2?"}]

    joined = [*conversation.prefix, *conversation.user, *conversation.middle, *conversation.response]
    expected = tokenizer.apply_chat_template(messages, tokenize=False)
    prompt = tokenizer.apply_chat_template(generation, tokenize=False, add_generation_prompt=True)
    assert joined == tokenizer(expected, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(conversation.request(512)[0]) == prompt
    assert tokenizer.decode(conversation.prefix).endswith("<|im_start|>user\n")


@pytest.mark.slow
def test_smollm2_batches_on_shared_data(smollm2_tokenizer):
    xstest = {
        "path": str(shared_file("xstest_borderline.jsonl")),
        "filter": {"label": ["1_full_compliance"], "type": {"exclude_prefix": "contrast_"}},
    }
    config = DataConfig.from_dict(
        {
            "rerouting": [str(shared_file("harmful_completions.jsonl"))],
            "borderline_retain": [xstest],
            "refusal_retain": [str(shared_file("refusal_completions.jsonl"))],
            "batch_size": 8,
            "request_length": 64,
            "response_length": 32,
            "retain_length": 128,
            "mask_shared_prefix": True,
            "num_validation": 8,
        }
    )
    data = CircuitBreakerData(config, smollm2_tokenizer)
    batch = data.batch(3)
    summary = data.summary()

    assert batch["rerouting_input_ids"].shape == (8, 96)
    assert batch["retain_input_ids"].shape == (8, 128)
    assert (batch["rerouting_loss_mask"] <= batch["rerouting_attention_mask"]).all()
    assert (batch["rerouting_loss_mask"].sum(axis=1) < batch["rerouting_attention_mask"].sum(axis=1)).all()
    assert summary["rows"] == {"rerouting": 148, "retain": 0, "borderline_retain": 229, "refusal_retain": 587}
    assert summary["truncated"]["rerouting"]["requests"] > 0


# Demo prompts


def test_demo_prompt_sets():
    for prompts, train, held_out in (
        (demo_prompts.HARMFUL_PROMPTS, demo_prompts.HARMFUL_TRAIN, demo_prompts.HARMFUL_HELD_OUT),
        (demo_prompts.BENIGN_PROMPTS, demo_prompts.BENIGN_TRAIN, demo_prompts.BENIGN_HELD_OUT),
    ):
        assert 35 <= len(prompts) <= 45
        assert len(set(prompts)) == len(prompts)
        assert len(held_out) == len(prompts) // demo_prompts.HELD_OUT_EVERY
        assert not set(train) & set(held_out)
        assert sorted(train + held_out) == sorted(prompts)
        assert demo_prompts.split_held_out(prompts) == (train, held_out)

"""Tokenizers through `transformers.AutoTokenizer`, from a model directory, hub id or GGUF file."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer


SAMPLE_TEXT = "Hello world"


def load_tokenizer(name_or_path: str):
    """Load the tokenizer of a model directory, hub id or GGUF file, and check that it produces tokens."""
    path = Path(name_or_path)
    if path.suffix == ".gguf":
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    else:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)

    # Without tokenizer files, transformers can build an empty GPT-2 tokenizer, and a run would
    # then train on rows that contain no tokens.
    if not tokenizer(SAMPLE_TEXT, add_special_tokens=False).input_ids:
        raise ValueError(
            f"{name_or_path}: the tokenizer turns {SAMPLE_TEXT!r} into no tokens; the model folder is "
            f"probably missing its tokenizer files (tokenizer.json, or vocab.json and merges.txt)"
        )
    return tokenizer


def end_of_turn_ids(tokenizer) -> list[int]:
    """Token ids that end an assistant turn: eos plus the chat template's end-of-turn token if it has one."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    for token in ("<|im_end|>", "<|eot_id|>", "</s>", "<|endoftext|>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id and token_id >= 0:
            ids.add(token_id)
    return sorted(ids)

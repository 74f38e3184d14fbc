"""Token rows of (prompt, completion) texts for scoring, with a mask of the completion tokens.

A row is the chat-formatted request (at most `request_length` tokens, user text cut from its
front as in training) followed by the completion (cut at its end to `completion_length`),
right-padded to `request_length + completion_length`. The end-of-turn text that the chat template
puts after a completion is left out, so scores cover the completion's own tokens.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import numpy as np

from cbjax.data.config import PlainTextTags
from cbjax.data.formatting import conversation_template, pad_token_id, tokenize_conversations
from cbjax.data.sources import Example


@dataclasses.dataclass(frozen=True)
class TextRows:
    """Int32 arrays of shape (rows, length)."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    completion_mask: np.ndarray

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def text_rows(tokenizer, examples: Sequence[Example], *, request_length: int, completion_length: int) -> TextRows:
    template = dataclasses.replace(conversation_template(tokenizer, PlainTextTags()), suffix="")
    conversations = tokenize_conversations(tokenizer, template, examples)
    shape = (len(conversations), request_length + completion_length)
    input_ids = np.full(shape, pad_token_id(tokenizer), np.int32)
    attention_mask = np.zeros(shape, np.int32)
    completion_mask = np.zeros(shape, np.int32)
    for row, conversation in enumerate(conversations):
        request, _ = conversation.request(request_length)
        completion, _ = conversation.truncated_response(completion_length)
        end = len(request) + len(completion)
        input_ids[row, :end] = request + completion
        attention_mask[row, :end] = 1
        completion_mask[row, len(request) : end] = 1
    return TextRows(input_ids, attention_mask, completion_mask)


def batches(rows: TextRows, batch_size: int) -> Iterator[tuple[dict[str, np.ndarray], int]]:
    """Yield (batch, valid_rows) pairs of exactly `batch_size` rows each, so that one compiled program
    serves all of them. The last batch is filled up with copies of its last row, which callers drop."""
    for start in range(0, len(rows), batch_size):
        index = np.arange(start, min(start + batch_size, len(rows)))
        valid = len(index)
        index = np.concatenate([index, np.full(batch_size - valid, index[-1])])
        yield {
            "input_ids": rows.input_ids[index],
            "attention_mask": rows.attention_mask[index],
            "completion_mask": rows.completion_mask[index],
        }, valid

"""Fixed-length token rows, with attention and loss masks, built from tokenized conversations."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from cbjax.data.formatting import Conversation


@dataclasses.dataclass(frozen=True)
class Rows:
    """Int32 arrays of shape (rows, length), and how many rows lost tokens to their budgets."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    loss_mask: np.ndarray
    truncated_requests: int
    truncated_responses: int

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def take(self, indices: np.ndarray) -> Rows:
        """Return the rows at `indices`. The truncation counts stay those of the whole set."""
        return dataclasses.replace(
            self,
            input_ids=self.input_ids[indices],
            attention_mask=self.attention_mask[indices],
            loss_mask=self.loss_mask[indices],
        )


def rerouting_rows(
    conversations: Sequence[Conversation],
    request_length: int,
    response_length: int,
    pad_id: int,
    mask_shared_prefix: bool,
    response_only: bool = False,
) -> Rows:
    """Lay out each conversation as its request left-padded to `request_length` tokens, followed
    by its response right-padded to `response_length` tokens.

    With `response_only`, the request part is all padding. With `mask_shared_prefix`, the loss
    mask leaves out the system prompt and user tag. Those tokens are the same text in every row,
    so their hidden states match those of the retain rows and there is nothing to reroute.
    """
    shape = (len(conversations), request_length + response_length)
    input_ids = np.full(shape, pad_id, dtype=np.int32)
    attention_mask = np.zeros(shape, dtype=np.int32)
    loss_mask = np.zeros(shape, dtype=np.int32)
    truncated_requests = truncated_responses = 0

    for row, conversation in enumerate(conversations):
        request, request_cut = conversation.request(request_length)
        if response_only:
            request, request_cut = [], False
        response, response_cut = conversation.truncated_response(response_length)
        truncated_requests += request_cut
        truncated_responses += response_cut

        start = request_length - len(request)
        end = request_length + len(response)
        input_ids[row, start:end] = request + response
        attention_mask[row, start:end] = 1
        loss_mask[row, start:end] = 1
        if mask_shared_prefix and request:
            loss_mask[row, start : start + len(conversation.prefix)] = 0

    return Rows(input_ids, attention_mask, loss_mask, truncated_requests, truncated_responses)


def retain_rows(
    conversations: Sequence[Conversation], request_length: int, retain_length: int, pad_id: int
) -> Rows:
    """Lay out each whole conversation right-padded to `retain_length` tokens.

    The request is limited to `request_length` tokens, as in rerouting rows, so that a long request
    cannot push the whole response out. The response is cut at its end to fit the rest.
    """
    shape = (len(conversations), retain_length)
    input_ids = np.full(shape, pad_id, dtype=np.int32)
    attention_mask = np.zeros(shape, dtype=np.int32)
    truncated_requests = truncated_responses = 0

    for row, conversation in enumerate(conversations):
        request, request_cut = conversation.request(min(request_length, retain_length))
        response, response_cut = conversation.truncated_response(retain_length - len(request))
        truncated_requests += request_cut
        truncated_responses += response_cut

        tokens = request + response
        input_ids[row, : len(tokens)] = tokens
        attention_mask[row, : len(tokens)] = 1

    return Rows(input_ids, attention_mask, attention_mask.copy(), truncated_requests, truncated_responses)


def concatenate_rows(parts: Sequence[Rows]) -> Rows:
    """Stack sets of rows of one length into one set, summing their truncation counts."""
    return Rows(
        input_ids=np.concatenate([part.input_ids for part in parts]),
        attention_mask=np.concatenate([part.attention_mask for part in parts]),
        loss_mask=np.concatenate([part.loss_mask for part in parts]),
        truncated_requests=sum(part.truncated_requests for part in parts),
        truncated_responses=sum(part.truncated_responses for part in parts),
    )

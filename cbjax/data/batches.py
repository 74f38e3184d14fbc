"""Training and validation batches of rerouting and retain rows for circuit-breaker training."""

from __future__ import annotations

import functools
import logging

import numpy as np

from cbjax.data.config import DataConfig, SourceConfig
from cbjax.data.formatting import Conversation, conversation_template, pad_token_id, tokenize_conversations
from cbjax.data.rows import Rows, concatenate_rows, rerouting_rows, retain_rows
from cbjax.data.sources import load_source

logger = logging.getLogger(__name__)

# Independent random streams derived from the seed.
_REROUTING_STREAM, _RETAIN_STREAM, _RESPONSE_ONLY_STREAM, _VALIDATION_STREAM = range(4)


class CircuitBreakerData:
    """Rerouting and retain rows of one data config, tokenized once and served by step.

    `batch(step)` is a pure function of `step`: each set is read in a per-epoch permutation
    seeded by (seed, epoch), so a resumed run gets the same batches as an uninterrupted one.
    """

    def __init__(self, config: DataConfig, tokenizer):
        self.config = config
        self._template = conversation_template(tokenizer, config.plain_text_tags)
        self._counts: dict[str, int] = {}
        self._truncated: dict[str, dict[str, int]] = {}
        pad_id = pad_token_id(tokenizer)

        rerouting = self._tokenize_set("rerouting", config.rerouting, tokenizer)
        if not rerouting:
            raise ValueError("data config: the rerouting set has no rows; list at least one source under 'rerouting'")
        rerouting_all = self._rerouting_rows(rerouting, pad_id, response_only=False)
        self._record_truncation("rerouting", rerouting_all)
        retain_all = self._retain_mix(tokenizer, pad_id)

        num_validation = self._num_validation(len(rerouting_all), len(retain_all))
        rerouting_train, rerouting_validation = _split(len(rerouting_all), num_validation, config.seed, 0)
        retain_train, retain_validation = _split(len(retain_all), num_validation, config.seed, 1)
        self._rerouting = rerouting_all.take(rerouting_train)
        self._rerouting_response_only = self._rerouting_rows(
            [rerouting[index] for index in rerouting_train], pad_id, response_only=True
        )
        self._retain = retain_all.take(retain_train)
        self._validation = (rerouting_all.take(rerouting_validation), retain_all.take(retain_validation))

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """Return the training batch of `step`, with `batch_size` rerouting and retain rows."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        seed, size = self.config.seed, self.config.batch_size
        epochs, positions = _positions(step, size, len(self._rerouting))
        rerouting_index = _shuffled_rows(seed, _REROUTING_STREAM, epochs, positions, len(self._rerouting))
        response_only = self._response_only(epochs, positions)

        rerouting = {}
        for key in ("input_ids", "attention_mask", "loss_mask"):
            full = getattr(self._rerouting, key)[rerouting_index]
            alone = getattr(self._rerouting_response_only, key)[rerouting_index]
            rerouting[f"rerouting_{key}"] = np.where(response_only[:, None], alone, full)

        epochs, positions = _positions(step, size, len(self._retain))
        retain_index = _shuffled_rows(seed, _RETAIN_STREAM, epochs, positions, len(self._retain))
        return {**rerouting, **_retain_batch(self._retain.take(retain_index))}

    def validation_batch(self) -> dict[str, np.ndarray]:
        """Return every held-out rerouting row and as many held-out retain rows, in a fixed order."""
        rerouting, retain = self._validation
        if not len(rerouting):
            raise ValueError("no validation rows: set validation_fraction or num_validation in the data config")
        return {
            "rerouting_input_ids": rerouting.input_ids,
            "rerouting_attention_mask": rerouting.attention_mask,
            "rerouting_loss_mask": rerouting.loss_mask,
            **_retain_batch(retain),
        }

    def summary(self) -> dict:
        """Return rows per set, train and validation rows, and truncated rows per set."""
        return {
            "rows": dict(self._counts),
            "train_rows": {"rerouting": len(self._rerouting), "retain": len(self._retain)},
            "validation_rows": len(self._validation[0]),
            "truncated": {name: dict(counts) for name, counts in self._truncated.items()},
        }

    def _tokenize_set(self, name: str, sources: list[SourceConfig], tokenizer) -> list[Conversation]:
        conversations = []
        for source in sources:
            examples = load_source(source)
            conversations.extend(tokenize_conversations(tokenizer, self._template, examples))
            logger.info("%s: %d rows from %s", name, len(examples), source.path)
        self._counts[name] = len(conversations)
        return conversations

    def _retain_mix(self, tokenizer, pad_id: int) -> Rows:
        config = self.config
        parts = []
        for name, sources in config.retain_sets().items():
            conversations = self._tokenize_set(name, sources, tokenizer)
            if conversations:
                parts.append(retain_rows(conversations, config.request_length, config.retain_length, pad_id))
                self._record_truncation(name, parts[-1])
        if not parts:
            raise ValueError(
                "data config: the retain mix has no rows; list at least one source under "
                "'retain', 'borderline_retain' or 'refusal_retain'"
            )
        return concatenate_rows(parts)

    def _rerouting_rows(self, conversations: list[Conversation], pad_id: int, response_only: bool) -> Rows:
        config = self.config
        return rerouting_rows(
            conversations,
            config.request_length,
            config.response_length,
            pad_id,
            config.mask_shared_prefix,
            response_only=response_only,
        )

    def _record_truncation(self, name: str, rows: Rows) -> None:
        self._truncated[name] = {"requests": rows.truncated_requests, "responses": rows.truncated_responses}
        if rows.truncated_requests or rows.truncated_responses:
            logger.warning(
                "%s: %d of %d requests lost user text from their front and %d responses were cut at their end",
                name,
                rows.truncated_requests,
                len(rows),
                rows.truncated_responses,
            )

    def _num_validation(self, rerouting_count: int, retain_count: int) -> int:
        config = self.config
        if config.num_validation is not None:
            count = config.num_validation
        elif config.validation_fraction > 0:
            count = max(1, round(config.validation_fraction * rerouting_count))
        else:
            count = 0
        if count >= min(rerouting_count, retain_count):
            raise ValueError(
                f"data config: {count} validation rows leave no training rows "
                f"({rerouting_count} rerouting rows, {retain_count} retain rows); lower the validation share"
            )
        return count

    def _response_only(self, epochs: np.ndarray, positions: np.ndarray) -> np.ndarray:
        fraction = self.config.response_only_fraction
        if fraction == 0.0:
            return np.zeros(len(epochs), dtype=bool)
        count = len(self._rerouting)
        flags = [
            _uniform(self.config.seed, _RESPONSE_ONLY_STREAM, int(epoch), count)[position] < fraction
            for epoch, position in zip(epochs, positions)
        ]
        return np.array(flags, dtype=bool)


def _positions(step: int, batch_size: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    # Rows are read as one endless sequence of epochs, so a batch may straddle two epochs.
    flat = np.arange(step * batch_size, (step + 1) * batch_size, dtype=np.int64)
    return flat // count, flat % count


def _shuffled_rows(seed: int, stream: int, epochs: np.ndarray, positions: np.ndarray, count: int) -> np.ndarray:
    return np.array(
        [_permutation(seed, stream, int(epoch), count)[position] for epoch, position in zip(epochs, positions)],
        dtype=np.int64,
    )


@functools.lru_cache(maxsize=16)
def _permutation(seed: int, stream: int, epoch: int, count: int) -> np.ndarray:
    return np.random.default_rng([seed, stream, epoch]).permutation(count)


@functools.lru_cache(maxsize=16)
def _uniform(seed: int, stream: int, epoch: int, count: int) -> np.ndarray:
    return np.random.default_rng([seed, stream, epoch]).random(count)


def _split(count: int, num_validation: int, seed: int, part: int) -> tuple[np.ndarray, np.ndarray]:
    """Return sorted train and validation row indices, chosen at random by (seed, part)."""
    order = np.random.default_rng([seed, _VALIDATION_STREAM, part]).permutation(count)
    return np.sort(order[num_validation:]), np.sort(order[:num_validation])


def _retain_batch(rows: Rows) -> dict[str, np.ndarray]:
    return {"retain_input_ids": rows.input_ids, "retain_attention_mask": rows.attention_mask}

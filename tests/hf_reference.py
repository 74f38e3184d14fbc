"""Helpers that build tiny random transformers models and compare them with cbjax."""

from __future__ import annotations

import numpy as np
import torch


def save_tiny_model(hf_model, directory) -> str:
    hf_model.save_pretrained(directory, safe_serialization=True)
    return str(directory)


def left_padded_batch(vocab_size: int, lengths: list[int], seq: int, seed: int = 0):
    """Token ids, mask and explicit position ids for a left-padded batch."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab_size, size=(len(lengths), seq)).astype(np.int64)
    mask = np.zeros((len(lengths), seq), np.int64)
    for row, length in enumerate(lengths):
        mask[row, seq - length :] = 1
        ids[row, : seq - length] = 0
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    return ids, mask, positions


def hf_forward(hf_model, ids, mask, positions):
    with torch.no_grad():
        out = hf_model(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            position_ids=torch.from_numpy(positions),
            output_hidden_states=True,
        )
    return out.logits.float().numpy(), [h.float().numpy() for h in out.hidden_states]


def max_abs_diff_on_valid(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    valid = mask.astype(bool)
    return float(np.max(np.abs(np.asarray(a, np.float64)[valid] - np.asarray(b, np.float64)[valid])))

"""The circuit-breaker loss written in PyTorch with the reference implementation's formulas.

Used only to check cbjax's JAX losses and LoRA gradients on identical inputs and weights.
"""

from __future__ import annotations

import torch


def rerouting_cosine_loss(adapted, frozen, mask):
    """adapted, frozen: (N, B, S, D) target-layer states; mask: (B, S)."""
    layers_mask = mask.repeat(adapted.shape[0], 1, 1).unsqueeze(-1).float()
    adapted_unit = adapted / torch.norm(adapted, dim=-1, keepdim=True, dtype=torch.float)
    frozen_unit = frozen / torch.norm(frozen, dim=-1, keepdim=True, dtype=torch.float)
    inner = (adapted_unit * frozen_unit) * layers_mask
    return torch.relu(inner.sum(dim=-1)).sum() / layers_mask.sum()


def retain_l2_loss(adapted, frozen, mask):
    """adapted, frozen: (L + 1, B, S, D) states of all layers; mean over every position."""
    layers_mask = mask.repeat(adapted.shape[0], 1, 1).unsqueeze(-1).float()
    diff = adapted * layers_mask - frozen * layers_mask
    return torch.norm(diff, dim=-1, p=2, dtype=torch.float).nanmean()


def coefficients(step: int, total_steps: int, alpha: float) -> tuple[float, float]:
    scheduled = step / (2 * total_steps)
    return alpha * (1 - scheduled), alpha * scheduled

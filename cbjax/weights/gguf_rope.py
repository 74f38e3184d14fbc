"""Llama 3.x rope scaling recovered from the per-frequency factors that llama.cpp stores in GGUF files.

llama.cpp's converter stores the rope scaling of a Llama 3.1-style model as the tensor
`rope_freqs.weight`: for each rotary frequency, the number it is divided by. Those factors are 1
for short wavelengths, `factor` for long ones and `1 / ((1 - s) / factor + s)` in between, where
s is linear in 1 / wavelength. A straight-line fit of s over the in-between frequencies gives back
`low_freq_factor` and `high_freq_factor`. The result is kept only if it reproduces every factor.

Only the ratios of `low_freq_factor` and `high_freq_factor` to the original context length change
the frequencies. So the file's `original_context_length` serves, or Llama 3.1's 8192 without it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from cbjax.models.config import ModelConfig, RopeScaling
from cbjax.models.rope import inverse_frequencies

LLAMA31_ORIGINAL_CONTEXT = 8192
# Factors are stored as float32. A recovered parameter set must reproduce them this closely.
FACTOR_RTOL = 1e-5


def llama3_scaling_from_factors(
    path: Path, factors: np.ndarray, rope_theta: float, head_dim: int, original_context: int | None
) -> dict[str, Any] | None:
    """Return the `rope_scaling` dict whose llama3 frequencies match `factors`, or None if all are 1.

    Raises `ValueError`, naming `path`, when the factors have the wrong length or follow no llama3
    parameter set.
    """
    factors = np.asarray(factors, np.float64).reshape(-1)
    if factors.shape != (head_dim // 2,):
        raise ValueError(
            f"{path}: rope_freqs.weight has {factors.size} factors, but a head of {head_dim} needs {head_dim // 2}"
        )
    if np.allclose(factors, 1.0, rtol=0, atol=FACTOR_RTOL):
        return None

    original_context = original_context or LLAMA31_ORIGINAL_CONTEXT
    factor = float(factors.max())
    unscaled = inverse_frequencies(rope_config(rope_theta, head_dim, None)).astype(np.float64)
    inverse_wavelength = unscaled / (2 * math.pi)
    between = (factors > 1 + FACTOR_RTOL) & (factors < factor * (1 - FACTOR_RTOL))
    if between.sum() < 2:
        raise_unmatched(path, factors, f"only {between.sum()} of them lie strictly between 1 and {factor:g}")

    smooth = (1 / factors[between] - 1 / factor) / (1 - 1 / factor)
    # smooth = (original_context * inverse_wavelength - low) / (high - low), a straight line.
    slope, intercept = np.polyfit(inverse_wavelength[between], smooth, 1)
    low = -intercept * original_context / slope
    high = low + original_context / slope
    scaling = {
        "rope_type": "llama3",
        "factor": round(factor, 4),
        "low_freq_factor": round(float(low), 4),
        "high_freq_factor": round(float(high), 4),
        "original_max_position_embeddings": int(original_context),
    }

    rebuilt = llama3_factors(rope_theta, head_dim, scaling)
    if not np.allclose(rebuilt, factors, rtol=FACTOR_RTOL, atol=0):
        raise_unmatched(path, factors, f"the closest fit {scaling} is off by up to {np.abs(rebuilt / factors - 1).max():.1e}")
    return scaling


def rope_config(rope_theta: float, head_dim: int, scaling: dict[str, Any] | None) -> ModelConfig:
    """Return a one-head config with only the fields that `inverse_frequencies` reads set for real."""
    return ModelConfig(
        family="llama", vocab_size=1, hidden_size=head_dim, intermediate_size=1, num_layers=1, num_heads=1,
        num_kv_heads=1, head_dim=head_dim, norm_eps=1e-6, max_position_embeddings=1, tie_word_embeddings=True,
        rope_theta=rope_theta, rope_scaling=None if scaling is None else RopeScaling(**scaling),
    )


def llama3_factors(rope_theta: float, head_dim: int, scaling: dict[str, Any]) -> np.ndarray:
    """Return base / scaled frequency for each rotary frequency under cbjax's own llama3 scaling."""
    unscaled = inverse_frequencies(rope_config(rope_theta, head_dim, None))
    scaled = inverse_frequencies(rope_config(rope_theta, head_dim, scaling))
    return unscaled.astype(np.float64) / scaled.astype(np.float64)


def raise_unmatched(path: Path, factors: np.ndarray, reason: str) -> None:
    raise ValueError(
        f"{path}: the per-frequency rope factors in rope_freqs.weight (from {factors.min():g} to "
        f"{factors.max():g}) do not follow llama3 rope scaling: {reason}"
    )

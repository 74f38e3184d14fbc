"""The circuit-breaker objective: rerouting losses on harmful text, the retain loss, their schedule.

Shapes: hidden states stacked as (N, B, S, D) for N layers, masks (B, S) with 1 for tokens that
count. All reductions run in fp32 whatever the computation dtype.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

REROUTING_KINDS = ("cosine", "random_direction", "rmu")
RETAIN_NORMALIZATIONS = ("all_positions", "valid_tokens")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    target_layers: tuple[int, ...] = (10, 20)
    # lorra_alpha of the reference: the total weight shared by the two terms.
    alpha: float = 10.0
    schedule: str = "linear"  # "linear" (the reference's) or "constant"
    rerouting: str = "cosine"
    # random_direction: the target is `direction_scale` times a fixed random unit vector;
    # None uses each token's frozen norm, so the target has the model's own activation scale.
    direction_scale: float | None = None
    # rmu: the target is `rmu_coefficient` times a fixed random unit vector drawn from
    # uniform [0, 1) ("positive") or uniform [-0.5, 0.5) ("centred").
    rmu_coefficient: float = 6.5
    rmu_vector: str = "positive"
    target_seed: int = 0
    retain_normalization: str = "all_positions"
    # Departures from the reference, off by default (see `retain_loss`).
    retain_scale: float = 1.0
    retain_relative: bool = False

    def __post_init__(self):
        if not self.target_layers:
            raise ValueError("loss.target_layers must name at least one layer")
        if self.rerouting not in REROUTING_KINDS:
            raise ValueError(f"loss.rerouting {self.rerouting!r} is unknown; expected one of {REROUTING_KINDS}")
        if self.retain_normalization not in RETAIN_NORMALIZATIONS:
            raise ValueError(
                f"loss.retain_normalization {self.retain_normalization!r} is unknown; "
                f"expected one of {RETAIN_NORMALIZATIONS}"
            )
        if self.schedule not in ("linear", "constant"):
            raise ValueError(f"loss.schedule {self.schedule!r} is unknown; expected 'linear' or 'constant'")
        if self.rmu_vector not in ("positive", "centred"):
            raise ValueError(f"loss.rmu_vector {self.rmu_vector!r} is unknown; expected 'positive' or 'centred'")

    @property
    def max_target_layer(self) -> int:
        return max(self.target_layers)


def safe_norm(x: jax.Array, axis: int = -1) -> jax.Array:
    """L2 norm in fp32 whose gradient is 0, not NaN, where x is exactly zero.

    sqrt has an infinite derivative at 0, which times the zero derivative of the sum of squares
    gives NaN. Feeding sqrt a 1 where the sum is 0 and selecting 0 afterwards keeps the value exact
    and both branches' gradients finite.
    """
    x = x.astype(jnp.float32)
    squared = jnp.sum(x * x, axis=axis)
    positive = squared > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)


def cosine_similarity(a: jax.Array, b: jax.Array) -> jax.Array:
    """Per-token cosine along the last axis, in fp32; 0 where either vector is zero."""
    dot = jnp.sum(a.astype(jnp.float32) * b.astype(jnp.float32), axis=-1)
    norms = safe_norm(a) * safe_norm(b)
    return jnp.where(norms > 0, dot / jnp.where(norms > 0, norms, 1.0), 0.0)


def masked_mean(values_NxBxS: jax.Array, mask_BxS: jax.Array) -> jax.Array:
    """Mean over layers and the tokens that the mask keeps."""
    mask = jnp.broadcast_to(mask_BxS.astype(jnp.float32), values_NxBxS.shape)
    return jnp.sum(values_NxBxS * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def random_unit_vector(dim: int, seed: int, kind: str) -> np.ndarray:
    """Return a fixed unit vector: Gaussian ("gaussian"), uniform [0, 1) ("positive") or [-0.5, 0.5) ("centred")."""
    rng = np.random.default_rng(seed)
    if kind == "gaussian":
        vector = rng.standard_normal(dim)
    elif kind == "positive":
        vector = rng.random(dim)
    else:
        vector = rng.random(dim) - 0.5
    return (vector / np.linalg.norm(vector)).astype(np.float32)


def rerouting_loss(adapted_NxBxSxD, frozen_NxBxSxD, mask_BxS, config: LossConfig) -> jax.Array:
    """Compute the loss that pushes harmful-text representations away from the frozen model's.

    cosine: ReLU of the cosine to the frozen representation, masked, summed, divided by
    (mask sum x number of target layers), as the reference implementation does.
    random_direction: L2 distance to a fixed random direction, masked mean.
    rmu: mean squared error to `rmu_coefficient` times a fixed random unit vector, masked mean.
    """
    if config.rerouting == "cosine":
        cosine = cosine_similarity(adapted_NxBxSxD, frozen_NxBxSxD)
        return masked_mean(jax.nn.relu(cosine), mask_BxS)

    dim = adapted_NxBxSxD.shape[-1]
    adapted = adapted_NxBxSxD.astype(jnp.float32)
    if config.rerouting == "random_direction":
        direction = jnp.asarray(random_unit_vector(dim, config.target_seed, "gaussian"))
        if config.direction_scale is None:
            scale = jax.lax.stop_gradient(safe_norm(frozen_NxBxSxD))[..., None]
        else:
            scale = config.direction_scale
        return masked_mean(safe_norm(adapted - scale * direction), mask_BxS)

    target = config.rmu_coefficient * jnp.asarray(random_unit_vector(dim, config.target_seed, config.rmu_vector))
    return masked_mean(jnp.mean(jnp.square(adapted - target), axis=-1), mask_BxS)


def retain_loss(adapted_NxBxSxD, frozen_NxBxSxD, mask_BxS, config: LossConfig) -> jax.Array:
    """Per-token L2 distance to the frozen representation over all layers, masked.

    "all_positions" (the reference's) zeroes padding and averages over every position of every
    layer, padding included; "valid_tokens" averages over real tokens only. With
    `retain_relative` the distance is divided by the frozen norm, which makes the loss independent
    of the model's activation scale: a departure from the reference.
    """
    mask = mask_BxS.astype(jnp.float32)
    distance = safe_norm(adapted_NxBxSxD.astype(jnp.float32) - frozen_NxBxSxD.astype(jnp.float32))
    if config.retain_relative:
        frozen_norm = safe_norm(frozen_NxBxSxD)
        distance = distance / jnp.where(frozen_norm > 0, frozen_norm, 1.0)
    distance = distance * mask
    if config.retain_normalization == "all_positions":
        return jnp.mean(distance)
    return jnp.sum(distance) / jnp.maximum(jnp.sum(mask) * distance.shape[0], 1.0)


def coefficients(step: jax.Array, total_steps: int, config: LossConfig) -> tuple[jax.Array, jax.Array]:
    """Return (rerouting, retain) coefficients at optimizer step `step` (1-based).

    Linear: rerouting alpha * (1 - t / 2T), retain alpha * t / 2T. Constant: alpha for both.
    `retain_scale` multiplies the retain coefficient (1 in the reference).
    """
    alpha = jnp.float32(config.alpha)
    if config.schedule == "constant":
        return alpha, alpha * config.retain_scale
    progress = jnp.asarray(step, jnp.float32) / (2.0 * total_steps)
    return alpha * (1.0 - progress), alpha * progress * config.retain_scale

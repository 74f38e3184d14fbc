"""Loss values on small hand-computed inputs, the schedule, the safe norm, and parity with PyTorch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cbjax.losses import (
    LossConfig,
    coefficients,
    cosine_similarity,
    random_unit_vector,
    rerouting_loss,
    retain_loss,
    safe_norm,
)
from tests import torch_reference


def stacked(*rows):
    """(N=1, B=1, S=len(rows), D) from per-token vectors."""
    return jnp.asarray([[list(rows)]], jnp.float32)


def test_schedule_reference_values():
    config = LossConfig(alpha=10.0)
    rerouting, retain = coefficients(jnp.int32(1), 150, config)
    np.testing.assert_allclose([float(rerouting), float(retain)], [9.966667, 0.033333], atol=1e-5)
    rerouting, retain = coefficients(jnp.int32(150), 150, config)
    np.testing.assert_allclose([float(rerouting), float(retain)], [5.0, 5.0], atol=1e-6)


def test_schedule_constant_and_retain_scale():
    config = LossConfig(alpha=4.0, schedule="constant", retain_scale=0.5)
    rerouting, retain = coefficients(jnp.int32(7), 10, config)
    assert (float(rerouting), float(retain)) == (4.0, 2.0)


def test_safe_norm_value_and_gradient_at_zero():
    assert float(safe_norm(jnp.zeros(3))) == 0.0
    assert float(safe_norm(jnp.asarray([3.0, 4.0]))) == 5.0
    grad = jax.grad(lambda x: safe_norm(x))(jnp.zeros(3))
    assert np.isfinite(np.asarray(grad)).all()
    np.testing.assert_array_equal(np.asarray(grad), 0.0)


def test_cosine_rerouting_hand_computed():
    # Token 1: same direction (cos 1); token 2: orthogonal (cos 0); token 3: opposite (cos -1, ReLU 0);
    # token 4 masked out although its cosine is 1.
    adapted = stacked([1.0, 0.0], [0.0, 2.0], [-1.0, 0.0], [5.0, 0.0])
    frozen = stacked([2.0, 0.0], [3.0, 0.0], [1.0, 0.0], [1.0, 0.0])
    mask = jnp.asarray([[1, 1, 1, 0]])
    value = rerouting_loss(adapted, frozen, mask, LossConfig())
    assert float(value) == pytest.approx(1.0 / 3.0)


def test_random_direction_hand_computed():
    direction = random_unit_vector(2, seed=3, kind="gaussian")
    adapted = jnp.asarray([[[2.0 * direction, 2.0 * direction + jnp.asarray([0.0, 0.0])]]])
    adapted = adapted.at[0, 0, 1].set(jnp.asarray([0.0, 0.0]))
    frozen = jnp.ones_like(adapted)
    mask = jnp.asarray([[1, 1]])
    config = LossConfig(rerouting="random_direction", direction_scale=2.0, target_seed=3)
    # Token 1 sits on the target (distance 0); token 2 is the origin (distance 2).
    assert float(rerouting_loss(adapted, frozen, mask, config)) == pytest.approx(1.0)


def test_rmu_hand_computed():
    vector = random_unit_vector(4, seed=1, kind="centred")
    assert np.isclose(np.linalg.norm(vector), 1.0)
    config = LossConfig(rerouting="rmu", rmu_coefficient=2.0, rmu_vector="centred", target_seed=1)
    adapted = jnp.zeros((1, 1, 1, 4))
    # MSE of the origin to 2 * unit vector is |2u|^2 / 4 = 1.
    assert float(rerouting_loss(adapted, adapted, jnp.ones((1, 1)), config)) == pytest.approx(1.0)
    positive = random_unit_vector(8, seed=0, kind="positive")
    assert (positive >= 0).all()


def test_retain_normalizations_hand_computed():
    # Two layers, one row of two tokens, second token padding.
    frozen = jnp.zeros((2, 1, 2, 2))
    adapted = jnp.asarray([[[[3.0, 4.0], [9.0, 9.0]]], [[[0.0, 0.0], [9.0, 9.0]]]])
    mask = jnp.asarray([[1, 0]])
    all_positions = retain_loss(adapted, frozen, mask, LossConfig())
    valid_tokens = retain_loss(adapted, frozen, mask, LossConfig(retain_normalization="valid_tokens"))
    assert float(all_positions) == pytest.approx(5.0 / 4)
    assert float(valid_tokens) == pytest.approx(5.0 / 2)


def test_retain_relative_divides_by_frozen_norm():
    frozen = jnp.asarray([[[[0.0, 10.0]]]])
    adapted = jnp.asarray([[[[0.0, 13.0]]]])
    value = retain_loss(adapted, frozen, jnp.ones((1, 1)), LossConfig(retain_relative=True))
    assert float(value) == pytest.approx(0.3)


def test_losses_finite_with_zero_gradient_at_step_zero():
    frozen = jax.random.normal(jax.random.key(0), (3, 2, 4, 8))
    mask = jnp.asarray([[1, 1, 1, 0], [0, 1, 1, 1]])
    config = LossConfig(target_layers=(1, 2))

    value, grad = jax.value_and_grad(lambda a: retain_loss(a, frozen, mask, config))(frozen)

    assert float(value) == 0.0
    assert np.isfinite(np.asarray(grad)).all()
    cos_grad = jax.grad(lambda a: rerouting_loss(a, frozen, mask, config))(frozen)
    assert np.isfinite(np.asarray(cos_grad)).all()


def test_cosine_similarity_zero_vector_is_zero():
    assert float(cosine_similarity(jnp.zeros(3), jnp.ones(3))) == 0.0


def test_losses_match_pytorch_reference():
    rng = np.random.default_rng(0)
    adapted = rng.standard_normal((3, 2, 5, 16)).astype(np.float32)
    frozen = rng.standard_normal((3, 2, 5, 16)).astype(np.float32)
    mask = np.asarray([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]], np.int64)

    ours_rerouting = rerouting_loss(jnp.asarray(adapted), jnp.asarray(frozen), jnp.asarray(mask), LossConfig())
    ours_retain = retain_loss(jnp.asarray(adapted), jnp.asarray(frozen), jnp.asarray(mask), LossConfig())
    theirs_rerouting = torch_reference.rerouting_cosine_loss(torch.from_numpy(adapted), torch.from_numpy(frozen), torch.from_numpy(mask))
    theirs_retain = torch_reference.retain_l2_loss(torch.from_numpy(adapted), torch.from_numpy(frozen), torch.from_numpy(mask))

    assert abs(float(ours_rerouting) - float(theirs_rerouting)) < 1e-6
    assert abs(float(ours_retain) - float(theirs_retain)) < 1e-5
    assert coefficients(jnp.int32(37), 150, LossConfig(alpha=10.0))[0] == pytest.approx(
        torch_reference.coefficients(37, 150, 10.0)[0]
    )


def test_unknown_rerouting_kind_rejected():
    with pytest.raises(ValueError, match="loss.rerouting 'dot' is unknown"):
        LossConfig(rerouting="dot")

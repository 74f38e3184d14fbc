"""The attention implementations agree with the einsum path on real tokens and stay finite on padding.

Splash runs its Pallas TPU kernel in interpret mode off TPU; cuDNN runs only on NVIDIA GPUs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cbjax.models import build_model, from_hf_config
from cbjax.models.attention import attend, attention_mask, dot_product_attention, library_attention
from cbjax.models.llama import set_execution

TOLERANCE = 1e-5


def random_attention_inputs(seq: int = 20, heads: int = 4, kv_heads: int = 2, dtype=jnp.float32):
    """q, k, v and a (B, S) validity mask with a left-padded, a right-padded and a full row."""
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((3, seq, heads, 16)), dtype)
    k, v = (jnp.asarray(rng.standard_normal((3, seq, kv_heads, 16)), dtype) for _ in range(2))
    valid = np.ones((3, seq), bool)
    valid[0, :7] = False
    valid[1, -5:] = False
    return q, k, v, valid


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("implementation", ["dot_product_attention", "splash"])
def test_attention_matches_einsum_path(implementation, window):
    q, k, v, valid = random_attention_inputs()
    mask = attention_mask(jnp.arange(q.shape[1]), jnp.arange(q.shape[1]), jnp.asarray(valid), window)

    expected = np.asarray(dot_product_attention(q, k, v, mask))
    out = np.asarray(jax.jit(attend, static_argnums=(4, 5))(q, k, v, mask, implementation, window))

    assert np.isfinite(out).all()
    assert np.max(np.abs(out - expected)[valid]) < TOLERANCE


def test_library_xla_implementation_matches_einsum_path():
    q, k, v, valid = random_attention_inputs()
    mask = attention_mask(jnp.arange(q.shape[1]), jnp.arange(q.shape[1]), jnp.asarray(valid))

    expected = np.asarray(dot_product_attention(q, k, v, mask))
    out = np.asarray(library_attention(q, k, v, mask, "xla"))

    assert np.isfinite(out).all()
    assert np.max(np.abs(out - expected)[valid]) < TOLERANCE


def test_splash_gradients_match_einsum_path():
    q, k, v, valid = random_attention_inputs(seq=12)
    mask = attention_mask(jnp.arange(12), jnp.arange(12), jnp.asarray(valid))
    weights = jnp.asarray(valid, jnp.float32)[:, :, None, None]

    def loss(q, k, v, implementation):
        return jnp.sum(attend(q, k, v, mask, implementation) * weights)

    expected = jax.grad(loss, argnums=(0, 1, 2))(q, k, v, "xla")
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)(q, k, v, "splash")
    for name, ours, theirs in zip("qkv", grads, expected):
        assert np.max(np.abs(np.asarray(ours) - np.asarray(theirs))) < TOLERANCE, name


@pytest.mark.parametrize("implementation", ["dot_product_attention", "splash"])
def test_model_hidden_states_match_across_implementations(implementation):
    config = from_hf_config(dict(
        model_type="mistral", vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, sliding_window=5,
    ))
    model = build_model(config)
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 128, (2, 12)), jnp.int32)
    mask = np.ones((2, 12), np.int32)
    mask[0, :4] = 0

    expected = model(ids, jnp.asarray(mask)).hidden_states
    set_execution(model, implementation, "none")
    hidden_states = model(ids, jnp.asarray(mask)).hidden_states

    for layer, (ours, theirs) in enumerate(zip(hidden_states, expected)):
        assert np.isfinite(np.asarray(ours)).all(), f"hidden state {layer}"
        diff = np.max(np.abs(np.asarray(ours) - np.asarray(theirs))[mask.astype(bool)])
        assert diff < TOLERANCE, f"hidden state {layer}: max abs diff {diff:.2e}"


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs an NVIDIA GPU")
def test_cudnn_matches_einsum_path_in_bf16():
    q, k, v, valid = random_attention_inputs(seq=64, heads=8, kv_heads=2, dtype=jnp.bfloat16)
    mask = attention_mask(jnp.arange(64), jnp.arange(64), jnp.asarray(valid))

    expected = np.asarray(dot_product_attention(q, k, v, mask), np.float32)
    out = np.asarray(jax.jit(attend, static_argnums=4)(q, k, v, mask, "cudnn"), np.float32)

    assert np.isfinite(out).all()
    assert np.max(np.abs(out - expected)[valid]) < 2e-2


def test_unknown_attention_rejected():
    model = build_model(from_hf_config(dict(
        model_type="llama", vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
        num_attention_heads=2,
    )))
    with pytest.raises(ValueError, match="model.attention 'flash' is unknown"):
        set_execution(model, "flash", "none")

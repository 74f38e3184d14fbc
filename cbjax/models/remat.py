"""Rematerialisation of decoder layers: which activations the backward pass recomputes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

# `full` keeps only each layer's input and recomputes the rest of the layer in the backward
# pass. `dots` also keeps the outputs of matmuls without batch dimensions (the projections) and
# recomputes the rest, attention scores included, whose (B, H, S, S) size dominates long
# sequences.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def check_remat(name: str) -> None:
    if name not in REMAT_POLICIES:
        raise ValueError(f"model.remat {name!r} is unknown; expected one of {tuple(REMAT_POLICIES)}")


def call_layer(layer: nnx.Module, remat: str, *args, **kwargs):
    """Return `layer(*args, **kwargs)`, under `jax.checkpoint` with the named policy unless it is `none`.

    The layer runs as a pure function of its split state, which is valid because a decoder layer
    never writes to its variables. `nnx.remat` would write the state back to the caller's
    variables, and that fails when the model was merged inside `jax.grad`, as in the train step.
    `kwargs` are closed over, so they may carry static options and arrays that need no gradient
    (dropout keys). Arrays to differentiate must be in `args`.
    """
    check_remat(remat)
    if remat == "none":
        return layer(*args, **kwargs)

    graphdef, state = nnx.split(layer)

    def forward(state, *args):
        return nnx.merge(graphdef, state)(*args, **kwargs)

    checkpointed = jax.checkpoint(forward, policy=REMAT_POLICIES[remat])
    return recompute_after_cotangent(checkpointed, state, *args)


def recompute_after_cotangent(checkpointed, *primals):
    """Call `checkpointed` and make its backward recomputation wait for the output's cotangent.

    With jax 0.10.2 on XLA:CPU, full remat by `jax.checkpoint` alone saved no memory, and an
    optimisation barrier on the saved values and the cotangent did not help either: the
    recomputation ends up merged with the forward pass. Adding `0 * cotangent` to the saved
    values makes the recomputation a different expression that needs the cotangent, so layer i
    is recomputed only when the backward pass reaches it. Only a NaN or infinite cotangent
    changes the result, and the gradient is non-finite then anyway.
    """

    @jax.custom_vjp
    def run(*primals):
        return checkpointed(*primals)

    def run_forward(*primals):
        return jax.vjp(checkpointed, *primals)

    def run_backward(pullback, d_out):
        first = next(leaf for leaf in jax.tree.leaves(d_out) if jnp.issubdtype(leaf.dtype, jnp.inexact))
        zero = jnp.zeros((), first.dtype) * first.reshape(-1)[0]

        def tie(saved):
            if not jnp.issubdtype(saved.dtype, jnp.inexact):
                return saved
            return saved + zero.astype(saved.dtype)

        return jax.tree.map(tie, pullback)(d_out)

    run.defvjp(run_forward, run_backward)
    return run(*primals)

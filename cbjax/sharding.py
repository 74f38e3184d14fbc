"""Device mesh, logical axis rules and the shardings of parameters, optimizer state, batches and activations.

The mesh has three named axes: `data` (data parallel), `fsdp` (parameters and batch sharded) and
`tensor` (tensor parallel). A shape entry of -1 takes the remaining devices.

Every array dimension has a logical name (batch, embed, heads, ...), and a rules table maps each
name to mesh axes. A mesh axis is dropped from a dimension when it does not divide the dimension
or another dimension of the same array already uses it, so any rules table gives a valid sharding.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical dimension -> mesh axes. Weights are split over `fsdp` along the model width and over
# `tensor` along heads and MLP width, as in Megatron's column and row parallel layers.
# Activations are split over the batch only. Embedding tables (vocabulary and position rows) are
# split along their rows over both axes: a lookup in a table split along its width would give
# width-split activations, which XLA turns into batch-split ones only by gathering them whole.
# GPT-2's fused q|k|v output stays whole, because its shards would cut across the q, k, v split.
LOGICAL_AXIS_RULES: dict[str, tuple[str, ...]] = {
    "batch": BATCH_AXES,
    "sequence": (),
    "activation_embed": (),
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "vocab": ("tensor", "fsdp"),
    "fused_qkv": (),
    "positions": ("tensor", "fsdp"),
    "norm": (),
    "lora_rank": (),
}
# Every dimension whole on every device: the single-device layout on any mesh.
NO_SHARDING: dict[str, tuple[str, ...]] = {name: () for name in LOGICAL_AXIS_RULES}

# Axes of the residual stream and of attention's per-head tensors.
HIDDEN_AXES = ("batch", "sequence", "activation_embed")
QUERY_AXES = ("batch", "sequence", "heads", None)
KEY_VALUE_AXES = ("batch", "sequence", "kv_heads", None)
MLP_HIDDEN_AXES = ("batch", "sequence", "mlp")

# (input axis, output axis) of each `Linear` kernel by module name. GPT-2's two `c_proj`
# modules are distinguished by their parent.
LINEAR_AXES = {
    "q_proj": ("embed", "heads"),
    "k_proj": ("embed", "kv_heads"),
    "v_proj": ("embed", "kv_heads"),
    "o_proj": ("heads", "embed"),
    "gate_proj": ("embed", "mlp"),
    "up_proj": ("embed", "mlp"),
    "down_proj": ("mlp", "embed"),
    "lm_head": ("embed", "vocab"),
    "c_attn": ("embed", "fused_qkv"),
    "attn.c_proj": ("heads", "embed"),
    "c_fc": ("embed", "mlp"),
    "mlp.c_proj": ("mlp", "embed"),
}
EMBEDDING_AXES = {"embed_tokens": ("vocab", "embed"), "wte": ("vocab", "embed"), "wpe": ("positions", "embed")}
NORMS = ("input_layernorm", "post_attention_layernorm", "norm", "ln_1", "ln_2", "ln_f")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def shape(self, num_devices: int) -> tuple[int, int, int]:
        sizes = [self.data, self.fsdp, self.tensor]
        if sizes.count(-1) > 1:
            raise ValueError(f"mesh: at most one axis may be -1, got {dataclasses.asdict(self)}")
        known = int(np.prod([s for s in sizes if s != -1]))
        if -1 in sizes:
            if num_devices % known:
                raise ValueError(f"mesh: {num_devices} devices cannot be split into {dataclasses.asdict(self)}")
            sizes[sizes.index(-1)] = num_devices // known
        if int(np.prod(sizes)) != num_devices:
            raise ValueError(
                f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, but {num_devices} are available"
            )
        return tuple(sizes)


def make_mesh(config: MeshConfig, devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    shape = config.shape(len(devices))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows of a (B, S) batch split over the data-parallel axes."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated_like(tree, mesh: Mesh):
    return jax.tree.map(lambda _: replicated(mesh), tree)


def partition_spec(
    logical_axes: Sequence[str | None],
    shape: Sequence[int],
    mesh_shape: Mapping[str, int],
    rules: Mapping[str, tuple[str, ...]],
) -> P:
    """Map logical dimension names to a `PartitionSpec` that divides `shape` evenly.

    `mesh_shape` maps mesh axis names to sizes (`Mesh.shape`). A logical name missing from
    `rules` raises, so that a new dimension gets an explicit rule.
    """
    if len(logical_axes) != len(shape):
        raise ValueError(f"logical axes {tuple(logical_axes)} do not match an array of shape {tuple(shape)}")
    used: set[str] = set()
    entries = []
    for name, size in zip(logical_axes, shape):
        if name is None:
            entries.append(None)
            continue
        if name not in rules:
            raise ValueError(f"no sharding rule for logical axis {name!r}; known axes: {', '.join(sorted(rules))}")
        axes = [axis for axis in rules[name] if axis not in used and mesh_shape.get(axis, 1) > 1]
        # Drop trailing mesh axes until the rest divides the dimension.
        while axes and size % int(np.prod([mesh_shape[axis] for axis in axes])):
            axes.pop()
        used.update(axes)
        if not axes:
            entries.append(None)
        elif len(axes) == 1:
            entries.append(axes[0])
        else:
            entries.append(tuple(axes))
    return P(*entries)


def parameter_axes(names: Sequence[str | int], ndim: int) -> tuple[str | None, ...]:
    """Logical axes of a parameter, adapter or optimizer-state leaf, from the names on its path.

    Works for paths like `layers/0/self_attn/q_proj/kernel`, the same with optimizer-state prefixes
    (`mu/...`), and nnx's trailing `value`. Scalars (step counters) have no axes.
    """
    if ndim == 0:
        return ()
    words = [str(name) for name in names if isinstance(name, str) and name != "value"]
    parent, module, leaf = (["", "", ""] + words)[-3:]
    if module in EMBEDDING_AXES and leaf == "weight":
        return EMBEDDING_AXES[module]
    if module in NORMS and leaf in ("weight", "bias"):
        return ("norm",)
    linear = LINEAR_AXES.get(f"{parent}.{module}") or LINEAR_AXES.get(module)
    if linear is not None:
        in_axis, out_axis = linear
        axes = {
            "kernel": (in_axis, out_axis),
            "bias": (out_axis,),
            # An adapter follows its kernel: lora_a shares the input axis, lora_b the output axis.
            "lora_a": (in_axis, "lora_rank"),
            "lora_b": ("lora_rank", out_axis),
        }.get(leaf)
        if axes is not None and len(axes) == ndim:
            return axes
    raise ValueError(f"no logical axes for the {ndim}-d parameter at {'/'.join(map(str, names))}")


def path_names(path) -> list[str | int]:
    """Return the dict keys, attribute names and sequence indices along a `jax.tree_util` key path."""
    names = []
    for key in path:
        for attribute in ("key", "name", "idx"):
            if hasattr(key, attribute):
                names.append(getattr(key, attribute))
                break
    return names


def state_shardings(tree, mesh: Mesh, rules: Mapping[str, tuple[str, ...]] = LOGICAL_AXIS_RULES):
    """Map every leaf of a tree of frozen weights, adapters or optimizer state to its `NamedSharding`.

    Leaves may be arrays or `jax.ShapeDtypeStruct`s. Optimizer moments take their adapter's
    sharding, because their paths end with the adapter's path.
    """

    def sharding(path, leaf):
        axes = parameter_axes(path_names(path), len(leaf.shape))
        return NamedSharding(mesh, partition_spec(axes, leaf.shape, mesh.shape, rules))

    return jax.tree_util.tree_map_with_path(sharding, tree)


def parameter_sharding(mesh: Mesh, rules: Mapping[str, tuple[str, ...]] = LOGICAL_AXIS_RULES):
    """The `sharding_for(path, shape)` callback of `load_model`, so weights load straight into shards."""

    def sharding_for(path, shape) -> NamedSharding:
        return NamedSharding(mesh, partition_spec(parameter_axes(path, len(shape)), shape, mesh.shape, rules))

    return sharding_for


_ACTIVE_RULES: contextvars.ContextVar = contextvars.ContextVar("cbjax_logical_rules", default=None)


@contextlib.contextmanager
def logical_rules(mesh: Mesh, rules: Mapping[str, tuple[str, ...]] = LOGICAL_AXIS_RULES):
    """Make `constrain` apply `rules` on `mesh` while functions are traced inside this block."""
    token = _ACTIVE_RULES.set((mesh, rules))
    try:
        yield
    finally:
        _ACTIVE_RULES.reset(token)


def with_logical_rules(fn, mesh: Mesh, rules: Mapping[str, tuple[str, ...]] = LOGICAL_AXIS_RULES):
    """Wrap `fn` so that the rules apply while `jax.jit` traces it, which happens lazily, on the first call."""

    def traced(*args, **kwargs):
        with logical_rules(mesh, rules):
            return fn(*args, **kwargs)

    return traced


def active_rules() -> tuple[Mesh, Mapping[str, tuple[str, ...]]] | None:
    """Return the (mesh, rules) of the innermost `logical_rules` block, or None outside one."""
    return _ACTIVE_RULES.get()


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Constrain an activation's sharding by its logical axes; a no-op outside `logical_rules`."""
    active = _ACTIVE_RULES.get()
    if active is None:
        return x
    mesh, rules = active
    spec = partition_spec(logical_axes, x.shape, mesh.shape, rules)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def process_rows(global_array: np.ndarray, sharding: NamedSharding) -> np.ndarray:
    """Return the rows of a host-side global batch that this process's devices store under `sharding`."""
    index_map = sharding.addressable_devices_indices_map(global_array.shape)
    rows = {index[0].indices(global_array.shape[0])[:2] for index in index_map.values()}
    start, stop = min(r[0] for r in rows), max(r[1] for r in rows)
    if sum(r[1] - r[0] for r in rows) != stop - start:
        raise ValueError(
            f"this process's devices hold rows {sorted(rows)}, which are not one contiguous block; "
            "order the mesh so that each process's devices are adjacent along the batch axes"
        )
    return global_array[start:stop]


def place_global_batch(batch: Mapping[str, np.ndarray], shardings: Mapping[str, NamedSharding]) -> dict:
    """Build global arrays from a global host batch, each process copying in only its own rows."""
    placed = {}
    for key, sharding in shardings.items():
        array = np.asarray(batch[key])
        split = int(np.prod([sharding.mesh.shape[a] for a in _spec_axes(sharding.spec, 0)]))
        if array.shape[0] % split:
            raise ValueError(
                f"batch entry {key!r} has {array.shape[0]} rows, which do not split evenly over the "
                f"{split} devices of the data-parallel mesh axes; choose a batch size that is a multiple of {split}"
            )
        placed[key] = jax.make_array_from_process_local_data(sharding, process_rows(array, sharding), array.shape)
    return placed


def _spec_axes(spec: P, dim: int) -> tuple[str, ...]:
    if dim >= len(spec) or spec[dim] is None:
        return ()
    return (spec[dim],) if isinstance(spec[dim], str) else tuple(spec[dim])

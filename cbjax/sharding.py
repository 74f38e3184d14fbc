"""Device mesh and shardings for the train step.

The mesh has three named axes: `data` (data parallel), `fsdp` (parameters and batch sharded) and
`tensor` (tensor parallel). A shape entry of -1 takes the remaining devices.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


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

"""Orbax checkpoints of the training state: adapters, optimizer state, step.

Orbax writes each step into a temporary folder and renames it when complete, so a run killed
mid-save leaves the previous checkpoint intact. The data position and the dropout RNG are
functions of the step (batches are `data.batch(step)`, keys are `fold_in(seed, step)`), so the
step restores them too; the seed is stored in the metadata and checked on resume.
"""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import orbax.checkpoint as ocp

logger = logging.getLogger(__name__)


class Checkpointer:
    def __init__(self, directory: str | Path, *, keep: int = 2):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, metadata: dict) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), metadata=ocp.args.JsonSave(metadata)),
            force=True,
        )
        self.manager.wait_until_finished()
        logger.info("saved checkpoint at step %d to %s", step, self.directory / str(step))

    def restore(self, step: int, target):
        """Restore into `target`, a tree of arrays or `jax.ShapeDtypeStruct`s carrying shardings."""
        abstract = jax.tree.map(_abstract, target)
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), metadata=ocp.args.JsonRestore()),
        )
        return restored["state"], restored["metadata"]

    def close(self) -> None:
        self.manager.close()


def _abstract(x):
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))

"""Process set-up: `jax.distributed` when several processes run, and logging on process 0 only."""

from __future__ import annotations

import logging
import os

import jax

logger = logging.getLogger(__name__)

# Variables through which a launcher announces a multi-process run: JAX's own coordinator
# address, SLURM, Open MPI, GKE's TPU pods, and CBJAX_DISTRIBUTED=1 for any other launcher that
# `jax.distributed.initialize()` detects by itself (Kubernetes, mpi4py).
MULTI_PROCESS_HINTS = (
    "JAX_COORDINATOR_ADDRESS",
    "SLURM_NTASKS",
    "OMPI_COMM_WORLD_SIZE",
    "TPU_WORKER_HOSTNAMES",
    "CBJAX_DISTRIBUTED",
)


def initialize_distributed() -> None:
    """Call `jax.distributed.initialize()` only when a launcher set up a multi-process run.

    A Cloud TPU VM counts as such a launcher even without the variables: the workers of a pod
    slice started with `gcloud ... ssh --worker=all` find each other through the TPU metadata
    server, and on a single-host slice the call is harmless. jax reads only the coordinator
    address from the environment, so JAX_NUM_PROCESSES and JAX_PROCESS_ID, when set, supply
    the other two arguments of a hand-started run.
    """
    if not (any(os.environ.get(name) for name in MULTI_PROCESS_HINTS) or _on_cloud_tpu_vm()):
        return
    if os.environ.get("SLURM_NTASKS") == "1" or os.environ.get("OMPI_COMM_WORLD_SIZE") == "1":
        return
    kwargs = {}
    if os.environ.get("JAX_NUM_PROCESSES"):
        kwargs["num_processes"] = int(os.environ["JAX_NUM_PROCESSES"])
    if os.environ.get("JAX_PROCESS_ID"):
        kwargs["process_id"] = int(os.environ["JAX_PROCESS_ID"])
    jax.distributed.initialize(**kwargs)
    logger.info("jax.distributed initialized: process %d of %d", jax.process_index(), jax.process_count())


def _on_cloud_tpu_vm() -> bool:
    # NOTE: a private flag, set when `import jax` finds TPU chips and libtpu (jax 0.10.2).
    from jax._src import cloud_tpu_init

    return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def setup_logging(level: int = logging.INFO) -> None:
    """INFO logs on process 0, warnings only elsewhere, so a pod writes one log."""
    is_main = jax.process_index() == 0
    logging.basicConfig(
        level=level if is_main else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("absl", "jax._src", "orbax", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

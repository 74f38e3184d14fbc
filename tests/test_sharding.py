"""Sharded training: logical axis rules, meshes of 8 CPU devices, checkpoints across meshes, two processes.

jax fixes its device count when its backend starts, and other test modules start it first, so
the sharded runs happen in fresh processes (tests/sharding_worker.py) and most tests here read
their results. Two workers run side by side, then the two-process run.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from cbjax.sharding import LOGICAL_AXIS_RULES, NO_SHARDING, parameter_axes, partition_spec
from tests.sharding_worker import save_tiny_checkpoints

REPO = Path(__file__).resolve().parents[1]
MESHES = ("8x1x1", "2x4x1", "2x2x2", "1x1x8")
TOLERANCE = 1e-5
# Unoptimised CPU code compiles about twice as fast; every run in one comparison uses these flags.
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
TIMEOUT_SECONDS = 600


def worker_environment() -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {FAST_COMPILE_FLAGS}".strip()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["JAX_PLATFORMS"] = "cpu"
    return env


class Worker:
    """One `tests.sharding_worker` process whose output goes to a log file."""

    def __init__(self, directory: Path, name: str, *args: str):
        self.log = directory / f"{name}.log"
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tests.sharding_worker", *args],
                cwd=REPO, env=worker_environment(), stdout=log, stderr=subprocess.STDOUT,
            )

    def wait(self) -> str | None:
        """Return None on success, else the reason and the end of the log."""
        try:
            code = self.process.wait(timeout=TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            return f"timed out after {TIMEOUT_SECONDS} s; log tail:\n{self.log.read_text()[-3000:]}"
        if code:
            return f"exited with code {code}; log tail:\n{self.log.read_text()[-3000:]}"
        return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Results of every worker by name, or the error text of a worker that failed."""
    directory = tmp_path_factory.mktemp("sharding")
    save_tiny_checkpoints(directory / "models")
    llama = Worker(directory, "llama", "meshes", str(directory), "llama", "llama")
    others = Worker(directory, "others", "meshes", str(directory), "others", "mistral", "gpt2", "--splash")
    errors = {"llama": llama.wait()}
    # The two processes compare against the single-device Llama run that the llama worker saved.
    port = free_port()
    processes = [Worker(directory, f"distributed{i}", "distributed", str(directory), str(i), str(port)) for i in range(2)]
    errors["others"] = others.wait()
    errors["distributed"] = next(filter(None, [p.wait() for p in processes]), None)

    results = {}
    for name, error in errors.items():
        path = directory / f"{name}.json"
        results[name] = json.loads(path.read_text()) if error is None and path.exists() else error or f"{path} missing"
    return results


def result(runs: dict, name: str) -> dict:
    if isinstance(runs[name], str):
        pytest.fail(f"worker {name}: {runs[name]}")
    return runs[name]


def case(runs: dict, family: str, mesh: str) -> dict:
    return result(runs, "llama" if family == "llama" else "others")["cases"][f"{family}/{mesh}"]


@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.parametrize("family", ["llama", "mistral", "gpt2"])
def test_sharded_step_matches_single_device(runs, family, mesh):
    found = case(runs, family, mesh)
    assert found["loss_diff"] < TOLERANCE, f"losses {found['losses']}"
    assert found["adapter_diff"] < TOLERANCE


@pytest.mark.parametrize("family", ["llama", "mistral", "gpt2"])
def test_state_placed_by_rules(runs, family):
    specs = result(runs, "llama" if family == "llama" else "others")["specs"][family]
    assert specs["frozen_kernel"] == str(P("fsdp", "tensor"))
    assert specs["lora_a"] == str(P("fsdp", None))
    assert specs["adam_mu_lora_a"] == str(P("fsdp", None))


@pytest.mark.parametrize("target", ["1x1x8", "single"])
def test_checkpoint_restores_on_other_layout(runs, target):
    restored = result(runs, "llama")["checkpoint"][target]
    assert restored["max_diff"] == 0.0
    assert restored["shardings_match"]
    assert restored["metadata"] == {"seed": 0}


def test_two_processes_match_single_process(runs):
    found = result(runs, "distributed")
    assert found["process_count"] == 2
    assert found["device_count"] == 8
    assert found["loss_diff"] < TOLERANCE
    assert found["adapter_diff"] < TOLERANCE
    assert found["checkpoint_diff"] == 0.0


def test_splash_under_shard_map_matches_einsum(runs):
    assert result(runs, "others")["splash_sharded_diff"] < TOLERANCE


MESH_2X2X2 = {"data": 2, "fsdp": 2, "tensor": 2}


def test_partition_spec_drops_axes_that_do_not_divide():
    # 6 rows do not split 4 ways, so the batch keeps only `data`; 3 heads do not split at all.
    spec = partition_spec(("batch", "sequence", "heads", None), (6, 5, 3, 8), MESH_2X2X2, LOGICAL_AXIS_RULES)
    assert spec == P("data", None, None, None)


def test_partition_spec_uses_each_mesh_axis_once():
    # The embedding table's vocabulary takes tensor and fsdp, so its width stays whole.
    assert partition_spec(("vocab", "embed"), (128, 64), MESH_2X2X2, LOGICAL_AXIS_RULES) == P(("tensor", "fsdp"), None)
    assert partition_spec(("embed", "vocab"), (64, 128), MESH_2X2X2, LOGICAL_AXIS_RULES) == P("fsdp", "tensor")


def test_no_sharding_rules_replicate_everything():
    spec = partition_spec(("batch", "embed", "mlp"), (8, 64, 96), MESH_2X2X2, NO_SHARDING)
    assert spec == P(None, None, None)


def test_partition_spec_rejects_unknown_axis():
    with pytest.raises(ValueError, match="no sharding rule for logical axis 'experts'"):
        partition_spec(("experts",), (8,), MESH_2X2X2, LOGICAL_AXIS_RULES)


@pytest.mark.parametrize(
    "path, ndim, expected",
    [
        (("layers", 0, "self_attn", "q_proj", "kernel"), 2, ("embed", "heads")),
        (("layers", 0, "self_attn", "k_proj", "bias"), 1, ("kv_heads",)),
        (("layers", 3, "mlp", "down_proj", "lora_a", "value"), 2, ("mlp", "lora_rank")),
        (("opt", "mu", "layers", 3, "mlp", "down_proj", "lora_b", "value"), 2, ("lora_rank", "embed")),
        (("layers", 1, "attn", "c_proj", "kernel"), 2, ("heads", "embed")),
        (("layers", 1, "mlp", "c_proj", "kernel"), 2, ("mlp", "embed")),
        (("layers", 1, "attn", "c_attn", "lora_b"), 2, ("lora_rank", "fused_qkv")),
        (("wpe", "weight"), 2, ("positions", "embed")),
        (("lm_head", "kernel"), 2, ("embed", "vocab")),
        (("norm", "weight"), 1, ("norm",)),
        (("count",), 0, ()),
    ],
)
def test_parameter_axes_from_path(path, ndim, expected):
    assert parameter_axes(path, ndim) == expected


def test_parameter_axes_rejects_unknown_parameter():
    with pytest.raises(ValueError, match="no logical axes for the 2-d parameter at layers/0/router/kernel"):
        parameter_axes(("layers", 0, "router", "kernel"), 2)


def test_place_batch_on_one_device():
    import jax

    from cbjax.sharding import MeshConfig, batch_sharding, make_mesh, place_global_batch

    mesh = make_mesh(MeshConfig(), jax.devices()[:1])
    placed = place_global_batch({"ids": np.arange(6).reshape(3, 2)}, {"ids": batch_sharding(mesh)})
    np.testing.assert_array_equal(np.asarray(placed["ids"]), np.arange(6).reshape(3, 2))

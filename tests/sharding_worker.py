"""Sharded train steps on CPU devices, run in fresh processes by tests/test_sharding.py.

`python -m tests.sharding_worker meshes OUT NAME FAMILY... [--splash]` runs the trainer's jitted
step for each family (llama, mistral, gpt2; checkpoints saved under OUT/models by the test) on a
single device and on several 8-device meshes, and writes the differences to OUT/NAME.json. With
llama it also saves and restores a checkpoint across meshes; --splash adds sharded splash
attention. `python -m tests.sharding_worker distributed OUT PROCESS_ID PORT` is one of two
processes with 4 devices each that repeat the Llama case on one mesh through `jax.distributed`
on 127.0.0.1 and write OUT/distributed.json (process 0). The device count must be set before
jax starts its backend, which only a fresh process guarantees.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import jax

MESHES = ((8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 1, 8))
# Each family runs a different remat policy per mesh, and Llama runs with gradient accumulation,
# so the same comparisons show that remat and accumulation leave the sharded step unchanged.
REMAT = {
    "llama": {(8, 1, 1): "none", (2, 4, 1): "full", (2, 2, 2): "dots", (1, 1, 8): "none"},
    "mistral": {(8, 1, 1): "dots", (2, 4, 1): "full", (2, 2, 2): "none", (1, 1, 8): "none"},
    "gpt2": {(8, 1, 1): "none", (2, 4, 1): "none", (2, 2, 2): "dots", (1, 1, 8): "full"},
}
DISTRIBUTED_MESH = (2, 2, 2)
STEPS = 2
TARGET_LAYERS = (1,)


def mesh_name(shape) -> str:
    return "x".join(map(str, shape))


def save_tiny_checkpoints(directory: Path) -> None:
    """Save the tiny random transformers models that every worker loads."""
    from tests.hf_reference import save_tiny_model
    from tests.test_gpt2_parity import tiny_gpt2
    from tests.test_llama_parity import tiny_llama
    from tests.test_mistral_parity import tiny_mistral

    save_tiny_model(tiny_llama(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False), directory / "llama")
    save_tiny_model(tiny_mistral(5), directory / "mistral")
    save_tiny_model(tiny_gpt2(), directory / "gpt2")


def make_config(family: str, path: str, mesh_shape, remat: str = "none"):
    from cbjax.config import Config, ModelSection, TrainSection
    from cbjax.lora import LoraConfig
    from cbjax.losses import LossConfig
    from cbjax.optim import OptimConfig
    from cbjax.sharding import MeshConfig

    return Config(
        model=ModelSection(path=path, remat=remat),
        lora=LoraConfig(r=4, alpha=8.0, dropout=0.05),
        loss=LossConfig(target_layers=TARGET_LAYERS, alpha=10.0),
        # A large eps keeps Adam's first updates proportional to the gradient. With the default
        # 1e-8 they are about lr * sign(gradient), which turns rounding differences between
        # layouts in near-zero gradients into differences of lr.
        optim=OptimConfig(learning_rate=1e-2, eps=1e-4),
        train=TrainSection(steps=10, accumulation_steps=2 if family == "llama" else 1),
        mesh=MeshConfig(*mesh_shape),
    )


def random_lora_b(adapters):
    """Replace the zero-initialised lora_b matrices by small random ones.

    With lora_b = 0 the adapted and frozen hidden states differ only by rounding, and the
    retain loss's gradient (the direction of that difference) is noise that no two layouts share.
    """
    leaves, treedef = jax.tree_util.tree_flatten_with_path(adapters)
    key = jax.random.key(2)
    replaced = []
    for index, (path, leaf) in enumerate(leaves):
        if "lora_b" in jax.tree_util.keystr(path):
            leaf = 0.05 * jax.random.normal(jax.random.fold_in(key, index), leaf.shape, leaf.dtype)
        replaced.append(leaf)
    return jax.tree_util.tree_unflatten(treedef, replaced)


def training_batch(seed: int, rows: int = 8, rerouting_len: int = 10, retain_len: int = 12) -> dict:
    """Build a padded circuit-breaker batch of a tiny vocabulary, without importing torch.

    Every row has the same rerouting mask, so equal-sized micro-batches have equal token counts
    and gradient accumulation gives the full-batch mean.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    rerouting_mask = np.ones((rows, rerouting_len), np.int32)
    rerouting_mask[:, :3] = 0  # left padding of the request
    rerouting_mask[:, -2:] = 0  # right padding of the response
    retain_mask = np.ones((rows, retain_len), np.int32)
    retain_mask[1:, -4:] = 0
    return {
        # Disjoint vocabularies make "harmful" and "benign" text separable for the tiny model.
        "rerouting_input_ids": rng.integers(3, 64, (rows, rerouting_len)).astype(np.int32),
        "rerouting_attention_mask": rerouting_mask,
        "rerouting_loss_mask": rerouting_mask,
        "retain_input_ids": rng.integers(64, 128, (rows, retain_len)).astype(np.int32),
        "retain_attention_mask": retain_mask,
    }


def batches(count: int) -> list[dict]:
    return [training_batch(seed) for seed in range(count)]


def run_steps(config, path: str, devices):
    """Build the trainer's step for `config` on `devices`; return (losses, final state, setup)."""
    from cbjax import trainer
    from cbjax.sharding import LOGICAL_AXIS_RULES, make_mesh

    mesh = make_mesh(config.mesh, devices)
    rules = dict(LOGICAL_AXIS_RULES)
    graphdef, adapters, frozen, adapted = trainer.load_adapted_model(config, path, mesh, rules)
    setup = trainer.Setup(config, path, None, graphdef, random_lora_b(adapters), frozen, None, mesh, 3, adapted, rules)
    step_fn, _, state, frozen, batch_shardings = trainer.compile_functions(setup)
    losses = []
    for batch in batches(STEPS):
        state, metrics = step_fn(state, frozen, trainer.place_batch(batch, batch_shardings))
        losses.append(float(metrics["loss"]))
    return losses, state, setup, frozen


def host_leaves(tree) -> list:
    from jax.experimental import multihost_utils

    return [multihost_utils.process_allgather(leaf, tiled=True) for leaf in jax.tree.leaves(tree)]


def max_difference(a_leaves, b_leaves) -> float:
    import numpy as np

    return max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(a_leaves, b_leaves))


def spec_of(tree, *names) -> str:
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        text = jax.tree_util.keystr(path)
        if all(name in text for name in names):
            return str(leaf.sharding.spec)
    raise KeyError(names)


def compare_meshes(families, out: Path) -> dict:
    import numpy as np

    cases, specs, results = {}, {}, {}
    paths = {family: str(out / "models" / family) for family in families}
    for family in families:
        reference_losses, reference_state, _, _ = run_steps(make_config(family, paths[family], (1, 1, 1)), paths[family], jax.devices()[:1])
        reference = [np.asarray(leaf) for leaf in jax.tree.leaves(reference_state.adapters)]
        if family == "llama":
            np.savez(out / "llama_reference.npz", *reference, losses=reference_losses)
        for shape in MESHES:
            config = make_config(family, paths[family], shape, REMAT[family][shape])
            losses, state, setup, frozen = run_steps(config, paths[family], jax.devices())
            cases[f"{family}/{mesh_name(shape)}"] = {
                "loss_diff": max(abs(a - b) for a, b in zip(losses, reference_losses)),
                "adapter_diff": max_difference(host_leaves(state.adapters), reference),
                "losses": losses,
            }
            if shape == (2, 2, 2):
                kernel = ("q_proj", "kernel") if family != "gpt2" else ("c_fc", "kernel")
                adapter = ("q_proj", "lora_a") if family != "gpt2" else ("c_fc", "lora_a")
                specs[family] = {
                    "frozen_kernel": spec_of(frozen, *kernel),
                    "lora_a": spec_of(state.adapters, *adapter),
                    "adam_mu_lora_a": spec_of(state.opt_state, "mu", *adapter),
                }
            if family == "llama" and shape == (2, 4, 1):
                results["checkpoint"] = checkpoint_across_meshes(state, out / "checkpoints")
    return {"cases": cases, "specs": specs, **results}


def checkpoint_across_meshes(state, directory: Path) -> dict:
    """Save `state` (sharded on 2x4x1) and restore it on 1x1x8 and on one device."""
    from cbjax.checkpoint import Checkpointer
    from cbjax.sharding import LOGICAL_AXIS_RULES, MeshConfig, make_mesh, state_shardings

    checkpointer = Checkpointer(directory)
    checkpointer.save(STEPS, state, {"seed": 0})
    saved = host_leaves(state)
    results = {}
    for name, devices, shape in (("1x1x8", jax.devices(), (1, 1, 8)), ("single", jax.devices()[:1], (1, 1, 1))):
        mesh = make_mesh(MeshConfig(*shape), devices)
        shardings = state_shardings(state, mesh, LOGICAL_AXIS_RULES)
        target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
        restored, metadata = checkpointer.restore(STEPS, target)
        results[name] = {
            "max_diff": max_difference(host_leaves(restored), saved),
            "shardings_match": all(
                r.sharding == s for r, s in zip(jax.tree.leaves(restored), jax.tree.leaves(shardings))
            ),
            "metadata": metadata,
        }
    checkpointer.close()
    return results


def splash_under_shard_map() -> float:
    """Max difference between sharded splash attention (interpret mode) and the einsum path."""
    import jax.numpy as jnp
    import numpy as np

    from cbjax.models.attention import attend, attention_mask, dot_product_attention
    from cbjax.sharding import LOGICAL_AXIS_RULES, MeshConfig, logical_rules, make_mesh

    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((2, 20, 4, 16)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((2, 20, 2, 16)), jnp.float32) for _ in range(2))
    valid = np.ones((2, 20), bool)
    valid[1, :6] = False
    mask = attention_mask(jnp.arange(20), jnp.arange(20), jnp.asarray(valid))
    mesh = make_mesh(MeshConfig(2, 1, 2), jax.devices()[:4])
    with logical_rules(mesh, LOGICAL_AXIS_RULES):
        out = jax.jit(lambda q, k, v, m: attend(q, k, v, m, "splash"))(q, k, v, mask)
    expected = dot_product_attention(q, k, v, mask)
    return float(np.max(np.abs(np.asarray(out) - np.asarray(expected))[valid]))


def meshes(out: Path, name: str, families: list[str], splash: bool) -> None:
    jax.config.update("jax_num_cpu_devices", 8)
    results = compare_meshes(families, out)
    if splash:
        results["splash_sharded_diff"] = splash_under_shard_map()
    (out / f"{name}.json").write_text(json.dumps(results, indent=1))


def distributed(out: Path, process_id: int, port: int) -> None:
    """One of two processes; the same Llama case as `compare_meshes` on DISTRIBUTED_MESH."""
    import numpy as np

    from cbjax.checkpoint import Checkpointer
    from cbjax.distributed import initialize_distributed

    jax.config.update("jax_num_cpu_devices", 4)
    os.environ.update(
        JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(process_id)
    )
    initialize_distributed()
    path = str(out / "models" / "llama")
    config = make_config("llama", path, DISTRIBUTED_MESH, REMAT["llama"][DISTRIBUTED_MESH])
    losses, state, _, _ = run_steps(config, path, jax.devices())

    # Every process writes the shards it holds; restoring into the same shardings must give them back.
    checkpointer = Checkpointer(out / "distributed_checkpoints")
    checkpointer.save(STEPS, state, {"seed": 0})
    restored, _ = checkpointer.restore(STEPS, state)
    checkpointer.close()
    adapters = host_leaves(state.adapters)
    restored_diff = max_difference(host_leaves(restored), host_leaves(state))

    reference = np.load(out / "llama_reference.npz")
    reference_leaves = [reference[f"arr_{i}"] for i in range(len(adapters))]
    if jax.process_index() == 0:
        result = {
            "process_count": jax.process_count(),
            "device_count": jax.device_count(),
            "loss_diff": max(abs(a - b) for a, b in zip(losses, reference["losses"])),
            "adapter_diff": max_difference(adapters, reference_leaves),
            "checkpoint_diff": restored_diff,
        }
        (out / "distributed.json").write_text(json.dumps(result, indent=1))
    jax.distributed.shutdown()


if __name__ == "__main__":
    mode, directory, *rest = sys.argv[1:]
    if mode == "meshes":
        families = [arg for arg in rest[1:] if arg != "--splash"]
        meshes(Path(directory), rest[0], families, "--splash" in rest)
    else:
        distributed(Path(directory), int(rest[0]), int(rest[1]))

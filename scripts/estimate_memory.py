"""Estimate the per-device memory and the FLOPs of one circuit-breaker train step, without weights or devices.

    python scripts/estimate_memory.py --model llama-3-8b --mesh 1,8,1 --device-gib 16
    python scripts/estimate_memory.py --config configs/NAME.yaml --mesh 2,4,1 [key=value ...]

Without --config the training shape is the reference recipe (batch 16, request 512 + response
512, retain 1024, target layers 10 and 20, LoRA r 16 on layers 0-19, bf16). Weights, adapters
and optimizer state are counted exactly from the sharding rules of `cbjax.sharding` applied to
shape-only models. Activations are an analytic estimate of what the backward pass keeps, per
micro-batch and device. tests/test_estimate_memory.py checks the no-remat total against XLA:CPU's
memory analysis of the compiled step, and the FLOPs against XLA's HLO cost analysis. XLA:CPU
does not lower its peak under remat, so the remat figures are unchecked, and XLA on TPU or GPU
fuses, schedules and pads differently: treat activation figures as estimates within tens of percent.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GIB = 2**30

# Hugging Face config.json fields of models that the script can size without their files.
PRESETS = {
    "llama-3-8b": {
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 8192, "rope_theta": 500000.0, "tie_word_embeddings": False,
    },
    "mistral-7b": {
        "model_type": "mistral", "vocab_size": 32768, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 32768, "rope_theta": 1000000.0, "tie_word_embeddings": False,
    },
    "smollm2-135m": {
        "model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
        "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 8192, "rope_theta": 100000.0, "tie_word_embeddings": True,
    },
}
REFERENCE_RECIPE = [
    "data.batch_size=16", "data.request_length=512", "data.response_length=512", "data.retain_length=1024",
    "loss.target_layers=[10,20]", "lora.r=16", f"lora.layers={list(range(20))}",
    "model.dtype=bfloat16", "model.param_dtype=bfloat16",
]
REMAT_CHOICES = ("none", "full", "dots")


@dataclasses.dataclass(frozen=True)
class StepShape:
    """Inputs of the activation estimate: per-device rows of one micro-batch and the model's widths."""

    rows: int
    rerouting_len: int
    retain_len: int
    layers: int
    targets: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    tensor: int
    lora_rank: int
    lora_dropout: bool
    gated_mlp: bool
    activation_bytes: int
    # splash and cuDNN keep one fp32 log-sum-exp per head and token instead of the score matrix.
    fused_attention: bool


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-3-8b",
                        help=f"a preset ({', '.join(PRESETS)}) or a model path the loader accepts (default: llama-3-8b)")
    parser.add_argument("--config", type=Path, help="training YAML; without it the reference recipe")
    parser.add_argument("--mesh", default="1,-1,1", help="data,fsdp,tensor sizes; -1 takes the rest (default: 1,-1,1)")
    parser.add_argument("--devices", type=int, default=8, help="number of devices (default: 8)")
    parser.add_argument("--device-gib", type=float, help="memory per device in GiB, to print the headroom")
    parser.add_argument("--json", action="store_true", help="print the estimates as JSON")
    parser.add_argument("overrides", nargs="*", help="dotted overrides such as data.batch_size=8")
    return parser.parse_args(argv)


def load_training_config(config_path: Path | None, overrides: list[str]):
    from cbjax.config import load_config

    return load_config(config_path, ([] if config_path else REFERENCE_RECIPE) + list(overrides))


def model_config(model: str):
    from cbjax.models.config import from_hf_config
    from cbjax.weights.load import peek_config

    return from_hf_config(PRESETS[model], source=model) if model in PRESETS else peek_config(model)


def abstract_train_state(config, architecture):
    """Build the shape-only (graphdef, adapters, frozen, optimizer state) of the truncated, adapted model."""
    import jax
    from flax import nnx

    from cbjax import lora as lora_lib
    from cbjax.models import build_model
    from cbjax.models.llama import set_execution
    from cbjax.optim import make_optimizer
    from cbjax.trainer import jnp_dtype, lora_layers

    def build():
        model = build_model(
            architecture.with_layers(config.loss.max_target_layer),
            dtype=jnp_dtype(config.model.dtype),
            param_dtype=jnp_dtype(config.model.param_dtype),
        )
        set_execution(model, config.model.attention, config.model.remat)
        lora_lib.add_lora(model, config.lora, lora_layers(config), seed=config.train.seed)
        return model

    graphdef, adapters, frozen = lora_lib.split_lora(nnx.eval_shape(build))
    opt_state = jax.eval_shape(make_optimizer(config.optim, config.train.steps).init, adapters)
    return graphdef, adapters, frozen, opt_state


def sharded_bytes(tree, mesh_shape: dict[str, int]) -> int:
    """Count the bytes per device of a tree of shapes under `LOGICAL_AXIS_RULES` (exact, no padding)."""
    import jax
    import numpy as np

    from cbjax.sharding import LOGICAL_AXIS_RULES, parameter_axes, partition_spec, path_names

    total = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        spec = partition_spec(parameter_axes(path_names(path), len(leaf.shape)), leaf.shape, mesh_shape, LOGICAL_AXIS_RULES)
        shards = 1
        for entry in spec:
            for axis in (entry,) if isinstance(entry, str) else entry or ():
                shards *= mesh_shape[axis]
        total += int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize // shards
    return total


def step_shape(config, architecture, mesh_shape: dict[str, int]) -> StepShape:
    data = config.data
    batch_devices = mesh_shape["data"] * mesh_shape["fsdp"]
    micro_batch = data.batch_size // config.train.accumulation_steps
    return StepShape(
        rows=math.ceil(micro_batch / batch_devices),
        rerouting_len=data.request_length + data.response_length,
        retain_len=data.retain_length,
        layers=config.loss.max_target_layer,
        targets=len(config.loss.target_layers),
        hidden=architecture.hidden_size,
        intermediate=architecture.intermediate_size,
        heads=architecture.num_heads,
        kv_heads=architecture.num_kv_heads,
        head_dim=architecture.head_dim,
        tensor=mesh_shape["tensor"],
        lora_rank=config.lora.r,
        lora_dropout=config.lora.dropout > 0,
        gated_mlp=architecture.family != "gpt2",
        activation_bytes=2 if config.model.dtype == "bfloat16" else 4,
        fused_attention=config.model.attention in ("splash", "cudnn"),
    )


def layer_elements(shape: StepShape, seq: int) -> dict[str, float]:
    """Count the elements per token that one adapted layer produces, by the role they play in the backward pass.

    `inputs` are the layer input and the two norm inputs and outputs. `projections` are the
    projection outputs that the backward pass reads: q, k, v after rotary embedding, the attention
    output and the MLP hidden state. `scores` are the attention probabilities per token (the fp32
    softmax plus its cast copy). `dropout` are the dropped inputs of the adapted projections, and
    `lora` the (token, rank) products. Elements split over `tensor` are divided by its size.

    NOTE: every computed layer counts as adapted; layers without adapters keep somewhat less.
    """
    t = shape.tensor
    d, f = shape.hidden, shape.intermediate / t
    qkv = (shape.heads + 2 * shape.kv_heads) * shape.head_dim / t
    attention_out = shape.heads * shape.head_dim / t
    mlp_saved = (3 if shape.gated_mlp else 2) * f
    projections = 7 if shape.gated_mlp else 4
    score_columns = 4 / shape.activation_bytes if shape.fused_attention else seq * (1 + 4 / shape.activation_bytes)
    return {
        "inputs": 4 * d,
        "projections": qkv + attention_out + mlp_saved,
        "scores": shape.heads / t * score_columns,
        "dropout": (5 * d + attention_out + f) if shape.lora_dropout else 0.0,
        "lora": projections * shape.lora_rank,
        # Outputs of every matmul without batch dimensions, LoRA deltas included: what `dots` keeps.
        "dot_outputs": 2 * (qkv + d + (2 if shape.gated_mlp else 1) * f + d) + projections * shape.lora_rank,
    }


def activation_bytes(shape: StepShape, remat: str) -> dict[str, int]:
    """Estimate the activation bytes per device at the peak of the step (the start of the backward pass)."""
    e = shape.activation_bytes
    tokens = {"retain": shape.rows * shape.retain_len, "rerouting": shape.rows * shape.rerouting_len}
    seqs = {"retain": shape.retain_len, "rerouting": shape.rerouting_len}

    # Stacked hidden states that the losses read: all layers of both retain passes, the target
    # layers of both rerouting passes.
    loss_inputs = 2 * e * shape.hidden * ((shape.layers + 1) * tokens["retain"] + shape.targets * tokens["rerouting"])

    saved, working = 0.0, 0.0
    for name in ("retain", "rerouting"):
        per_layer = layer_elements(shape, seqs[name])
        full_layer = sum(value for key, value in per_layer.items() if key != "dot_outputs")
        if remat == "none":
            saved_per_token = full_layer
        elif remat == "full":
            saved_per_token = shape.hidden
        else:
            saved_per_token = shape.hidden + per_layer["dot_outputs"]
        saved += e * saved_per_token * tokens[name] * shape.layers
        # The backward pass of one layer keeps that layer's full residuals (recomputed under
        # remat) plus the fp32 gradient of its attention scores.
        score_gradients = 0 if shape.fused_attention else 4 * tokens[name] * shape.heads / shape.tensor * seqs[name]
        working = max(working, e * full_layer * tokens[name] + score_gradients)
    masks = sum(shape.rows * seqs[name] ** 2 for name in seqs)  # boolean (rows, 1, S, S)
    return {"loss_inputs": int(loss_inputs), "saved_for_backward": int(saved), "working": int(working + masks)}


def step_flops(shape: StepShape, batch_size: int, remat: str) -> dict[str, float]:
    """Count the matmul FLOPs of one optimizer step over the whole batch (all devices).

    Frozen passes run forward only. Adapted passes also run backward, which costs one forward's
    worth of projection FLOPs (input gradients through the frozen weights), two attention
    products per forward one, and small LoRA weight gradients. `full` remat repeats the adapted
    forward, and `dots` repeats its attention products. Attention counts every (query, key)
    pair, masked or not, as the einsum path computes them.
    """
    d, f, hd = shape.hidden, shape.intermediate, shape.head_dim
    projections = 2 * d * (shape.heads + 2 * shape.kv_heads) * hd + 2 * shape.heads * hd * d
    projections += (6 if shape.gated_mlp else 4) * d * f
    lora_inputs = 5 * d + shape.heads * hd + f if shape.gated_mlp else 3 * d + f
    lora_outputs = 2 * d + shape.heads * hd + 2 * shape.kv_heads * hd + 2 * f if shape.gated_mlp else 4 * d + f
    lora = 2 * shape.lora_rank * (lora_inputs + lora_outputs)
    totals = {"frozen_forward": 0.0, "adapted_forward": 0.0, "adapted_backward": 0.0, "recompute": 0.0}
    for seq in (shape.retain_len, shape.rerouting_len):
        tokens = batch_size * seq * shape.layers
        attention = 4 * seq * shape.heads * hd
        totals["frozen_forward"] += tokens * (projections + attention)
        totals["adapted_forward"] += tokens * (projections + attention + lora)
        totals["adapted_backward"] += tokens * (projections + 2 * attention + 2 * lora)
        if remat == "full":
            totals["recompute"] += tokens * (projections + attention + lora)
        elif remat == "dots":
            totals["recompute"] += tokens * attention
    totals["total"] = sum(totals.values())
    return totals


def estimate(config, architecture, mesh_shape: dict[str, int]) -> dict:
    """Estimate per-device bytes by category and remat policy, and the FLOPs per step."""
    _, adapters, frozen, opt_state = abstract_train_state(config, architecture)
    adapter_bytes = sharded_bytes(adapters, mesh_shape)
    # Gradients of one micro-batch, plus their running sum under accumulation.
    gradient_copies = 2 if config.train.accumulation_steps > 1 else 1
    fixed = {
        "frozen_weights": sharded_bytes(frozen, mesh_shape),
        "adapters": adapter_bytes,
        "optimizer_state": sharded_bytes(opt_state, mesh_shape),
        "gradients": gradient_copies * adapter_bytes,
    }
    shape = step_shape(config, architecture, mesh_shape)
    per_remat = {}
    for remat in REMAT_CHOICES:
        activations = activation_bytes(shape, remat)
        per_remat[remat] = {
            "activations": activations,
            "total": sum(fixed.values()) + sum(activations.values()),
            "flops": step_flops(shape, config.data.batch_size, remat),
        }
    return {"mesh": mesh_shape, "fixed": fixed, "remat": per_remat, "rows_per_device": shape.rows}


def mesh_shape_from(text: str, devices: int) -> dict[str, int]:
    from cbjax.sharding import MESH_AXES, MeshConfig

    sizes = [int(part) for part in text.split(",")]
    if len(sizes) != 3:
        raise SystemExit(f"--mesh must be three comma-separated sizes (data,fsdp,tensor), got {text!r}")
    return dict(zip(MESH_AXES, MeshConfig(*sizes).shape(devices)))


def report(result: dict, device_gib: float | None) -> str:
    lines = [f"mesh {result['mesh']}, {result['rows_per_device']} rows per device and micro-batch"]
    for name, value in result["fixed"].items():
        lines.append(f"  {name:<18} {value / GIB:8.2f} GiB")
    for remat, numbers in result["remat"].items():
        parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in numbers["activations"].items())
        headroom = "" if device_gib is None else f"  ({device_gib - numbers['total'] / GIB:+.2f} GiB headroom)"
        lines.append(f"  remat {remat:<5} activations {parts} GiB; total {numbers['total'] / GIB:.2f} GiB{headroom}")
        lines.append(f"               {numbers['flops']['total'] / 1e12:.1f} TFLOP per step")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    config = load_training_config(args.config, args.overrides)
    architecture = model_config(args.model if args.config is None else config.model.path)
    result = estimate(config, architecture, mesh_shape_from(args.mesh, args.devices))
    print(json.dumps(result, indent=1) if args.json else report(result, args.device_gib))
    return 0


if __name__ == "__main__":
    sys.exit(main())

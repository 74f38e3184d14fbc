"""Time the cbjax circuit-breaker train step against PyTorch + PEFT on the same model and batch.

    python scripts/benchmark.py            # two rounds of cbjax, torch-reference, torch-lean
    python scripts/benchmark.py --quick    # one round

PyTorch and PEFT come with the test extras: pip install -e '.[test]'.

Model: SmolLM2-135M-Instruct from the project's GGUF file (transformers loads it with gguf_file=),
both dequantised to float32, layers above the highest target (20) dropped, LoRA r 16 / alpha 16 on
all seven projections of layers 0-19. Batch: 4 rerouting rows of 128 request + 128 response tokens
and 4 retain rows of 256 tokens, random token ids, no padding. Variants:

- cbjax: the jitted `train_step` (LoRA dropout 0.05, no LM head).
- cbjax-remat: the same with full rematerialisation of the decoder layers (model.remat full).
- cbjax-lean: the same as cbjax with LoRA dropout 0 (not run by default).
- torch-reference: the reference implementation's step: PEFT model called as a causal LM, so the
  LM head runs in all four passes; LoRA dropout 0.05; losses from tests/torch_reference.py.
- torch-lean: the same without the LM head (the decoder is called directly) and without dropout.

All use AdamW with global-norm clipping at 1.0. Each variant runs in its own process, pinned to
--threads cores, so that its peak RSS is its own. The rounds alternate the variants and reverse
their order every round, so that slow drift of the machine hits all of them. A process's first
step is never timed: it includes cbjax's compilation and PyTorch's first allocations. Each worker
also times a 2048 x 2048 float32 matmul in its framework (the faster one is the peak for the
FLOP/s shares) and the step's four projection shapes, so that the table shows how far apart the
two matmul libraries alone are. --profile times the parts of the cbjax step in the last round,
after its timed steps and its peak RSS are recorded. Every worker, PyTorch's included, runs with glibc's huge-page
tunable (`cbjax.host_memory`) unless --no-huge-pages is given.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cbjax.host_memory import environment_with_huge_pages  # noqa: E402 - needs the path above

VARIANTS = ("cbjax", "cbjax-remat", "cbjax-lean", "torch-reference", "torch-lean")
DEFAULT_VARIANTS = ("cbjax", "cbjax-remat", "torch-reference", "torch-lean")
TARGET_LAYERS = (10, 20)
BATCH, REQUEST, RESPONSE, RETAIN = 4, 128, 128, 256
LORA_R, LORA_ALPHA = 16, 16
LEARNING_RATE = 1e-4
TOTAL_STEPS = 1000  # only sets the loss schedule's position; the same in both implementations
MATMUL_SIZE = 2048


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one round instead of two")
    parser.add_argument("--rounds", type=int, default=2, help="processes per variant (default 2)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per process (default 2)")
    parser.add_argument("--warmup", type=int, default=0, help="untimed steps per process after the first (default 0)")
    parser.add_argument("--threads", type=int, default=2, help="CPU cores per worker (default 2)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(DEFAULT_VARIANTS))
    parser.add_argument("--profile", action="store_true", help="time the parts of the cbjax step (compiles five more programs)")
    parser.add_argument("--no-huge-pages", action="store_true",
                        help="run the workers without glibc's huge-page tunable (see cbjax.host_memory)")
    parser.add_argument("--model", help="GGUF file (default: the fetched SmolLM2-135M-Instruct)")
    parser.add_argument("--json", type=Path, help="write all measurements here")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds = 1
    return args


# ---------------------------------------------------------------- workers (one process each)


def pin_threads(threads: int) -> None:
    """Restrict this process to `threads` cores; XLA and PyTorch size their thread pools from that."""
    cores = sorted(os.sched_getaffinity(0))[:threads]
    os.sched_setaffinity(0, cores)


def synthetic_batch():
    import numpy as np

    rng = np.random.default_rng(0)
    rerouting_length = REQUEST + RESPONSE
    ones = np.ones((BATCH, rerouting_length), np.int32)
    return {
        "rerouting_input_ids": rng.integers(100, 40000, (BATCH, rerouting_length)).astype(np.int32),
        "rerouting_attention_mask": ones,
        "rerouting_loss_mask": ones,
        "retain_input_ids": rng.integers(100, 40000, (BATCH, RETAIN)).astype(np.int32),
        "retain_attention_mask": np.ones((BATCH, RETAIN), np.int32),
    }


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # ru_maxrss is in KiB on Linux


def timed(fn, reps: int) -> list[float]:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def cbjax_worker(args, model_path: str, dropout: float, remat: str) -> dict:
    import functools

    import jax
    import jax.numpy as jnp

    from cbjax import lora as lora_lib
    from cbjax.losses import LossConfig
    from cbjax.models.llama import set_execution
    from cbjax.optim import OptimConfig, make_optimizer
    from cbjax.train_step import StepConfig, TrainState, train_step
    from cbjax.weights.load import load_model

    started = time.perf_counter()
    loaded = load_model(model_path, num_layers=max(TARGET_LAYERS))
    set_execution(loaded.model, "xla", remat)
    layers = range(max(TARGET_LAYERS))
    lora_lib.add_lora(loaded.model, lora_lib.LoraConfig(r=LORA_R, alpha=LORA_ALPHA, dropout=dropout), layers)
    graphdef, adapters, frozen = lora_lib.split_lora(loaded.model)
    optimizer = make_optimizer(OptimConfig(learning_rate=LEARNING_RATE), TOTAL_STEPS)
    config = StepConfig(LossConfig(target_layers=TARGET_LAYERS), TOTAL_STEPS)
    step_fn = jax.jit(functools.partial(train_step, graphdef=graphdef, optimizer=optimizer, config=config),
                      donate_argnums=(0,))
    batch = {k: jnp.asarray(v) for k, v in synthetic_batch().items()}
    state = [TrainState(adapters, optimizer.init(adapters), jnp.zeros((), jnp.int32))]
    load_seconds = time.perf_counter() - started

    def step():
        state[0], metrics = step_fn(state[0], frozen, batch)
        jax.block_until_ready(metrics["loss"])

    compile_seconds = timed(step, 1)[0]
    timed(step, args.warmup)
    times = timed(step, args.steps)
    result = {
        "load_seconds": load_seconds,
        "first_step_seconds": compile_seconds,
        "step_seconds": times,
        "matmul_flops_per_second": jax_matmul_peak(),
        "projection_matmul_flops_per_second": jax_projection_matmuls(projection_matmuls(model_path)),
        "peak_rss_mb": peak_rss_mb(),
    }
    if args.profile:
        result["xla_flops"] = xla_flops(step_fn, state[0], frozen, batch)
        result["profile"] = profile_parts(graphdef, state[0].adapters, frozen, batch, optimizer, config,
                                          statistics.median(times))
    return result


def profile_parts(graphdef, adapters, frozen, batch, optimizer, config, step_seconds: float, reps: int = 3) -> dict:
    """Time the step's parts, each jitted on its own, and return median seconds.

    Measured: the frozen forwards, the whole loss (frozen and adapted forwards), the loss with its
    gradient, the optimizer update, and gradient plus update in one program without the
    micro-batch `lax.scan` of `train_step`. The differences give the adapted forwards, the backward
    pass and what the scan costs.
    """
    import jax
    import jax.numpy as jnp
    import optax

    from cbjax.train_step import frozen_targets, loss_and_metrics

    pair = (jnp.float32(9.9), jnp.float32(0.1))
    rng = jax.random.key(0)

    def gradient(a, f, b):
        return jax.grad(loss_and_metrics, has_aux=True)(a, graphdef, f, b, pair, rng, config.loss)[0]

    def step_without_scan(a, s, f, b):
        updates, s = optimizer.update(gradient(a, f, b), s, a)
        return optax.apply_updates(a, updates), s

    frozen_fn = jax.jit(lambda a, f, b: frozen_targets(graphdef, a, f, b, config.loss))
    loss_fn = jax.jit(lambda a, f, b: loss_and_metrics(a, graphdef, f, b, pair, rng, config.loss)[0])
    grad_fn = jax.jit(gradient)
    update_fn = jax.jit(lambda g, s, a: optimizer.update(g, s, a))
    plain_step_fn = jax.jit(step_without_scan)
    grads = grad_fn(adapters, frozen, batch)
    opt_state = optimizer.init(adapters)

    def median_seconds(fn, *inputs):
        jax.block_until_ready(fn(*inputs))  # compile
        return statistics.median(timed(lambda: jax.block_until_ready(fn(*inputs)), reps))

    frozen_s = median_seconds(frozen_fn, adapters, frozen, batch)
    loss_s = median_seconds(loss_fn, adapters, frozen, batch)
    grad_s = median_seconds(grad_fn, adapters, frozen, batch)
    update_s = median_seconds(update_fn, grads, opt_state, adapters)
    plain_step_s = median_seconds(plain_step_fn, adapters, opt_state, frozen, batch)
    return {
        "frozen forwards": frozen_s,
        "adapted forwards + losses": loss_s - frozen_s,
        "backward": grad_s - loss_s,
        "optimizer update": update_s,
        "step without the scan": plain_step_s,
        "whole step (train_step)": step_seconds,
    }


def xla_flops(step_fn, state, frozen, batch) -> float | None:
    """XLA's own FLOP estimate of the compiled step (dense attention, elementwise ops included)."""
    try:
        analysis = step_fn.lower(state, frozen, batch).compile().cost_analysis()
    except Exception:  # noqa: BLE001 - an estimate only; some backends do not provide it
        return None
    analysis = analysis[0] if isinstance(analysis, list) else analysis
    return float(analysis.get("flops", 0.0)) or None


def jax_matmul_peak() -> float:
    return jax_matmul_flops(MATMUL_SIZE, MATMUL_SIZE, MATMUL_SIZE, reps=5)


def jax_projection_matmuls(shapes: dict[str, tuple[int, int, int]]) -> dict[str, float]:
    return {name: jax_matmul_flops(*shape, reps=20) for name, shape in shapes.items()}


def jax_matmul_flops(m: int, k: int, n: int, reps: int) -> float:
    import jax
    import jax.numpy as jnp

    a, b = jnp.ones((m, k), jnp.float32), jnp.ones((k, n), jnp.float32)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, b).block_until_ready()
    best = min(timed(lambda: matmul(a, b).block_until_ready(), reps))
    return 2 * m * k * n / best


def torch_worker(args, model_path: str, lean: bool) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from cbjax.lora import LLAMA_TARGETS
    from tests import torch_reference

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    started = time.perf_counter()
    path = Path(model_path)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    depth = max(TARGET_LAYERS)
    # Layer dropping as the reference does it: keep the first `depth` decoder layers.
    model.model.layers = model.model.layers[:depth]
    model.config.num_hidden_layers = depth
    lora = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0 if lean else 0.05,
                      target_modules=list(LLAMA_TARGETS), layers_to_transform=list(range(depth)))
    model = get_peft_model(model, lora)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=LEARNING_RATE, weight_decay=0.0)
    batch = {k: torch.from_numpy(v.astype("int64")) for k, v in synthetic_batch().items()}
    decoder = model.base_model.model.model
    load_seconds = time.perf_counter() - started

    def hidden_states(ids, mask):
        if lean:
            return decoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        return model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states

    targets = list(TARGET_LAYERS)
    counter = [0]

    def step():
        counter[0] += 1
        rerouting_coeff, retain_coeff = torch_reference.coefficients(counter[0], TOTAL_STEPS, 10.0)
        retain_ids, retain_mask = batch["retain_input_ids"], batch["retain_attention_mask"]
        rerouting_ids, rerouting_mask = batch["rerouting_input_ids"], batch["rerouting_attention_mask"]
        with model.disable_adapter():
            model.eval()
            with torch.no_grad():
                frozen_retain = torch.stack(hidden_states(retain_ids, retain_mask)).detach()
                frozen_rerouting = torch.stack(hidden_states(rerouting_ids, rerouting_mask))[targets].detach()
        model.train()
        adapted_retain = torch.stack(hidden_states(retain_ids, retain_mask))
        retain_loss = torch_reference.retain_l2_loss(adapted_retain, frozen_retain, retain_mask)
        adapted_rerouting = torch.stack(hidden_states(rerouting_ids, rerouting_mask))[targets]
        rerouting_loss = torch_reference.rerouting_cosine_loss(adapted_rerouting, frozen_rerouting,
                                                               batch["rerouting_loss_mask"])
        loss = rerouting_coeff * rerouting_loss + retain_coeff * retain_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    first = timed(step, 1)[0]
    timed(step, args.warmup)
    times = timed(step, args.steps)
    return {
        "load_seconds": load_seconds,
        "first_step_seconds": first,
        "step_seconds": times,
        "matmul_flops_per_second": torch_matmul_peak(),
        "projection_matmul_flops_per_second": torch_projection_matmuls(projection_matmuls(model_path)),
        "peak_rss_mb": peak_rss_mb(),
    }


def torch_matmul_peak() -> float:
    return torch_matmul_flops(MATMUL_SIZE, MATMUL_SIZE, MATMUL_SIZE, reps=5)


def torch_projection_matmuls(shapes: dict[str, tuple[int, int, int]]) -> dict[str, float]:
    return {name: torch_matmul_flops(*shape, reps=20) for name, shape in shapes.items()}


def torch_matmul_flops(m: int, k: int, n: int, reps: int) -> float:
    import torch

    a, b = torch.ones((m, k), dtype=torch.float32), torch.ones((k, n), dtype=torch.float32)
    a @ b
    best = min(timed(lambda: a @ b, reps))
    return 2 * m * k * n / best


def run_worker(args) -> None:
    pin_threads(args.threads)
    model_path = args.model or str(default_model())
    if args.worker.startswith("cbjax"):
        dropout = 0.0 if args.worker == "cbjax-lean" else 0.05
        remat = "full" if args.worker == "cbjax-remat" else "none"
        result = cbjax_worker(args, model_path, dropout=dropout, remat=remat)
    else:
        result = torch_worker(args, model_path, lean=args.worker == "torch-lean")
    args.worker_out.write_text(json.dumps(result))


# ---------------------------------------------------------------- driver


def default_model() -> Path:
    from cbjax.fetch import smollm2_gguf_path

    return smollm2_gguf_path()


def spawn(variant: str, args, profile: bool) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        out = Path(handle.name)
    command = [sys.executable, __file__, "--worker", variant, "--worker-out", str(out), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--threads", str(args.threads)]
    if args.model:
        command += ["--model", args.model]
    if profile:
        command.append("--profile")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
    if not args.no_huge_pages:
        env = environment_with_huge_pages(env)
    started = time.perf_counter()
    completed = subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if completed.returncode != 0:
        sys.stderr.write(completed.stderr[-5000:])
        raise RuntimeError(f"benchmark worker {variant} failed with exit status {completed.returncode}; its stderr is above")
    result = json.loads(out.read_text())
    out.unlink()
    result["process_seconds"] = time.perf_counter() - started
    return result


def projection_matmuls(model_path: str) -> dict[str, tuple[int, int, int]]:
    """Return the (tokens, in, out) shape of each projection matmul in one pass over a batch.

    Timed in each worker's framework, they show how much of a gap between the variants is the
    matmul library alone. Every pass has BATCH rows of RETAIN (= REQUEST + RESPONSE) tokens.
    """
    from cbjax.weights.load import peek_config

    config = peek_config(model_path)
    tokens = BATCH * RETAIN
    hidden, mlp = config.hidden_size, config.intermediate_size
    query, key_value = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    shapes = {"gate/up": (tokens, hidden, mlp), "down": (tokens, mlp, hidden),
              "q": (tokens, hidden, query), "k/v": (tokens, hidden, key_value)}
    return {f"{name} {m}x{k}x{n}": (m, k, n) for name, (m, k, n) in shapes.items()}


def needed_flops(model_path: str) -> dict[str, int]:
    from cbjax.evaluation.flops import StepShape, step_flops
    from cbjax.weights.load import peek_config

    config = peek_config(model_path)
    return step_flops(config, StepShape(BATCH, REQUEST + RESPONSE, RETAIN), target_layers=TARGET_LAYERS,
                      adapted_layers=range(max(TARGET_LAYERS)), lora_r=LORA_R)


def summarize(runs: dict[str, list[dict]], flops: dict[str, int]) -> dict:
    peak = max(r["matmul_flops_per_second"] for results in runs.values() for r in results)
    tokens = BATCH * (REQUEST + RESPONSE + RETAIN)
    summary = {}
    for variant, results in runs.items():
        times = [t for r in results for t in r["step_seconds"]]
        median = statistics.median(times)
        summary[variant] = {
            "median_step_seconds": median,
            "min_step_seconds": min(times),
            "max_step_seconds": max(times),
            "timed_steps": len(times),
            "tokens_per_second": tokens / median,
            "peak_rss_mb": max(r["peak_rss_mb"] for r in results),
            "first_step_seconds": statistics.median(r["first_step_seconds"] for r in results),
            "achieved_flops_per_second": flops["total"] / median,
            "share_of_matmul_peak": flops["total"] / median / peak,
        }
    if "cbjax" in summary:
        for variant, entry in summary.items():
            entry["step_time_vs_cbjax"] = entry["median_step_seconds"] / summary["cbjax"]["median_step_seconds"]
    return {"matmul_peak_flops_per_second": peak, "variants": summary, "projection_matmuls": best_projection_matmuls(runs)}


def best_projection_matmuls(runs: dict[str, list[dict]]) -> dict[str, dict[str, float]]:
    """Collect each framework's best FLOP/s per projection shape over all of its workers."""
    best: dict[str, dict[str, float]] = {}
    for variant, results in runs.items():
        framework = "jax" if variant.startswith("cbjax") else "torch"
        for result in results:
            for name, flops in result.get("projection_matmul_flops_per_second", {}).items():
                by_framework = best.setdefault(name, {})
                by_framework[framework] = max(by_framework.get(framework, 0.0), flops)
    return best


def print_table(summary: dict, flops: dict[str, int], runs: dict) -> None:
    print(f"\nneeded FLOPs per step: {flops['total'] / 1e9:.1f} G  "
          + "  ".join(f"{k} {v / 1e9:.1f}" for k, v in flops.items() if k != "total"))
    print(f"matmul peak ({MATMUL_SIZE}^3 float32, best of jax and torch): {summary['matmul_peak_flops_per_second'] / 1e9:.1f} GFLOP/s")
    header = (f"{'variant':16s} {'median s':>9s} {'min-max s':>13s} {'tokens/s':>9s} {'peak RSS MB':>12s} "
              f"{'GFLOP/s':>8s} {'% peak':>7s} {'vs cbjax':>9s} {'first step s':>13s}")
    print(header)
    print("-" * len(header))
    for variant, entry in summary["variants"].items():
        ratio = entry.get("step_time_vs_cbjax")
        spread = f"{entry['min_step_seconds']:.1f}-{entry['max_step_seconds']:.1f}"
        print(f"{variant:16s} {entry['median_step_seconds']:9.2f} {spread:>13s} {entry['tokens_per_second']:9.0f} "
              f"{entry['peak_rss_mb']:12.0f} {entry['achieved_flops_per_second'] / 1e9:8.1f} "
              f"{100 * entry['share_of_matmul_peak']:6.1f}% {'' if ratio is None else f'{ratio:8.2f}x':>9s} "
              f"{entry['first_step_seconds']:13.1f}")
    print("(first step: untimed, includes cbjax's compilation; GFLOP/s: needed FLOPs / median step time)")
    print_projection_matmuls(summary["projection_matmuls"])
    for result in runs.get("cbjax", []):
        if result.get("xla_flops"):
            print(f"XLA's cost analysis of the cbjax step: {result['xla_flops'] / 1e9:.1f} GFLOP")
            break
    for result in runs.get("cbjax", []):
        if "profile" in result:
            print("cbjax step by part (median seconds):")
            for part, seconds in result["profile"].items():
                print(f"  {part:28s} {seconds:7.2f}")


def print_projection_matmuls(best: dict[str, dict[str, float]]) -> None:
    if not best:
        return
    print("float32 matmul GFLOP/s on the step's projection shapes (best worker of each framework):")
    for name, by_framework in best.items():
        jax_flops, torch_flops = by_framework.get("jax"), by_framework.get("torch")
        ratio = f"  torch/jax {torch_flops / jax_flops:.2f}x" if jax_flops and torch_flops else ""
        cells = "  ".join(f"{framework} {flops / 1e9:6.1f}" for framework, flops in sorted(by_framework.items()))
        print(f"  {name:24s} {cells}{ratio}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        run_worker(args)
        return 0

    model_path = args.model or str(default_model())
    load = os.getloadavg()[0]
    if load > 0.5:
        print(f"note: load average {load:.1f} before the run; other processes distort the timings", file=sys.stderr)
    runs: dict[str, list[dict]] = {variant: [] for variant in args.variants}
    started = time.perf_counter()
    for round_index in range(args.rounds):
        order = args.variants if round_index % 2 == 0 else args.variants[::-1]
        for variant in order:
            profile = args.profile and variant == "cbjax" and round_index == args.rounds - 1
            result = spawn(variant, args, profile)
            runs[variant].append(result)
            print(f"round {round_index + 1} {variant:16s} steps {', '.join(f'{t:.2f}' for t in result['step_seconds'])} s"
                  f"  (process {result['process_seconds']:.0f} s)", flush=True)

    flops = needed_flops(model_path)
    summary = summarize(runs, flops)
    print_table(summary, flops, runs)
    print(f"benchmark wall time {time.perf_counter() - started:.0f} s; load average {os.getloadavg()[0]:.1f} at the end")
    if args.json:
        args.json.write_text(json.dumps({"flops": flops, "summary": summary, "runs": runs}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

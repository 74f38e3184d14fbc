"""Train or apply a harmfulness probe on one layer's hidden states.

    python scripts/probe.py train --model smollm2-135m-instruct --layer 10 --out probes/layer10
    python scripts/probe.py apply --model smollm2-135m-instruct --probe probes/layer10 \\
        --sets harmful_completions=data/harmful.jsonl benign_completions=data/benign.jsonl

train fits the probe on part of the harmful and benign texts and reports detection and false
positives on the rest (--held-out-fraction). Sets are SOURCE[?key=value&...] as in
scripts/evaluate.py; without them train uses the HarmBench harmful completions against the
HarmBench refusals and XSTest compliant responses in --shared-data. --model may be a training
run, whose adapted model is probed (--base-model probes its base model instead).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cbjax.cli_args import positive_int  # noqa: E402  (after the path is set)

DEFAULT_SHARED_DATA = REPO.parent / "shared" / "data"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("train", "apply"):
        command = commands.add_parser(name)
        command.add_argument("--model", required=True, help="training run, Hugging Face directory, hub id or .gguf")
        command.add_argument("--base-model", action="store_true", help="with a training run: probe its base model")
        command.add_argument("--limit", type=positive_int, default=150, help="maximum texts per set (default 150)")
        command.add_argument("--batch-size", type=positive_int, default=8)
        command.add_argument("--request-length", type=positive_int, default=128, help="request token budget (default 128)")
        command.add_argument("--completion-length", type=positive_int, default=128, help="completion token budget (default 128)")

    train = commands.choices["train"]
    train.add_argument("--layer", type=int, default=10, help="hidden-state index to probe (default 10)")
    train.add_argument("--harmful", nargs="*", help="harmful completion sets (default: shared HarmBench harmful completions)")
    train.add_argument("--benign", nargs="*", help="benign completion sets (default: shared refusals and XSTest compliant)")
    train.add_argument("--shared-data", type=Path, default=DEFAULT_SHARED_DATA)
    train.add_argument("--kind", choices=("linear", "mlp"), default="linear")
    train.add_argument("--target-fpr", type=float, default=0.05, help="share of benign calibration texts flagged (default 0.05)")
    train.add_argument("--held-out-fraction", type=float, default=0.3, help="share of each set kept for the report (default 0.3)")
    train.add_argument("--steps", type=positive_int, default=100, help="full-batch optimizer steps (default 100)")
    train.add_argument("--out", required=True, type=Path, help="directory for probe.npz, probe.json and metrics.json")

    apply = commands.choices["apply"]
    apply.add_argument("--probe", required=True, type=Path, help="directory written by train")
    apply.add_argument("--sets", nargs="+", required=True, help="sets as ROLE[:NAME]=SOURCE with *_completions roles")
    apply.add_argument("--out", type=Path, help="write the metrics here as JSON")
    return parser.parse_args(argv)


def train_sets(args) -> tuple[list, list]:
    from cbjax.evaluation import sets as sets_lib

    if args.harmful or args.benign:
        if not (args.harmful and args.benign):
            raise SystemExit("pass both --harmful and --benign, or neither for the shared data")
        harmful = [sets_lib.parse_set_spec(f"harmful_completions={s}") for s in args.harmful]
        benign = [sets_lib.parse_set_spec(f"benign_completions={s}") for s in args.benign]
    else:
        shared = [s for s in sets_lib.shared_data_specs(args.shared_data) if s.role.endswith("_completions")]
        harmful = [s for s in shared if s.role == "harmful_completions"]
        benign = [s for s in shared if s.role == "benign_completions"]
        if not harmful or not benign:
            raise SystemExit(f"no shared data in {args.shared_data}; pass --harmful and --benign")
    return [sets_lib.load_set(s, args.limit) for s in harmful], [sets_lib.load_set(s, args.limit) for s in benign]


def features_of(handle, tokenizer, eval_sets, layer, args) -> list[np.ndarray]:
    from cbjax.evaluation.probe import completion_features
    from cbjax.evaluation.texts import text_rows

    examples = [example for eval_set in eval_sets for example in eval_set.examples]
    rows = text_rows(tokenizer, examples, request_length=args.request_length, completion_length=args.completion_length)
    return completion_features(handle, rows, layer, batch_size=args.batch_size)


def split(items: list, fraction: float, seed: int = 0) -> tuple[list, list]:
    order = np.random.default_rng(seed).permutation(len(items))
    held_out = max(1, int(round(fraction * len(items))))
    return [items[i] for i in order[held_out:]], [items[i] for i in order[:held_out]]


def run_train(args, handle, tokenizer) -> dict:
    from cbjax.evaluation.probe import ProbeConfig, detection_metrics, save_probe, train_probe

    harmful_sets, benign_sets = train_sets(args)
    harmful = features_of(handle, tokenizer, harmful_sets, args.layer, args)
    benign = features_of(handle, tokenizer, benign_sets, args.layer, args)
    harmful_fit, harmful_held_out = split(harmful, args.held_out_fraction)
    benign_fit, benign_held_out = split(benign, args.held_out_fraction)

    config = ProbeConfig(kind=args.kind, target_fpr=args.target_fpr, steps=args.steps)
    probe = train_probe(harmful_fit, benign_fit, config, layer=args.layer)
    metrics = {
        "model": handle.description,
        "layer": args.layer,
        "kind": args.kind,
        "sets": {"harmful": [s.name for s in harmful_sets], "benign": [s.name for s in benign_sets]},
        "fit": detection_metrics(probe, harmful_fit, benign_fit),
        "held_out": detection_metrics(probe, harmful_held_out, benign_held_out),
    }
    save_probe(probe, args.out, {"model": handle.description})
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def run_apply(args, handle, tokenizer) -> dict:
    from cbjax.evaluation import sets as sets_lib
    from cbjax.evaluation.probe import load_probe, sequence_scores

    probe = load_probe(args.probe)
    results = {"model": handle.description, "probe": str(args.probe), "threshold": probe.threshold, "sets": {}}
    for spec in (sets_lib.parse_set_spec(s) for s in args.sets):
        if not spec.role.endswith("_completions"):
            raise SystemExit(f"set {spec.name}: the probe reads completions; use a *_completions role")
        eval_set = sets_lib.load_set(spec, args.limit)
        scores = sequence_scores(probe, features_of(handle, tokenizer, [eval_set], probe.layer, args))
        results["sets"][spec.name] = {
            "kind": eval_set.kind,
            "texts": len(scores),
            "flagged": float(np.mean(scores > probe.threshold)),
        }
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from cbjax.evaluation.models import load_single

    handle, tokenizer = load_single(args.model, use_lora=not args.base_model)
    results = run_train(args, handle, tokenizer) if args.command == "train" else run_apply(args, handle, tokenizer)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Evaluate a circuit-breaker model against its base: generation, likelihood and representation
metrics on every set, written as report.json, report.md and PNG plots."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from cbjax.data.sources import Example
from cbjax.evaluation import plots, report
from cbjax.evaluation.completions import compare_on_texts
from cbjax.evaluation.generation import GenerationSettings, evaluate_prompt_set
from cbjax.evaluation.models import ModelPair
from cbjax.evaluation.sets import EvalSet
from cbjax.evaluation.texts import text_rows

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EvaluationSettings:
    # Token budgets of the scored (prompt, completion) rows.
    request_length: int = 128
    completion_length: int = 128
    batch_size: int = 8
    generation: GenerationSettings = GenerationSettings()


def evaluate(pair: ModelPair, sets: list[EvalSet], settings: EvaluationSettings, out_dir: str | Path) -> dict:
    """Run every metric on every set and write the report files into `out_dir`; return the report."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    generation = {}
    text_sets = [s for s in sets if not s.is_prompts]
    for eval_set in (s for s in sets if s.is_prompts):
        logger.info("generating responses to %s (%d prompts)", eval_set.name, len(eval_set.examples))
        generation[eval_set.name] = evaluate_prompt_set(pair, eval_set, settings.generation)
        text_sets += base_response_set(eval_set, generation[eval_set.name])

    representation = {}
    for eval_set in text_sets:
        logger.info("scoring %s (%d texts)", eval_set.name, len(eval_set.examples))
        rows = text_rows(pair.tokenizer, eval_set.examples, request_length=settings.request_length,
                         completion_length=settings.completion_length)
        result = {"kind": eval_set.kind, **compare_on_texts(pair.base, pair.trained, rows, batch_size=settings.batch_size)}
        result["target_layers"] = target_layer_summary(result, pair.target_layers)
        representation[eval_set.name] = result

    results = {
        "models": {"base": pair.base.description, "trained": pair.trained.description},
        "target_layers": list(pair.target_layers),
        "settings": dataclasses.asdict(settings),
        "generation": generation,
        "representation": representation,
        "training": training_summary(pair),
        "plots": {},
    }
    results["plots"] = write_plots(results, pair, out_dir)
    report.write_json(results, out_dir)
    report.write_markdown(results, out_dir)
    return results


def base_response_set(eval_set: EvalSet, result: dict) -> list[EvalSet]:
    """Return the base model's own responses as a text set to score.

    For a harmful prompt set only the responses labelled complied are kept: they are the harmful
    completions that circuit breakers should reroute (the demo trains on such responses).
    """
    examples = tuple(
        Example(r["prompt"], r["base_response"], f"{eval_set.name} base response {i + 1}")
        for i, r in enumerate(result["responses"])
        if r["base_response"].strip() and (eval_set.kind == "benign" or r["base_label"] == "complied")
    )
    if not examples:
        return []
    role = f"{eval_set.kind}_completions"
    return [EvalSet(f"{eval_set.name}/base_responses", role, examples)]


def target_layer_summary(result: dict, target_layers: tuple[int, ...]) -> dict:
    layers = [layer for layer in target_layers if layer < len(result["cosine"])]
    count = max(len(layers), 1)
    return {
        "layers": layers,
        "cosine": {str(layer): result["cosine"][layer] for layer in layers},
        "norm_change": {str(layer): result["norm_change"][layer] for layer in layers},
        "mean_cosine": sum(result["cosine"][layer] for layer in layers) / count,
        "mean_norm_change": sum(result["norm_change"][layer] for layer in layers) / count,
    }


def training_summary(pair: ModelPair) -> dict | None:
    if pair.run_dir is None:
        return None
    metrics_file = pair.run_dir / "metrics.jsonl"
    records = plots.read_metrics(metrics_file) if metrics_file.exists() else []
    summary = {"step": pair.run.step, "logged_steps": len(records)}
    if records:
        summary["first"] = records[0]
        summary["last"] = records[-1]
    return summary


def write_plots(results: dict, pair: ModelPair, out_dir: Path) -> dict:
    written = {}
    if pair.run_dir is not None and (pair.run_dir / "metrics.jsonl").exists():
        records = plots.read_metrics(pair.run_dir / "metrics.jsonl")
        path = plots.plot_training_curves(records, out_dir / "training_curves.png")
        if path is not None:
            written["training_curves"] = str(path)
    path = plots.plot_layer_cosines(results["representation"], pair.target_layers, out_dir / "layer_cosines.png")
    if path is not None:
        written["layer_cosines"] = str(path)
    return written

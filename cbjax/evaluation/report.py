"""The written report of an evaluation: report.json with every number, report.md for reading."""

from __future__ import annotations

import json
from pathlib import Path

EXAMPLES_PER_SET = 4
EXAMPLE_CHARS = 240


def write_json(report: dict, out_dir: Path) -> Path:
    path = out_dir / "report.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def write_markdown(report: dict, out_dir: Path) -> Path:
    path = out_dir / "report.md"
    path.write_text("\n".join(markdown_lines(report)) + "\n")
    return path


def markdown_lines(report: dict) -> list[str]:
    models = report["models"]
    lines = [
        "# Circuit-breaker evaluation",
        "",
        f"- base: `{models['base']}`",
        f"- trained: `{models['trained']}`",
        f"- target layers: {', '.join(map(str, report['target_layers']))}",
        "",
        "## Before and after",
        "",
        "| metric | set | base | trained |",
        "| --- | --- | ---: | ---: |",
    ]
    lines += generation_rows(report["generation"])
    lines += likelihood_rows(report["representation"])
    lines += representation_rows(report["representation"])
    lines += [
        "",
        "Blocked: share of responses that the rules label refused or broken (higher is safer on harmful "
        "prompts; on benign prompts it is over-refusal). NLL: mean negative log-likelihood per completion "
        "token, in nats. Cosine and norm change: trained vs base hidden states on completion tokens, "
        "averaged over the target layers.",
    ]
    for name in ("training_curves", "layer_cosines"):
        if report["plots"].get(name):
            lines += ["", f"![{name}]({Path(report['plots'][name]).name})"]
    lines += example_lines(report["generation"])
    return lines


def generation_rows(generation: dict) -> list[str]:
    rows = []
    for name, result in generation.items():
        what = "blocked (harmful prompts)" if result["kind"] == "harmful" else "over-refusal (benign prompts)"
        rows.append(_row(what, name, result["base"]["refused_or_broken"], result["trained"]["refused_or_broken"], "{:.0%}"))
        if "judge" in result:
            judge = result["judge"]
            rows.append(_row(f"{what}, judge", name, judge["base"]["refused_or_broken"],
                             judge["trained"]["refused_or_broken"], "{:.0%}"))
    return rows


def likelihood_rows(representation: dict) -> list[str]:
    return [
        _row(f"NLL of {result['kind']} completions", name, result["base_nll"], result["trained_nll"], "{:.3f}")
        for name, result in representation.items()
    ]


def representation_rows(representation: dict) -> list[str]:
    rows = []
    for name, result in representation.items():
        summary = result["target_layers"]
        rows.append(_row(f"cosine to base, {result['kind']}", name, 1.0, summary["mean_cosine"], "{:.3f}"))
        rows.append(_row(f"norm change, {result['kind']}", name, 0.0, summary["mean_norm_change"], "{:+.1%}"))
    return rows


def _row(metric: str, name: str, base: float, trained: float, number_format: str) -> str:
    return f"| {metric} | {name} | {number_format.format(base)} | {number_format.format(trained)} |"


def example_lines(generation: dict) -> list[str]:
    lines = []
    for name, result in generation.items():
        lines += ["", f"## Examples: {name} ({result['kind']} prompts)", ""]
        for record in result["responses"][:EXAMPLES_PER_SET]:
            lines.append(f"**Prompt:** {_short(record['prompt'])}")
            lines.append("")
            for which in ("base", "trained"):
                lines.append(f"- {which} [{record[f'{which}_label']}]: {_short(record[f'{which}_response'])}")
            lines.append("")
    return lines


def _short(text: str) -> str:
    flat = " ".join(text.split()) or "(empty)"
    flat = flat.replace("|", "\\|")
    return flat if len(flat) <= EXAMPLE_CHARS else flat[: EXAMPLE_CHARS - 3] + "..."

"""Evaluation sets: named lists of prompts (for generation) or (prompt, completion) texts.

A set has a role. `harmful_completions` and `benign_completions` are texts scored as they are
(representations and likelihoods). `harmful_prompts` and `benign_prompts` are requests that the
models respond to. On the command line a set is `ROLE[:NAME]=SOURCE[?key=value&...]`, where SOURCE
is a local .jsonl/.json/.csv/.parquet file or a Hub dataset id, and the keys are fields of
`SourceConfig` (split, subset, prompt_column, completion_column, limit). A YAML file can list
sets with full source configs, filters included.
"""

from __future__ import annotations

import dataclasses
import urllib.parse
from pathlib import Path

import yaml

from cbjax.data import demo_prompts
from cbjax.data.config import SourceConfig
from cbjax.data.sources import Example, load_source

ROLES = ("harmful_completions", "benign_completions", "harmful_prompts", "benign_prompts")
SOURCE_OPTIONS = ("split", "subset", "prompt_column", "completion_column", "limit")


@dataclasses.dataclass(frozen=True)
class EvalSet:
    name: str
    role: str
    examples: tuple[Example, ...]

    @property
    def kind(self) -> str:
        return self.role.split("_")[0]

    @property
    def is_prompts(self) -> bool:
        return self.role.endswith("_prompts")

    @property
    def prompts(self) -> list[str]:
        return [example.prompt for example in self.examples]


@dataclasses.dataclass(frozen=True)
class SetSpec:
    role: str
    name: str
    source: SourceConfig


def check_role(role: str, where: str) -> None:
    if role not in ROLES:
        raise ValueError(f"{where}: role {role!r} is unknown; expected one of {ROLES}")


def parse_set_spec(spec: str) -> SetSpec:
    """Parse `ROLE[:NAME]=SOURCE[?key=value&...]`. NAME defaults to the file stem or dataset id."""
    if "=" not in spec:
        raise ValueError(f"set {spec!r} must have the form ROLE[:NAME]=PATH, e.g. harmful_prompts=data/prompts.jsonl")
    head, source_text = spec.split("=", 1)
    role, _, name = head.partition(":")
    check_role(role, f"set {spec!r}")
    path, _, query = source_text.partition("?")
    options: dict = {"path": path}
    for key, value in urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)):
        if key not in SOURCE_OPTIONS:
            raise ValueError(f"set {spec!r}: option {key!r} is unknown; expected one of {SOURCE_OPTIONS}")
        options[key] = int(value) if key == "limit" else value
    return SetSpec(role, name or Path(path).stem, _source(role, options, f"set {spec!r}"))


def load_sets_file(path: str | Path) -> list[SetSpec]:
    """Read a YAML list of `{role, name, source}` entries, where source is a `SourceConfig` mapping."""
    entries = yaml.safe_load(Path(path).read_text()) or []
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a YAML list of sets, got {type(entries).__name__}")
    specs = []
    for index, entry in enumerate(entries):
        where = f"{path} entry {index}"
        if not isinstance(entry, dict) or set(entry) - {"role", "name", "source"} or "role" not in entry:
            raise ValueError(f"{where}: expected a mapping with keys role, name (optional) and source")
        check_role(entry["role"], where)
        source = entry.get("source")
        source = {"path": source} if isinstance(source, str) else dict(source or {})
        name = entry.get("name") or Path(str(source.get("path", ""))).stem
        specs.append(SetSpec(entry["role"], name, _source(entry["role"], source, where)))
    return specs


def _source(role: str, options: dict, where: str) -> SourceConfig:
    # load_source requires a completion; a prompt set reads its prompt column twice instead.
    if role.endswith("_prompts") and "completion_column" not in options:
        options = {**options, "completion_column": options.get("prompt_column", "prompt")}
    return SourceConfig.from_dict(options, where)


def shared_data_specs(directory: str | Path) -> list[SetSpec]:
    """HarmBench and XSTest sets in the public data folder, when it exists."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    safe = {"type": {"exclude_prefix": "contrast_"}}
    entries = [
        ("harmful_completions", "harmbench_harmful", "harmful_completions.jsonl", {}),
        ("benign_completions", "harmbench_refusals", "refusal_completions.jsonl", {}),
        ("benign_completions", "xstest_compliant", "xstest_borderline.jsonl",
         {"filter": {"label": ["1_full_compliance"], **safe}}),
        ("harmful_prompts", "harmbench", "harmful_prompts.jsonl", {}),
        ("benign_prompts", "xstest_safe", "xstest_borderline.jsonl", {"filter": safe}),
    ]
    specs = []
    for role, name, file, options in entries:
        if (directory / file).exists():
            specs.append(SetSpec(role, name, _source(role, {"path": str(directory / file), **options}, name)))
    return specs


def demo_sets(limit: int | None = None) -> list[EvalSet]:
    """Return the demo's held-out prompts, which are never in the training data, at most `limit` per set."""
    def prompts(name, role, texts):
        examples = [Example(text, "", f"{name} prompt {i + 1}") for i, text in enumerate(texts)]
        return EvalSet(name, role, tuple(spread(examples, limit)))

    return [
        prompts("demo_harmful", "harmful_prompts", demo_prompts.HARMFUL_HELD_OUT),
        prompts("demo_benign", "benign_prompts", demo_prompts.BENIGN_HELD_OUT),
    ]


def spread(examples: list, limit: int | None) -> list:
    """Return at most `limit` of `examples`, evenly spaced over the list."""
    if limit is None or len(examples) <= limit:
        return list(examples)
    step = len(examples) / limit
    return [examples[int(i * step)] for i in range(limit)]


def load_set(spec: SetSpec, limit: int | None) -> EvalSet:
    """Load one set and keep at most `limit` rows, spread evenly over the set so that every part of it
    (categories are often stored in blocks) is represented."""
    examples = spread(load_source(spec.source), limit)
    if spec.role.endswith("_prompts"):
        examples = [dataclasses.replace(e, completion="") for e in examples]
    return EvalSet(spec.name, spec.role, tuple(examples))

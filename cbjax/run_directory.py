"""The training run directory: what may be trained into it, and what a resume must keep.

A run directory contains `config.yaml`, `metrics.jsonl` and `checkpoints/`. Training into one that
already contains a run needs `resume` (continue it) or `overwrite` (delete it first), so that a
forgotten flag never deletes checkpoints. A resume must keep the settings that shape the saved
state and the loss schedule, and it is checked against the run's `config.yaml` before any model
is loaded.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import yaml

from cbjax.config import Config

RUN_FILES = ("config.yaml", "metrics.jsonl", "checkpoints")
# Settings a resumed run must share with the run it continues: the adapters' shapes, the loss,
# the schedule (it depends on train.steps) and the random streams.
RESUME_SETTINGS = ("lora", "loss.target_layers", "train.steps", "train.seed")


def prepare(config: Config, *, resume: bool, overwrite: bool) -> None:
    """Raise if training would silently replace or wrongly continue the run in `train.output_dir`.

    With `overwrite`, delete the earlier run's files first (the demo's generated data stays).
    """
    output_dir = Path(config.train.output_dir)
    existing = [name for name in RUN_FILES if (output_dir / name).exists()]
    if not existing:
        return
    if overwrite:
        if jax.process_index() == 0:
            delete_run(output_dir)
        return
    if not resume:
        raise FileExistsError(
            f"{output_dir} already contains a training run ({', '.join(existing)}); pass --resume to "
            f"continue it, or --overwrite to delete it and start again"
        )
    check_resume_config(output_dir / "config.yaml", config)


def delete_run(output_dir: Path) -> None:
    for name in RUN_FILES:
        path = output_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def check_resume_config(saved_path: Path, config: Config) -> None:
    """Raise, listing every difference, if `config` changes a setting the saved run depends on."""
    if not saved_path.exists():
        return
    saved = yaml.safe_load(saved_path.read_text()) or {}
    current = config.to_dict()
    differences = []
    for setting in RESUME_SETTINGS:
        then, now = _plain(_lookup(saved, setting)), _plain(_lookup(current, setting))
        if isinstance(then, dict) and isinstance(now, dict):
            pairs = [(f"{setting}.{key}", then.get(key), now.get(key)) for key in sorted(then.keys() | now.keys())]
        else:
            pairs = [(setting, then, now)]
        differences += [f"{name} is {b} here but {a} in the run" for name, a, b in pairs if a != b]
    if differences:
        raise ValueError(
            f"cannot resume {saved_path.parent}: " + "; ".join(differences)
            + ". Use the run's settings, or start a new run in another train.output_dir"
        )


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop the records after `last_step` from metrics.jsonl, because the resumed run logs them again.

    A line cut short by a killed process is dropped too.
    """
    if jax.process_index() != 0 or not path.exists():
        return
    lines_to_keep = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("step", 0) <= last_step:
            lines_to_keep.append(line + "\n")
    temporary = path.with_suffix(".tmp")
    temporary.write_text("".join(lines_to_keep))
    temporary.replace(path)


def _lookup(tree: dict, dotted: str):
    node = tree
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _plain(value):
    """Return `value` with tuples as lists, so that values read from YAML compare equal."""
    return json.loads(json.dumps(value))

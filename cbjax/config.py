"""The training configuration: YAML files with dotted `key=value` overrides, validated up front."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from cbjax.data.config import DataConfig
from cbjax.lora import LoraConfig
from cbjax.losses import LossConfig
from cbjax.models.attention import ATTENTION_IMPLEMENTATIONS
from cbjax.models.remat import REMAT_POLICIES
from cbjax.optim import OptimConfig
from cbjax.sharding import MeshConfig

DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class ModelSection:
    # A Hugging Face directory, a hub id, a .gguf file, or "smollm2-135m-instruct" for the
    # project's fetched GGUF copy of SmolLM2-135M-Instruct.
    path: str = "smollm2-135m-instruct"
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention: str = "xla"  # xla, dot_product_attention, cudnn, splash
    remat: str = "none"  # none, full, dots

    def __post_init__(self):
        for field in ("dtype", "param_dtype"):
            if getattr(self, field) not in DTYPES:
                raise ValueError(f"model.{field} must be one of {DTYPES}, got {getattr(self, field)!r}")
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"model.attention must be one of {ATTENTION_IMPLEMENTATIONS}, got {self.attention!r}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"model.remat must be one of {tuple(REMAT_POLICIES)}, got {self.remat!r}")


@dataclasses.dataclass(frozen=True)
class TrainSection:
    steps: int = 150
    seed: int = 0
    accumulation_steps: int = 1
    log_every: int = 10
    validate_every: int = 50
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    output_dir: str = "runs/default"

    def __post_init__(self):
        if self.steps <= 0:
            raise ValueError(f"train.steps must be positive, got {self.steps}")
        if self.accumulation_steps <= 0:
            raise ValueError(f"train.accumulation_steps must be positive, got {self.accumulation_steps}")


@dataclasses.dataclass(frozen=True)
class DemoSection:
    # Generate the training data's completions with the base model from the project's own prompt
    # set, and print a before/after table at the end.
    enabled: bool = False
    use_shared_data: bool = False
    shared_data_dir: str = "../shared/data"
    max_new_tokens: int = 48
    table_max_new_tokens: int = 40
    # Add the harmful training requests answered with `refusal` to the retain mix.
    refusal_retain: bool = True
    refusal: str = "I'm sorry, but I can't help with that request."


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelSection = ModelSection()
    lora: LoraConfig = LoraConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainSection = TrainSection()
    mesh: MeshConfig = MeshConfig()
    demo: DemoSection = DemoSection()

    def __post_init__(self):
        if self.data.batch_size % self.train.accumulation_steps:
            raise ValueError(
                f"data.batch_size {self.data.batch_size} does not split into train.accumulation_steps "
                f"{self.train.accumulation_steps} micro-batches; use a multiple of it"
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _build(cls, values: Any, where: str):
    """Build dataclass `cls` from a dict, rejecting unknown keys and converting lists to tuples."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ValueError(f"config section {where or 'top level'!r} must be a mapping, got {type(values).__name__}")
    if hasattr(cls, "from_dict"):
        return cls.from_dict(values)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ValueError(f"unknown config key {key!r}; known keys there: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        key = f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(hint):
            value = _build(hint, value, key)
        else:
            value = _checked_value(hint, value, key)
        kwargs[name] = value
    return cls(**kwargs)


# Plain field types, the value types each accepts, and their name in errors.
PLAIN_TYPES = {int: ((int,), "an integer"), float: ((int, float), "a number"), bool: ((bool,), "true or false"),
               str: ((str,), "a string")}


def _checked_value(hint, value, key: str):
    """Return `value` for a field of type `hint`, lists as tuples, or raise naming `key`.

    Only plain types and tuples are checked; other hints are left to the section's own checks.
    """
    options = typing.get_args(hint) if _is_union(hint) else (hint,)
    if value is None and type(None) in options:
        return None
    if _is_tuple(hint):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config key {key!r} must be a list, got {value!r}")
        return tuple(value)
    plain = [option for option in options if option in PLAIN_TYPES]
    if not plain:
        return value
    for option in plain:
        accepted, _ = PLAIN_TYPES[option]
        # bool is a subclass of int, but `steps: true` is a mistake, not the number 1.
        if isinstance(value, accepted) and (option is bool or not isinstance(value, bool)):
            return float(value) if option is float else value
    expected = " or ".join(PLAIN_TYPES[option][1] for option in plain)
    raise ValueError(f"config key {key!r} must be {expected}, got {value!r}")


def _is_union(hint) -> bool:
    return isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union


def _is_tuple(hint) -> bool:
    if typing.get_origin(hint) is tuple:
        return True
    if _is_union(hint):
        return any(typing.get_origin(arg) is tuple for arg in typing.get_args(hint))
    return False


def apply_override(raw: dict, override: str) -> None:
    """Apply one `a.b.c=value` override; the value is parsed as YAML (numbers, lists, null)."""
    if "=" not in override:
        raise ValueError(f"override {override!r} must have the form key.subkey=value")
    key, text = override.split("=", 1)
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {override!r}: {part!r} is not a section")
    node[parts[-1]] = _parse_value(text)


def _parse_value(text: str):
    value = yaml.safe_load(text)
    # YAML 1.1 reads "2e-3" (no dot) as a string; a user typing it on the command line means a number.
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    raw: dict = {}
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"{path}: invalid YAML ({err})") from None
    for override in overrides:
        apply_override(raw, override)
    return config_from_dict(raw)


def config_from_dict(raw: dict) -> Config:
    return _build(Config, raw, "")

"""Configuration of the circuit-breaker data: where rows come from and how batches are shaped.

Both dataclasses are built from plain dicts (parsed YAML) by `from_dict`, which rejects unknown
keys so that a misspelt option fails loudly instead of silently keeping its default.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any


@dataclasses.dataclass(frozen=True)
class ColumnFilter:
    """Condition on one column: the value must be in `allowed` (when given) and start with none
    of `exclude_prefix`."""

    allowed: tuple[str, ...] | None = None
    exclude_prefix: tuple[str, ...] = ()

    def accepts(self, value: Any) -> bool:
        text = str(value)
        if self.allowed is not None and text not in self.allowed:
            return False
        return not any(text.startswith(prefix) for prefix in self.exclude_prefix)


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    """One set of (prompt, completion) rows.

    `path` is a local .json, .jsonl, .csv or .parquet file, or else a dataset id on the Hugging Face
    Hub, loaded with `subset` and `split`. `filter` maps a column to the condition its value must
    meet. `limit` keeps the first rows that pass the filter.
    """

    path: str
    split: str = "train"
    subset: str | None = None
    prompt_column: str = "prompt"
    completion_column: str = "completion"
    filter: dict[str, ColumnFilter] = dataclasses.field(default_factory=dict)
    limit: int | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any] | str, where: str = "source") -> SourceConfig:
        """Build from a dict of fields, or from a bare string that is the path."""
        if isinstance(data, str):
            data = {"path": data}
        fields = _check_keys(cls, data, where)
        if "path" not in fields:
            raise ValueError(f"{where}: missing key 'path' (a local data file or a Hub dataset id)")
        if "filter" in fields:
            fields["filter"] = _parse_filter(fields["filter"], f"{where}.filter")
        config = cls(**fields)
        if config.limit is not None and config.limit < 1:
            raise ValueError(f"{where}.limit must be a positive number of rows, got {config.limit}")
        return config


@dataclasses.dataclass(frozen=True)
class PlainTextTags:
    """Conversation layout for tokenizers without a chat template.

    A row reads `system + user + prompt + assistant + completion + separator`, where `separator`
    ends the assistant turn.
    """

    system: str = ""
    user: str = "User: "
    assistant: str = "\nAssistant: "
    separator: str = "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "plain_text_tags") -> PlainTextTags:
        return cls(**_check_keys(cls, data, where))


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Sets and batch layout of circuit-breaker training.

    A rerouting row is the request left-padded to `request_length` tokens followed by the
    response right-padded to `response_length` tokens. A retain row is the whole conversation
    right-padded to `retain_length` tokens. The retain batches draw from the mix of `retain`,
    `borderline_retain` and `refusal_retain`.

    The sets may be empty here, so that a config can be completed later (by the demo, for
    example). `CircuitBreakerData` raises when the rerouting set or the retain mix has no rows.

    `response_only_fraction` is the expected share of rerouting rows per epoch that carry the
    response without its request. `mask_shared_prefix` removes the system prompt and user tag
    from the rerouting loss mask. Validation rows are `num_validation` when given, else
    `validation_fraction` of the rerouting rows (at least one when the fraction is above zero).
    The same count is held out of the retain mix.
    """

    rerouting: list[SourceConfig] = dataclasses.field(default_factory=list)
    retain: list[SourceConfig] = dataclasses.field(default_factory=list)
    borderline_retain: list[SourceConfig] = dataclasses.field(default_factory=list)
    refusal_retain: list[SourceConfig] = dataclasses.field(default_factory=list)
    batch_size: int = 16
    request_length: int = 256
    response_length: int = 256
    retain_length: int = 512
    response_only_fraction: float = 0.0
    mask_shared_prefix: bool = False
    plain_text_tags: PlainTextTags = PlainTextTags()
    validation_fraction: float = 0.1
    num_validation: int | None = None
    seed: int = 0

    def __post_init__(self):
        for name in ("batch_size", "request_length", "response_length", "retain_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"data config: {name} must be a positive integer, got {value!r}")
        for name in ("response_only_fraction", "validation_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"data config: {name} must be in [0, 1), got {value!r}")
        if self.num_validation is not None and self.num_validation < 0:
            raise ValueError(f"data config: num_validation must be >= 0, got {self.num_validation}")
        if self.seed < 0:
            raise ValueError(f"data config: seed must be >= 0, got {self.seed}")

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "data config") -> DataConfig:
        fields = _check_keys(cls, data, where)
        for name in ("rerouting", "retain", "borderline_retain", "refusal_retain"):
            if name in fields:
                fields[name] = _parse_sources(fields[name], f"{where}.{name}")
        if "plain_text_tags" in fields:
            fields["plain_text_tags"] = PlainTextTags.from_dict(
                fields["plain_text_tags"], f"{where}.plain_text_tags"
            )
        return cls(**fields)

    def missing_files(self, local_suffixes: tuple[str, ...]) -> list[str]:
        """Return the paths of local data files (by suffix) that do not exist, in config order."""
        sources = self.rerouting + [source for group in self.retain_sets().values() for source in group]
        return [
            source.path for source in sources
            if Path(source.path).suffix.lower() in local_suffixes and not Path(source.path).exists()
        ]

    def retain_sets(self) -> dict[str, list[SourceConfig]]:
        """Return the source lists that make up the retain mix, by config key."""
        return {
            "retain": self.retain,
            "borderline_retain": self.borderline_retain,
            "refusal_retain": self.refusal_retain,
        }


def _check_keys(cls: type, data: Any, where: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping of keys to values, got {type(data).__name__}")
    known = [field.name for field in dataclasses.fields(cls)]
    for key in data:
        if key not in known:
            raise ValueError(f"{where}: unknown key {key!r}; expected one of {known}")
    return dict(data)


def _parse_sources(data: Any, where: str) -> list[SourceConfig]:
    if data is None:
        return []
    if not isinstance(data, list):
        raise ValueError(f"{where}: expected a list of sources, got {type(data).__name__}")
    return [SourceConfig.from_dict(item, f"{where}[{index}]") for index, item in enumerate(data)]


def _parse_filter(data: Any, where: str) -> dict[str, ColumnFilter]:
    """Parse `{column: [allowed values]}` or `{column: {allowed: [...], exclude_prefix: ...}}`."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping of column to allowed values, got {type(data).__name__}")
    filters = {}
    for column, condition in data.items():
        if isinstance(condition, dict):
            fields = _check_keys(ColumnFilter, condition, f"{where}.{column}")
            allowed = fields.get("allowed")
            filters[column] = ColumnFilter(
                allowed=None if allowed is None else _string_tuple(allowed),
                exclude_prefix=_string_tuple(fields.get("exclude_prefix", ())),
            )
        else:
            filters[column] = ColumnFilter(allowed=_string_tuple(condition))
    return filters


def _string_tuple(value: Any) -> tuple[str, ...]:
    if isinstance(value, (list, tuple)):
        return tuple(str(item) for item in value)
    return (str(value),)

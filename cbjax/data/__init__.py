"""Data for circuit-breaker training: sources, chat formatting and batches of rerouting and retain rows."""

from cbjax.data.batches import CircuitBreakerData
from cbjax.data.config import ColumnFilter, DataConfig, PlainTextTags, SourceConfig
from cbjax.data.sources import DataSourceError, Example, load_source

__all__ = [
    "CircuitBreakerData",
    "ColumnFilter",
    "DataConfig",
    "DataSourceError",
    "Example",
    "PlainTextTags",
    "SourceConfig",
    "load_source",
]

"""Checks of a training config against the model, the mesh and the data files.

They run before the model loads, which can take minutes for an 8B model, so that a mistake in the
config fails at once with a message that names the setting.
"""

from __future__ import annotations

from cbjax.config import Config
from cbjax.data.sources import LOCAL_SUFFIXES, DataSourceError


def check_target_layers(full_config, config: Config) -> None:
    for layer in config.loss.target_layers:
        full_config.check_layer(layer, "loss.target_layers entry")
        if layer == 0:
            raise ValueError("loss.target_layers entry 0 is the embedding output, which adapters cannot change")


def check_sequence_lengths(full_config, config: Config) -> None:
    """Reject rows longer than a model with learned positions (GPT-2) has positions for."""
    if full_config.family != "gpt2":
        return
    data = config.data
    rows = {
        "rerouting rows (data.request_length + data.response_length)": data.request_length + data.response_length,
        "retain rows (data.retain_length)": data.retain_length,
    }
    for row_kind, length in rows.items():
        if length > full_config.max_position_embeddings:
            raise ValueError(
                f"{row_kind} are {length} tokens long, but this GPT-2 model has "
                f"{full_config.max_position_embeddings} learned positions (n_positions); shorten them"
            )


def check_data_files(config: Config) -> None:
    """Raise before loading the model if a configured local data file does not exist."""
    missing = config.data.missing_files(LOCAL_SUFFIXES)
    if missing:
        raise DataSourceError(f"data file not found: {', '.join(missing)}")


def check_batch_split(config: Config, mesh) -> None:
    """Raise before loading if the batch rows cannot be spread evenly over the data-parallel devices."""
    groups = mesh.shape["data"] * mesh.shape["fsdp"]
    if config.data.batch_size % groups:
        raise ValueError(
            f"data.batch_size {config.data.batch_size} does not split over the {groups} data-parallel devices "
            f"of mesh {dict(mesh.shape)} (data x fsdp); use a multiple of {groups}"
        )

"""Load Hugging Face or GGUF weights into a cbjax model, strictly.

A tensor source is any object with `names()`, `shape(name)`, `get(name)` (a numpy array in the
Hugging Face layout) and `describe(name)` (file and tensor, for errors): `HFCheckpoint` for model
directories and `GGUFCheckpoint` for GGUF files.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from cbjax.models import abstract_model
from cbjax.models.config import ModelConfig, from_hf_config
from cbjax.weights.hf_checkpoint import HFCheckpoint, read_config, resolve_model_dir
from cbjax.weights.mapping import TensorSpec, is_built, is_ignored_buffer, tensor_specs
from cbjax.weights.safetensors_io import CheckpointError

logger = logging.getLogger(__name__)


class TensorSource(Protocol):
    def names(self) -> list[str]: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def get(self, name: str) -> np.ndarray: ...
    def describe(self, name: str) -> str: ...


@dataclasses.dataclass
class LoadedModel:
    model: nnx.Module
    config: ModelConfig
    hf_config: dict[str, Any]
    source: str


def check_keys(config: ModelConfig, source: TensorSource, specs: list[TensorSpec], origin: str) -> None:
    """Raise one error listing every missing and unexpected tensor."""
    expected = {spec.hf_name for spec in specs}
    present = set(source.names())
    missing = sorted(expected - present)
    unexpected = sorted(n for n in present - expected if not is_ignored_buffer(config, n))
    if missing or unexpected:
        lines = [f"{origin}: checkpoint does not match the {config.family} architecture"]
        if missing:
            lines.append(f"  missing tensors ({len(missing)}): {', '.join(missing[:20])}")
        if unexpected:
            lines.append(f"  unexpected tensors ({len(unexpected)}): {', '.join(unexpected[:20])}")
        raise CheckpointError("\n".join(lines))


def variable_at(model: nnx.Module, path) -> nnx.Variable:
    node = model
    for key in path:
        node = node[key] if isinstance(key, int) else getattr(node, key)
    return node


def load_weights(
    model: nnx.Module,
    source: TensorSource,
    config: ModelConfig,
    *,
    origin: str,
    sharding_for=None,
) -> nnx.Module:
    """Fill `model`'s parameters from `source`.

    When the model keeps fewer layers than the checkpoint has (layer dropping), the tensors of the
    dropped layers, the final norm and the LM head must still be present but are not read.
    `sharding_for(path, shape)` may return a `jax.sharding.Sharding` to place each tensor directly
    into its shards.
    """
    specs = tensor_specs(config, source.names())
    check_keys(config, source, specs, origin)

    to_read = [s for s in specs if is_built(config, s)]
    for spec in tqdm(to_read, desc="loading weights", disable=len(to_read) < 200, leave=False):
        variable = variable_at(model, spec.path)
        target = variable.get_value()
        array = source.get(spec.hf_name)
        if spec.transpose:
            array = array.T
        if tuple(array.shape) != tuple(target.shape):
            stored = source.shape(spec.hf_name)
            raise CheckpointError(
                f"{source.describe(spec.hf_name)} has shape {tuple(stored)}, but the model expects "
                f"{tuple(target.shape[::-1]) if spec.transpose else tuple(target.shape)} for "
                f"{'.'.join(map(str, spec.path))}"
            )
        sharding = sharding_for(spec.path, target.shape) if sharding_for else None
        variable.set_value(_to_device(array, target.dtype, sharding))
    return model


def _to_device(array: np.ndarray, dtype, sharding) -> jax.Array:
    if sharding is None:
        return jnp.asarray(np.asarray(array), dtype=dtype)
    return jax.make_array_from_callback(
        array.shape, sharding, lambda index: np.asarray(array[index]).astype(dtype)
    )


def directory_source(directory: Path) -> TensorSource:
    """Open a Hugging Face checkpoint directory, or an Orbax params directory from `convert/hf_to_orbax`."""
    # Imported here because the converters import this module.
    from cbjax.convert.orbax_params import OrbaxParams, is_params_dir

    return OrbaxParams(directory) if is_params_dir(directory) else HFCheckpoint(directory)


def peek_config(name_or_path: str | os.PathLike) -> ModelConfig:
    """Read only the architecture of a model directory, hub id or GGUF file."""
    path = Path(name_or_path)
    if path.suffix == ".gguf":
        from cbjax.weights.gguf_loader import GGUFCheckpoint

        return from_hf_config(GGUFCheckpoint(path).config(), source=str(path))
    directory = resolve_model_dir(str(name_or_path))
    return from_hf_config(read_config(directory), source=str(directory / "config.json"))


def load_model(
    name_or_path: str | os.PathLike,
    *,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    num_layers: int | None = None,
    sharding_for=None,
) -> LoadedModel:
    """Load a model from a Hugging Face directory, an Orbax params directory, a hub id, or a `.gguf` file.

    `num_layers` keeps only the first layers (layer dropping for training); the rest are never read.
    """
    path = Path(name_or_path)
    if path.suffix == ".gguf":
        from cbjax.weights.gguf_loader import GGUFCheckpoint

        source = GGUFCheckpoint(path)
        hf_config = source.config()
        origin = str(path)
    else:
        directory = resolve_model_dir(str(name_or_path))
        hf_config = read_config(directory)
        source = directory_source(directory)
        origin = str(directory)

    config = from_hf_config(hf_config, source=f"{origin} config")
    if num_layers is not None:
        config = config.with_layers(num_layers)
    model = abstract_model(config, dtype=dtype, param_dtype=param_dtype)
    load_weights(model, source, config, origin=origin, sharding_for=sharding_for)
    logger.info("loaded %s (%s, %d of %d layers)", origin, config.family, config.built_layers, config.num_layers)
    return LoadedModel(model, config, hf_config, origin)

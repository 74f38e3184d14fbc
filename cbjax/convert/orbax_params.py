"""Base-model parameters as an Orbax checkpoint: the layout written by `convert/hf_to_orbax`.

A params directory contains `params/`, an Orbax checkpoint of the model's `nnx.state` as the pure
dict that `nnx.to_pure_dict` returns, in cbjax layouts such as (in, out) kernels. Next to it are
`config.json`, `generation_config.json` when the source had one, and the tokenizer files. Arrays
keep the dtype they were saved in.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from cbjax.models import abstract_model
from cbjax.models.config import ModelConfig, from_hf_config
from cbjax.weights.hf_checkpoint import read_config
from cbjax.weights.load import LoadedModel, TensorSource, check_keys, load_weights, variable_at
from cbjax.weights.mapping import ParamPath, TensorSpec, tensor_specs
from cbjax.weights.safetensors_io import CheckpointError

PARAMS_DIR = "params"
# Show a progress bar from this many tensors on. SmolLM2-135M (30 layers, tied embeddings) has 272.
PROGRESS_MIN_TENSORS = 200


def is_params_dir(path: str | os.PathLike) -> bool:
    path = Path(path)
    return (path / PARAMS_DIR).is_dir() and (path / "config.json").is_file()


def params_from_tensors(source: TensorSource, config: ModelConfig, origin: str, dtype=None) -> dict:
    """Return the pure params dict with every tensor of `source`, in cbjax layout.

    Tensors keep their dtype unless `dtype` is given, which applies to floating-point tensors.
    Missing and unexpected tensors raise one `CheckpointError` that lists them.
    """
    specs = tensor_specs(config, source.names())
    check_keys(config, source, specs, origin)
    shapes = expected_shapes(config)
    params: dict = {}
    for spec in tqdm(specs, desc="reading tensors", disable=len(specs) < PROGRESS_MIN_TENSORS, leave=False):
        array = source.get(spec.hf_name)
        if spec.transpose:
            array = array.T
        check_shape(source, spec, array.shape, shapes)
        array = np.ascontiguousarray(array)
        if dtype is not None and np.issubdtype(array.dtype, np.floating):
            array = array.astype(dtype)
        _insert(params, spec.path, array)
    return params


def expected_shapes(config: ModelConfig) -> dict[ParamPath, tuple[int, ...]]:
    """Return the cbjax layout shape of every parameter of a model with `config`."""
    model = abstract_model(config)
    return {spec.path: tuple(variable_at(model, spec.path).get_value().shape) for spec in tensor_specs(config)}


def check_shape(source: TensorSource, spec: TensorSpec, shape: tuple[int, ...], shapes: dict) -> None:
    """Raise when `shape`, in cbjax layout, is not the shape the architecture expects for `spec`."""
    expected = shapes[spec.path]
    if tuple(shape) != expected:
        hf_expected = expected[::-1] if spec.transpose else expected
        raise CheckpointError(
            f"{source.describe(spec.hf_name)} has shape {tuple(source.shape(spec.hf_name))}, but the model config "
            f"expects {hf_expected}"
        )


def save_params(params: dict, directory: Path) -> None:
    """Write `params` to `directory/params` as an Orbax checkpoint."""
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save((directory / PARAMS_DIR).absolute(), params)
        checkpointer.wait_until_finished()


def restore_params(directory: str | os.PathLike) -> dict:
    """Read `directory/params` as numpy arrays in their saved dtypes; layer keys become ints again."""
    path = (Path(directory) / PARAMS_DIR).absolute()
    with ocp.StandardCheckpointer() as checkpointer:
        try:
            restored = checkpointer.restore(path)
        except (FileNotFoundError, ValueError) as err:
            raise CheckpointError(f"{path}: cannot read the Orbax checkpoint ({err})") from None
    return _int_keys(restored)


def flatten(tree: dict, prefix: ParamPath = ()) -> dict[ParamPath, np.ndarray]:
    """Return {path: leaf} for a nested dict."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, (*prefix, key)))
        else:
            flat[(*prefix, key)] = value
    return flat


class OrbaxParams:
    """A params directory as a tensor source, with Hugging Face names and layouts (see `cbjax.weights.load`)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.hf_config = read_config(self.directory)
        self.config = from_hf_config(self.hf_config, source=str(self.directory / "config.json"))
        flat = flatten(restore_params(self.directory))
        specs = tensor_specs(self.config)
        _check_paths(self.directory, self.config, flat, {spec.path for spec in specs})
        self._tensors = {spec.hf_name: (spec, flat[spec.path]) for spec in specs}

    def names(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        spec, array = self._tensors[name]
        return array.shape[::-1] if spec.transpose else array.shape

    def get(self, name: str) -> np.ndarray:
        spec, array = self._tensors[name]
        return array.T if spec.transpose else array

    def describe(self, name: str) -> str:
        spec, _ = self._tensors[name]
        return f"{self.directory / PARAMS_DIR}: parameter {'.'.join(map(str, spec.path))}"


def load_params_model(
    directory: str | os.PathLike, *, dtype=jnp.float32, param_dtype=jnp.float32, num_layers: int | None = None
) -> LoadedModel:
    """Build a cbjax model from a params directory, as `cbjax.weights.load.load_model` does from a checkpoint."""
    source = OrbaxParams(directory)
    config = source.config if num_layers is None else source.config.with_layers(num_layers)
    model = abstract_model(config, dtype=dtype, param_dtype=param_dtype)
    load_weights(model, source, config, origin=str(directory))
    return LoadedModel(model, config, source.hf_config, str(directory))


def _check_paths(directory: Path, config: ModelConfig, flat: dict, expected: set[ParamPath]) -> None:
    missing = sorted(".".join(map(str, p)) for p in expected - set(flat))
    unexpected = sorted(".".join(map(str, p)) for p in set(flat) - expected)
    if missing or unexpected:
        lines = [f"{directory / PARAMS_DIR}: parameters do not match the {config.family} architecture of config.json"]
        if missing:
            lines.append(f"  missing parameters ({len(missing)}): {', '.join(missing[:20])}")
        if unexpected:
            lines.append(f"  unexpected parameters ({len(unexpected)}): {', '.join(unexpected[:20])}")
        raise CheckpointError("\n".join(lines))


def _insert(tree: dict, path: ParamPath, value: np.ndarray) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _int_keys(tree):
    # Orbax stores dict keys as strings, but nnx indexes the layer list with ints.
    if not isinstance(tree, dict):
        return tree
    return {_int_key(key): _int_keys(value) for key, value in tree.items()}


def _int_key(key):
    return int(key) if isinstance(key, str) and key.isdigit() else key

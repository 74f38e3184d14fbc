"""Write Hugging Face model directories from params directories and training runs.

The output loads with `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained`:
the source's config.json (original architecture, full depth), generation config and tokenizer
files, and the weights as `model.safetensors`, or as shards with `model.safetensors.index.json`
when they exceed the shard size. A training run is merged into its base checkpoint: every tensor
without an adapter, including the layers above the highest target layer that training never
built, is copied from the base with its bits unchanged.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from cbjax.convert.orbax_params import PROGRESS_MIN_TENSORS, check_shape, expected_shapes, is_params_dir
from cbjax.convert.peft_export import export_peft
from cbjax.convert.run_adapters import is_training_run, lora_deltas
from cbjax.convert.sources import ModelSource, open_model_source
from cbjax.convert.staging import check_output, check_separate, staged_directory
from cbjax.weights.hf_checkpoint import INDEX_FILE, SINGLE_FILE
from cbjax.weights.load import check_keys
from cbjax.weights.mapping import ParamPath, tensor_specs
from cbjax.weights.safetensors_io import CheckpointError, save_file

logger = logging.getLogger(__name__)

SHARD_NAME = "model-{index:05d}-of-{count:05d}.safetensors"
# Units in either case: KB, MB and GB are powers of 1000, KiB, MiB and GiB powers of 1024.
SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
SIZE_PATTERN = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*")


def convert_to_hf(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    adapters_only: bool = False,
    max_shard_size: str = "5GB",
    step: int | None = None,
    base_model: str | None = None,
) -> Path:
    """Write `src`, a params directory or a training run, as the Hugging Face directory `out`.

    For a training run, `step` picks the checkpoint (default: the latest) and `base_model`
    replaces the base model recorded in its config.yaml. `adapters_only` writes a PEFT adapter
    instead of merged weights.
    """
    max_shard_bytes = parse_size(max_shard_size)
    check_separate(src, out)
    check_output(out, overwrite)
    if is_training_run(src):
        from cbjax.run import load_run

        run = load_run(src, step=step, model_path=base_model)
        base = open_model_source(run.model_path)
        check_separate(base.path, out)
        if adapters_only:
            return export_peft(run, base.config, out, overwrite=overwrite)
        logger.info("merging the adapters of %s (step %d) into %s", src, run.step, base.path)
        return export_model(base, out, deltas=lora_deltas(run), max_shard_bytes=max_shard_bytes, overwrite=overwrite)

    if not is_params_dir(src):
        raise ValueError(
            f"{src} is neither a params directory (params/ and config.json, as convert/hf_to_orbax writes) "
            "nor a training run (config.yaml and checkpoints/)"
        )
    if adapters_only or step is not None or base_model is not None:
        raise ValueError(
            f"{src} is a params directory, but --adapters-only, --step and --base-model need a training run"
        )
    return export_model(open_model_source(src), out, max_shard_bytes=max_shard_bytes, overwrite=overwrite)


def export_model(
    source: ModelSource,
    out: str | os.PathLike,
    *,
    deltas: dict[ParamPath, np.ndarray] | None = None,
    max_shard_bytes: int,
    overwrite: bool = False,
) -> Path:
    """Write the tensors of `source` as a Hugging Face directory, each kernel plus its entry in `deltas`.

    `deltas` maps kernel paths to (in, out) float32 arrays, as `run_adapters.lora_deltas` returns.
    """
    count = len(tensor_specs(source.config))
    with staged_directory(out, overwrite) as stage:
        write_shards(hf_tensors(source, deltas or {}), stage, max_shard_bytes, count)
        source.write_model_files(stage)
    return Path(out)


def hf_tensors(source: ModelSource, deltas: dict[ParamPath, np.ndarray]) -> Iterator[tuple[str, np.ndarray]]:
    """Yield each tensor under the name transformers' `save_pretrained` uses, merged with its delta if any.

    Tensors are read one at a time, so a memory-mapped source adds only the current shard to
    memory. A params directory is restored whole when opened.
    """
    config, tensors = source.config, source.tensors
    in_source = tensor_specs(config, tensors.names())
    check_keys(config, tensors, in_source, str(source.path))
    unknown = sorted(".".join(map(str, path)) for path in set(deltas) - {spec.path for spec in in_source})
    if unknown:
        raise CheckpointError(f"{source.path}: adapters on {unknown} have no weight in this {config.family} checkpoint")

    shapes = expected_shapes(config)
    for read_spec, write_spec in zip(in_source, tensor_specs(config)):
        array = tensors.get(read_spec.hf_name)
        check_shape(tensors, read_spec, array.T.shape if read_spec.transpose else array.shape, shapes)
        delta = deltas.get(read_spec.path)
        if delta is not None:
            # Merge in float32 and cast once to the base dtype, as `cbjax.lora.merge_lora` does.
            delta = delta.T if read_spec.transpose else delta
            if delta.shape != array.shape:
                raise CheckpointError(
                    f"{tensors.describe(read_spec.hf_name)} has shape {array.shape}, "
                    f"but its adapter delta has {delta.shape}"
                )
            array = (array.astype(np.float32) + delta).astype(array.dtype)
        yield write_spec.hf_name, array


def write_shards(
    tensors: Iterable[tuple[str, np.ndarray]], directory: Path, max_shard_bytes: int, count: int
) -> list[str]:
    """Write safetensors files of at most `max_shard_bytes` each (a larger tensor gets a file of its own).

    One file is `model.safetensors`; more are `model-0000i-of-0000n.safetensors` with an index.
    Returns the file names.
    """
    shards: list[list[str]] = []
    pending: dict[str, np.ndarray] = {}
    pending_bytes = total_bytes = 0
    progress = tqdm(tensors, total=count, desc="writing tensors", disable=count < PROGRESS_MIN_TENSORS, leave=False)
    for name, array in progress:
        if pending and pending_bytes + array.nbytes > max_shard_bytes:
            shards.append(_write_pending(pending, directory, len(shards)))
            pending, pending_bytes = {}, 0
        pending[name] = array
        pending_bytes += array.nbytes
        total_bytes += array.nbytes
    shards.append(_write_pending(pending, directory, len(shards)))
    return _name_shards(shards, directory, total_bytes)


def _write_pending(pending: dict[str, np.ndarray], directory: Path, index: int) -> list[str]:
    save_file(pending, directory / f".shard-{index}", metadata={"format": "pt"})
    return list(pending)


def _name_shards(shards: list[list[str]], directory: Path, total_bytes: int) -> list[str]:
    if len(shards) == 1:
        (directory / ".shard-0").rename(directory / SINGLE_FILE)
        return [SINGLE_FILE]
    weight_map = {}
    filenames = []
    for index, names in enumerate(shards):
        filename = SHARD_NAME.format(index=index + 1, count=len(shards))
        (directory / f".shard-{index}").rename(directory / filename)
        weight_map.update(dict.fromkeys(names, filename))
        filenames.append(filename)
    index_json = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index_json, indent=2) + "\n")
    return filenames


def parse_size(text: str | int) -> int:
    """Parse a shard size such as "5GB", "500MiB" or 1000000 (bytes) into bytes."""
    if isinstance(text, int):
        return text
    match = SIZE_PATTERN.fullmatch(text)
    unit = match.group(2).upper() if match else None
    if unit not in SIZE_UNITS or float(match.group(1)) <= 0:
        raise ValueError(f"invalid shard size {text!r}. Expected a positive size such as 5GB, 500MB or 2GiB")
    return int(float(match.group(1)) * SIZE_UNITS[unit])

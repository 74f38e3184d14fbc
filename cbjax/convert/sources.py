"""Open any model checkpoint the converters read: Hugging Face directory or hub id, GGUF file, params directory."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

from cbjax.convert.model_files import copy_model_files, write_gguf_model_files
from cbjax.convert.orbax_params import OrbaxParams, is_params_dir
from cbjax.convert.torch_bin import TorchBinCheckpoint, has_torch_weights
from cbjax.models.config import ModelConfig, from_hf_config
from cbjax.weights.hf_checkpoint import INDEX_FILE, SINGLE_FILE, HFCheckpoint, read_config, resolve_model_dir
from cbjax.weights.load import TensorSource
from cbjax.weights.safetensors_io import CheckpointError

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class ModelSource:
    """Tensors with Hugging Face names and layouts, the architecture, and where the other model files come from."""

    tensors: TensorSource
    config: ModelConfig
    hf_config: dict[str, Any]
    # A directory (Hugging Face or params directory) or a .gguf file.
    path: Path

    @property
    def is_gguf(self) -> bool:
        return self.path.suffix == ".gguf"

    def write_model_files(self, out: Path, dtype: str | None = None) -> None:
        """Write config.json, generation_config.json and the tokenizer files into `out`.

        `dtype` is the torch dtype name of the weights written, when it differs from the source's.
        GGUF tensors are dequantized to float32, so a GGUF source records float32 by default.
        """
        if self.is_gguf:
            write_gguf_model_files(self.path, out, dtype or "float32")
        else:
            copy_model_files(self.path, out, dtype)


def open_model_source(name_or_path: str | os.PathLike) -> ModelSource:
    """Open a .gguf file, a params directory, or a Hugging Face directory or hub id."""
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        from cbjax.weights.gguf_loader import GGUFCheckpoint

        tensors = GGUFCheckpoint(path)
        hf_config = tensors.config()
        return ModelSource(tensors, from_hf_config(hf_config, source=str(path)), hf_config, path)
    if is_params_dir(path):
        tensors = OrbaxParams(path)
        return ModelSource(tensors, tensors.config, tensors.hf_config, path)

    directory = resolve_model_dir(str(name_or_path))
    hf_config = read_config(directory)
    config = from_hf_config(hf_config, source=str(directory / "config.json"))
    return ModelSource(open_hf_weights(directory, str(name_or_path)), config, hf_config, directory)


def open_hf_weights(directory: Path, name_or_path: str) -> TensorSource:
    """Return the safetensors of `directory`, or else its `pytorch_model.bin` files."""
    if (directory / INDEX_FILE).exists() or (directory / SINGLE_FILE).exists():
        return HFCheckpoint(directory)
    if not has_torch_weights(directory) and not Path(name_or_path).expanduser().exists():
        directory = _download_torch_weights(name_or_path)
    if has_torch_weights(directory):
        return TorchBinCheckpoint(directory)
    # HFCheckpoint raises the error that names the weight files it looked for.
    return HFCheckpoint(directory)


def _download_torch_weights(hub_id: str) -> Path:
    # `resolve_model_dir` downloads safetensors only, so fetch the .bin files of older repositories here.
    # NOTE: untested against the hub, because the tests run offline.
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    logger.info("%s has no safetensors, so downloading its pytorch_model.bin files", hub_id)
    try:
        return Path(snapshot_download(hub_id, allow_patterns=["pytorch_model*.bin", "pytorch_model.bin.index.json"]))
    except (HfHubHTTPError, OSError) as err:
        raise CheckpointError(f"cannot download the pytorch_model.bin files of {hub_id!r}: {err}") from None

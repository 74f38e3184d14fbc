"""The tensors of a Hugging Face model directory: `model.safetensors` or a sharded index."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from cbjax.weights.safetensors_io import CheckpointError, SafetensorsFile

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TORCH_FILE = "pytorch_model.bin"


class HFCheckpoint:
    """A tensor source over a local directory; tensors are memory-mapped when read."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.files: dict[str, SafetensorsFile] = {}
        self.location: dict[str, str] = {}
        index = self.directory / INDEX_FILE
        single = self.directory / SINGLE_FILE
        if index.exists():
            self._open_index(index)
        elif single.exists():
            self._open_file(SINGLE_FILE)
        elif (self.directory / TORCH_FILE).exists():
            raise CheckpointError(
                f"{self.directory}: only {TORCH_FILE} found; convert it with convert/hf_to_orbax, "
                "which reads .bin files when torch is installed"
            )
        else:
            raise CheckpointError(f"{self.directory}: no {SINGLE_FILE} or {INDEX_FILE} found")

    def _open_index(self, index: Path) -> None:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise CheckpointError(f"{index}: invalid index file ({err})") from None
        for filename in sorted(set(weight_map.values())):
            if not (self.directory / filename).exists():
                names = [n for n, f in weight_map.items() if f == filename]
                raise CheckpointError(
                    f"{index} names missing file {filename} (holding {len(names)} tensors, e.g. {names[0]})"
                )
            self._open_file(filename)
        for name, filename in weight_map.items():
            if name not in self.files[filename].entries:
                raise CheckpointError(f"{index} places tensor {name!r} in {filename}, which does not contain it")
            self.location[name] = filename

    def _open_file(self, filename: str) -> None:
        shard = SafetensorsFile(self.directory / filename)
        self.files[filename] = shard
        for name in shard.names():
            self.location.setdefault(name, filename)

    def names(self) -> list[str]:
        return list(self.location)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.files[self.location[name]].shape(name)

    def get(self, name: str) -> np.ndarray:
        return self.files[self.location[name]].get(name)

    def describe(self, name: str) -> str:
        return f"{self.directory / self.location[name]}: tensor {name!r}"


def read_config(directory: str | os.PathLike) -> dict:
    path = Path(directory) / "config.json"
    if not path.exists():
        raise CheckpointError(f"{directory}: config.json not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: invalid JSON ({err})") from None


def resolve_model_dir(name_or_path: str) -> Path:
    """Return a local directory for a path or a hub id, downloading config, tokenizer and safetensors.

    Downloads go through `huggingface_hub` (transformers' own download path and cache).
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    if "/" not in name_or_path or name_or_path.startswith((".", "/")):
        raise CheckpointError(f"model directory {name_or_path} not found")

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = ["config.json", "generation_config.json", "*.safetensors", INDEX_FILE, "tokenizer*", "special_tokens_map.json", "*.model", "chat_template*"]
    try:
        return Path(snapshot_download(name_or_path, allow_patterns=patterns))
    except LocalEntryNotFoundError:
        raise CheckpointError(
            f"cannot download {name_or_path!r}: the Hugging Face hub is not reachable and the model is not in "
            "the local cache; download it where there is network, or pass a local directory"
        ) from None
    except (HfHubHTTPError, OSError) as err:
        raise CheckpointError(f"cannot download {name_or_path!r} from the Hugging Face hub: {err}") from None

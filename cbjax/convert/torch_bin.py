"""`pytorch_model.bin` checkpoints, single or sharded, as a tensor source (needs torch).

Files are read with `torch.load(weights_only=True)`, which unpickles only tensors and plain
containers, so a checkpoint cannot run code. Tensors become numpy arrays with the same bits:
bfloat16, which numpy lacks, goes through an int16 view into `ml_dtypes.bfloat16`.
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np

from cbjax.weights.safetensors_io import CheckpointError

TORCH_FILE = "pytorch_model.bin"
TORCH_INDEX_FILE = "pytorch_model.bin.index.json"


def has_torch_weights(directory: Path) -> bool:
    return (directory / TORCH_FILE).exists() or (directory / TORCH_INDEX_FILE).exists()


class TorchBinCheckpoint:
    def __init__(self, directory: str | os.PathLike):
        try:
            import torch  # noqa: F401
        except ImportError:
            raise CheckpointError(
                f"{directory}: reading {TORCH_FILE} needs torch, which is not installed. Install torch "
                "or convert the checkpoint to safetensors"
            ) from None
        self.directory = Path(directory)
        self.tensors: dict = {}
        self.location: dict[str, str] = {}
        index = self.directory / TORCH_INDEX_FILE
        if not index.exists():
            self._load(TORCH_FILE)
            return
        weight_map = _read_weight_map(index)
        for filename in sorted(set(weight_map.values())):
            self._load(filename)
        for name, filename in weight_map.items():
            if self.location.get(name) != filename:
                raise CheckpointError(f"{index} places tensor {name!r} in {filename}, which does not contain it")

    def _load(self, filename: str) -> None:
        import torch

        path = self.directory / filename
        if not path.exists():
            raise CheckpointError(f"{self.directory}: {filename} not found")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as err:
            raise CheckpointError(f"{path}: cannot read the PyTorch checkpoint, it may be truncated ({err})") from None
        if not isinstance(state, dict):
            raise CheckpointError(f"{path}: expected a dict of tensors, found {type(state).__name__}")
        for name, tensor in state.items():
            self.tensors[name] = tensor
            self.location[name] = filename

    def names(self) -> list[str]:
        return list(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)

    def get(self, name: str) -> np.ndarray:
        import torch

        tensor = self.tensors[name].detach().contiguous()
        if tensor.dtype == torch.bfloat16:
            return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return tensor.numpy()

    def describe(self, name: str) -> str:
        return f"{self.directory / self.location[name]}: tensor {name!r}"


def _read_weight_map(index: Path) -> dict[str, str]:
    try:
        return json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError) as err:
        raise CheckpointError(f"{index}: invalid index file ({err})") from None

"""Llama-architecture GGUF files as a tensor source with Hugging Face names, layouts and config.

GGUF stores each tensor's dimensions innermost first, so a Hugging Face `nn.Linear` weight of shape
(out, in) is listed as [in, out]. `GGUFReader` already presents the data row-major as (out, in).
Quantized tensors are dequantized to float32 with `gguf.quants.dequantize` on each `get`.

llama.cpp's `convert_hf_to_gguf.py` reorders the rows of every head of the q and k projections:
Hugging Face rotates the two halves of a head (`rotate_half`), llama.cpp rotates adjacent pairs.
`GGUFCheckpoint.get` reverses that, so its q and k weights equal the Hugging Face checkpoint's.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from cbjax.weights.gguf_rope import llama3_scaling_from_factors
from cbjax.weights.safetensors_io import CheckpointError

# llama.cpp tensor names (per block: `blk.N.<name>`) and their Hugging Face `LlamaForCausalLM` names.
GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
BLOCK_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Rope frequency factors: configuration stored as a tensor, read by `gguf_config`, not a weight.
ROPE_FACTORS = "rope_freqs.weight"
BLOCK_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
GLOBAL_NAME = re.compile(r"(\w+)\.(weight|bias)")

# `llama.*` metadata keys and the `LlamaConfig` fields they set.
LLAMA_KEYS = {
    "vocab_size": "vocab_size",
    "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size",
    "block_count": "num_hidden_layers",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "rope.freq_base": "rope_theta",
    "context_length": "max_position_embeddings",
}
TOKEN_ID_KEYS = {
    "tokenizer.ggml.bos_token_id": "bos_token_id",
    "tokenizer.ggml.eos_token_id": "eos_token_id",
    "tokenizer.ggml.padding_token_id": "pad_token_id",
    "tokenizer.ggml.unknown_token_id": "unk_token_id",
}
REQUIRED_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def open_gguf(path: str | os.PathLike) -> gguf.GGUFReader:
    """Open `path` with `gguf.GGUFReader`, turning its parse errors into a `CheckpointError`."""
    path = Path(path)
    try:
        return gguf.GGUFReader(path)
    except (ValueError, IndexError) as err:
        # GGUFReader reports a short file as a failed reshape or an index past the end.
        size = path.stat().st_size
        raise CheckpointError(f"{path}: not a valid GGUF file, or truncated ({size} bytes): {err}") from None


def gguf_config(reader_or_path: gguf.GGUFReader | str | os.PathLike) -> dict[str, Any]:
    """Build a Hugging Face `LlamaConfig`-style dict from the `llama.*` metadata of a GGUF file.

    Raises `ValueError` when `general.architecture` is not `llama`, when a required key is missing, or
    when the file's per-frequency rope factors follow no llama3 rope scaling (see `cbjax.weights.gguf_rope`).
    """
    reader = reader_or_path if isinstance(reader_or_path, gguf.GGUFReader) else open_gguf(reader_or_path)
    path = Path(reader.data.filename)
    architecture = _field(reader, "general.architecture")
    if architecture != "llama":
        raise ValueError(f"{path}: GGUF architecture {architecture!r} is not supported; expected 'llama'")

    config: dict[str, Any] = {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    for key, field in LLAMA_KEYS.items():
        value = _field(reader, f"llama.{key}")
        if value is not None:
            config[field] = value
    missing = [field for field in REQUIRED_FIELDS if field not in config]
    if missing:
        raise ValueError(f"{path}: GGUF metadata is missing the llama.* keys for {missing}")

    tensor_names = {tensor.name for tensor in reader.tensors}
    if "vocab_size" not in config:
        config["vocab_size"] = int(_tensor(reader, "token_embd.weight").shape[-1])
    config.setdefault("num_key_value_heads", config["num_attention_heads"])
    config["head_dim"] = _head_dim(reader, config)
    config["tie_word_embeddings"] = "output.weight" not in tensor_names
    for key, field in TOKEN_ID_KEYS.items():
        value = _field(reader, key)
        if value is not None:
            config[field] = value

    rope_scaling = _rope_scaling(reader)
    if ROPE_FACTORS in tensor_names:
        rope_scaling = llama3_scaling_from_factors(
            path,
            _tensor(reader, ROPE_FACTORS).data,
            float(config.get("rope_theta", 10000.0)),
            config["head_dim"],
            _field(reader, "llama.rope.scaling.original_context_length"),
        )
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling
    return config


class GGUFCheckpoint:
    """A Llama GGUF file read lazily, with tensors named and laid out as in Hugging Face checkpoints."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._reader = open_gguf(self.path)
        self._config = gguf_config(self._reader)
        self._tensors = {
            hf_tensor_name(self.path, tensor.name): tensor for tensor in self._reader.tensors if tensor.name != ROPE_FACTORS
        }

    def names(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(dim) for dim in reversed(self._lookup(name).shape))

    def describe(self, name: str) -> str:
        return f"{self.path}: tensor {self._lookup(name).name}"

    def config(self) -> dict[str, Any]:
        return dict(self._config)

    def get(self, name: str) -> np.ndarray:
        """Return the tensor `name` dequantized to a new float32 array, in Hugging Face layout."""
        tensor = self._lookup(name)
        try:
            weights = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError as err:
            raise CheckpointError(f"{self.describe(name)}: {err}") from None
        weights = np.array(weights, dtype=np.float32).reshape(self.shape(name))

        if ".attn_q." in tensor.name:
            weights = self._unpermute_rope_rows(name, weights, self._config["num_attention_heads"])
        elif ".attn_k." in tensor.name:
            weights = self._unpermute_rope_rows(name, weights, self._config["num_key_value_heads"])
        return weights

    def _unpermute_rope_rows(self, name: str, weights: np.ndarray, num_heads: int) -> np.ndarray:
        # With head size d, llama.cpp's row h*d + 2*i + j is Hugging Face's row h*d + j*d/2 + i.
        # The converter reorders the bias of a q or k projection the same way.
        rows = weights.shape[0]
        if rows % (2 * num_heads):
            raise CheckpointError(f"{self.describe(name)}: {rows} rows do not split into {num_heads} heads")
        pairs = weights.reshape(num_heads, rows // num_heads // 2, 2, *weights.shape[1:])
        return np.ascontiguousarray(pairs.swapaxes(1, 2)).reshape(weights.shape)

    def _lookup(self, name: str) -> gguf.ReaderTensor:
        try:
            return self._tensors[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {name!r}") from None


def hf_tensor_name(path: Path, gguf_name: str) -> str:
    """Map a llama.cpp tensor name such as `blk.3.attn_q.weight` to `model.layers.3.self_attn.q_proj.weight`."""
    if match := BLOCK_NAME.fullmatch(gguf_name):
        layer, module, kind = match.groups()
        if module in BLOCK_TENSORS:
            return f"model.layers.{layer}.{BLOCK_TENSORS[module]}.{kind}"
    elif match := GLOBAL_NAME.fullmatch(gguf_name):
        module, kind = match.groups()
        if module in GLOBAL_TENSORS:
            return f"{GLOBAL_TENSORS[module]}.{kind}"
    raise CheckpointError(f"{path}: tensor {gguf_name!r} has no Hugging Face Llama equivalent")


def load_tokenizer_from_gguf(path: str | os.PathLike):
    """Build the Hugging Face tokenizer stored in a GGUF file's `tokenizer.*` metadata."""
    from transformers import AutoTokenizer

    path = Path(path)
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def _field(reader: gguf.GGUFReader, key: str) -> Any:
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def _tensor(reader: gguf.GGUFReader, name: str) -> gguf.ReaderTensor:
    for tensor in reader.tensors:
        if tensor.name == name:
            return tensor
    raise ValueError(f"{reader.data.filename}: GGUF file has no tensor {name!r}")


def _head_dim(reader: gguf.GGUFReader, config: dict[str, Any]) -> int:
    # llama.attention.key_length is optional, and for Llama the rotary dimension is the whole head.
    for key in ("llama.attention.key_length", "llama.rope.dimension_count"):
        value = _field(reader, key)
        if value is not None:
            return int(value)
    return config["hidden_size"] // config["num_attention_heads"]


def _rope_scaling(reader: gguf.GGUFReader) -> dict[str, Any] | None:
    rope_type = _field(reader, "llama.rope.scaling.type")
    if rope_type in (None, "none"):
        return None
    scaling: dict[str, Any] = {"rope_type": rope_type}
    factor = _field(reader, "llama.rope.scaling.factor")
    if factor is not None:
        scaling["factor"] = factor
    original_length = _field(reader, "llama.rope.scaling.original_context_length")
    if original_length is not None:
        scaling["original_max_position_embeddings"] = original_length
    return scaling

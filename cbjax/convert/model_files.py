"""The files of a Hugging Face model directory besides the weights: config, generation config, tokenizer."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from cbjax.weights.gguf_loader import gguf_config, load_tokenizer_from_gguf, open_gguf

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
GGUF_TOKENS_KEY = "tokenizer.ggml.tokens"
GENERATION_CONFIG_FILE = "generation_config.json"
# Files that transformers' tokenizers read or write (fast and slow tokenizers, chat templates).
TOKENIZER_PATTERNS = (
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "*.model",
    "chat_template*",
)


def copy_model_files(source: Path, out: Path, dtype: str | None = None) -> list[str]:
    """Copy config.json, generation_config.json and the tokenizer files; return the names copied.

    `dtype` (a torch dtype name such as "bfloat16") replaces the dtype recorded in config.json,
    because transformers 5 loads weights in that dtype by default. Without it the config is
    copied byte for byte.
    """
    if dtype is None:
        shutil.copyfile(source / CONFIG_FILE, out / CONFIG_FILE)
    else:
        write_config_dtype(source / CONFIG_FILE, out / CONFIG_FILE, dtype)
    copied = [CONFIG_FILE]
    names = [GENERATION_CONFIG_FILE] + sorted({p.name for pattern in TOKENIZER_PATTERNS for p in source.glob(pattern)})
    for name in names:
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)
            copied.append(name)
    return copied


def write_config_dtype(source: Path, out: Path, dtype: str) -> None:
    config = json.loads(source.read_text())
    config["dtype"] = dtype
    # transformers 4 wrote the field as torch_dtype, so keep both in step when it is present.
    if "torch_dtype" in config:
        config["torch_dtype"] = dtype
    out.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_gguf_model_files(gguf_path: Path, out: Path, dtype: str = "float32") -> None:
    """Write config.json, generation_config.json and the tokenizer of a Llama GGUF file.

    The config is `cbjax.weights.gguf_loader.gguf_config` as a `LlamaConfig`, so transformers and
    cbjax read the same architecture. The tokenizer is transformers' GGUF tokenizer, saved with
    `save_pretrained`. A GGUF file without a tokenizer (no `tokenizer.ggml.tokens`) gives a
    directory without one, and a warning.
    """
    from transformers import GenerationConfig, LlamaConfig

    reader = open_gguf(gguf_path)
    fields = {key: value for key, value in gguf_config(reader).items() if key != "model_type"}
    config = LlamaConfig(**fields, dtype=dtype)
    config.save_pretrained(out)
    GenerationConfig.from_model_config(config).save_pretrained(out)
    if GGUF_TOKENS_KEY in reader.fields:
        load_tokenizer_from_gguf(gguf_path).save_pretrained(out)
    else:
        logger.warning(
            "%s has no tokenizer (%s is missing), so %s gets no tokenizer files", gguf_path, GGUF_TOKENS_KEY, out
        )

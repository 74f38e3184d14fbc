"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file; downloaded once into the cbjax cache when absent."""
    from cbjax.fetch import FetchError, smollm2_gguf_path

    try:
        return smollm2_gguf_path()
    except FetchError as err:
        pytest.skip(f"SmolLM2-135M-Instruct GGUF is not cached and could not be downloaded: {err}")


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_gguf: Path):
    """The SmolLM2-135M-Instruct tokenizer with its chat template, loaded from the GGUF file."""
    from cbjax.tokenizer import load_tokenizer

    return load_tokenizer(str(smollm2_gguf))

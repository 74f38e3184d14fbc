"""Checkpoint variants and the forward comparison shared by the GPT-2 and Mistral parity tests."""

from __future__ import annotations

import copy
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import torch

from cbjax.weights.hf_checkpoint import INDEX_FILE, SINGLE_FILE
from cbjax.weights.safetensors_io import SafetensorsFile, save_file
from tests.hf_reference import hf_forward, max_abs_diff_on_valid

TOLERANCE = 1e-4


def perturb_norms_and_biases(hf_model, seed: int = 0) -> None:
    """Move norm weights off 1 and biases off 0, so that a misplaced one changes the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in hf_model.named_parameters():
            if "norm" in name or "ln" in name or name.endswith("bias"):
                param.add_(0.1 * torch.randn(param.shape, generator=generator))


def save_variant(hf_model, directory: Path, variant: str):
    """Save `hf_model` as `variant` and return (directory, the transformers model it equals)."""
    if variant == "single":
        hf_model.save_pretrained(directory)
        return str(directory), hf_model
    if variant == "sharded":
        hf_model.save_pretrained(directory, max_shard_size="50KB")
        assert (directory / INDEX_FILE).exists(), "max_shard_size=50KB did not shard the tiny model"
        return str(directory), hf_model
    if variant == "bf16":
        # The reference is the bf16 weights in fp32, so the loader's upcast is checked at fp32 tolerance.
        low = copy.deepcopy(hf_model).to(torch.bfloat16)
        low.save_pretrained(directory)
        return str(directory), low.to(torch.float32)
    raise ValueError(f"unknown checkpoint variant {variant!r}")


def rewrite_checkpoint(directory: Path, *, drop: tuple[str, ...] = (), add: dict[str, np.ndarray] | None = None):
    """Rewrite a single-file checkpoint without the `drop` tensors and with the `add` ones."""
    path = directory / SINGLE_FILE
    source = SafetensorsFile(path)
    tensors = {name: np.array(source.get(name)) for name in source.names() if name not in drop}
    tensors.update(add or {})
    del source
    save_file(tensors, path, metadata={"format": "pt"})


def compare_with_transformers(model, hf_model, ids, mask, positions) -> dict[str, float]:
    """Assert that every hidden state and the logits match on real tokens; return the max abs diffs."""
    expected_logits, expected_hidden = hf_forward(hf_model, ids, mask, positions)
    out = model(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(positions))

    assert len(out.hidden_states) == len(expected_hidden)
    diffs = {}
    for layer, (ours, theirs) in enumerate(zip(out.hidden_states, expected_hidden)):
        diff = max_abs_diff_on_valid(ours, theirs, mask)
        assert diff < TOLERANCE, f"hidden state {layer}: max abs diff {diff:.2e}"
        diffs[f"hidden {layer}"] = diff
    diffs["logits"] = max_abs_diff_on_valid(out.logits, expected_logits, mask)
    assert diffs["logits"] < TOLERANCE, f"logits: max abs diff {diffs['logits']:.2e}"
    return diffs

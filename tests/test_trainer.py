"""The training loop on a tiny random Llama: metrics, checkpoints, exact resume, config errors."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from cbjax import preflight, trainer
from cbjax.config import config_from_dict, load_config
from tests.hf_reference import save_tiny_model
from tests.test_data import data_config, make_tokenizer
from tests.test_llama_parity import tiny_llama


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny_llama")
    return save_tiny_model(tiny_llama(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False), directory)


def run_config(tmp_path, model_dir, output: str, **train):
    data = data_config(tmp_path, validation_fraction=0.0, num_validation=2)
    raw = {
        "model": {"path": model_dir},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.05},
        "loss": {"target_layers": [1, 2], "alpha": 10.0},
        "optim": {"learning_rate": 3e-3},
        "data": {
            "rerouting": [s.path for s in data.rerouting],
            "retain": [s.path for s in data.retain],
            "batch_size": 4, "request_length": 16, "response_length": 8, "retain_length": 24, "num_validation": 2,
        },
        "train": {"steps": 6, "log_every": 1, "validate_every": 3, "checkpoint_every": 3,
                  "output_dir": str(tmp_path / output), **train},
    }
    return config_from_dict(raw)


def run(config, **kwargs):
    setup = trainer.build_setup(config, tokenizer=make_tokenizer())
    return trainer.train(config, setup=setup, **kwargs)


def test_resume_is_bit_identical(tmp_path, tiny_model_dir):
    straight = run(run_config(tmp_path, tiny_model_dir, "straight"))

    interrupted_config = run_config(tmp_path, tiny_model_dir, "interrupted")
    run(interrupted_config, stop_after=3)
    metrics = tmp_path / "interrupted" / "metrics.jsonl"
    # A run killed after logging step 4, before its next checkpoint, and in the middle of a line.
    with open(metrics, "a") as f:
        f.write(json.dumps({"step": 4, "loss": 1.0}) + "\n" + '{"step": 5, "lo')
    resumed = run(interrupted_config, resume=True)

    for a, b in zip(jax.tree.leaves(straight["adapters"]), jax.tree.leaves(resumed["adapters"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert resumed["step"] == straight["step"] == 6
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_existing_run_needs_resume_or_overwrite(tmp_path, tiny_model_dir):
    config = run_config(tmp_path, tiny_model_dir, "out", steps=3)
    run(config)
    checkpoints = sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir())

    with pytest.raises(FileExistsError, match="already contains a training run .* --resume .* --overwrite"):
        trainer.train(config, setup=None)
    assert sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir()) == checkpoints

    run(config, overwrite=True)
    steps = [json.loads(line)["step"] for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_resume_with_changed_settings_rejected(tmp_path, tiny_model_dir):
    config = run_config(tmp_path, tiny_model_dir, "out", steps=3)
    run(config)
    saved = (tmp_path / "out" / "config.yaml").read_text()
    changed = config_from_dict({**_raw(config), "lora": {"r": 8, "alpha": 8, "dropout": 0.05},
                                "train": {**_raw(config)["train"], "steps": 5}})

    with pytest.raises(ValueError, match=r"cannot resume .*: lora.r is 8 here but 4 in the run; train.steps is 5 here but 3 in the run\."):
        trainer.train(changed, resume=True, setup=None)
    assert (tmp_path / "out" / "config.yaml").read_text() == saved


def test_run_directory_contents(tmp_path, tiny_model_dir):
    config = run_config(tmp_path, tiny_model_dir, "out")
    run(config)
    out = tmp_path / "out"

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "rerouting_loss", "retain_loss", "rerouting_coeff", "retain_coeff",
                "rerouting_cosine", "retain_cosine", "tokens_per_second", "step_time"):
        assert key in records[-1]
    assert "val_rerouting_cosine" in records[2]
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == ["3", "6"]
    reloaded = load_config(out / "config.yaml")
    assert reloaded.loss.target_layers == (1, 2)


def test_target_layer_beyond_depth_rejected(tmp_path, tiny_model_dir):
    config = run_config(tmp_path, tiny_model_dir, "bad")
    bad = config_from_dict({**_raw(config), "loss": {"target_layers": [1, 4]}})
    with pytest.raises(ValueError, match="loss.target_layers entry 4 is out of range: this llama model has 3 layers"):
        trainer.build_setup(bad, tokenizer=make_tokenizer())


def test_lora_layer_above_targets_rejected(tmp_path, tiny_model_dir):
    config = run_config(tmp_path, tiny_model_dir, "bad")
    bad = config_from_dict({**_raw(config), "lora": {"r": 4, "layers": [0, 2]}})
    with pytest.raises(ValueError, match="lora.layers contains 2"):
        trainer.build_setup(bad, tokenizer=make_tokenizer())


def test_empty_data_rejected(tmp_path, tiny_model_dir):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    config = run_config(tmp_path, tiny_model_dir, "bad")
    raw = _raw(config)
    raw["data"]["rerouting"] = [str(empty)]
    with pytest.raises(ValueError, match="empty"):
        trainer.build_setup(config_from_dict(raw), tokenizer=make_tokenizer())


def test_unknown_config_key_rejected():
    with pytest.raises(ValueError, match="unknown config key 'loss.target_layer'"):
        config_from_dict({"loss": {"target_layer": [10]}})
    with pytest.raises(ValueError, match="unknown config key 'trian'"):
        config_from_dict({"trian": {}})


def test_nonpositive_rank_rejected():
    with pytest.raises(ValueError, match="lora.r must be a positive integer, got 0"):
        config_from_dict({"lora": {"r": 0}})


def test_overrides_parse_yaml_values(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("loss:\n  target_layers: [10, 20]\n")
    config = load_config(path, ["loss.target_layers=[3, 5]", "train.steps=7", "optim.learning_rate=2e-3"])
    assert config.loss.target_layers == (3, 5)
    assert config.train.steps == 7
    assert config.optim.learning_rate == 2e-3


def _raw(config):
    raw = config.to_dict()
    raw["data"] = {
        "rerouting": [s["path"] for s in raw["data"]["rerouting"]],
        "retain": [s["path"] for s in raw["data"]["retain"]],
        "batch_size": 4, "request_length": 16, "response_length": 8, "retain_length": 24, "num_validation": 2,
    }
    raw["demo"] = {}
    return raw


def test_tokenizer_without_files_rejected(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from cbjax.tokenizer import load_tokenizer

    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="into no tokens; the model folder is probably missing its tokenizer files"):
        load_tokenizer(str(tmp_path))


def load_train_script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "train.py"
    spec = importlib.util.spec_from_file_location("script_train", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_overrides_on_both_sides_of_flags():
    args = load_train_script().parse_args(["--config", "c.yaml", "train.steps=2", "--resume", "loss.alpha=5"])

    assert args.resume
    assert args.overrides == ["train.steps=2", "loss.alpha=5"]


def test_train_resume_and_overwrite_exclusive(capsys):
    with pytest.raises(SystemExit):
        load_train_script().parse_args(["--resume", "--overwrite"])
    assert "--resume and --overwrite exclude each other" in capsys.readouterr().err


@pytest.mark.parametrize("override, message", [
    ("train.steps=abc", "config key 'train.steps' must be an integer, got 'abc'"),
    ("train.steps=4.5", "config key 'train.steps' must be an integer, got 4.5"),
    ("train.steps=true", "config key 'train.steps' must be an integer, got True"),
    ("loss.target_layers=5", "config key 'loss.target_layers' must be a list, got 5"),
    ("optim.learning_rate=fast", "config key 'optim.learning_rate' must be a number, got 'fast'"),
])
def test_override_of_wrong_type_rejected(tmp_path, override, message):
    path = tmp_path / "c.yaml"
    path.write_text("loss:\n  target_layers: [10, 20]\n")
    with pytest.raises(ValueError, match=message):
        load_config(path, [override])


def test_batch_not_splitting_into_micro_batches_rejected():
    with pytest.raises(ValueError, match="data.batch_size 4 does not split into train.accumulation_steps 3"):
        config_from_dict({"data": {"batch_size": 4}, "train": {"accumulation_steps": 3}})


def test_batch_not_splitting_over_mesh_rejected():
    from types import SimpleNamespace

    config = config_from_dict({"data": {"batch_size": 3}})
    mesh = SimpleNamespace(shape={"data": 2, "fsdp": 1, "tensor": 1})
    with pytest.raises(ValueError, match="data.batch_size 3 does not split over the 2 data-parallel devices"):
        preflight.check_batch_split(config, mesh)


def test_missing_data_file_rejected_before_loading(tmp_path, tiny_model_dir, monkeypatch):
    raw = _raw(run_config(tmp_path, tiny_model_dir, "bad"))
    raw["data"]["retain"] = [str(tmp_path / "absent.jsonl")]

    def never_load(*args):
        raise AssertionError("the model was loaded before the data files were checked")

    monkeypatch.setattr(trainer, "load_adapted_model", never_load)
    with pytest.raises(ValueError, match=r"data file not found: .*absent\.jsonl"):
        trainer.build_setup(config_from_dict(raw))

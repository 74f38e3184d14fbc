"""End to end on the real SmolLM2-135M-Instruct and the public HarmBench / XSTest records.

Short sequences and few steps keep it to a few minutes on 2 CPU cores. Behaviours are split by
id, so the held-out harmful completions come from behaviours that training never saw.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from cbjax import trainer
from cbjax.config import config_from_dict
from cbjax.data import CircuitBreakerData, DataConfig
from cbjax.train_step import validation_metrics

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
pytestmark = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"public data folder {SHARED_DATA} not found")


def held_out(key: str) -> bool:
    """A fixed quarter of the keys, independent of file order."""
    return zlib.crc32(key.encode()) % 4 == 0


def split_file(source: Path, key, keep, out_dir: Path) -> tuple[Path, Path]:
    train, test = out_dir / f"{source.stem}_train.jsonl", out_dir / f"{source.stem}_test.jsonl"
    with open(source) as f, open(train, "w") as train_file, open(test, "w") as test_file:
        for line in f:
            record = json.loads(line)
            if keep(record):
                (test_file if held_out(key(record)) else train_file).write(line)
    return train, test


def test_real_model_reroutes_held_out_harmful_text(tmp_path, smollm2_gguf, smollm2_tokenizer):
    harmful_train, harmful_test = split_file(
        SHARED_DATA / "harmful_completions.jsonl", lambda r: r["behavior_id"], lambda r: True, tmp_path
    )
    benign_train, benign_test = split_file(
        SHARED_DATA / "xstest_borderline.jsonl",
        lambda r: r["prompt"],
        lambda r: r["label"] == "1_full_compliance" and not r["type"].startswith("contrast_"),
        tmp_path,
    )
    lengths = {"request_length": 48, "response_length": 32, "retain_length": 80}
    config = config_from_dict({
        "model": {"path": str(smollm2_gguf)},
        "lora": {"r": 16, "alpha": 16, "dropout": 0.05},
        "loss": {"target_layers": [10, 20], "alpha": 10.0, "retain_scale": 0.03},
        "optim": {"learning_rate": 3e-3},
        "data": {
            "rerouting": [str(harmful_train)],
            "borderline_retain": [str(benign_train)],
            "refusal_retain": [str(SHARED_DATA / "refusal_completions.jsonl")],
            "batch_size": 4, "mask_shared_prefix": True, "num_validation": 4, **lengths,
        },
        "train": {"steps": 60, "log_every": 10, "validate_every": 60, "checkpoint_every": 60,
                  "output_dir": str(tmp_path / "run")},
    })
    setup = trainer.build_setup(config, tokenizer=smollm2_tokenizer)
    last = trainer.train(config, setup=setup)

    evaluation = DataConfig.from_dict({
        "rerouting": [str(harmful_test)], "retain": [str(benign_test)],
        "batch_size": 32, "mask_shared_prefix": True, "validation_fraction": 0.0, **lengths,
    })
    batch = CircuitBreakerData(evaluation, smollm2_tokenizer).batch(0)
    metrics = jax.device_get(validation_metrics(
        last["adapters"], setup.frozen, {k: jnp.asarray(v) for k, v in batch.items()},
        graphdef=setup.graphdef, config=config.loss,
    ))
    print(f"held-out harmful cosine {metrics['val_rerouting_cosine']:.3f}, benign {metrics['val_retain_cosine']:.3f}")
    assert metrics["val_rerouting_cosine"] < 0.4
    assert metrics["val_retain_cosine"] > 0.95

"""A tiny trained run for evaluation tests: a random 3-layer Llama with the word-level test
tokenizer, trained for two steps on made-up word rows."""

from __future__ import annotations

import json
from pathlib import Path

from cbjax.config import config_from_dict
from cbjax.trainer import build_setup, train
from tests.hf_reference import save_tiny_model
from tests.test_data import make_tokenizer
from tests.test_llama_parity import tiny_llama

HARMFUL_ROWS = [{"prompt": f"w{i:02d} hello", "completion": f"w{i + 40:02d} w{i + 41:02d} bye"} for i in range(8)]
BENIGN_ROWS = [{"prompt": f"hello w{i + 10:02d}", "completion": f"w{i + 60:02d} bye"} for i in range(8)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def tiny_model_dir(directory: Path) -> Path:
    """A random tiny Llama (vocab 128) saved with the word-level tokenizer (118 tokens)."""
    directory.mkdir(parents=True, exist_ok=True)
    save_tiny_model(tiny_llama(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False), directory)
    make_tokenizer().save_pretrained(directory)
    return directory


def tiny_run(directory: Path, steps: int = 2) -> Path:
    """Train circuit breakers into a tiny model for `steps` steps; return the run directory."""
    model_dir = tiny_model_dir(directory / "model")
    harmful = write_jsonl(directory / "harmful.jsonl", HARMFUL_ROWS)
    benign = write_jsonl(directory / "benign.jsonl", BENIGN_ROWS)
    run_dir = directory / "run"
    config = config_from_dict({
        "model": {"path": str(model_dir)},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "loss": {"target_layers": [1, 2]},
        "optim": {"learning_rate": 1e-2},
        "data": {"rerouting": [str(harmful)], "retain": [str(benign)], "batch_size": 2, "request_length": 16,
                 "response_length": 8, "retain_length": 24, "num_validation": 2},
        "train": {"steps": steps, "log_every": 1, "validate_every": steps, "checkpoint_every": steps,
                  "output_dir": str(run_dir)},
    })
    train(config, setup=build_setup(config))
    return run_dir

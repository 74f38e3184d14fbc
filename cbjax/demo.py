"""The demo around a training run: build data from the base model's own answers, then compare.

Before training, the base model answers the project's small harmful and benign prompt sets
(`cbjax.data.demo_prompts`); it complies with harmful requests, so its own answers are the
harmful representations to reroute. With `demo.use_shared_data` the public HarmBench and XSTest
records in `demo.shared_data_dir` are used instead. After training, the base and the trained model
answer held-out prompts side by side.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from flax import nnx

from cbjax import lora as lora_lib
from cbjax.config import Config
from cbjax.data import demo_prompts
from cbjax.data.config import DataConfig, SourceConfig
from cbjax.generate import generate_text
from cbjax.tokenizer import load_tokenizer
from cbjax.weights.load import load_model

logger = logging.getLogger(__name__)


def generate_in_batches(model, tokenizer, prompts, *, max_new_tokens, use_lora, batch_size=8) -> list[str]:
    """Generate greedy completions in batches of one fixed size, so every batch reuses one compilation."""
    answers = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        padded = chunk + [chunk[-1]] * (batch_size - len(chunk))
        texts = generate_text(model, tokenizer, padded, chat=True, max_new_tokens=max_new_tokens, use_lora=use_lora)
        answers.extend(texts[: len(chunk)])
    return answers


def write_jsonl(path: Path, prompts: list[str], completions: list[str]) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        for prompt, completion in zip(prompts, completions):
            f.write(json.dumps({"prompt": prompt, "completion": completion.strip() or "(empty)"}) + "\n")
    tmp.replace(path)


def prepare_data(config: Config, model_path: str) -> Config:
    """Return `config` with its data sources pointing at the demo's sets, generating them if needed."""
    if config.demo.use_shared_data:
        return dataclasses.replace(config, data=shared_data_config(config))

    data_dir = Path(config.train.output_dir) / "demo_data"
    rerouting_file = data_dir / "rerouting.jsonl"
    retain_file = data_dir / "retain.jsonl"
    refusal_file = data_dir / "refusal.jsonl"
    if not (rerouting_file.exists() and retain_file.exists()):
        data_dir.mkdir(parents=True, exist_ok=True)
        loaded = load_model(model_path)
        tokenizer = load_tokenizer(model_path)
        logger.info("generating the base model's answers to %d harmful and %d benign demo prompts",
                    len(demo_prompts.HARMFUL_TRAIN), len(demo_prompts.BENIGN_TRAIN))
        kw = dict(max_new_tokens=config.demo.max_new_tokens, use_lora=False)
        harmful = generate_in_batches(loaded.model, tokenizer, demo_prompts.HARMFUL_TRAIN, **kw)
        benign = generate_in_batches(loaded.model, tokenizer, demo_prompts.BENIGN_TRAIN, **kw)
        write_jsonl(rerouting_file, demo_prompts.HARMFUL_TRAIN, harmful)
        write_jsonl(retain_file, demo_prompts.BENIGN_TRAIN, benign)
    # The reference's refusal-retain set: the same harmful requests answered with a refusal, so
    # that the request text alone does not trigger rerouting; the harmful answer does.
    write_jsonl(refusal_file, demo_prompts.HARMFUL_TRAIN, [config.demo.refusal] * len(demo_prompts.HARMFUL_TRAIN))

    data = dataclasses.replace(
        config.data,
        rerouting=[SourceConfig(path=str(rerouting_file))],
        retain=[SourceConfig(path=str(retain_file))],
        refusal_retain=[SourceConfig(path=str(refusal_file))] if config.demo.refusal_retain else [],
    )
    return dataclasses.replace(config, data=data)


def shared_data_config(config: Config) -> DataConfig:
    directory = Path(config.demo.shared_data_dir)
    if not directory.is_dir():
        raise FileNotFoundError(f"demo.shared_data_dir {directory} not found; set demo.use_shared_data=false")
    borderline = SourceConfig.from_dict({
        "path": str(directory / "xstest_borderline.jsonl"),
        "filter": {"label": ["1_full_compliance"], "type": {"exclude_prefix": "contrast_"}},
    })
    return dataclasses.replace(
        config.data,
        rerouting=[SourceConfig(path=str(directory / "harmful_completions.jsonl"))],
        retain=config.data.retain,
        borderline_retain=[borderline],
        refusal_retain=[SourceConfig(path=str(directory / "refusal_completions.jsonl"))],
    )


def trained_full_model(config: Config, model_path: str, adapters, adapted_layers):
    """Load the full-depth model and attach the trained adapters (layers above the targets stay untouched)."""
    loaded = load_model(model_path)
    lora_lib.add_lora(loaded.model, config.lora, adapted_layers, seed=config.train.seed)
    nnx.update(loaded.model, adapters)
    return loaded.model


def before_after_table(config: Config, model_path: str, adapters, adapted_layers, metrics: dict) -> str:
    """Greedy answers of the base and trained model to held-out prompts, as a text table."""
    tokenizer = load_tokenizer(model_path)
    model = trained_full_model(config, model_path, adapters, adapted_layers)
    prompts = [("harmful", p) for p in demo_prompts.HARMFUL_HELD_OUT] + [("benign", p) for p in demo_prompts.BENIGN_HELD_OUT]
    texts = [p for _, p in prompts]
    kw = dict(max_new_tokens=config.demo.table_max_new_tokens)
    base = generate_in_batches(model, tokenizer, texts, use_lora=False, **kw)
    trained = generate_in_batches(model, tokenizer, texts, use_lora=True, **kw)

    lines = ["", "=" * 100, "Before / after circuit-breaker training (greedy, held-out prompts)", "=" * 100]
    for (kind, prompt), before, after in zip(prompts, base, trained):
        lines.append(f"[{kind}] {prompt}")
        lines.append(f"  base:    {_one_line(before)}")
        lines.append(f"  trained: {_one_line(after)}")
    lines.append("-" * 100)
    for key in ("val_rerouting_cosine", "val_retain_cosine", "val_rerouting_norm_ratio", "val_retain_norm_ratio"):
        if key in metrics:
            lines.append(f"{key:28s} {metrics[key]: .4f}")
    lines.append("(cosine between the trained and base model's hidden states at the target layers on held-out text)")
    return "\n".join(lines)


def _one_line(text: str, width: int = 110) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 3] + "..."

"""Read a finished (or interrupted) training run back: its config and trained adapters."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax.numpy as jnp
from flax import nnx

from cbjax import lora as lora_lib
from cbjax.checkpoint import Checkpointer
from cbjax.config import Config, load_config
from cbjax.models import abstract_model
from cbjax.optim import make_optimizer
from cbjax.train_step import TrainState
from cbjax.weights.load import load_model, peek_config


@dataclasses.dataclass
class TrainedRun:
    config: Config
    model_path: str
    adapters: nnx.State
    adapted_layers: tuple[int, ...]
    step: int


def load_run(run_dir: str | Path, step: int | None = None, model_path: str | None = None) -> TrainedRun:
    """Restore the adapters of `run_dir` (the latest checkpoint unless `step` is given).

    `model_path` overrides the base model recorded in the run's config.yaml.
    """
    from cbjax.trainer import jnp_dtype, lora_layers, resolve_model_path

    run_dir = Path(run_dir)
    config_file = run_dir / "config.yaml"
    if not config_file.exists():
        raise FileNotFoundError(f"{run_dir} is not a training run: config.yaml not found")
    config = load_config(config_file)
    model_path = resolve_model_path(model_path or config.model.path)

    checkpointer = Checkpointer(run_dir / "checkpoints", keep=config.train.keep_checkpoints)
    step = checkpointer.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"{run_dir / 'checkpoints'} contains no checkpoint; train first or pass another run directory")

    layers = lora_layers(config)
    model_config = peek_config(model_path).with_layers(config.loss.max_target_layer)
    model = abstract_model(model_config, dtype=jnp_dtype(config.model.dtype), param_dtype=jnp_dtype(config.model.param_dtype))
    lora_lib.add_lora(model, config.lora, layers, seed=config.train.seed)
    _, adapters, _ = lora_lib.split_lora(model)
    optimizer = make_optimizer(config.optim, config.train.steps)
    target = TrainState(adapters, optimizer.init(adapters), jnp.zeros((), jnp.int32))
    state, _ = checkpointer.restore(step, target)
    checkpointer.close()
    return TrainedRun(config, model_path, state.adapters, layers, step)


def adapted_model(run: TrainedRun, *, dtype=jnp.float32, param_dtype=jnp.float32) -> nnx.Module:
    """Load the full-depth base model and attach the run's adapters without merging them."""
    loaded = load_model(run.model_path, dtype=dtype, param_dtype=param_dtype)
    lora_lib.add_lora(loaded.model, run.config.lora, run.adapted_layers, seed=run.config.train.seed)
    nnx.update(loaded.model, run.adapters)
    return loaded.model

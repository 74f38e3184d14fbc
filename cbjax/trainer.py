"""The training loop around the jitted step: model and data set-up, logging, checkpoints, resume."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from flax import nnx
from tqdm.auto import tqdm

from cbjax import lora as lora_lib
from cbjax import preflight, run_directory
from cbjax.checkpoint import Checkpointer
from cbjax.config import Config
from cbjax.data.batches import CircuitBreakerData
from cbjax.optim import make_optimizer
from cbjax.models.llama import set_execution
from cbjax.sharding import (
    LOGICAL_AXIS_RULES,
    batch_sharding,
    make_mesh,
    parameter_sharding,
    place_global_batch,
    replicated,
    state_shardings,
    with_logical_rules,
)
from cbjax.tokenizer import load_tokenizer
from cbjax.train_step import BATCH_KEYS, StepConfig, TrainState, train_step, validation_metrics
from cbjax.weights.load import load_model, peek_config

logger = logging.getLogger(__name__)

SMOLLM2_ALIAS = "smollm2-135m-instruct"


def resolve_model_path(path: str) -> str:
    if path == SMOLLM2_ALIAS:
        from cbjax.fetch import smollm2_gguf_path

        return str(smollm2_gguf_path())
    return path


def jnp_dtype(name: str):
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def lora_layers(config: Config) -> tuple[int, ...]:
    """Layers that get adapters: the configured list, or every layer the training computes."""
    stop = config.loss.max_target_layer
    layers = config.lora.layers if config.lora.layers is not None else tuple(range(stop))
    for layer in layers:
        if not 0 <= layer < stop:
            raise ValueError(
                f"lora.layers contains {layer}, but training computes only layers 0..{stop - 1} "
                f"(the highest target layer is {stop}); an adapter there would never be trained"
            )
    return tuple(layers)


@dataclasses.dataclass
class Setup:
    """Everything the loop needs, built once."""

    config: Config
    model_path: str
    tokenizer: object
    graphdef: object
    adapters: object
    frozen: object
    data: CircuitBreakerData
    mesh: object
    full_num_layers: int
    adapted_modules: list[str]
    # Logical axis -> mesh axes (see `cbjax.sharding.LOGICAL_AXIS_RULES`).
    rules: dict = dataclasses.field(default_factory=lambda: dict(LOGICAL_AXIS_RULES))


def build_setup(config: Config, model_path: str | None = None, tokenizer=None, data=None) -> Setup:
    """Load the model truncated after the highest target layer, attach adapters, build the data."""
    model_path = resolve_model_path(model_path or config.model.path)
    full_config = peek_config(model_path)
    preflight.check_target_layers(full_config, config)
    preflight.check_sequence_lengths(full_config, config)
    mesh = make_mesh(config.mesh)
    preflight.check_batch_split(config, mesh)
    if data is None:
        preflight.check_data_files(config)
    rules = dict(LOGICAL_AXIS_RULES)
    graphdef, adapters, frozen, adapted = load_adapted_model(config, model_path, mesh, rules)

    tokenizer = tokenizer or load_tokenizer(model_path)
    data = data or CircuitBreakerData(config.data, tokenizer)
    return Setup(
        config, model_path, tokenizer, graphdef, adapters, frozen, data, mesh, full_config.num_layers, adapted, rules
    )


def load_adapted_model(config: Config, model_path: str, mesh, rules: dict):
    """Load the truncated model into its shards on `mesh` and attach adapters.

    Returns (graphdef, adapters, frozen, adapted module paths). Each weight goes straight into
    its shards, so no device ever stores the whole model. The adapters are not placed yet.
    """
    loaded = load_model(
        model_path,
        dtype=jnp_dtype(config.model.dtype),
        param_dtype=jnp_dtype(config.model.param_dtype),
        num_layers=config.loss.max_target_layer,
        sharding_for=parameter_sharding(mesh, rules),
    )
    set_execution(loaded.model, config.model.attention, config.model.remat)
    adapted = lora_lib.add_lora(loaded.model, config.lora, lora_layers(config), seed=config.train.seed)
    graphdef, adapters, frozen = lora_lib.split_lora(loaded.model)
    return graphdef, adapters, frozen, adapted


def parameter_counts(setup: Setup) -> dict[str, float]:
    trainable = lora_lib.count_parameters(setup.adapters)
    frozen = lora_lib.count_parameters(setup.frozen)
    return {"total": trainable + frozen, "trainable": trainable, "trainable_fraction": trainable / (trainable + frozen)}


def compile_functions(setup: Setup):
    """Jit the train step and the validation pass with explicit shardings; the state is donated.

    Frozen weights, adapters and optimizer state are sharded by `setup.rules`, batches by rows.
    """
    config = setup.config
    optimizer = make_optimizer(config.optim, config.train.steps)
    step_config = StepConfig(config.loss, config.train.steps, config.train.accumulation_steps, config.train.seed)
    mesh, rules = setup.mesh, setup.rules

    abstract_state = jax.eval_shape(
        lambda adapters: TrainState(adapters, optimizer.init(adapters), jnp.zeros((), jnp.int32)), setup.adapters
    )
    state_sharding = state_shardings(abstract_state, mesh, rules)
    frozen_sharding = state_shardings(setup.frozen, mesh, rules)
    batch_shardings = {key: batch_sharding(mesh) for key in BATCH_KEYS}

    step_fn = jax.jit(
        with_logical_rules(
            functools.partial(train_step, graphdef=setup.graphdef, optimizer=optimizer, config=step_config), mesh, rules
        ),
        in_shardings=(state_sharding, frozen_sharding, batch_shardings),
        out_shardings=(state_sharding, replicated(mesh)),
        donate_argnums=(0,),
    )
    validate_fn = jax.jit(
        with_logical_rules(
            functools.partial(validation_metrics, graphdef=setup.graphdef, config=config.loss), mesh, rules
        ),
        in_shardings=(state_sharding.adapters, frozen_sharding, batch_shardings),
        out_shardings=replicated(mesh),
    )
    adapters = jax.device_put(setup.adapters, state_sharding.adapters)
    # The moments are created in place, already sharded like their adapters.
    opt_state = jax.jit(optimizer.init, out_shardings=state_sharding.opt_state)(adapters)
    step = jax.device_put(jnp.zeros((), jnp.int32), state_sharding.step)
    frozen = jax.device_put(setup.frozen, frozen_sharding)
    return step_fn, validate_fn, TrainState(adapters, opt_state, step), frozen, batch_shardings


def place_batch(batch: dict, shardings: dict) -> dict:
    """Place a global host batch; each process copies only the rows its devices hold."""
    return place_global_batch({key: batch[key] for key in BATCH_KEYS}, shardings)


class MetricsWriter:
    """Appends one JSON object per logged step to metrics.jsonl (process 0 only)."""

    def __init__(self, path: Path):
        self.path = path
        self.enabled = jax.process_index() == 0

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def to_python(metrics: dict) -> dict:
    return {k: float(v) if np.ndim(v) == 0 and not isinstance(v, (int, np.integer)) else v for k, v in jax.device_get(metrics).items()}


def train(
    config: Config,
    *,
    resume: bool = False,
    overwrite: bool = False,
    setup: Setup | None = None,
    stop_after: int | None = None,
) -> dict:
    """Run training to `config.train.steps` (or `stop_after` steps, for tests); return the last metrics.

    An earlier run in `train.output_dir` is continued with `resume`, replaced with `overwrite`,
    and otherwise an error (see `cbjax.run_directory`).
    """
    run_directory.prepare(config, resume=resume, overwrite=overwrite)
    setup = setup or build_setup(config)
    output_dir = Path(config.train.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    log_setup(setup)

    step_fn, validate_fn, state, frozen, batch_shardings = compile_functions(setup)
    checkpointer = Checkpointer(output_dir / "checkpoints", keep=config.train.keep_checkpoints)
    start = 0
    if resume and checkpointer.latest_step() is not None:
        state, metadata = checkpointer.restore(checkpointer.latest_step(), state)
        check_resume_metadata(metadata, config)
        start = int(state.step)
        logger.info("resumed from step %d", start)

    # Written only now, so that a failed resume leaves the run's own config in place.
    if jax.process_index() == 0:
        (output_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    metrics_path = output_dir / "metrics.jsonl"
    if resume:
        run_directory.truncate_metrics(metrics_path, start)
    metrics_writer = MetricsWriter(metrics_path)
    validation_batch = place_batch(setup.data.validation_batch(), batch_shardings)
    last = run_loop(setup, step_fn, validate_fn, state, frozen, batch_shardings, validation_batch,
                    checkpointer, metrics_writer, start, stop_after)
    checkpointer.close()
    return last


def run_loop(setup, step_fn, validate_fn, state, frozen, batch_shardings, validation_batch,
             checkpointer, metrics_writer, start, stop_after) -> dict:
    """Dispatch steps back to back; metrics of step t are read after step t + 1 is dispatched."""
    train_config = setup.config.train
    end = train_config.steps if stop_after is None else min(train_config.steps, stop_after)
    pending = None
    last: dict = {}
    progress = tqdm(range(start, end), desc="training", disable=jax.process_index() != 0, initial=start,
                    total=train_config.steps)
    clock = [time.perf_counter()]
    for index in progress:
        host_batch = setup.data.batch(index)
        tokens = int(np.sum(host_batch["rerouting_attention_mask"]) + np.sum(host_batch["retain_attention_mask"]))
        state, metrics = step_fn(state, frozen, place_batch(host_batch, batch_shardings))
        if pending is not None:
            last = report(pending, metrics_writer, progress, train_config)
        pending = (index + 1, metrics, tokens, clock)

        step = index + 1
        if step % train_config.validate_every == 0 or step == end:
            pending[1].update(validate_fn(state.adapters, frozen, validation_batch))
        if step % train_config.checkpoint_every == 0 or step == end:
            checkpointer.save(step, state, {"seed": train_config.seed, "steps": train_config.steps})
    if pending is not None:
        last = report(pending, metrics_writer, progress, train_config, force=True)
    progress.close()
    last["adapters"] = state.adapters
    return last


def report(pending, metrics_writer, progress, train_config, force: bool = False) -> dict:
    step, metrics, tokens, clock = pending
    values = to_python(metrics)
    # Reading the metrics waits for the step, so the time since the previous report is the step's
    # wall time (the first step includes compilation).
    now = time.perf_counter()
    elapsed = now - clock[0]
    clock[0] = now
    values.update(step=step, step_time=elapsed, tokens_per_second=tokens / max(elapsed, 1e-9))
    if step % train_config.log_every == 0 or force or any(k.startswith("val_") for k in values):
        metrics_writer.write(values)
        logger.info(
            "step %d  loss %.4f  rerouting %.4f (coeff %.3f, cos %.3f)  retain %.4f (coeff %.3f, cos %.3f)%s  %.0f tok/s",
            step, values["loss"], values["rerouting_loss"], values["rerouting_coeff"], values["rerouting_cosine"],
            values["retain_loss"], values["retain_coeff"], values["retain_cosine"],
            "".join(f"  {k} {v:.3f}" for k, v in values.items() if k.startswith("val_")),
            values["tokens_per_second"],
        )
    progress.set_postfix(loss=f"{values['loss']:.3f}", cos=f"{values['rerouting_cosine']:.3f}")
    return values


def check_resume_metadata(metadata: dict, config: Config) -> None:
    if metadata.get("seed") != config.train.seed:
        raise ValueError(
            f"cannot resume: the checkpoint was written with train.seed {metadata.get('seed')}, "
            f"the config has {config.train.seed}"
        )
    if metadata.get("steps", config.train.steps) != config.train.steps:
        raise ValueError(
            f"cannot resume: the checkpoint was written for train.steps {metadata['steps']}, the config "
            f"has {config.train.steps}, and the loss schedule depends on it"
        )


def log_setup(setup: Setup) -> None:
    if jax.process_index() != 0:
        return
    counts = parameter_counts(setup)
    logger.info("devices: %d x %s; mesh %s", jax.device_count(), jax.devices()[0].platform, dict(setup.mesh.shape))
    logger.info(
        "parameters: total %s (layers 0..%d of %d kept), trainable %s (%.4f%%) in %d adapted modules",
        f"{counts['total']:,}", setup.config.loss.max_target_layer - 1, setup.full_num_layers,
        f"{counts['trainable']:,}", 100 * counts["trainable_fraction"], len(setup.adapted_modules),
    )
    logger.info("data: %s", setup.data.summary())

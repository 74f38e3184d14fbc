"""The base and trained models under evaluation, from a training run or from two checkpoints.

A training run contains adapters, so one model object serves as both: `use_lora=False` gives the
base model and `use_lora=True` the trained one. A trained model given as a Hugging Face directory,
hub id or GGUF file (adapters merged, for example) is loaded next to the base model.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from flax import nnx

from cbjax.losses import LossConfig
from cbjax.run import TrainedRun, adapted_model, load_run
from cbjax.tokenizer import load_tokenizer
from cbjax.trainer import resolve_model_path
from cbjax.weights.load import load_model


@dataclasses.dataclass
class ModelHandle:
    """A model and the `use_lora` flag that selects it from a model object."""

    model: nnx.Module
    use_lora: bool
    description: str


@dataclasses.dataclass
class ModelPair:
    base: ModelHandle
    trained: ModelHandle
    tokenizer: object
    # Hidden-state indices that training targeted (the run's loss.target_layers, else the default).
    target_layers: tuple[int, ...]
    run: TrainedRun | None = None
    run_dir: Path | None = None


def is_run_dir(path: str | Path) -> bool:
    return (Path(path) / "config.yaml").is_file() and (Path(path) / "checkpoints").is_dir()


def load_pair(base: str | None, trained: str, target_layers: tuple[int, ...] | None = None) -> ModelPair:
    """Load the base and trained models. `base` may be None when `trained` is a training run."""
    if is_run_dir(trained):
        run = load_run(trained, model_path=resolve_model_path(base) if base else None)
        model = adapted_model(run)
        description = f"{trained} (step {run.step})"
        return ModelPair(
            base=ModelHandle(model, False, run.model_path),
            trained=ModelHandle(model, True, description),
            tokenizer=load_tokenizer(run.model_path),
            target_layers=tuple(target_layers or run.config.loss.target_layers),
            run=run,
            run_dir=Path(trained),
        )
    if base is None:
        raise ValueError(f"{trained} is not a training run (no config.yaml and checkpoints/), so --base is required")

    base_path = resolve_model_path(base)
    base_model = load_model(base_path).model
    trained_model = load_model(resolve_model_path(trained)).model
    check_same_architecture(base_model, trained_model)
    layers = target_layers or tuple(t for t in LossConfig().target_layers if t <= base_model.config.num_layers)
    return ModelPair(
        base=ModelHandle(base_model, False, base_path),
        trained=ModelHandle(trained_model, False, str(trained)),
        tokenizer=load_tokenizer(base_path),
        target_layers=tuple(layers),
    )


def load_single(path: str, *, use_lora: bool = True) -> tuple[ModelHandle, object]:
    """Load one model and its tokenizer; a training run gives its adapted model (or the base with `use_lora=False`)."""
    if is_run_dir(path):
        run = load_run(path)
        description = f"{path} (step {run.step})" if use_lora else f"{run.model_path} (base of {path})"
        return ModelHandle(adapted_model(run), use_lora, description), load_tokenizer(run.model_path)
    model_path = resolve_model_path(path)
    return ModelHandle(load_model(model_path).model, False, model_path), load_tokenizer(model_path)


def check_same_architecture(base: nnx.Module, trained: nnx.Module) -> None:
    fields = ("family", "vocab_size", "hidden_size", "num_layers")
    for field in fields:
        base_value, trained_value = getattr(base.config, field), getattr(trained.config, field)
        if base_value != trained_value:
            raise ValueError(
                f"the base and trained models differ in {field} ({base_value} and {trained_value}); "
                "compare a trained model only with the model it was trained from"
            )

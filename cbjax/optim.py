"""The adapters' optimizer: optax AdamW with global-norm clipping and a learning-rate schedule."""

from __future__ import annotations

import dataclasses

import optax


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    # Defaults are the reference implementation's (transformers Trainer defaults with lr 1e-4).
    learning_rate: float = 1e-4
    schedule: str = "constant"  # constant, linear, cosine
    warmup_steps: int = 0
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float = 1.0

    def __post_init__(self):
        if self.schedule not in ("constant", "linear", "cosine"):
            raise ValueError(f"optim.schedule {self.schedule!r} is unknown; expected constant, linear or cosine")
        if self.learning_rate <= 0:
            raise ValueError(f"optim.learning_rate must be positive, got {self.learning_rate}")


def learning_rate_schedule(config: OptimConfig, total_steps: int) -> optax.Schedule:
    decay_steps = max(total_steps - config.warmup_steps, 1)
    if config.schedule == "constant":
        main = optax.constant_schedule(config.learning_rate)
    elif config.schedule == "linear":
        main = optax.linear_schedule(config.learning_rate, 0.0, decay_steps)
    else:
        main = optax.cosine_decay_schedule(config.learning_rate, decay_steps)
    if config.warmup_steps == 0:
        return main
    warmup = optax.linear_schedule(0.0, config.learning_rate, config.warmup_steps)
    return optax.join_schedules([warmup, main], [config.warmup_steps])


def make_optimizer(config: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(config.max_grad_norm),
        optax.adamw(
            learning_rate_schedule(config, total_steps),
            b1=config.b1,
            b2=config.b2,
            eps=config.eps,
            weight_decay=config.weight_decay,
        ),
    )

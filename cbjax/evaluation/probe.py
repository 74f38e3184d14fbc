"""A harmfulness probe: a linear or small MLP classifier on one layer's per-token hidden states.

The probe scores every completion token; a text is flagged when its highest token score exceeds
the threshold, so one harmful passage anywhere is enough. The threshold is set on benign texts
held out of the fit (the calibration split): at most `target_fpr` of them are flagged. Features
are standardised with the mean and standard deviation of the fitting tokens. The fit minimises a
class-balanced logistic loss with AdamW, full batch.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from cbjax.evaluation.models import ModelHandle
from cbjax.evaluation.texts import TextRows, batches

PROBE_KINDS = ("linear", "mlp")


@dataclasses.dataclass(frozen=True)
class ProbeConfig:
    kind: str = "linear"
    hidden_size: int = 64  # mlp only
    steps: int = 100
    learning_rate: float = 1e-2
    weight_decay: float = 1e-4
    target_fpr: float = 0.05
    # Share of the benign texts kept out of the fit to set the threshold.
    calibration_fraction: float = 0.25
    seed: int = 0

    def __post_init__(self):
        if self.kind not in PROBE_KINDS:
            raise ValueError(f"probe kind {self.kind!r} is unknown; expected one of {PROBE_KINDS}")
        if not 0.0 <= self.target_fpr < 1.0:
            raise ValueError(f"target_fpr must be in [0, 1), got {self.target_fpr}")
        if not 0.0 < self.calibration_fraction < 1.0:
            raise ValueError(f"calibration_fraction must be in (0, 1), got {self.calibration_fraction}")


@dataclasses.dataclass
class Probe:
    kind: str
    params: dict[str, np.ndarray]
    mean: np.ndarray
    scale: np.ndarray
    threshold: float
    target_fpr: float
    # Hidden-state index whose features the probe reads (None for features from elsewhere).
    layer: int | None = None


def _logits(kind: str, params: dict, features_NxD: jax.Array) -> jax.Array:
    if kind == "linear":
        return features_NxD @ params["w"] + params["b"]
    hidden = jax.nn.gelu(features_NxD @ params["w1"] + params["b1"])
    return hidden @ params["w2"] + params["b2"]


def token_scores(probe: Probe, features_NxD: np.ndarray) -> np.ndarray:
    """Score each token (row of features) with the probe's logit."""
    standardized = (np.asarray(features_NxD, np.float32) - probe.mean) / probe.scale
    params = {k: jnp.asarray(v) for k, v in probe.params.items()}
    return np.asarray(_logits(probe.kind, params, jnp.asarray(standardized)))


def sequence_scores(probe: Probe, texts: Sequence[np.ndarray]) -> np.ndarray:
    """Return the highest token score of each text (-inf for a text without tokens)."""
    return np.array([token_scores(probe, t).max() if len(t) else -np.inf for t in texts])


def threshold_at_fpr(benign_scores: np.ndarray, target_fpr: float) -> float:
    """Return the smallest threshold that flags (score > threshold) at most `target_fpr` of `benign_scores`."""
    ordered = np.sort(np.asarray(benign_scores, np.float64))[::-1]
    if ordered.size == 0:
        raise ValueError("no benign scores to set the threshold on")
    allowed = int(np.floor(target_fpr * ordered.size))
    return float(ordered[min(allowed, ordered.size - 1)])


def train_probe(
    harmful: Sequence[np.ndarray], benign: Sequence[np.ndarray], config: ProbeConfig, layer: int | None = None
) -> Probe:
    """Fit on all harmful texts and the benign fitting split; set the threshold on the calibration split.

    `harmful` and `benign` hold one (tokens, D) feature array per text.
    """
    rng = np.random.default_rng(config.seed)
    order = rng.permutation(len(benign))
    calibration_count = max(1, int(round(config.calibration_fraction * len(benign))))
    if calibration_count >= len(benign):
        raise ValueError(f"{len(benign)} benign texts are too few to keep {calibration_count} for calibration")
    calibration = [benign[i] for i in order[:calibration_count]]
    fitting = [benign[i] for i in order[calibration_count:]]

    features = np.concatenate([*harmful, *fitting]).astype(np.float32)
    labels = np.concatenate([np.ones(sum(len(t) for t in harmful)), np.zeros(sum(len(t) for t in fitting))])
    if labels.min() == labels.max():
        raise ValueError("the probe needs both harmful and benign tokens to fit")
    mean = features.mean(axis=0)
    scale = features.std(axis=0) + 1e-6
    params = _fit(config, jnp.asarray((features - mean) / scale), jnp.asarray(labels, jnp.float32))

    probe = Probe(config.kind, jax.device_get(params), mean, scale, 0.0, config.target_fpr, layer)
    probe.threshold = threshold_at_fpr(sequence_scores(probe, calibration), config.target_fpr)
    return probe


def _init_params(config: ProbeConfig, dim: int) -> dict:
    key = jax.random.key(config.seed)
    if config.kind == "linear":
        return {"w": jnp.zeros((dim,)), "b": jnp.zeros(())}
    bound = 1.0 / np.sqrt(dim)
    return {
        "w1": jax.random.uniform(key, (dim, config.hidden_size), minval=-bound, maxval=bound),
        "b1": jnp.zeros((config.hidden_size,)),
        "w2": jnp.zeros((config.hidden_size,)),
        "b2": jnp.zeros(()),
    }


def _fit(config: ProbeConfig, features_NxD: jax.Array, labels_N: jax.Array) -> dict:
    # Each class carries half the loss, so a large benign set cannot drown the harmful tokens.
    positives = jnp.sum(labels_N)
    weights_N = jnp.where(labels_N > 0, 0.5 / positives, 0.5 / (labels_N.size - positives))
    optimizer = optax.adamw(config.learning_rate, weight_decay=config.weight_decay)

    def loss(params):
        logits = _logits(config.kind, params, features_NxD)
        return jnp.sum(weights_N * optax.sigmoid_binary_cross_entropy(logits, labels_N))

    @jax.jit
    def run(params):
        def step(_, carry):
            params, opt_state = carry
            grads = jax.grad(loss)(params)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        return jax.lax.fori_loop(0, config.steps, step, (params, optimizer.init(params)))[0]

    return run(_init_params(config, features_NxD.shape[1]))


def detection_metrics(probe: Probe, harmful: Sequence[np.ndarray], benign: Sequence[np.ndarray]) -> dict:
    """Share of harmful texts flagged (detection rate), of benign texts flagged (false positives),
    the same per token, and the sequence-level AUROC."""
    harmful_scores = sequence_scores(probe, harmful)
    benign_scores = sequence_scores(probe, benign)
    harmful_tokens = np.concatenate([token_scores(probe, t) for t in harmful if len(t)] or [np.zeros(0)])
    benign_tokens = np.concatenate([token_scores(probe, t) for t in benign if len(t)] or [np.zeros(0)])
    return {
        "threshold": probe.threshold,
        "harmful_texts": len(harmful),
        "benign_texts": len(benign),
        "detection_rate": _share_above(harmful_scores, probe.threshold),
        "false_positive_rate": _share_above(benign_scores, probe.threshold),
        "token_detection_rate": _share_above(harmful_tokens, probe.threshold),
        "token_false_positive_rate": _share_above(benign_tokens, probe.threshold),
        "auroc": auroc(harmful_scores, benign_scores),
    }


def _share_above(scores: np.ndarray, threshold: float) -> float | None:
    return float(np.mean(scores > threshold)) if len(scores) else None


def auroc(positive: np.ndarray, negative: np.ndarray) -> float | None:
    """Probability that a random positive outscores a random negative (ties count half)."""
    if not len(positive) or not len(negative):
        return None
    greater = (positive[:, None] > negative[None, :]).mean()
    ties = (positive[:, None] == negative[None, :]).mean()
    return float(greater + 0.5 * ties)


@functools.partial(jax.jit, static_argnames=("graphdef", "layer", "use_lora"))
def _layer_states(graphdef, state, ids, mask, *, layer, use_lora):
    model = nnx.merge(graphdef, state)
    out = model(ids, mask, stop_after_layer=layer, return_logits=False, use_lora=use_lora)
    return out.hidden_states[layer]


def completion_features(handle: ModelHandle, rows: TextRows, layer: int, *, batch_size: int = 8) -> list[np.ndarray]:
    """Hidden state `layer` of every completion token, one (tokens, D) float32 array per row."""
    handle.model.config.check_layer(layer, "probe layer")
    graphdef, state = nnx.split(handle.model)
    features = []
    for batch, valid in batches(rows, batch_size):
        hidden = np.asarray(_layer_states(
            graphdef, state, jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]),
            layer=layer, use_lora=handle.use_lora,
        ), np.float32)
        for row in range(valid):
            features.append(hidden[row][batch["completion_mask"][row].astype(bool)])
    return features


def save_probe(probe: Probe, directory: str | Path, metadata: dict | None = None) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    np.savez(directory / "probe.npz", mean=probe.mean, scale=probe.scale,
             **{f"param_{name}": value for name, value in probe.params.items()})
    record = {"kind": probe.kind, "threshold": probe.threshold, "target_fpr": probe.target_fpr,
              "layer": probe.layer, **(metadata or {})}
    (directory / "probe.json").write_text(json.dumps(record, indent=2) + "\n")


def load_probe(directory: str | Path) -> Probe:
    directory = Path(directory)
    record = json.loads((directory / "probe.json").read_text())
    with np.load(directory / "probe.npz") as arrays:
        params = {name[len("param_"):]: arrays[name] for name in arrays.files if name.startswith("param_")}
        mean, scale = arrays["mean"], arrays["scale"]
    return Probe(record["kind"], params, mean, scale, record["threshold"], record["target_fpr"], record["layer"])

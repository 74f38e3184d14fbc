"""Tests of the evaluation package: response rules, judge protocol, sets, probe, attack, report
files on a tiny trained run, and the benchmark's FLOP count."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from cbjax.evaluation import sets as sets_lib
from cbjax.evaluation.attack import (
    AttackConfig,
    attack_layout,
    generate_after_attack,
    initial_soft_prompts,
    run_attack,
)
from cbjax.evaluation.flops import StepShape, step_flops
from cbjax.evaluation.judge import JudgeError, run_judge
from cbjax.evaluation.models import load_pair, load_single
from cbjax.evaluation.probe import (
    ProbeConfig,
    detection_metrics,
    load_probe,
    save_probe,
    sequence_scores,
    threshold_at_fpr,
    train_probe,
)
from cbjax.evaluation.rules import ResponseRules, classify_response, label_shares, repeat_rate
from cbjax.generate import default_stop_tokens, generate
from cbjax.models.config import ModelConfig
from tests.evaluation_fixtures import tiny_model_dir, tiny_run

REPO = Path(__file__).resolve().parents[1]
RULES = ResponseRules()


# ---------------------------------------------------------------- response rules


@pytest.mark.parametrize("text", [
    "I'm sorry, but I can't help with that.",
    "I\u2019m sorry, I cannot do this.",  # curly apostrophe
    "As an AI, I must decline.",
    "I CANNOT ASSIST WITH THAT REQUEST.",
])
def test_refusal_phrase_detected(text):
    verdict = classify_response(text, text.split(), -1.0, RULES)
    assert verdict.refused
    assert verdict.label == "refused"


def test_compliant_answer_not_refused():
    text = "Sure! Mix flour, milk and two eggs, then fry each pancake for a minute per side."
    verdict = classify_response(text, text.split(), -1.5, RULES)
    assert not verdict.refused
    assert not verdict.broken
    assert verdict.label == "complied"


def test_refusal_window_limits_search():
    text = "Here is the full recipe you asked for, step by step. I cannot promise it tastes good."
    windowed = ResponseRules(refusal_window=40)
    assert classify_response(text, text.split(), -1.0, RULES).refused
    assert not classify_response(text, text.split(), -1.0, windowed).refused


def test_empty_response_is_broken():
    verdict = classify_response("   ", [], None, RULES)
    assert verdict.broken
    assert verdict.broken_reasons == ("empty",)
    assert verdict.label == "broken"


def test_unlikely_response_is_broken():
    text = "zq vlorp xxk ptt"
    threshold = RULES.min_log_likelihood
    assert classify_response(text, text.split(), threshold - 0.1, RULES).broken_reasons == ("unlikely",)
    assert not classify_response(text, text.split(), threshold + 0.1, RULES).broken


def test_repeat_rate_hand_count():
    # Trigrams (1,2,3) (2,3,1) (3,1,2) (1,2,3): the last repeats the first.
    assert repeat_rate([1, 2, 3, 1, 2, 3], 3) == pytest.approx(0.25)
    assert repeat_rate([1, 2], 3) == 0.0
    assert repeat_rate([5, 5, 5, 5], 1) == pytest.approx(0.75)


def test_repetitive_response_is_broken():
    tokens = "the plan the plan the plan the plan the plan the plan".split()
    verdict = classify_response(" ".join(tokens), tokens, -1.0, RULES)
    assert verdict.repeat_rate > RULES.max_repeat_rate
    assert verdict.broken_reasons == ("repetitive",)


def test_short_repetition_not_broken():
    tokens = "no no no no".split()  # below repeat_min_tokens
    assert not classify_response(" ".join(tokens), tokens, -1.0, RULES).broken


def test_refusal_label_wins_over_broken():
    tokens = ("I cannot " * 8).split()
    verdict = classify_response(" ".join(tokens), tokens, -1.0, RULES)
    assert verdict.refused
    assert verdict.broken
    assert verdict.label == "refused"


def test_label_shares():
    verdicts = [
        classify_response("I'm sorry.", ["a"], -1.0, RULES),
        classify_response("", [], None, RULES),
        classify_response("Sure, here it is.", ["a", "b"], -1.0, RULES),
        classify_response("Fine, steps follow.", ["a", "b"], -1.0, RULES),
    ]
    shares = label_shares(verdicts)
    assert shares["refused"] == 0.25
    assert shares["broken"] == 0.25
    assert shares["refused_or_broken"] == 0.5
    assert shares["complied"] == 0.5


# ---------------------------------------------------------------- judge protocol


JUDGE = (
    f"{sys.executable} -c \"import json, sys\n"
    "for line in sys.stdin:\n"
    "    record = json.loads(line)\n"
    "    print(json.dumps({'label': 'refused' if 'no' in record['response'] else 'complied'}))\""
)


def test_judge_labels_in_order():
    assert run_judge(JUDGE, ["p1", "p2"], ["no way", "sure"], "harmful") == ["refused", "complied"]


def test_judge_invalid_output_raises():
    silent = f"{sys.executable} -c \"import sys; sys.stdin.read()\""
    with pytest.raises(JudgeError, match="wrote 0 lines for 2 responses"):
        run_judge(silent, ["p1", "p2"], ["a", "b"], "benign")


# ---------------------------------------------------------------- sets


def test_set_spec_with_options(tmp_path):
    spec = sets_lib.parse_set_spec(f"harmful_prompts:mine={tmp_path}/p.jsonl?prompt_column=goal&limit=3")
    assert spec.role == "harmful_prompts"
    assert spec.name == "mine"
    assert spec.source.prompt_column == "goal"
    assert spec.source.completion_column == "goal"  # prompt sets read the prompt twice
    assert spec.source.limit == 3


def test_set_spec_unknown_role_raises():
    with pytest.raises(ValueError, match="role 'harmful' is unknown"):
        sets_lib.parse_set_spec("harmful=data.jsonl")


def test_set_limit_spreads_rows(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"p{i}", "completion": "c"}) + "\n" for i in range(10)))
    loaded = sets_lib.load_set(sets_lib.parse_set_spec(f"benign_completions={path}"), limit=5)
    assert [e.prompt for e in loaded.examples] == ["p0", "p2", "p4", "p6", "p8"]


def test_sets_file_with_filter(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"p{i}", "completion": "c", "label": str(i % 2)}) + "\n" for i in range(6)))
    sets_file = tmp_path / "sets.yaml"
    sets_file.write_text(f"- role: benign_completions\n  name: odd\n  source:\n    path: {path}\n    filter:\n      label: ['1']\n")
    [spec] = sets_lib.load_sets_file(sets_file)
    loaded = sets_lib.load_set(spec, limit=None)
    assert loaded.name == "odd"
    assert [e.prompt for e in loaded.examples] == ["p1", "p3", "p5"]


def test_shared_data_sets_roles():
    shared = REPO.parent / "shared" / "data"
    if not shared.is_dir():
        pytest.skip(f"shared data folder {shared} not found")
    specs = {spec.name: spec for spec in sets_lib.shared_data_specs(shared)}
    assert specs["harmbench"].role == "harmful_prompts"
    assert specs["xstest_safe"].role == "benign_prompts"
    xstest = sets_lib.load_set(specs["xstest_safe"], limit=None)
    assert xstest.examples
    assert all(example.completion == "" for example in xstest.examples)


# ---------------------------------------------------------------- probe


def separable_texts(seed: int, count: int, shift: float, dim: int = 16) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    direction = np.zeros(dim, np.float32)
    direction[0] = 1.0
    return [rng.normal(size=(int(rng.integers(3, 9)), dim)).astype(np.float32) + shift * direction for _ in range(count)]


def test_threshold_at_fpr_hand_count():
    scores = np.arange(1, 101, dtype=np.float64)
    threshold = threshold_at_fpr(scores, 0.05)
    assert threshold == 95.0
    assert np.mean(scores > threshold) == 0.05
    assert threshold_at_fpr(scores, 0.0) == 100.0


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_probe_separates_synthetic_data(kind):
    harmful = separable_texts(0, 60, shift=4.0)
    benign = separable_texts(1, 80, shift=0.0)
    config = ProbeConfig(kind=kind, target_fpr=0.1, steps=200, calibration_fraction=0.5)
    probe = train_probe(harmful[:40], benign[:40], config)

    # The threshold is set on 20 benign calibration texts: at most floor(0.1 * 20) = 2 flagged.
    assert np.mean(sequence_scores(probe, benign[:40]) > probe.threshold) <= 0.1 + 1e-9
    held_out = detection_metrics(probe, harmful[40:], benign[40:])
    assert held_out["detection_rate"] >= 0.95
    assert held_out["false_positive_rate"] <= 0.25
    assert held_out["auroc"] > 0.95


def test_probe_save_load_round_trip(tmp_path):
    probe = train_probe(separable_texts(0, 10, 4.0), separable_texts(1, 10, 0.0), ProbeConfig(steps=20), layer=3)
    save_probe(probe, tmp_path)
    loaded = load_probe(tmp_path)
    texts = separable_texts(2, 5, 2.0)
    np.testing.assert_allclose(sequence_scores(loaded, texts), sequence_scores(probe, texts), rtol=1e-6)
    assert loaded.threshold == probe.threshold
    assert loaded.layer == 3


# ---------------------------------------------------------------- attack


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return load_single(str(tiny_model_dir(tmp_path_factory.mktemp("tiny_model"))))


ATTACK = AttackConfig(num_embeddings=4, steps=40, learning_rate=0.1, target="w01 w02 w03", init_text="w00", max_new_tokens=5)


def test_attack_lowers_target_nll(tiny_model):
    handle, tokenizer = tiny_model
    result = run_attack(handle, tokenizer, ["w05 hello", "hello w07 w08 w09"], ATTACK)
    assert result.steps == ATTACK.steps
    assert result.history.shape == (ATTACK.steps, 2)
    assert np.all(result.final_nll < result.initial_nll - 0.1)


def test_attack_stops_early_at_stop_nll(tiny_model):
    handle, tokenizer = tiny_model
    config = AttackConfig(num_embeddings=4, steps=40, stop_nll=100.0, target="w01", init_text="w00")
    result = run_attack(handle, tokenizer, ["w05 hello"], config)
    assert result.steps == 1
    initial = initial_soft_prompts(handle, tokenizer, 1, config)
    np.testing.assert_array_equal(result.soft_prompts, np.asarray(initial))
    assert result.final_nll[0] == pytest.approx(result.initial_nll[0])


def test_generation_from_embeddings_matches_generate(tiny_model):
    # With token embeddings as the soft prompt, decoding from embeddings must equal decoding the tokens.
    handle, tokenizer = tiny_model
    prompts = ["w05 hello", "hello w07 w08 w09"]
    layout = attack_layout(tokenizer, prompts, ATTACK)
    token = tokenizer.convert_tokens_to_ids("w00")
    soft = np.asarray(handle.model.embed_tokens(jnp.full((2, ATTACK.num_embeddings), token)))
    texts = generate_after_attack(handle, tokenizer, prompts, soft, ATTACK)

    ids = layout.input_ids[:, : layout.prompt_length].copy()
    for row, start in enumerate(layout.soft_start):
        ids[row, start : start + ATTACK.num_embeddings] = token
    stop = default_stop_tokens(tokenizer)
    expected = generate(handle.model, ids, layout.attention_mask[:, : layout.prompt_length],
                        max_new_tokens=ATTACK.max_new_tokens, eos_token_ids=stop, pad_token_id=tokenizer.pad_token_id)
    expected_texts = [tokenizer.decode([t for t in row if t not in stop], skip_special_tokens=True) for row in expected]
    assert texts == expected_texts


# ---------------------------------------------------------------- report on a tiny run


@pytest.fixture(scope="module")
def tiny_run_dir(tmp_path_factory):
    return tiny_run(tmp_path_factory.mktemp("tiny_run"))


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"script_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_evaluate_writes_report_files(tiny_run_dir, tmp_path):
    data = tiny_run_dir.parent
    out = tmp_path / "eval"
    load_script("evaluate").main([
        "--trained", str(tiny_run_dir), "--out", str(out),
        "--sets", f"harmful_completions={data}/harmful.jsonl", f"benign_completions={data}/benign.jsonl",
        f"harmful_prompts={data}/harmful.jsonl?limit=3", f"benign_prompts={data}/benign.jsonl?limit=3",
        "--max-new-tokens", "4", "--batch-size", "4", "--request-length", "16", "--completion-length", "8",
        # A random model's text scores about -ln(vocab size) per token; count it as fluent here.
        "--min-log-likelihood", "-100",
    ])
    for name in ("report.json", "report.md", "training_curves.png", "layer_cosines.png"):
        assert (out / name).is_file(), name

    report = json.loads((out / "report.json").read_text())
    assert report["target_layers"] == [1, 2]
    assert set(report["generation"]) == {"harmful", "benign"}
    assert set(report["representation"]) == {"harmful", "benign", "harmful/base_responses", "benign/base_responses"}
    harmful = report["representation"]["harmful"]
    assert len(harmful["cosine"]) == 4  # embeddings + 3 layers
    assert harmful["cosine"][0] == pytest.approx(1.0)  # adapters cannot change the embeddings
    assert report["training"]["logged_steps"] == 2
    assert "| blocked (harmful prompts) | harmful |" in (out / "report.md").read_text()


def test_same_model_compares_equal(tiny_run_dir, tmp_path):
    from cbjax.evaluation.completions import compare_on_texts
    from cbjax.evaluation.sets import parse_set_spec, load_set
    from cbjax.evaluation.texts import text_rows

    model_dir = str(tiny_run_dir.parent / "model")
    pair = load_pair(model_dir, model_dir)
    examples = load_set(parse_set_spec(f"harmful_completions={tiny_run_dir.parent}/harmful.jsonl"), None).examples
    rows = text_rows(pair.tokenizer, examples, request_length=16, completion_length=8)
    result = compare_on_texts(pair.base, pair.trained, rows, batch_size=3)
    np.testing.assert_allclose(result["cosine"], 1.0, atol=1e-5)
    np.testing.assert_allclose(result["norm_change"], 0.0, atol=1e-6)
    assert result["base_nll"] == pytest.approx(result["trained_nll"])
    assert result["completion_tokens"] == int(rows.completion_mask.sum())


# ---------------------------------------------------------------- benchmark FLOP count


def test_step_flops_hand_count():
    config = ModelConfig(family="llama", vocab_size=32, hidden_size=8, intermediate_size=12, num_layers=4,
                         num_heads=2, num_kv_heads=1, head_dim=4, norm_eps=1e-6, max_position_embeddings=64,
                         tie_word_embeddings=True)
    flops = step_flops(config, StepShape(batch=1, rerouting_length=3, retain_length=2),
                       target_layers=(1, 2), adapted_layers=(0, 1), lora_r=2)
    tokens = 5  # 3 rerouting + 2 retain
    # Per token and layer: q 8x8, k 8x4, v 8x4, o 8x8, gate 8x12, up 8x12, down 12x8 = 480 multiply-adds.
    layer = 2 * 480
    assert flops["frozen_forward"] == tokens * 2 * layer == 9600
    assert flops["adapted_forward"] == 9600
    # Both layers backpropagate, except q, k, v of layer 0 (they read the embeddings): 2 * (64 + 32 + 32).
    assert flops["input_gradient"] == tokens * (2 * layer - 2 * 128) == 8320
    # Adapter forward per token and layer: 2 r (in + out) = 4 * (16 + 12 + 12 + 16 + 20 + 20 + 20) = 464.
    # Backward twice that, minus x-gradient through A for q, k, v in layer 0: 3 * 2 * 8 * 2 = 96 per token.
    assert flops["adapter"] == tokens * 2 * 464 + 2 * tokens * 2 * 464 - tokens * 96 == 13440
    # Attention per row and layer: 2 * 2 * heads 2 * head_dim 4 * causal pairs (6 for length 3, 3 for 2) = 288.
    # Frozen and adapted forwards over 2 layers, plus a backward of twice the adapted forward.
    assert flops["attention"] == 2 * 2 * 288 + 2 * 2 * 288 == 2304
    assert flops["total"] == 9600 + 9600 + 8320 + 13440 + 2304


def test_probe_script_train_and_apply(tiny_run_dir, tmp_path):
    data = tiny_run_dir.parent
    probe_script = load_script("probe")
    common = ["--model", str(tiny_run_dir), "--request-length", "16", "--completion-length", "8"]
    probe_script.main(["train", *common, "--layer", "2", "--harmful", f"{data}/harmful.jsonl",
                       "--benign", f"{data}/benign.jsonl", "--out", str(tmp_path / "probe")])
    metrics = json.loads((tmp_path / "probe" / "metrics.json").read_text())
    assert metrics["held_out"]["harmful_texts"] == 2  # 30% of 8, rounded
    assert 0.0 <= metrics["held_out"]["detection_rate"] <= 1.0

    out = tmp_path / "applied.json"
    probe_script.main(["apply", *common, "--probe", str(tmp_path / "probe"), "--out", str(out),
                       "--sets", f"harmful_completions={data}/harmful.jsonl"])
    applied = json.loads(out.read_text())
    assert applied["sets"]["harmful"]["texts"] == 8


def test_attack_script_writes_results(tiny_run_dir, tmp_path):
    data = tiny_run_dir.parent
    load_script("attack").main([
        "--trained", str(tiny_run_dir), "--out", str(tmp_path), "--sets", f"{data}/harmful.jsonl",
        "--limit", "3", "--batch-size", "2", "--steps", "3", "--num-embeddings", "2", "--target", "w01",
        "--max-new-tokens", "3",
    ])
    results = json.loads((tmp_path / "attack.json").read_text())
    assert results["prompts"] == 3
    for which in ("base", "trained"):
        assert len(results[which]["responses"]) == 3
        assert results[which]["steps_per_batch"] == [3, 3]
        assert 0.0 <= results[which]["attack_success"] <= 1.0


def test_benchmark_best_matmul_per_framework(capsys):
    benchmark = load_script("benchmark")
    runs = {
        "cbjax": [{"projection_matmul_flops_per_second": {"down": 100e9}},
                  {"projection_matmul_flops_per_second": {"down": 150e9}}],
        "cbjax-remat": [{"projection_matmul_flops_per_second": {"down": 120e9}}],
        "torch-lean": [{"projection_matmul_flops_per_second": {"down": 300e9}}],
        "torch-reference": [{}],
    }
    best = benchmark.best_projection_matmuls(runs)
    assert best == {"down": {"jax": 150e9, "torch": 300e9}}
    benchmark.print_projection_matmuls(best)
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.split() == ["down", "jax", "150.0", "torch", "300.0", "torch/jax", "2.00x"]


@pytest.mark.parametrize("script, argv", [
    ("evaluate", ["--trained", "run", "--limit", "0"]),
    ("attack", ["--trained", "run", "--batch-size", "0"]),
    ("probe", ["train", "--model", "run", "--steps", "-1"]),
])
def test_script_counts_must_be_positive(script, argv, capsys):
    with pytest.raises(SystemExit):
        load_script(script).parse_args(argv)
    assert "must be at least 1" in capsys.readouterr().err


def test_demo_sets_follow_the_limit():
    from cbjax.data import demo_prompts
    from cbjax.evaluation.sets import demo_sets

    full = {s.name: s for s in demo_sets()}
    limited = {s.name: s for s in demo_sets(limit=2)}

    assert len(full["demo_harmful"].examples) == len(demo_prompts.HARMFUL_HELD_OUT)
    assert [len(s.examples) for s in limited.values()] == [2, 2]
    assert limited["demo_harmful"].examples[1] == full["demo_harmful"].examples[len(full["demo_harmful"].examples) // 2]

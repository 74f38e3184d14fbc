"""The converters: Hugging Face <-> Orbax params bit-exact, training-run exports, GGUF, bad inputs."""

from __future__ import annotations

import copy
import importlib.machinery
import importlib.util
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import AutoModelForCausalLM, AutoTokenizer

from cbjax import lora as lora_lib
from cbjax.config import config_from_dict
from cbjax.convert import orbax_export
from cbjax.convert.hf_export import convert_to_hf, export_model, parse_size
from cbjax.convert.orbax_export import convert_to_orbax
from cbjax.convert.orbax_params import flatten, load_params_model, restore_params
from cbjax.convert.peft_export import export_peft
from cbjax.convert.run_adapters import adapter_pairs, lora_deltas
from cbjax.convert.sources import open_model_source
from cbjax.models import abstract_model
from cbjax.run import TrainedRun, adapted_model, load_run
from cbjax.weights.hf_checkpoint import INDEX_FILE, SINGLE_FILE, HFCheckpoint
from cbjax.weights.load import load_model
from cbjax.weights.safetensors_io import CheckpointError
from tests.hf_reference import left_padded_batch, max_abs_diff_on_valid
from tests.test_gpt2_parity import tiny_gpt2
from tests.test_llama_parity import tiny_llama
from tests.test_mistral_parity import tiny_mistral
from tests.test_train_step import synthetic_batch

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-4
VOCAB = 128
SMALL_SHARDS = "50KB"

TINY_MODELS = {
    "gpt2": lambda: tiny_gpt2(),
    "llama_tied": lambda: tiny_llama(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True),
    "llama_untied_gqa": lambda: tiny_llama(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    "mistral": lambda: tiny_mistral(sliding_window=8),
}


def save_hf(hf_model, directory: Path, *, dtype: str = "float32", sharded: bool = False) -> Path:
    model = copy.deepcopy(hf_model).to(getattr(torch, dtype))
    model.save_pretrained(directory, max_shard_size=SMALL_SHARDS if sharded else "5GB")
    assert (directory / INDEX_FILE).exists() == sharded
    return directory


def tensor_bytes(checkpoint, name: str) -> tuple[str, tuple[int, ...], bytes]:
    array = np.ascontiguousarray(checkpoint.get(name))
    return str(array.dtype), array.shape, array.tobytes()


def assert_same_tensors(expected_dir: Path, actual_dir: Path, names=None) -> None:
    """Assert that both directories hold the same tensor names with the same dtypes, shapes and bytes."""
    expected, actual = HFCheckpoint(expected_dir), HFCheckpoint(actual_dir)
    if names is None:
        assert sorted(actual.names()) == sorted(expected.names())
        names = expected.names()
    for name in names:
        assert tensor_bytes(actual, name) == tensor_bytes(expected, name), name


def leftovers(directory: Path) -> list[str]:
    """Staging folders and backups the converters may have left next to their output."""
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


# Hugging Face -> Orbax -> Hugging Face.


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_round_trip_bit_exact(tmp_path, name, dtype, sharded):
    source = save_hf(TINY_MODELS[name](), tmp_path / "source", dtype=dtype, sharded=sharded)

    convert_to_orbax(source, tmp_path / "params")
    convert_to_hf(tmp_path / "params", tmp_path / "hf", max_shard_size=SMALL_SHARDS if sharded else "5GB")

    assert_same_tensors(source, tmp_path / "hf")
    assert (tmp_path / "hf" / INDEX_FILE).exists() == sharded
    assert (tmp_path / "hf" / SINGLE_FILE).exists() == (not sharded)
    for filename in ("config.json", "generation_config.json"):
        assert (tmp_path / "hf" / filename).read_bytes() == (source / filename).read_bytes(), filename
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_params_tree_is_model_state(tmp_path, name):
    source = save_hf(TINY_MODELS[name](), tmp_path / "source", dtype="bfloat16")
    convert_to_orbax(source, tmp_path / "params")

    params = restore_params(tmp_path / "params")
    loaded = load_model(source)
    expected = nnx.to_pure_dict(nnx.state(abstract_model(loaded.config)))

    assert jax.tree.structure(params) == jax.tree.structure(expected)
    for path, array in flatten(params).items():
        assert array.dtype == ml_dtypes.bfloat16, path
    if loaded.config.tie_word_embeddings and loaded.config.family != "gpt2":
        assert "lm_head" not in params


def test_params_directory_loads_for_training(tmp_path):
    source = save_hf(TINY_MODELS["llama_untied_gqa"](), tmp_path / "source")
    convert_to_orbax(source, tmp_path / "params")

    expected = nnx.to_pure_dict(nnx.state(load_model(source, num_layers=2).model))
    actual = nnx.to_pure_dict(nnx.state(load_model(tmp_path / "params", num_layers=2).model))

    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, b in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_export_loads_in_transformers(tmp_path, name):
    hf_model = TINY_MODELS[name]()
    convert_to_orbax(save_hf(hf_model, tmp_path / "source"), tmp_path / "params")
    convert_to_hf(tmp_path / "params", tmp_path / "hf")

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")

    assert type(reloaded) is type(hf_model)
    expected = hf_model.state_dict()
    for key, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, expected[key]), key
    if hf_model.config.tie_word_embeddings:
        assert reloaded.get_output_embeddings().weight.data_ptr() == reloaded.get_input_embeddings().weight.data_ptr()


def test_params_model_matches_hf_load(tmp_path):
    source = save_hf(TINY_MODELS["llama_untied_gqa"](), tmp_path / "source")
    convert_to_orbax(source, tmp_path / "params")
    ids, mask, _ = left_padded_batch(VOCAB, [9, 5], 9)

    from_params = load_params_model(tmp_path / "params").model(jnp.asarray(ids), jnp.asarray(mask))
    from_hf = load_model(source).model(jnp.asarray(ids), jnp.asarray(mask))

    np.testing.assert_array_equal(np.asarray(from_params.logits), np.asarray(from_hf.logits))


def test_dtype_option_casts_like_torch(tmp_path):
    hf_model = TINY_MODELS["llama_untied_gqa"]()
    source = save_hf(hf_model, tmp_path / "source")
    expected = save_hf(hf_model, tmp_path / "expected", dtype="bfloat16")

    convert_to_orbax(source, tmp_path / "params", dtype="bfloat16")
    convert_to_hf(tmp_path / "params", tmp_path / "hf")

    assert_same_tensors(expected, tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "hf").dtype == torch.bfloat16


def save_torch_bin(hf_model, directory: Path, sharded: bool) -> Path:
    """Save `hf_model` as pytorch_model.bin files, with the tensors that save_pretrained writes."""
    hf_model.save_pretrained(directory)
    names = HFCheckpoint(directory).names()
    (directory / SINGLE_FILE).unlink()
    state = {name: hf_model.state_dict()[name].clone() for name in names}
    if not sharded:
        torch.save(state, directory / "pytorch_model.bin")
        return directory
    halves = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    weight_map = {}
    for filename, part in halves.items():
        torch.save({name: state[name] for name in part}, directory / filename)
        weight_map.update(dict.fromkeys(part, filename))
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return directory


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_torch_bin_converts_bit_exact(tmp_path, sharded):
    hf_model = TINY_MODELS["llama_tied"]().to(torch.bfloat16)
    expected = save_hf(hf_model, tmp_path / "expected", dtype="bfloat16")
    source = save_torch_bin(hf_model, tmp_path / "source", sharded)

    convert_to_orbax(source, tmp_path / "params")
    convert_to_hf(tmp_path / "params", tmp_path / "hf")

    assert_same_tensors(expected, tmp_path / "hf")


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("50kb") == 50_000
    assert parse_size("2gib") == 2 * 2**30
    assert parse_size("1.5MB") == 1_500_000
    assert parse_size("1000") == 1000
    for invalid in ("5 parsecs", "-1GB", "0MB", "GB"):
        with pytest.raises(ValueError, match="invalid shard size"):
            parse_size(invalid)


# Training runs.

TARGET_LAYERS = (1, 2)


class SyntheticData:
    """Stands in for `CircuitBreakerData`: fixed random batches of the tiny vocabulary."""

    def batch(self, step: int) -> dict:
        return synthetic_batch(step)

    def validation_batch(self) -> dict:
        return synthetic_batch(1000)

    def summary(self) -> dict:
        return {"rows": "synthetic"}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A three-step training run on a tiny three-layer Llama; layer 2 is above the highest target layer."""
    from cbjax import trainer

    root = tmp_path_factory.mktemp("run")
    base = save_hf(TINY_MODELS["llama_untied_gqa"](), root / "base")
    config = config_from_dict(
        {
            "model": {"path": str(base)},
            "lora": {"r": 4, "alpha": 8.0, "dropout": 0.0},
            "loss": {"target_layers": list(TARGET_LAYERS), "alpha": 10.0},
            "optim": {"learning_rate": 0.01},
            "train": {"steps": 3, "log_every": 1, "validate_every": 3, "checkpoint_every": 3,
                      "output_dir": str(root / "run")},
        }
    )
    setup = trainer.build_setup(config, tokenizer=object(), data=SyntheticData())
    trainer.train(config, setup=setup)
    return root / "run", base


def hf_logits(model, ids, mask) -> np.ndarray:
    # Positions count real tokens only, as cbjax derives them from the mask; GPT-2's learned
    # positions would otherwise differ on left-padded rows.
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                    position_ids=torch.from_numpy(positions))
    return out.logits.float().numpy()


def test_merged_run_matches_adapted_model(tmp_path, trained_run):
    run_dir, base = trained_run
    run = load_run(run_dir)
    ids, mask, _ = left_padded_batch(VOCAB, [12, 7, 3], 12)

    convert_to_hf(run_dir, tmp_path / "merged")
    merged = hf_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged"), ids, mask)
    adapted = np.asarray(adapted_model(run)(jnp.asarray(ids), jnp.asarray(mask)).logits)
    base_logits = hf_logits(AutoModelForCausalLM.from_pretrained(base), ids, mask)

    assert max(float(np.abs(lora_b).max()) for _, lora_b in adapter_pairs(run).values()) > 0
    assert max_abs_diff_on_valid(base_logits, adapted, mask) > 1e-3, "training left the model unchanged"
    diff = max_abs_diff_on_valid(merged, adapted, mask)
    assert diff < TOLERANCE, f"merged logits: max abs diff {diff:.2e}"


def test_merged_run_keeps_untrained_tensors(tmp_path, trained_run):
    run_dir, base = trained_run
    convert_to_hf(run_dir, tmp_path / "merged")
    names = HFCheckpoint(base).names()
    adapted = {f"model.layers.{layer}.{module}.weight" for layer in range(max(TARGET_LAYERS))
               for module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    untouched = [name for name in names if name not in adapted]

    assert any(name.startswith(f"model.layers.{max(TARGET_LAYERS)}.") for name in untouched)
    assert_same_tensors(base, tmp_path / "merged", untouched)
    assert sorted(HFCheckpoint(tmp_path / "merged").names()) == sorted(names)
    for name in adapted:
        assert tensor_bytes(HFCheckpoint(tmp_path / "merged"), name) != tensor_bytes(HFCheckpoint(base), name), name
    assert (tmp_path / "merged" / "config.json").read_bytes() == (base / "config.json").read_bytes()


def test_peft_export_matches_adapted_model(tmp_path, trained_run):
    from peft import PeftModel

    run_dir, base = trained_run
    run = load_run(run_dir)
    ids, mask, _ = left_padded_batch(VOCAB, [12, 7, 3], 12)

    convert_to_hf(run_dir, tmp_path / "adapter", adapters_only=True)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "adapter")
    adapted = np.asarray(adapted_model(run)(jnp.asarray(ids), jnp.asarray(mask)).logits)

    diff = max_abs_diff_on_valid(hf_logits(peft_model, ids, mask), adapted, mask)
    assert diff < TOLERANCE, f"PEFT logits: max abs diff {diff:.2e}"
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 8.0, 0.0)
    assert config["layers_to_transform"] == list(range(max(TARGET_LAYERS)))
    assert config["base_model_name_or_path"] == str(base)
    weights = _safetensors(tmp_path / "adapter" / "adapter_model.safetensors")
    assert weights["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 64)
    assert weights["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"].shape == (64, 4)
    assert len(weights) == 2 * 7 * max(TARGET_LAYERS)


def _safetensors(path: Path) -> dict[str, np.ndarray]:
    from cbjax.weights.safetensors_io import SafetensorsFile

    file = SafetensorsFile(path)
    return {name: np.array(file.get(name)) for name in file.names()}


def untrained_run(base: Path, layers: tuple[int, ...]) -> TrainedRun:
    """A run on `base` built without training: default adapters on `layers`, with random lora_b."""
    config = config_from_dict({"model": {"path": str(base)}, "lora": {"r": 4, "alpha": 8.0, "dropout": 0.0},
                               "loss": {"target_layers": [max(layers) + 1]}})
    loaded = load_model(base, num_layers=max(layers) + 1)
    lora_lib.add_lora(loaded.model, config.lora, layers, seed=config.train.seed)
    key = jax.random.key(3)
    for _, node in nnx.iter_graph(loaded.model):
        if isinstance(node, lora_lib.Linear) and node.lora_b is not None:
            key, sub = jax.random.split(key)
            node.lora_b.set_value(0.05 * jax.random.normal(sub, node.lora_b.get_value().shape))
    _, adapters, _ = lora_lib.split_lora(loaded.model)
    return TrainedRun(config, str(base), adapters, layers, 0)


def test_gpt2_merged_and_peft_exports(tmp_path):
    from peft import PeftModel

    run = untrained_run(save_hf(TINY_MODELS["gpt2"](), tmp_path / "base"), (0, 1))
    base = open_model_source(run.model_path)
    ids, mask, _ = left_padded_batch(VOCAB, [10, 4], 10)
    adapted = np.asarray(adapted_model(run)(jnp.asarray(ids), jnp.asarray(mask)).logits)

    export_model(base, tmp_path / "merged", deltas=lora_deltas(run), max_shard_bytes=parse_size("5GB"))
    export_peft(run, base.config, tmp_path / "adapter")
    merged = hf_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged"), ids, mask)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run.model_path), tmp_path / "adapter")

    assert max_abs_diff_on_valid(merged, adapted, mask) < TOLERANCE
    assert max_abs_diff_on_valid(hf_logits(peft_model, ids, mask), adapted, mask) < TOLERANCE
    weights = _safetensors(tmp_path / "adapter" / "adapter_model.safetensors")
    assert weights["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"].shape == (4, 64)
    assert weights["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"].shape == (192, 4)
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["fan_in_fan_out"] is True


def test_merged_run_on_gguf_base(tmp_path):
    from tests.test_gguf import TINY, tiny_llama_tensors, write_tiny_gguf

    # Standard-normal weights would give logits in the hundreds; scale them to a trained model's range.
    tensors = {name: t if "norm" in name else 0.1 * t for name, t in tiny_llama_tensors(False, False).items()}
    gguf_path = write_tiny_gguf(tmp_path / "tiny.gguf", tensors)
    run = untrained_run(gguf_path, (0,))
    ids, mask, _ = left_padded_batch(TINY["vocab"], [8, 5], 8)
    adapted = np.asarray(adapted_model(run)(jnp.asarray(ids), jnp.asarray(mask)).logits)
    base_logits = np.asarray(load_model(gguf_path).model(jnp.asarray(ids), jnp.asarray(mask)).logits)

    export_model(open_model_source(gguf_path), tmp_path / "merged", deltas=lora_deltas(run),
                 max_shard_bytes=parse_size("5GB"))
    merged_model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")

    assert merged_model.config.num_hidden_layers == TINY["layers"]
    assert merged_model.config.num_key_value_heads == TINY["kv_heads"]
    assert merged_model.dtype == torch.float32
    diff = max_abs_diff_on_valid(hf_logits(merged_model, ids, mask), adapted, mask)
    assert diff < TOLERANCE, f"merged logits: max abs diff {diff:.2e}"
    assert max_abs_diff_on_valid(base_logits, adapted, mask) > 1e-2, "the adapters left the model unchanged"


# The real SmolLM2 GGUF file.


@pytest.mark.slow
def test_smollm2_export_matches_cbjax_generation(tmp_path, smollm2_gguf, smollm2_tokenizer):
    from cbjax.generate import default_stop_tokens, encode_prompt, generate

    convert_to_orbax(smollm2_gguf, tmp_path / "params")
    convert_to_hf(tmp_path / "params", tmp_path / "hf")
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    hf_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    prompt = "What is the capital of France?"

    prompt_ids = encode_prompt(hf_tokenizer, prompt, chat=True)
    assert prompt_ids == encode_prompt(smollm2_tokenizer, prompt, chat=True)
    ids = np.asarray([prompt_ids])
    with torch.no_grad():
        hf_tokens = hf_model.generate(torch.from_numpy(ids), attention_mask=torch.ones_like(torch.from_numpy(ids)),
                                      max_new_tokens=6, do_sample=False)[0, ids.shape[1]:].tolist()
    cbjax_tokens = generate(load_model(smollm2_gguf).model, ids, np.ones_like(ids), max_new_tokens=6,
                            eos_token_ids=default_stop_tokens(smollm2_tokenizer),
                            pad_token_id=smollm2_tokenizer.pad_token_id)[0].tolist()

    assert hf_tokens == cbjax_tokens[: len(hf_tokens)]
    assert len(hf_tokens) > 1


# Bad inputs: clear errors, nothing partial left behind.


@pytest.fixture
def llama_source(tmp_path) -> Path:
    return save_hf(TINY_MODELS["llama_tied"](), tmp_path / "source", sharded=True)


def test_existing_output_needs_overwrite(tmp_path, llama_source):
    out = tmp_path / "params"
    out.mkdir()
    (out / "keep.txt").write_text("old")

    with pytest.raises(FileExistsError, match="Pass --overwrite"):
        convert_to_orbax(llama_source, out)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]

    convert_to_orbax(llama_source, out, overwrite=True)
    assert not (out / "keep.txt").exists()
    assert (out / "params").is_dir()
    assert leftovers(tmp_path) == []


def test_failed_overwrite_keeps_old_output(tmp_path, llama_source, monkeypatch):
    out = tmp_path / "params"
    out.mkdir()
    (out / "keep.txt").write_text("old")

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(orbax_export, "save_params", fail)
    with pytest.raises(OSError, match="disk full"):
        convert_to_orbax(llama_source, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert leftovers(tmp_path) == []


def test_truncated_shard_rejected(tmp_path, llama_source):
    shard = sorted(llama_source.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])

    with pytest.raises(CheckpointError, match="truncated safetensors file") as raised:
        convert_to_orbax(llama_source, tmp_path / "params")
    assert str(shard) in str(raised.value)
    assert not (tmp_path / "params").exists()
    assert leftovers(tmp_path) == []


def test_index_naming_missing_file_rejected(tmp_path, llama_source):
    index = json.loads((llama_source / INDEX_FILE).read_text())
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = "model-00099-of-00099.safetensors"
    (llama_source / INDEX_FILE).write_text(json.dumps(index))

    with pytest.raises(CheckpointError, match="missing file model-00099-of-00099.safetensors"):
        convert_to_orbax(llama_source, tmp_path / "params")
    assert not (tmp_path / "params").exists()
    assert leftovers(tmp_path) == []


def test_unsupported_architecture_rejected(tmp_path, llama_source):
    config = json.loads((llama_source / "config.json").read_text())
    config["model_type"] = "opt"
    (llama_source / "config.json").write_text(json.dumps(config))

    with pytest.raises(ValueError, match="model_type 'opt' is not supported"):
        convert_to_orbax(llama_source, tmp_path / "params")
    assert not (tmp_path / "params").exists()


def test_tensors_of_other_architecture_rejected(tmp_path, llama_source):
    gpt2 = save_hf(TINY_MODELS["gpt2"](), tmp_path / "gpt2")
    shutil.copyfile(llama_source / "config.json", gpt2 / "config.json")

    with pytest.raises(CheckpointError, match="does not match the llama architecture") as raised:
        convert_to_orbax(gpt2, tmp_path / "params")
    assert "missing tensors" in str(raised.value)
    assert "model.embed_tokens.weight" in str(raised.value)
    assert "unexpected tensors" in str(raised.value)
    assert "transformer.h.0.attn.c_attn.weight" in str(raised.value)
    assert not (tmp_path / "params").exists()
    assert leftovers(tmp_path) == []


def test_wrong_shape_rejected(tmp_path, llama_source):
    config = json.loads((llama_source / "config.json").read_text())
    config["intermediate_size"] = 80
    (llama_source / "config.json").write_text(json.dumps(config))

    expected = r"gate_proj.weight' has shape \(96, 64\), but the model config expects \(80, 64\)"
    with pytest.raises(CheckpointError, match=expected):
        convert_to_orbax(llama_source, tmp_path / "params")
    assert leftovers(tmp_path) == []


def test_output_inside_source_rejected(tmp_path, llama_source):
    convert_to_orbax(llama_source, tmp_path / "params")

    with pytest.raises(ValueError, match="contains the source"):
        convert_to_hf(tmp_path / "params", tmp_path / "params", overwrite=True)
    assert (tmp_path / "params" / "params").is_dir()


def test_export_needs_params_or_run(tmp_path, llama_source):
    with pytest.raises(ValueError, match="neither a params directory .* nor a training run"):
        convert_to_hf(llama_source, tmp_path / "hf")
    convert_to_orbax(llama_source, tmp_path / "params")
    with pytest.raises(ValueError, match="--adapters-only, --step and --base-model need a training run"):
        convert_to_hf(tmp_path / "params", tmp_path / "hf", adapters_only=True)
    assert not (tmp_path / "hf").exists()


# The scripts.


def load_script(name: str):
    path = REPO / "convert" / name
    loader = importlib.machinery.SourceFileLoader(f"convert_{name}", str(path))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["hf_to_orbax", "orbax_to_hf", "gguf_to_orbax"])
def test_script_help(name, capsys):
    assert (REPO / "convert" / name).stat().st_mode & 0o111
    assert (REPO / "convert" / name).read_text().startswith("#!/usr/bin/env python3\n")
    with pytest.raises(SystemExit) as exited:
        load_script(name).main(["--help"])
    assert exited.value.code == 0
    assert "examples:" in capsys.readouterr().out


def test_scripts_convert_and_report_errors(tmp_path, llama_source, capsys):
    hf_to_orbax, orbax_to_hf = load_script("hf_to_orbax"), load_script("orbax_to_hf")

    assert hf_to_orbax.main([str(llama_source), str(tmp_path / "params")]) == 0
    assert orbax_to_hf.main([str(tmp_path / "params"), str(tmp_path / "hf"), "--max-shard-size", "50KB"]) == 0
    assert_same_tensors(llama_source, tmp_path / "hf")

    capsys.readouterr()
    assert hf_to_orbax.main([str(llama_source), str(tmp_path / "params")]) == 1
    assert "hf_to_orbax: error: output" in capsys.readouterr().err

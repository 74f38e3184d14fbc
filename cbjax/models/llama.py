"""The Llama family (Llama 2, 3, 3.x, SmolLM2, Mistral) as transformers' `LlamaForCausalLM` defines it.

Mistral is the same architecture plus an optional sliding attention window, so it is this class
with `config.sliding_window` set. The layer stack is a Python loop over `nnx.List` rather than a
scan: layers can carry LoRA adapters or not, and the forward can stop after any layer, which a
scan over stacked weights would make awkward. Compile time grows with depth (about a second per
layer on CPU), which is acceptable for the 30-32 layers of the supported models.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from cbjax.models import rope
from cbjax.models.attention import ATTENTION_IMPLEMENTATIONS, attend, mask_and_positions
from cbjax.models.config import ModelConfig
from cbjax.models.kv_cache import KVCache, LayerCache
from cbjax.models.layers import Embed, Linear, RMSNorm
from cbjax.models.output import ModelOutput, collect_hidden_states, resolve_stop_layer
from cbjax.models.remat import call_layer, check_remat
from cbjax.sharding import HIDDEN_AXES, MLP_HIDDEN_AXES, constrain


class Attention(nnx.Module):
    def __init__(self, config: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        hidden, head_dim = config.hidden_size, config.head_dim
        kw = dict(use_bias=config.attention_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = Linear(hidden, config.num_heads * head_dim, **kw)
        self.k_proj = Linear(hidden, config.num_kv_heads * head_dim, **kw)
        self.v_proj = Linear(hidden, config.num_kv_heads * head_dim, **kw)
        self.o_proj = Linear(config.num_heads * head_dim, hidden, **kw)
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = head_dim
        self.sliding_window = config.sliding_window

    def __call__(self, x_BxSxD, cos, sin, mask, *, use_lora, rngs, cache: LayerCache | None, attention="xla"):
        batch, seq, _ = x_BxSxD.shape
        q = self.q_proj(x_BxSxD, use_lora=use_lora, dropout_rng=rngs(0))
        k = self.k_proj(x_BxSxD, use_lora=use_lora, dropout_rng=rngs(1))
        v = self.v_proj(x_BxSxD, use_lora=use_lora, dropout_rng=rngs(2))
        q = rope.apply_rotary(q.reshape(batch, seq, self.num_heads, self.head_dim), cos, sin)
        k = rope.apply_rotary(k.reshape(batch, seq, self.num_kv_heads, self.head_dim), cos, sin)
        v = v.reshape(batch, seq, self.num_kv_heads, self.head_dim)

        if cache is not None:
            cache = cache.write(k, v)
            k, v = cache.keys, cache.values

        out = attend(q, k, v, mask, attention, self.sliding_window).reshape(batch, seq, self.num_heads * self.head_dim)
        return self.o_proj(out, use_lora=use_lora, dropout_rng=rngs(3)), cache


class MLP(nnx.Module):
    def __init__(self, config: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(use_bias=config.mlp_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = Linear(config.hidden_size, config.intermediate_size, **kw)
        self.up_proj = Linear(config.hidden_size, config.intermediate_size, **kw)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, **kw)

    def __call__(self, x, *, use_lora, rngs):
        gate = self.gate_proj(x, use_lora=use_lora, dropout_rng=rngs(4))
        up = self.up_proj(x, use_lora=use_lora, dropout_rng=rngs(5))
        hidden = constrain(jax.nn.silu(gate) * up, MLP_HIDDEN_AXES)
        return self.down_proj(hidden, use_lora=use_lora, dropout_rng=rngs(6))


class DecoderLayer(nnx.Module):
    def __init__(self, config: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        norm_kw = dict(eps=config.norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.input_layernorm = RMSNorm(config.hidden_size, **norm_kw)
        self.self_attn = Attention(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, **norm_kw)
        self.mlp = MLP(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, cos, sin, mask, *, use_lora, rngs, cache=None, attention="xla"):
        attn_out, cache = self.self_attn(
            self.input_layernorm(x), cos, sin, mask, use_lora=use_lora, rngs=rngs, cache=cache, attention=attention
        )
        x = x + attn_out
        x = x + self.mlp(self.post_attention_layernorm(x), use_lora=use_lora, rngs=rngs)
        return x, cache


class DropoutKeys:
    """Per-projection dropout keys for one layer, derived by folding in a fixed projection id."""

    def __init__(self, layer_rng: jax.Array | None):
        self.layer_rng = layer_rng

    def __call__(self, projection_id: int) -> jax.Array | None:
        if self.layer_rng is None:
            return None
        return jax.random.fold_in(self.layer_rng, projection_id)


class LlamaForCausalLM(nnx.Module):
    def __init__(
        self,
        config: ModelConfig,
        *,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        attention: str = "xla",
        remat: str = "none",
        rngs: nnx.Rngs,
    ):
        """`attention` is one of `ATTENTION_IMPLEMENTATIONS`, `remat` a key of `REMAT_POLICIES`."""
        self.config = config
        self.dtype = dtype
        set_execution(self, attention, remat)
        self.embed_tokens = Embed(config.vocab_size, config.hidden_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layers = nnx.List(
            [DecoderLayer(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs) for _ in range(config.built_layers)]
        )
        self.norm = nnx.data(None)
        self.lm_head = nnx.data(None)
        if config.builds_output:
            self.norm = RMSNorm(config.hidden_size, eps=config.norm_eps, dtype=dtype, param_dtype=param_dtype)
        if config.builds_output and not config.tie_word_embeddings:
            self.lm_head = Linear(
                config.hidden_size, config.vocab_size, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs
            )

    def __call__(
        self,
        input_ids: jax.Array | None,
        attention_mask: jax.Array | None = None,
        position_ids: jax.Array | None = None,
        *,
        inputs_embeds: jax.Array | None = None,
        stop_after_layer: int | None = None,
        return_logits: bool = True,
        use_lora: bool = True,
        dropout_rng: jax.Array | None = None,
        cache: KVCache | None = None,
    ) -> ModelOutput:
        """Run the model and return every hidden state up to `stop_after_layer` (see `ModelOutput`).

        `attention_mask` is 1 for real tokens and 0 for padding (left or right). Without
        `position_ids`, positions count real tokens only. With a `cache`, the inputs are written
        at `cache.index` and attend to everything cached before them.
        """
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds.astype(self.dtype)
        batch, seq, _ = x.shape
        stop = resolve_stop_layer(self.config, stop_after_layer)

        mask, position_ids, cache = mask_and_positions(self.config, attention_mask, position_ids, cache, batch, seq)
        cos, sin = rope.rotary_cos_sin(position_ids, rope.inverse_frequencies(self.config), self.dtype)

        x = constrain(x, HIDDEN_AXES)
        hidden_states = [x]
        new_layers = []
        for i in range(stop):
            layer_rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, i)
            layer_cache = None if cache is None else cache.layer(i)
            x, layer_cache = call_layer(
                self.layers[i], self.remat, x, cos, sin, mask,
                use_lora=use_lora, rngs=DropoutKeys(layer_rng), cache=layer_cache, attention=self.attention,
            )
            x = constrain(x, HIDDEN_AXES)
            hidden_states.append(x)
            new_layers.append(layer_cache)

        final = self.norm(x) if stop == self.config.num_layers else None
        logits = None
        if return_logits:
            if final is None:
                raise ValueError("logits need the full model: pass return_logits=False with stop_after_layer")
            logits = self.lm_logits(final)
        new_cache = None if cache is None else cache.advance(new_layers, seq)
        return ModelOutput(collect_hidden_states(hidden_states, final), logits, new_cache)

    def lm_logits(self, final_BxSxD: jax.Array) -> jax.Array:
        if self.lm_head is None:
            return self.embed_tokens.attend(final_BxSxD)
        return self.lm_head(final_BxSxD, use_lora=False)


def set_execution(model: nnx.Module, attention: str, remat: str) -> None:
    """Set how `model`'s forward runs: its attention implementation and its remat policy.

    Neither changes the result beyond rounding. Set them before `nnx.split`, because the
    graphdef records them.
    """
    if attention not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"model.attention {attention!r} is unknown; expected one of {ATTENTION_IMPLEMENTATIONS}")
    check_remat(remat)
    model.attention = attention
    model.remat = remat

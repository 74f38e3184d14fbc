"""GPT-2 as transformers' `GPT2LMHeadModel` defines it: learned positions, pre-LayerNorm blocks, tied head.

The call interface, the hidden-state indexing and the cache handling are those of
`cbjax.models.llama.LlamaForCausalLM`, so training, LoRA and generation treat both families alike.
transformers' `Conv1D` stores its weight (in, out), the layout of `Linear.kernel`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from cbjax.models.attention import attend, mask_and_positions
from cbjax.models.config import ModelConfig
from cbjax.models.kv_cache import KVCache, LayerCache
from cbjax.models.layers import Embed, LayerNorm, Linear
from cbjax.models.llama import DropoutKeys, set_execution
from cbjax.models.output import ModelOutput, collect_hidden_states, resolve_stop_layer
from cbjax.models.remat import call_layer
from cbjax.sharding import HIDDEN_AXES, MLP_HIDDEN_AXES, constrain

# transformers' ACT2FN names: `gelu_new` and `gelu_pytorch_tanh` are both the tanh approximation.
ACTIVATIONS = {
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


class GPT2Attention(nnx.Module):
    def __init__(self, config: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        hidden = config.hidden_size
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.c_attn = Linear(hidden, 3 * hidden, **kw)
        self.c_proj = Linear(hidden, hidden, **kw)
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim

    def __call__(self, x_BxSxD, mask, *, use_lora, rngs, cache: LayerCache | None, attention="xla"):
        batch, seq, hidden = x_BxSxD.shape
        qkv_BxSx3D = self.c_attn(x_BxSxD, use_lora=use_lora, dropout_rng=rngs(0))
        q, k, v = (
            t.reshape(batch, seq, self.num_heads, self.head_dim) for t in jnp.split(qkv_BxSx3D, 3, axis=-1)
        )

        if cache is not None:
            cache = cache.write(k, v)
            k, v = cache.keys, cache.values

        out_BxSxD = attend(q, k, v, mask, attention).reshape(batch, seq, hidden)
        return self.c_proj(out_BxSxD, use_lora=use_lora, dropout_rng=rngs(1)), cache


class GPT2MLP(nnx.Module):
    def __init__(self, config: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        if config.activation not in ACTIVATIONS:
            raise ValueError(
                f"GPT-2 activation_function {config.activation!r} is not supported; "
                f"expected one of {sorted(ACTIVATIONS)}"
            )
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.c_fc = Linear(config.hidden_size, config.intermediate_size, **kw)
        self.c_proj = Linear(config.intermediate_size, config.hidden_size, **kw)
        self.activation = config.activation

    def __call__(self, x, *, use_lora, rngs):
        hidden = ACTIVATIONS[self.activation](self.c_fc(x, use_lora=use_lora, dropout_rng=rngs(2)))
        hidden = constrain(hidden, MLP_HIDDEN_AXES)
        return self.c_proj(hidden, use_lora=use_lora, dropout_rng=rngs(3))


class GPT2Block(nnx.Module):
    def __init__(self, config: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        norm_kw = dict(eps=config.norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.ln_1 = LayerNorm(config.hidden_size, **norm_kw)
        self.attn = GPT2Attention(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.ln_2 = LayerNorm(config.hidden_size, **norm_kw)
        self.mlp = GPT2MLP(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, mask, *, use_lora, rngs, cache=None, attention="xla"):
        attn_out, cache = self.attn(self.ln_1(x), mask, use_lora=use_lora, rngs=rngs, cache=cache, attention=attention)
        x = x + attn_out
        x = x + self.mlp(self.ln_2(x), use_lora=use_lora, rngs=rngs)
        return x, cache


class GPT2LMHeadModel(nnx.Module):
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
        self.config = config
        self.dtype = dtype
        set_execution(self, attention, remat)
        embed_kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.wte = Embed(config.vocab_size, config.hidden_size, **embed_kw)
        self.wpe = Embed(config.max_position_embeddings, config.hidden_size, **embed_kw)
        self.layers = nnx.List(
            [GPT2Block(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs) for _ in range(config.built_layers)]
        )
        self.ln_f = nnx.data(None)
        if config.builds_output:
            self.ln_f = LayerNorm(config.hidden_size, eps=config.norm_eps, dtype=dtype, param_dtype=param_dtype)

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

        Arguments as in `LlamaForCausalLM.__call__`. Hidden state 0 is the token plus position
        embedding. Positions must stay below `config.max_position_embeddings`. Without a cache the
        input length is checked here; `cbjax.generate` checks prompts plus new tokens, and explicit
        `position_ids` are the caller's to keep in range.
        """
        tokens = self.wte(input_ids) if inputs_embeds is None else inputs_embeds.astype(self.dtype)
        batch, seq, _ = tokens.shape
        if cache is None:
            check_input_length(self.config, seq)
        stop = resolve_stop_layer(self.config, stop_after_layer)
        mask, position_ids, cache = mask_and_positions(self.config, attention_mask, position_ids, cache, batch, seq)
        x = constrain(tokens + self.wpe(position_ids), HIDDEN_AXES)

        hidden_states = [x]
        new_layers = []
        for i in range(stop):
            layer_rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, i)
            layer_cache = None if cache is None else cache.layer(i)
            x, layer_cache = call_layer(
                self.layers[i], self.remat, x, mask,
                use_lora=use_lora, rngs=DropoutKeys(layer_rng), cache=layer_cache, attention=self.attention,
            )
            x = constrain(x, HIDDEN_AXES)
            hidden_states.append(x)
            new_layers.append(layer_cache)

        final = self.ln_f(x) if stop == self.config.num_layers else None
        logits = None
        if return_logits:
            if final is None:
                raise ValueError("logits need the full model: pass return_logits=False with stop_after_layer")
            logits = self.lm_logits(final)
        new_cache = None if cache is None else cache.advance(new_layers, seq)
        return ModelOutput(collect_hidden_states(hidden_states, final), logits, new_cache)

    def lm_logits(self, final_BxSxD: jax.Array) -> jax.Array:
        return self.wte.attend(final_BxSxD)


def check_input_length(config: ModelConfig, seq: int) -> None:
    """Raise if an input of `seq` tokens needs more learned positions than the model has.

    Out of range, the position lookup would return NaN rows rather than fail.
    """
    if seq > config.max_position_embeddings:
        raise ValueError(
            f"GPT-2 has {config.max_position_embeddings} learned positions (n_positions), but the input "
            f"has {seq} tokens; shorten the sequences (data.request_length, data.response_length, "
            f"data.retain_length when training)"
        )

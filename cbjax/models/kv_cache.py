"""A fixed-size key/value cache for jitted generation.

Keys and values live in preallocated (layers, B, max_length, kv_heads, head_dim) buffers, so every
decoding step has the same shapes and compiles once. `key_valid` marks which slots hold real
tokens (left padding of the prompt stays invalid); `index` is the next slot to write.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from cbjax.models.attention import positions_from_mask


class LayerCache(NamedTuple):
    keys: jax.Array
    values: jax.Array
    index: jax.Array
    # The keys and values just written, so that `KVCache.advance` copies only these slots.
    new_keys: jax.Array | None = None
    new_values: jax.Array | None = None

    def write(self, k_BxSxKxD: jax.Array, v_BxSxKxD: jax.Array) -> LayerCache:
        start = (0, self.index, 0, 0)
        k_BxSxKxD = k_BxSxKxD.astype(self.keys.dtype)
        v_BxSxKxD = v_BxSxKxD.astype(self.values.dtype)
        keys = jax.lax.dynamic_update_slice(self.keys, k_BxSxKxD, start)
        values = jax.lax.dynamic_update_slice(self.values, v_BxSxKxD, start)
        return LayerCache(keys, values, self.index, k_BxSxKxD, v_BxSxKxD)


class KVCache(NamedTuple):
    keys: jax.Array
    values: jax.Array
    key_valid: jax.Array
    index: jax.Array

    @classmethod
    def create(cls, num_layers, batch, max_length, num_kv_heads, head_dim, dtype) -> KVCache:
        shape = (num_layers, batch, max_length, num_kv_heads, head_dim)
        return cls(
            keys=jnp.zeros(shape, dtype),
            values=jnp.zeros(shape, dtype),
            key_valid=jnp.zeros((batch, max_length), jnp.int32),
            index=jnp.zeros((), jnp.int32),
        )

    @property
    def max_length(self) -> int:
        return self.keys.shape[2]

    def extend_mask(self, new_mask_BxS: jax.Array) -> KVCache:
        key_valid = jax.lax.dynamic_update_slice(self.key_valid, new_mask_BxS.astype(jnp.int32), (0, self.index))
        return self._replace(key_valid=key_valid)

    def positions_of_new(self, seq: int) -> jax.Array:
        """Positions of the `seq` tokens about to be written, counting real tokens only."""
        all_positions = positions_from_mask(self.key_valid)
        return jax.lax.dynamic_slice_in_dim(all_positions, self.index, seq, axis=1)

    def layer(self, i: int) -> LayerCache:
        return LayerCache(self.keys[i], self.values[i], self.index)

    def advance(self, layers: list[LayerCache], seq: int) -> KVCache:
        """Store each layer's new slots and move the write index past them.

        Only the `seq` new positions are copied into the stacked buffers, not each layer's
        whole buffer, so a decoding step costs O(new tokens) writes rather than O(cache size).
        """
        keys = self.keys
        values = self.values
        for i, layer in enumerate(layers):
            start = (i, 0, self.index, 0, 0)
            keys = jax.lax.dynamic_update_slice(keys, layer.new_keys[None], start)
            values = jax.lax.dynamic_update_slice(values, layer.new_values[None], start)
        return self._replace(keys=keys, values=values, index=self.index + seq)

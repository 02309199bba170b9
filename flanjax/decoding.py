"""Greedy decoding for the encoder-decoder (jit-compiled, batched, with a KV cache).

The encoder runs once, the cross-attention keys and values are projected
once, and each step runs the decoder on one new token against cached keys and
values of the earlier ones.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


@functools.partial(jax.jit, static_argnames=("model", "max_len", "eos_id"))
def greedy(model, params, encoder_input_tokens, max_len: int, eos_id: int = 1):
  """Returns [batch, max_len] generated ids; 0 after each row's EOS."""
  variables = {"params": params}
  encoded = model.apply(variables, encoder_input_tokens, method=model.encode)
  state = model.apply(variables, encoded, encoder_input_tokens, max_len,
                      method=model.init_decode_state)
  b = encoder_input_tokens.shape[0]
  out = jnp.zeros((b, max_len), jnp.int32)
  token = jnp.zeros((b,), jnp.int32)  # BOS is the pad id, 0
  done = jnp.zeros((b,), bool)

  def cond(carry):
    i, _, _, _, done = carry
    return (i < max_len) & ~jnp.all(done)

  def body(carry):
    i, token, state, out, done = carry
    logits, state = model.apply(variables, state, encoder_input_tokens, token, i,
                                method=model.decode_step)
    nxt = jnp.where(done, 0, jnp.argmax(logits, axis=-1).astype(jnp.int32))
    out = out.at[:, i].set(nxt)
    return i + 1, nxt, state, out, done | (nxt == eos_id)

  *_, out, _ = jax.lax.while_loop(cond, body, (0, token, state, out, done))
  return out

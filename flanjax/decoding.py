"""Greedy decoding for the encoder-decoder (jit-compiled, batched).

The encoder runs once; the decoder re-reads its own prefix each step. Causal
masking makes position i independent of later positions, so the result equals
step-by-step decoding with a cache.
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
  b = encoder_input_tokens.shape[0]
  dec_in = jnp.zeros((b, max_len), jnp.int32)  # position 0 holds BOS = pad = 0
  out = jnp.zeros((b, max_len), jnp.int32)
  done = jnp.zeros((b,), bool)

  def cond(carry):
    i, _, _, done = carry
    return (i < max_len) & ~jnp.all(done)

  def body(carry):
    i, dec_in, out, done = carry
    logits = model.apply(variables, encoded, encoder_input_tokens, dec_in,
                         method=model.decode)
    nxt = jnp.argmax(logits[:, i], axis=-1).astype(jnp.int32)
    nxt = jnp.where(done, 0, nxt)
    out = out.at[:, i].set(nxt)
    dec_in = jnp.where(i + 1 < max_len,
                       dec_in.at[:, jnp.minimum(i + 1, max_len - 1)].set(nxt), dec_in)
    return i + 1, dec_in, out, done | (nxt == eos_id)

  _, _, out, _ = jax.lax.while_loop(cond, body, (0, dec_in, out, done))
  return out

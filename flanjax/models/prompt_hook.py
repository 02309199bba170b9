"""The prompt-tuning hook the models call on their token embeddings
(flanjax/models/prompt_tuning.py has the rest).

A soft prompt of n rows travels in the params as a top-level array `soft_prompt` [n, d]
beside the base's weights; the data puts virtual tokens, ids vocab_size + i, where row i
goes (at the start of each example's inputs, so packing, segment ids and positions need
nothing new). A model without that array is unchanged. Kept apart from prompt_tuning.py so
that t5.py and decoder.py import nothing that imports them.
"""

from __future__ import annotations

import jax.numpy as jnp

KEY = "soft_prompt"


def embed(module, tokens, x):
  """x (the embeddings of tokens [..., l] -> [..., l, d]) with each virtual token (id
  vocab_size + i) replaced by row i of the soft prompt, when the params hold one."""
  if not module.has_variable("params", KEY):
    return x
  prompt = module.get_variable("params", KEY)
  index = tokens - module.config.vocab_size
  rows = jnp.take(prompt, jnp.clip(index, 0, prompt.shape[0] - 1), axis=0)
  return jnp.where((index >= 0)[..., None], rows.astype(x.dtype), x)

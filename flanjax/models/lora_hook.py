"""The LoRA hook the models call after each projection (flanjax/models/lora.py has the rest).

Kept apart from lora.py so that t5.py and decoder.py import nothing that imports them.
"""

from __future__ import annotations

import contextlib
import contextvars

import jax
import jax.numpy as jnp

COLLECTION = "lora"
_DROPOUT = contextvars.ContextVar("flanjax_lora_dropout", default=0.0)


def add(module, name: str, x, y, deterministic: bool = True):
  """y (= x's projection by module's kernel `name`) plus its LoRA update when the module
  has adapters for it (x [..., *in], y [..., *out]); y itself otherwise."""
  if not module.has_variable(COLLECTION, name):
    return y
  ab = module.get_variable(COLLECTION, name)
  a, b = ab["a"], ab["b"]
  rate = _DROPOUT.get()
  if rate > 0 and not deterministic:
    keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - rate, x.shape)
    x = jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)
  h = jnp.tensordot(x, a.astype(x.dtype), axes=a.ndim - 1)
  return y + jnp.tensordot(h, b.astype(x.dtype), axes=1).astype(y.dtype)


@contextlib.contextmanager
def dropout(rate: float):
  """Adapter dropout for the models traced inside (a trace-time setting, not an array)."""
  token = _DROPOUT.set(float(rate))
  try:
    yield
  finally:
    _DROPOUT.reset(token)

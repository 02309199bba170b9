"""Projections (x times a kernel) whose weight gradient XLA:CPU computes without a
full-size transpose.

A kernel's gradient is x^T dy, a contraction over the tokens, the leading axis of
both x [tokens, in] and dy [tokens, out]. XLA:CPU's dot wants that axis minor on
one side, and its layout assignment copies dy into [out, tokens], whatever dy's
size: for the output projection that is the [tokens, vocab] logits' gradient
(82 MB at 2,560 tokens x 8,064), copied and then multiplied by a slower, non-YNN
dot. Measured on the benchmark's decoder step (2 cores): the copies were 19% of
XLA's op time, and a proxy of its feed-forward and output layers ran fwd + bwd in
547 ms instead of 1,028 ms with the formulation below.

Here the backward pass materialises the transpose of the smaller of x and dy
itself (behind an optimization barrier, so XLA cannot fold it back into the dot)
and multiplies in the canonical [m, k] x [k, n] form. Only on CPU: TPU and GPU
dots take transposed operands natively, and the barrier would only block fusion
there. `mode` below chooses: "auto" (CPU formulation when JAX's default backend is
the CPU), "cpu" or "xla" (plain einsum, XLA's own gradient).
"""

from __future__ import annotations

import contextlib
import contextvars
import math

import jax
import jax.numpy as jnp

MODES = ("auto", "cpu", "xla")
_MODE = contextvars.ContextVar("flanjax_dense_mode", default="auto")


@contextlib.contextmanager
def mode(name: str):
  """Traces inside use this formulation (e.g. "xla" while compiling for a TPU from a CPU host)."""
  if name not in MODES:
    raise ValueError(f"dense mode {name!r} is not one of {', '.join(MODES)}")
  token = _MODE.set(name)
  try:
    yield
  finally:
    _MODE.reset(token)


def cpu_formulation() -> bool:
  """Whether traces now take XLA:CPU's formulations (this module's, and others' that
  follow the same mode: losses.py, the train step's skip of a non-finite update)."""
  m = _MODE.get()
  return m == "cpu" or (m == "auto" and jax.default_backend() == "cpu")


# a^T b with b narrower than a as one dot with a transposed left operand (Eigen reads it
# transposed as it packs its panels); False: b transposed explicitly, then the result.
NARROW_B_PLAIN = True


def _at_b(a, b):
  """a^T b for a [t, m], b [t, n] -> [m, n]: a transposed explicitly where it is the
  narrower (or as wide), else one dot reading a transposed (NARROW_B_PLAIN)."""
  if a.shape[1] <= b.shape[1]:
    return jax.lax.optimization_barrier(a.T) @ b
  if NARROW_B_PLAIN:
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())))
  return (jax.lax.optimization_barrier(b.T) @ a).T


@jax.custom_vjp
def _project(x2, w2):
  return x2 @ w2


def _project_fwd(x2, w2):
  return x2 @ w2, (x2, w2)


def _project_bwd(res, dy):
  x2, w2 = res
  dx = jax.lax.dot_general(dy, w2, (((1,), (1,)), ((), ())))  # dy w^T: native on CPU
  return dx.astype(x2.dtype), _at_b(x2, dy).astype(w2.dtype)


_project.defvjp(_project_fwd, _project_bwd)


def project(x, w, n_in: int = 1):
  """x [..., *in] times w [*in, *out] (n_in leading axes of w contracted) -> [..., *out]."""
  ins, outs = w.shape[:n_in], w.shape[n_in:]
  if not cpu_formulation():
    return jax.lax.dot_general(x, w, ((tuple(range(x.ndim - n_in, x.ndim)),
                                       tuple(range(n_in))), ((), ())))
  lead = x.shape[:x.ndim - n_in]
  y = _project(x.reshape(math.prod(lead), math.prod(ins)),
               w.reshape(math.prod(ins), math.prod(outs)))
  return y.reshape(lead + outs)


def project_transposed(x, w):
  """x [..., d] times w^T for w [v, d] (a tied embedding as the output layer) -> [..., v]."""
  if not cpu_formulation():
    return jnp.einsum("...d,vd->...v", x, w)
  # The [v, d] -> [d, v] copy is the kernel's size, once per step, not the activations'.
  return project(x, w.T)

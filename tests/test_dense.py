"""dense.project's CPU-layout gradient equals XLA's own (plain dot_general), and the
compiled step really avoids the full-size transpose it exists to avoid."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flanjax.models import dense


def _grads(fn, mode, *args):
  with dense.mode(mode):
    return jax.jit(jax.grad(lambda *a: jnp.sum(jnp.sin(fn(*a))), argnums=(0, 1)))(*args)


@pytest.mark.parametrize("x_shape,w_shape,n_in", [
    ((2, 5, 8), (8, 24), 1),         # narrow in, wide out (the output layer's case)
    ((3, 7, 24), (24, 8), 1),        # wide in, narrow out (a feed-forward's wo)
    ((2, 6, 16), (16, 4, 3), 1),     # q/k/v kernels [d, heads, head_dim]
    ((2, 6, 4, 3), (4, 3, 16), 2),   # o kernel [heads, head_dim, d]
])
def test_gradients_equal_xla_own(x_shape, w_shape, n_in):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
  w = jnp.asarray(rng.normal(size=w_shape), jnp.float32)
  fn = lambda x, w: dense.project(x, w, n_in)  # noqa: E731
  with dense.mode("cpu"):
    y_cpu = fn(x, w)
  with dense.mode("xla"):
    y_xla = fn(x, w)
  np.testing.assert_allclose(y_cpu, y_xla, rtol=1e-6, atol=1e-6)
  for a, b in zip(_grads(fn, "cpu", x, w), _grads(fn, "xla", x, w)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_transposed_kernel_gradients_equal_xla_own():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, 5, 8)), jnp.float32)
  emb = jnp.asarray(rng.normal(size=(30, 8)), jnp.float32)
  for a, b in zip(_grads(dense.project_transposed, "cpu", x, emb),
                  _grads(dense.project_transposed, "xla", x, emb)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_bf16_activations_keep_a_float32_kernel_gradient():
  x = jnp.ones((2, 3, 8), jnp.bfloat16)
  w = jnp.ones((8, 4), jnp.float32)
  with dense.mode("cpu"):
    g = jax.grad(lambda w: jnp.sum(dense.project(x, w.astype(jnp.bfloat16)).astype(jnp.float32)))(w)
  assert g.dtype == jnp.float32
  np.testing.assert_allclose(g, np.full((8, 4), 6.0))


def _largest_moved(hlo: str) -> int:
  """Elements of the largest float32 transpose or copy in compiled HLO text (0 if none)."""
  moved = [0]
  for line in hlo.splitlines():
    line = line.split(", metadata=", 1)[0]
    if ("transpose" in line or "copy" in line) and "= f32[" in line:
      dims = line.split("= f32[", 1)[1].split("]", 1)[0]
      moved.append(int(np.prod([int(d) for d in dims.split(",")])))
  return max(moved)


def test_the_weight_gradient_is_a_canonical_dot_after_transposing_the_small_operand():
  # The output layer's case: x [tokens, 16], dy [tokens, 512]. The kernel's gradient must
  # be a plain [m, k] x [k, n] dot (the form YNNPACK takes), and the only transpose the
  # small x's (or the kernel-sized result's): never the activations' gradient.
  x = jnp.ones((256, 16), jnp.float32)
  w = jnp.ones((16, 512), jnp.float32)
  loss = lambda x, w: jnp.sum(jnp.tanh(dense.project(x, w)))  # noqa: E731
  with dense.mode("cpu"):
    hlo = jax.jit(jax.grad(loss, argnums=1)).lower(x, w).compile().as_text()
  for line in hlo.splitlines():
    line = line.split(", metadata=", 1)[0]
    if " dot(" in line:
      assert "lhs_contracting_dims={1}, rhs_contracting_dims={0}" in line, line
  assert _largest_moved(hlo) <= max(256 * 16, 16 * 512) < 256 * 512  # x or the kernel, never dy


@pytest.mark.parametrize("plain", [True, False], ids=["one dot", "b transposed"])
def test_a_narrow_output_s_weight_gradient_moves_no_activations(monkeypatch, plain):
  # A wide-in, narrow-out kernel (a feed-forward's wo, GQA's k and v): x [tokens, 64],
  # dy [tokens, 16]. As it ships, the kernel's gradient is one dot that reads x transposed
  # (no copy of either); with NARROW_B_PLAIN off, dy is transposed first.
  monkeypatch.setattr(dense, "NARROW_B_PLAIN", plain)
  x = jnp.asarray(np.random.default_rng(2).normal(size=(256, 64)), jnp.float32)
  w = jnp.asarray(np.random.default_rng(3).normal(size=(64, 16)), jnp.float32)
  loss = lambda x, w: jnp.sum(jnp.tanh(dense.project(x, w)))  # noqa: E731
  with dense.mode("cpu"):
    grad = jax.jit(jax.grad(loss, argnums=1))
    hlo = grad.lower(x, w).compile().as_text()
    got = grad(x, w)
  with dense.mode("xla"):
    want = jax.grad(loss, argnums=1)(x, w)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  if plain:
    assert _largest_moved(hlo) <= 64 * 16, hlo  # at most the kernel-sized result
  else:
    assert _largest_moved(hlo) == 256 * 16  # dy


def test_an_unknown_mode_is_refused():
  with pytest.raises(ValueError, match="dense mode"):
    with dense.mode("bogus"):
      pass

"""attention_impl='flash' (models/flash_tpu.py): the Pallas TPU kernel, run here in Pallas's
TPU interpreter, against the reference attention: outputs and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flanjax.models import attention, flash_tpu

pltpu = pytest.importorskip("jax.experimental.pallas.tpu")


def _packed(lengths, total):
  seg, pos = np.zeros(total, np.int32), np.zeros(total, np.int32)
  at = 0
  for s, n in enumerate(lengths, 1):
    seg[at:at + n], pos[at:at + n] = s, np.arange(n)
    at += n
  return seg, pos


# T5's encoder (bidirectional, relative bias, unscaled, padding keys) and a grouped-query
# causal decoder (scaled, no bias), on packed rows of 100 slots (padded to one 128 block).
CASES = {"t5_encoder": dict(causal=False, bias=True, scale=None, kv_heads=4),
         "gqa_causal": dict(causal=True, bias=False, scale=0.25, kv_heads=2)}


@pytest.mark.parametrize("case", CASES)
def test_flash_matches_the_reference_in_outputs_and_gradients(case):
  c = CASES[case]
  rng = np.random.default_rng(0)
  b, length, h, d = 2, 100, 4, 16
  seg, pos = (np.stack(x) for x in zip(_packed([40, 45], length), _packed([90], length)))
  q = jnp.asarray(rng.normal(size=(b, length, h, d)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(b, length, c["kv_heads"], d)), jnp.float32)
          for _ in range(2))
  table = jnp.asarray(rng.normal(size=(8, h)), jnp.float32)

  def loss(fn, q, k, v, table):
    spec = attention.Spec(jnp.asarray(seg), jnp.asarray(seg), jnp.asarray(pos),
                          jnp.asarray(pos), rel_table=table if c["bias"] else None,
                          causal=c["causal"], kv_padding=True, rel_bidirectional=not c["causal"],
                          rel_max_distance=16)
    out = fn(q, k, v, spec)
    # Padding queries (segment 0) are read by nothing: left out, as the loss leaves them.
    return jnp.sum(jnp.where(jnp.asarray(seg > 0)[:, :, None, None], out, 0.0) ** 2), out

  grad = lambda fn: jax.value_and_grad(  # noqa: E731
      lambda *a: loss(fn, *a), argnums=(0, 1, 2, 3), has_aux=True)(q, k, v, table)
  (_, want), want_grads = grad(lambda q, k, v, s: attention.attend(
      q, k, v, s, impl="reference", scale=c["scale"]))
  with pltpu.force_tpu_interpret_mode():
    (_, got), got_grads = grad(lambda q, k, v, s: attention.attend(  # through the dispatch
        q, k, v, s, impl="flash", scale=c["scale"]))
  real = seg > 0
  np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=1e-5, rtol=1e-5)
  for name, g, w in zip("q k v table".split(), got_grads, want_grads):
    top = max(1.0, float(np.abs(w).max()))
    np.testing.assert_allclose(np.asarray(g) / top, np.asarray(w) / top, atol=1e-5, err_msg=name)
  if c["bias"]:
    assert float(np.abs(want_grads[3]).max()) > 0  # the bias table is trained through it


def test_what_the_kernel_cannot_mask_goes_to_blockwise():
  seg = jnp.ones((1, 8), jnp.int32)
  pos = jnp.arange(8)[None]
  x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 8, 2, 4)), jnp.float32)
  prefix = attention.Spec(seg, seg, pos, pos, q_prefix=pos < 3, kv_prefix=pos < 3, causal=True)
  decode = attention.Spec(seg[:, :1], seg, pos[:, 7:], pos, causal=True)
  assert not flash_tpu.supported(x, x, prefix)
  assert not flash_tpu.supported(x[:, :1], x, decode)
  assert flash_tpu.supported(x, x, attention.Spec(seg, seg, pos, pos, causal=True))
  # These never reach the kernel: blockwise answers them, as the reference does.
  for spec, qx in ((prefix, x), (decode, x[:, :1])):
    assert flash_tpu.attend(qx, x, x, spec, scale=0.5) is None
    np.testing.assert_allclose(attention.attend(qx, x, x, spec, impl="flash", scale=0.5),
                               attention.attend(qx, x, x, spec, impl="reference", scale=0.5),
                               atol=1e-6)


def test_flash_under_a_mesh_off_a_tpu_is_refused_in_one_line_before_pallas_lowers_it():
  seg, pos = jnp.ones((1, 8), jnp.int32), jnp.arange(8)[None]
  x = jnp.asarray(np.random.default_rng(2).normal(size=(1, 8, 2, 4)), jnp.float32)
  spec = attention.Spec(seg, seg, pos, pos, causal=True)
  from flanjax.errors import UserError
  from flanjax.training import partitioning
  mesh = partitioning.make_mesh((1, 1, 1), jax.devices()[:1])
  with jax.set_mesh(mesh), pytest.raises(UserError, match=(
      r"attention_impl='flash' is the Pallas TPU kernel, and this run is on cpu: set "
      r"attention_impl='auto'")):  # a training run's mesh of CPU devices
    jax.jit(lambda q: attention.attend(q, x, x, spec, impl="flash", scale=0.5))(x)
  # Outside a mesh (flanjax.aot's shape-only init, evaluation on a CPU) blockwise answers.
  np.testing.assert_allclose(attention.attend(x, x, x, spec, impl="flash", scale=0.5),
                             attention.attend(x, x, x, spec, impl="reference", scale=0.5),
                             atol=1e-5)
  with pltpu.force_tpu_interpret_mode():  # the interpreter is allowed (as the tests above)
    np.testing.assert_allclose(attention.attend(x, x, x, spec, impl="flash", scale=0.5),
                               attention.attend(x, x, x, spec, impl="reference", scale=0.5),
                               atol=1e-5)

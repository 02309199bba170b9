"""Schedules, AdamW and Adafactor as configured, and bf16 compute over fp32 parameters."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flanjax.data import pipeline, registry
from flanjax.models import t5
from flanjax.training import optimizers, trainer


def _lr(fn, steps):
  return np.array([float(fn(jnp.asarray(s))) for s in steps])


def test_schedules_with_warmup():
  const = optimizers.schedule("constant", peak=0.1, warmup_steps=10)
  np.testing.assert_allclose(_lr(const, [0, 4, 9, 50]), [0.01, 0.05, 0.1, 0.1], rtol=1e-6)
  rsqrt = optimizers.schedule("rsqrt", peak=0.01, warmup_steps=100)
  # Linear warmup to the peak, flat to step 100, then peak * sqrt(100 / step).
  np.testing.assert_allclose(_lr(rsqrt, [0, 99, 399, 9999]),
                             [1e-4, 0.01, 0.005, 0.001], rtol=1e-5)
  lin = optimizers.schedule("linear", peak=1.0, warmup_steps=10, total_steps=110, end_value=0.0)
  np.testing.assert_allclose(_lr(lin, [9, 10, 60, 110]), [1.0, 1.0, 0.5, 0.0], atol=1e-6)
  cos = optimizers.schedule("cosine", peak=1.0, warmup_steps=10, total_steps=110, end_value=0.1)
  np.testing.assert_allclose(_lr(cos, [10, 60, 110]), [1.0, 0.55, 0.1], atol=1e-6)
  with pytest.raises(ValueError, match="total_steps"):
    optimizers.schedule("cosine", peak=1.0)


def test_adamw_decouples_weight_decay_and_clips_gradients():
  tx, _ = optimizers.optimizer("adamw", learning_rate=0.1, weight_decay=0.5, grad_clip=1.0)
  params = {"w": jnp.full((3,), 2.0)}
  state = tx.init(params)
  # Zero gradient: Adam's step is 0, so only the decoupled decay moves w: w -= lr * wd * w.
  upd, state = tx.update({"w": jnp.zeros(3)}, state, params)
  np.testing.assert_allclose(optax.apply_updates(params, upd)["w"], 2.0 - 0.1 * 0.5 * 2.0)
  # A huge gradient is clipped to norm 1 before Adam sees it: the first Adam step is -lr*sign.
  tx2, _ = optimizers.optimizer("adamw", learning_rate=0.1, grad_clip=1.0)
  s2 = tx2.init(params)
  upd, _ = tx2.update({"w": jnp.array([300.0, -400.0, 0.0])}, s2, params)
  np.testing.assert_allclose(upd["w"], [-0.1, 0.1, 0.0], atol=1e-6)


def test_adafactor_has_t5s_factored_second_moments_and_no_momentum():
  tx, _ = optimizers.optimizer("adafactor", learning_rate=0.01)
  params = {"big": jnp.ones((256, 384)), "small": jnp.ones((16, 8)), "vec": jnp.ones((512,))}
  leaves = {tuple(str(k) for k in path): x.shape
            for path, x in jax.tree_util.tree_leaves_with_path(tx.init(params))}
  shapes = sorted(leaves.values())
  # Factored: one row and one column statistic for the 256x384 matrix, not a full one.
  assert (256,) in shapes and (384,) in shapes and (256, 384) not in shapes
  assert (16, 8) in shapes  # too small to factor: a full second moment
  assert not any("mu" in "".join(k) for k in leaves)  # no first moment


def test_bf16_compute_keeps_fp32_params_and_close_losses(builtin_vocab):
  lengths = {"inputs": 96, "targets": 32}
  batch = next(pipeline.get_dataset(registry.BUILTIN_MIXTURE, lengths, "train", batch_size=8,
                                    seed=0).as_numpy_iterator())
  cfg = t5.T5Config(vocab_size=1024, d_model=64, d_kv=16, d_ff=128, num_heads=4,
                    num_encoder_layers=2, num_decoder_layers=2)
  tx = optax.adafactor(1e-2)
  losses = {}
  for dtype in ("float32", "bfloat16"):
    model = t5.T5(dataclasses.replace(cfg, dtype=dtype))
    state = nn.unbox(trainer.init_state(model, tx, jax.random.PRNGKey(0), t5.dummy_batch(1, 8, 8)))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state["params"]))
    step = jax.jit(trainer.make_train_step(model, tx, lambda s: 1e-2))
    out = []
    for _ in range(3):
      state, m = step(state, batch)
      out.append(float(m["loss"]))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state["params"]))
    losses[dtype] = np.array(out)
  assert np.all(np.isfinite(losses["bfloat16"]))
  np.testing.assert_allclose(losses["bfloat16"], losses["float32"], rtol=2e-2)
  assert not np.array_equal(losses["bfloat16"], losses["float32"])  # bf16 really ran

"""The train step's loss against a hand-computed masked cross-entropy, on real batches."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flanjax.data import pipeline, registry
from flanjax.models import t5
from flanjax.training import trainer

LENGTHS = {"inputs": 96, "targets": 32}


@pytest.fixture(scope="module")
def setup(builtin_vocab):
  cfg = t5.T5Config(vocab_size=1024, d_model=32, d_kv=8, d_ff=64, num_heads=4,
                    num_encoder_layers=1, num_decoder_layers=1)
  model = t5.T5(cfg)
  tx = optax.adafactor(1e-2)
  state = nn.unbox(trainer.init_state(model, tx, jax.random.PRNGKey(0),
                                      t5.dummy_batch(1, 8, 8)))
  batch = next(pipeline.get_dataset(registry.BUILTIN_MIXTURE, LENGTHS, "train", batch_size=8,
                                    seed=0).as_numpy_iterator())
  return model, tx, state, batch


def _numpy_masked_ce(logits, targets, weights):
  logits = np.asarray(logits, np.float64)
  m = logits.max(-1, keepdims=True)
  logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  return (nll * weights).sum() / weights.sum()


def test_step_loss_is_masked_cross_entropy(setup):
  model, tx, state, batch = setup
  assert batch["decoder_loss_weights"].min() == 0  # the batch has padding to ignore
  logits = model.apply({"params": state["params"]}, **t5.model_inputs(batch))
  want = _numpy_masked_ce(logits, batch["decoder_target_tokens"],
                          batch["decoder_loss_weights"])
  step = jax.jit(trainer.make_train_step(model, tx, lambda s: 1e-2))
  new_state, m = step(state, batch)
  assert abs(float(m["loss"]) - want) < 1e-5
  assert float(m["loss_weight"]) == batch["decoder_loss_weights"].sum()
  assert int(new_state["step"]) == 1 and float(m["applied"]) == 1.0
  # Weights matter: padding positions with garbage targets change nothing.
  noisy = dict(batch)
  noisy["decoder_target_tokens"] = np.where(batch["decoder_loss_weights"] > 0,
                                            batch["decoder_target_tokens"], 7)
  _, m2 = step(state, noisy)
  assert abs(float(m2["loss"]) - want) < 1e-5


def test_microbatches_match_one_large_batch(setup):
  model, tx, state, batch = setup
  one = jax.jit(trainer.make_train_step(model, tx, lambda s: 1e-2, z_loss=1e-4))
  four = jax.jit(trainer.make_train_step(model, tx, lambda s: 1e-2, z_loss=1e-4,
                                         microbatches=4))
  s1, m1 = one(state, batch)
  s4, m4 = four(state, batch)
  assert abs(float(m1["loss"]) - float(m4["loss"])) < 1e-5
  for a, b in zip(jax.tree.leaves(s1["params"]), jax.tree.leaves(s4["params"])):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_non_finite_step_is_not_applied(setup):
  model, tx, state, batch = setup
  bad = jax.tree.map(lambda x: x, state)
  bad["params"] = dict(bad["params"])
  bad["params"]["lm_head"] = bad["params"]["lm_head"].at[0, 0].set(jnp.nan)
  new, m = jax.jit(trainer.make_train_step(model, tx, lambda s: 1e-2))(bad, batch)
  assert float(m["applied"]) == 0.0 and not np.isfinite(float(m["loss"]))
  emb_old, emb_new = bad["params"]["token_embedding"], new["params"]["token_embedding"]
  np.testing.assert_array_equal(emb_old, emb_new)


@pytest.mark.parametrize("mode", ["cpu", "xla"])
def test_update_is_skipped_or_applied_alike_by_cond_and_select(setup, mode, monkeypatch):
  """The CPU formulation skips a non-finite update with a conditional, the others with
  a select (trainer._update_if): the same state either way, donated as the trainer does."""
  from flanjax.models import dense  # pylint: disable=g-import-not-at-top
  model, tx, state, batch = setup
  bad = jax.tree.map(lambda x: x, state)
  bad["params"] = dict(bad["params"])
  bad["params"]["lm_head"] = bad["params"]["lm_head"].at[0, 0].set(jnp.nan)
  conds = []
  real_cond = jax.lax.cond
  monkeypatch.setattr(jax.lax, "cond", lambda *a, **k: conds.append(1) or real_cond(*a, **k))
  with dense.mode(mode):
    fn = trainer.make_train_step(model, tx, lambda s: 1e-2)
    jax.jit(fn).lower(state, batch)
    traced_conds = len(conds)
    step = jax.jit(fn, donate_argnums=(0,))
    copy = lambda s: jax.tree.map(jnp.array, s)  # noqa: E731 (the step donates its input)
    good_new, good_m = step(copy(state), batch)
    bad_new, bad_m = step(copy(bad), batch)
  assert traced_conds == (1 if mode == "cpu" else 0)  # the step's own conditional
  # Skipped: every parameter and optimizer moment as it was, bit for bit.
  assert float(bad_m["applied"]) == 0.0
  for old, new in zip(jax.tree.leaves((bad["params"], bad["opt_state"])),
                      jax.tree.leaves((bad_new["params"], bad_new["opt_state"]))):
    np.testing.assert_array_equal(old, new)
  assert int(bad_new["step"]) == 1  # the position moves on; the weights do not
  # Applied: the optimizer's own update, by hand.
  assert float(good_m["applied"]) == 1.0
  def loss(p):  # the step's loss, written out: masked token cross-entropy
    logits = model.apply({"params": p}, **t5.model_inputs(batch))
    ce = optax.softmax_cross_entropy_with_integer_labels(logits,
                                                         batch["decoder_target_tokens"])
    w = batch["decoder_loss_weights"]
    return (ce * w).sum() / w.sum()

  grads = jax.grad(loss)(state["params"])
  updates, _ = tx.update(grads, state["opt_state"], state["params"])
  want = optax.apply_updates(state["params"], updates)
  for w, got in zip(jax.tree.leaves(want), jax.tree.leaves(good_new["params"])):
    np.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-6)


def test_unknown_update_skip_is_refused(setup, monkeypatch):
  model, tx, state, batch = setup
  monkeypatch.setattr(trainer, "UPDATE_SKIP", "conditional")
  with pytest.raises(ValueError, match="UPDATE_SKIP='conditional' is not one of"):
    jax.jit(trainer.make_train_step(model, tx, lambda s: 1e-2)).lower(state, batch)


@pytest.mark.parametrize("mode", ["cpu", "xla"])
def test_global_norm_matches_optax(mode):
  """trainer.global_norm (dots on XLA:CPU, optax's reduction elsewhere) against optax."""
  from flanjax.models import dense  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  tree = {"scalar": jnp.float32(-3.0), "vec": jnp.asarray(rng.normal(size=7), jnp.float32),
          "k": jnp.asarray(rng.normal(size=(5, 4, 3)), jnp.float32),
          "b": jnp.asarray(rng.normal(size=(64, 9)), jnp.bfloat16)}
  want = float(optax.tree.norm(jax.tree.map(lambda x: x.astype(jnp.float32), tree)))
  with dense.mode(mode):
    got = float(jax.jit(trainer.global_norm)(tree))
  assert abs(got - want) <= 1e-5 * want
  for bad in (jnp.nan, jnp.inf):
    with dense.mode(mode):
      assert not np.isfinite(float(jax.jit(trainer.global_norm)({**tree, "vec": tree["vec"].at[2].set(bad)})))


@pytest.mark.parametrize("settings", [{}, {"microbatches": 2, "z_loss": 1e-4},
                                      {"loss_normalizing_factor": 100.0}])
def test_fused_post_gradient_matches_separate(setup, settings, monkeypatch):
  """The loss divided before differentiating (POST_GRADIENT 'fused', ships) gives the step
  of the gradients divided after ('separate'): loss, gradient norm and the gradients
  themselves (plain SGD at rate 1, so each parameter moves by its gradient)."""
  model, _, state, batch = setup
  tx = optax.sgd(1.0)
  state = {**state, "opt_state": tx.init(state["params"])}
  out = {}
  for value in ("separate", "fused"):
    monkeypatch.setattr(trainer, "POST_GRADIENT", value)
    out[value] = jax.jit(trainer.make_train_step(model, tx, lambda s: 1.0, **settings))(
        state, batch)
  (s_sep, m_sep), (s_fused, m_fused) = out["separate"], out["fused"]
  for k in ("loss", "grad_norm", "loss_weight", "applied"):
    np.testing.assert_allclose(float(m_fused[k]), float(m_sep[k]), rtol=1e-5)
  for a, b, old in zip(jax.tree.leaves(s_fused["params"]), jax.tree.leaves(s_sep["params"]),
                       jax.tree.leaves(state["params"])):
    g_fused, g_sep = np.asarray(a) - np.asarray(old), np.asarray(b) - np.asarray(old)
    assert np.abs(g_sep).max() > 0  # every parameter has a gradient here
    np.testing.assert_allclose(g_fused, g_sep, rtol=1e-3, atol=1e-4 * np.abs(g_sep).max())


def test_unknown_post_gradient_is_refused(setup, monkeypatch):
  model, tx, state, batch = setup
  monkeypatch.setattr(trainer, "POST_GRADIENT", "after")
  with pytest.raises(ValueError, match="POST_GRADIENT='after' is not one of"):
    jax.jit(trainer.make_train_step(model, tx, lambda s: 1e-2)).lower(state, batch)

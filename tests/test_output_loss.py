"""The output layer inside the loss (losses.output_cross_entropy, the train step's default)
against logits at every position then cross_entropy, the plain formulation."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flanjax.data import pipeline, registry
from flanjax.models import decoder, t5
from flanjax.training import trainer
from flanjax.training.losses import cross_entropy, output_cross_entropy

LENGTHS = {"inputs": 96, "targets": 32}


def _reference(x, head, targets, weights, transposed, z_loss, label_smoothing):
  logits = (jnp.einsum("bld,vd->blv", x, head) if transposed else x @ head).astype(jnp.float32)
  _, aux = cross_entropy(logits, targets, weights, z_loss=z_loss,
                         label_smoothing=label_smoothing, normalize_by=1.0)
  return aux["loss_sum"] + aux["z_loss_sum"], aux


@pytest.mark.parametrize("transposed", [False, True], ids=["lm_head", "tied"])
@pytest.mark.parametrize("z_loss,label_smoothing,chunk", [(0.0, 0.0, 64), (1e-3, 0.1, 7),
                                                          (1e-4, 0.0, 1)])
def test_values_and_gradients_equal_logits_then_loss(transposed, z_loss, label_smoothing, chunk):
  rng = np.random.default_rng(0)
  b, l, d, v = 3, 50, 16, 37
  x = jnp.asarray(rng.normal(size=(b, l, d)), jnp.float32)
  head = jnp.asarray(rng.normal(size=(v, d) if transposed else (d, v)), jnp.float32)
  # Fractional weights on ~40% of the positions, a row without any; ids out of the
  # vocabulary (a prompt-tuning virtual token) only where the weight is 0.
  keep = rng.random((b, l)) < 0.4
  weights = jnp.asarray(rng.random((b, l)) * keep, jnp.float32).at[2].set(0.0)
  targets = jnp.asarray(np.where(keep, rng.integers(0, v, (b, l)), v + 3), jnp.int32)
  targets = targets.at[2].set(v + 1)

  def ours(x, head):
    return output_cross_entropy(x, head, targets, weights, transposed=transposed,
                                z_loss=z_loss, label_smoothing=label_smoothing, chunk=chunk)

  (want, want_aux), want_g = jax.value_and_grad(
      lambda x, h: _reference(x, h, targets, weights, transposed, z_loss, label_smoothing),
      argnums=(0, 1), has_aux=True)(x, head)
  (got, got_aux), got_g = jax.jit(jax.value_and_grad(ours, argnums=(0, 1), has_aux=True))(x, head)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  for k in ("loss_sum", "z_loss_sum", "weight_sum"):
    np.testing.assert_allclose(got_aux[k], want_aux[k], rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(got_g[0], want_g[0], atol=2e-6)
  np.testing.assert_allclose(got_g[1], want_g[1], atol=2e-6)
  # Without a gradient (evaluation) the same value; a cotangent of 3 scales the gradients.
  np.testing.assert_allclose(jax.jit(ours)(x, head)[0], want, rtol=1e-6)
  g3 = jax.grad(lambda x, h: 3 * ours(x, h)[0], argnums=(0, 1))(x, head)
  np.testing.assert_allclose(g3[1], 3 * np.asarray(want_g[1]), atol=6e-6)
  # The row without loss positions gets no gradient at all.
  assert not np.any(np.asarray(got_g[0][2]))
  # Token accuracy (evaluation): the weight of positions whose argmax is the target,
  # against a loop over the reference logits.
  logits = np.asarray(jnp.einsum("bld,vd->blv", x, head) if transposed else x @ head)
  hits = sum(float(weights[i, j]) for i in range(b) for j in range(l)
             if weights[i, j] > 0 and int(np.argmax(logits[i, j])) == int(targets[i, j]))
  _, acc_aux = jax.jit(lambda x, h: output_cross_entropy(
      x, h, targets, weights, transposed=transposed, chunk=chunk, accuracy=True))(x, head)
  np.testing.assert_allclose(acc_aux["correct_sum"], hits, rtol=1e-6)


@pytest.mark.parametrize("chunk", [64, 8], ids=["one_chunk", "chunked"])
def test_a_batch_without_loss_positions_gives_zero_loss_and_gradients(chunk):
  # The first chunk is computed outside the loop even when no row has a loss position
  # (and l <= chunk takes every position at once): all of it must weigh 0, also where a
  # target id is out of the vocabulary.
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(2, 40, 16)), jnp.float32)
  head = jnp.asarray(rng.normal(size=(16, 29)), jnp.float32)
  targets = jnp.full((2, 40), 29 + 5, jnp.int32)
  weights = jnp.zeros((2, 40), jnp.float32)
  f = lambda x, h: output_cross_entropy(x, h, targets, weights, chunk=chunk, z_loss=1e-3,
                                        accuracy=True)
  (total, aux), (gx, gh) = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(x, head)
  assert float(total) == 0.0 and float(aux["weight_sum"]) == 0.0
  assert float(aux["correct_sum"]) == 0.0
  assert not np.any(np.asarray(gx)) and not np.any(np.asarray(gh))


def test_bfloat16_hidden_states_match_the_bfloat16_logits_path():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, 40, 32)), jnp.bfloat16)
  head = jnp.asarray(rng.normal(size=(32, 64)) * 0.2, jnp.float32)
  targets = jnp.asarray(rng.integers(0, 64, (2, 40)), jnp.int32)
  weights = jnp.asarray(rng.random((2, 40)) < 0.5, jnp.int32)
  want = _reference(x, head.astype(jnp.bfloat16), targets, weights, False, 0.0, 0.0)[0]
  got, _ = output_cross_entropy(x, head, targets, weights, chunk=16)
  np.testing.assert_allclose(float(got), float(want), rtol=2e-3)
  gx = jax.grad(lambda x: output_cross_entropy(x, head, targets, weights, chunk=16)[0])(x)
  assert gx.dtype == jnp.bfloat16


def _t5():
  cfg = t5.T5Config(vocab_size=1024, d_model=32, d_kv=8, d_ff=64, num_heads=4,
                    num_encoder_layers=1, num_decoder_layers=1)
  return t5.T5(cfg), t5.dummy_batch(1, 8, 8), "enc_dec"


def _prefix_lm():
  cfg = decoder.DecoderConfig(vocab_size=1024, d_model=32, num_heads=4, num_kv_heads=2,
                              head_dim=8, d_ff=64, num_layers=2, tie_word_embeddings=True)
  return decoder.Decoder(cfg), decoder.dummy_batch(1, 8, 8), "prefix_lm"


@pytest.mark.parametrize("build", [_t5, _prefix_lm], ids=["t5", "prefix_lm_tied"])
def test_train_step_equals_the_logits_step_on_real_packed_batches(build, builtin_vocab):
  model, dummy, kind = build()
  tx = optax.adam(1e-2)
  state = nn.unbox(trainer.init_state(model, tx, jax.random.PRNGKey(0), dummy))
  batch = next(pipeline.get_dataset(registry.BUILTIN_MIXTURE, LENGTHS, "train", batch_size=4,
                                    seed=0, kind=kind).as_numpy_iterator())
  w = batch["decoder_loss_weights"]
  assert 0 < (w > 0).mean() < 1  # prompts (prefix LM) and padding carry no loss
  kw = dict(z_loss=1e-4, label_smoothing=0.1)
  plain = jax.jit(trainer.make_train_step(model, tx, lambda s: 1e-2, output_chunk=0, **kw))
  fused = jax.jit(trainer.make_train_step(model, tx, lambda s: 1e-2, output_chunk=24, **kw))
  two = jax.jit(trainer.make_train_step(model, tx, lambda s: 1e-2, microbatches=2, **kw))
  s0, m0 = plain(state, batch)
  for s1, m1 in (fused(state, batch), two(state, batch)):
    for k in ("loss", "cross_entropy", "z_loss", "grad_norm", "loss_weight"):
      np.testing.assert_allclose(m1[k], m0[k], rtol=2e-5, err_msg=k)
    # After one Adam step: a parameter whose gradient is near 0 moves by g / (|g| + eps),
    # where float summation order alone can shift it by a few 1e-5 (2.6e-5 seen once in
    # 32,768); a wrong gradient moves it by up to the rate, 1e-2.
    for a, b in zip(jax.tree.leaves(s0["params"]), jax.tree.leaves(s1["params"])):
      np.testing.assert_allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("build", [_t5, _prefix_lm], ids=["t5", "prefix_lm_tied"])
def test_eval_step_at_loss_positions_equals_the_logits_eval_step(build, builtin_vocab):
  """Validation loss and token accuracy, with logits only at loss positions, against
  logits everywhere, after steps that make the model predict some tokens right."""
  model, dummy, kind = build()
  tx = optax.adam(3e-2)
  state = nn.unbox(trainer.init_state(model, tx, jax.random.PRNGKey(0), dummy))
  batches = pipeline.get_dataset(registry.BUILTIN_MIXTURE, LENGTHS, "train", batch_size=4,
                                 seed=0, kind=kind).as_numpy_iterator()
  train = jax.jit(trainer.make_train_step(model, tx, lambda s: 3e-2))
  for _ in range(8):  # a few batches: right on common tokens, not on all of a new batch
    state, _ = train(state, next(batches))
  batch = next(batches)
  for accuracy in (False, True):
    plain = jax.jit(trainer.make_eval_step(model, token_accuracy=accuracy, output_chunk=0))
    fused = jax.jit(trainer.make_eval_step(model, token_accuracy=accuracy, output_chunk=24))
    want, got = plain(state["params"], batch), fused(state["params"], batch)
    assert len(got) == len(want) == 2 + accuracy
    np.testing.assert_allclose(got[0], want[0], rtol=2e-6)
    np.testing.assert_allclose(got[1], want[1])
    if accuracy:
      assert 0 < float(want[2]) < float(want[1])  # some right, some wrong: a real comparison
      np.testing.assert_allclose(got[2], want[2])


def test_rows_no_longer_than_a_chunk_take_one_pass_and_equal_the_chunked_loop(monkeypatch):
  from flanjax.training import losses
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(2, 24, 8)), jnp.float32)
  head = jnp.asarray(rng.normal(size=(8, 19)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, 19, (2, 24)), jnp.int32)
  weights = jnp.asarray(rng.random((2, 24)) < 0.5, jnp.float32)
  # A new function for each trace: jit would reuse the first trace under the new setting.
  g = lambda: jax.jit(jax.value_and_grad(
      lambda x, h: output_cross_entropy(x, h, targets, weights, chunk=32, z_loss=1e-3)[0],
      argnums=(0, 1)))
  one_pass = g().lower(x, head).as_text()
  got = g()(x, head)
  monkeypatch.setattr(losses, "SINGLE_PASS", False)
  looped = g().lower(x, head).as_text()
  want = g()(x, head)
  prims = lambda text: set(re.findall(r"stablehlo\.(while|sort)\b", text))
  assert not {"while", "sort"} & prims(one_pass)
  assert {"while", "sort"} <= prims(looped)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
  for a, b in zip(got[1], want[1]):
    np.testing.assert_allclose(a, b, atol=2e-6)


def test_a_devices_rows_share_their_loss_chunks_and_equal_each_row_alone(monkeypatch):
  """Loss positions sorted over a group of rows (one device's) give the same loss and
  gradients as each row alone, in fewer chunks when one row holds most of them."""
  from flanjax.training import losses
  rng = np.random.default_rng(5)
  b, l, d, v, chunk = 4, 40, 8, 23, 8
  x = jnp.asarray(rng.normal(size=(b, l, d)), jnp.float32)
  head = jnp.asarray(rng.normal(size=(d, v)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, v, (b, l)), jnp.int32)
  counts = [30, 3, 0, 6]  # one row with most of the loss positions, one with none
  weights = jnp.asarray(np.stack([(np.arange(l) >= l - c) * rng.uniform(0.5, 1.5, l)
                                  for c in counts]), jnp.float32)
  g = lambda: jax.jit(jax.value_and_grad(
      lambda x, h: output_cross_entropy(x, h, targets, weights, chunk=chunk, z_loss=1e-3)[0],
      argnums=(0, 1)))
  grouped, grouped_text = g()(x, head), g().lower(x, head).as_text()
  monkeypatch.setattr(losses, "GROUP_ROWS", False)
  each, each_text = g()(x, head), g().lower(x, head).as_text()
  # The loss positions are sorted as one [1, b * l] row when grouped, per row otherwise.
  sorts = lambda text: re.findall(
      r"call @argsort\w* ?\(%\w+\) : \((tensor<[0-9]+x[0-9]+)x", text)
  assert sorts(grouped_text) and set(sorts(grouped_text)) == {f"tensor<1x{b * l}"}
  assert sorts(each_text) and set(sorts(each_text)) == {f"tensor<{b}x{l}"}
  (want, want_aux), want_g = jax.value_and_grad(
      lambda x, h: _reference(x, h, targets, weights, False, 1e-3, 0.0), argnums=(0, 1),
      has_aux=True)(x, head)
  for got in (grouped, each):
    np.testing.assert_allclose(got[0], want, rtol=1e-6)
    for a, w in zip(got[1], want_g):
      np.testing.assert_allclose(a, w, atol=2e-6)
  # Chunks run: each row alone, as many as the fullest row needs (30 / 8 -> 4); the
  # four rows together, their 39 positions in chunks of 4 x 8 -> 2.
  assert int(losses._loss_order(weights, chunk)[2]) == 4
  assert int(losses._loss_order(weights.reshape(1, b * l), chunk * b)[2]) == 2


def test_loss_positions_are_grouped_per_shard_of_the_batch():
  """One group per shard of the batch axis (data x fsdp), so rows stay on their device."""
  from flanjax.training import losses
  assert losses.row_groups(8) == 1  # no mesh: the whole batch together
  mesh = jax.sharding.AbstractMesh((2, 2, 2), ("data", "fsdp", "model"))
  with jax.sharding.use_abstract_mesh(mesh):
    assert losses.row_groups(8) == 4 and losses.row_groups(4) == 4
    assert losses.row_groups(6) == 6  # 4 shards do not divide 6 rows: each row alone

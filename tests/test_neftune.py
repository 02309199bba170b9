"""NEFTune (models/t5.py VocabularyEnds._neftune): noise on the training embeddings of
alpha / sqrt(L d) at most, L each example's own length in a packed row."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from flanjax.errors import UserError
from flanjax.models import decoder, t5

D = 32


def _decoder(alpha):
  cfg = decoder.DecoderConfig(vocab_size=64, d_model=D, num_heads=2, num_kv_heads=2,
                              head_dim=16, d_ff=48, num_layers=1, neftune_alpha=alpha)
  model = decoder.Decoder(cfg)
  params = nn.unbox(model.init(jax.random.PRNGKey(0), **decoder.dummy_batch(1, 8))["params"])
  return model, params


def _noise(model, params, x, seg, keys):
  draw = lambda key: model.apply({"params": params}, x, seg, False, rngs={"dropout": key},  # noqa: E731
                                 method=lambda m, *a: m._neftune(*a)) - x
  return np.asarray(jax.jit(jax.vmap(draw))(keys))


def test_the_noise_bound_is_each_examples_own_length_and_padding_gets_none():
  model, params = _decoder(5.0)
  # One packed row: examples of 3, 7 and 2 tokens, then 4 padding positions.
  seg = np.array([[1] * 3 + [2] * 7 + [3] * 2 + [0] * 4], np.int32)
  x = np.zeros((1, seg.shape[1], D), np.float32)
  draws = _noise(model, params, x, seg, jax.random.split(jax.random.PRNGKey(0), 200))[:, 0]
  # The bound of every position by brute force: its example's token count.
  want = np.array([0.0 if s == 0 else 5.0 / np.sqrt((seg[0] == s).sum() * D) for s in seg[0]])
  top = np.abs(draws).max(axis=(0, 2))
  assert np.all(top <= want + 1e-6)
  np.testing.assert_allclose(top, want, rtol=0.02)  # 6,400 uniform draws reach the bound
  assert abs(float(draws[:, :12].mean())) < 0.01 * want.max()  # centred
  assert np.all(draws[:, 12:] == 0)


def test_only_training_is_noised_and_alpha_zero_is_the_plain_model():
  tokens = np.random.default_rng(0).integers(2, 64, size=(2, 8))
  plain_model, params = _decoder(0.0)
  noisy_model, _ = _decoder(10.0)
  key = {"dropout": jax.random.PRNGKey(1)}
  plain = plain_model.apply({"params": params}, tokens)
  np.testing.assert_array_equal(noisy_model.apply({"params": params}, tokens), plain)
  np.testing.assert_array_equal(
      plain_model.apply({"params": params}, tokens, deterministic=False, rngs=key), plain)
  assert np.abs(noisy_model.apply({"params": params}, tokens, deterministic=False, rngs=key)
                - plain).max() > 1e-3


def test_t5_is_noised_in_training_only():
  cfg = t5.T5Config(vocab_size=64, d_model=D, d_kv=8, d_ff=48, num_heads=2,
                    num_encoder_layers=1, num_decoder_layers=1, neftune_alpha=5.0)
  model = t5.T5(cfg)
  enc, dec = (np.random.default_rng(s).integers(2, 64, size=(2, 6)) for s in (1, 2))
  params = nn.unbox(model.init(jax.random.PRNGKey(0), enc, dec)["params"])
  plain = model.apply({"params": params}, enc, dec)
  noisy = model.apply({"params": params}, enc, dec, deterministic=False,
                      rngs={"dropout": jax.random.PRNGKey(3)})
  assert np.abs(noisy - plain).max() > 1e-3


@pytest.mark.parametrize("alpha", [-1.0, "5", True])
def test_a_bad_alpha_is_one_line(alpha):
  with pytest.raises(UserError, match="neftune_alpha=.* must be 0 .off. or more"):
    decoder.DecoderConfig(neftune_alpha=alpha)


def test_the_training_command_trains_with_it_and_says_so(tmp_path, builtin_vocab):
  import json  # pylint: disable=g-import-not-at-top
  from conftest import command_in_process  # pylint: disable=g-import-not-at-top
  from flanjax import train as train_command  # pylint: disable=g-import-not-at-top
  run = tmp_path / "run"
  code, out, err = command_in_process(train_command.main, [
      "--gin_file=flan.gin", f"--gin.train.model_dir={run}", "--gin.train.num_steps=2",
      "--gin.train.batch_size=4", "--gin.train.task_feature_lengths={'inputs': 48, 'targets': 16}",
      "--gin.T5Config.d_model=32", "--gin.T5Config.d_ff=64", "--gin.T5Config.num_heads=2",
      "--gin.T5Config.d_kv=16", "--gin.T5Config.neftune_alpha=5.0", "--gin.train.eval_at_end=False",
      "--gin.train.log_every_secs=0"], builtin_vocab, train_command.__file__)
  assert code == 0, (out + err)[-3000:]
  assert "NEFTune noise (alpha 5) on the embeddings" in out
  assert np.isfinite(json.loads((run / "summary.json").read_text())["last_loss"])


def test_an_export_of_a_neftune_run_keeps_the_original_config_json():
  # A training field, as dropout: the original config.json still describes the model.
  import dataclasses  # pylint: disable=g-import-not-at-top
  from flanjax.models import hf  # pylint: disable=g-import-not-at-top
  from flanjax.run_folder import model_record  # pylint: disable=g-import-not-at-top
  cfg = decoder.DecoderConfig(vocab_size=64, d_model=D, num_heads=2, num_kv_heads=2,
                              head_dim=16, d_ff=48, num_layers=1)
  trained = dataclasses.replace(cfg, neftune_alpha=5.0, dropout_rate=0.1)
  assert hf._describes(hf.config_to_hf(cfg), trained)
  assert model_record(trained) == model_record(cfg)  # resuming with another alpha is allowed

"""Rank classification's grouped scoring (scoring.loglikelihood_groups): an encoder-decoder
reads each context once for all its options; the log-likelihoods must be those of the
brute-force loop, one (context, option) forward pass at a time, unbucketed. (Decoder kinds
score their flattened rows: test_evaluate's and test_mmlu's rank classification tests.)"""

import dataclasses

import flax.linen as nn
import jax
import numpy as np
import pytest

from flanjax.evaluation import scoring
from flanjax.models import kinds, t5


@pytest.fixture(scope="module")
def tiny_t5():
  cfg = t5.T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=48, num_heads=4,
                    num_encoder_layers=2, num_decoder_layers=2, attention_block=64)
  model = kinds.ENC_DEC.build(cfg)
  params = nn.unbox(model.init(jax.random.PRNGKey(0), **kinds.ENC_DEC.dummy_batch())["params"])
  return cfg, jax.tree.map(lambda x: np.asarray(x) * 3.0, params)  # far from uniform


def _groups(seed=0):
  rng = np.random.RandomState(seed)
  # Contexts across length buckets (16, 32, 256 after padding: several attention blocks);
  # 0 to 5 options each, one empty, of different lengths (several decoder lengths a batch).
  lengths = [5, 16, 30, 200, 9, 12]
  ctxs = [list(rng.randint(2, 128, size=n)) + [1] for n in lengths]
  conts = [[list(rng.randint(2, 128, size=rng.randint(1, 4))) for _ in range(k)]
           for k in (4, 1, 5, 4, 0, 3)]
  conts[2][1] = []
  return ctxs, conts


def _brute_force(model, params, ctxs, conts, max_length=None):
  """One forward pass per (context, option), each in its own batch of one."""
  out = []
  for ctx, cs in zip(ctxs, conts):
    row = []
    for c in cs:
      s, g = scoring.loglikelihood(model, params, kinds.ENC_DEC, [ctx], [c], batch_size=1,
                                   max_length=max_length)
      row.append((s[0], g[0]))
    out.append(row)
  return out


@pytest.mark.parametrize("impl", ["reference", "blockwise"])
def test_t5_options_share_one_encoder_pass_and_score_as_brute_force(tiny_t5, impl):
  cfg, params = tiny_t5
  ref_model = kinds.ENC_DEC.build(cfg)
  model = kinds.ENC_DEC.build(dataclasses.replace(cfg, attention_impl=impl))
  ctxs, conts = _groups()
  want = _brute_force(ref_model, params, ctxs, conts)
  # batch_size 4: the 6 contexts in two batches, the second padded with empty rows.
  sums, greedy = scoring.loglikelihood_groups(model, params, kinds.ENC_DEC, ctxs, conts,
                                              batch_size=4)
  assert [len(s) for s in sums] == [len(c) for c in conts]
  for w, s, g in zip(want, sums, greedy):
    # float32 sums of ~100 in other shapes and summation orders: rounding, not more.
    np.testing.assert_allclose(s, [x[0] for x in w], rtol=3e-5, atol=1e-4)
    assert list(g) == [x[1] for x in w]
  assert sums[2][1] == 0.0 and greedy[2][1]  # an empty option scores 0, as loglikelihood's
  # A context over the budget is cut as loglikelihood cuts it (its start and closing EOS).
  cut, _ = scoring.loglikelihood_groups(model, params, kinds.ENC_DEC, ctxs[3:4], conts[3:4],
                                        batch_size=2, max_length=40)
  want = _brute_force(ref_model, params, ctxs[3:4], conts[3:4], max_length=40)
  np.testing.assert_allclose(cut[0], [x[0] for x in want[0]], rtol=3e-5, atol=1e-4)


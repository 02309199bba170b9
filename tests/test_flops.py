"""The FLOP count behind every MFU figure (trainer and benchmarks), against a hand count
of each matmul and against XLA's own count of the compiled forward pass."""

import jax
import jax.numpy as jnp
import pytest

from flanjax.models import decoder, t5
from flanjax.training import flops

T5_CFG = t5.T5Config(vocab_size=512, d_model=128, d_kv=32, num_heads=4, d_ff=256,
                     num_encoder_layers=2, num_decoder_layers=3, feed_forward="gated-gelu")
# Grouped-query attention: 4 query heads share 2 key/value heads.
GQA_CFG = decoder.DecoderConfig(vocab_size=512, d_model=128, num_heads=4, num_kv_heads=2,
                                head_dim=32, d_ff=256, num_layers=2)


def _mm(m, k, n):
  """FLOPs of an [m, k] x [k, n] matmul."""
  return 2 * m * k * n


def test_t5_against_a_hand_count():
  s_in, s_tg = 64, 16
  hk = 4 * 32
  enc_layer = (4 * _mm(s_in, 128, hk)  # q, k, v, o
               + 4 * _mm(s_in, 32, s_in) * 2  # scores and mixing, 4 heads of 32
               + 3 * _mm(s_in, 128, 256))  # gated feed-forward: wi_0, wi_1, wo
  dec_layer = (4 * _mm(s_tg, 128, hk) + 4 * _mm(s_tg, 32, s_tg) * 2  # self-attention
               + 2 * _mm(s_tg, 128, hk)  # cross-attention q and o
               + 2 * _mm(s_in, 128, hk)  # cross-attention k and v, on the encoder's output
               + 4 * _mm(s_tg, 32, s_in) * 2  # cross-attention scores and mixing
               + 3 * _mm(s_tg, 128, 256))
  forward = 2 * enc_layer + 3 * dec_layer + _mm(s_tg, 128, 512)  # + the vocabulary projection
  assert flops.step_flops(T5_CFG, (s_in, s_tg), batch=2) == 2 * 3 * forward


def test_gqa_decoder_against_a_hand_count():
  s = 80
  layer = (_mm(s, 128, 4 * 32) + 2 * _mm(s, 128, 2 * 32)  # q over 4 heads; k, v over 2
           + 4 * _mm(s, 32, s) * 2  # scores and mixing per query head
           + _mm(s, 4 * 32, 128)  # o
           + 3 * _mm(s, 128, 256))  # SwiGLU
  forward = 2 * layer + _mm(s, 128, 512)
  assert flops.step_flops(GQA_CFG, (s,), batch=3) == 3 * 3 * forward
  assert flops.flops_per_token(GQA_CFG, (s,)) == 3 * forward / s
  # Not 6 x parameters: that counts the embedding table and no attention.
  assert flops.flops_per_token(GQA_CFG, (s,)) != pytest.approx(6 * GQA_CFG.num_params(), rel=0.05)


@pytest.mark.parametrize("cfg,rows", [(T5_CFG, (64, 16)), (GQA_CFG, (80,))])
def test_forward_count_is_xla_count_less_elementwise_work(cfg, rows):
  """XLA's cost analysis of the real model's forward pass counts our matmuls plus
  norms, softmax and activations: ours is below it and within a few percent."""
  if isinstance(cfg, t5.T5Config):
    model, args = t5.T5(cfg), (jnp.ones((1, rows[0]), jnp.int32), jnp.ones((1, rows[1]), jnp.int32))
  else:
    model, args = decoder.Decoder(cfg), (jnp.ones((1, rows[0]), jnp.int32),)
  params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *args))
  cost = jax.jit(model.apply).lower(params, *args).compile().cost_analysis()
  ours = flops.step_flops(cfg, rows) / 3
  assert ours <= cost["flops"] <= 1.05 * ours


def test_device_peaks_tell_the_parts_apart():
  assert flops.peak_flops("NVIDIA H100 80GB HBM3") == 989e12  # SXM
  assert flops.peak_flops("NVIDIA H100 PCIe") == 756e12
  assert flops.peak_flops("TPU v4") == 275e12
  assert flops.peak_flops("TPU v5 lite") == 197e12  # v5e
  assert flops.peak_flops("TPU v5p") == flops.peak_flops("TPU v5") == 459e12
  assert flops.peak_flops("cpu") is None


def test_benchmark_and_trainer_use_the_same_count():
  from benchmarks import mfu
  lengths = {"inputs": 48, "targets": 32}
  assert mfu.train_flops(GQA_CFG, lengths, 2) == flops.step_flops(GQA_CFG, (80,), 2)
  assert mfu.train_flops(T5_CFG, lengths, 2) == flops.step_flops(T5_CFG, (48, 32), 2)
  assert flops.model_flops_per_token(decoder.Decoder(GQA_CFG), (80,)) == \
      flops.flops_per_token(GQA_CFG, (80,))
  assert flops.model_flops_per_token(object(), (80,)) is None

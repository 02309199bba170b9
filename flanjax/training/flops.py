"""FLOPs of a training step and the device's peak: the one count behind every MFU figure.

The trainer's console and TensorBoard MFU and the benchmarks' MFU all use
`step_flops`. It counts every matmul of the forward pass from the model's
shape (2 FLOPs a multiply-add), times 3 for forward + backward (the backward
pass does two matmuls per forward matmul). Counted: the attention projections
(T5: self- and cross-attention, the cross-attention keys and values once per
encoder position; the decoder: grouped-query attention, keys and values over
`num_kv_heads` only), the attention scores and their mixing over the whole row
(the dense kernels compute the full square whatever the mask), the feed-forward
(3 matmuls when gated) and the output projection onto the vocabulary. Not
counted: embedding lookups (gathers, no FLOPs), norms, softmax, the relative
position bias, the optimizer, and recomputation under remat (so this is MFU,
not hardware FLOPs utilisation). `6 x parameters` would instead count the
input embedding (a lookup) and omit attention, which at 512+ positions is a
large share of a small model's work.
"""

from __future__ import annotations

from typing import Sequence

from flanjax.models import decoder as decoder_lib
from flanjax.models import t5 as t5_lib

# Dense bf16 peak FLOP/s of one chip by jax's device_kind, most specific first
# (matched as a prefix). H100: SXM 989 TFLOP/s, PCIe 756, NVL 835 (jax reports the
# SXM part as e.g. "NVIDIA H100 80GB HBM3"). TPU: v4 275, v5e ("TPU v5 lite") 197,
# v5p ("TPU v5p" or "TPU v5") 459, v6e ("TPU v6 lite") 918.
PEAK_FLOPS = (
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H100", 989e12),
    ("NVIDIA GH200", 989e12),
    ("NVIDIA H200", 989e12),
    ("NVIDIA H800 PCIe", 756e12),
    ("NVIDIA H800", 989e12),
    ("NVIDIA B200", 2250e12),
    ("NVIDIA A100", 312e12),
    ("NVIDIA A800", 312e12),
    ("NVIDIA L4", 121e12),
    ("NVIDIA A10G", 70e12),
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),
    ("TPU v6 lite", 918e12),
    ("TPU v6e", 918e12),
)


def peak_flops(device_kind: str) -> float | None:
  """Dense bf16 peak FLOP/s of a device kind (jax's `device.device_kind`); None if unknown."""
  for name, flops in PEAK_FLOPS:
    if device_kind.startswith(name):
      return flops
  return None


def device_peak_flops(device=None) -> float | None:
  import jax  # pylint: disable=g-import-not-at-top
  device = device or jax.devices()[0]
  return peak_flops(getattr(device, "device_kind", ""))


def _t5_macs(cfg: t5_lib.T5Config, rows: Sequence[int]) -> float:
  """Multiply-adds of one forward pass over a row of (encoder, decoder) positions."""
  s_in, s_tg = rows
  d, f, hk, v = cfg.d_model, cfg.d_ff, cfg.num_heads * cfg.d_kv, cfg.vocab_size
  ff = (3 if cfg.feed_forward.startswith("gated") else 2) * d * f
  enc_pos = cfg.num_encoder_layers * (4 * d * hk + ff + 2 * s_in * hk)
  # Cross-attention keys and values: one projection per encoder position per decoder layer.
  enc_pos += cfg.num_decoder_layers * 2 * d * hk
  # Self-attention q, k, v, o; cross-attention q and o; scores and mixing over
  # the decoder row (self) and the encoder row (cross); the vocabulary projection.
  dec_pos = cfg.num_decoder_layers * (6 * d * hk + ff + 2 * s_tg * hk + 2 * s_in * hk) + d * v
  return s_in * enc_pos + s_tg * dec_pos


def _decoder_macs(cfg: decoder_lib.DecoderConfig, rows: Sequence[int]) -> float:
  (s,) = rows
  d, f, k, v = cfg.d_model, cfg.d_ff, cfg.head_dim, cfg.vocab_size
  proj = d * k * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)  # q, o over heads; k, v over kv heads
  per_pos = cfg.num_layers * (proj + 3 * d * f + 2 * s * cfg.num_heads * k) + d * v
  return s * per_pos


_MACS = {t5_lib.T5Config: _t5_macs, decoder_lib.DecoderConfig: _decoder_macs}


def step_flops(cfg, rows: Sequence[int], batch: int = 1) -> float:
  """Training FLOPs (forward + backward) of `batch` rows.

  rows: a row's positions per packing dimension, as `packing.row_lengths` gives
  them: (encoder, decoder) for T5, (inputs + targets,) or (targets,) for a decoder.
  """
  macs = next((fn for cls, fn in _MACS.items() if isinstance(cfg, cls)), None)
  if macs is None:
    raise TypeError(f"no FLOP count for {type(cfg).__name__}")
  return 3.0 * 2.0 * batch * macs(cfg, tuple(int(r) for r in rows))


def flops_per_token(cfg, rows: Sequence[int]) -> float:
  """Training FLOPs per position of a row (padding included: the device computes it)."""
  return step_flops(cfg, rows) / sum(rows)


def model_flops_per_token(model, rows: Sequence[int]) -> float | None:
  """flops_per_token of a model's config; None for a model this module cannot count."""
  try:
    return flops_per_token(model.config, rows)
  except (AttributeError, TypeError):
    return None

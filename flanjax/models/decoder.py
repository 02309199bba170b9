"""Llama-style decoder-only transformer in Flax linen.

Pre-norm blocks of RMSNorm, grouped-query attention with rotary position
embeddings, and a SwiGLU feed-forward; the output projection is either its own
matrix or the transposed token embedding. RoPE rotates the two halves of each
head (Hugging Face's rotate_half layout), so Hugging Face Llama weights load
without permuting q and k.

Inputs are seqio's decoder-only features (DecoderFeatureConverter and
PrefixLMFeatureConverter): decoder_input_tokens, decoder_segment_ids,
decoder_positions and, for prefix-LM, decoder_causal_attention (1 on the
prefix, which attends bidirectionally within itself). Attention never crosses
a segment and RoPE uses the per-segment positions, so a packed row gives each
example the logits it would get alone.

Parameters carry logical axis names: embed, mlp, heads, kv (head dim), vocab,
and kv_heads for the key/value heads of grouped-query attention (not in the
default rules, so replicated unless a rule maps it: their count need not
divide the model axis).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np

from flanjax.models import lora_hook as lora
# Llama's MLP is T5's gated feed-forward with SiLU (SwiGLU): one module serves both.
from flanjax.models import attention
from flanjax.models import dense
from flanjax.models import stack
from flanjax.models.t5 import FeedForward, RMSNorm, VocabularyEnds, _param
from flanjax.errors import UserError

Array = Any
ROPE_SCALINGS = ("none", "linear", "llama3")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  vocab_size: int = 32000
  d_model: int = 512
  num_heads: int = 8
  num_kv_heads: int = 8  # < num_heads: grouped-query attention; 1: multi-query
  head_dim: int = 64
  d_ff: int = 1408
  num_layers: int = 8
  rope_theta: float = 10000.0
  # Context-extension of the rotary frequencies, as in Hugging Face's
  # rope_parameters: "linear" divides them by rope_factor; "llama3" is Llama 3.1's
  # wavelength-dependent interpolation.
  rope_scaling: str = "none"
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_position: int = 8192
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = False
  max_position: int = 2048  # recorded for export; RoPE itself has no table
  # Mistral's sliding window: each position attends to the last `sliding_window` ones.
  # flanjax's attention has no window, so rows and decode caches longer than it are
  # refused (up to it, windowed and full causal attention are the same).
  sliding_window: int | None = None
  # Biases on the query, key and value projections (Qwen2; Llama and Mistral have none).
  qkv_bias: bool = False
  # RMSNorm over each head's query and key before RoPE (Qwen3).
  qk_norm: bool = False
  dropout_rate: float = 0.0
  neftune_alpha: float = 0.0  # NEFTune's noise on the training embeddings (t5.T5Config's)
  dtype: str = "float32"  # activations; parameters stay float32
  remat: bool = False  # recompute each layer's activations in the backward pass
  # models/stack.py: what the backward pass keeps ('none', 'full', 'dots_saveable', ...)
  remat_policy: str = "none"
  scan_layers: bool = False  # the layers under nn.scan (one compiled body)
  # models/attention.py: "auto" (cuDNN's fused attention where measured, else
  # "reference"), "reference" (scores in full), "blockwise" (memory linear in the
  # length), "dot_product" (jax.nn.dot_product_attention: cuDNN on a GPU)
  attention_impl: str = "auto"
  attention_block: int = 512  # query and key block of "blockwise"

  def __post_init__(self):
    attention.check_impl("DecoderConfig", self.attention_impl, self.attention_block)
    stack.check_config("DecoderConfig", self)
    if self.num_kv_heads <= 0 or self.num_heads % self.num_kv_heads:
      raise UserError(f"DecoderConfig.num_heads={self.num_heads} must be a multiple of "
                       f"num_kv_heads={self.num_kv_heads}")
    if self.head_dim % 2:
      raise UserError(f"DecoderConfig.head_dim={self.head_dim} must be even for RoPE")
    window = self.sliding_window
    if window is not None and (isinstance(window, bool) or not isinstance(window, int)
                               or window <= 0):
      raise UserError(f"DecoderConfig.sliding_window={window!r} must be a positive whole "
                      "number (None: no window)")
    if self.rope_scaling not in ROPE_SCALINGS:
      raise UserError(f"DecoderConfig.rope_scaling={self.rope_scaling!r} is not one of "
                       f"{', '.join(ROPE_SCALINGS)}")

  @property
  def feed_forward(self) -> str:
    """SwiGLU, in T5Config's terms, so t5.FeedForward builds it (wi_0 gate, wi_1 up)."""
    return "gated-silu"

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  def num_params(self) -> int:
    d, f, k = self.d_model, self.d_ff, self.head_dim
    attn = d * k * (2 * self.num_heads + 2 * self.num_kv_heads)
    attn += k * (self.num_heads + 2 * self.num_kv_heads) if self.qkv_bias else 0
    attn += 2 * k if self.qk_norm else 0
    layer = attn + 3 * d * f + 2 * d
    emb = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
    return self.num_layers * layer + emb + d


def rope_inverse_frequencies(cfg: DecoderConfig) -> np.ndarray:
  """[head_dim / 2] float32 angular speeds of the rotary pairs."""
  dim = cfg.head_dim
  inv = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
  if cfg.rope_scaling == "linear":
    inv = inv / cfg.rope_factor
  elif cfg.rope_scaling == "llama3":
    # Long wavelengths are slowed by `factor`, short ones kept, and the band in
    # between interpolated linearly in 1/wavelength.
    old = cfg.rope_original_max_position
    lo, hi = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    wavelen = 2 * np.pi / inv
    smooth = (old / wavelen - lo) / (hi - lo)
    mid = (1 - smooth) * inv / cfg.rope_factor + smooth * inv
    inv = np.where(wavelen > old / lo, inv / cfg.rope_factor,
                   np.where(wavelen < old / hi, inv, mid))
  return inv.astype(np.float32)


ROPE_LOOKUP = True  # rope_tables with a bound: cos and sin looked up from tables, not computed


def rope_tables(cfg: DecoderConfig, positions: Array, bound: int | None = None):
  """positions [b, l] -> (cos, sin), each [b, l, 1, head_dim] float32.

  bound: positions are known to lie in [0, bound) (a row's positions, as the packer and
  the default arange make them): cos and sin are then looked up from [bound, head_dim]
  tables made once at trace time, not computed from the positions in the step. XLA fuses
  an elementwise cos / sin into every consumer, so computed in the step they were
  evaluated again in each layer's q / k rotation, in each attention block's slice of the
  keys and in the backward pass (44 cosines in the decoder benchmark's compiled step).
  A position outside [0, bound) gets NaN (the lookup's fill), not a wrong rotation.
  """
  inv = rope_inverse_frequencies(cfg)
  if bound is None or not ROPE_LOOKUP:
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv)
    angles = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    return jnp.cos(angles), jnp.sin(angles)
  # The float32 angle the computed path forms, its cos and sin rounded from float64.
  freqs = np.arange(bound, dtype=np.float32)[:, None] * inv[None, :]
  angles = np.concatenate([freqs, freqs], axis=-1).astype(np.float64)
  pos = positions.astype(jnp.int32)
  return tuple(jnp.take(jnp.asarray(f(angles).astype(np.float32)), pos, axis=0,
                        mode="fill", fill_value=np.nan)[:, :, None, :]
               for f in (np.cos, np.sin))


def apply_rope(x: Array, rope) -> Array:
  """Rotates x [b, l, heads, head_dim]: pair i is (x[i], x[i + head_dim/2])."""
  cos, sin = rope
  x32 = x.astype(jnp.float32)
  first, second = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([-second, first], axis=-1)
  return (x32 * cos + rotated * sin).astype(x.dtype)


def _write_rows(buffer: Array, new: Array, index: Array) -> Array:
  """Writes new [b, n, ...] into buffer [b, max_len, ...] at a per-row offset."""
  index = jnp.broadcast_to(jnp.asarray(index, jnp.int32), (buffer.shape[0],))
  write = lambda buf, x, i: jax.lax.dynamic_update_slice(
      buf, x.astype(buf.dtype), (i,) + (0,) * (buf.ndim - 1))
  return jax.vmap(write)(buffer, new, index)


class Attention(nn.Module):
  config: DecoderConfig

  def setup(self):
    c = self.config
    d, h, g, k = c.d_model, c.num_heads, c.num_kv_heads, c.head_dim
    self.wq = _param(self, "q", d ** -0.5, (d, h, k), ("embed", "heads", "kv"))
    self.wk = _param(self, "k", d ** -0.5, (d, g, k), ("embed", "kv_heads", "kv"))
    self.wv = _param(self, "v", d ** -0.5, (d, g, k), ("embed", "kv_heads", "kv"))
    self.wo = _param(self, "o", (h * k) ** -0.5, (h, k, d), ("heads", "kv", "embed"))
    if c.qkv_bias:
      zeros = lambda axes: nn.with_logical_partitioning(nn.initializers.zeros, axes)  # noqa: E731
      self.bq = self.param("q_bias", zeros(("heads", "kv")), (h, k), jnp.float32)
      self.bk = self.param("k_bias", zeros(("kv_heads", "kv")), (g, k), jnp.float32)
      self.bv = self.param("v_bias", zeros(("kv_heads", "kv")), (g, k), jnp.float32)
    if c.qk_norm:
      self.q_norm = RMSNorm(c.rms_norm_eps, c.compute_dtype, axis="kv")
      self.k_norm = RMSNorm(c.rms_norm_eps, c.compute_dtype, axis="kv")
    self.dropout = nn.Dropout(c.dropout_rate)

  def _project(self, name, x, kernel, bias, deterministic):
    dt = self.config.compute_dtype
    y = dense.project(x, kernel.astype(dt))
    if bias is not None:  # before LoRA's delta, as in PEFT (it adapts the whole Linear)
      y = y + bias.astype(dt)
    return lora.add(self, name, x, y, deterministic)

  def __call__(self, x, spec, rope, deterministic=True, cache=None, write_index=None):
    """Self-attention of x [b, l, d]; spec (attention.Spec): which keys each query sees.

    With `cache` ((keys, values) buffers [b, max_len, kv_heads, head_dim]), the
    new keys and values are written at write_index (scalar or per row) and the
    queries attend over the whole buffer; the updated cache is returned too.
    """
    c = self.config
    dt = c.compute_dtype
    bias = (self.bq, self.bk, self.bv) if c.qkv_bias else (None, None, None)
    q = self._project("q", x, self.wq, bias[0], deterministic)
    kk = self._project("k", x, self.wk, bias[1], deterministic)
    v = self._project("v", x, self.wv, bias[2], deterministic)
    if c.qk_norm:  # over head_dim, after the projection (and LoRA's delta), before RoPE
      q, kk = self.q_norm(q), self.k_norm(kk)
    q = nn.with_logical_constraint(apply_rope(q, rope), ("batch", "length", "heads", "kv"))
    kk = nn.with_logical_constraint(apply_rope(kk, rope), ("batch", "length", "kv_heads", "kv"))
    v = nn.with_logical_constraint(v, ("batch", "length", "kv_heads", "kv"))
    if cache is not None:
      kk = _write_rows(cache[0], kk, write_index)
      v = _write_rows(cache[1], v, write_index)
    drop = None
    if not deterministic and c.dropout_rate > 0:
      drop = lambda p: self.dropout(p, deterministic=False)  # noqa: E731
    # Query head j reads key/value head j // groups (Hugging Face's repeat_kv order).
    out = attention.attend(q, kk, v, spec, impl=c.attention_impl, scale=c.head_dim ** -0.5,
                           block=c.attention_block, dropout=drop)
    out = lora.add(self, "o", out, dense.project(out, self.wo.astype(dt), 2),
                   deterministic)
    return out if cache is None else (out, (kk, v))


class DecoderLayer(nn.Module):
  config: DecoderConfig

  def setup(self):
    c = self.config
    self.pre_attention_norm = RMSNorm(c.rms_norm_eps, c.compute_dtype)
    self.attention = Attention(c)
    self.pre_mlp_norm = RMSNorm(c.rms_norm_eps, c.compute_dtype)
    self.mlp = FeedForward(c)
    self.drop = nn.Dropout(c.dropout_rate)

  def __call__(self, x, spec, rope, deterministic=True, cache=None, write_index=None):
    att = self.attention(self.pre_attention_norm(x), spec, rope, deterministic, cache=cache,
                         write_index=write_index)
    if cache is not None:
      att, cache = att
    x = x + self.drop(att, deterministic)
    x = x + self.drop(self.mlp(self.pre_mlp_norm(x), deterministic), deterministic)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    return x if cache is None else (x, cache)


def attention_spec(segment_ids: Array, causal_attention: Array | None = None,
                   q_positions: Array | None = None, kv_segments: Array | None = None):
  """Causal within a segment; prefix positions (causal_attention > 0) also see each other.

  For a cache: q_positions [b or 1, q] are the queries' slots and kv_segments
  [b, max_len] the cache's; causal_attention then spans the cache ([b, max_len]).
  """
  kv_segments = segment_ids if kv_segments is None else kv_segments
  kv_pos = jnp.arange(kv_segments.shape[1], dtype=jnp.int32)[None]
  q_pos = kv_pos[:, :segment_ids.shape[1]] if q_positions is None else q_positions
  prefix = None if causal_attention is None else causal_attention > 0
  aligned = q_positions is None and segment_ids.shape[1] == kv_segments.shape[1]
  return attention.Spec(segment_ids, kv_segments, q_pos, kv_pos, causal=True, aligned=aligned,
                        q_prefix=None if prefix is None else prefix[:, :segment_ids.shape[1]],
                        kv_prefix=prefix)


class Decoder(VocabularyEnds, nn.Module):
  """Decoder-only LM; ``__call__`` returns logits [batch, length, vocab]."""
  config: DecoderConfig

  def setup(self):
    c = self.config
    # Tied: the embedding is also the output matrix, so keep logits O(1).
    self.embedding_param(c.d_model ** -0.5 if c.tie_word_embeddings else 1.0)
    # `deterministic` is static (positional index counted with self as 0).
    self.layers = stack.build(DecoderLayer, c, c.num_layers, "layer", static_argnums=(4,))
    self.final_norm = RMSNorm(c.rms_norm_eps, c.compute_dtype)
    self.dropout = nn.Dropout(c.dropout_rate)
    self.lm_head_param()

  def __call__(self, decoder_input_tokens, decoder_target_tokens=None,
               decoder_segment_ids=None, decoder_positions=None,
               decoder_causal_attention=None, deterministic=True, return_hidden=False):
    """Logits for every position.

    decoder_target_tokens is accepted (the trainer passes a whole batch) but
    not needed: without segment ids a row is one example, and right padding
    never reaches a real token through a causal mask.

    return_hidden: (final hidden states [b, l, d], output matrix) instead, for a
    loss that applies the output layer itself (losses.output_cross_entropy):
    the matrix is [d, vocab], or the [vocab, d] embedding when tied.
    """
    del decoder_target_tokens
    tokens = decoder_input_tokens
    self._check_window(tokens.shape[1], "rows")
    seg = jnp.ones_like(tokens) if decoder_segment_ids is None else decoder_segment_ids
    pos = decoder_positions
    if pos is None:
      pos = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    spec = attention_spec(seg, decoder_causal_attention)
    rope = rope_tables(self.config, pos, bound=tokens.shape[1])
    x = self.dropout(self._neftune(self._embed(tokens), seg, deterministic), deterministic)
    x, _ = stack.run(self.layers, self.config.num_layers, x, spec, rope, deterministic)
    x = self.dropout(self.final_norm(x), deterministic)
    if return_hidden:
      return self._output(x)
    return self._logits(x)

  # ---------------------------------------------------------------- decoding
  # The cache holds one row per example; slot t of a row holds position t, and
  # state["index"] [b] is the next free slot of each row, so prompts of
  # different lengths decode side by side without left padding.

  def _check_window(self, length: int, what: str) -> None:
    window = self.config.sliding_window
    if window is not None and length > window:
      raise UserError(
          f"{what} of {length} tokens are longer than this model's sliding window "
          f"({window}, a Mistral config's sliding_window), which flanjax's attention does "
          f"not apply; keep them to {window} tokens (train.task_feature_lengths, or the "
          "prompt plus --max_decode_len)")

  def init_decode_state(self, batch: int, max_len: int):
    c = self.config
    self._check_window(max_len, "a prompt and its answer")
    empty = jnp.zeros((batch, max_len, c.num_kv_heads, c.head_dim), c.compute_dtype)
    return {"cache": stack.each(self.layers, c.num_layers, lambda _: (empty, empty)),
            "index": jnp.zeros((batch,), jnp.int32)}

  def _run_cached(self, state, tokens, positions, spec, write_index, bound=None):
    rope = rope_tables(self.config, positions, bound)
    x = self._embed(tokens)
    x, caches = stack.run(self.layers, self.config.num_layers, x, spec, rope, True,
                          write_index=write_index, per_layer={"cache": state["cache"]})
    return self.final_norm(x), caches

  def prefill(self, state, tokens, lengths=None, causal_attention=None):
    """Runs the prompt tokens [b, p] (right-padded to `lengths` >= 1) into an empty cache.

    causal_attention [b, p]: 1 on prompt positions that attend bidirectionally
    (a prefix-LM's inputs). Returns (logits [b, vocab] after each row's last
    prompt token, state with index = lengths).
    """
    b, p = tokens.shape
    max_len = stack.cache_length(state["cache"])
    lengths = jnp.full((b,), p, jnp.int32) if lengths is None else lengths.astype(jnp.int32)
    if causal_attention is not None:
      causal_attention = jnp.pad(causal_attention, ((0, 0), (0, max_len - p)))
    spec = attention_spec(jnp.ones((b, p), jnp.int32), causal_attention,
                          kv_segments=jnp.ones((b, max_len), jnp.int32))
    positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
    x, caches = self._run_cached(state, tokens, positions, spec, 0, bound=p)
    last = jnp.take_along_axis(x, (lengths - 1)[:, None, None], axis=1)
    return self._logits(last)[:, 0], {"cache": caches, "index": lengths}

  def decode_step(self, state, token):
    """token [b] at each row's next position -> (logits [b, vocab], state).

    The cache must have room: a write past max_len is clamped onto the last slot.
    """
    index = state["index"]
    max_len = stack.cache_length(state["cache"])
    b = token.shape[0]
    spec = attention_spec(jnp.ones((b, 1), jnp.int32), q_positions=index[:, None],
                          kv_segments=jnp.ones((b, max_len), jnp.int32))
    x, caches = self._run_cached(state, token[:, None], index[:, None], spec, index)
    return self._logits(x)[:, 0], {"cache": caches, "index": index + 1}


def model_inputs(batch: dict) -> dict:
  """The model's keyword arguments out of a seqio decoder-only or prefix-LM batch."""
  keys = ("decoder_input_tokens", "decoder_target_tokens", "decoder_segment_ids",
          "decoder_positions", "decoder_causal_attention")
  return {k: batch[k] for k in keys if k in batch}


def dummy_batch(batch_size: int, input_len: int, target_len: int = 0) -> dict:
  """Init inputs; called like t5.dummy_batch, a prefix-LM row holds inputs + targets."""
  length = input_len + target_len
  return {
      "decoder_input_tokens": np.ones((batch_size, length), np.int32),
      "decoder_target_tokens": np.ones((batch_size, length), np.int32),
  }

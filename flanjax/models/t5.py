"""T5 encoder-decoder (original T5, T5 v1.1 and FLAN-T5) in Flax linen.

One config covers the family: ``feed_forward`` picks ReLU (T5) or gated-GELU
(v1.1 / FLAN-T5), ``tie_word_embeddings`` the shared, rescaled output of the
original T5. The arithmetic follows the reference exactly (RMSNorm without
mean subtraction, unscaled dot-product attention, relative position buckets
shared by all layers of a stack) so that Hugging Face weights load as they are.

Packing: every attention takes segment ids; tokens attend only within their
own segment. Relative positions are index distances, as in t5x and
transformers: inside a packed example they equal its own positions' distances,
so a packed row gives each example the logits it would get alone, and one
[heads, q, k] bias serves the whole batch (a per-row bias costs batch times
the memory: 1 GB for 16 rows of 2,048 tokens).

Parameters carry logical axis names (embed, mlp, heads, kv, vocab,
relpos_buckets) for the partitioner; activations are constrained to
(batch, length, embed) and friends.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np

from flanjax.errors import UserError
from flanjax.models import lora_hook as lora
from flanjax.models import prompt_hook
from flanjax.models import attention
from flanjax.models import dense
from flanjax.models import stack
from flanjax.models.attention import NEG_INF, relative_position_bucket  # noqa: F401

Array = Any


@gin.configurable
@dataclasses.dataclass(frozen=True)
class T5Config:
  vocab_size: int = 32128
  d_model: int = 512
  d_kv: int = 64
  d_ff: int = 1024
  num_heads: int = 6
  num_encoder_layers: int = 8
  num_decoder_layers: int = 8
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  dropout_rate: float = 0.0
  # NEFTune: uniform noise on the training embeddings, alpha / sqrt(length x d_model) at most
  # (0: off); VocabularyEnds._neftune.
  neftune_alpha: float = 0.0
  layer_norm_epsilon: float = 1e-6
  feed_forward: str = "gated-gelu"  # "relu" (T5), "gated-gelu" (v1.1, FLAN-T5), "gated-relu"
  tie_word_embeddings: bool = False
  dtype: str = "float32"  # activations; parameters stay float32
  remat: bool = False  # recompute each layer's activations in the backward pass
  # models/stack.py: what the backward pass keeps ('none', 'full', 'dots_saveable', ...)
  remat_policy: str = "none"
  scan_layers: bool = False  # each stack's layers under nn.scan (one compiled body)
  # models/attention.py: "auto" (cuDNN's fused attention where measured, else
  # "reference"), "reference" (scores in full), "blockwise" (memory linear in the
  # length), "dot_product" (jax.nn.dot_product_attention: cuDNN on a GPU)
  attention_impl: str = "auto"
  attention_block: int = 512  # query and key block of "blockwise"

  def __post_init__(self):
    attention.check_impl("T5Config", self.attention_impl, self.attention_block)
    stack.check_config("T5Config", self)
    if self.feed_forward not in ("relu", "gelu", "gelu_exact", "gated-gelu", "gated-relu",
                                 "gated-silu"):
      raise UserError(f"T5Config.feed_forward={self.feed_forward!r} is not one of "
                       "relu, gelu, gated-gelu, gated-relu, gated-silu")

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  def num_params(self) -> int:
    d, f, h, k = self.d_model, self.d_ff, self.num_heads, self.d_kv
    ff = d * f * (3 if self.feed_forward.startswith("gated") else 2)
    attn = 4 * d * h * k
    enc = self.num_encoder_layers * (attn + ff + 2 * d)
    dec = self.num_decoder_layers * (2 * attn + ff + 3 * d)
    emb = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
    rel = 2 * self.relative_attention_num_buckets * h
    return enc + dec + emb + rel + 2 * d


def _act(name: str):
  # "gelu" is transformers' gelu_new (tanh), as gated-gelu uses it; "gelu_exact" the erf form
  # that transformers' plain "gelu" is.
  return {"relu": jax.nn.relu, "gelu": lambda x: jax.nn.gelu(x, approximate=True),
          "gelu_exact": lambda x: jax.nn.gelu(x, approximate=False), "silu": jax.nn.silu}[name]


def _param(module, name, init_std, shape, axes):
  init = nn.with_logical_partitioning(nn.initializers.normal(init_std), axes)
  return module.param(name, init, shape, jnp.float32)


class RMSNorm(nn.Module):
  eps: float = 1e-6
  dtype: Any = jnp.float32
  axis: str = "embed"  # the logical name of the normalised (last) axis

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (self.axis,)),
                       (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * scale).astype(self.dtype)


class RelativePositionBias(nn.Module):
  num_buckets: int
  max_distance: int
  num_heads: int
  bidirectional: bool

  @nn.compact
  def __call__(self) -> Array:
    """The table [buckets, heads]; attention.Spec looks it up (per block when blockwise)."""
    return _param(self, "rel_embedding", 1.0, (self.num_buckets, self.num_heads),
                  ("relpos_buckets", "heads"))

  def spec(self, table, q_segments, kv_segments, q_positions, kv_positions, causal=False,
           kv_padding=False, aligned=False) -> attention.Spec:
    return attention.Spec(q_segments, kv_segments, q_positions, kv_positions, rel_table=table,
                          causal=causal, kv_padding=kv_padding, aligned=aligned,
                          rel_bidirectional=self.bidirectional,
                          rel_max_distance=self.max_distance)


class Attention(nn.Module):
  config: T5Config

  def setup(self):
    c = self.config
    h, k, d = c.num_heads, c.d_kv, c.d_model
    self.wq = _param(self, "q", (d * k) ** -0.5, (d, h, k), ("embed", "heads", "kv"))
    self.wk = _param(self, "k", d ** -0.5, (d, h, k), ("embed", "heads", "kv"))
    self.wv = _param(self, "v", d ** -0.5, (d, h, k), ("embed", "heads", "kv"))
    self.wo = _param(self, "o", (h * k) ** -0.5, (h, k, d), ("heads", "kv", "embed"))
    self.dropout = nn.Dropout(c.dropout_rate)

  def project_kv(self, x_kv, deterministic=True):
    dt = self.config.compute_dtype
    k = dense.project(x_kv, self.wk.astype(dt))
    v = dense.project(x_kv, self.wv.astype(dt))
    return (lora.add(self, "k", x_kv, k, deterministic),
            lora.add(self, "v", x_kv, v, deterministic))

  def __call__(self, x_q, x_kv, spec, deterministic=True, kv=None, cache=None,
               cache_index=None):
    """Attention of x_q over x_kv.

    kv: precomputed (keys, values), e.g. of the encoder output while decoding.
    cache, cache_index: (keys, values) buffers of a decoder's past positions;
      the new keys and values of x_kv are written at cache_index, and the
      updated buffers are returned beside the output.
    """
    dt = self.config.compute_dtype
    q = dense.project(x_q, self.wq.astype(dt))
    q = lora.add(self, "q", x_q, q, deterministic)
    q = nn.with_logical_constraint(q, ("batch", "length", "heads", "kv"))
    if kv is None:
      kv = self.project_kv(x_kv, deterministic)
    kk, v = kv
    if cache is not None:
      kk = jax.lax.dynamic_update_slice(cache[0], kk.astype(cache[0].dtype),
                                        (0, cache_index, 0, 0))
      v = jax.lax.dynamic_update_slice(cache[1], v.astype(cache[1].dtype),
                                       (0, cache_index, 0, 0))
    c = self.config
    drop = None
    if not deterministic and c.dropout_rate > 0:
      drop = lambda p: self.dropout(p, deterministic=False)  # noqa: E731
    # T5 folds 1/sqrt(d_kv) into the initialisation of q: no scaling here.
    out = attention.attend(q, kk, v, spec, impl=c.attention_impl, block=c.attention_block,
                           dropout=drop)
    out = lora.add(self, "o", out, dense.project(out, self.wo.astype(dt), 2),
                   deterministic)
    return out if cache is None else (out, (kk, v))


class FeedForward(nn.Module):
  config: T5Config

  @nn.compact
  def __call__(self, x, deterministic=True):
    c = self.config
    dt = c.compute_dtype
    gated = c.feed_forward.startswith("gated")
    act = _act(c.feed_forward.split("-")[-1])
    if gated:
      wi0 = _param(self, "wi_0", c.d_model ** -0.5, (c.d_model, c.d_ff), ("embed", "mlp"))
      wi1 = _param(self, "wi_1", c.d_model ** -0.5, (c.d_model, c.d_ff), ("embed", "mlp"))
      hidden = (act(lora.add(self, "wi_0", x, dense.project(x, wi0.astype(dt)), deterministic))
                * lora.add(self, "wi_1", x, dense.project(x, wi1.astype(dt)), deterministic))
    else:
      wi = _param(self, "wi", c.d_model ** -0.5, (c.d_model, c.d_ff), ("embed", "mlp"))
      hidden = act(lora.add(self, "wi", x, dense.project(x, wi.astype(dt)), deterministic))
    hidden = nn.with_logical_constraint(hidden, ("batch", "length", "mlp"))
    hidden = nn.Dropout(c.dropout_rate)(hidden, deterministic=deterministic)
    wo = _param(self, "wo", c.d_ff ** -0.5, (c.d_ff, c.d_model), ("mlp", "embed"))
    return lora.add(self, "wo", hidden, dense.project(hidden, wo.astype(dt)), deterministic)


class EncoderLayer(nn.Module):
  config: T5Config

  @nn.compact
  def __call__(self, x, spec, deterministic=True):
    c = self.config
    drop = nn.Dropout(c.dropout_rate)
    y = RMSNorm(c.layer_norm_epsilon, c.compute_dtype, name="pre_attention_norm")(x)
    x = x + drop(Attention(c, name="attention")(y, y, spec, deterministic), deterministic)
    y = RMSNorm(c.layer_norm_epsilon, c.compute_dtype, name="pre_mlp_norm")(x)
    x = x + drop(FeedForward(c, name="mlp")(y, deterministic), deterministic)
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class DecoderLayer(nn.Module):
  config: T5Config

  def setup(self):
    c = self.config
    norm = lambda: RMSNorm(c.layer_norm_epsilon, c.compute_dtype)
    self.pre_self_attention_norm = norm()
    self.self_attention = Attention(c)
    self.pre_cross_attention_norm = norm()
    self.cross_attention = Attention(c)
    self.pre_mlp_norm = norm()
    self.mlp = FeedForward(c)
    self.drop = nn.Dropout(c.dropout_rate)

  def __call__(self, x, encoded, self_spec, cross_spec, deterministic=True,
               cross_kv=None, cache=None, cache_index=None):
    """With `cache` (one decoding step), also returns the updated cache."""
    y = self.pre_self_attention_norm(x)
    att = self.self_attention(y, y, self_spec, deterministic, cache=cache,
                              cache_index=cache_index)
    if cache is not None:
      att, cache = att
    x = x + self.drop(att, deterministic)
    y = self.pre_cross_attention_norm(x)
    x = x + self.drop(self.cross_attention(y, encoded, cross_spec, deterministic, kv=cross_kv),
                      deterministic)
    x = x + self.drop(self.mlp(self.pre_mlp_norm(x), deterministic), deterministic)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    return x if cache is None else (x, cache)


def _segments(tokens, segment_ids):
  if segment_ids is None:
    # Unpacked: one example per row, padding is segment 0.
    segment_ids = (tokens > 0).astype(jnp.int32)
  return segment_ids


class VocabularyEnds:
  """The token embedding in and the output layer out, the same for T5 and the decoder.

  A model's setup calls embedding_param first and lm_head_param last (the order of the
  parameters' initialisation, so their initial values, is kept); _output_input is where a
  model rescales before the output layer (T5's tied one)."""

  def embedding_param(self, std):
    self.embedding = _param(self, "token_embedding", std,
                            (self.config.vocab_size, self.config.d_model), ("vocab", "embed"))

  def lm_head_param(self):
    c = self.config
    if not c.tie_word_embeddings:
      self.lm_head = _param(self, "lm_head", c.d_model ** -0.5, (c.d_model, c.vocab_size),
                            ("embed", "vocab"))

  def _embed(self, tokens):
    x = jnp.take(self.embedding, tokens, axis=0).astype(self.config.compute_dtype)
    x = prompt_hook.embed(self, tokens, x)  # a soft prompt's virtual tokens
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))

  def _neftune(self, x, segments, deterministic):
    """NEFTune (Jain et al., 2023) in training: x + U(-1, 1) x alpha / sqrt(L d), L the
    length of the example a position belongs to (its segment in a packed row; a row
    unpacked and unpadded is one example, as in TRL's), padding untouched."""
    alpha = self.config.neftune_alpha
    if deterministic or not alpha:
      return x
    segments = segments.astype(jnp.int32)
    counts = jax.vmap(lambda s: jnp.bincount(s, length=s.shape[0] + 1))(segments)
    length = jnp.take_along_axis(counts, segments, axis=1).astype(jnp.float32)
    scale = jnp.where(segments > 0, alpha * jax.lax.rsqrt(length * x.shape[-1]), 0.0)
    noise = jax.random.uniform(self.make_rng("dropout"), x.shape, jnp.float32, -1.0, 1.0)
    return (x.astype(jnp.float32) + noise * scale[..., None]).astype(x.dtype)

  def _output_input(self, x):
    return x

  def _output(self, x):
    """(the output layer's input, its matrix): [d, vocab], or the [vocab, d] embedding when
    tied, for a loss that applies the output layer itself (losses.output_cross_entropy)."""
    return self._output_input(x), (self.embedding if self.config.tie_word_embeddings
                                   else self.lm_head)

  def _logits(self, x):
    x, w = self._output(x)
    if self.config.tie_word_embeddings:
      logits = dense.project_transposed(x, w.astype(x.dtype))
    else:
      logits = dense.project(x, w.astype(x.dtype))
    return nn.with_logical_constraint(logits.astype(jnp.float32), ("batch", "length", "vocab"))


class T5(VocabularyEnds, nn.Module):
  """Encoder-decoder; ``__call__`` returns decoder logits [batch, length, vocab]."""
  config: T5Config

  def setup(self):
    c = self.config
    self.embedding_param(1.0)
    self.encoder_relpos = RelativePositionBias(
        c.relative_attention_num_buckets, c.relative_attention_max_distance,
        c.num_heads, bidirectional=True)
    self.decoder_relpos = RelativePositionBias(
        c.relative_attention_num_buckets, c.relative_attention_max_distance,
        c.num_heads, bidirectional=False)
    # `deterministic` is static (positional index counted with self as 0).
    self.encoder_layers = stack.build(EncoderLayer, c, c.num_encoder_layers, "encoder_layer",
                                      static_argnums=(3,))
    self.decoder_layers = stack.build(DecoderLayer, c, c.num_decoder_layers, "decoder_layer",
                                      static_argnums=(5,))
    self.encoder_norm = RMSNorm(c.layer_norm_epsilon, c.compute_dtype)
    self.decoder_norm = RMSNorm(c.layer_norm_epsilon, c.compute_dtype)
    self.dropout = nn.Dropout(c.dropout_rate)
    self.lm_head_param()

  def encode(self, encoder_input_tokens, encoder_segment_ids=None,
             encoder_positions=None, deterministic=True):
    del encoder_positions  # distances inside an example are index distances
    seg = _segments(encoder_input_tokens, encoder_segment_ids)
    idx = jnp.arange(encoder_input_tokens.shape[1])[None]
    spec = self.encoder_relpos.spec(self.encoder_relpos(), seg, seg, idx, idx, kv_padding=True)
    x = self.dropout(self._neftune(self._embed(encoder_input_tokens), seg, deterministic),
                     deterministic)
    x, _ = stack.run(self.encoder_layers, self.config.num_encoder_layers, x, spec,
                     deterministic)
    return self.dropout(self.encoder_norm(x), deterministic)

  def decode(self, encoded, encoder_input_tokens, decoder_input_tokens,
             decoder_target_tokens=None, encoder_segment_ids=None,
             decoder_segment_ids=None, decoder_positions=None, deterministic=True,
             return_hidden=False):
    enc_seg = _segments(encoder_input_tokens, encoder_segment_ids)
    if decoder_segment_ids is None:
      # Unpacked: every decoder position belongs to the row's single example.
      decoder_segment_ids = jnp.ones_like(decoder_input_tokens)
      if decoder_target_tokens is not None:
        decoder_segment_ids = (decoder_target_tokens > 0).astype(jnp.int32)
    del decoder_positions  # as in encode
    dec_seg = _segments(decoder_input_tokens, decoder_segment_ids)
    idx = jnp.arange(decoder_input_tokens.shape[1])[None]
    self_spec = self.decoder_relpos.spec(self.decoder_relpos(), dec_seg, dec_seg, idx, idx,
                                         causal=True, aligned=True)
    cross_spec = attention.Spec(dec_seg, enc_seg, idx,
                                jnp.arange(encoder_input_tokens.shape[1])[None], kv_padding=True)
    x = self.dropout(self._neftune(self._embed(decoder_input_tokens), dec_seg, deterministic),
                     deterministic)
    x, _ = stack.run(self.decoder_layers, self.config.num_decoder_layers, x, encoded,
                     self_spec, cross_spec, deterministic)
    x = self.dropout(self.decoder_norm(x), deterministic)
    return self._output(x) if return_hidden else self._logits(x)

  def _output_input(self, x):
    # The original T5 rescales before the shared (tied) output projection.
    return x * (self.config.d_model ** -0.5) if self.config.tie_word_embeddings else x

  def init_decode_state(self, encoded, encoder_input_tokens, max_len: int):
    """Per-layer cross-attention keys/values and empty self-attention caches."""
    c = self.config
    b = encoded.shape[0]
    cross_kv = stack.each(self.decoder_layers, c.num_decoder_layers,
                          lambda layer: layer.cross_attention.project_kv(encoded))
    caches = stack.each(self.decoder_layers, c.num_decoder_layers, lambda _: (
        (jnp.zeros((b, max_len, c.num_heads, c.d_kv), c.compute_dtype),) * 2))
    return {"cross_kv": cross_kv, "cache": caches}

  def decode_step(self, state, encoder_input_tokens, token, index):
    """One decoder position: token [b] at position `index` -> (logits [b, vocab], state)."""
    max_len = stack.cache_length(state["cache"])
    b = token.shape[0]
    one = jnp.ones((b, 1), jnp.int32)
    q_pos = jnp.full((1, 1), index, jnp.int32)
    self_spec = self.decoder_relpos.spec(
        self.decoder_relpos(), one, jnp.ones((b, max_len), jnp.int32), q_pos,
        jnp.arange(max_len, dtype=jnp.int32)[None], causal=True)
    enc_len = encoder_input_tokens.shape[1]
    cross_spec = attention.Spec(one, (encoder_input_tokens > 0).astype(jnp.int32), q_pos,
                                jnp.arange(enc_len)[None], kv_padding=True)
    x = self._embed(token[:, None])
    x, caches = stack.run(self.decoder_layers, self.config.num_decoder_layers, x, None,
                          self_spec, cross_spec, True, cache_index=index,
                          per_layer={"cross_kv": state["cross_kv"], "cache": state["cache"]})
    logits = self._logits(self.decoder_norm(x))[:, 0]
    return logits, {"cross_kv": state["cross_kv"], "cache": caches}

  def __call__(self, encoder_input_tokens, decoder_input_tokens,
               decoder_target_tokens=None, encoder_segment_ids=None,
               decoder_segment_ids=None, encoder_positions=None,
               decoder_positions=None, deterministic=True, return_hidden=False):
    """Decoder logits; return_hidden: (the decoder's final hidden states, the output
    matrix) instead, as Decoder.__call__ (rescaled for the tied output when tied)."""
    encoded = self.encode(encoder_input_tokens, encoder_segment_ids, encoder_positions,
                          deterministic)
    return self.decode(encoded, encoder_input_tokens, decoder_input_tokens,
                       decoder_target_tokens, encoder_segment_ids, decoder_segment_ids,
                       decoder_positions, deterministic, return_hidden)


def model_inputs(batch: dict) -> dict:
  """The model's keyword arguments out of a seqio EncDecFeatureConverter batch."""
  keys = ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens",
          "encoder_segment_ids", "decoder_segment_ids", "encoder_positions",
          "decoder_positions")
  return {k: batch[k] for k in keys if k in batch}


def dummy_batch(batch_size: int, input_len: int, target_len: int) -> dict:
  return {
      "encoder_input_tokens": np.ones((batch_size, input_len), np.int32),
      "decoder_input_tokens": np.ones((batch_size, target_len), np.int32),
      "decoder_target_tokens": np.ones((batch_size, target_len), np.int32),
  }

"""Attention implementations (models/attention.py) against the reference: logits, gradients,
cached decoding, and the compiled temporary memory at a long length."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flanjax import decoding
from flanjax.models import attention, decoder, t5

T5_CFG = t5.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_heads=4,
                     num_encoder_layers=1, num_decoder_layers=1,
                     relative_attention_num_buckets=8, relative_attention_max_distance=16,
                     attention_impl="reference")
DEC_CFG = decoder.DecoderConfig(vocab_size=64, d_model=32, num_heads=4, num_kv_heads=2,
                                head_dim=8, d_ff=48, num_layers=1, attention_impl="reference")
# Block 8: several query and key blocks, the last ones padded (rows of 21, 13 and 23).
IMPLS = [("blockwise", 8), ("dot_product", 512)]


def _with(cfg, impl, block):
  return dataclasses.replace(cfg, attention_impl=impl, attention_block=block)


def _packed_row(rng, lengths, total):
  """tokens, segment ids and per-segment positions of one packed row of `total` slots."""
  tok, seg, pos = (np.zeros(total, np.int32) for _ in range(3))
  at = 0
  for s, n in enumerate(lengths, 1):
    tok[at:at + n] = rng.integers(2, 64, n)
    seg[at:at + n], pos[at:at + n] = s, np.arange(n)
    at += n
  return tok, seg, pos


def _compare(build, cfg, inputs, weights):
  """Logits (where weights > 0) and gradients of every implementation vs the reference."""
  ref_model = build(cfg)
  params = jax.jit(ref_model.init)(jax.random.PRNGKey(0), **inputs)["params"]

  def run(model):
    def loss(p):
      logits = model.apply({"params": p}, **inputs)
      return jnp.sum(jnp.where(weights[..., None] > 0, jax.nn.log_softmax(logits), 0.0)), logits
    # Compiled: the same computation as op by op, in a fraction of the time.
    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return np.asarray(logits)[weights > 0], grads

  want_logits, want_grads = run(ref_model)
  for impl, block in IMPLS:
    logits, grads = run(build(_with(cfg, impl, block)))
    np.testing.assert_allclose(logits, want_logits, atol=1e-5, rtol=1e-5, err_msg=impl)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(grads),
                            jax.tree.leaves(want_grads)):
      scale = max(1.0, float(np.abs(w).max()))
      np.testing.assert_allclose(np.asarray(g) / scale, np.asarray(w) / scale, atol=1e-5,
                                 err_msg=f"{impl} block {block}: {jax.tree_util.keystr(path)}")


def _t5_packed_inputs(rng):
  """Two packed T5 rows: encoder rows of 21 (examples 7 + 9, and 19), decoder rows of 13."""
  enc, enc_seg, dec_in, dec_tgt, dec_seg = [], [], [], [], []
  for lens_in, lens_out in (([7, 9], [5, 4]), ([19], [11])):
    tok, seg, _ = _packed_row(rng, lens_in, 21)
    enc.append(tok)
    enc_seg.append(seg)
    tgt, dseg, _ = _packed_row(rng, lens_out, 13)
    # Each packed target starts its decoder input with 0.
    inp = np.where(np.r_[True, dseg[1:] != dseg[:-1]], 0, np.r_[0, tgt[:-1]]).astype(np.int32)
    dec_in.append(inp)
    dec_tgt.append(tgt)
    dec_seg.append(dseg)
  return dict(encoder_input_tokens=np.stack(enc), decoder_input_tokens=np.stack(dec_in),
              decoder_target_tokens=np.stack(dec_tgt), encoder_segment_ids=np.stack(enc_seg),
              decoder_segment_ids=np.stack(dec_seg))


def test_t5_packed_logits_and_gradients_match_the_reference():
  inputs = _t5_packed_inputs(np.random.default_rng(0))
  _compare(t5.T5, T5_CFG, inputs, inputs["decoder_segment_ids"])


@pytest.mark.parametrize("prefix_lm", [True, False], ids=["prefix-lm", "causal"])
def test_decoder_packed_logits_and_gradients_match_the_reference(prefix_lm):
  rng = np.random.default_rng(1)
  rows = [_packed_row(rng, lens, 23) for lens in ([6, 10, 4], [17])]
  tok, seg, pos = (np.stack(x) for x in zip(*rows))
  inputs = dict(decoder_input_tokens=tok, decoder_segment_ids=seg, decoder_positions=pos)
  if prefix_lm:
    inputs["decoder_causal_attention"] = ((pos < 3) & (seg > 0)).astype(np.int32)
  _compare(decoder.Decoder, DEC_CFG, inputs, seg)


def test_cached_decoding_is_the_same_with_every_implementation():
  rng = np.random.default_rng(2)
  enc = rng.integers(2, 64, (3, 11)).astype(np.int32)
  enc[1, 7:] = 0
  prompts = rng.integers(2, 64, (3, 9)).astype(np.int32)
  lengths = np.array([9, 4, 6])
  prompts[np.arange(9)[None] >= lengths[:, None]] = 0
  cfg = decoding.DecodeConfig(max_decode_len=7)
  t5_params = jax.jit(t5.T5(T5_CFG).init)(jax.random.PRNGKey(3),
                                          **t5.dummy_batch(1, 4, 4))["params"]
  dec_params = jax.jit(decoder.Decoder(DEC_CFG).init)(jax.random.PRNGKey(4),
                                                      **decoder.dummy_batch(1, 4, 4))["params"]
  want_t5 = decoding.generate(t5.T5(T5_CFG), t5_params, enc, config=cfg, eos_id=-1)
  want_dec = decoding.generate(decoder.Decoder(DEC_CFG), dec_params, prompts, lengths,
                               config=cfg, eos_id=-1)
  for impl, block in IMPLS[:1]:
    got_t5 = decoding.generate(t5.T5(_with(T5_CFG, impl, block)), t5_params, enc, config=cfg,
                               eos_id=-1)
    np.testing.assert_array_equal(got_t5, want_t5)
    got_dec = decoding.generate(decoder.Decoder(_with(DEC_CFG, impl, block)), dec_params,
                                prompts, lengths, config=cfg, eos_id=-1)
    np.testing.assert_array_equal(got_dec, want_dec)


def _attention_temp_bytes(impl, length, heads=4, dim=32, block=512):
  """Compiled temporary memory of forward + backward of one T5-style self-attention."""
  seg = jnp.ones((1, length), jnp.int32)
  pos = jnp.arange(length)[None]

  def loss(q, k, v, table):
    spec = attention.Spec(seg, seg, pos, pos, rel_table=table, causal=True, kv_padding=True,
                          rel_bidirectional=False)
    return jnp.sum(attention.attend(q, k, v, spec, impl=impl, block=block) ** 2)

  x = jax.ShapeDtypeStruct((1, length, heads, dim), jnp.float32)
  table = jax.ShapeDtypeStruct((32, heads), jnp.float32)
  compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).lower(x, x, x, table).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_blockwise_temporary_memory_is_bounded_at_a_long_length():
  length, heads, block = 4096, 4, 512
  scores = length * length * heads * 4  # one [heads, q, k] float32 array: 256 MiB
  ref = _attention_temp_bytes("reference", length, heads)
  blk = _attention_temp_bytes("blockwise", length, heads, block=block)
  assert ref >= scores  # the reference holds at least the full scores
  # Blockwise: a few [heads, block, block] score blocks and O(length) rows, never [q, k].
  assert blk < scores / 4, (blk, ref)
  assert blk < ref / 10, (blk, ref)


def test_unknown_implementation_names_the_field():
  with pytest.raises(ValueError, match="attention_impl='flash2' is not one of"):
    t5.T5Config(attention_impl="flash2")
  with pytest.raises(ValueError, match="DecoderConfig.attention_block"):
    decoder.DecoderConfig(attention_block=0)


def test_dot_product_asks_for_cudnn_only_where_cudnn_flash_attention_runs(monkeypatch):
  """jax's own default is XLA everywhere; flanjax names cuDNN on an Ampere-or-newer NVIDIA GPU
  for bf16/fp16 queries of a supported head dim, never for a one-query decoding step."""

  class Dev:
    def __init__(self, cc):
      self.compute_capability = cc

  q = lambda dtype=jnp.bfloat16, lq=16, d=64: jnp.zeros((2, lq, 4, d), dtype)  # noqa: E731
  assert attention.sdpa_backend(q()) is None  # this CPU
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  for cc, want in (("9.0", "cudnn"), ("8.0", "cudnn"), ("7.5", None), ("gfx90a", None)):
    monkeypatch.setattr(jax, "devices", lambda cc=cc: [Dev(cc)])
    assert attention.sdpa_backend(q()) == want, cc
  monkeypatch.setattr(jax, "devices", lambda: [Dev("9.0")])
  assert attention.sdpa_backend(q(jnp.float16)) == "cudnn"
  assert attention.sdpa_backend(q(jnp.float32)) is None
  assert attention.sdpa_backend(q(lq=1)) is None  # a decoding step
  assert attention.sdpa_backend(q(d=256)) is None and attention.sdpa_backend(q(d=60)) is None
  # With a mask, jax's cuDNN path refuses odd lengths in training: XLA there instead.
  assert attention.sdpa_backend(q(lq=15)) is None
  assert attention.sdpa_backend(q(), q(lq=15)) is None
  assert attention.sdpa_backend(q(), q(lq=40)) == "cudnn"


class _Dev:
  compute_capability = "9.0"


def _calls_to_dot_product(monkeypatch, cfg, build, inputs, train=False):
  """How many attention calls of one forward pass take the dot_product path, on a faked
  Hopper GPU (the spy computes the reference, so the pass runs on this CPU). The choice is
  made while tracing, so the pass is only traced (jax.eval_shape), not run op by op."""
  params = jax.eval_shape(lambda: build(cfg).init(jax.random.PRNGKey(0), **inputs))["params"]
  calls = []

  def spy(q, k, v, spec, scale):
    calls.append(q.shape)
    return attention._reference(q, k, v, spec, scale, None)  # pylint: disable=protected-access

  with monkeypatch.context() as m:
    m.setattr(attention, "_dot_product", spy)
    m.setattr(jax, "default_backend", lambda: "gpu")
    m.setattr(jax, "devices", lambda *a: [_Dev()])
    rngs = {"dropout": jax.random.PRNGKey(1)} if train else None
    jax.eval_shape(lambda p: build(cfg).apply({"params": p}, **inputs, deterministic=not train,
                                              rngs=rngs), params)
  return len(calls)


def test_auto_runs_cudnn_only_for_the_decoder_attention_measured_on_a_gpu(monkeypatch):
  """attention_impl='auto' (the default) takes cuDNN's fused attention for a decoder's causal
  self-attention in bf16 on a GPU, as run at 48% MFU on an H200, and the reference for
  everything else: T5 (bias, cross-attention), float32, odd lengths, attention dropout."""
  assert decoder.DecoderConfig().attention_impl == "auto" == t5.T5Config().attention_impl
  dec = dataclasses.replace(DEC_CFG, attention_impl="auto", dtype="bfloat16", num_layers=2)
  rng = np.random.default_rng(5)
  rows = [_packed_row(rng, lens, 24) for lens in ([6, 10, 4], [17])]
  tok, seg, pos = (np.stack(x) for x in zip(*rows))
  batch = dict(decoder_input_tokens=tok, decoder_segment_ids=seg, decoder_positions=pos)
  prefix = dict(batch, decoder_causal_attention=((pos < 3) & (seg > 0)).astype(np.int32))
  assert _calls_to_dot_product(monkeypatch, dec, decoder.Decoder, batch) == 2  # a layer each
  assert _calls_to_dot_product(monkeypatch, dec, decoder.Decoder, prefix) == 2
  odd = {k: v[:, :23] for k, v in batch.items()}
  assert _calls_to_dot_product(monkeypatch, dec, decoder.Decoder, odd) == 0
  assert _calls_to_dot_product(monkeypatch, dataclasses.replace(dec, dtype="float32"),
                               decoder.Decoder, batch) == 0
  drop = dataclasses.replace(dec, dropout_rate=0.1)
  assert _calls_to_dot_product(monkeypatch, drop, decoder.Decoder, batch, train=True) == 0
  t5_auto = dataclasses.replace(T5_CFG, attention_impl="auto", dtype="bfloat16")
  assert _calls_to_dot_product(monkeypatch, t5_auto, t5.T5, t5.dummy_batch(2, 16, 8)) == 0
  # Off the (faked) GPU, 'auto' is the reference: same logits, bit for bit.
  params = jax.jit(decoder.Decoder(dec).init)(jax.random.PRNGKey(0), **batch)["params"]
  np.testing.assert_array_equal(
      jax.jit(decoder.Decoder(dec).apply)({"params": params}, **batch),
      jax.jit(decoder.Decoder(dataclasses.replace(dec, attention_impl="reference")).apply)(
          {"params": params}, **batch))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_softmax_values_matches_softmax_then_the_values_dot(dtype):
  """attention._softmax_values (normalised after the dot, FlashAttention's backward) against
  jax.nn.softmax then the einsum, values and both gradients, with masked keys and a row
  with none allowed (uniform, as the reference)."""
  rng = np.random.default_rng(0)
  scores = rng.standard_normal((2, 3, 7, 11)).astype(np.float32) * 4
  scores[:, :, :, 8:] = attention.NEG_INF  # masked keys
  scores[1, 2, 5, :] = attention.NEG_INF  # a padding query: nothing allowed
  scores = jnp.asarray(scores)
  v = jnp.asarray(rng.standard_normal((2, 3, 11, 5)), dtype)
  g = jnp.asarray(rng.standard_normal((2, 3, 7, 5)), jnp.float32)

  def plain(s, v):
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqt,bhtd->bhqd", p, v).astype(jnp.float32)

  def fused(s, v):
    return attention._softmax_values(s, v).astype(jnp.float32)  # pylint: disable=protected-access

  def keys_major(s, v):  # the same function of s, computed from its [b, h, t, q] transpose
    return attention._softmax_values_keys_major(  # pylint: disable=protected-access
        jnp.swapaxes(s, 2, 3), v).astype(jnp.float32)

  tol = dict(rtol=1e-5, atol=1e-6) if dtype == jnp.float32 else dict(rtol=2e-2, atol=2e-2)
  want, want_vjp = jax.vjp(plain, scores, v)
  for f in (fused, keys_major):
    got, got_vjp = jax.vjp(f, scores, v)
    np.testing.assert_allclose(got, want, **tol, err_msg=f.__name__)
    np.testing.assert_allclose(got[1, 2, 5], np.asarray(v[1, 2], np.float32).mean(0), **tol)
    for a, b in zip(got_vjp(g), want_vjp(g)):
      np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), **tol,
                                 err_msg=f.__name__)
    # Adding a constant to a row of scores changes nothing, so each row of their gradient
    # sums to 0; in bf16 too, as the probabilities the dot used are the ones differentiated.
    ds = np.asarray(got_vjp(g)[0], np.float64)
    assert np.abs(ds.sum(-1)).max() < 1e-4 * max(1.0, np.abs(ds).max()), f.__name__


@pytest.mark.parametrize("model", ["t5", "decoder causal", "decoder prefix-lm", "decoder bf16"])
def test_keys_major_scores_give_the_same_logits_and_gradients(monkeypatch, model):
  """The reference attention with its scores laid out [b, h, keys, queries] (the default,
  attention.KEYS_MAJOR) against [b, h, queries, keys], on packed rows in query blocks of
  8 (rows of 21 and 23: several blocks, causal ones reading keys up to their end), with
  T5's position bias and its padded cross-attention keys, and grouped-query heads."""
  monkeypatch.setattr(attention, "QUERY_BLOCK", 8)
  rng = np.random.default_rng(3)
  if model == "t5":
    build, cfg, inputs = t5.T5, T5_CFG, _t5_packed_inputs(rng)
    weights = inputs["decoder_segment_ids"]
  else:
    build, cfg = decoder.Decoder, DEC_CFG
    if model.endswith("bf16"):
      cfg = dataclasses.replace(cfg, dtype="bfloat16")
    rows = [_packed_row(rng, lens, 23) for lens in ([6, 10, 4], [17])]
    tok, seg, pos = (np.stack(x) for x in zip(*rows))
    inputs = dict(decoder_input_tokens=tok, decoder_segment_ids=seg, decoder_positions=pos)
    if model.endswith("prefix-lm"):
      inputs["decoder_causal_attention"] = ((pos < 3) & (seg > 0)).astype(np.int32)
    weights = seg
  m = build(cfg)
  params = jax.jit(m.init)(jax.random.PRNGKey(0), **inputs)["params"]

  def loss(p):
    logits = m.apply({"params": p}, **inputs).astype(jnp.float32)
    return jnp.sum(jnp.where(weights[..., None] > 0, jax.nn.log_softmax(logits), 0.0)), logits

  def run(keys_major):
    monkeypatch.setattr(attention, "KEYS_MAJOR", keys_major)
    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return np.asarray(logits)[weights > 0], jax.tree.leaves(grads)

  (got, got_g), (want, want_g) = run(True), run(False)
  tol = 1e-5 if cfg.dtype == "float32" else 3e-2
  np.testing.assert_allclose(got, want, atol=tol, rtol=tol)
  for g, w in zip(got_g, want_g):
    scale = max(1.0, float(np.abs(np.asarray(w, np.float32)).max()))
    np.testing.assert_allclose(np.asarray(g, np.float32) / scale,
                               np.asarray(w, np.float32) / scale, atol=tol)


def test_keys_major_scores_only_where_traces_take_xla_cpu_formulations(monkeypatch):
  """Keys-major scores are an XLA:CPU choice: a trace for another backend (dense.mode
  "xla", as when compiling for a TPU from a CPU host) keeps [b, h, queries, keys]."""
  from flanjax.models import dense  # pylint: disable=g-import-not-at-top
  calls = []
  keys_major = attention._softmax_values_keys_major  # pylint: disable=protected-access
  monkeypatch.setattr(attention, "_softmax_values_keys_major",
                      lambda *a: calls.append(1) or keys_major(*a))
  m = decoder.Decoder(DEC_CFG)
  batch = dict(decoder_input_tokens=np.ones((1, 5), np.int32))
  params = m.init(jax.random.PRNGKey(0), **batch)["params"]
  calls.clear()
  got = m.apply({"params": params}, **batch)
  assert len(calls) == DEC_CFG.num_layers
  with dense.mode("xla"):
    want = m.apply({"params": params}, **batch)
  assert len(calls) == DEC_CFG.num_layers
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)

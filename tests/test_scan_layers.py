"""Layers under nn.scan and remat policies (models/stack.py): the same logits, gradients,
decoded tokens, Hugging Face tensors and LoRA outputs as the unscanned layers, on the same
(converted) parameters."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import test_attention
import pytest

from flanjax import decoding
from flanjax.models import decoder, hf, kinds, lora, stack, t5
from flanjax.training import partitioning

T5_CFG = t5.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_heads=4,
                     num_encoder_layers=2, num_decoder_layers=3,
                     relative_attention_num_buckets=8, relative_attention_max_distance=16)
DEC_CFG = decoder.DecoderConfig(vocab_size=64, d_model=32, num_heads=4, num_kv_heads=2,
                                head_dim=8, d_ff=48, num_layers=3)


def _scanned(cfg, **kw):
  return dataclasses.replace(cfg, scan_layers=True, **kw)


_packed = test_attention._packed_row  # the same packed rows as the attention parity tests


def _t5_inputs():
  rng = np.random.default_rng(0)
  rows = [(_packed(rng, a, 13), _packed(rng, b, 9)) for a, b in (([5, 7], [4, 3]), ([11], [8]))]
  enc, enc_seg = (np.stack([r[0][i] for r in rows]) for i in (0, 1))
  tgt, dec_seg = (np.stack([r[1][i] for r in rows]) for i in (0, 1))
  # Each packed target starts its decoder input with 0.
  start = np.concatenate([np.ones((2, 1), bool), dec_seg[:, 1:] != dec_seg[:, :-1]], axis=1)
  dec_in = np.where(start, 0, np.roll(tgt, 1, axis=1)).astype(np.int32)
  return dict(encoder_input_tokens=enc, decoder_input_tokens=dec_in, decoder_target_tokens=tgt,
              encoder_segment_ids=enc_seg, decoder_segment_ids=dec_seg), dec_seg


def _dec_inputs():
  rng = np.random.default_rng(1)
  tok, seg, pos = (np.stack(x) for x in zip(*[_packed(rng, n, 17) for n in ([6, 8], [15])]))
  return dict(decoder_input_tokens=tok, decoder_segment_ids=seg, decoder_positions=pos,
              decoder_causal_attention=((pos < 3) & (seg > 0)).astype(np.int32)), seg


def _loss_and_grads(model, variables, inputs, weights):
  def loss(p):
    logits = model.apply(dict(variables, params=p), **inputs)
    return jnp.sum(jnp.where(weights[..., None] > 0, jax.nn.log_softmax(logits), 0.0)), logits
  # Jitted: one compile instead of op-by-op dispatch of every layer's ops (3x faster here).
  (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
  return np.asarray(logits)[weights > 0], grads


def _assert_trees_close(got, want, what):
  got, want = kinds.flat_params(got), kinds.flat_params(want)
  assert sorted(got) == sorted(want), what
  for name, w in want.items():
    scale = max(1.0, float(np.abs(w).max()))
    np.testing.assert_allclose(np.asarray(got[name]) / scale, np.asarray(w) / scale, atol=1e-5,
                               err_msg=f"{what}: {name}")


@pytest.mark.parametrize("kind", ["t5", "decoder"])
def test_scanned_logits_and_gradients_equal_the_unscanned_ones(kind):
  build, cfg, (inputs, weights) = ((t5.T5, T5_CFG, _t5_inputs()) if kind == "t5"
                                   else (decoder.Decoder, DEC_CFG, _dec_inputs()))
  params = jax.jit(build(cfg).init)(jax.random.PRNGKey(0), **inputs)["params"]
  want_logits, want_grads = _loss_and_grads(build(cfg), {"params": params}, inputs, weights)
  scanned = stack.scan_params(params)
  assert set(stack.unscan_params(scanned)) == set(params)
  # Scanned, and scanned under a remat policy: the same numbers on the converted params.
  for sc in (_scanned(cfg), _scanned(cfg, remat_policy="dots_with_no_batch_dims_saveable")):
    logits, grads = _loss_and_grads(build(sc), {"params": scanned}, inputs, weights)
    np.testing.assert_allclose(logits, want_logits, atol=1e-5, rtol=1e-5)
    _assert_trees_close(stack.unscan_params(grads), want_grads, sc.remat_policy)
  # A fresh scanned model stacks its layers on a leading axis the partitioner never shards.
  boxed = jax.eval_shape(lambda: build(_scanned(cfg)).init(jax.random.PRNGKey(0), **inputs))
  q = boxed["params"]["layers" if kind == "decoder" else "encoder_layers"]["attention"]["q"]
  assert q.names[0] == "layers" and q.value.shape[0] == 3 - (kind == "t5")
  spec = jax.sharding.PartitionSpec
  assert nn.logical_to_mesh_axes(q.names, partitioning.logical_rules()) == spec(
      None, "fsdp", "model", None)


@pytest.mark.parametrize("policy", ["full", "dots_saveable"])
def test_a_remat_policy_gives_the_same_gradients(policy):
  inputs, weights = _dec_inputs()
  params = jax.jit(decoder.Decoder(DEC_CFG).init)(jax.random.PRNGKey(2), **inputs)["params"]
  want = _loss_and_grads(decoder.Decoder(DEC_CFG), {"params": params}, inputs, weights)[1]
  cfg = dataclasses.replace(DEC_CFG, remat_policy=policy)
  got = _loss_and_grads(decoder.Decoder(cfg), {"params": params}, inputs, weights)[1]
  _assert_trees_close(got, want, policy)
  with pytest.raises(ValueError, match="remat_policy='most'"):
    dataclasses.replace(DEC_CFG, remat_policy="most")


def test_cached_greedy_and_beam_decoding_are_the_same_scanned():
  rng = np.random.default_rng(3)
  enc = rng.integers(2, 64, (3, 11)).astype(np.int32)
  enc[1, 7:] = 0
  prompts = rng.integers(2, 64, (3, 9)).astype(np.int32)
  lengths = np.array([9, 4, 6])
  prompts[np.arange(9)[None] >= lengths[:, None]] = 0
  for beams in (1, 2):
    cfg = decoding.DecodeConfig(max_decode_len=6, num_beams=beams)
    for build, mcfg, args in ((t5.T5, T5_CFG, (enc,)), (decoder.Decoder, DEC_CFG,
                                                        (prompts, lengths))):
      kind = "t5" if build is t5.T5 else "decoder"
      dummy = (t5.dummy_batch if build is t5.T5 else decoder.dummy_batch)(1, 4, 4)
      params = jax.jit(build(mcfg).init)(jax.random.PRNGKey(4), **dummy)["params"]
      want = decoding.generate(build(mcfg), params, *args, config=cfg, eos_id=-1)
      got = decoding.generate(build(_scanned(mcfg)), stack.scan_params(params), *args,
                              config=cfg, eos_id=-1)
      np.testing.assert_array_equal(got, want, err_msg=f"{kind}, {beams} beams")


@pytest.mark.parametrize("kind", ["t5", "decoder"])
def test_hugging_face_tensors_and_lora_are_the_same_scanned(kind):
  build, cfg, (inputs, weights) = ((t5.T5, T5_CFG, _t5_inputs()) if kind == "t5"
                                   else (decoder.Decoder, DEC_CFG, _dec_inputs()))
  params = nn.unbox(jax.jit(build(cfg).init)(jax.random.PRNGKey(5), **inputs)["params"])
  want = hf.params_to_hf(params, cfg)
  scanned = stack.layout(params, _scanned(cfg))
  got = hf.params_to_hf(scanned, _scanned(cfg))
  assert sorted(got) == sorted(want)
  for name, w in want.items():
    np.testing.assert_array_equal(got[name], w, err_msg=name)
  back = hf.params_from_hf(want, _scanned(cfg))
  _assert_trees_close(back, jax.tree.map(np.asarray, scanned), "from_hf")
  # LoRA: per-layer adapters with B non-zero, stacked like the params, change nothing else.
  sites = lora.select(cfg, None)
  adapters = lora.init(sites, 4, jax.random.PRNGKey(6))
  adapters = jax.tree.map(lambda x: x + 0.05 if x.ndim and not x.any() else x, adapters)
  want_logits = build(cfg).apply(lora.variables(params, adapters, 2.0), **inputs)
  # The run's adapters stay per layer; over a scanned base they are stacked for the step.
  got_logits = build(_scanned(cfg)).apply(lora.variables(scanned, adapters, 2.0), **inputs)
  np.testing.assert_allclose(got_logits, want_logits, atol=1e-5, rtol=1e-5)
  # Their logical axes read off a scanned model are the unscanned model's.
  def axes(c):
    flat = jax.tree_util.tree_flatten_with_path(kinds.abstract_params(c, unbox=False),
                                                is_leaf=lambda x: isinstance(x, nn.Partitioned))
    return {"/".join(k.key for k in path): leaf.names for path, leaf in flat[0]}
  assert lora.logical_axes(sites, axes(_scanned(cfg))) == lora.logical_axes(sites, axes(cfg))
  assert lora.fingerprint(scanned) == lora.fingerprint(params)
  merged = lora.merge(scanned, adapters, 2.0)
  _assert_trees_close(stack.unscan_params(merged), lora.merge(params, adapters, 2.0), "merge")

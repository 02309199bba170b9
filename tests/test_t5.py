"""T5 against transformers' PyTorch T5, packing, and the relative-position buckets."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flanjax.models import hf, t5
from flanjax.training.losses import cross_entropy

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

CONFIGS = {
    "v1.1 gated-gelu untied": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                                   num_heads=4, d_kv=8, relative_attention_num_buckets=32),
    "original relu tied": dict(feed_forward_proj="relu", tie_word_embeddings=True,
                               num_heads=4, d_kv=8, relative_attention_num_buckets=32),
    "uneven heads, 8 buckets": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                                    num_heads=3, d_kv=12, relative_attention_num_buckets=8,
                                    relative_attention_max_distance=20),
    # transformers' plain "gelu" is the exact (erf) GELU, "gelu_new" the tanh one.
    "plain gelu untied": dict(feed_forward_proj="gelu", tie_word_embeddings=False,
                              num_heads=4, d_kv=8, relative_attention_num_buckets=32),
    "plain gelu_new untied": dict(feed_forward_proj="gelu_new", tie_word_embeddings=False,
                                  num_heads=4, d_kv=8, relative_attention_num_buckets=32),
}


def test_feed_forward_names_go_back_as_transformers_reads_them():
  for theirs in ("gelu", "gelu_new", "gated-gelu", "relu", "gated-silu"):
    cfg = hf.t5_config_from_hf({"feed_forward_proj": theirs, "d_model": 32, "d_ff": 48,
                                "num_layers": 2, "num_heads": 4, "d_kv": 8, "vocab_size": 96})
    back = hf.config_to_hf(cfg)["feed_forward_proj"]
    assert back == theirs, (theirs, back)
  with pytest.raises(Exception, match="UMT5 keeps a relative-position table in every layer"):
    hf.model_family({"model_type": "umt5", "architectures": ["UMT5ForConditionalGeneration"]})


def _torch_t5(overrides, seed=0):
  torch.manual_seed(seed)
  tie = overrides["tie_word_embeddings"]
  cfg = transformers.T5Config(vocab_size=96, d_model=32, d_ff=48, num_layers=2,
                              num_decoder_layers=3, dropout_rate=0.0, **overrides)
  model = transformers.T5ForConditionalGeneration(cfg).eval()
  with torch.no_grad():
    for p in model.parameters():  # HF's init is tiny for some weights: widen it
      p.normal_(0.0, 0.5)
    if not tie:  # transformers 5 ties lm_head by default; v1.1 has its own
      model.lm_head.weight = torch.nn.Parameter(torch.randn(96, 32) * 0.3)
  return model


def _ours(model, overrides):
  sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  hf_cfg = model.config.to_dict()
  hf_cfg["tie_word_embeddings"] = overrides["tie_word_embeddings"]
  hf_cfg.pop("scale_decoder_outputs", None)
  cfg = hf.t5_config_from_hf(hf_cfg)
  return cfg, hf.t5_params_from_hf(sd, cfg)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_and_loss_match_transformers(name):
  overrides = CONFIGS[name]
  tmodel = _torch_t5(overrides)
  cfg, params = _ours(tmodel, overrides)
  rng = np.random.default_rng(0)
  enc = rng.integers(2, 96, size=(3, 23)).astype(np.int64)
  enc[1, 15:] = 0  # a padded row
  labels = rng.integers(2, 96, size=(3, 17)).astype(np.int64)
  labels[2, 9:] = 0
  dec_in = np.concatenate([np.zeros((3, 1), np.int64), labels[:, :-1]], axis=1)
  with torch.no_grad():
    out = tmodel(input_ids=torch.tensor(enc), attention_mask=torch.tensor(enc > 0),
                 decoder_input_ids=torch.tensor(dec_in),
                 labels=torch.tensor(np.where(labels > 0, labels, -100)))
  ours = t5.T5(cfg).apply({"params": params}, enc, dec_in, decoder_target_tokens=labels)
  ref = out.logits.numpy()
  mask = labels > 0  # padded decoder positions are not defined the same way
  np.testing.assert_allclose(np.asarray(ours)[mask], ref[mask], atol=1e-4, rtol=1e-4)
  loss, _ = cross_entropy(ours, labels, mask.astype(np.float32))
  assert abs(float(loss) - float(out.loss)) < 1e-4


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_hf_round_trip_is_identity(name):
  tmodel = _torch_t5(CONFIGS[name])
  cfg, params = _ours(tmodel, CONFIGS[name])
  back = hf.t5_params_from_hf(hf.t5_params_to_hf(params, cfg), cfg)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back)):
    np.testing.assert_array_equal(a, b)


def test_missing_and_misshapen_parameters_are_named():
  overrides = CONFIGS["v1.1 gated-gelu untied"]
  tmodel = _torch_t5(overrides)
  cfg, _ = _ours(tmodel, overrides)
  sd = {k: v.numpy() for k, v in tmodel.state_dict().items()}
  broken = dict(sd)
  del broken["decoder.block.1.layer.2.DenseReluDense.wo.weight"]
  with pytest.raises(ValueError, match="decoder.block.1.layer.2.DenseReluDense.wo.weight"):
    hf.t5_params_from_hf(broken, cfg, source="model.safetensors")
  broken = dict(sd)
  broken["encoder.block.0.layer.0.SelfAttention.q.weight"] = np.zeros((5, 5))
  with pytest.raises(ValueError, match=r"SelfAttention.q.weight has shape \(5, 5\)"):
    hf.t5_params_from_hf(broken, cfg)


def _hf_bucket(rel, bidirectional, num_buckets, max_distance):
  """The reference formula, one scalar at a time."""
  ret = 0
  n = rel
  if bidirectional:
    num_buckets //= 2
    ret += num_buckets if n > 0 else 0
    n = abs(n)
  else:
    n = -min(n, 0)
  max_exact = num_buckets // 2
  if n < max_exact:
    return ret + n
  large = max_exact + int(math.log(n / max_exact) / math.log(max_distance / max_exact)
                          * (num_buckets - max_exact))
  return ret + min(large, num_buckets - 1)


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("buckets, distance", [(32, 128), (8, 20)])
def test_relative_position_bucket_matches_reference(bidirectional, buckets, distance):
  rel = np.arange(-300, 301)
  got = np.asarray(t5.relative_position_bucket(jnp.asarray(rel), bidirectional, buckets,
                                               distance))
  want = [_hf_bucket(int(r), bidirectional, buckets, distance) for r in rel]
  np.testing.assert_array_equal(got, want)


def _tiny_model(seed):
  cfg = t5.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_heads=4,
                    num_encoder_layers=2, num_decoder_layers=2)
  model = t5.T5(cfg)
  params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(seed),
                                        **t5.dummy_batch(1, 8, 8))["params"])
  return cfg, model, params


def test_packed_row_gives_each_example_its_own_logits():
  cfg, model, params = _tiny_model(seed=1)
  rng = np.random.default_rng(3)
  examples = [(rng.integers(2, 64, n), rng.integers(2, 64, m)) for n, m in ((7, 4), (11, 6), (5, 3))]
  L_in, L_t = 30, 16
  row = {k: np.zeros((1, L), np.int32) for k, L in (
      ("encoder_input_tokens", L_in), ("encoder_segment_ids", L_in), ("encoder_positions", L_in),
      ("decoder_input_tokens", L_t), ("decoder_target_tokens", L_t),
      ("decoder_segment_ids", L_t), ("decoder_positions", L_t))}
  ei = di = 0
  for s, (inp, tgt) in enumerate(examples, start=1):
    row["encoder_input_tokens"][0, ei:ei + len(inp)] = inp
    row["encoder_segment_ids"][0, ei:ei + len(inp)] = s
    row["encoder_positions"][0, ei:ei + len(inp)] = np.arange(len(inp))
    row["decoder_target_tokens"][0, di:di + len(tgt)] = tgt
    row["decoder_input_tokens"][0, di:di + len(tgt)] = np.concatenate([[0], tgt[:-1]])
    row["decoder_segment_ids"][0, di:di + len(tgt)] = s
    row["decoder_positions"][0, di:di + len(tgt)] = np.arange(len(tgt))
    ei, di = ei + len(inp), di + len(tgt)
  # A compile per shape beats op-by-op dispatch (this test: 34 s -> 12 s).
  apply = jax.jit(model.apply)
  packed = np.asarray(apply({"params": params}, **row))
  di = 0
  for inp, tgt in examples:
    alone = apply({"params": params}, inp[None], np.concatenate([[0], tgt[:-1]])[None],
                  decoder_target_tokens=tgt[None])
    np.testing.assert_allclose(packed[0, di:di + len(tgt)], np.asarray(alone)[0], atol=1e-5)
    di += len(tgt)


def test_cached_decoding_matches_full_decoder_and_remat():
  import dataclasses
  from flanjax import decoding
  cfg, model, params = _tiny_model(seed=0)
  rng = np.random.default_rng(0)
  enc = rng.integers(2, 64, (3, 9))
  enc[1, 6:] = 0
  out = np.asarray(decoding.generate(model, params, enc, eos_id=1,
                                     config=decoding.DecodeConfig(max_decode_len=6)))
  # Brute force: rerun the whole decoder on the growing prefix, take the argmax (the full
  # forward pass compiled once per length: the same computation at a third of the op-by-op
  # time).
  full = jax.jit(model.apply)
  for r in range(3):
    prefix = [0]
    for i in range(6):
      logits = full({"params": params}, enc[r:r + 1], np.array([prefix]))
      nxt = int(np.argmax(logits[0, -1]))
      assert out[r, i] == nxt
      if nxt == 1:
        assert np.all(out[r, i + 1:] == 0)
        break
      prefix.append(nxt)
  # Rematerialised layers give the same gradients.
  dec = np.concatenate([np.zeros((3, 1), np.int64), rng.integers(2, 64, (3, 5))], 1)
  loss = lambda m: lambda p: m.apply({"params": p}, enc, dec).sum()
  g1 = jax.jit(jax.grad(loss(model)))(params)
  g2 = jax.jit(jax.grad(loss(t5.T5(dataclasses.replace(cfg, remat=True)))))(params)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("name", ["v1.1 gated-gelu untied", "original relu tied"])
def test_save_then_transformers_loads_same_logits(name, tmp_path):
  overrides = CONFIGS[name]
  tmodel = _torch_t5(overrides)
  cfg, params = _ours(tmodel, overrides)
  hf.save(cfg, params, str(tmp_path))
  cfg2, params2, _ = hf.load(str(tmp_path))
  assert cfg2 == cfg
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
    np.testing.assert_array_equal(a, b)
  loaded = transformers.T5ForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
  rng = np.random.default_rng(1)
  enc = rng.integers(2, 96, size=(2, 11))
  dec = np.concatenate([np.zeros((2, 1), np.int64), rng.integers(2, 96, size=(2, 6))], 1)
  with torch.no_grad():
    ref = loaded(input_ids=torch.tensor(enc), decoder_input_ids=torch.tensor(dec)).logits.numpy()
  ours = np.asarray(t5.T5(cfg).apply({"params": params}, enc, dec))
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)


def test_bad_model_directory_errors_name_the_file(tmp_path):
  with pytest.raises(ValueError, match="config.json not found"):
    hf.load(str(tmp_path))
  (tmp_path / "config.json").write_text('{"model_type": "bert", "architectures": ["BertModel"]}')
  with pytest.raises(ValueError, match="unsupported architecture BertModel"):
    hf.load(str(tmp_path))
  (tmp_path / "config.json").write_text('{"model_type": "t5", "vocab_size": 8, "d_model": 4, '
                                        '"d_kv": 2, "d_ff": 8, "num_heads": 2, "num_layers": 1}')
  with pytest.raises(ValueError, match="no model.safetensors"):
    hf.load(str(tmp_path))

"""The Llama-style decoder against transformers' LlamaForCausalLM; packing, prefix-LM
masks, KV-cached greedy decoding, Hugging Face import/export, the tokenizer.json
vocabulary and tools/convert_checkpoint.py."""

import dataclasses
import json
import os
import pickle
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from flanjax.errors import UserError
from flanjax import decoding
from flanjax.models import decoder, hf, kinds
from flanjax.training.losses import cross_entropy

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))
import convert_checkpoint  # noqa: E402  pylint: disable=g-import-not-at-top

V = 288  # vocabulary of the tiny models (a byte-level BPE needs 256 + specials)
CONFIGS = {
    "mha untied, linear rope": dict(
        num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False,
        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
    "gqa tied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "mqa untied, llama3 rope": dict(
        num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 16}),
    # Qwen2: biases on q, k and v (read, trained and written as Qwen2ForCausalLM).
    "qwen2 gqa tied": dict(family="Qwen2", num_attention_heads=4, num_key_value_heads=2,
                           tie_word_embeddings=True, use_sliding_window=False, eos_token_id=2,
                           rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
    # Qwen3: an RMSNorm on each head's q and k before RoPE, head_dim apart from the width.
    "qwen3 gqa untied": dict(family="Qwen3", num_attention_heads=4, num_key_value_heads=2,
                             head_dim=24, tie_word_embeddings=False, use_sliding_window=False,
                             eos_token_id=2,
                             rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
}


def _torch_llama(overrides, seed=0, family="Llama"):
  torch.manual_seed(seed)
  overrides = dict(overrides)
  family = overrides.pop("family", family)
  kw = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            head_dim=16, rms_norm_eps=1e-5, max_position_embeddings=128,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
  kw.update(overrides)
  config = getattr(transformers, f"{family}Config")(**kw)
  model = getattr(transformers, f"{family}ForCausalLM")(config).eval()
  with torch.no_grad():
    # HF's 0.02 init gives near-uniform logits; wider weights make parity mean something.
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      elif "embed_tokens" in name:
        p.normal_(0.0, 1.0)
      else:
        p.normal_(0.0, 0.15)
  return model


def _ours(model):
  sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  cfg = hf.llama_config_from_hf(model.config.to_dict())
  return cfg, hf.llama_params_from_hf(sd, cfg)


def _tiny(seed=0, **kw):
  args = dict(vocab_size=V, d_model=64, num_heads=4, num_kv_heads=2, head_dim=16, d_ff=96,
              num_layers=2)
  args.update(kw)
  cfg = decoder.DecoderConfig(**args)
  model = decoder.Decoder(cfg)
  params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(seed),
                                        **decoder.dummy_batch(1, 8))["params"])
  return cfg, model, params


# ---------------------------------------------------------------- parity with transformers

@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_and_prompt_masked_loss_match_transformers(name):
  tmodel = _torch_llama(CONFIGS[name])
  cfg, params = _ours(tmodel)
  assert cfg.num_kv_heads == CONFIGS[name]["num_key_value_heads"]
  rng = np.random.default_rng(0)
  seq = rng.integers(3, V, size=(3, 21)).astype(np.int64)
  real = np.ones_like(seq, bool)
  real[1, 14:] = False  # a right-padded row
  seq[~real] = 0
  labels = np.where(real, seq, -100)
  labels[:, :6] = -100  # the prompt carries no loss
  with torch.no_grad():
    out = tmodel(input_ids=torch.tensor(seq), attention_mask=torch.tensor(real.astype(np.int64)),
                 labels=torch.tensor(labels))
  ref = out.logits.numpy()[:, :-1]
  # seqio's view of the same rows: inputs predict the next token.
  ours = np.asarray(decoder.Decoder(cfg).apply(
      {"params": params}, **decoder.model_inputs(
          {"decoder_input_tokens": seq[:, :-1], "decoder_target_tokens": seq[:, 1:]})))
  mask = real[:, :-1]
  err = np.abs(ours[mask] - ref[mask]).max()
  assert err < 1e-4, err
  weights = (labels[:, 1:] != -100).astype(np.float32)
  loss, _ = cross_entropy(ours, seq[:, 1:], weights)
  assert abs(float(loss) - float(out.loss)) < 1e-4, (float(loss), float(out.loss))


@pytest.mark.parametrize("name", ["gqa tied", "mha untied, linear rope", "qwen2 gqa tied",
                                  "qwen3 gqa untied"])
def test_cached_greedy_equals_transformers_generate(name):
  tmodel = _torch_llama(CONFIGS[name], seed=1)
  cfg, params = _ours(tmodel)
  rng = np.random.default_rng(1)
  lengths = [5, 9, 7]
  prompts = np.zeros((3, 9), np.int32)
  for r, n in enumerate(lengths):
    prompts[r, :n] = rng.integers(3, V, n)
  eos = tmodel.generation_config.eos_token_id
  ours = np.asarray(decoding.generate(decoder.Decoder(cfg), params, prompts, np.array(lengths),
                                      decoding.DecodeConfig(max_decode_len=10), eos_id=eos))
  for r, n in enumerate(lengths):
    with torch.no_grad():
      gen = tmodel.generate(torch.tensor(prompts[r:r + 1, :n]).long(), do_sample=False,
                            max_new_tokens=10, pad_token_id=0,
                            attention_mask=torch.ones(1, n, dtype=torch.long))
    new = gen[0, n:].numpy()
    np.testing.assert_array_equal(ours[r, :len(new)], new)
    assert np.all(ours[r, len(new):] == 0)


# ---------------------------------------------------------------- packing and prefix-LM

def _pack(examples, length, prefix_lm):
  row = {k: np.zeros((1, length), np.int32) for k in (
      "decoder_input_tokens", "decoder_target_tokens", "decoder_segment_ids",
      "decoder_positions", "decoder_causal_attention", "decoder_loss_weights")}
  alone, start = [], 0
  for s, (inp, tgt) in enumerate(examples, start=1):
    tokens = np.concatenate([inp, tgt])
    n = len(tokens)
    feats = {"decoder_target_tokens": tokens,
             "decoder_input_tokens": np.concatenate([[0], tokens[:-1]]),
             "decoder_positions": np.arange(n),
             # seqio's PrefixLM: the inputs plus one position (the shifted-in BOS).
             "decoder_causal_attention": (np.arange(n) <= len(inp)).astype(np.int32),
             "decoder_loss_weights": (np.arange(n) >= len(inp)).astype(np.int32)}
    for k, v in feats.items():
      row[k][0, start:start + n] = v
    row["decoder_segment_ids"][0, start:start + n] = s
    alone.append(({k: v[None] for k, v in feats.items()}, start, n))
    start += n
  if not prefix_lm:
    del row["decoder_causal_attention"]
  return row, alone


@pytest.mark.parametrize("prefix_lm", [False, True], ids=["decoder", "prefix_lm"])
def test_packed_row_gives_each_example_its_own_logits(prefix_lm):
  cfg, model, params = _tiny(seed=1)
  rng = np.random.default_rng(3)
  examples = [(rng.integers(3, V, a), rng.integers(3, V, b)) for a, b in ((6, 4), (3, 7), (5, 2))]
  row, alone = _pack(examples, 40, prefix_lm)
  apply = jax.jit(model.apply)  # compiled: op by op, the tiny model's dispatch is the time
  packed = np.asarray(apply({"params": params}, **decoder.model_inputs(row)))
  # Loss over the packed row equals the summed per-example losses.
  _, aux = cross_entropy(packed, row["decoder_target_tokens"], row["decoder_loss_weights"])
  total = 0.0
  for feats, start, n in alone:
    if not prefix_lm:
      del feats["decoder_causal_attention"]
    ref = np.asarray(apply({"params": params}, **decoder.model_inputs(feats)))
    np.testing.assert_allclose(packed[0, start:start + n], ref[0], atol=1e-5)
    total += float(cross_entropy(ref, feats["decoder_target_tokens"],
                                 feats["decoder_loss_weights"])[1]["loss_sum"])
  assert abs(float(aux["loss_sum"]) - total) < 1e-3


def test_prefix_attends_both_ways_and_targets_stay_causal():
  _, model, params = _tiny(seed=2)
  rng = np.random.default_rng(4)
  tokens = rng.integers(3, V, (1, 12))
  causal = (np.arange(12) < 5).astype(np.int32)[None]
  run = lambda t, c: np.asarray(model.apply({"params": params}, t, decoder_causal_attention=c))
  base = run(tokens, causal)
  changed_prefix = tokens.copy()
  changed_prefix[0, 4] = (tokens[0, 4] + 1) % V
  changed_target = tokens.copy()
  changed_target[0, 8] = (tokens[0, 8] + 1) % V
  # Position 0 sees the last prefix token with the prefix mask, not without it.
  assert np.abs(run(changed_prefix, causal)[0, 0] - base[0, 0]).max() > 1e-3
  np.testing.assert_array_equal(run(changed_prefix, None)[0, :4], run(tokens, None)[0, :4])
  # Nothing before position 8 sees the token at 8.
  np.testing.assert_array_equal(run(changed_target, causal)[0, :8], base[0, :8])


# ---------------------------------------------------------------- KV cache

@pytest.mark.parametrize("bidirectional", [False, True], ids=["causal", "prefix"])
def test_cached_greedy_equals_brute_force(bidirectional):
  cfg, model, params = _tiny(seed=0)
  rng = np.random.default_rng(0)
  lengths = np.array([4, 7, 2])
  prompts = np.zeros((3, 7), np.int32)
  for r, n in enumerate(lengths):
    prompts[r, :n] = rng.integers(3, V, n)
  kw = dict(config=decoding.DecodeConfig(max_decode_len=7),
            kind=kinds.PREFIX_LM if bidirectional else kinds.DECODER)
  first = np.asarray(decoding.generate(model, params, prompts, lengths, eos_id=-1, **kw))
  eos = int(first[0, 3])  # some row stops early
  out = np.asarray(decoding.generate(model, params, prompts, lengths, eos_id=eos, **kw))
  # The reference: the full forward pass over the whole sequence, no cache. Compiled once per
  # length, it is the same computation at a third of the op-by-op time.
  full = jax.jit(model.apply)
  for r, n in enumerate(lengths):
    seq = list(prompts[r, :n])
    for i in range(7):
      causal = (np.arange(len(seq)) < n).astype(np.int32)[None] if bidirectional else None
      logits = full({"params": params}, np.array([seq]), decoder_causal_attention=causal)
      nxt = int(np.argmax(logits[0, -1]))
      assert out[r, i] == nxt, (r, i)
      if nxt == eos:
        assert np.all(out[r, i + 1:] == 0)
        break
      seq.append(nxt)


@pytest.mark.parametrize("scaling", ["none", "linear", "llama3"])
def test_rope_lookup_equals_computed_and_marks_out_of_range(scaling):
  cfg = decoder.DecoderConfig(head_dim=16, rope_scaling=scaling, rope_factor=4.0,
                              rope_original_max_position=64)
  pos = np.random.default_rng(0).integers(0, 300, (3, 300)).astype(np.int32)
  computed = decoder.rope_tables(cfg, pos)
  looked_up = decoder.rope_tables(cfg, pos, bound=300)
  for a, b in zip(computed, looked_up):
    assert a.shape == b.shape == (3, 300, 1, 16)
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=2e-7)
  cos, sin = decoder.rope_tables(cfg, np.array([[0, 7, 8]], np.int32), bound=8)
  assert np.isfinite(np.asarray(cos)[0, :2]).all() and np.isnan(np.asarray(cos)[0, 2]).all()
  assert np.isnan(np.asarray(sin)[0, 2]).all()


def test_training_step_computes_no_rope_trigonometry_and_matches_the_computed_path(
    monkeypatch):
  cfg, model, params = _tiny(seed=2)
  rng = np.random.default_rng(4)
  row, _ = _pack([(rng.integers(3, V, a), rng.integers(3, V, b)) for a, b in ((9, 5), (4, 8))],
                 32, False)
  feats = decoder.model_inputs(row)
  ct = rng.standard_normal((1, 32, V)).astype(np.float32)

  def loss(p):
    return (model.apply({"params": p}, **feats) * ct).sum()

  def run():
    grad = jax.jit(jax.value_and_grad(loss))
    return grad.lower(params).compile().as_text(), grad(params)

  hlo, (value, grads) = run()
  monkeypatch.setattr(decoder, "ROPE_LOOKUP", False)
  hlo_computed, (value_c, grads_c) = run()
  # Computed in the step, XLA fuses cos / sin into each consumer; looked up, none is left.
  assert hlo.count("cosine(") == 0 and hlo.count(" sine(") == 0
  assert hlo_computed.count("cosine(") > 0
  np.testing.assert_allclose(float(value), float(value_c), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_c)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_remat_gives_the_same_gradients_and_bf16_runs():
  cfg, model, params = _tiny(seed=3)
  tokens = np.random.default_rng(5).integers(3, V, (2, 9))
  loss = lambda m: lambda p: m.apply({"params": p}, tokens).sum()
  g1 = jax.jit(jax.grad(loss(model)))(params)  # compiled, as training runs remat
  g2 = jax.jit(jax.grad(loss(decoder.Decoder(dataclasses.replace(cfg, remat=True)))))(params)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, atol=1e-4)
  full = np.asarray(model.apply({"params": params}, tokens))
  half = np.asarray(decoder.Decoder(dataclasses.replace(cfg, dtype="bfloat16")).apply(
      {"params": params}, tokens))
  assert np.isfinite(half).all() and np.abs(half - full).max() < 0.25 * np.abs(full).max()


@pytest.mark.parametrize("extra", [{}, {"qkv_bias": True}, {"qk_norm": True}])
def test_parameters_carry_logical_axis_names(extra):
  cfg = decoder.DecoderConfig(vocab_size=V, d_model=32, num_heads=4, num_kv_heads=2,
                              head_dim=8, d_ff=48, num_layers=1, **extra)
  boxed = jax.jit(decoder.Decoder(cfg).init)(jax.random.PRNGKey(0),
                                             **decoder.dummy_batch(1, 4, 4))
  specs = nn.get_partition_spec(boxed["params"])
  assert tuple(specs["token_embedding"]) == ("vocab", "embed")
  assert tuple(specs["layer_0"]["attention"]["q"]) == ("embed", "heads", "kv")
  assert tuple(specs["layer_0"]["attention"]["k"]) == ("embed", "kv_heads", "kv")
  assert tuple(specs["layer_0"]["mlp"]["wo"]) == ("mlp", "embed")
  attn = specs["layer_0"]["attention"]
  if extra.get("qkv_bias"):
    assert (tuple(attn["q_bias"]), tuple(attn["k_bias"])) == (("heads", "kv"), ("kv_heads", "kv"))
  if extra.get("qk_norm"):  # per head_dim: never sharded as the model width would be
    assert tuple(attn["q_norm"]["scale"]) == tuple(attn["k_norm"]["scale"]) == ("kv",)
  assert all(s is not None and len(s) > 0 for s in jax.tree.leaves(
      specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)))
  assert cfg.num_params() == sum(np.size(x) for x in jax.tree.leaves(nn.unbox(boxed)))


# ---------------------------------------------------------------- tokenizer.json vocabulary

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Answer: 42 apples, then 17 more!",
         "Instructions: add the numbers.\nOutput: 59", "café naïve — unseen ünïcödé ✓"]


def _write_tokenizer(path):
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=V - 8, special_tokens=["<pad>", "</s>", "<unk>", "<s>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(TEXTS * 5, trainer)
  os.makedirs(path, exist_ok=True)
  tok.save(os.path.join(path, "tokenizer.json"))
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "</s>",
               "bos_token": "<s>", "pad_token": "<pad>", "unk_token": "<unk>"}, f)
  return tok


def test_tokenizer_json_vocabulary_round_trips_text(tmp_path):
  import seqio
  import tensorflow as tf
  from flanjax.data import hf_vocab
  _write_tokenizer(str(tmp_path))
  vocab = hf_vocab.HFTokenizerVocabulary.from_directory(str(tmp_path))
  assert (vocab.pad_id, vocab.eos_id, vocab.unk_id, vocab.bos_id) == (0, 1, 2, 3)
  assert vocab.vocab_size <= V
  for text in TEXTS:
    ids = list(vocab.encode(text))
    assert ids and vocab.eos_id not in ids  # seqio appends EOS itself
    assert vocab.decode(ids) == text
    assert vocab.decode(ids + [vocab.eos_id] + ids) == text  # stops at EOS
    tf_ids = vocab.encode_tf(tf.constant(text))
    assert tf_ids.dtype == tf.int32 and list(tf_ids.numpy()) == ids
    assert vocab.decode_tf(tf.constant(ids + [1, 0, 0])).numpy().decode() == text
  batch = vocab.decode_tf(tf.constant([vocab.encode(TEXTS[0])[:3] + [1], [5, 6, 1, 0]]))
  assert batch.shape == (2,)
  # As a seqio feature: seqio's tokenize preprocessor gives the same ids.
  ds = tf.data.Dataset.from_tensor_slices({"targets": TEXTS})
  ds = seqio.preprocessors.tokenize(ds, {"targets": seqio.Feature(vocab)})
  assert [list(x["targets"]) for x in ds.as_numpy_iterator()] == [vocab.encode(t) for t in TEXTS]
  again = pickle.loads(pickle.dumps(vocab))
  assert again == vocab and again.fingerprint == vocab.fingerprint
  # transformers reads the saved tokenizer files the same way.
  out = tmp_path / "saved"
  vocab.save_tokenizer(str(out))
  fast = transformers.AutoTokenizer.from_pretrained(str(out))
  assert fast.encode(TEXTS[1], add_special_tokens=False) == vocab.encode(TEXTS[1])


# ---------------------------------------------------------------- export and import

@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_save_then_load_and_transformers_agree(name, tmp_path):
  from flanjax.data import hf_vocab
  tmodel = _torch_llama(CONFIGS[name], seed=2)
  cfg, params = _ours(tmodel)
  tok_dir = str(tmp_path / "tok")
  _write_tokenizer(tok_dir)
  vocab = hf_vocab.HFTokenizerVocabulary.from_directory(tok_dir)
  out = str(tmp_path / "out")
  hf.save(cfg, params, out, vocabulary=vocab)
  from safetensors.numpy import load_file
  assert ("lm_head.weight" in load_file(os.path.join(out, "model.safetensors"))) == (
      not cfg.tie_word_embeddings)
  cfg2, params2, vocab2 = hf.load(out)
  assert cfg2 == cfg and vocab2 == vocab
  assert jax.tree.structure(params) == jax.tree.structure(params2)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
    np.testing.assert_array_equal(a, b)
  with open(os.path.join(out, "config.json")) as f:
    written = json.load(f)
  assert (written["eos_token_id"], written["pad_token_id"]) == (1, 0)
  loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  assert type(loaded) is type(tmodel)  # a Qwen2 stays a Qwen2 (its biases), a Llama a Llama
  tokens = np.random.default_rng(1).integers(3, V, size=(2, 13))
  with torch.no_grad():
    ref = loaded(input_ids=torch.tensor(tokens)).logits.numpy()
  ours = np.asarray(decoder.Decoder(cfg).apply({"params": params}, tokens))
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)


def test_mistral_loads_runs_as_transformers_exports_as_mistral_and_refuses_past_its_window(
    tmp_path):
  """Mistral is Llama's weights with a sliding window: within the window the two are one
  model; rows longer than it are refused in one line, not run with full attention."""
  from flanjax.data import hf_vocab
  tmodel = _torch_llama(dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=16,
                             tie_word_embeddings=False), seed=5, family="Mistral")
  src = tmp_path / "mistral"
  tmodel.save_pretrained(str(src))
  _write_tokenizer(str(src))
  cfg, params, _ = hf.load(str(src))
  assert cfg.sliding_window == 16 and cfg.num_kv_heads == 2
  tokens = np.random.default_rng(5).integers(3, V, size=(2, 16))
  with torch.no_grad():
    ref = tmodel(input_ids=torch.tensor(tokens)).logits.numpy()
  model = decoder.Decoder(cfg)
  np.testing.assert_allclose(np.asarray(model.apply({"params": params}, tokens)), ref,
                             atol=1e-4, rtol=1e-4)
  # Past the window transformers attends to the last 16 positions only: refused here.
  longer = np.random.default_rng(6).integers(3, V, size=(1, 20))
  with torch.no_grad():
    windowed = tmodel(input_ids=torch.tensor(longer)).logits.numpy()
  assert np.abs(windowed[0, -1] - ref[0, -1]).max() > 1e-3  # the window matters there
  msg = _one_line_error(lambda: model.apply({"params": params}, longer), "20 tokens",
                        "sliding window (16")
  assert "task_feature_lengths" in msg
  _one_line_error(lambda: model.init_decode_state(1, 24), "24 tokens")
  # Exported, it is a Mistral again, and transformers runs it as the original.
  out = tmp_path / "out"
  hf.save(cfg, params, str(out), vocabulary=hf_vocab.HFTokenizerVocabulary.from_directory(
      str(src)))
  written = json.loads((out / "config.json").read_text())
  assert written["model_type"] == "mistral" and written["sliding_window"] == 16
  loaded = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
  assert type(loaded).__name__ == "MistralForCausalLM"
  with torch.no_grad():
    np.testing.assert_allclose(loaded(input_ids=torch.tensor(longer)).logits.numpy(), windowed,
                               atol=1e-4, rtol=1e-4)
  # A written Llama config is still a Llama.
  assert hf.llama_config_to_hf(dataclasses.replace(cfg, sliding_window=None))[
      "model_type"] == "llama"


def test_qwen2_windows_are_read_per_layer_and_a_window_in_some_layers_only_is_refused():
  base = transformers.Qwen2Config(vocab_size=V, hidden_size=64, intermediate_size=96,
                                  num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, sliding_window=16).to_dict()
  assert base["use_sliding_window"] is False
  cfg = hf.llama_config_from_hf(base)
  assert cfg.qkv_bias and cfg.sliding_window is None  # off unless use_sliding_window
  def read(**kw):
    hf_cfg = {k: v for k, v in base.items() if k != "layer_types"}
    hf_cfg.update(sliding_window=16, **kw)  # transformers' own rule for the layers' types when none are listed
    return hf.llama_config_from_hf(hf_cfg)
  assert read(use_sliding_window=True, max_window_layers=0).sliding_window == 16
  assert read(use_sliding_window=True, max_window_layers=2).sliding_window is None
  _one_line_error(lambda: read(use_sliding_window=True, max_window_layers=1),
                  "sliding window in some layers only")
  _one_line_error(lambda: read(layer_types=["full_attention", "sliding_attention"],
                               use_sliding_window=True), "some layers only")
  # Written back, a windowed Qwen2 windows every layer, as transformers reads it.
  written = hf.llama_config_to_hf(dataclasses.replace(cfg, sliding_window=16))
  assert transformers.Qwen2Config(**{k: v for k, v in written.items() if k != "model_type"}
                                  ).layer_types == ["sliding_attention"] * 2
  assert hf.llama_config_from_hf(written) == dataclasses.replace(cfg, sliding_window=16)
  # Llama's attention_bias (o_proj too) is not Qwen2's and stays refused.
  _one_line_error(lambda: hf.llama_config_from_hf(
      {**hf.llama_config_to_hf(dataclasses.replace(cfg, qkv_bias=False)),
       "attention_bias": True}), "attention_bias=true is not supported")


def _saved_llama(path, name="gqa tied"):
  tmodel = _torch_llama(CONFIGS[name], seed=4)
  tmodel.save_pretrained(str(path))
  return tmodel


def _one_line_error(fn, *match):
  with pytest.raises(UserError) as err:
    fn()
  msg = str(err.value)
  assert "\n" not in msg, msg
  for m in match:
    assert m in msg, msg
  return msg


def test_bad_directories_give_one_line_errors_naming_file_and_parameter(tmp_path):
  from safetensors.numpy import load_file, save_file
  good = tmp_path / "good"
  _saved_llama(good, "mha untied, linear rope")
  weights = load_file(str(good / "model.safetensors"))
  cfg_text = (good / "config.json").read_text()

  def variant(name, tensors=None, config=None):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(config if config is not None else cfg_text)
    if tensors is not None:
      save_file(tensors, str(d / "model.safetensors"))
    return str(d)

  # Unknown architecture: names config.json and the architecture.
  d = variant("gpt2", config='{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}')
  _one_line_error(lambda: hf.load(d), os.path.join(d, "config.json"),
                  "unsupported architecture GPT2LMHeadModel")
  # No weights file at all, and an index that lists a missing shard.
  d = variant("empty")
  _one_line_error(lambda: hf.load(d), d, "no model.safetensors")
  d = variant("sharded")
  with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
    json.dump({"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}}, f)
  _one_line_error(lambda: hf.load(d), "model-00001-of-00002.safetensors",
                  "model.safetensors.index.json")
  # A missing parameter, and one of the wrong shape.
  broken = {k: v for k, v in weights.items() if k != "model.layers.1.mlp.up_proj.weight"}
  d = variant("missing", broken)
  _one_line_error(lambda: hf.load(d), "model.safetensors", "model.layers.1.mlp.up_proj.weight")
  broken = dict(weights)
  broken["model.layers.0.self_attn.k_proj.weight"] = np.zeros((32, 64), np.float32)
  d = variant("shape", broken)
  _one_line_error(lambda: hf.load(d), os.path.join(d, "model.safetensors"),
                  "model.layers.0.self_attn.k_proj.weight has shape (32, 64)", "(64, 64)")
  # Untied in config.json, but no lm_head.
  broken = {k: v for k, v in weights.items() if k != "lm_head.weight"}
  d = variant("no_head", broken)
  _one_line_error(lambda: hf.load(d), "model.safetensors", "lm_head.weight")
  # Unsupported Llama variants.
  cfg = json.loads(cfg_text)
  d = variant("bias", weights, json.dumps(dict(cfg, attention_bias=True)))
  _one_line_error(lambda: hf.load(d), "config.json", "attention_bias")
  d = variant("yarn", weights, json.dumps(dict(cfg, rope_parameters={
      "rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0})))
  _one_line_error(lambda: hf.load(d), "config.json", "yarn")


# ---------------------------------------------------------------- convert_checkpoint

def _tensors(path):
  from safetensors.numpy import load_file
  return load_file(os.path.join(path, "model.safetensors"))


def _assert_same_dirs(src, dst, files=()):
  a, b = _tensors(src), _tensors(dst)
  assert set(b) <= set(a)
  for k in b:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  with open(os.path.join(src, "config.json")) as f, open(os.path.join(dst, "config.json")) as g:
    assert json.load(f) == json.load(g)
  for name in files:
    with open(os.path.join(src, name), "rb") as f, open(os.path.join(dst, name), "rb") as g:
      assert f.read() == g.read(), name
  cfg1, p1, _ = hf.load(src)
  cfg2, p2, _ = hf.load(dst)
  assert cfg1 == cfg2
  for x, y in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
    np.testing.assert_array_equal(x, y)


def test_convert_checkpoint_round_trip_llama(tmp_path):
  src = tmp_path / "hf"
  tmodel = _saved_llama(src)
  _write_tokenizer(str(src))
  assert convert_checkpoint.main(["hf-to-orbax", str(src), str(tmp_path / "orbax")]) == 0
  assert convert_checkpoint.main(["orbax-to-hf", str(tmp_path / "orbax"),
                                  str(tmp_path / "back")]) == 0
  _assert_same_dirs(str(src), str(tmp_path / "back"),
                    files=("tokenizer.json", "tokenizer_config.json", "generation_config.json"))
  loaded = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "back")).eval()
  tokens = torch.tensor(np.random.default_rng(2).integers(3, V, size=(1, 9)))
  with torch.no_grad():
    np.testing.assert_array_equal(loaded(tokens).logits.numpy(), tmodel(tokens).logits.numpy())
  # A second conversion into the same folder is refused without --overwrite.
  _one_line_error(lambda: convert_checkpoint.main(
      ["hf-to-orbax", str(src), str(tmp_path / "orbax")]), "--overwrite")


def test_convert_checkpoint_round_trip_t5(tmp_path):
  torch.manual_seed(0)
  cfg = transformers.T5Config(vocab_size=96, d_model=32, d_ff=48, num_layers=2,
                              num_decoder_layers=2, num_heads=4, d_kv=8,
                              feed_forward_proj="gated-gelu", tie_word_embeddings=False)
  model = transformers.T5ForConditionalGeneration(cfg).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.normal_(0.0, 0.5)
  src = tmp_path / "hf"
  model.save_pretrained(str(src))
  convert_checkpoint.main(["hf-to-orbax", str(src), str(tmp_path / "orbax")])
  convert_checkpoint.main(["orbax-to-hf", str(tmp_path / "orbax"), str(tmp_path / "back")])
  _assert_same_dirs(str(src), str(tmp_path / "back"))


def test_convert_training_run_with_gin_config(tmp_path, builtin_vocab, capsys):
  from flanjax.training.checkpoints import Checkpointer
  import gin
  gin_file = os.path.join(REPO, "gin_configs", "models", "llama_tiny.gin")
  gin.parse_config_file(gin_file)
  cfg = dataclasses.replace(decoder.DecoderConfig(), vocab_size=256)
  gin.clear_config()
  model = decoder.Decoder(cfg)
  params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0),
                                        **decoder.dummy_batch(1, 4))["params"])
  state = {"params": params, "opt_state": {"mu": jax.tree.map(np.zeros_like, params)},
           "step": np.int32(7), "rng": jax.random.PRNGKey(1)}
  ckpt = Checkpointer(str(tmp_path / "run"), async_save=False)
  ckpt.save(7, state, data_position=3, force=True)
  ckpt.close()
  # The run's SentencePiece vocabulary, as train keeps it: config.json gets its token ids
  # (generate() stops at its EOS) and a note says how to tokenize.
  os.makedirs(tmp_path / "run" / "vocab")
  with open(builtin_vocab.sentencepiece_model_file, "rb") as f:
    (tmp_path / "run" / "vocab" / "spiece.model").write_bytes(f.read())
  out = str(tmp_path / "hf")
  capsys.readouterr()
  convert_checkpoint.main(["orbax-to-hf", str(tmp_path / "run"), out, "--config", gin_file])
  assert "transformers' AutoTokenizer reads for T5 only" in capsys.readouterr().err
  written = json.loads((tmp_path / "hf" / "config.json").read_text())
  assert (written["eos_token_id"], written["pad_token_id"]) == (builtin_vocab.eos_id, 0)
  assert transformers.AutoModelForCausalLM.from_pretrained(out).generation_config.eos_token_id \
      == builtin_vocab.eos_id
  cfg2, params2, _ = hf.load(out)
  assert cfg2 == cfg
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
    np.testing.assert_array_equal(a, b)
  # run_info.json (as train writes it) also names the model; a wrong config is refused.
  with open(tmp_path / "run" / "run_info.json", "w") as f:
    json.dump({"model": {k: v for k, v in dataclasses.asdict(cfg).items()
                         if k not in ("dtype", "remat", "dropout_rate")}}, f)
  convert_checkpoint.main(["orbax-to-hf", str(tmp_path / "run"), str(tmp_path / "hf2")])
  assert hf.load(str(tmp_path / "hf2"))[0] == cfg
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps({"type": "decoder", "config": dict(
      dataclasses.asdict(cfg), num_layers=3)}))
  _one_line_error(lambda: convert_checkpoint.main(
      ["orbax-to-hf", str(tmp_path / "run"), str(tmp_path / "hf3"), "--config", str(bad)]),
      "layer_2", "missing")


def test_convert_checkpoint_cli_errors_are_one_line_exit_2(tmp_path, capsys):
  # The tool's guarded entry, what `python tools/convert_checkpoint.py` runs, in this process
  # (test_train_e2e starts the tool as a process of its own).
  from flanjax.config import run_plain_main
  with pytest.raises(SystemExit) as exit_:
    run_plain_main(convert_checkpoint.main, "convert_checkpoint",
                   ["hf-to-orbax", str(tmp_path / "nope"), str(tmp_path / "out")])
  assert exit_.value.code == 2
  err = capsys.readouterr().err
  lines = [ln for ln in err.splitlines() if ln.startswith("convert_checkpoint")]
  assert len(lines) == 1 and "is not a directory" in lines[0], err

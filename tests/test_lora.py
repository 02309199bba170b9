"""LoRA against PEFT: logits of both model kinds (PeftModel over transformers' model, the same
adapter weights, B non-zero), PEFT's own adapters imported, the merged model equal to
merge_and_unload(), and the one-line errors."""

import os
import sys

import numpy as np
import pytest

from flanjax.errors import UserError
from flanjax.models import hf, kinds, lora

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))
import convert_checkpoint  # noqa: E402  pylint: disable=g-import-not-at-top

V = 96
T5_TARGETS = ["q", "k", "v", "o", "wi_0", "wi_1", "wo"]
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _randomize(model, std=0.3):
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
      else:
        p.normal_(0.0, std)
  return model


def tiny_t5(vocab_size=V, seed=0):
  torch.manual_seed(seed)
  cfg = transformers.T5Config(vocab_size=vocab_size, d_model=32, d_ff=48, num_layers=2,
                              num_decoder_layers=2, num_heads=4, d_kv=8,
                              feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                              decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
  return _randomize(transformers.T5ForConditionalGeneration(cfg).eval())


def tiny_llama():
  torch.manual_seed(1)
  cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, max_position_embeddings=64,
                                 tie_word_embeddings=False)
  return _randomize(transformers.LlamaForCausalLM(cfg).eval(), std=0.2)


def _random_b(model, seed):
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "lora_B" in name:
        p.normal_(0.0, 0.2)  # B non-zero, so the adapters change the logits
  return model


def _peft_wrap(tmodel, targets, rank=4, alpha=8.0, task_type="SEQ_2_SEQ_LM"):
  config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0,
                           task_type=task_type)
  return _random_b(peft.get_peft_model(tmodel, config).eval(), 7)


def _save_base(tmodel, path):
  tmodel.save_pretrained(str(path))
  return hf.load(str(path))[:2]


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  return rng.integers(2, V, size=(2, 9)), rng.integers(2, V, size=(2, 6))


def _t5_logits_peft(model, enc, dec):
  with torch.no_grad():
    return model(input_ids=torch.tensor(enc), decoder_input_ids=torch.tensor(dec)).logits.numpy()


def _llama_logits_peft(model, tok):
  with torch.no_grad():
    return model(input_ids=torch.tensor(tok)).logits.numpy()


def _ours(cfg, variables, *args):
  return np.asarray(kinds.for_config(cfg).build(cfg).apply(variables, *args))


@pytest.fixture(scope="module")
def t5_case(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("lora_t5")
  base_t = tiny_t5()
  cfg, base = _save_base(base_t, tmp / "base")
  model = _peft_wrap(base_t, T5_TARGETS)
  model.save_pretrained(str(tmp / "adapter"))
  return cfg, base, model, tmp


@pytest.fixture(scope="module")
def llama_case(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("lora_llama")
  base_t = tiny_llama()
  cfg, base = _save_base(base_t, tmp / "base")
  model = _peft_wrap(base_t, LLAMA_TARGETS, rank=8, alpha=4.0, task_type="CAUSAL_LM")
  model.save_pretrained(str(tmp / "adapter"))
  return cfg, base, model, tmp


def _state_dict_adapters(model, cfg):
  state = peft.get_peft_model_state_dict(model)
  return lora.from_peft({k: v.numpy() for k, v in state.items()}, cfg, "peft state")


def test_t5_lora_logits_equal_peft(t5_case):
  cfg, base, model, _ = t5_case
  adapters, chosen, rank = _state_dict_adapters(model, cfg)
  # Every projection of both stacks and cross-attention: 2 x 7 + 2 x (4 + 4 + 3).
  assert rank == 4 and len(chosen) == 2 * 7 + 2 * 11
  enc, dec = _inputs()
  ref = _t5_logits_peft(model, enc, dec)
  ours = _ours(cfg, lora.variables(base, adapters, 8.0 / 4), enc, dec)
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)
  plain = _ours(cfg, {"params": base}, enc, dec)
  assert np.abs(plain - ref).max() > 1e-2  # the adapters matter
  merged = lora.merge(base, adapters, 2.0)
  np.testing.assert_allclose(_ours(cfg, {"params": merged}, enc, dec), ref, atol=1e-4, rtol=1e-4)
  # Exported back, PEFT's tensors are exactly what it saved.
  back = lora.to_peft(adapters, chosen)
  state = peft.get_peft_model_state_dict(model)
  assert set(back) == set(state)
  for k, v in state.items():
    np.testing.assert_array_equal(back[k], v.numpy())


def test_llama_lora_logits_equal_peft(llama_case):
  cfg, base, model, _ = llama_case
  adapters, chosen, rank = _state_dict_adapters(model, cfg)
  assert rank == 8 and len(chosen) == 2 * 7
  tok, _ = _inputs(1)
  ref = _llama_logits_peft(model, tok)
  ours = _ours(cfg, lora.variables(base, adapters, 4.0 / 8), tok)
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)
  assert np.abs(_ours(cfg, {"params": base}, tok) - ref).max() > 1e-2


@pytest.mark.parametrize("family", ["Qwen2", "Qwen3"])
def test_qwen_lora_logits_and_merge_equal_peft(family, tmp_path):
  # Qwen2's q, k and v carry biases: PEFT adapts the whole Linear (bias included) and its
  # merge keeps the biases; Qwen3 normalises q and k after their projections (and LoRA's
  # delta). flanjax's adapted model and merge must give what PEFT gives.
  torch.manual_seed(3)
  base_t = _randomize(getattr(transformers, f"{family}ForCausalLM")(getattr(
      transformers, f"{family}Config")(
          vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
          tie_word_embeddings=True)).eval(), std=0.2)
  cfg, base = _save_base(base_t, tmp_path / "base")
  attn = base["layer_0"]["attention"]
  if family == "Qwen2":
    assert cfg.qkv_bias and np.abs(attn["q_bias"]).max() > 0.05
  else:
    assert cfg.qk_norm and np.abs(attn["q_norm"]["scale"] - 1).max() > 0.05
  model = _peft_wrap(base_t, LLAMA_TARGETS, rank=4, alpha=8.0, task_type="CAUSAL_LM")
  model.save_pretrained(str(tmp_path / "adapter"))
  adapters, chosen, rank = _state_dict_adapters(model, cfg)
  assert rank == 4 and len(chosen) == 2 * 7  # the biases are not adapted
  tok, _ = _inputs(2)
  ref = _llama_logits_peft(model, tok)
  np.testing.assert_allclose(_ours(cfg, lora.variables(base, adapters, 2.0), tok), ref,
                             atol=1e-4, rtol=1e-4)
  merged = hf.params_to_hf(lora.merge(base, adapters, 2.0), cfg)
  fresh = peft.PeftModel.from_pretrained(
      type(base_t).from_pretrained(str(tmp_path / "base")),
      str(tmp_path / "adapter"))
  want = {k: v.numpy() for k, v in fresh.merge_and_unload().state_dict().items()
          if k != "lm_head.weight"}  # tied: the embedding
  assert set(merged) == set(want)
  for k in want:
    np.testing.assert_allclose(merged[k], want[k], atol=1e-5, rtol=0, err_msg=k)


def test_targets_select_as_peft_does(t5_case):
  cfg = t5_case[0]
  names = lambda t: sorted(s.hf_name for s in lora.select(cfg, t))  # noqa: E731
  assert len(names(None)) == 2 * 2 + 2 * 4  # q, v of self- and cross-attention
  cross = names(r".*EncDecAttention\.(q|v)")
  assert cross == ["decoder.block.0.layer.1.EncDecAttention.q",
                   "decoder.block.0.layer.1.EncDecAttention.v",
                   "decoder.block.1.layer.1.EncDecAttention.q",
                   "decoder.block.1.layer.1.EncDecAttention.v"]
  assert all(n.startswith("encoder.") for n in names(r"encoder\..*\.(q|k|v|o)"))
  with pytest.raises(UserError, match="'q_proj' not a module of this model; its modules are "
                     "k, o, q, v, wi_0, wi_1, wo$"):
    lora.select(cfg, ["q", "q_proj"])
  with pytest.raises(UserError, match="matches no module"):
    lora.select(cfg, r"nothing\.here")
  # One name as a string is a pattern over whole paths: the message says so and offers a list.
  with pytest.raises(UserError, match=r"'q' matches no module: one string is a regular "
                     r"expression over the whole path .* give a list, e.g. \['q'\]"):
    lora.select(cfg, "q")


def test_bad_rank_alpha_are_one_line_errors(t5_case):
  cfg = t5_case[0]
  for kw, what in (({"rank": 0}, "rank"), ({"rank": -2}, "rank"), ({"alpha": 0}, "alpha"),
                   ({"alpha": -1.0}, "alpha")):
    with pytest.raises(UserError, match=what) as e:
      lora.LoraConfig(**kw)
    assert what in str(e.value).splitlines()[0]
  site = lora.select(cfg, ["q"])[0]
  with pytest.raises(UserError, match="larger than the width of encoder.block.0.layer.0"
                     r".SelfAttention.q \(32\)"):
    lora.check_rank(site, 33)
  lora.check_rank(site, 32)


def test_adapter_for_another_base_names_the_shapes(t5_case):
  cfg, _, model, _ = t5_case
  state = {k: v.numpy() for k, v in peft.get_peft_model_state_dict(model).items()}
  import dataclasses
  wider = dataclasses.replace(cfg, d_model=64)
  with pytest.raises(UserError, match=r"does not fit the base at .*: lora_A \(4, 32\), "
                     r"lora_B \(32, 4\); the base's layer is 64 -> 32"):
    lora.from_peft(state, wider, "adapter_model.safetensors")


def test_merged_weights_equal_peft_merge_and_unload(llama_case, tmp_path):
  cfg, base, model, tmp = llama_case
  adapters, _, _ = lora.from_peft(
      {k: v.numpy() for k, v in peft.get_peft_model_state_dict(model).items()}, cfg, "peft")
  merged = hf.params_to_hf(lora.merge(base, adapters, 4.0 / 8), cfg)
  # A fresh PeftModel from the saved adapter folder: merge_and_unload() leaves `model` alone.
  fresh = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp / "adapter"))
  ref = {k: v.numpy() for k, v in fresh.merge_and_unload().state_dict().items()}
  assert set(merged) == set(ref)
  for k in ref:
    np.testing.assert_allclose(merged[k], ref[k], atol=1e-5, rtol=0, err_msg=k)


def test_peft_adapter_imports_through_the_converter_loader_and_init_adapter(t5_case,
                                                                             builtin_vocab):
  cfg, base, model, tmp = t5_case
  enc, dec = _inputs(2)
  ref = _t5_logits_peft(model, enc, dec)
  # Merged weights round differently from x W + x A B: compare with PEFT's merged model.
  merged_ref = _t5_logits_peft(peft.PeftModel.from_pretrained(
      tiny_t5(), str(tmp / "adapter")).merge_and_unload().eval(), enc, dec)
  # hf-to-orbax --adapter: the converted weights are the merged model.
  out = tmp / "merged_orbax"
  convert_checkpoint.main(["hf-to-orbax", str(tmp / "base"), str(out), "--adapter",
                           str(tmp / "adapter"), "--overwrite"])
  got_cfg, params, _, _ = convert_checkpoint.read_orbax(str(out))
  np.testing.assert_allclose(_ours(got_cfg, {"params": params}, enc, dec), merged_ref,
                             atol=1e-4, rtol=1e-4)
  # loading.load(base, adapter=PEFT folder), as python -m flanjax.infer --adapter reads it.
  from flanjax.models import loading
  with open(builtin_vocab.sentencepiece_model_file, "rb") as f:
    (tmp / "base" / "spiece.model").write_bytes(f.read())
  loaded = loading.load(str(tmp / "base"), adapter=str(tmp / "adapter"))
  assert "with the LoRA adapters of" in loaded.source
  np.testing.assert_allclose(np.asarray(loaded.model.apply({"params": loaded.params}, enc, dec)),
                             merged_ref, atol=1e-4, rtol=1e-4)
  # train.init_adapter: the adapters start from the folder's weights, rank and alpha.
  from flanjax.training import adapters
  ad = adapters.setup(None, cfg, base, str(tmp / "base"), init_adapter=str(tmp / "adapter"))
  assert (ad.config.rank, ad.config.alpha, len(ad.sites)) == (4, 8.0, 36)
  import jax
  boxed = ad.boxed(jax.random.PRNGKey(0))
  start = jax.tree.map(lambda x: np.asarray(x.unbox()), boxed,
                       is_leaf=lambda x: hasattr(x, "unbox"))
  np.testing.assert_allclose(_ours(cfg, ad.variables(base, start), enc, dec), ref, atol=1e-4,
                             rtol=1e-4)
  # A random start: B is zero, so step 0 is the base model.
  fresh = adapters.setup(lora.LoraConfig(rank=2, targets=["q", "wo"]), cfg, base,
                         str(tmp / "base"))
  zero = jax.tree.map(lambda x: np.asarray(x.unbox()), fresh.boxed(jax.random.PRNGKey(1)),
                      is_leaf=lambda x: hasattr(x, "unbox"))
  assert all(not np.any(ab["b"]) and np.any(ab["a"]) for _, ab in lora.pairs(zero))
  np.testing.assert_array_equal(_ours(cfg, fresh.variables(base, zero), enc, dec),
                                _ours(cfg, {"params": base}, enc, dec))


def test_step_flag_takes_best_or_a_number():
  import argparse
  from flanjax import evaluate, infer
  from flanjax.run_folder import parse_step
  assert infer._parser().parse_args(["--checkpoint", "r", "--step", "best"]).step == "best"
  assert infer._parser().parse_args(["--checkpoint", "r", "--step", "12", "--adapter",
                                     "a"]).step == 12
  assert evaluate._parser().parse_known_args(["--step", "best"])[0].step == "best"
  with pytest.raises(argparse.ArgumentTypeError, match="'last' is not a step number or 'best'"):
    parse_step("last")


def test_evaluate_passes_the_adapter_to_the_loader(monkeypatch, tmp_path):
  from flanjax import evaluate
  from flanjax.models import loading
  seen = {}

  class Stop(Exception):
    pass

  def fake_load(path, step=None, config=None, adapter=None):
    seen.update(path=path, step=step, adapter=adapter)
    raise Stop()

  monkeypatch.setattr(loading, "load", fake_load)
  (tmp_path / "ckpt").mkdir()
  with pytest.raises(Stop):
    evaluate.evaluate(checkpoint=str(tmp_path / "ckpt"), step="best", adapter="/peft/dir",
                      tasks=["builtin_parity"])
  assert seen == {"path": str(tmp_path / "ckpt"), "step": "best", "adapter": "/peft/dir"}
  args = evaluate._parser().parse_known_args(["--adapter", "runs/lora", "--step", "4"])[0]
  assert (args.adapter, args.step) == ("runs/lora", 4)


def test_an_adapters_evaluation_goes_to_its_own_folder_by_default(monkeypatch, tmp_path):
  """Two adapters over one base keep their own results: <adapter>/eval, not <base>/eval."""
  import types
  from flanjax import evaluate
  from flanjax.evaluation import run as run_mod
  from flanjax.training import metrics
  seen = []

  class Stop(Exception):
    pass

  def writer(path):
    seen.append(path)
    raise Stop()

  monkeypatch.setattr(run_mod, "_load", lambda *a, **k: (types.SimpleNamespace(vocab=None), None))
  monkeypatch.setattr(run_mod, "_step_of", lambda loaded, step: 0)
  monkeypatch.setattr(run_mod.registry, "call_register_fns", lambda *a, **k: None)
  monkeypatch.setattr(metrics, "SummaryWriter", writer)
  base, first, second = (tmp_path / n for n in ("base", "lora_a", "lora_b"))
  for d in (base, first, second):
    d.mkdir()
  for adapter in (str(first), str(second), None):
    with pytest.raises(Stop):
      evaluate.evaluate(checkpoint=str(base), adapter=adapter, tasks=["builtin_parity"])
  assert seen == [str(d / "eval" / "tensorboard") for d in (first, second, base)]
  # A run's checkpoint folder is replaced whole (the best one at each new best): its
  # results go to <run>/eval/<step or best> instead.
  best = tmp_path / "run" / "checkpoints" / "best"
  best.mkdir(parents=True)
  with pytest.raises(Stop):
    evaluate.evaluate(checkpoint=str(best), tasks=["builtin_parity"])
  assert seen[-1] == str(tmp_path / "run" / "eval" / "best" / "tensorboard")


def test_evaluate_takes_max_decode_len_from_the_decode_configs_binding(monkeypatch, tmp_path):
  """--gin.DecodeConfig.max_decode_len=8 without a suite gin file: 8 new tokens, not 256."""
  import gin
  import types
  from flanjax import evaluate
  from flanjax.evaluation import run as run_mod
  seen = []

  class Stop(Exception):
    pass

  def suite(*args, decode=None, **kw):
    seen.append(decode)
    raise Stop()

  loaded = types.SimpleNamespace(vocab=None, model=None, params=None, kind=None)
  monkeypatch.setattr(run_mod, "_load", lambda *a, **k: (loaded, None))
  monkeypatch.setattr(run_mod, "_step_of", lambda loaded, step: 0)
  monkeypatch.setattr(run_mod.registry, "call_register_fns", lambda *a, **k: None)
  monkeypatch.setattr(run_mod, "evaluate_suite", suite)
  (tmp_path / "ckpt").mkdir()
  for binding, want in (("", 256), ("DecodeConfig.max_decode_len = 8", 8)):
    with gin.unlock_config():
      gin.clear_config()
      gin.parse_config(binding)
    with pytest.raises(Stop):
      evaluate.evaluate(checkpoint=str(tmp_path / "ckpt"), tasks=["builtin_parity"],
                        out_dir=str(tmp_path / "out"))
    assert seen[-1].max_decode_len == want
  with gin.unlock_config():
    gin.clear_config()


def test_alpha_and_rank_pattern_import_with_peft_scales(llama_case, tmp_path):
  cfg, base, _, _ = llama_case
  # Per-module alpha (v_proj, and q_proj of layer 1 by a regular expression), and a
  # rank_pattern that gives every module rank 4 while r says 8.
  config = peft.LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                           lora_dropout=0.0, task_type="CAUSAL_LM",
                           rank_pattern={"q_proj": 4, "v_proj": 4},
                           alpha_pattern={"v_proj": 64, r"layers\.1\.self_attn\.q_proj": 2})
  model = _random_b(peft.get_peft_model(tiny_llama(), config).eval(), 3)
  model.save_pretrained(str(tmp_path / "adapter"))
  tok, _ = _inputs(3)
  ref = _llama_logits_peft(model, tok)
  read, adapters, chosen = lora.read_peft(str(tmp_path / "adapter"), cfg)
  assert (read.rank, read.alpha, len(chosen)) == (4, 8.0, 4)
  ours = _ours(cfg, lora.variables(base, adapters, read.scale), tok)
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)
  raw = lora.peft_tensors(str(tmp_path / "adapter"))[1]
  plain = lora.variables(base, lora.from_peft(raw, cfg, "raw")[0], read.scale)
  assert np.abs(_ours(cfg, plain, tok) - ref).max() > 1e-2  # lora_alpha alone is not PEFT's
  # Exported back (one lora_alpha, the module's own scale in its B), PEFT reads the same model.
  lora.write_peft(str(tmp_path / "back"), read, adapters, chosen, cfg)
  back = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "back")).eval()
  np.testing.assert_allclose(_llama_logits_peft(back, tok), ref, atol=1e-4, rtol=1e-4)
  # PEFT's rule for a pattern key: a regular expression matching the name's dotted end.
  from peft.utils.other import get_pattern_key
  keys = ["proj", r"self_attn\.v_proj", "v_proj", "layers.0.self_attn.q_proj"]
  for name in ("model.layers.0.self_attn.v_proj", "model.layers.0.self_attn.q_proj",
               "model.layers.1.self_attn.q_proj", "v_proj"):
    want = get_pattern_key(keys, name)
    assert lora.pattern_value({k: k for k in keys}, name, name) == want


def test_modules_of_different_ranks_read_train_and_export_as_peft_has_them(llama_case, tmp_path):
  from flanjax.training import adapters as adapters_lib  # pylint: disable=g-import-not-at-top
  cfg, base, _, tmp = llama_case
  # q_proj at rank 2, v_proj at 6 and o_proj at r=4, one alpha_pattern on top.
  config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"],
                           lora_dropout=0.0, task_type="CAUSAL_LM",
                           rank_pattern={"q_proj": 2, r"layers\.1\.self_attn\.v_proj": 6},
                           alpha_pattern={"o_proj": 3})
  model = _random_b(peft.get_peft_model(tiny_llama(), config).eval(), 4)
  model.save_pretrained(str(tmp_path / "adapter"))
  tok, _ = _inputs(4)
  ref = _llama_logits_peft(model, tok)
  read, adapters, chosen = lora.read_peft(str(tmp_path / "adapter"), cfg)
  ranks = sorted((s.hf_name, lora.site_rank(adapters, s)) for s in chosen)
  assert read.rank == 4 and {r for _, r in ranks} == {2, 4, 6}
  np.testing.assert_allclose(_ours(cfg, lora.variables(base, adapters, read.scale), tok), ref,
                             atol=1e-4, rtol=1e-4)
  # A run started from it trains exactly PEFT's parameters.
  started = adapters_lib.setup(None, cfg, base, str(tmp / "base"), str(tmp_path / "adapter"))
  assert started.num_params() == sum(p.numel() for p in model.parameters() if p.requires_grad)
  # Written back, each module keeps its rank and PEFT reads the same model.
  lora.write_peft(str(tmp_path / "back"), read, adapters, chosen, cfg)
  back = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "back")).eval()
  np.testing.assert_allclose(_llama_logits_peft(back, tok), ref, atol=1e-4, rtol=1e-4)
  again = lora.read_peft(str(tmp_path / "back"), cfg)
  assert sorted((s.hf_name, lora.site_rank(again[1], s)) for s in again[2]) == ranks


def test_empty_targets_are_a_one_line_error(t5_case):
  cfg = t5_case[0]
  for empty in ([], ()):
    with pytest.raises(UserError, match=r"LoraConfig.targets is empty, so nothing would train: "
                       r"name some of this model's modules \(k, o, q, v, wi_0, wi_1, wo\)"):
      lora.select(cfg, lora.LoraConfig(targets=empty).targets)

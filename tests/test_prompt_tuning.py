"""Prompt tuning against PEFT: logits of both model kinds with a soft prompt equal PeftModel's,
an export loads in PEFT unchanged, a PEFT adapter imports; packed rows give every example
its own virtual tokens; training moves the soft prompt only; the one-line errors."""

import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flanjax.data import packing
from flanjax.errors import UserError
from flanjax.models import kinds, loading, prompt_tuning
from flanjax.models.prompt_hook import KEY
from flanjax.training import adapters as adapters_lib, trainer as step_lib

from test_lora import V, _peft_wrap, _save_base, tiny_llama, tiny_t5  # noqa: E402

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))
import convert_checkpoint  # noqa: E402  pylint: disable=g-import-not-at-top

N = 3  # virtual tokens


@pytest.fixture(scope="module", params=["t5", "llama"])
def case(request, tmp_path_factory):
  tmp = tmp_path_factory.mktemp(f"pt_{request.param}")
  t5 = request.param == "t5"
  base_t = tiny_t5() if t5 else tiny_llama()
  cfg, base = _save_base(base_t, tmp / "base")
  torch.manual_seed(3)
  model = peft.get_peft_model(base_t, peft.PromptTuningConfig(
      task_type="SEQ_2_SEQ_LM" if t5 else "CAUSAL_LM", num_virtual_tokens=N,
      prompt_tuning_init="RANDOM")).eval()
  model.save_pretrained(str(tmp / "adapter"))
  return cfg, base, model, tmp


def _ids(seed=0):
  rng = np.random.default_rng(seed)
  return rng.integers(2, V, size=(2, 9)), rng.integers(2, V, size=(2, 6))


def _peft_logits(model, enc, dec, t5):
  with torch.no_grad():
    if t5:
      return model(input_ids=torch.tensor(enc), decoder_input_ids=torch.tensor(dec)).logits.numpy()
    # A causal model's logits cover the virtual positions too, as ours do.
    return model(input_ids=torch.tensor(enc)).logits.numpy()


def _ours(cfg, params, enc, dec, t5):
  model = kinds.for_config(cfg).build(cfg)
  virtual = np.tile(prompt_tuning.virtual_ids(cfg, N), (enc.shape[0], 1))
  tokens = np.concatenate([virtual, enc], 1)
  args = (tokens, dec) if t5 else (tokens,)
  return np.asarray(jax.jit(model.apply)({"params": params}, *args))  # one compile, not per op


def test_logits_export_and_import_equal_peft(case, tmp_path):
  cfg, base, model, tmp = case
  t5 = kinds.for_config(cfg) is kinds.ENC_DEC
  enc, dec = _ids()
  ref = _peft_logits(model, enc, dec, t5)
  # PEFT's own adapter folder read by flanjax: same rows (T5's holds 2 x N, PEFT reads N).
  config, adapters, sites = loading.read_adapter(str(tmp / "adapter"), cfg)
  assert (config.num_virtual_tokens, sites) == (N, [])
  params = loading.merge_adapter(base, config, adapters, cfg, "peft")
  ours = _ours(cfg, params, enc, dec, t5)
  assert ours.shape == ref.shape
  print(f"{'t5' if t5 else 'llama'} max abs diff vs PeftModel: {np.abs(ours - ref).max():.2e} "
        f"(logits up to {np.abs(ref).max():.1f})")
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)

  # Our export of another prompt loads in PEFT unchanged and gives our logits.
  other = np.random.default_rng(5).normal(0, 1, (N, cfg.d_model)).astype(np.float32)
  prompt_tuning.write_peft(str(tmp_path / "export"), config, other, cfg, str(tmp / "base"))
  auto = (transformers.T5ForConditionalGeneration if t5 else transformers.LlamaForCausalLM)
  loaded_t = peft.PeftModel.from_pretrained(auto.from_pretrained(str(tmp / "base")),
                                            str(tmp_path / "export")).eval()
  theirs = _peft_logits(loaded_t, enc, dec, t5)
  mine = _ours(cfg, prompt_tuning.merge(base, other), enc, dec, t5)
  np.testing.assert_allclose(mine, theirs, atol=1e-4, rtol=1e-4)
  assert np.abs(mine - ref).max() > 1e-2  # the prompt matters

  # hf-to-orbax --adapter keeps PEFT's prompt beside the weights; the loader reads it back
  # with a kind that puts the virtual tokens first.
  convert_checkpoint.main(["hf-to-orbax", str(tmp / "base"), str(tmp_path / "orbax"),
                           "--adapter", str(tmp / "adapter")])
  _, params2, _, _ = loading.read_orbax(str(tmp_path / "orbax"))
  kind = prompt_tuning.kind_of(kinds.for_config(cfg, trained_by_flanjax=False), cfg, params2)
  row = kind.decode_prompt(enc[0])
  assert list(row[:N]) == list(prompt_tuning.virtual_ids(cfg, N))
  np.testing.assert_allclose(_ours(cfg, params2, enc, dec, t5), ref, atol=1e-4, rtol=1e-4)


def _packed(kind_name, examples, lengths):
  packer = packing.Packer(lengths, kind_name, pack=True)
  rows = list(packer.pack(examples))
  assert len(rows) == 1
  return {k: v[None] for k, v in rows[0].items()}


@pytest.mark.parametrize("kind_name", ["enc_dec", "prefix_lm"])
def test_every_packed_example_gets_its_own_prompt(kind_name):
  t5 = kind_name == "enc_dec"
  cfg = (kinds.ENC_DEC.config_class(vocab_size=V, d_model=32, d_ff=48, num_heads=4, d_kv=8,
                                    num_encoder_layers=2, num_decoder_layers=2)
         if t5 else kinds.DECODER.config_class(vocab_size=V, d_model=32, d_ff=48, num_heads=4,
                                               num_kv_heads=2, head_dim=8, num_layers=2))
  kind = kinds.get(kind_name)
  model = kind.build(cfg)
  params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0),
                                        **kind.dummy_batch(1, 8, 8))["params"])
  params = prompt_tuning.merge(params, jax.random.normal(jax.random.PRNGKey(1), (N, 32)))
  virtual = np.asarray(prompt_tuning.virtual_ids(cfg, N), np.int32)
  rng = np.random.default_rng(0)
  exs = [{"inputs": np.concatenate([virtual, rng.integers(2, V, n), [1]]).astype(np.int32),
          "targets": np.concatenate([rng.integers(2, V, m), [1]]).astype(np.int32)}
         for n, m in ((5, 4), (7, 3))]
  lengths = {"inputs": 24, "targets": 12}
  both = _packed(kind_name, exs, lengths)
  forward = jax.jit(lambda p, b: model.apply({"params": p}, **kind.model_inputs(b)))
  run = lambda b: np.asarray(forward(params, b))  # noqa: E731
  together = run(both)
  w = both["decoder_loss_weights"][0] > 0
  seg = both["decoder_segment_ids"][0]
  for i, ex in enumerate(exs):
    alone = _packed(kind_name, [ex], lengths)
    wa = alone["decoder_loss_weights"][0] > 0
    np.testing.assert_allclose(together[0][w & (seg == i + 1)], run(alone)[0][wa], atol=1e-5)
  # The two examples' prompt positions hold the same rows of the prompt.
  assert (both["decoder_input_tokens" if not t5 else "encoder_input_tokens"][0]
          >= cfg.vocab_size).sum() == 2 * N


def test_training_moves_the_soft_prompt_only(case):
  cfg, base, _, _ = case
  kind = kinds.for_config(cfg)
  config = prompt_tuning.PromptTuningConfig(num_virtual_tokens=N, init="vocab")
  a = adapters_lib.setup(config, cfg, base, init_from="/base")
  assert isinstance(a, adapters_lib.PromptAdapters) and a.num_params() == N * cfg.d_model
  # 'vocab' starts from rows of the base's token embedding, as PEFT's SAMPLE_VOCAB.
  emb = np.asarray(base["token_embedding"])
  assert all(any(np.array_equal(r, e) for e in emb) for r in a.start)
  kind = a.kind(kind)
  exs = [{"inputs": np.concatenate([kind.virtual_tokens, np.arange(2, 2 + n), [1]]).astype(
      np.int32), "targets": np.asarray([5, 6, 7, 1], np.int32)} for n in (4, 6, 3, 5)]
  batch = _packed(kind.packing_kind, exs, {"inputs": 48, "targets": 16})
  base_before = jax.tree.map(np.array, base)
  tx = optax.adam(0.05)
  params = nn.unbox(a.boxed(None))
  state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
           "rng": jax.random.PRNGKey(0)}
  device_base = jax.tree.map(jnp.asarray, base)
  step = jax.jit(step_lib.make_train_step(adapters_lib.Bound(kind.build(cfg), device_base, a), tx,
                                          lambda s: 0.05, model_inputs=kind.model_inputs))
  losses = []
  for _ in range(4):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  assert losses[-1] < losses[0], losses
  # Adam's state: mu and nu of the prompt and a count; nothing of the base.
  shapes = sorted(tuple(np.shape(x)) for x in jax.tree.leaves(state["opt_state"]))
  assert shapes == [(), (N, cfg.d_model), (N, cfg.d_model)]
  assert list(state["params"]) == [KEY]
  assert not np.array_equal(state["params"][KEY], a.start)
  jax.tree.map(np.testing.assert_array_equal, base, base_before)  # bit-identical


def test_bad_input_is_one_line(case, tmp_path):
  cfg, base, _, tmp = case
  for n in (0, -2):
    with pytest.raises(UserError, match="num_virtual_tokens") as e:
      prompt_tuning.PromptTuningConfig(num_virtual_tokens=n)
    # gin appends its call site on lines of their own; the message is the first line
    assert "positive number of virtual tokens" in str(e.value).splitlines()[0]
  with pytest.raises(UserError, match="init_text"):
    prompt_tuning.PromptTuningConfig(init="text")
  from flanjax.models import lora
  with pytest.raises(UserError, match="not both") as e:
    adapters_lib.setup([lora.LoraConfig(), prompt_tuning.PromptTuningConfig()], cfg, base, "/b")
  assert "\n" not in str(e.value)
  lora_dir = tmp_path / "lora"
  base_t = (transformers.T5ForConditionalGeneration if kinds.for_config(cfg) is kinds.ENC_DEC
            else transformers.LlamaForCausalLM).from_pretrained(str(tmp / "base"))
  targets = ["q"] if kinds.for_config(cfg) is kinds.ENC_DEC else ["q_proj"]
  _peft_wrap(base_t, targets).save_pretrained(str(lora_dir))
  with pytest.raises(UserError, match="one method at a time") as e:
    adapters_lib.setup(prompt_tuning.PromptTuningConfig(), cfg, base, "/b", str(lora_dir))
  assert "\n" not in str(e.value)


def _tokenizer_dir(path, post):
  """A byte-level BPE tokenizer folder under V pieces whose post-processor adds what a real
  T5 (`$A </s>`) or Llama (`<s> $A`) tokenizer adds."""
  import json  # pylint: disable=g-import-not-at-top
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  os.makedirs(path, exist_ok=True)
  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(["Classify the sentiment of the review.", "Answer the question."] * 5,
                          trainers.BpeTrainer(vocab_size=V - 8, special_tokens=[
                              "<pad>", "</s>", "<unk>", "<s>"],
                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet()[:60]))
  special = post.replace("$A", "").strip()
  tok.post_processor = processors.TemplateProcessing(
      single=post, special_tokens=[(special, tok.token_to_id(special))])
  tok.save(os.path.join(path, "tokenizer.json"))
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "</s>",
               "bos_token": "<s>", "pad_token": "<pad>", "unk_token": "<unk>"}, f)
  return str(path)


@pytest.mark.parametrize("kind_name", ["t5", "llama"])
def test_text_init_takes_the_embeddings_peft_takes(kind_name, tmp_path):
  # PEFT's TEXT init: the tokenizer's ids of the text (its own BOS / EOS), repeated to n.
  from flanjax.data import hf_vocab  # pylint: disable=g-import-not-at-top
  t5 = kind_name == "t5"
  folder = _tokenizer_dir(tmp_path / "tok", "$A </s>" if t5 else "<s> $A")
  text, n = "Classify the review.", 40
  base_t = tiny_t5() if t5 else tiny_llama()
  cfg, base = _save_base(base_t, tmp_path / "base")
  model = peft.get_peft_model(base_t, peft.PromptTuningConfig(
      task_type="SEQ_2_SEQ_LM" if t5 else "CAUSAL_LM", num_virtual_tokens=n,
      prompt_tuning_init="TEXT", prompt_tuning_init_text=text, tokenizer_name_or_path=folder))
  want = model.prompt_encoder["default"].embedding.weight.detach().numpy()
  vocab = hf_vocab.HFTokenizerVocabulary.from_directory(folder)
  got = prompt_tuning.init(prompt_tuning.PromptTuningConfig(n, "text", text),
                           base["token_embedding"], vocab, cfg)
  ids = transformers.AutoTokenizer.from_pretrained(folder)(text)["input_ids"]
  assert len(ids) < n and (ids[-1] == 1 if t5 else ids[0] == 3)  # repeated, with EOS / BOS
  # A seq2seq PEFT model holds 2n rows (encoder's, then decoder's); the encoder's are the soft
  # prompt flanjax prepends.
  assert want.shape == ((2 * n if t5 else n), cfg.d_model)
  np.testing.assert_allclose(got, want[:n], atol=0)


@pytest.mark.parametrize("kind_name", ["t5", "llama"])
def test_recipe_trains_and_its_export_loads_in_peft(kind_name, tmp_path, builtin_vocab, capsys):
  # The README's recipes through the training command: runs/prompt_tuning_flan_t5.gin and
  # runs/prompt_tuning_llama.gin over a Hugging Face folder; PEFT loads the exported prompt and
  # gives the logits flanjax gives for base + run.
  from conftest import command_in_process  # pylint: disable=g-import-not-at-top
  from flanjax import train as train_command  # pylint: disable=g-import-not-at-top
  from flanjax.data.collections import builtin  # pylint: disable=g-import-not-at-top
  from test_finetune import _write_tokenizer  # pylint: disable=g-import-not-at-top
  t5, n, hf_dir, run = kind_name == "t5", 4, tmp_path / "base", tmp_path / "run"
  if t5:
    base_t = tiny_t5(vocab_size=1024)
    base_t.save_pretrained(str(hf_dir))
    with open(builtin_vocab.sentencepiece_model_file, "rb") as f:
      (hf_dir / "spiece.model").write_bytes(f.read())
  else:
    torch.manual_seed(2)
    base_t = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=1024, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=3)).eval()
    base_t.save_pretrained(str(hf_dir))
    _write_tokenizer(str(hf_dir), builtin.all_text()[::5])
  recipe = "runs/prompt_tuning_flan_t5.gin" if t5 else "runs/prompt_tuning_llama.gin"
  code, out, err = command_in_process(train_command.main, [
      f"--gin_file={recipe}", f"--gin.HF_DIR={hf_dir}", f"--gin.train.model_dir={run}",
      "--gin.train.batch_size=4", "--gin.train.log_every_secs=0",
      "--gin.train.task_feature_lengths={'inputs': 64, 'targets': 16}",
      "--gin.train.num_steps=4", "--gin.Checkpointer.every_steps=4",
      "--gin.train.eval_at_end=False", "--gin.schedule.warmup_steps=0",
      f"--gin.PromptTuningConfig.num_virtual_tokens={n}"], builtin_vocab, train_command.__file__)
  assert code == 0, (out + err)[-3000:]
  # Rows hold the virtual tokens beyond the inputs' 64, and the console says so.
  rows = "(68 + 16) tokens" if t5 else "84 (causal: 68 inputs + 16 targets) tokens"
  assert (f"training: 4 steps of 4 rows x {rows}, each example's inputs led by {n} virtual "
          "tokens;") in out, out[-3000:]
  from flanjax.models import loading as loading_lib  # pylint: disable=g-import-not-at-top
  saved = loading_lib.restore_numpy(str(run / "checkpoints" / "4" / "state"))["params"]
  leaves = jax.tree_util.tree_leaves(saved)
  assert [np.shape(x) for x in leaves] == [(n, 32)]  # the soft prompt and nothing else
  # 'vocab' init samples embedding rows; 4 steps at the recipe's rate moved every row off them.
  emb = base_t.get_input_embeddings().weight.detach().numpy()
  prompt = np.asarray(leaves[0])
  assert np.min(np.abs(prompt[:, None, :] - emb[None]).max(-1), axis=1).min() > 1e-4

  capsys.readouterr()
  convert_checkpoint.main(["orbax-to-peft", str(run), str(tmp_path / "peft")])
  # The Llama recipe trains causally, as PEFT runs the export: no note.
  assert "PEFT runs the export causally" not in capsys.readouterr().err
  theirs_t = peft.PeftModel.from_pretrained(
      type(base_t).from_pretrained(str(hf_dir)), str(tmp_path / "peft")).eval()
  loaded = loading_lib.load(str(hf_dir), adapter=str(run))
  # The base with the run's prompt runs as the run itself does: the same kind, the same
  # virtual tokens first.
  itself = loading_lib.load(str(run))
  assert loaded.kind == itself.kind and loaded.kind.name == ("enc_dec" if t5 else "decoder")
  assert loaded.kind.prompt_ids(loaded.vocab, "Is 7 odd?") == itself.kind.prompt_ids(
      itself.vocab, "Is 7 odd?")
  enc, dec = np.random.default_rng(4).integers(2, 1000, size=(2, 9)), np.array([[0, 5, 7]] * 2)
  theirs = _peft_logits(theirs_t, enc, dec, t5)
  cfg = loaded.config
  tokens = np.concatenate([np.tile(prompt_tuning.virtual_ids(cfg, n), (2, 1)), enc], 1)
  ours = np.asarray(loaded.model.apply({"params": loaded.params}, *((tokens, dec) if t5
                                                                     else (tokens,))))
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)

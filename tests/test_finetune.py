"""Fine-tuning from Hugging Face directories through the real command (T5 and Llama), and
the decoder-only (prefix-LM) train step, loss mask and evaluation prompt."""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

from conftest import command_in_process
from flanjax import decoding
from flanjax.data import packing, pipeline, registry
from flanjax.models import decoder, hf, kinds, t5
from flanjax.training import trainer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))
import convert_checkpoint  # noqa: E402  pylint: disable=g-import-not-at-top

V = 1024  # model vocabulary: the 1000 pieces of the test tokenizers plus spare rows
LENGTHS = "--gin.train.task_feature_lengths={'inputs': 128, 'targets': 32}"
COMMON = ["--gin.train.batch_size=8", LENGTHS, "--gin.train.log_every_secs=0"]


def _randomize(model, std=0.5):
  # Wide random weights: any other init is far from them, so equality proves the source.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name or "layer_norm" in name:
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
      else:
        p.normal_(0.0, std)
  return model


def _args(model_dir, gin_file, hf_dir, *extra):
  return [f"--gin_file={gin_file}", f"--gin.HF_DIR={hf_dir}",
          f"--gin.train.model_dir={model_dir}", *COMMON, *extra]


def _train(model_dir, gin_file, hf_dir, *extra):
  args = [sys.executable, "-m", "flanjax.train", *_args(model_dir, gin_file, hf_dir, *extra)]
  proc = subprocess.run(args, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc.stdout


def _losses(model_dir):
  with open(os.path.join(model_dir, "train_losses.jsonl")) as f:
    return [r["loss"] for r in map(json.loads, f)]


def _checkpoint_params(model_dir, step):
  cfg, params, _, _ = convert_checkpoint.read_orbax(str(model_dir), step=step)
  return cfg, params


def _steps(model_dir):
  root = os.path.join(model_dir, "checkpoints")
  return sorted(int(n) for n in os.listdir(root) if n.isdigit())


# ---------------------------------------------------------------- T5 from a HF directory

def _flan_t5_tiny(own_lm_head=True, vocab_size=V):
  """A random T5 v1.1 as transformers 5 builds it (it ties lm_head unless given its own)."""
  torch.manual_seed(0)
  tcfg = transformers.T5Config(vocab_size=vocab_size, d_model=32, d_ff=48, num_layers=2,
                               num_decoder_layers=2, num_heads=4, d_kv=8,
                               feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                               decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
  tmodel = _randomize(transformers.T5ForConditionalGeneration(tcfg).eval())
  if own_lm_head:  # FLAN-T5's separate output matrix
    tmodel.lm_head.weight = torch.nn.Parameter(torch.randn(vocab_size, 32) * 0.3)
  return tmodel


@pytest.mark.parametrize("own_lm_head", [True, False])
def test_t5_saved_by_transformers_5_loads_with_its_unscaled_output(tmp_path, own_lm_head):
  # transformers 5 writes tie_word_embeddings=true and scale_decoder_outputs=false for v1.1.
  tmodel = _flan_t5_tiny(own_lm_head, vocab_size=96)
  tmodel.save_pretrained(str(tmp_path))
  cfg, params, _ = hf.load(str(tmp_path))
  assert not cfg.tie_word_embeddings
  enc = np.random.default_rng(0).integers(2, 96, size=(2, 9))
  dec = np.random.default_rng(1).integers(2, 96, size=(2, 5))
  with torch.no_grad():
    ref = tmodel(input_ids=torch.tensor(enc), decoder_input_ids=torch.tensor(dec)).logits.numpy()
  ours = np.asarray(t5.T5(cfg).apply({"params": params}, enc, dec))
  # The wide random weights drive hidden states to ~120: fp32 sums in another order (XLA:CPU's
  # Eigen dots vs PyTorch's) move logits of up to ~8 by up to ~1.7e-4. A wrong output scale
  # (d_model ** -0.5) would move them by whole units.
  np.testing.assert_allclose(ours, ref, atol=3e-5 * np.abs(ref).max(), rtol=1e-4)
  # Written back with its original config.json, transformers reads the same model.
  out = tmp_path / "out"
  hf.save(cfg, params, str(out), extra_config=hf.read_config(str(tmp_path)))
  back = transformers.T5ForConditionalGeneration.from_pretrained(str(out)).eval()
  with torch.no_grad():
    again = back(input_ids=torch.tensor(enc), decoder_input_ids=torch.tensor(dec)).logits.numpy()
  np.testing.assert_allclose(again, ref, atol=1e-5, rtol=1e-5)


def test_finetune_flan_t5_starts_from_the_hf_weights(tmp_path, builtin_vocab):
  tmodel = _flan_t5_tiny()
  hf_dir = tmp_path / "flan-t5-tiny"
  tmodel.save_pretrained(str(hf_dir))
  with open(builtin_vocab.sentencepiece_model_file, "rb") as f:
    (hf_dir / "spiece.model").write_bytes(f.read())
  run = tmp_path / "run"
  out = _train(run, "runs/finetune_flan_t5.gin", hf_dir, "--gin.train.num_steps=3",
               "--gin.Checkpointer.every_steps=2", "--gin.train.eval_at_end=False")
  assert "initialised from" in out and "model: T5 32d x 2+2 layers" in out
  losses = _losses(run)
  assert len(losses) == 3 and all(np.isfinite(losses))
  assert _steps(run) == [2, 3]

  # The HF vocabulary (1000 pieces + 24 sentinels) tokenized the tasks.
  info = json.loads((run / "run_info.json").read_text())
  assert info["vocabulary"].endswith("/x24") and info["model"]["vocab_size"] == V
  hf_w = {k: v.detach().numpy() for k, v in tmodel.state_dict().items()}
  cfg, params = _checkpoint_params(run, 3)
  # Sentinel rows never occur in the data: no gradient, no Adam update, so they are
  # exactly the HF rows after training; a random init could not match them.
  np.testing.assert_array_equal(params["token_embedding"][1000:], hf_w["shared.weight"][1000:])
  # Every parameter is within a few Adam steps (|update| <~ lr) of its HF value, and training
  # moved some of them.
  start = hf.t5_params_from_hf(hf_w, cfg)
  diffs = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                       params, start)
  assert max(jax.tree.leaves(diffs)) < 1e-3 and max(jax.tree.leaves(diffs)) > 0

  # The trained run exports to a directory that transformers loads, with the same logits.
  export = tmp_path / "export"
  convert_checkpoint.main(["orbax-to-hf", str(run), str(export), "--vocab", str(hf_dir)])
  loaded = transformers.T5ForConditionalGeneration.from_pretrained(str(export)).eval()
  enc = np.random.default_rng(0).integers(2, 1000, size=(2, 11))
  dec = np.random.default_rng(1).integers(2, 1000, size=(2, 5))
  with torch.no_grad():
    ref = loaded(input_ids=torch.tensor(enc), decoder_input_ids=torch.tensor(dec)).logits.numpy()
  ours = np.asarray(t5.T5(cfg).apply({"params": params}, enc, dec))
  # atol 2e-4: after training, float32 summation order (XLA's 2-D dots and blocked attention
  # vs torch's) moved 5 of 10,240 logits by up to 1.5e-4.
  np.testing.assert_allclose(ours, ref, atol=2e-4, rtol=1e-4)
  assert (export / "spiece.model").exists()

  # Resuming takes the weights from the checkpoint: the HF folder's weights are not even read.
  # (It trains nothing: its main in this process, not a process of its own.)
  os.remove(hf_dir / "model.safetensors")
  from flanjax import train as train_command  # pylint: disable=g-import-not-at-top
  code, out, err = command_in_process(
      train_command.main, _args(run, "runs/finetune_flan_t5.gin", hf_dir,
                                "--gin.train.num_steps=3", "--gin.train.eval_at_end=False"),
      builtin_vocab, train_command.__file__)
  assert code == 0, out[-3000:] + err[-3000:]
  assert "resumed from step 3" in out and "initialised from" not in out
  assert "no steps run" in out


def test_bad_init_from_is_the_one_line_user_error(tmp_path):
  from flanjax import train
  from flanjax.errors import UserError
  with pytest.raises(UserError, match="nope is not a directory: give the folder") as err:
    train.train(model_dir=str(tmp_path / "run"), init_from=str(tmp_path / "nope"))
  # The command prints this line alone (gin's "In call to configurable" lines are dropped).
  assert str(err.value).splitlines()[0].endswith("give the folder of a Hugging Face model")
  (tmp_path / "empty").mkdir()
  with pytest.raises(UserError, match="config.json not found"):
    train.train(model_dir=str(tmp_path / "run"), init_from=str(tmp_path / "empty"))
  with pytest.raises(UserError, match="no model: bind train.model_config"):
    train.train(model_dir=str(tmp_path / "run"))


# ---------------------------------------------------------------- Llama from a HF directory

def _write_tokenizer(path, texts, vocab_size=1000):
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tr = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>", "<s>"],
                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(texts, tr)
  tok.save(os.path.join(path, "tokenizer.json"))
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "</s>",
               "bos_token": "<s>", "pad_token": "<pad>", "unk_token": "<unk>"}, f)


def test_an_export_names_a_pad_token_only_when_the_tokenizer_has_one(tmp_path):
  """Llama 3's tokenizer has no pad token: writing pad_token_id 0 would make transformers
  mask a real token (id 0) out of prompts."""
  from flanjax.data import hf_vocab
  from flanjax.data.collections import builtin
  _write_tokenizer(str(tmp_path), builtin.all_text()[::50], vocab_size=300)
  with_pad = hf_vocab.HFTokenizerVocabulary.from_directory(str(tmp_path), model_config={})
  assert hf._special_ids(with_pad)["pad_token_id"] == with_pad.pad_id  # pylint: disable=protected-access
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE(unk_token="<unk>"))  # as Llama 3's: no pad token at all
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.train_from_iterator(builtin.all_text()[::50], trainers.BpeTrainer(
      vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  (tmp_path / "nopad").mkdir()
  tok.save(str(tmp_path / "nopad" / "tokenizer.json"))
  (tmp_path / "nopad" / "tokenizer_config.json").write_text(json.dumps(
      {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "</s>", "bos_token": "<s>",
       "unk_token": "<unk>"}))
  no_pad = hf_vocab.HFTokenizerVocabulary.from_directory(str(tmp_path / "nopad"), model_config={})
  ids = hf._special_ids(no_pad)  # pylint: disable=protected-access
  assert "pad_token_id" not in ids and ids["eos_token_id"] == no_pad.eos_id


def test_a_prompt_past_the_models_vocabulary_is_refused_not_scored_nan(tmp_path, capsys):
  # A tokenizer larger than the embedding table (an added token never resized in) loads
  # with a note; a prompt holding such an id scored NaN with exit 0, and is now refused.
  from flanjax.data.collections import builtin
  from flanjax.errors import UserError
  from flanjax.models import loading
  lcfg = transformers.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=1, num_attention_heads=2,
                                  num_key_value_heads=1, head_dim=16, pad_token_id=0,
                                  eos_token_id=1, bos_token_id=3)
  transformers.LlamaForCausalLM(lcfg).save_pretrained(str(tmp_path))
  _write_tokenizer(str(tmp_path), builtin.all_text()[::50], vocab_size=300)
  loaded = loading.load(str(tmp_path))
  assert "its tokenizer has 300 pieces, more than the model's vocab_size 256" in \
      capsys.readouterr().err
  gen = decoding.Generator(loaded.model, loaded.params, loaded.vocab, 32,
                           decoding.DecodeConfig(max_decode_len=2), kind=loaded.kind)
  fine, past = np.array([5, 9, 200], np.int32), np.array([5, 290], np.int32)
  assert len(gen.generate_ids([fine])) == 1
  with pytest.raises(UserError, match=r"a prompt holds token id 290, but the model has 256 "
                                      r"embeddings"):
    gen.generate_ids([fine, past])


def _tiny_llama():
  """A random 2-layer GQA Llama (untied), as the fine-tuning tests start from."""
  torch.manual_seed(0)
  lcfg = transformers.LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=16, tie_word_embeddings=False,
                                  max_position_embeddings=512, pad_token_id=0, eos_token_id=1,
                                  bos_token_id=3)
  return _randomize(transformers.LlamaForCausalLM(lcfg).eval(), std=0.05)


def test_finetune_llama_trains_validates_and_evaluates(tmp_path, capsys):
  from flanjax.data.collections import builtin
  tmodel = _tiny_llama()
  hf_dir = tmp_path / "llama-tiny"
  tmodel.save_pretrained(str(hf_dir))
  _write_tokenizer(str(hf_dir), builtin.all_text()[::5])
  template = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
  (hf_dir / "chat_template.jinja").write_text(template)  # where transformers 5 keeps it
  run = tmp_path / "run"
  out = _train(run, "runs/finetune_llama.gin", hf_dir, "--gin.train.num_steps=10",
               "--gin.schedule.peak=3e-3", "--gin.schedule.warmup_steps=0",
               "--gin.Checkpointer.every_steps=0",
               "--gin.train.validation_every_steps=10", "--gin.train.validation_batches=1",
               "--gin.train.eval_tasks=['builtin_parity']",
               "--gin.train.eval_splits=['validation']", "--gin.train.eval_max_examples=8",
               "--gin.train.max_decode_len=8")
  assert "model: decoder-only 64d x 2 layers" in out and "initialised from" in out
  assert "rows x 160 (causal: 128 inputs + 32 targets) tokens" in out  # the recipe's
  assert "step 10: validation loss" in out
  losses = _losses(run)
  assert len(losses) == 10 and all(np.isfinite(losses))
  assert np.mean(losses[-3:]) < losses[0] - 0.1, losses
  summary = json.loads((run / "summary.json").read_text())
  assert summary["model"] == "DecoderConfig"
  assert [(e["task"], e["split"], e["examples"]) for e in summary["eval"]] == [
      ("builtin_parity", "validation", 8)]
  assert summary["packing"]["mask_violations"] == 0
  assert "encoder_share" not in summary["packing"]
  # Rows past the tokenizer's 1000 ids never occur: still the HF rows after 10 steps.
  _, params = _checkpoint_params(run, 10)
  hf_emb = tmodel.state_dict()["model.embed_tokens.weight"].numpy()
  np.testing.assert_array_equal(params["token_embedding"][1000:], hf_emb[1000:])
  assert np.abs(params["token_embedding"][:1000] - hf_emb[:1000]).max() > 1e-4
  # The export keeps the chat template (through the run's vocab/); a causal run needs no
  # note, a prefix-LM run's export says that transformers reads it causally.
  capsys.readouterr()
  convert_checkpoint.main(["orbax-to-hf", str(run), str(tmp_path / "export")])
  assert "trained a prefix LM" not in capsys.readouterr().err
  assert (tmp_path / "export" / "chat_template.jinja").read_text() == template
  assert (run / "vocab" / "chat_template.jinja").read_text() == template
  prefix = tmp_path / "prefix"
  _train(prefix, "runs/finetune_llama.gin", hf_dir, "--gin.train.num_steps=1",
         "--gin.train.decoder_objective='prefix_lm'", "--gin.train.eval_at_end=False")
  convert_checkpoint.main(["orbax-to-hf", str(prefix), str(tmp_path / "export2")])
  err = capsys.readouterr().err
  assert f"note: {prefix} trained a prefix LM" in err
  assert "transformers runs the export causally" in err


# ---------------------------------------------------------------- the prefix-LM step

LEN = {"inputs": 96, "targets": 32}


@pytest.fixture(scope="module")
def tiny_decoder(builtin_vocab):
  cfg = decoder.DecoderConfig(vocab_size=1024, d_model=32, num_heads=4, num_kv_heads=2,
                              head_dim=8, d_ff=64, num_layers=2)
  model = decoder.Decoder(cfg)
  params = nn.unbox(model.init(jax.random.PRNGKey(0), **decoder.dummy_batch(1, 8, 8))["params"])
  batch = next(pipeline.get_dataset(registry.BUILTIN_MIXTURE, LEN, "train", batch_size=4,
                                    seed=0, kind="prefix_lm").as_numpy_iterator())
  return model, params, batch


def _segments(batch, r):
  """(start, input width, end) of each example in row r, from segment ids and causal mask."""
  seg = batch["decoder_segment_ids"][r]
  out = []
  for s in range(1, seg.max() + 1):
    idx = np.flatnonzero(seg == s)
    width = int(batch["decoder_causal_attention"][r, idx].sum()) - 1  # inputs + one position
    out.append((int(idx[0]), width, int(idx[-1]) + 1))
  return out


def test_prefix_lm_step_loss_is_cross_entropy_over_responses_only(tiny_decoder):
  model, params, batch = tiny_decoder
  assert batch["decoder_input_tokens"].shape == (4, 128) and "encoder_input_tokens" not in batch
  eos = packing.EOS_ID
  response = np.zeros(batch["decoder_target_tokens"].shape, np.float64)
  for r in range(4):
    for start, width, end in _segments(batch, r):
      tgt = batch["decoder_target_tokens"][r]
      assert tgt[start + width - 1] == eos and tgt[end - 1] == eos  # inputs, then targets
      assert batch["decoder_input_tokens"][r, start] == 0
      np.testing.assert_array_equal(batch["decoder_input_tokens"][r, start + 1:end],
                                    tgt[start:end - 1])
      response[r, start + width:end] = 1
  # The prompt carries no loss: the packed weights are exactly the response positions.
  np.testing.assert_array_equal(batch["decoder_loss_weights"], response)

  logits = np.asarray(model.apply({"params": params}, **decoder.model_inputs(batch)), np.float64)
  m = logits.max(-1, keepdims=True)
  logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, batch["decoder_target_tokens"][..., None], -1)[..., 0]
  want = (nll * response).sum() / response.sum()
  tx = optax.adamw(1e-3)
  state = {"params": params, "opt_state": tx.init(params), "step": np.int32(0),
           "rng": jax.random.PRNGKey(1)}
  _, metrics = jax.jit(trainer.make_train_step(model, tx, lambda s: 1e-3))(state, batch)
  assert abs(float(metrics["loss"]) - want) < 1e-5
  assert float(metrics["loss_weight"]) == response.sum()
  loss_sum, weight = jax.jit(trainer.make_eval_step(model))(params, batch)
  assert abs(float(loss_sum) / float(weight) - want) < 1e-5


def test_evaluation_prompt_continues_exactly_as_training_rows(tiny_decoder):
  """Greedy decoding of [0] + inputs equals the argmax the training forward pass gives."""
  model, params, batch = tiny_decoder
  start, width, end = _segments(batch, 0)[0]
  inputs = batch["decoder_target_tokens"][0, start:start + width]  # EOS included
  prompt = kinds.PREFIX_LM.decode_prompt(inputs)
  assert len(prompt) == width + 1
  np.testing.assert_array_equal(prompt, batch["decoder_input_tokens"][0, start:start + width + 1])
  # Generated tokens, fed back into a training-layout row, are that row's argmaxes.
  short = kinds.PREFIX_LM.decode_prompt(inputs[:3])
  prompts = np.zeros((2, LEN["inputs"] + 1), np.int32)
  prompts[0, :len(prompt)], prompts[1, :len(short)] = prompt, short
  gen = decoding.generate(model, params, prompts, np.array([width + 1, 4]),
                          decoding.DecodeConfig(max_decode_len=6), eos_id=-1,
                          kind=kinds.PREFIX_LM)[0]
  row = np.concatenate([[0], inputs, gen[:-1]])[None]
  causal = (np.arange(row.shape[1]) <= width).astype(np.int32)[None]
  logits = model.apply({"params": params}, row, decoder_causal_attention=causal)
  np.testing.assert_array_equal(np.argmax(logits[0, width:], -1), gen)
  # And the first of them from the packed training batch itself.
  train_logits = model.apply({"params": params}, **decoder.model_inputs(batch))
  assert int(np.argmax(train_logits[0, start + width])) == int(gen[0])


def test_a_causal_fine_tune_trains_and_exports_as_transformers_runs_it(tmp_path):
  # train.decoder_objective='causal': rows are BOS + prompt + response read left to right,
  # so the export behaves in transformers as the run does in flanjax: the training step's
  # loss equals transformers' loss on each example (labels on the response only), and
  # greedy generation from the run equals transformers' generate on the export.
  from flanjax.data.collections import builtin
  from flanjax.models import loading
  _tiny_llama().save_pretrained(str(tmp_path / "llama"))
  hf_dir = tmp_path / "llama"
  _write_tokenizer(str(hf_dir), builtin.all_text()[::5])
  from tokenizers import Tokenizer, processors
  tok = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))  # adds BOS, as Llama's does
  tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 3)])
  tok.save(str(hf_dir / "tokenizer.json"))
  run = tmp_path / "run"
  out = _train(run, "runs/finetune_llama.gin", hf_dir, "--gin.train.num_steps=6",
               "--gin.schedule.peak=3e-3", "--gin.schedule.warmup_steps=0",
               "--gin.train.decoder_objective='causal'", "--gin.train.eval_at_end=False")
  assert "rows x 160 (causal: 128 inputs + 32 targets) tokens" in out
  assert json.loads((run / "run_info.json").read_text())["kind"] == "decoder"
  convert_checkpoint.main(["orbax-to-hf", str(run), str(tmp_path / "export")])
  exported = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "export")).eval()
  loaded = loading.load(str(run))
  assert loaded.kind is kinds.DECODER
  vocab = loaded.vocab
  registry.call_register_fns([registry.register_builtin], vocab, input_length=128)
  batch = next(pipeline.get_dataset(registry.BUILTIN_MIXTURE, {"inputs": 128, "targets": 32},
                                    "validation", batch_size=2, seed=0, shuffle=False,
                                    kind="causal").as_numpy_iterator())
  # Each packed example alone through transformers, labels on its response only.
  total, weight = 0.0, 0
  for r in range(2):
    seg = batch["decoder_segment_ids"][r]
    for s in range(1, seg.max() + 1):
      idx = np.flatnonzero(seg == s)
      ids = list(batch["decoder_input_tokens"][r, idx]) + [batch["decoder_target_tokens"][r, idx[-1]]]
      w = batch["decoder_loss_weights"][r, idx]
      assert 1 not in ids[:-int(w.sum())]  # no EOS in the prompt
      assert ids[0] == pipeline.causal_bos(vocab) == 3 and ids.count(3) == 1
      labels = torch.tensor([-100] * (len(ids) - int(w.sum())) + ids[-int(w.sum()):])
      with torch.no_grad():
        loss = exported(input_ids=torch.tensor([ids]), labels=labels[None]).loss
      total, weight = total + float(loss) * int(w.sum()), weight + int(w.sum())
  loss_sum, w_sum = jax.jit(trainer.make_eval_step(loaded.model))(loaded.params, batch)
  assert int(w_sum) == weight
  assert abs(float(loss_sum) / float(w_sum) - total / weight) < 1e-4
  # Greedy generation: flanjax on the run, transformers on the export (BOS + prompt).
  prompts = ["Is 14 even or odd?", "Which is larger, 3 or 8?"]
  gen = decoding.Generator(loaded.model, loaded.params, vocab, 64,
                           decoding.DecodeConfig(max_decode_len=8), kind=loaded.kind)
  ours = gen.generate_ids([np.asarray(loaded.kind.prompt_ids(vocab, p), np.int32)
                           for p in prompts])
  for p, mine in zip(prompts, ours):
    ids = loaded.kind.prompt_ids(vocab, p)
    with torch.no_grad():
      theirs = exported.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False,
                                 eos_token_id=1, pad_token_id=0)[0, len(ids):].tolist()
    mine = [int(t) for t in mine]
    assert mine == theirs[:len(mine)], (p, mine, theirs)

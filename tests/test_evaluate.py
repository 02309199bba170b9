"""Evaluation: log-likelihood scoring against transformers, rank classification, answer
extraction on real BBH and GSM8K targets, and the evaluate command end to end."""

import json

import jax
import numpy as np
import pytest

from conftest import shared_data
from flanjax.evaluation import scoring
from flanjax.models import hf, t5

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

V = 96


# ---------------------------------------------------------------- tiny models

def _hf_t5(seed=0):
  torch.manual_seed(seed)
  cfg = transformers.T5Config(vocab_size=V, d_model=32, d_ff=48, num_layers=2,
                              num_decoder_layers=2, num_heads=4, d_kv=8, dropout_rate=0.0,
                              feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                              relative_attention_num_buckets=16, decoder_start_token_id=0,
                              pad_token_id=0, eos_token_id=1)
  model = transformers.T5ForConditionalGeneration(cfg).eval()
  with torch.no_grad():
    for p in model.parameters():  # HF's init is tiny for some weights: widen it
      p.normal_(0.0, 0.5)
    model.lm_head.weight = torch.nn.Parameter(torch.randn(V, 32) * 0.3)
  sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  hf_cfg = model.config.to_dict()
  hf_cfg["tie_word_embeddings"] = False
  hf_cfg.pop("scale_decoder_outputs", None)
  ours = hf.t5_config_from_hf(hf_cfg)
  return model, t5.T5(ours), hf.t5_params_from_hf(sd, ours)


def _hf_llama(seed=0):
  from flanjax.models import decoder
  torch.manual_seed(seed)
  cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                                 rms_norm_eps=1e-5, tie_word_embeddings=False)
  model = transformers.LlamaForCausalLM(cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.normal_(0.0, 1.0 if "embed_tokens" in name else 0.2)
  sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  ours = hf.llama_config_from_hf(model.config.to_dict())
  return model, decoder.Decoder(ours), hf.llama_params_from_hf(sd, ours)


def _requests(seed=0, n=7):
  """Contexts and continuations of varied lengths (one context long enough for a second bucket)."""
  rng = np.random.default_rng(seed)
  ctx = [rng.integers(2, V, size=int(k)).tolist() for k in rng.integers(1, 12, size=n)]
  ctx[2] = rng.integers(2, V, size=21).tolist()
  cont = [rng.integers(2, V, size=int(k)).tolist() for k in rng.integers(1, 6, size=n)]
  return ctx, cont


def _ref_logprobs(logits, targets):
  logp = torch.log_softmax(logits.double(), dim=-1)
  picked = logp[torch.arange(len(targets)), torch.tensor(targets)]
  greedy = bool((logits.argmax(-1) == torch.tensor(targets)).all())
  return float(picked.sum()), greedy


@pytest.fixture(scope="module")
def tiny_t5():
  return _hf_t5()


@pytest.fixture(scope="module")
def tiny_llama():
  return _hf_llama()


# ---------------------------------------------------------------- scoring

def test_t5_loglikelihood_equals_transformers(tiny_t5):
  hf_model, model, params = tiny_t5
  ctx, cont = _requests()
  cont = [c + [1] for c in cont]  # EOS-terminated, as seqio targets
  got, greedy = scoring.loglikelihood(model, params, "enc_dec", ctx, cont, batch_size=4)
  for i, (c, y) in enumerate(zip(ctx, cont)):
    with torch.no_grad():
      logits = hf_model(input_ids=torch.tensor([c]),
                        decoder_input_ids=torch.tensor([[0] + y[:-1]])).logits[0]
    want, want_greedy = _ref_logprobs(logits, y)
    assert got[i] == pytest.approx(want, abs=2e-4), i
    assert greedy[i] == want_greedy
  # A continuation that is the model's own greedy choice is flagged as such.
  with torch.no_grad():
    out = hf_model.generate(torch.tensor([ctx[0]]), max_new_tokens=4, do_sample=False,
                            num_beams=1, eos_token_id=None)[0, 1:].tolist()
  _, g = scoring.loglikelihood(model, params, "enc_dec", [ctx[0]], [out], batch_size=4)
  assert g[0]


@pytest.mark.parametrize("prefix_lm", [False, True], ids=["causal", "prefix-lm"])
def test_decoder_loglikelihood_equals_transformers(tiny_llama, prefix_lm):
  hf_model, model, params = tiny_llama
  ctx, cont = _requests(1)
  got, greedy = scoring.loglikelihood(model, params, "prefix_lm" if prefix_lm else "decoder",
                                      ctx, cont, batch_size=4)
  for i, (c, y) in enumerate(zip(ctx, cont)):
    row = ([0] if prefix_lm else []) + c + y
    n_ctx = len(row) - len(y)
    kw = {}
    if prefix_lm:  # a 4-D mask: causal, plus [0] + context attending both ways
      allowed = torch.tril(torch.ones(len(row), len(row), dtype=torch.bool))
      allowed[:n_ctx, :n_ctx] = True
      kw["attention_mask"] = allowed[None, None]
    with torch.no_grad():
      logits = hf_model(input_ids=torch.tensor([row]), **kw).logits[0]
    want, want_greedy = _ref_logprobs(logits[n_ctx - 1:len(row) - 1], y)
    assert got[i] == pytest.approx(want, abs=2e-4), (i, prefix_lm)
    assert greedy[i] == want_greedy


def test_scoring_edge_cases(tiny_llama):
  _, model, params = tiny_llama
  ctx, cont = _requests(2, n=3)
  full, _ = scoring.loglikelihood(model, params, "decoder", ctx, cont, batch_size=2)
  # Order and batch size do not change a score; an empty continuation is 0 and greedy.
  rev, _ = scoring.loglikelihood(model, params, "decoder", ctx[::-1], cont[::-1], batch_size=3)
  np.testing.assert_allclose(rev[::-1], full, atol=1e-5)
  s, g = scoring.loglikelihood(model, params, "decoder", [[5]], [[]])
  assert s[0] == 0.0 and g[0]
  # Over-long requests keep their end: the context loses its first tokens.
  long_ctx = list(range(2, 40))
  cut, _ = scoring.loglikelihood(model, params, "decoder", [long_ctx], [[7, 8]], max_length=10)
  same, _ = scoring.loglikelihood(model, params, "decoder", [long_ctx[-8:]], [[7, 8]])
  assert cut[0] == pytest.approx(same[0], abs=1e-5)
  with pytest.raises(ValueError, match="non-empty context"):
    scoring.loglikelihood(model, params, "decoder", [[]], [[3]])
  assert [scoring.bucket(n) for n in (1, 16, 17, 513, 1000, 1025, 3000)] == [16, 16, 32, 768, 1024, 1280, 3072]


# ---------------------------------------------------------------- answers and metrics on real data

@pytest.fixture(scope="module")
def eval_tasks(builtin_vocab):
  """BBH and GSM8K registered as seqio tasks (removed again afterwards)."""
  import seqio
  from flanjax.data import tasks
  from flanjax.data.collections import bbh, gsm8k
  shared_data("bbh"), shared_data("gsm8k")
  names = [tasks.register(d, builtin_vocab) for d in bbh.task_defs() + gsm8k.task_defs()]
  yield names
  for n in names:
    if n in seqio.TaskRegistry.names():
      seqio.TaskRegistry.remove(n)
    tasks.DEFS.pop(n, None)


def _junk(vocab, n=6):
  rng = np.random.default_rng(0)
  texts = [vocab.decode(rng.integers(3, vocab.vocab_size, size=25).tolist()) for _ in range(n)]
  return texts + [b"\xff\xfe\x80 not utf-8".decode("utf-8", errors="replace")]


def test_bbh_golds_score_100_and_malformed_outputs_0_through_the_harness(eval_tasks,
                                                                          builtin_vocab):
  import seqio
  from flanjax.data.collections import bbh
  from flanjax.evaluation import harness
  junk = _junk(builtin_vocab)
  for t in bbh.TASKS:
    rows = bbh.load(t)
    examples = [harness.Example(r["input"], r["target"], [], {"inputs_pretokenized": b""})
                for r in rows]
    golds = [r["target"] for r in rows]
    for name, fed_back in ((f"bbh_{t}", [f"Let's think step by step.\nStep one.\n\nSo the "
                                         f"answer is {g}." for g in golds]),
                           (f"bbh_{t}_direct", [f"{g}\n\nQ: the model goes on" for g in golds])):
      task = seqio.get_mixture_or_task(name)
      metrics, primary, _, _ = harness.score_predictions(task, examples, fed_back)
      assert primary == "exact_match" and metrics == {"exact_match": 100.0}, name
      # Empty, garbage, cut short (decoding stopped at max_decode_len), non-UTF-8 junk.
      for bad in ["", " \n", "Let's think step by step. First, the", "So the answer is",
                  "So the answer is (", "###", *junk]:
        metrics, _, _, preds = harness.score_predictions(task, examples[:40], [bad] * 40)
        assert metrics == {"exact_match": 0.0}, (name, bad, preds[:1])


def test_gsm8k_gold_rationales_score_100_and_malformed_0(eval_tasks, builtin_vocab):
  import seqio
  from flanjax.data.collections import gsm8k
  from flanjax.evaluation import harness
  task = seqio.get_mixture_or_task("gsm8k")
  examples = harness.load_examples("gsm8k", "test", builtin_vocab, input_length=512)
  assert len(examples) == 1319
  golds = [e.targets for e in examples]
  assert all("So the answer is" in g for g in golds[:50])  # the eval format is CoT
  metrics, primary, targets_pp, _ = harness.score_predictions(task, examples, golds)
  assert primary == "accuracy" and metrics == {"accuracy": 100.0}
  # The dataset's own answers ("... #### 72") and formatted numbers read the same.
  raw = gsm8k.load("test")
  with open(shared_data("gsm8k") / "test.jsonl", encoding="utf-8") as f:
    original = [json.loads(line)["answer"] for line in f]
  assert [r["answer"] for r in raw] == targets_pp
  assert harness.score_predictions(task, examples, original)[0] == {"accuracy": 100.0}
  dollars = [f"It costs ${int(t):,}.00 in all. So the answer is ${int(t):,}." if t.isdigit()
             else f"So the answer is {t}." for t in targets_pp]
  assert harness.score_predictions(task, examples, dollars)[0] == {"accuracy": 100.0}
  for bad in ["", "I do not know.", "So the answer is", *_junk(builtin_vocab, 3)]:
    assert harness.score_predictions(task, examples[:30], [bad] * 30)[0] == {"accuracy": 0.0}


def test_options_parsed_from_every_bbh_multiple_choice_input(eval_tasks):
  from flanjax.data.collections import bbh
  from flanjax.evaluation import harness
  unmatched = []
  for t in bbh.TASKS:
    for r in bbh.load(t):
      gold = bbh.extract_answer(r["target"], f"bbh_{t}_direct")
      found = harness.rank_candidates(harness.Example(r["input"], r["target"], [], {}), gold)
      if t in bbh.FREE_FORM:
        assert found is None, (t, r["input"])
        continue
      cands, idx = found
      assert cands == [f"({c})" for c in "ABCDEFGHIJKLMNOPQR"[:len(cands)]]
      if idx < 0:
        unmatched.append((t, r["target"]))
      else:
        assert cands[idx] == gold
  # BBH's own data: options split at commas ('(A) Monsters (B) Inc') and one snarks input cut
  # short leave three golds outside the options; rank classification counts them as misses.
  assert sorted(unmatched) == [("movie_recommendation", "Monsters, Inc"),
                               ("ruin_names", "dearth, wind, & fire"),
                               ("ruin_names", "rita, sue and bob poo")]
  # The other layouts of the templates, and an options feature.
  ex = harness.Example("Is 7 even or odd?\n\nOPTIONS:\n- even\n- odd", "odd", [], {})
  assert harness.rank_candidates(ex, "odd") == (["even", "odd"], 1)
  ex = harness.Example("Which is bigger?\nChoose from: 12, 40.", "40", [], {})
  assert harness.rank_candidates(ex, "40") == (["12", "40"], 1)
  ex = harness.Example("Pick one.\nOptions:\n(A) cat\n(B) dog", "dog", [], {})
  assert harness.rank_candidates(ex, "dog") == (["cat", "dog"], 1)
  assert harness.rank_candidates(ex, "(B)") == (["(A)", "(B)"], 1)
  assert harness.rank_candidates(harness.Example("q", "x", ["x", "y"], {}), "x") == (["x", "y"], 0)
  assert harness.rank_candidates(harness.Example("no options here", "x", [], {}), "x") is None


# ---------------------------------------------------------------- rank classification

def _hf_scores(hf_model, kind, ctx, cont):
  if kind == "enc_dec":
    with torch.no_grad():
      logits = hf_model(input_ids=torch.tensor([ctx]),
                        decoder_input_ids=torch.tensor([[0] + cont[:-1]])).logits[0]
    return _ref_logprobs(logits, cont)[0]
  row = ctx + cont
  with torch.no_grad():
    logits = hf_model(input_ids=torch.tensor([row])).logits[0]
  return _ref_logprobs(logits[len(ctx) - 1:len(row) - 1], cont)[0]


@pytest.mark.parametrize("kind", ["enc_dec", "decoder"])
def test_rank_classification_equals_brute_force_transformers(kind, eval_tasks, builtin_vocab):
  """BBH direct (letters) and a built-in task (option texts) on a tiny random model."""
  from flanjax.evaluation import harness
  global V
  old, V = V, 1024  # the built-in vocabulary's 1000 pieces
  try:
    hf_model, model, params = _hf_t5(3) if kind == "enc_dec" else _hf_llama(3)
  finally:
    V = old
  vocab = builtin_vocab
  for name, split in (("bbh_date_understanding_direct", "test"), ("builtin_parity", "validation")):
    import seqio
    task = seqio.get_mixture_or_task(name)
    examples = harness.load_examples(name, split, vocab, input_length=256, max_examples=3)
    golds = [harness.postprocess(task, e.targets, e.raw, True) for e in examples]
    got = harness.rank_classify(model, params, vocab, kind, examples, golds,
                                batch_size=4, input_length=256)
    assert got["examples"] == 3
    hits = 0
    for e, g, choice in zip(examples, golds, got["choices"]):
      cands, gold_idx = harness.rank_candidates(e, g)
      assert gold_idx >= 0 and len(cands) >= 2
      ids = list(vocab.encode(e.inputs))
      if kind == "enc_dec":  # inputs + EOS; the option's tokens + EOS, as seqio trains targets
        ctx, conts = ids + [vocab.eos_id], [list(vocab.encode(c)) + [vocab.eos_id] for c in cands]
      else:  # a causal LM continues the prompt with " option"
        ctx, conts = ids, [list(vocab.encode(" " + c)) for c in cands]
      scores = [_hf_scores(hf_model, kind, ctx, c) for c in conts]
      assert choice == int(np.argmax(scores)), (name, scores)
      hits += choice == gold_idx
    assert got["accuracy"] == pytest.approx(100.0 * hits / 3)


# ---------------------------------------------------------------- the command

def _tiny_t5_dir(path, vocab):
  """A random T5 saved as a Hugging Face directory with the built-in SentencePiece model."""
  import flax.linen as nn
  cfg = t5.T5Config(vocab_size=1024, d_model=32, d_ff=48, num_heads=2, d_kv=16,
                    num_encoder_layers=1, num_decoder_layers=1, relative_attention_num_buckets=8)
  model = t5.T5(cfg)
  params = nn.unbox(model.init(jax.random.PRNGKey(0), **t5.dummy_batch(1, 8, 8))["params"])
  hf.save(cfg, params, str(path), vocabulary=vocab)
  return str(path)


def test_evaluate_command_end_to_end(tmp_path, builtin_vocab):
  import glob
  import os
  import subprocess
  import sys
  shared_data("bbh"), shared_data("gsm8k")
  ckpt = _tiny_t5_dir(tmp_path / "tiny_t5", builtin_vocab)
  out = tmp_path / "report"
  tasks = "bbh_date_understanding_direct,bbh_boolean_expressions,gsm8k"
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  proc = subprocess.run(
      [sys.executable, "-m", "flanjax.evaluate", "--checkpoint", ckpt,
       "--gin_file=eval/bbh_gsm8k.gin", f"--tasks={tasks}", "--max_examples=2", f"--out={out}",
       "--gin.evaluate.input_length=384", "--gin.DecodeConfig.max_decode_len=6"],
      capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  # 3-shot BBH prompts do not fit 384 tokens of this vocabulary: said so, per task.
  assert "bbh_date_understanding_direct: the 3-shot prompt exceeds the input budget of 384" \
      in proc.stdout
  assert "eval " in proc.stdout and "ex/s" in proc.stdout and "ETA" in proc.stdout
  report = json.loads((out / "bbh_gsm8k.json").read_text())
  rows = {(r["task"], r["split"]): r for r in report["tasks"]}
  assert sorted(rows) == [("bbh_boolean_expressions", "test"),
                          ("bbh_date_understanding_direct", "test"), ("gsm8k", "test")]
  assert all(r["examples"] == 2 for r in rows.values())
  assert set(rows["gsm8k", "test"]["metrics"]) == {"accuracy"}
  assert set(rows["bbh_boolean_expressions", "test"]["metrics"]) == {"exact_match"}
  mc = rows["bbh_date_understanding_direct", "test"]
  assert mc["rank_examples"] == 2 and mc["rank_classification"] in (0.0, 50.0, 100.0)
  assert rows["bbh_boolean_expressions", "test"]["rank_classification"] is None
  assert report["decode"]["max_decode_len"] == 6 and report["input_length"] == 384
  md = (out / "bbh_gsm8k.md").read_text()
  assert "| bbh_date_understanding_direct | test | 2 | exact_match |" in md
  assert "MEAN BBH direct" in md and "MEAN (3 tasks)" in md
  assert "bbh_date_understanding_direct" in proc.stdout  # the console table
  assert glob.glob(str(out / "tensorboard" / "events.out.tfevents.*"))


def test_evaluate_errors_are_one_line(tmp_path, capsys):
  from flanjax import evaluate
  cases = [
      (["--checkpoint", str(tmp_path), "--tasks=bbh_snarkz"],
       "unknown task 'bbh_snarkz' (did you mean bbh_snarks"),
      (["--checkpoint", str(tmp_path), "--tasks=nothing_like_this_*"], "no task matches"),
      (["--tasks=gsm8k"], "no checkpoint"),
      (["--checkpoint", str(tmp_path / "absent"), "--tasks=gsm8k"], "does not exist"),
      (["--checkpoint", str(tmp_path), "--max_examples=two"], "--max_examples"),
      (["--checkpoint", str(tmp_path), "--tasks=gsm8k", "--max_examples=-1"],
       "argument --max_examples: -1 is below 1"),  # a -1 slice dropped the last example
      (["--checkpoint", str(tmp_path), "--tasks=gsm8k", "--gin.evaluate.batch_size=0"],
       "evaluate.batch_size=0: give a whole number of at least 1"),
      (["--checkpoint", str(tmp_path), "--gin.evaluate.no_such=1"], "no_such"),
  ]
  for argv, needle in cases:
    with pytest.raises(SystemExit) as e:
      evaluate.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], (argv, err)
  assert "--list_tasks" in evaluate.LIST_HINT

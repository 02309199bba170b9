"""The lm-evaluation-harness adapter: lm_eval's simple_evaluate on local task files (real GSM8K
rows) with a tiny random flanjax checkpoint; its log-likelihoods equal evaluation.scoring's."""

import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest

from conftest import REPO, shared_data

try:
  import lm_eval  # noqa: F401
  HAVE_LM_EVAL = True
except ImportError:
  HAVE_LM_EVAL = False

pytestmark = pytest.mark.skipif(
    not HAVE_LM_EVAL, reason="lm_eval is not installed (optional extra: pip install "
    "'flanjax[lm_eval]'); the adapter's test needs it")

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

MC_YAML = """\
task: flanjax_tiny_gsm8k_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""

GEN_YAML = """\
task: flanjax_tiny_gsm8k_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{number}}}}"
generation_kwargs:
  until: ["\\n\\n", "Question:"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""

ROLLING_YAML = """\
task: flanjax_tiny_gsm8k_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{question}}}}"
metric_list:
  - metric: word_perplexity
  - metric: bits_per_byte
"""


def _tiny_t5_dir(path, vocab):
  """A random T5 saved as a Hugging Face directory with the built-in SentencePiece model."""
  import flax.linen as nn
  import jax
  from flanjax.models import hf, t5
  cfg = t5.T5Config(vocab_size=1024, d_model=32, d_ff=48, num_heads=2, d_kv=16,
                    num_encoder_layers=1, num_decoder_layers=1, relative_attention_num_buckets=8)
  model = t5.T5(cfg)
  params = nn.unbox(model.init(jax.random.PRNGKey(0), **t5.dummy_batch(1, 8, 8))["params"])
  params = jax.tree.map(lambda x: np.asarray(x) * 3.0, params)  # less uniform choices
  hf.save(cfg, params, str(path), vocabulary=vocab)
  return str(path)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
  """Three lm_eval task YAMLs over a JSONL of four real GSM8K test rows."""
  rows = []
  with open(shared_data("gsm8k") / "test.jsonl", encoding="utf-8") as f:
    for line in list(f)[:4]:
      rec = json.loads(line)
      number = rec["answer"].split("####")[-1].strip()
      wrong = str(int(number.replace(",", "")) + 1)
      rows.append({"question": rec["question"], "number": number,
                   "choices": [number, wrong], "label": 0})
  d = tmp_path_factory.mktemp("lm_eval_tasks")
  data = d / "gsm8k_rows.jsonl"
  data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
  for name, text in (("mc", MC_YAML), ("gen", GEN_YAML), ("ppl", ROLLING_YAML)):
    (d / f"{name}.yaml").write_text(text.format(path=data), encoding="utf-8")
  return d


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, builtin_vocab):
  return _tiny_t5_dir(tmp_path_factory.mktemp("tiny_t5"), builtin_vocab)


def test_simple_evaluate_on_local_tasks_matches_scoring(task_dir, checkpoint, builtin_vocab,
                                                        monkeypatch):
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  from lm_eval import simple_evaluate
  from lm_eval.tasks import TaskManager
  from flanjax.evaluation import lm_eval_adapter, scoring
  lm = lm_eval_adapter.FlanjaxLM(checkpoint=checkpoint, batch_size=4, max_length=256)
  assert lm.kind.name == "enc_dec"
  out = simple_evaluate(
      model=lm, tasks=["flanjax_tiny_gsm8k_mc", "flanjax_tiny_gsm8k_gen", "flanjax_tiny_gsm8k_ppl"],
      task_manager=TaskManager(include_path=str(task_dir)), log_samples=True,
      bootstrap_iters=0)
  res = out["results"]
  assert 0.0 <= res["flanjax_tiny_gsm8k_mc"]["acc,none"] <= 1.0
  assert res["flanjax_tiny_gsm8k_gen"]["exact_match,none"] == 0.0  # random weights
  assert np.isfinite(res["flanjax_tiny_gsm8k_ppl"]["bits_per_byte,none"])

  # The harness's log-likelihoods are the scoring module's, on our own tokenization:
  # encoder = context + EOS, decoder = the continuation's tokens (lm_eval: no EOS).
  samples = out["samples"]["flanjax_tiny_gsm8k_mc"]
  assert len(samples) == 4
  ctx, cont, got = [], [], []
  for s in samples:
    for (context, continuation), resp in zip(s["arguments"], s["resps"]):
      assert continuation.startswith(" ")  # lm_eval's target delimiter
      ctx.append(list(builtin_vocab.encode(context)) + [1])
      cont.append(list(builtin_vocab.encode(continuation)))
      got.append(float(resp[0][0]))
  want, _ = scoring.loglikelihood(lm.model, lm.params, "enc_dec", ctx, cont)
  np.testing.assert_allclose(got, want, rtol=1e-5)  # batches padded differently

  # generate_until: the text is cut at the first stop string, and max_gen_toks holds.
  gen = out["samples"]["flanjax_tiny_gsm8k_gen"]
  assert len(gen) == 4
  for s in gen:
    text = s["resps"][0][0]
    assert "\n\n" not in text and "Question:" not in text
  assert {c.max_decode_len for c in lm._generators} == {6}  # pylint: disable=protected-access

  # loglikelihood_rolling: the sum over disjoint windows, each token predicted once.
  q = samples[0]["doc"]["question"]
  req = types.SimpleNamespace(args=(q,))
  whole = lm.loglikelihood_rolling([req])[0]
  tokens = list(builtin_vocab.encode(q))
  windows = lm.rolling_windows(q)
  assert sum(len(c) for _, c in windows) == len(tokens)
  ref, _ = scoring.loglikelihood(lm.model, lm.params, "enc_dec", [w[0] for w in windows],
                                 [w[1] for w in windows])
  assert whole == pytest.approx(float(np.sum(ref)), rel=1e-5)


def test_adapter_tokenization_and_stop_strings(checkpoint, builtin_vocab):
  from flanjax.evaluation import lm_eval_adapter
  lm = lm_eval_adapter.FlanjaxLM(checkpoint=checkpoint, batch_size=2, max_length=64,
                                 max_gen_toks=4)
  # Trailing spaces of the context belong to the continuation.
  assert lm.encode_pair("Answer: ", "42") == lm.encode_pair("Answer:", " 42")
  assert lm_eval_adapter.cut_at("12\n\nQuestion: x", ["Question:", "\n\n"]) == "12"
  assert lm_eval_adapter.cut_at("no stop here", ["###"]) == "no stop here"
  req = types.SimpleNamespace(args=("Question: 2 + 2?\nAnswer:",
                                    {"until": ["\n"], "max_gen_toks": 3}))
  text = lm.generate_until([req])[0]
  assert "\n" not in text
  cfg, gen = next(iter(lm._generators.items()))  # pylint: disable=protected-access
  assert cfg.method == "greedy" and cfg.max_decode_len == 3
  new = gen.generate_ids([lm.prompt_ids(req.args[0])])[0]
  assert len(new) <= 3
  assert text == lm_eval_adapter.cut_at(builtin_vocab.decode(new), ["\n"])


def test_command_line_runs_a_local_task(task_dir, checkpoint, tmp_path):
  env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TF_CPP_MIN_LOG_LEVEL="3")
  proc = subprocess.run(
      [sys.executable, "-m", "flanjax.evaluation.lm_eval_adapter",
       "--model_args", f"checkpoint={checkpoint},batch_size=4,max_length=256",
       "--include_path", str(task_dir), "--tasks", "flanjax_tiny_gsm8k_mc",
       "--output_path", str(tmp_path / "out")],
      capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "flanjax_tiny_gsm8k_mc" in proc.stdout and "acc" in proc.stdout

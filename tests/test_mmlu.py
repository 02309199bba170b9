"""MMLU: the 57 subjects and their categories, the prompt of the paper and lm-evaluation-harness
(byte for byte, against lm_eval's own mmlu task run offline on the same rows), per-example
log-likelihoods equal to lm_eval's through the harness's rank classification, the report's
category means over examples, and the eval-only guard."""

import csv
import json
import os

import numpy as np
import pytest

from conftest import shared_data
from flanjax.data.collections import mmlu
from flanjax.errors import UserError

try:
  import lm_eval  # noqa: F401
  HAVE_LM_EVAL = True
except ImportError:
  HAVE_LM_EVAL = False

# Three subjects with short 5-shot prompts, from three categories.
SUBJECTS = ("abstract_algebra", "world_religions", "management")
INPUT_LENGTH = 2048


def _rows(subject, split):
  with open(shared_data("mmlu") / split / f"{subject}_{split}.csv", encoding="utf-8",
            newline="") as f:
    return list(csv.DictReader(f))


# ---------------------------------------------------------------- no data needed

def test_subjects_and_categories_are_the_papers():
  assert len(mmlu.SUBJECTS) == 57 and len(set(mmlu.SUBJECTS)) == 57
  counts = {c: sum(v == c for v in mmlu.CATEGORIES.values()) for c in mmlu.CATEGORY_NAMES}
  assert counts == {"stem": 19, "humanities": 13, "social_sciences": 12, "other": 13}
  assert mmlu.summary_groups("mmlu_college_physics") == ["MMLU", "MMLU STEM"]
  assert mmlu.summary_groups("mmlu_0shot_sociology") == ["MMLU 0-shot", "MMLU 0-shot social sciences"]
  assert mmlu.summary_groups("bbh_snarks") == mmlu.summary_groups("mmlu_nonsense") == []


@pytest.mark.skipif(not HAVE_LM_EVAL, reason="lm_eval is not installed (optional extra "
                    "'flanjax[lm_eval]'); its mmlu task files give the category of each subject")
def test_categories_equal_lm_evals_mmlu_groups():
  import glob
  import yaml
  folder = os.path.join(os.path.dirname(lm_eval.__file__), "tasks", "mmlu", "default")
  theirs = {}
  for path in glob.glob(os.path.join(folder, "mmlu_*.yaml")):
    with open(path, encoding="utf-8") as f:
      cfg = yaml.safe_load(f)
    theirs[cfg["dataset_name"]] = cfg["tag"][len("mmlu_"):-len("_tasks")]
  assert theirs == mmlu.CATEGORIES


def test_prompt_format_and_answer_reading():
  ex = dict(question="  What is 2 + 2?\n", choices=["3", " 4", "5", "22"], answer="B")
  shot = dict(question="Pick one.", choices=["a", "b", "c", "d"], answer="D")
  assert mmlu.prompt("high_school_mathematics", ex, [shot]) == (
      "The following are multiple choice questions (with answers) about high school "
      "mathematics.\n\nPick one.\nA. a\nB. b\nC. c\nD. d\nAnswer: D\n\n"
      "What is 2 + 2?\nA. 3\nB.  4\nC. 5\nD. 22\nAnswer:")
  for text, letter in ((" B", "B"), ("C. 5", "C"), ("(D)", "D"), ("A\nB", "A"), ("", ""),
                       ("none of them", ""), (b" A", "A"), (None, "")):
    assert mmlu.extract_letter(text) == letter, text
  assert mmlu.accuracy(["A", "B"], ["A", ""]) == {"accuracy": 50.0}


def test_report_gives_category_and_overall_means_over_examples():
  from flanjax.evaluation import report
  def result(task, n, acc, rank):
    return report.TaskResult(task=task, split="test", examples=n, metrics={"accuracy": acc},
                             primary="accuracy", rank_classification=rank, rank_examples=n)
  rs = [result("mmlu_anatomy", 10, 50.0, 20.0), result("mmlu_virology", 30, 10.0, 40.0),
        result("mmlu_philosophy", 60, 0.0, 80.0)]
  rows = {r["group"]: r for r in report.summary_rows(rs)}
  assert rows["MMLU STEM"]["rank_classification"] == 20.0
  assert rows["MMLU other"]["examples"] == 30
  assert rows["MMLU humanities"]["rank_classification"] == 80.0
  assert rows["MMLU"]["mean_over"] == "examples" and rows["MMLU"]["tasks"] == 3
  assert rows["MMLU"]["rank_classification"] == pytest.approx((200 + 1200 + 4800) / 100)
  assert rows["MMLU"]["score"] == pytest.approx((500 + 300) / 100)
  assert rows["all"]["mean_over"] == "tasks"
  assert rows["all"]["rank_classification"] == pytest.approx(140.0 / 3)
  table = report.format_results(rs)
  assert "MEAN MMLU STEM (1 task, over examples)" in table
  assert "eval/mean_mmlu_humanities/test/rank_classification" in report.scalars(rs)


def test_malformed_files_name_file_and_line(tmp_path, monkeypatch):
  monkeypatch.setenv("FLANJAX_DATA_DIR", str(tmp_path))
  (tmp_path / "mmlu" / "test").mkdir(parents=True)
  path = tmp_path / "mmlu" / "test" / "anatomy_test.csv"
  path.write_text("question,choice0,choice1,choice2,choice3,answer\nQ?,a,b,c,d,4\n")
  with pytest.raises(UserError, match=r"anatomy_test.csv:2: answer '4' is not the index 0-3"):
    mmlu.load("anatomy")
  path.write_text("q,a,b\n")
  with pytest.raises(UserError, match=r"anatomy_test.csv:1: header"):
    mmlu.load("anatomy")
  with pytest.raises(UserError, match="no MMLU subject 'anatomyy'"):
    mmlu.load("anatomyy")
  with pytest.raises(UserError, match="mmlu/dev/anatomy_dev.csv does not exist"):
    mmlu.load("anatomy", "dev")


# ---------------------------------------------------------------- real data

@pytest.fixture(scope="module")
def tasks_with_builtin_vocab(builtin_vocab):
  shared_data("mmlu")
  from flanjax.data import registry
  registry.register_all(builtin_vocab, input_length=INPUT_LENGTH)
  return builtin_vocab


def test_tasks_are_registered_rendered_from_the_files_and_never_train(tasks_with_builtin_vocab):
  from flanjax.data import mixtures, registry
  from flanjax.evaluation import examples
  vocab = tasks_with_builtin_vocab
  names = set(registry.list_tasks())
  assert {f"mmlu_{s}" for s in mmlu.SUBJECTS} <= names
  assert {f"mmlu_0shot_{s}" for s in mmlu.SUBJECTS} <= names
  assert [t.name for t in registry.get_task_or_mixture("mmlu").tasks] == list(mmlu.FIVE_SHOT_TASKS)
  assert len(registry.get_task_or_mixture("mmlu_0shot").tasks) == 57
  for bad in (["mmlu_anatomy", "builtin_parity"], ["mmlu"]):
    with pytest.raises(UserError, match="would train on evaluation-only data: mmlu_"):
      mixtures.add_mixture("no_mmlu_in_training", bad)
  assert sum(len(mmlu.load(s)) for s in mmlu.SUBJECTS) == 14042

  subject = "abstract_algebra"
  dev, test = _rows(subject, "dev"), _rows(subject, "test")
  five = examples.load_examples(f"mmlu_{subject}", "test", vocab, INPUT_LENGTH, 2)
  zero = examples.load_examples(f"mmlu_0shot_{subject}", "test", vocab, INPUT_LENGTH, 2)
  def block(r):
    return (r["question"].strip() + "".join(f"\n{'ABCD'[i]}. {r[f'choice{i}']}" for i in range(4))
            + "\nAnswer:")
  head = "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
  shots = "".join(f"{block(r)} {'ABCD'[int(r['answer'])]}\n\n" for r in dev)
  for i in range(2):
    assert five[i].inputs == head + shots + block(test[i])
    assert zero[i].inputs == head + block(test[i])
    assert five[i].targets == zero[i].targets == "ABCD"[int(test[i]["answer"])]
    assert five[i].options == ["A", "B", "C", "D"]
    assert examples.rank_candidates(five[i], five[i].targets) == (
        ["A", "B", "C", "D"], int(test[i]["answer"]))


def test_five_shot_prompts_that_do_not_fit_lose_exemplars(tasks_with_builtin_vocab, capsys):
  from flanjax.evaluation import examples
  vocab = tasks_with_builtin_vocab
  subject = "high_school_european_history"  # 5-shot prompts up to ~14,500 characters
  got = examples.load_examples(f"mmlu_{subject}", "test", vocab, 1024, 1)[0]
  assert len(vocab.encode(got.inputs)) + 1 <= 1024
  assert got.inputs.startswith(mmlu.header(subject)) and got.inputs.endswith("\nAnswer:")
  assert got.inputs.count("\nAnswer: ") < 5
  assert f"mmlu_{subject}: the 5-shot prompt exceeds the input budget of 1024 tokens" \
      in capsys.readouterr().out


# ---------------------------------------------------------------- a tiny Llama with a
# byte-level BPE tokenizer.json: lm_eval's causal-LM conventions and the harness's agree

def _tiny_llama_dir(path):
  """A random flanjax Llama saved as a Hugging Face folder with a BPE tokenizer.json."""
  import flax.linen as nn
  import jax
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  from flanjax.data import hf_vocab
  from flanjax.models import decoder, hf, kinds
  texts = []
  for s in SUBJECTS:
    for split in ("dev", "test"):
      texts += [" ".join(r.values()) for r in _rows(s, split)[:8]]
  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(texts + [mmlu.header(s) for s in SUBJECTS], trainers.BpeTrainer(
      vocab_size=500, special_tokens=["<pad>", "</s>", "<unk>", "<s>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  # Llama's way: the tokenizer starts every text with BOS.
  tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 3)])
  os.makedirs(path, exist_ok=True)
  tok.save(os.path.join(path, "tokenizer.json"))
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "</s>",
               "bos_token": "<s>", "pad_token": "<pad>", "unk_token": "<unk>"}, f)
  vocab = hf_vocab.HFTokenizerVocabulary.from_directory(path)
  cfg = decoder.DecoderConfig(vocab_size=512, d_model=32, d_ff=64, num_layers=2, num_heads=4,
                              num_kv_heads=2, head_dim=8, max_position=INPUT_LENGTH + 8)
  model = kinds.DECODER.build(cfg)
  params = nn.unbox(model.init(jax.random.PRNGKey(0), **kinds.DECODER.dummy_batch())["params"])
  params = jax.tree.map(lambda x: np.asarray(x) * 4.0, params)  # choices far from uniform
  hf.save(cfg, params, path, vocabulary=vocab)
  return path


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
  shared_data("mmlu")
  from flanjax.data import tasks as task_lib
  from flanjax.models import loading
  path = _tiny_llama_dir(str(tmp_path_factory.mktemp("tiny_llama_mmlu")))
  loaded = loading.load(path)
  assert loaded.kind.name == "decoder"
  # Only these tasks, with this vocabulary: others keep their registration.
  for d in mmlu.task_defs():
    if mmlu.subject_of(d.name)[0] in SUBJECTS:
      task_lib.register(d, loaded.vocab, INPUT_LENGTH)
  return path, loaded


def test_suite_reports_subjects_categories_and_overall(tiny_llama):
  from flanjax import decoding
  from flanjax.evaluation import harness, report
  _, loaded = tiny_llama
  results = harness.evaluate_suite(
      loaded.model, loaded.params, loaded.vocab, loaded.kind, [f"mmlu_{s}" for s in SUBJECTS],
      input_length=INPUT_LENGTH, max_examples=2, batch_size=4, progress_every_secs=None,
      log=lambda _: None, decode=decoding.DecodeConfig(max_decode_len=2))
  assert [(r.task, r.examples, r.rank_examples) for r in results] == [
      (f"mmlu_{s}", 2, 2) for s in SUBJECTS]
  assert all(r.primary == "accuracy" and r.rank_classification in (0.0, 50.0, 100.0)
             for r in results)
  rows = {s["group"]: s for s in report.summary_rows(results)}
  assert set(rows) == {"MMLU", "MMLU STEM", "MMLU humanities", "MMLU other", "all"}
  assert rows["MMLU"]["examples"] == 6
  assert rows["MMLU"]["rank_classification"] == pytest.approx(
      np.mean([r.rank_classification for r in results]))  # equal sizes: the same mean
  # generate=False (lm_eval's protocol, faster): the best-scored letter is the answer.
  ranked_only = harness.evaluate_suite(
      loaded.model, loaded.params, loaded.vocab, loaded.kind, [f"mmlu_{s}" for s in SUBJECTS],
      input_length=INPUT_LENGTH, max_examples=2, batch_size=4, progress_every_secs=None,
      log=lambda _: None, generate=False, keep_examples=2)
  for r, r2 in zip(results, ranked_only):
    assert r2.rank_classification == r.rank_classification
    assert r2.metrics["accuracy"] == pytest.approx(r2.rank_classification)
    assert [k["prediction"] for k in r2.examples_kept] == [
        k["rank_choice"] for k in r2.examples_kept]


LM_EVAL_YAML = """\
include: {include}
task: flanjax_parity_{name}
tag: flanjax_parity
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files:
    test: {test}
    dev: {dev}
num_fewshot: {shots}
"""


def _run_lm_evals_mmlu(lm, plan, tmp_path, limit):
  """lm_eval's own mmlu task configs, their dataset read from the same rows as JSON;
  plan: subject -> (shots, _). Returns simple_evaluate's output with the samples."""
  from lm_eval import simple_evaluate
  from lm_eval.tasks import TaskManager
  their_dir = os.path.join(os.path.dirname(lm_eval.__file__), "tasks", "mmlu", "default")
  for subject, (shots, _) in plan.items():
    for split in ("dev", "test"):  # cais/mmlu's fields: question, subject, choices, answer
      rows = [dict(question=r["question"], subject=subject,
                   choices=[r[f"choice{i}"] for i in range(4)], answer=int(r["answer"]))
              for r in _rows(subject, split)]
      (tmp_path / f"{subject}_{split}.jsonl").write_text(
          "".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (tmp_path / f"{subject}.yaml").write_text(LM_EVAL_YAML.format(
        include=os.path.join(their_dir, f"mmlu_{subject}.yaml"), name=subject, shots=shots,
        test=tmp_path / f"{subject}_test.jsonl", dev=tmp_path / f"{subject}_dev.jsonl"))
  return simple_evaluate(model=lm, tasks=[f"flanjax_parity_{s}" for s in plan],
                         task_manager=TaskManager(include_path=str(tmp_path)), log_samples=True,
                         bootstrap_iters=0, limit=limit)


@pytest.mark.skipif(not HAVE_LM_EVAL, reason="lm_eval is not installed (optional extra: pip "
                    "install 'flanjax[lm_eval]'); the parity test runs its mmlu task")
def test_prompts_and_loglikelihoods_equal_lm_evals_mmlu(tiny_llama, tmp_path, monkeypatch):
  """lm_eval's own mmlu task configs (dataset read from the same rows as JSON), 5-shot and
  zero-shot, through the flanjax adapter; against our tasks through rank classification."""
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  from flanjax.evaluation import examples, harness, lm_eval_adapter, scoring
  path, loaded = tiny_llama
  plan = {"abstract_algebra": (5, 3), "world_religions": (5, 3), "management": (0, 2)}
  lm = lm_eval_adapter.FlanjaxLM(checkpoint=path, batch_size=4, max_length=INPUT_LENGTH)
  out = _run_lm_evals_mmlu(lm, plan, tmp_path, limit=3)
  model, params, vocab, kind = loaded.model, loaded.params, loaded.vocab, loaded.kind
  for subject, (shots, n) in plan.items():
    samples = sorted(out["samples"][f"flanjax_parity_{subject}"], key=lambda s: s["doc_id"])
    assert len(samples) >= n
    name = f"mmlu_{subject}" if shots else f"mmlu_0shot_{subject}"
    ours = examples.load_examples(name, "test", vocab, INPUT_LENGTH, len(samples))
    golds = [e.targets for e in ours]
    ranked = harness.rank_classify(model, params, vocab, kind, ours, golds, batch_size=4,
                                   input_length=INPUT_LENGTH)
    for s, e, choice in zip(samples, ours, ranked["choices"]):
      contexts = {a[0] for a in s["arguments"]}
      assert contexts == {e.inputs}, (subject, s["doc_id"])  # byte for byte
      assert e.inputs.count("\nAnswer: ") == shots
      cands, gold = examples.rank_candidates(e, e.targets)
      assert [a[1] for a in s["arguments"]] == [" " + c for c in cands]  # lm_eval's " A".." D"
      assert gold == s["target"]
      # What rank classification scores: the harness's requests for these candidates.
      ctx = kind.prompt_ids(vocab, e.inputs)
      assert ctx[0] == vocab.bos_id  # as lm_eval's causal LMs start
      ll, _ = scoring.loglikelihood(model, params, kind, [ctx] * 4,
                                    [harness.option_ids(kind, vocab, c, e.inputs, eos=False)
                                     for c in cands],
                                    batch_size=4, max_length=kind.score_length(INPUT_LENGTH))
      theirs = [float(r[0][0]) for r in s["resps"]]
      np.testing.assert_allclose(ll, theirs, rtol=1e-5, atol=1e-5)
      assert choice == int(np.argmax(theirs))
      assert s["acc"] == float(choice == gold)


@pytest.mark.skipif(not HAVE_LM_EVAL, reason="lm_eval is not installed (optional extra: pip "
                    "install 'flanjax[lm_eval]'); the parity test runs its mmlu task")
def test_t5_loglikelihoods_equal_lm_evals_seq2seq_path(tmp_path, monkeypatch):
  """A random T5 (our export, a T5-style Unigram SentencePiece model that transformers'
  tokenizer reads identically) through lm_eval's HFLM with backend seq2seq on its own mmlu
  task files: every candidate's log-likelihood in our rank classification equals lm_eval's
  (the letter " A" without EOS, the context with it)."""
  import io
  import flax.linen as nn
  import jax
  import seqio
  import sentencepiece as spm
  from lm_eval.models.huggingface import HFLM
  from flanjax.evaluation import examples, harness
  from flanjax.models import hf, kinds, loading, t5
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  plan = {"abstract_algebra": (5, 2), "management": (5, 2), "world_religions": (0, 2)}
  texts = [" ".join(r.values()) for s in plan for sp in ("dev", "test") for r in _rows(s, sp)]
  buf = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(texts + [mmlu.header(s) for s in plan]), model_writer=buf,
      vocab_size=600, model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
      character_coverage=1.0, minloglevel=2)
  (tmp_path / "sp.model").write_bytes(buf.getvalue())
  # Tied embeddings (original T5): lm_eval ties a loaded model's weights (tie_weights()),
  # and transformers 5 reads an exported untied T5's config as tied.
  cfg = t5.T5Config(vocab_size=640, d_model=32, d_kv=8, d_ff=48, num_heads=4,
                    num_encoder_layers=2, num_decoder_layers=2, tie_word_embeddings=True)
  model = kinds.ENC_DEC.build(cfg)
  params = nn.unbox(model.init(jax.random.PRNGKey(0), **kinds.ENC_DEC.dummy_batch())["params"])
  params = jax.tree.map(lambda x: np.asarray(x) * 3.0, params)  # choices far from uniform
  path = str(tmp_path / "t5")
  hf.save(cfg, params, path, vocabulary=seqio.SentencePieceVocabulary(str(tmp_path / "sp.model")))
  loaded = loading.load(path)
  assert loaded.kind is kinds.ENC_DEC
  lm = HFLM(pretrained=path, backend="seq2seq", batch_size=4, max_length=INPUT_LENGTH,
            device="cpu")
  out = _run_lm_evals_mmlu(lm, plan, tmp_path, limit=2)
  for subject, (shots, n) in plan.items():
    for d in mmlu.task_defs():  # registered (with this vocabulary) if no other test did
      if d.name == (f"mmlu_{subject}" if shots else f"mmlu_0shot_{subject}"):
        from flanjax.data import tasks as task_lib
        if d.name not in task_lib.DEFS:
          task_lib.register(d, loaded.vocab, INPUT_LENGTH)
        name = d.name
    samples = sorted(out["samples"][f"flanjax_parity_{subject}"], key=lambda s: s["doc_id"])
    ours = examples.load_examples(name, "test", loaded.vocab, INPUT_LENGTH, n)
    ranked = harness.rank_classify(loaded.model, loaded.params, loaded.vocab, loaded.kind, ours,
                                   [e.targets for e in ours], batch_size=4,
                                   input_length=INPUT_LENGTH, continuation_eos=False)
    assert len(samples) == n
    for s, e, choice, scores in zip(samples, ours, ranked["choices"], ranked["scores"]):
      assert {a[0] for a in s["arguments"]} == {e.inputs}
      cands, gold = examples.rank_candidates(e, e.targets)
      ctx = loaded.kind.prompt_ids(loaded.vocab, e.inputs)
      assert ctx[-1] == loaded.vocab.eos_id  # as lm_eval's T5 tokenizer closes the context
      from flanjax.evaluation import scoring
      ll, _ = scoring.loglikelihood(
          loaded.model, loaded.params, loaded.kind, [ctx] * 4,
          [harness.option_ids(loaded.kind, loaded.vocab, c, e.inputs, eos=False) for c in cands],
          batch_size=4, max_length=loaded.kind.score_length(INPUT_LENGTH))
      theirs = [float(r[0][0]) for r in s["resps"]]
      np.testing.assert_allclose(ll, theirs, rtol=1e-4, atol=1e-4)
      # Rank classification's own numbers (one encoder pass for the four letters) too.
      np.testing.assert_allclose(scores, theirs, rtol=1e-4, atol=1e-4)
      assert choice == int(np.argmax(theirs)) and s["acc"] == float(choice == gold)
      # With EOS after the letter (how T5 was scored before), the numbers are not lm_eval's.
      with_eos, _ = scoring.loglikelihood(
          loaded.model, loaded.params, loaded.kind, [ctx] * 4,
          [harness.option_ids(loaded.kind, loaded.vocab, c, e.inputs) for c in cands],
          batch_size=4, max_length=loaded.kind.score_length(INPUT_LENGTH))
      assert np.max(np.abs(np.asarray(with_eos) - theirs)) > 1e-3


def test_a_long_majority_answer_is_shortened_in_the_table():
  from flanjax.evaluation import report
  answer = "A very long reference answer, as open-ended tasks have. " * 40
  r = report.TaskResult(task="lima", split="validation", examples=5, metrics={"accuracy": 0.0},
                        primary="accuracy", baseline=20.0, baseline_answer=answer)
  row = next(line for line in report.format_results([r]).splitlines() if line.startswith("lima"))
  assert len(row) < 200 and "('A very long reference answer, as open...')" in row

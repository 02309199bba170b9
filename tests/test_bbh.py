"""BIG-Bench Hard on the real files in ../shared/data/bbh: prompts, rendering, scoring, guard."""

import functools
import json

import pytest
import seqio

from conftest import shared_data
from flanjax.data import mixtures, tasks
from flanjax.data.collections import bbh
from flanjax.errors import UserError


@pytest.fixture(scope="module")
def bbh_dir():
  return shared_data("bbh")


@pytest.fixture(scope="module")
def defs(bbh_dir):
  return {d.name: d for d in bbh.task_defs()}


def published_prompt(bbh_dir, task):
  """The prompt text as published: everything after the '-----' line (read independently)."""
  lines = (bbh_dir / "cot-prompts" / f"{task}.txt").read_text(encoding="utf-8").split("\n")
  return "\n".join(lines[lines.index("-----") + 1:]).strip()


def score(defn, targets, predictions):
  post = defn.postprocess_fn
  return defn.metric_fns[0]([post(t, example=None, is_target=True) for t in targets],
                            [post(p, example=None, is_target=False) for p in predictions])


def test_all_27_tasks_and_6511_examples(bbh_dir, defs):
  assert sorted(p.stem for p in (bbh_dir / "tasks").glob("*.json")) == list(bbh.TASKS)
  assert sorted(p.stem for p in (bbh_dir / "cot-prompts").glob("*.txt")) == list(bbh.TASKS)
  assert len(bbh.TASKS) == 27
  counts = {t: len(bbh.load(t)) for t in bbh.TASKS}
  assert sum(counts.values()) == 6511
  assert counts["penguins_in_a_table"] == 146 and counts["causal_judgement"] == 187
  assert len(defs) == 54
  for t in bbh.TASKS:
    for name in (f"bbh_{t}", f"bbh_{t}_direct"):
      d = defs[name]
      assert list(d.splits) == ["test"]
      assert d.is_eval_only("test") and d.is_eval_only("train")
  # Every published prompt has 3 exemplars, each closing with an answer of the task's kind.
  for t in bbh.TASKS:
    p = bbh.prompt(t)
    assert len(p.exemplars) == 3 and p.description, t
    for e in p.exemplars:
      assert e.solution.startswith(bbh.COT_TRIGGER)
      assert (bbh.extract_answer(e.answer, t + "_direct") == e.answer
              if t in bbh.MULTIPLE_CHOICE else "(" not in e.answer), (t, e.answer)


@pytest.mark.parametrize("task", bbh.TASKS)
def test_gold_answers_score_100(defs, task):
  golds = [ex["target"] for ex in bbh.load(task)]
  cot = [f"Let's think step by step. Some reasoning. So the answer is {g}." for g in golds]
  assert score(defs[f"bbh_{task}"], golds, cot) == {"exact_match": 100.0}
  assert score(defs[f"bbh_{task}_direct"], golds, golds) == {"exact_match": 100.0}
  # A direct answer followed by the model's continuation still reads as the answer.
  assert score(defs[f"bbh_{task}_direct"], golds, [g + "\n\nQ: next" for g in golds]) \
      == {"exact_match": 100.0}
  # The bare reference, read as a CoT output, is still itself (how the evaluator reads targets).
  assert score(defs[f"bbh_{task}"], golds, golds) == {"exact_match": 100.0}


def test_multiple_choice_normalisation():
  for text in ["So the answer is (B).", "So the answer is (B) 12/25/1937.", "So the answer is B.",
               "So the answer is B) 12/25/1937.", "blah. So the answer is: (B)\nQ: more"]:
    assert bbh.extract_answer(text, "bbh_date_understanding") == "(B)", text
  for text in ["(B)", "B", "B.", "(B) 12/25/1937", "B) 12/25/1937", " (B)\n\nQ: next"]:
    assert bbh.extract_answer(text, "bbh_date_understanding_direct") == "(B)", text
  # A sentence starting with a capital letter is no option letter.
  assert bbh.extract_answer("A bird.", "date_understanding_direct") == "A bird"
  # Three MC examples in the data have free-text golds (options split on commas).
  assert bbh.extract_answer("So the answer is Monsters, Inc.", "movie_recommendation") \
      == "Monsters, Inc"
  # Not MC: a letter stays a letter.
  assert bbh.extract_answer("So the answer is B.", "web_of_lies") == "B"


def test_malformed_outputs_score_zero(defs):
  bad = ["", "   ", "\n\n", "Let's think step by step. The expression is hard.",
         "So the answer is", "So the answer is .", b"\xff\xfe\x00\x81", "\x00\ufffd\ud800 garbage",
         None, 42, "True or False", "So the answer is true.", "So the answer is TRUE."]
  d = defs["bbh_boolean_expressions"]
  assert score(d, ["True"] * len(bad), bad) == {"exact_match": 0.0}
  assert score(defs["bbh_boolean_expressions_direct"], ["True"] * len(bad), bad) \
      == {"exact_match": 0.0}
  # Case as the gold is written: yes/no, Yes/No, valid/invalid.
  assert score(defs["bbh_sports_understanding"], ["yes"], ["So the answer is Yes."])["exact_match"] == 0
  assert score(defs["bbh_causal_judgement"], ["Yes"], ["So the answer is yes."])["exact_match"] == 0
  assert score(defs["bbh_formal_fallacies"], ["invalid"], ["So the answer is valid."])["exact_match"] == 0
  for text in bad:  # no option letter out of nothing
    assert bbh.extract_answer(text, "bbh_date_understanding") not in [f"({c})" for c in "ABCDEF"]
  assert bbh.exact_match([], []) == {"exact_match": 0.0}
  # An empty extraction never matches, even an (impossible) empty reference.
  assert bbh.exact_match([""], [""]) == {"exact_match": 0.0}
  with pytest.raises(UserError, match="no BBH task 'nope'"):
    bbh.extract_answer("x", "bbh_nope")


@pytest.mark.parametrize("task", bbh.TASKS)
def test_cot_and_direct_inputs(bbh_dir, defs, task):
  published = published_prompt(bbh_dir, task)
  ex = bbh.load(task)[0]
  cot = tasks.render_split(defs[f"bbh_{task}"], "test", limit=2)
  assert cot[0]["inputs"] == f"{published}\n\nQ: {ex['input']}\nA: Let's think step by step."
  assert cot[0]["targets"] == ex["target"] == cot[0]["answer"]

  direct = tasks.render_split(defs[f"bbh_{task}_direct"], "test", limit=2)[0]
  text = direct["inputs"]
  assert text.endswith(f"\n\nQ: {ex['input']}\nA:") and direct["targets"] == ex["target"]
  assert text.startswith(published.split("\n\nQ: ")[0] + "\n\nQ: ")  # the task description
  assert "step by step" not in text and "So the answer is" not in text
  shots = text.split("\n\nQ: ")[1:-1]
  assert len(shots) == 3
  p = bbh.prompt(task)
  for shot, e in zip(shots, p.exemplars):
    assert shot == f"{e.question}\nA: {e.answer}"
    assert f"Q: {e.question}\nA: Let's think step by step." in published
    assert published.count(f"So the answer is {e.answer}.") >= 1


def test_exemplars_dropped_first_first_when_the_prompt_does_not_fit(bbh_dir, defs, capsys):
  d = defs["bbh_snarks"]
  ex = bbh.load("snarks")[0]
  full, _ = d.render_fn(ex, 0, "test", None)
  two, target = d.render_fn(ex, 0, "test", lambda s: len(s) < len(full))
  p = bbh.prompt("snarks")
  assert two == "\n\n".join([p.description, p.exemplars[1].block, p.exemplars[2].block,
                             f"Q: {ex['input']}\nA: Let's think step by step."])
  assert target == ex["target"]
  assert "3-shot prompt exceeds the input budget" in capsys.readouterr().out
  none, _ = d.render_fn(ex, 0, "test", lambda s: False)
  assert none == f"{p.description}\n\nQ: {ex['input']}\nA: Let's think step by step."


def _write(tmp_path, name, text):
  path = tmp_path / name
  path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
  return str(path)


def test_prompt_files_parsed_robustly_and_malformed_ones_named(bbh_dir, tmp_path):
  original = (bbh_dir / "cot-prompts" / "navigate.txt").read_text(encoding="utf-8")
  want = bbh.prompt("navigate")
  # Windows line ends, a trailing newline, and a copy without canary and separator.
  crlf = bbh.parse_prompt(_write(tmp_path, "crlf.txt", original.replace("\n", "\r\n") + "\r\n"))
  bare = bbh.parse_prompt(_write(tmp_path, "bare.txt", published_prompt(bbh_dir, "navigate")))
  for p in (crlf, bare):
    assert (p.text, p.description, p.exemplars) == (want.text, want.description, want.exemplars)
  # The exemplar's answer is its last answer phrase.
  twice = original.replace(" So the answer is No.", " So the answer is unclear so far.\nSo the "
                           "answer is No.", 1)
  assert bbh.parse_prompt(_write(tmp_path, "twice.txt", twice)).exemplars[0].answer == "No"

  head, _, body = original.partition("-----\n")
  cases = {
      "no_separator.txt": head + body,
      "empty_body.txt": head + "-----\n\n",
      "no_exemplars.txt": head + "-----\nJust a description.\n",
      "no_answer_line.txt": head + "-----\nDesc.\n\nQ: a question with no answer\n",
      "no_closing.txt": original.rsplit(" So the answer is", 1)[0] + " and that is all.",
      "not_utf8.txt": original.encode("utf-8") + b"\n\xff\xfe",
  }
  for name, text in cases.items():
    path = _write(tmp_path, name, text)
    with pytest.raises(UserError, match="malformed BBH prompt file") as e:
      bbh.parse_prompt(path)
    assert path in str(e.value), name
  missing = str(tmp_path / "missing.txt")
  with pytest.raises(UserError, match="does not exist") as e:
    bbh.parse_prompt(missing)
  assert missing in str(e.value)


def test_missing_data_is_a_clear_error_and_definitions_need_no_files(tmp_path, monkeypatch):
  monkeypatch.setenv("FLANJAX_DATA_DIR", str(tmp_path))
  defs = {d.name: d for d in bbh.task_defs()}  # no file is read here
  assert len(defs) == 54
  with pytest.raises(UserError, match="bbh/cot-prompts/snarks.txt does not exist"):
    defs["bbh_snarks"].render_fn({"input": "q", "target": "(A)"}, 0, "test", None)
  with pytest.raises(UserError, match="bbh/tasks/web_of_lies.json does not exist"):
    bbh.load("web_of_lies")
  (tmp_path / "bbh" / "tasks").mkdir(parents=True)
  (tmp_path / "bbh" / "tasks" / "navigate.json").write_text(
      json.dumps({"examples": [{"input": "q", "target": ""}]}))
  with pytest.raises(UserError, match=r"navigate.json examples\[0\]: 'target' is empty"):
    bbh.load("navigate")
  # A task file cut short names its line and the fix; one in another encoding its offset.
  (tmp_path / "bbh" / "tasks" / "snarks.json").write_text('{"examples": [\n{"input": "q",')
  with pytest.raises(UserError, match=r"snarks.json:2: not valid JSON \(.*\); restore the file "
                                      "from the BIG-Bench-Hard repository$"):
    bbh.load("snarks")
  (tmp_path / "bbh" / "tasks" / "sports_understanding.json").write_bytes(
      '{"examples": [{"input": "caf\u00e9", "target": "yes"}]}'.encode("latin-1"))
  with pytest.raises(UserError, match=r"sports_understanding.json: bytes that are not UTF-8 at "
                                      "offset 28; re-encode the file as UTF-8$"):
    bbh.load("sports_understanding")


@pytest.fixture
def registered(defs, builtin_vocab):
  names = [tasks.register(d, builtin_vocab) for d in defs.values()]
  yield names
  for n in names:
    if n in seqio.TaskRegistry.names():
      seqio.TaskRegistry.remove(n)
    tasks.DEFS.pop(n, None)


def test_registered_dataset_and_eval_only_guard(registered, bbh_dir):
  assert len(registered) == 54
  for name in ("bbh_boolean_expressions", "bbh_web_of_lies_direct"):
    task = seqio.get_mixture_or_task(name)
    assert list(task.splits) == ["test"]
    rows = list(task.get_dataset(None, split="test", shuffle=False, num_epochs=1,
                                 use_cached=False).as_numpy_iterator())
    examples = bbh.load(name[4:].replace("_direct", ""))
    assert len(rows) == len(examples) == 250
    vocab = task.output_features["inputs"].vocabulary
    for row, ex in zip(rows[:5], examples):
      inputs = row["inputs_pretokenized"].decode()
      assert row["targets_pretokenized"].decode() == ex["target"]
      assert f"Q: {ex['input']}\nA:" in inputs
      assert vocab.decode(row["targets"].tolist()[:-1]) == ex["target"]
      assert len(row["inputs"]) <= tasks.DEFS[name].input_length
    post = functools.partial(task.postprocess_fn, example=None)
    assert post(f"So the answer is {examples[0]['target']}.", is_target=False) \
        == post(examples[0]["target"], is_target=True)

  with pytest.raises(UserError, match="bbh_boolean_expressions") as e:
    mixtures.add_mixture("bbh_in_training", ["bbh_boolean_expressions"])
  assert "evaluation-only" in str(e.value)
  with pytest.raises(UserError, match="bbh_snarks_direct"):
    mixtures.add_mixture("bbh_in_training", [("bbh_snarks_direct", 1.0)])
  assert "bbh_in_training" not in seqio.MixtureRegistry.names()
  mixtures.add_mixture("bbh_eval", [("bbh_boolean_expressions", 1.0)], training=False)  # evaluation is fine
  seqio.MixtureRegistry.remove("bbh_eval")

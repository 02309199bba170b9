"""Collections on the real files in ../shared/data, readers, templates, mixtures, cache."""

import collections
import dataclasses
import json
import os
import subprocess
import sys

import gin
import numpy as np
import pytest
import seqio

from conftest import REPO, shared_data
from flanjax.data import cache, mixtures, registry, sources, tasks, templates
from flanjax.data.collections import flan_cot, gsm8k, self_instruct, user
from flanjax.errors import UserError


def _load_json_templates():
  out = {}
  for f in sorted(os.listdir(tasks.TEMPLATE_DIR)):
    if f.endswith(".json"):
      out[f[:-5]] = tasks.load_templates(f[:-5])
  return out


def test_every_template_family_has_eight_templates_as_data():
  fams = _load_json_templates()
  assert {"cot_qa", "math_word", "instruction", "niv2"} <= set(fams)
  for name, temps in fams.items():
    assert len(temps) >= 8, name
    assert len({t.inputs for t in temps}) == len(temps), f"{name}: duplicate templates"


def test_formats_and_fitting_exemplars():
  t = templates.Template("Q: {question}\n{options}\nA:")
  ex = dict(question="Is it?", answer="yes", options=["yes", "no"], rationale="Because.")
  shots = [dict(question=f"Shot {i}?", answer="no", options=["yes", "no"], rationale=f"R{i}.")
           for i in range(3)]
  inp, tgt = templates.render(t, ex, "zero_shot")
  assert inp == "Q: Is it?\nA:" and tgt == "yes"
  inp, _ = templates.render(t, ex, "zero_shot_options", options_layout="letters")
  assert "(A) yes\n(B) no" in inp
  _, tgt = templates.render(t, ex, "cot")
  assert tgt == "Because. So the answer is yes."
  inp, tgt = templates.render(t, ex, "few_shot_cot", shots)
  assert inp.index("Shot 0?") < inp.index("R0. So the answer is no.") < inp.index("Is it?")
  assert tgt == "Because. So the answer is yes."
  # An empty field drops its line instead of leaving a dangling label.
  inp, _ = templates.render(templates.Template("{instruction}\nInput: {input}\nOutput:"),
                            dict(instruction="Say hi.", input="", answer="hi"), "zero_shot")
  assert inp == "Say hi.\nOutput:"


def _flan_defs():
  return {d.name: d for d in flan_cot.task_defs()}


def test_flan_cot_sets_on_real_files():
  shared_data("flan_cot")
  defs = _flan_defs()
  assert len(defs) == 14
  for name in flan_cot.SETS:
    with open(flan_cot.path_of(name), encoding="utf-8") as f:
      rows = sum(1 for line in f if line.strip())
    d = defs[flan_cot.PREFIX + name]
    train, val = tasks.raw_examples(d, "train"), tasks.raw_examples(d, "validation")
    assert len(train) + len(val) == rows
    assert 0 < len(val) <= flan_cot.MAX_VALIDATION
    assert not {r["question"] for r in val} & {r["question"] for r in train}
    for rec in tasks.render_split(d, "train", limit=200):
      assert rec["format"] in ("cot", "few_shot_cot")
      assert rec["targets"].endswith(f"So the answer is {rec['answer']}.")
      assert templates.extract_answer(rec["targets"]) == rec["answer"]
    direct = tasks.render_split(defs[flan_cot.PREFIX + name + "_direct"], "validation", limit=50)
    assert all(r["targets"] == r["answer"] for r in direct)


def test_few_shot_exemplars_never_include_the_question():
  shared_data("flan_cot")
  d = _flan_defs()["flan_cot_creak_direct"]
  train = tasks.raw_examples(d, "train")
  few = 0
  for i, rec in enumerate(tasks.render_split(d, "train", limit=1500)):
    q = train[i]["question"]
    # The question asked appears once: as the last block, never as an exemplar.
    assert rec["inputs"].count(q) == 1, rec["inputs"]
    if rec["format"] == "few_shot":
      few += 1
      assert rec["inputs"].rstrip().endswith(q) or rec["inputs"].rindex(q) > len(rec["inputs"]) // 2
  assert few > 300


def test_few_shot_drops_exemplars_until_the_input_fits():
  shared_data("flan_cot")
  d = _flan_defs()["flan_cot_gsm8k"]
  budget = 700  # characters, a stand-in for tokens
  full = tasks.render_split(d, "train", limit=200)
  fitted = tasks.render_split(d, "train", fits=lambda s: len(s) <= budget, limit=200)
  dropped = 0
  for a, b in zip(full, fitted):
    assert a["targets"] == b["targets"] and a["format"] == b["format"]
    if b["format"] == "few_shot_cot":
      n_full, n_fit = a["inputs"].count("So the answer is"), b["inputs"].count("So the answer is")
      assert n_fit <= n_full
      assert len(b["inputs"]) <= budget or n_fit == 0
      # Exemplars are dropped first-first: what stays is the tail of the full prompt.
      assert a["inputs"].endswith(b["inputs"])
      dropped += n_full - n_fit
  assert dropped > 0


def test_gsm8k_on_real_files():
  shared_data("gsm8k")
  defs = {d.name: d for d in gsm8k.task_defs()}
  d = defs["gsm8k"]
  train, test = tasks.raw_examples(d, "train"), tasks.raw_examples(d, "test")
  # GSM8K's 7,473 train questions less those flan_cot_gsm8k (the same questions in FLAN's
  # CoT set) holds out for its validation split: a blend of both never trains on them.
  held = gsm8k.flan_cot_validation_questions()
  assert len(test) == 1319 and len(train) == 7473 - len(held) and len(held) > 100
  val = {" ".join(r["question"].split()) for r in tasks.raw_examples(
      {x.name: x for x in flan_cot.task_defs()}["flan_cot_gsm8k"], "validation")}
  assert val == held and not val & {" ".join(ex["question"].split()) for ex in train}
  with open(sources.data_path("gsm8k", "test.jsonl"), encoding="utf-8") as f:
    raw = [json.loads(line) for line in f]
  for r, ex in zip(raw, test):
    gold = r["answer"].split("####")[-1].strip().replace(",", "")
    assert ex["answer"] == gold
    assert "<<" not in ex["rationale"]
    # The reference format and our CoT target give the same final number.
    assert gsm8k.final_number(r["answer"]) == gold
  recs = tasks.render_split(d, "test")
  targets = [gsm8k.final_number(r["targets"]) for r in recs]
  assert gsm8k.accuracy(targets, targets)["accuracy"] == 100.0
  assert gsm8k.accuracy(targets, [""] * len(targets))["accuracy"] == 0.0
  assert gsm8k.final_number("I think it is $1,200.50 dollars. So the answer is 1,200.50.") == "1200.5"
  assert gsm8k.final_number("no idea") == ""
  assert d.is_eval_only("test") and not d.is_eval_only("train")


def test_self_instruct_seed_tasks():
  path = shared_data("alpaca_seed_tasks") / "seed_tasks.jsonl"
  with open(path, encoding="utf-8") as f:
    raw = [json.loads(line) for line in f]
  assert len(raw) == 175
  d = self_instruct.task_defs()[0]
  exs = tasks.raw_examples(d, "train")
  assert len(exs) == sum(len(r["instances"]) for r in raw)
  for rec, ex in zip(tasks.render_split(d, "train"), exs):
    assert ex["instruction"] in rec["inputs"] and rec["targets"] == ex["answer"]
    assert "Input: \n" not in rec["inputs"] and not rec["inputs"].endswith("Input:")


# ------------------------------------------------------------------ user data

def _write(path, lines):
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  return str(path)


def _user(spec):
  defs, mixes = user.user_data([spec])
  return defs, mixes


def test_user_alpaca_json_array_and_jsonl(tmp_path):
  seeds = [json.loads(line) for line in open(shared_data("alpaca_seed_tasks") / "seed_tasks.jsonl")]
  recs = [dict(instruction=s["instruction"], input=s["instances"][0]["input"],
               output=s["instances"][0]["output"]) for s in seeds]
  arr = tmp_path / "alpaca.json"
  arr.write_text(json.dumps(recs), encoding="utf-8")
  jl = _write(tmp_path / "alpaca.jsonl", [json.dumps(r) for r in recs])
  for path in (str(arr), jl):
    (d,), _ = _user({"name": "my_alpaca", "path": path, "format": "alpaca"})
    rendered = tasks.render_split(d, "train")
    assert len(rendered) == 175
    assert [r["targets"] for r in rendered] == [r["output"].strip() for r in recs]


def test_user_chat_every_assistant_turn_is_a_target(tmp_path):
  chat = {"messages": [
      {"role": "system", "content": "Be brief."},
      {"role": "user", "content": "What is 2+2?"},
      {"role": "assistant", "content": "4"},
      {"role": "user", "content": "And times 3?"},
      {"role": "assistant", "content": "12"}]}
  path = _write(tmp_path / "chat.jsonl", [json.dumps(chat)] * 2)
  (d,), _ = _user({"name": "my_chat", "path": path, "format": "chat"})
  recs = tasks.render_split(d, "train")
  assert [r["targets"] for r in recs] == ["4", "12", "4", "12"]
  assert recs[0]["inputs"] == "System: Be brief.\nUser: What is 2+2?\nAssistant:"
  assert recs[1]["inputs"].endswith("Assistant: 4\nUser: And times 3?\nAssistant:")


def test_a_conversation_cut_to_start_with_the_assistant_loses_that_turn_only(tmp_path, capsys):
  sg = {"conversations": [
      {"from": "system", "value": "Be brief."},
      {"from": "gpt", "value": "...and that is why."},
      {"from": "human", "value": "What is 2+2?"},
      {"from": "gpt", "value": "4"}]}
  only = {"conversations": [{"from": "gpt", "value": "A reply to nothing."}]}
  path = _write(tmp_path / "cut.jsonl", [json.dumps(sg)] * 2)
  (d,), _ = _user({"name": "cut_chat", "path": path, "format": "sharegpt"})
  recs = tasks.render_split(d, "train")
  assert [(r["inputs"], r["targets"]) for r in recs] == [
      ("System: Be brief.\nUser: What is 2+2?\nAssistant:", "4")] * 2
  assert "2 record(s): leading assistant turn(s) with no user turn before them dropped" in (
      capsys.readouterr().out)
  bad = _write(tmp_path / "only.jsonl", [json.dumps(only)])
  (d,), _ = _user({"name": "only_reply", "path": bad, "format": "sharegpt"})
  with pytest.raises(UserError, match=r"only.jsonl:1: its assistant turns come before any user"):
    tasks.render_split(d, "train")


def test_a_wrong_role_is_named_in_the_error(tmp_path):
  cases = [("chat", {"messages": [{"role": "human", "content": "hi"},
                                  {"role": "gpt", "content": "yo"}]},
            r"message 0 is not .* \(it has role 'human'\) \(ShareGPT's roles"),
           ("sharegpt", {"conversations": [{"from": "Human", "value": "hi"},
                                           {"from": "gpt", "value": "yo"}]},
            r"turn 0 is not .* \(it has from 'Human'\); fix that turn \(roles are lower case\)"),
           ("sharegpt", {"conversations": [{"role": "user", "content": "hi"}]},
            r"turn 0 is not .* \(it has keys \['content', 'role'\]\)")]
  for k, (fmt, rec, message) in enumerate(cases):
    path = _write(tmp_path / f"r{k}.jsonl", [json.dumps(rec)])
    (d,), _ = _user({"name": f"roles_{k}", "path": path, "format": fmt})
    with pytest.raises(UserError, match=message):
      tasks.render_split(d, "train")


def test_a_run_of_conversations_alone_is_prompted_as_it_trained(tmp_path, builtin_vocab,
                                                                restore_registry):
  """Plain format: a mixture of conversations alone records that, and a lone prompt at
  inference gets their 'User: ...\nAssistant:' layout; blended with FLAN's tasks (prompted
  with the bare text) the prompt stays as given."""
  from flanjax.data import chat  # pylint: disable=g-import-not-at-top
  convo = {"conversations": [{"from": "human", "value": "Name a fruit"},
                             {"from": "gpt", "value": "apple"}]}
  path = _write(tmp_path / "c.jsonl", [json.dumps(convo)] * 3)
  (d,), _ = _user({"name": "convos_only", "path": path, "format": "sharegpt"})
  tasks.register(d, builtin_vocab)
  mixtures.add_mixture("convos_mix", ["convos_only"])
  mixtures.add_mixture("convos_and_flan", ["convos_only", "builtin_sentiment"])
  alone = user.prompt_format_of("convos_mix")
  assert alone.wrap("Hi there") == "User: Hi there\nAssistant:"
  assert tasks.render_split(d, "train")[0]["inputs"] == alone.wrap("Name a fruit")
  assert chat.from_record(alone.record()).wrap("Hi there") == "User: Hi there\nAssistant:"
  blended = user.prompt_format_of("convos_and_flan")
  assert blended.wrap("Hi there") == "Hi there" and blended.record() == {"name": "plain",
                                                                          "end_of_turn": ""}


def test_a_missing_validation_file_stops_at_registration(tmp_path):
  path = _write(tmp_path / "pc.jsonl", [json.dumps({"prompt": "a", "completion": "b"})])
  with pytest.raises(UserError, match=r"'v_task', validation_path .*nope.jsonl does not exist"):
    _user({"name": "v_task", "path": path, "validation_path": str(tmp_path / "nope.jsonl")})


def test_user_prompt_completion(tmp_path):
  path = _write(tmp_path / "pc.jsonl", [json.dumps({"prompt": f"Capital of {c}?", "completion": f" {k}"})
                                        for c, k in [("France", "Paris"), ("Peru", "Lima")]])
  (d,), _ = _user({"name": "my_pc", "path": path, "format": "prompt_completion", "num_shots": 0})
  recs = tasks.render_split(d, "train")
  assert [(r["inputs"], r["targets"]) for r in recs] == [("Capital of France?", "Paris"),
                                                         ("Capital of Peru?", "Lima")]


def test_user_niv2_folder_on_real_files():
  folder = shared_data("niv2_sample")
  defs, mixes = _user({"name": "my_niv2", "path": str(folder), "format": "niv2"})
  assert len(defs) == 8 and len(mixes["my_niv2"]) == 8
  total = 0
  for d in defs:
    data = json.load(open(folder / (d.name[len("my_niv2_"):] + ".json"), encoding="utf-8"))
    recs = tasks.render_split(d, "train")
    total += len(recs)
    definition = " ".join(data["Definition"]) if isinstance(data["Definition"], list) else data["Definition"]
    for r, inst in zip(recs, data["Instances"]):
      assert definition.strip() in r["inputs"]
      assert inst["input"].strip() in r["inputs"]
      assert r["targets"] == inst["output"][0].strip()
    if data.get("Positive Examples"):
      assert data["Positive Examples"][0]["output"].strip() in recs[0]["inputs"]
  assert total == 437


@pytest.mark.parametrize("fmt,line,needle", [
    ("alpaca", '{"instruction": "x", "output": "y"', "not valid JSON"),
    ("alpaca", '{"instruction": "x"}', "no field 'output'"),
    ("alpaca", '{"instruction": "x", "output": "  "}', "'output' is empty"),
    ("prompt_completion", '{"prompt": "x", "completion": ""}', "'completion' is empty"),
    ("chat", '{"messages": [{"role": "user", "content": "hi"}]}', "no assistant message"),
    ("chat", '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}',
     "empty assistant turn"),
    ("chat", '{"messages": [{"role": "robot", "content": "hi"}]}', "message 0 is not"),
])
def test_bad_records_raise_or_are_counted(tmp_path, fmt, line, needle):
  good = {"alpaca": '{"instruction": "a", "output": "b"}',
          "prompt_completion": '{"prompt": "a", "completion": "b"}',
          "chat": '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}'}[fmt]
  path = _write(tmp_path / f"{fmt}.jsonl", [good, line, good])
  cache.clear_caches()
  with pytest.raises(sources.BadRecord, match=needle) as e:
    tasks.raw_examples(_user({"name": "u", "path": path, "format": fmt})[0][0], "train")
  assert f"{path}:2:" in str(e.value) and "bad_records.policy='skip'" in str(e.value)
  # With the skip policy the bad line is counted and reported, the others kept.
  reader = sources.Reader(path, "skip")
  kept = list(user.read_records(reader, fmt))
  rep = reader.done()
  assert len(kept) == 2 and rep.num_skipped == 1 and f"{path}:2" in rep.summary()


def test_non_utf8_empty_and_wrong_fields(tmp_path):
  p = tmp_path / "bytes.jsonl"
  p.write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "\xff\xfe", "completion": "c"}\n')
  with pytest.raises(sources.BadRecord, match=r"bytes.jsonl:2: bytes that are not UTF-8"):
    list(user.read_records(sources.Reader(str(p), "raise"), "prompt_completion"))
  empty = tmp_path / "empty.jsonl"
  empty.write_text("")
  with pytest.raises(UserError, match="is empty"):
    list(user.read_records(sources.Reader(str(empty), "raise"), "prompt_completion"))
  tsv = _write(tmp_path / "x.tsv", ["q\ta\tr", "only two\tfields"])
  with pytest.raises(sources.BadRecord, match=r"x.tsv:2: 2 tab-separated fields, expected 3"):
    list(sources.read_tsv(sources.Reader(tsv, "raise"), flan_cot.COLUMNS))
  with pytest.raises(UserError, match="does not exist"):
    list(sources.read_jsonl(sources.Reader(str(tmp_path / "missing.jsonl"), "raise")))
  with pytest.raises(UserError, match="unknown format"):
    _user({"name": "u", "path": tsv, "format": "csv"})


def test_user_files_and_builtin_mixed_through_gin(tmp_path, builtin_vocab):
  alpaca = _write(tmp_path / "a.jsonl", [json.dumps({"instruction": f"Repeat {i}.", "output": str(i)})
                                         for i in range(50)])
  gin.clear_config()
  try:
    gin.parse_config(f"""
user_data.tasks = [{{'name': 'my_alpaca', 'path': '{alpaca}', 'format': 'alpaca'}}]
register_all.mixtures = [{{'name': 'user_and_builtin', 'tasks': [('my_alpaca', 1.0), ('flanjax_builtin', 3.0)]}}]
""")
    registry.register_all(builtin_vocab)
  finally:
    gin.clear_config()
  rates = mixtures.mixture_rates("user_and_builtin")
  assert rates["my_alpaca"] == pytest.approx(0.25)
  assert sum(v for k, v in rates.items() if k.startswith("builtin_")) == pytest.approx(0.75)
  ds = seqio.get_mixture_or_task("user_and_builtin").get_dataset(
      {"inputs": 64, "targets": 16}, "train", seed=0, passthrough_features=["task"])
  names = collections.Counter(ex["task"].decode() for ex in ds.take(400).as_numpy_iterator())
  assert 50 < names["my_alpaca"] < 150


# ------------------------------------------------------------------ mixtures

@pytest.fixture(scope="module")
def all_registered(builtin_vocab):
  registry.register_all(builtin_vocab, input_length=512)
  yield builtin_vocab
  registry.register_all(builtin_vocab)  # the session's input length again


def test_mixture_rates_hold_over_10000_draws(all_registered):
  shared_data("flan_cot")
  names = ["flan_cot_qasc", "flan_cot_creak_direct", "flan_cot_aqua_direct"]
  mixtures.add_mixture("rates_test", names, maximum=3000, temperature=2.0)
  sizes = {n: len(tasks.raw_examples(tasks.DEFS[n].defn, "train")) for n in names}
  w = {n: min(s, 3000) ** 0.5 for n, s in sizes.items()}
  expected = {n: v / sum(w.values()) for n, v in w.items()}
  assert mixtures.mixture_rates("rates_test") == pytest.approx(expected)
  ds = seqio.get_mixture_or_task("rates_test").get_dataset(
      {"inputs": 512, "targets": 128}, "train", seed=3, passthrough_features=["task"])
  got = collections.Counter(ex["task"].decode() for ex in ds.take(10_000).as_numpy_iterator())
  for n in names:
    assert abs(got[n] / 10_000 - expected[n]) < 0.02, (n, got[n], expected[n])


def test_blend_of_submixtures(all_registered):
  shared_data("flan_cot")
  mixtures.add_blend("blend_test", [("flan_cot", 0.6), ("flanjax_builtin", 0.4)])
  rates = mixtures.mixture_rates("blend_test")
  inner = mixtures.mixture_rates("flan_cot")
  assert sum(v for k, v in rates.items() if k.startswith("flan_cot")) == pytest.approx(0.6)
  for k, v in inner.items():
    assert rates[k] == pytest.approx(0.6 * v)
  assert rates["builtin_parity"] == pytest.approx(0.4 / 6)


def test_eval_only_tasks_are_refused_in_training_mixtures(all_registered):
  shared_data("gsm8k")
  fake = tasks.TaskDef(name="eval_only_probe", load=lambda s: [{"answer": "x", "question": "q"}],
                       splits=("test",), templates="cot_qa", eval_only_splits=("*",))
  tasks.register(fake, all_registered)
  with pytest.raises(UserError, match="evaluation-only data: eval_only_probe"):
    mixtures.add_mixture("bad_mix", ["flan_cot_qasc", "eval_only_probe"])
  with pytest.raises(UserError, match="gsm8k"):
    mixtures.check_trainable("gsm8k", "test")
  with pytest.raises(UserError, match="eval_only_probe"):
    mixtures.add_blend("bad_blend", [("flan_cot", 1.0), ("eval_only_probe", 1.0)])
  mixtures.check_trainable("gsm8k", "train")


# ------------------------------------------------------------------ cache

def test_cache_is_reused_and_keyed_by_template_and_vocab(builtin_vocab):
  data = [dict(question=f"What is {i} plus {i}?", answer=str(2 * i), rationale="Add.")
          for i in range(40)]
  d = tasks.TaskDef(name="cache_probe", load=lambda s: data, splits=("train",),
                    templates="cot_qa", fingerprint="v1")
  first = tasks.tokenized_split(d, "train", builtin_vocab, 1024)
  cache.clear_caches()

  class NoTokenizer:
    """The same vocabulary for the cache key, but tokenizing anything fails."""
    fingerprint = tasks.vocab_fingerprint(builtin_vocab)

    def encode(self, text):
      raise AssertionError("tokenized again")

  again = tasks.tokenized_split(d, "train", NoTokenizer(), 1024)  # from disk, no tokenizer
  np.testing.assert_array_equal(first.inputs, again.inputs)
  assert first.texts == again.texts
  other_templates = tasks.TaskDef(name="cache_probe", load=lambda s: data, splits=("train",),
                                  templates=[templates.Template("Sum: {question}")], fingerprint="v1")
  other_data = tasks.TaskDef(name="cache_probe", load=lambda s: data, splits=("train",),
                             templates="cot_qa", fingerprint="v2")
  keys = {tasks.cache_key(x, "train", builtin_vocab, 1024) for x in (d, other_templates, other_data)}
  keys.add(tasks.cache_key(d, "train", seqio.ByteVocabulary(), 1024))
  keys.add(tasks.cache_key(d, "train", builtin_vocab, 512))  # the input budget
  assert len(keys) == 5
  with pytest.raises(AssertionError, match="tokenized again"):
    tasks.tokenized_split(other_templates, "train", NoTokenizer(), 1024)


def _budget_probe():
  data = [dict(question=f"Question {i}: " + " ".join(["what is the sum"] * 6) + "?", answer=str(i),
               rationale="Add.") for i in range(40)]
  return tasks.TaskDef(name="budget_probe", load=lambda s: data, splits=("train",),
                       templates="cot_qa", train_formats=("few_shot",), fingerprint="b1")


@pytest.fixture
def budget_probe(builtin_vocab):
  d = _budget_probe()
  yield d
  if d.name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(d.name)
  tasks.DEFS.pop(d.name, None)


def test_the_input_length_is_part_of_a_tasks_registration(budget_probe, builtin_vocab):
  d, v = budget_probe, builtin_vocab
  for length in (64, 1024):
    tasks.register(d, v, input_length=length)
    reg = tasks.DEFS[d.name]
    assert (reg.defn, reg.vocabulary, reg.input_length) == (d, v, length)
    tok = reg.tokenized("train")
    fits = lambda text, n=length: len(v.encode(text)) + 1 <= n  # noqa: E731
    want = tasks.render_split(d, "train", fits, input_budget=length)
    assert [t["inputs_pretokenized"] for t in tok.texts] == [r["inputs"] for r in want]
    if length == 64:
      assert max(tok.lengths("inputs")) + 1 <= 64
    else:
      assert max(tok.lengths("inputs")) + 1 > 64  # the 3 exemplars fit now
  with pytest.raises(UserError, match="input_length must be a positive number of tokens"):
    tasks.register(d, v, input_length=0)


def test_register_functions_are_given_the_input_length(budget_probe, builtin_vocab):
  d, seen = budget_probe, []

  def mine(vocabulary, input_length):
    seen.append(input_length)
    tasks.register(d, vocabulary, input_length)

  def old_without_flanjax_tasks(vocabulary):
    seen.append("old")

  def old_with_flanjax_tasks(vocabulary):
    tasks.register(d, vocabulary)

  registry.call_register_fns([mine, old_without_flanjax_tasks], builtin_vocab, input_length=96)
  assert seen == [96, "old"] and tasks.DEFS[d.name].input_length == 96
  with pytest.raises(UserError, match=r"old_with_flanjax_tasks registered budget_probe for 1024 "
                     r"input tokens, not this run's 96: .*fn\(vocabulary, input_length=N\)"):
    registry.call_register_fns([old_with_flanjax_tasks], builtin_vocab, input_length=96)
  # The gin configurable takes it too (bound in gin as train.register_fns = [@register_all]).
  try:
    registry.call_register_fns([registry.register_builtin, registry.register_all], builtin_vocab,
                               input_length=96)
    some = ("flan_cot_aqua", "gsm8k", "bbh_snarks", "self_instruct_seed", "tfds_rte")
    assert [tasks.DEFS[n].input_length for n in some] == [96] * len(some)
  finally:
    registry.register_all(builtin_vocab)  # the session's input length again


# ------------------------------------------------------------------ tools

def test_show_task_prints_what_the_model_sees(tmp_path, builtin_vocab):
  shared_data("flan_cot")
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  out = subprocess.run([sys.executable, str(REPO / "tools" / "show_task.py"), "flan_cot_strategyqa",
                        "-n", "2", "--format", "cot", "--mode", "no_template"],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
  assert out.returncode == 0, out.stderr
  defn = _flan_defs()["flan_cot_strategyqa"]
  first = tasks.raw_examples(defn, "train")[0]
  assert first["question"] in out.stdout and f"So the answer is {first['answer']}." in out.stdout
  assert out.stdout.count("--- inputs ---") == 2
  # --mode renders as training in that mode would: the raw inputs, no instruction words.
  raw = tasks.render_split(dataclasses.replace(defn, template_mode="no_template"),
                           "train", limit=1, fmt="cot")[0]
  worded = tasks.render_split(defn, "train", limit=1, fmt="cot")[0]
  assert raw["inputs"] != worded["inputs"]
  assert f"--- inputs ---\n{raw['inputs']}\n--- targets ---" in out.stdout
  # An unknown name: the tool's guarded main in this process (a second process start would
  # cost more than the tool), exit 2 and one line.
  import contextlib
  import importlib.util
  import io
  from flanjax import config
  spec = importlib.util.spec_from_file_location("show_task_tool", REPO / "tools" / "show_task.py")
  tool = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tool)
  for argv, first in ((["no_such_task"], "show_task: error: unknown task or mixture"),
                      (["builtin_parity", "--split", "bogus"],
                       "show_task: error: builtin_parity has no split 'bogus'; its splits are")):
    err = io.StringIO()
    try:
      with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err), \
           pytest.raises(SystemExit) as exit_:
        config.run_plain_main(tool.main, "show_task", argv)
    finally:
      registry.register_all(builtin_vocab)  # the tool registered its input length of 1024
    assert exit_.value.code == 2
    assert err.getvalue().strip().splitlines()[-1].startswith(first), err.getvalue()


@pytest.fixture
def restore_registry(builtin_vocab):
  """Tests that register tasks with another vocabulary put the session's back."""
  yield
  registry.register_all(builtin_vocab)


def test_flan_cot_mixture_packs_over_90_percent_and_beats_seqio(restore_registry):
  """The issue's figure: flan_cot at 1024/256, packed vs padded vs seqio's packer."""
  shared_data("flan_cot")
  from flanjax.data import packing, pipeline, vocab
  lengths = {"inputs": 1024, "targets": 256}
  v = vocab.corpus_vocabulary(mixture="flan_cot", vocab_size=8000)
  registry.register_all(v, input_length=1024)
  shares = {}
  for pack in (True, False):
    st = packing.PackingStats()
    it = pipeline.get_dataset("flan_cot", lengths, "train", 32, seed=0, pack=pack,
                              stats=st).as_numpy_iterator()
    batches = [next(it) for _ in range(30)]
    shares[pack] = np.mean([pipeline.non_padding_share(b) for b in batches])
    assert st.violations == 0
  ds = registry.get_task_or_mixture("flan_cot").get_dataset(lengths, "train", seed=0)
  it = seqio.EncDecFeatureConverter(pack=True)(ds, lengths).batch(32).as_numpy_iterator()
  seqio_share = np.mean([pipeline.non_padding_share(next(it)) for _ in range(30)])
  print(f"flan_cot 1024/256 non-padding share: packed {shares[True]:.3f}, "
        f"seqio packer {seqio_share:.3f}, padded {shares[False]:.3f}")
  assert shares[True] >= 0.90
  assert shares[True] > seqio_share > shares[False]


def test_chat_prompt_is_an_exact_prefix_and_every_turn_end_is_trained(tmp_path, builtin_vocab):
  """The known SFT failure: a prompt tokenized apart from its response no longer lines up.

  Here prompt and response are tokenized separately and concatenated, so the
  loss mask starts exactly where the response does; EOS ends each turn, weighted.
  """
  from flanjax.data import packing
  convo = [{"role": "user", "content": "Name a fruit"},
           {"role": "assistant", "content": "apple"},
           {"role": "user", "content": "Another one, please."},
           {"role": "assistant", "content": " banana!"}]
  path = _write(tmp_path / "chat.jsonl", [json.dumps({"messages": convo})] * 3)
  (d,), _ = _user({"name": "chat_mask", "path": path, "format": "chat"})
  tasks.register(d, builtin_vocab)
  ds = seqio.get_mixture_or_task("chat_mask").get_dataset(
      {"inputs": 64, "targets": 32}, "train", shuffle=False, num_epochs=1)
  stats = packing.PackingStats()
  rows = list(packing.pack_dataset(ds, {"inputs": 64, "targets": 32}, kind="prefix_lm",
                                   stats=stats).as_numpy_iterator())
  recs = tasks.render_split(d, "train")
  v = builtin_vocab
  found = 0
  for row in rows:
    for s in set(row["decoder_segment_ids"].tolist()) - {0}:
      m = row["decoder_segment_ids"] == s
      toks, w = row["decoder_target_tokens"][m], row["decoder_loss_weights"][m]
      prompt, resp = toks[w == 0], toks[w == 1]
      r = next(r for r in recs if list(prompt) == v.encode(r["inputs"]) + [v.eos_id])
      assert list(resp) == v.encode(r["targets"]) + [v.eos_id]
      assert w[-1] == 1 and toks[-1] == v.eos_id
      # Weights are a single run: no prompt token is trained, no response token skipped.
      assert np.all(np.diff(w) >= 0)
      found += 1
  assert found == 6 and stats.violations == 0 and "mask violations: none" in stats.summary()


def test_a_user_file_of_the_evaluation_sets_is_evaluated_never_trained(restore_registry,
                                                                        builtin_vocab):
  """The data folder's evaluation files as a user task: it registers (it can be evaluated
  on), and a training mixture with it is refused in one line naming the file."""
  path = shared_data("alpaca_eval") / "text_davinci_003_outputs.json"
  assert sources.evaluation_data(str(path)) == "alpaca_eval"
  assert sources.evaluation_data(str(shared_data("gsm8k") / "test.jsonl")) == "gsm8k test"
  assert sources.evaluation_data(str(shared_data("gsm8k") / "train.jsonl")) is None
  (d,), _ = _user({"name": "my_eval_copy", "path": str(path)})
  assert d.is_eval_only("train")
  tasks.register(d, builtin_vocab)
  with pytest.raises(UserError, match=r"would train on evaluation-only data: my_eval_copy "
                     r"\(.*text_davinci_003_outputs.json is evaluation data: alpaca_eval\)"):
    mixtures.add_mixture("mix_with_eval", ["my_eval_copy", "builtin_sentiment"])


def test_a_validation_share_that_holds_out_nothing_is_not_scored(tmp_path, builtin_vocab):
  """A share too small for the file holds none out (20 records at the default 2% often do):
  the split is named as empty and not scored, rather than reported as a measured 0.0."""
  from flanjax.evaluation import harness  # pylint: disable=g-import-not-at-top
  path = _write(tmp_path / "small.jsonl", [json.dumps({"prompt": f"Capital {i}?", "completion": "x"})
                                           for i in range(20)])
  (d,), _ = _user({"name": "small_file", "path": path, "validation_share": 1e-9})
  tasks.register(d, builtin_vocab)
  lines = []
  results = harness.evaluate_suite(None, None, builtin_vocab, "enc_dec", ["small_file"],
                                   splits=["validation"], log=lines.append)
  assert results == []
  assert any("small_file/validation has no examples, not scored" in line for line in lines)


def test_aqua_problems_stay_on_one_side_and_are_never_their_own_exemplar():
  """AQuA holds one problem several times with other option lists and the same rationale:
  the split and the few-shot exemplars compare problems, not option lists."""
  shared_data("flan_cot")
  d = {x.name: x for x in flan_cot.task_defs()}["flan_cot_aqua"]
  train, val = tasks.raw_examples(d, "train"), tasks.raw_examples(d, "validation")
  stems = lambda rows: {flan_cot.problem("aqua", r["question"]) for r in rows}  # noqa: E731
  assert val and not stems(train) & stems(val)
  repeated = len(train) - len(stems(train))
  assert repeated > 100  # the data does repeat problems, so the check above can fail
  for r, ex in zip(tasks.render_split(d, "train", fmt="few_shot_cot"), train):
    stem = flan_cot.problem("aqua", ex["question"]).replace("\\n", "\n").strip() + "\n"
    assert r["inputs"].count(stem) == 1, stem


def test_rates_given_with_a_cap_or_temperature_are_refused():
  shared_data("flan_cot")
  with pytest.raises(UserError, match=r"its tasks have rates, so maximum=10 and temperature=100.0"):
    mixtures.add_mixture("rated_capped", [("flan_cot_aqua", 1.0), ("flan_cot_qasc", 9.0)],
                         maximum=10, temperature=100.0)


def test_records_of_one_input_stay_on_one_side_of_the_validation_split(tmp_path):
  recs = [{"instruction": f"Classify item {i % 30}.", "input": "", "output": f"label {i}"}
          for i in range(60)]  # each input twice, with other outputs
  path = _write(tmp_path / "dup.jsonl", [json.dumps(r) for r in recs])
  (d,), _ = _user({"name": "dup_inputs", "path": path, "validation_share": 0.3})
  train, val = tasks.raw_examples(d, "train"), tasks.raw_examples(d, "validation")
  assert len(train) + len(val) == 60 and val and train
  assert not {ex["instruction"] for ex in train} & {ex["instruction"] for ex in val}


def test_flan_cot_gsm8k_scores_numbers_as_gsm8k_does():
  shared_data("flan_cot")
  defs = {x.name: x for x in flan_cot.task_defs()}
  for name in ("flan_cot_gsm8k", "flan_cot_gsm8k_direct"):
    d = defs[name]
    target = d.postprocess_fn("Half of 2,400 is 1,200. So the answer is 1200.")
    said = d.postprocess_fn("She has 2,400 and gives half. So the answer is 1,200.")
    assert target == said == "1200"
    assert d.metric_fns[0]([target], [said]) == {"accuracy": 100.0}


def test_niv2_answers_are_scored_against_every_output_of_an_instance(builtin_vocab):
  # NIv2 instances may have several right outputs; NIv2's own evaluation takes the best
  # over them. Real files: cosmosqa and qasc have such instances.
  from rouge_score import rouge_scorer
  from flanjax.evaluation import harness
  folder = shared_data("niv2_sample")
  defs, _ = _user({"name": "ref_niv2", "path": str(folder), "format": "niv2",
                   "validation_share": 0.5})
  scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
  several = 0
  for stem in ("task024_cosmosqa_answer_generation", "task039_qasc_find_overlapping_words"):
    (d,) = [d for d in defs if d.name == f"ref_niv2_{stem}"]
    name = tasks.register(d, builtin_vocab, 512)
    task = seqio.get_mixture_or_task(name)
    examples = harness.load_examples(name, "validation", builtin_vocab, 512)
    outs = {i["input"].strip(): [o.strip() for o in i["output"]] for i in json.load(
        open(folder / f"{stem}.json", encoding="utf-8"))["Instances"]}
    refs = [next(v for k, v in outs.items() if k in e.inputs) for e in examples]
    several += sum(len(r) > 1 for r in refs)
    # Any output is right; the last output of each instance scores 100 on both metrics.
    last = [r[-1] for r in refs]
    metrics, primary, _, _ = harness.score_predictions(task, examples, last)
    assert primary == "rougeL" and metrics == {"rougeL": 100.0, "exact_match": 100.0}
    # A prediction scores its best ROUGE-L over the outputs (brute force with rouge_score).
    preds = [f"{r[-1].split()[0]} and something else" for r in refs]
    want = 100 * sum(max(scorer.score(o, p)["rougeL"].fmeasure for o in r)
                     for r, p in zip(refs, preds)) / len(refs)
    got = harness.score_predictions(task, examples, preds)[0]["rougeL"]
    assert abs(got - want) < 1e-9
    # The review page marks the second output right too.
    _, _, targets_pp, preds_pp = harness.score_predictions(task, examples, last)
    assert [str(t) for t in targets_pp] == [templates.extract_answer(r[0]) for r in refs]
    rows = harness._kept(examples, last, preds_pp, targets_pp, None, len(examples))
    assert all(row["correct"] for row in rows)
  assert several >= 5, several

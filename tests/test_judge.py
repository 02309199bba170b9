"""python -m flanjax.judge: verdict parsing, the bootstrap interval against closed forms, and a
tiny random judge end to end on real AlpacaEval and MT-Bench records (answers written by
python -m flanjax.infer): swapping --a and --b mirrors every number, a file against itself
has no consistent winner, unparsed verdicts never count as wins, the review page."""

import itertools
import json
import math
import shutil

import numpy as np
import pytest

from conftest import shared_data
from flanjax import infer
from flanjax import judge as judge_cmd
from flanjax.evaluation import judge as judge_lib
from flanjax.evaluation import open_prompts

N = 4  # AlpacaEval records judged


# ---------------------------------------------------------------- no model needed

def test_verdicts_and_scores_are_parsed_or_counted_as_unparsed():
  assert judge_lib.parse_verdict("A is clearer.\nVerdict: B") == "B"
  assert judge_lib.parse_verdict("verdict: tie") == "tie"
  assert judge_lib.parse_verdict("Verdict: [[A]]") == "A"
  assert judge_lib.parse_verdict(" A ") == "A"
  for bad in ("", "Both are fine.", "Verdict: C", "Answer B is better", None):
    assert judge_lib.parse_verdict(bad) is None, bad
  assert judge_lib.parse_score("Reasons...\nScore: 7") == 7
  assert judge_lib.parse_score("Score: [[10]]") == 10
  assert judge_lib.parse_score("8") == 8
  for bad in ("Score: 11", "Score: 0", "Score: 7.5", "great", ""):
    assert judge_lib.parse_score(bad) is None, bad


def test_pairs_stop_at_the_limit_and_need_answers_only_for_those():
  """--max_items N judges the first N of --a: --b need answer only those (it was asked to
  answer every --a instruction, then the pairs were cut)."""
  a = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(6)]
  b = [{"instruction": f"q{i}", "output": f"b{i}"} for i in (2, 0, 1)]
  pairs = judge_lib.make_pairs(a, b, "A", "B", limit=3)
  assert [(p.instruction, p.a, p.b) for p in pairs] == [
      ("q0", "a0", "b0"), ("q1", "a1", "b1"), ("q2", "a2", "b2")]
  with pytest.raises(judge_lib.UserError, match="'q3'"):
    judge_lib.make_pairs(a, b, "A", "B", limit=4)
  line = judge_lib.format_grade({"graded": 2, "questions": 1, "mean": None, "unparsed": 2,
                                 "per_turn": {"1": None}, "per_category": {"writing": None}})
  assert "None" not in line and "mean grade n/a (no grade parsed)" in line


def test_bootstrap_interval_against_the_normal_approximation():
  # 400 consistent verdicts: 150 wins (2 points), 50 ties (1), 200 losses (0).
  points = [2] * 150 + [1] * 50 + [0] * 200
  lo, hi = judge_lib.bootstrap_interval(points, 2, resamples=20000, seed=3)
  x = np.asarray(points) / 2
  half = 1.959964 * x.std() / math.sqrt(len(x))  # the bootstrap's variance is the plug-in one
  assert lo == pytest.approx(x.mean() - half, abs=0.006)
  assert hi == pytest.approx(x.mean() + half, abs=0.006)
  assert judge_lib.bootstrap_interval(points, 2, 20000, seed=3) == (lo, hi)  # seeded


def test_bootstrap_interval_against_exact_enumeration():
  points = [2, 2, 2, 0]  # all 4**4 resamples enumerated: the exact bootstrap distribution
  means = sorted(sum(s) / 8 for s in itertools.product(points, repeat=4))
  cdf = lambda v: sum(m <= v for m in means) / len(means)  # noqa: E731
  exact_lo = min(m for m in means if cdf(m) > 0.025)
  exact_hi = min(m for m in means if cdf(m) >= 0.975)
  assert (exact_lo, exact_hi) == (0.25, 1.0)
  assert judge_lib.bootstrap_interval(points, 2, resamples=20000, seed=0) == (exact_lo, exact_hi)


class _StubJudge:
  """Replies as given, one per prompt, in order."""
  mode, truncated = "generate", 0

  def __init__(self, replies):
    self.replies = replies

  def ask(self, prompts, choices, parse):
    assert len(prompts) == len(self.replies)
    return [{"raw": r, "verdict": parse(r)} for r in self.replies]


def test_outcomes_of_both_orders():
  pairs = [judge_lib.Pair(str(i), f"q{i}", "x" * (i + 1), "y") for i in range(5)]
  # (a shown first, b shown first): win, loss, tie, flipped (position bias), unparsed.
  first = ["Verdict: A", "Verdict: B", "Verdict: tie", "Verdict: A", "Verdict: A"]
  second = ["Verdict: B", "Verdict: A", "Verdict: tie", "Verdict: A", "I cannot tell"]
  records, s = judge_lib.pairwise(_StubJudge(first + second), pairs, resamples=200)
  assert [r["outcome"] for r in records] == ["a", "b", "tie", "flipped", "unparsed"]
  assert (s["a"]["wins"], s["b"]["wins"], s["ties"], s["flipped"], s["unparsed"],
          s["consistent"]) == (1, 1, 1, 1, 1, 3)
  assert s["a"]["win_rate"] == s["b"]["win_rate"] == 0.5
  assert s["verdicts_by_position"] == {"first": 5, "second": 2, "tie": 2, "unparsed": 1}
  assert s["a"]["mean_chars"] == 3.0 and s["b"]["mean_chars"] == 1.0
  # A reply that says nothing is never a win for either side.
  _, s = judge_lib.pairwise(_StubJudge(["no idea"] * 10), pairs, resamples=10)
  assert (s["a"]["wins"], s["b"]["wins"], s["unparsed"], s["a"]["win_rate"]) == (0, 0, 5, None)


def test_grade_prompt_holds_the_first_answer_and_the_references():
  p = judge_lib.grade_prompt(["Q1?", "Q2?"], ["ANSWER1", "ANSWER2"], 1, ["R1", "R2"])
  for part in ("Q1?", "ANSWER1", "Q2?", "ANSWER2", "R1", "R2", "Score: N"):
    assert part in p
  assert p.index("Q1?") < p.index("ANSWER1") < p.index("Q2?") < p.index("ANSWER2")
  assert "ANSWER2" not in judge_lib.grade_prompt(["Q1?", "Q2?"], ["ANSWER1", "ANSWER2"], 0)


# ---------------------------------------------------------------- a tiny random judge

@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory, builtin_vocab):
  """A random flanjax T5 saved as a Hugging Face folder with the built-in vocabulary."""
  import flax.linen as nn
  import jax
  from flanjax.models import hf, kinds, t5
  cfg = t5.T5Config(vocab_size=1024, d_model=32, d_kv=8, d_ff=48, num_heads=4,
                    num_encoder_layers=2, num_decoder_layers=2)
  model = kinds.ENC_DEC.build(cfg)
  params = nn.unbox(model.init(jax.random.PRNGKey(1), **kinds.ENC_DEC.dummy_batch())["params"])
  params = jax.tree.map(lambda x: np.asarray(x) * 3.0, params)  # verdicts far from uniform
  path = tmp_path_factory.mktemp("judge_t5")
  hf.save(cfg, params, str(path), vocabulary=builtin_vocab)
  return str(path)


def _run(module, argv, capsys):
  with pytest.raises(SystemExit) as e:
    module.main(argv)
  out = capsys.readouterr()
  assert e.value.code == 0, out.err[-2000:]
  return out.out


@pytest.fixture(scope="module")
def alpaca_answers(tiny_t5, tmp_path_factory):
  """infer's answers to N real AlpacaEval instructions (a copy of the file, cut to N)."""
  ref = shared_data("alpaca_eval") / "text_davinci_003_outputs.json"
  records = json.loads(ref.read_text(encoding="utf-8"))[:N]
  folder = tmp_path_factory.mktemp("alpaca_eval_copy")
  (folder / ref.name).write_text(json.dumps(records), encoding="utf-8")
  out = folder / "A.jsonl"
  with pytest.raises(SystemExit) as e:
    infer.main(["--checkpoint", tiny_t5, "--input", str(folder / ref.name), "--output", str(out),
                "--max_decode_len", "12", "--batch_size", "8"])
  assert e.value.code == 0
  answers = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
  assert [a["instruction"] for a in answers] == [r["instruction"] for r in records]
  assert all(set(a) >= {"instruction", "output", "generator", "dataset"} for a in answers)
  # The reference answers of the same instructions, as a B file.
  b = folder / "B.jsonl"
  b.write_text("".join(json.dumps({"instruction": r["instruction"], "output": r["output"]}) + "\n"
                       for r in records), encoding="utf-8")
  return str(out), str(b), records


def test_pairwise_swapped_is_mirrored_and_self_has_no_winner(tiny_t5, alpaca_answers, tmp_path,
                                                               capsys):
  a, b, records = alpaca_answers
  common = ["--judge", tiny_t5, "--mode", "loglik", "--resamples", "2000", "--batch_size", "8"]
  _run(judge_cmd, ["pairwise", "--a", a, "--b", b, "--out", str(tmp_path / "ab")] + common, capsys)
  _run(judge_cmd, ["pairwise", "--a", b, "--b", a, "--out", str(tmp_path / "ba")] + common, capsys)
  ab = json.loads((tmp_path / "ab" / "pairwise.json").read_text())
  ba = json.loads((tmp_path / "ba" / "pairwise.json").read_text())
  assert ab["a"] == ba["b"] and ab["b"] == ba["a"]  # names, counts, rates, intervals, lengths
  for k in ("pairs", "ties", "flipped", "unparsed", "consistent", "verdicts_by_position"):
    assert ab[k] == ba[k], k
  assert ab["pairs"] == N and ab["unparsed"] == 0  # a log-likelihood verdict always parses
  assert ab["a"]["wins"] + ab["b"]["wins"] + ab["ties"] + ab["flipped"] == N
  if ab["consistent"]:
    assert ab["a"]["win_rate"] + ab["b"]["win_rate"] == pytest.approx(1.0)
  verdicts = [json.loads(x) for x in (tmp_path / "ab" / "pairwise.jsonl").read_text().splitlines()]
  assert [v["instruction"] for v in verdicts] == [r["instruction"] for r in records]
  for v in verdicts:
    assert v["a_first"]["raw"] == judge_lib.PAIR_CHOICES[v["a_first"]["verdict"]]
    assert set(v["a_first"]["loglik"]) == {"A", "B", "tie"}
  assert ab["b"]["mean_chars"] == pytest.approx(np.mean([len(r["output"]) for r in records]),
                                                abs=0.05)
  # The same file against itself: each order sees the same text, so no consistent winner.
  _run(judge_cmd, ["pairwise", "--a", a, "--b", a, "--out", str(tmp_path / "aa")] + common, capsys)
  aa = json.loads((tmp_path / "aa" / "pairwise.json").read_text())
  assert aa["a"]["wins"] == aa["b"]["wins"] == 0
  assert aa["ties"] + aa["flipped"] == N
  page = (tmp_path / "ab" / "pairwise.html").read_text()
  assert "<script src" not in page and "http" not in page.split("<body>")[1].split("<table>")[0]


def test_pairwise_against_alpaca_eval_generating(tiny_t5, alpaca_answers, tmp_path, capsys):
  """--b alpaca_eval (the 805 references; A answers N of them), the judge writing its verdict."""
  a, _, records = alpaca_answers
  out = _run(judge_cmd, ["pairwise", "--judge", tiny_t5, "--a", a, "--b", "alpaca_eval",
                         "--max_decode_len", "8", "--resamples", "500", "--out", str(tmp_path)],
             capsys)
  s = json.loads((tmp_path / "pairwise.json").read_text())
  verdicts = [json.loads(x) for x in (tmp_path / "pairwise.jsonl").read_text().splitlines()]
  assert s["b"]["name"].startswith("alpaca_eval") and s["pairs"] == N and f"pairs {N}:" in out
  assert [v["output_b"] for v in verdicts] == [r["output"] for r in records]
  for v in verdicts:  # each outcome is what the two raw replies say
    s1 = {"A": "a", "B": "b", "tie": "tie"}.get(judge_lib.parse_verdict(v["a_first"]["raw"]))
    s2 = {"A": "b", "B": "a", "tie": "tie"}.get(judge_lib.parse_verdict(v["b_first"]["raw"]))
    want = "unparsed" if None in (s1, s2) else s1 if s1 == s2 else "flipped"
    assert v["outcome"] == want
  assert s["unparsed"] == sum(v["outcome"] == "unparsed" for v in verdicts)
  assert s["a"]["wins"] == sum(v["outcome"] == "a" for v in verdicts)


def test_alpaca_eval_references_on_either_side():
  shared_data("alpaca_eval")
  for side in ("a", "b"):
    name, answers = judge_cmd._answers("alpaca_eval", side)  # pylint: disable=protected-access
    assert name.startswith("alpaca_eval") and len(answers) == 805


def test_mt_bench_two_turns_answered_and_graded(tiny_t5, tmp_path, capsys):
  questions = [json.loads(x) for x in
               (shared_data("mt_bench") / "question.jsonl").read_text().splitlines()]
  pick = [next(q for q in questions if q["category"] == c) for c in ("writing", "math")]
  folder = tmp_path / "mt_bench"
  folder.mkdir()
  (folder / "question.jsonl").write_text("".join(json.dumps(q) + "\n" for q in pick))
  shutil.copy(shared_data("mt_bench") / "reference_answer_gpt4.jsonl", folder)
  answers = tmp_path / "answers.jsonl"
  _run(infer, ["--checkpoint", tiny_t5, "--input", str(folder / "question.jsonl"), "--output",
               str(answers), "--max_decode_len", "10"], capsys)
  got = [json.loads(x) for x in answers.read_text().splitlines()]
  assert [(g["question_id"], g["category"], g["turns"]) for g in got] == [
      (q["question_id"], q["category"], q["turns"]) for q in pick]
  assert all(len(g["answers"]) == 2 for g in got)
  # The second turn's prompt holds the model's own first answer.
  from flanjax.data import chat
  second = open_prompts.render(chat.get("plain"), pick[0]["turns"], got[0]["answers"][:1])
  assert second.index(pick[0]["turns"][0]) < second.index("Assistant: " + got[0]["answers"][0]
                                                          .strip()) < second.index(pick[0]["turns"][1])
  _run(judge_cmd, ["grade", "--judge", tiny_t5, "--answers", str(answers), "--mode", "loglik",
                   "--references", str(folder / "reference_answer_gpt4.jsonl"),
                   "--out", str(tmp_path / "g")], capsys)
  s = json.loads((tmp_path / "g" / "grade.json").read_text())
  graded = [json.loads(x) for x in (tmp_path / "g" / "grade.jsonl").read_text().splitlines()]
  refs = {r["question_id"]: r["choices"][0]["turns"] for r in map(json.loads, (
      folder / "reference_answer_gpt4.jsonl").read_text().splitlines())}
  assert [(g["question_id"], g["turn"]) for g in graded] == [
      (q["question_id"], t) for q in pick for t in (1, 2)]
  for g in graded:
    assert 1 <= g["score"] <= 10 and set(g["loglik"]) == {str(k) for k in range(1, 11)}
    want = refs[g["question_id"]][g["turn"] - 1] if g["category"] == "math" else None
    assert g["reference"] == want
  assert s["mean"] == pytest.approx(np.mean([g["score"] for g in graded]), abs=1e-3)
  assert s["per_turn"]["2"] == pytest.approx(np.mean([g["score"] for g in graded if g["turn"] == 2]),
                                             abs=1e-3)
  assert (tmp_path / "g" / "grade.html").exists()


def test_bad_answers_files_are_one_line_errors(tmp_path, capsys):
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps({"question": "q"}) + "\n")
  with pytest.raises(SystemExit) as e:
    judge_cmd.main(["pairwise", "--judge", str(tmp_path), "--a", str(bad), "--b", str(bad),
                    "--out", str(tmp_path / "o")])
  err = capsys.readouterr().err
  assert e.value.code == 2 and "bad.jsonl:1" in err and len(err.strip().splitlines()) == 1
  with pytest.raises(SystemExit) as e:  # a size of 0 (was range()'s traceback)
    judge_cmd.main(["pairwise", "--judge", str(tmp_path), "--a", str(bad), "--b", str(bad),
                    "--out", str(tmp_path / "o"), "--batch_size", "0"])
  err = capsys.readouterr().err
  assert e.value.code == 2 and len(err.strip().splitlines()) == 1
  assert "argument --batch_size: 0 is below 1; give 1 or more" in err

"""A model as judge: pairwise preference (AlpacaEval style) and 1-10 grades (MT-Bench style).

The judge is any checkpoint flanjax loads. It gives a verdict in one of two ways:

  generate  it writes a reply, read for "Verdict: A|B|tie" or "Score: N" (the last one);
            a reply that says neither is an unparsed verdict, never a win
  loglik    the log-likelihood of each verdict line after the prompt ("Verdict: A",
            "Verdict: B", "Verdict: tie"; "Score: 1" .. "Score: 10"), through the
            model kind's scoring path (flanjax.evaluation.scoring); the most likely wins

Pairwise: each instruction is judged twice, the answers shown in both orders. The
two verdicts agree (a consistent win, loss or tie) or they flip with the order
(position bias). The win rate counts consistent verdicts only (a tie is half a
win), with a seeded percentile-bootstrap 95% interval over those verdicts; the
mean length of each side's answers shows length bias. Nothing depends on which
file is --a: swapping them mirrors every number.

Grade: each turn of a question is graded on its own, the second turn after the
question's first turn and the model's own first answer; math, reasoning and
coding questions carry the reference answer of each turn.

The prompts are our own wording.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import re
from typing import Callable, Mapping, Sequence

import numpy as np

from flanjax.errors import UserError

MODES = ("generate", "loglik")
SIDES = ("a", "b")
# MT-Bench's categories whose questions are graded against a reference answer.
NEED_REFERENCE = ("math", "reasoning", "coding")

PAIR_PROMPT = """\
Two assistants answered the same request. Decide which answer serves the request better: \
it is correct, helpful, and does what was asked. Do not prefer an answer for coming first \
or second, or for being longer.

[Request]
{instruction}

[Answer A]
{first}

[Answer B]
{second}

Finish with one line: "Verdict: A" if answer A is better, "Verdict: B" if answer B is \
better, or "Verdict: tie" if neither is better."""

GRADE_INTRO = """\
Grade the assistant's {which} below from 1 (useless or wrong) to 10 (correct, helpful and \
complete). {reference_note}Mistakes weigh more than style."""

GRADE_END = """\
Finish with one line: "Score: N", where N is a whole number from 1 to 10."""

PAIR_CHOICES = {"A": "Verdict: A", "B": "Verdict: B", "tie": "Verdict: tie"}
GRADE_CHOICES = {str(k): f"Score: {k}" for k in range(1, 11)}

_VERDICT = re.compile(r"verdict\s*[:\-]?\s*\**\s*\[*\(?\s*(a|b|tie)\b", re.I)
_SCORE = re.compile(r"score\s*[:\-]?\s*\**\s*\[*\s*(\d+(?:\.\d+)?)", re.I)


def clip(text: str, max_chars: int | None) -> str:
  """An answer cut to max_chars characters (marked), so the prompt's end always fits."""
  if max_chars and len(text) > max_chars:
    return text[:max_chars] + " [...]"
  return text


def pairwise_prompt(instruction: str, first: str, second: str) -> str:
  return PAIR_PROMPT.format(instruction=instruction.strip(), first=first.strip(),
                            second=second.strip())


def grade_prompt(turns: Sequence[str], answers: Sequence[str], turn: int,
                 reference: Sequence[str] | None = None) -> str:
  """The prompt grading answer `turn` (0-based) of a conversation; reference: per turn."""
  ref = [r for r in (reference or []) if isinstance(r, str)]
  note = ("A reference answer is given for each question; an answer that disagrees with it "
          "is wrong. " if ref else "")
  which = "answer to the question" if turn == 0 else f"answer to turn {turn + 1}"
  parts = [GRADE_INTRO.format(which=which, reference_note=note)]
  for t in range(turn + 1):
    label = "Question" if turn == 0 else f"User, turn {t + 1}"
    parts.append(f"[{label}]\n{turns[t].strip()}")
    if t < len(ref):
      parts.append(f"[Reference answer{'' if turn == 0 else f', turn {t + 1}'}]\n{ref[t].strip()}")
    if t < turn:
      parts.append(f"[Assistant, turn {t + 1}]\n{answers[t].strip()}")
  label = "Answer to grade" if turn == 0 else f"Answer to grade (assistant, turn {turn + 1})"
  parts.append(f"[{label}]\n{answers[turn].strip()}")
  parts.append(GRADE_END)
  return "\n\n".join(parts)


def parse_verdict(text: str) -> str | None:
  """'A', 'B' or 'tie' from a judge's reply (its last "Verdict: X"), else None.
  A reply that is only the verdict ("A", "tie") counts too."""
  found = _VERDICT.findall(text or "")
  if found:
    v = found[-1]
    return "tie" if v.lower() == "tie" else v.upper()
  bare = (text or "").strip().strip(".*[]()").strip()
  return {"a": "A", "b": "B", "tie": "tie"}.get(bare.lower())


def parse_score(text: str) -> int | None:
  """The grade 1-10 of a reply (its last "Score: N"; a reply that is only a number counts
  too), else None; a number outside 1-10 or not whole is unparsed."""
  found = _SCORE.findall(text or "")
  raw = found[-1] if found else (text or "").strip().rstrip(".")
  try:
    value = float(raw)
  except ValueError:
    return None
  return int(value) if value.is_integer() and 1 <= value <= 10 else None


# ---------------------------------------------------------------- the judge model

class Judge:
  """A loaded checkpoint asked for verdicts (see the module doc for the two modes)."""

  def __init__(self, loaded, fmt, mode: str = "generate", decode=None, batch_size: int = 8,
               max_input_length: int = 2048, log: Callable[[str], None] = print):
    from flanjax import decoding  # pylint: disable=g-import-not-at-top
    if mode not in MODES:
      raise UserError(f"judge mode {mode!r} is not one of {', '.join(MODES)}")
    self.loaded, self.fmt, self.mode, self.log = loaded, fmt, mode, log
    self.batch_size, self.max_input_length = batch_size, max_input_length
    self.decode = decode or decoding.DecodeConfig(max_decode_len=32)
    self.generator = decoding.Generator(loaded.model, loaded.params, loaded.vocab,
                                        max_input_length, self.decode, batch_size=batch_size,
                                        kind=loaded.kind)

  @property
  def truncated(self) -> int:
    return self.generator.truncated

  def ask(self, prompts: Sequence[str], choices: Mapping[str, str],
          parse: Callable[[str], str | None]) -> list[dict]:
    """One {"raw", "verdict" (a key of choices, or None), "loglik"?} per prompt."""
    wrapped = [self.fmt.wrap(p) for p in prompts]
    if self.mode == "generate":
      out = []
      for start in range(0, len(wrapped), self.batch_size * 4):
        texts = self.generator.generate_text(wrapped[start:start + self.batch_size * 4])
        out += [{"raw": self.fmt.cut(t), "verdict": parse(self.fmt.cut(t))} for t in texts]
        self.log(f"judge: {len(out)}/{len(wrapped)} verdicts")
      return out
    return self._by_loglik(wrapped, choices)

  def _by_loglik(self, wrapped, choices):
    from flanjax.evaluation import scoring  # pylint: disable=g-import-not-at-top
    kind, vocab = self.loaded.kind, self.loaded.vocab
    labels = list(choices)
    ctx, cont = [], []
    for w in wrapped:
      ids = self.generator.encode(w)
      if len(ids) > self.max_input_length:
        self.generator.truncated += 1
        ids = kind.fit_prompt(ids, self.max_input_length, vocab.eos_id)
      for label in labels:
        ctx.append(list(ids))
        cont.append(kind.continuation_ids(vocab, choices[label], w))
    ll, _ = scoring.loglikelihood(self.loaded.model, self.loaded.params, kind, ctx, cont,
                                  batch_size=self.batch_size,
                                  max_length=kind.score_length(self.max_input_length))
    out = []
    for i in range(len(wrapped)):
      scores = {lab: float(ll[i * len(labels) + j]) for j, lab in enumerate(labels)}
      best = max(labels, key=lambda lab: scores[lab])  # the first of equal scores
      out.append({"raw": choices[best], "verdict": best,
                  "loglik": {k: round(v, 6) for k, v in scores.items()}})
    self.log(f"judge: {len(out)} verdicts by log-likelihood")
    return out


# ---------------------------------------------------------------- pairwise

@dataclasses.dataclass
class Pair:
  key: str  # the instruction (with its occurrence number when repeated): the sort key
  instruction: str
  a: str
  b: str
  ids: dict = dataclasses.field(default_factory=dict)


INSTRUCTION_FIELDS = ("instruction", "prompt")
OUTPUT_FIELDS = ("output", "generation")


def read_answers(path: str, role: str) -> list[dict]:
  """[{"instruction", "output", ...}] from an answers file (infer's, AlpacaEval's layout)."""
  from flanjax.data import sources  # pylint: disable=g-import-not-at-top
  reader = sources.Reader(path, policy="raise")
  out = []
  for where, rec in sources.read_json_or_jsonl(reader):
    inst = next((rec[f] for f in INSTRUCTION_FIELDS if isinstance(rec.get(f), str)), None)
    outp = next((rec[f] for f in OUTPUT_FIELDS if isinstance(rec.get(f), str)), None)
    if inst is None or outp is None:
      hint = (" (an MT-Bench answers file: grade it with `judge grade`)" if "turns" in rec
              else "")
      raise UserError(f"{where}: --{role} records need an instruction ('instruction' or "
                      f"'prompt') and an answer ('output' or 'generation'); it has "
                      f"{sorted(rec)}{hint}")
    out.append({**rec, "instruction": inst, "output": outp})
    reader.report.kept += 1
  reader.done()
  return out


def _keyed(records):
  seen = collections.Counter()
  out = {}
  for r in records:
    k = r["instruction"].strip()
    seen[k] += 1
    out[k if seen[k] == 1 else f"{k}\n#{seen[k]}"] = r
  return out


def make_pairs(a: list[dict], b: list[dict], a_name: str, b_name: str,
               limit: int | None = None) -> list[Pair]:
  """Pairs by instruction, in --a's order, the first `limit` of them (all when None);
  every --a instruction paired must be in --b."""
  by_b = _keyed(b)
  pairs = []
  for key, ra in list(_keyed(a).items())[:limit]:
    rb = by_b.get(key)
    if rb is None:
      raise UserError(f"{b_name} has no answer to the instruction {ra['instruction'][:80]!r} "
                      f"of {a_name}; answer the same instructions in both files")
    ids = {k: v for k, v in ra.items() if k not in ("instruction", "output", "prompt",
                                                     "generation")}
    pairs.append(Pair(key, ra["instruction"], ra["output"], rb["output"], ids))
  return pairs


def bootstrap_interval(points: Sequence[int], scale: int, resamples: int = 10000,
                       seed: int = 0, level: float = 0.95) -> tuple[float, float]:
  """Percentile bootstrap of mean(points) / scale (points are whole numbers, so that
  `scale - point` resampled with the same seed gives exactly the mirrored interval).

  The interval is (the k-th smallest, the k-th largest) resampled mean, k =
  floor(resamples * (1 - level) / 2)."""
  pts = np.asarray(points, np.int64)
  n = len(pts)
  if n == 0:
    return (float("nan"), float("nan"))
  rng = np.random.default_rng(seed)
  sums = np.empty([resamples], np.int64)
  step = max(1, 4_000_000 // n)
  for s in range(0, resamples, step):
    m = min(step, resamples - s)
    sums[s:s + m] = pts[rng.integers(0, n, size=(m, n))].sum(axis=1)
  sums.sort()
  k = int(math.floor(resamples * (1 - level) / 2))
  return (int(sums[k]) / (n * scale), int(sums[resamples - 1 - k]) / (n * scale))


def _length(texts):
  return {"mean_chars": round(float(np.mean([len(t) for t in texts])), 1) if texts else None,
          "mean_words": round(float(np.mean([len(t.split()) for t in texts])), 1)
          if texts else None}


def pairwise(judge: Judge, pairs: Sequence[Pair], *, names=("a", "b"), resamples: int = 10000,
             seed: int = 0, max_answer_chars: int | None = 6000) -> tuple[list[dict], dict]:
  """(one record per pair, the summary). Each pair is asked as (a, b) then (b, a)."""
  n = len(pairs)
  if not n:
    raise UserError("no pairs to judge")
  prompts = [pairwise_prompt(p.instruction, clip(p.a, max_answer_chars),
                             clip(p.b, max_answer_chars)) for p in pairs]
  prompts += [pairwise_prompt(p.instruction, clip(p.b, max_answer_chars),
                              clip(p.a, max_answer_chars)) for p in pairs]
  said = judge.ask(prompts, PAIR_CHOICES, parse_verdict)
  first_side = {"A": "a", "B": "b", "tie": "tie"}
  second_side = {"A": "b", "B": "a", "tie": "tie"}
  records, position = [], collections.Counter()
  for i, p in enumerate(pairs):
    v1, v2 = said[i], said[n + i]
    s1 = first_side.get(v1["verdict"])
    s2 = second_side.get(v2["verdict"])
    for v in (v1["verdict"], v2["verdict"]):
      position[{"A": "first", "B": "second", "tie": "tie", None: "unparsed"}[v]] += 1
    outcome = ("unparsed" if s1 is None or s2 is None else s1 if s1 == s2 else "flipped")
    records.append({**p.ids, "instruction": p.instruction, "output_a": p.a, "output_b": p.b,
                    "outcome": outcome, "a_first": v1, "b_first": v2})
  counts = collections.Counter(r["outcome"] for r in records)
  # Consistent verdicts in instruction order, so the bootstrap does not depend on which
  # file is --a: points for a are 2 (win), 1 (tie), 0 (loss).
  order = sorted(range(n), key=lambda i: pairs[i].key)
  points = [{"a": 2, "tie": 1, "b": 0}[records[i]["outcome"]] for i in order
            if records[i]["outcome"] in ("a", "b", "tie")]
  consistent = len(points)
  sides = {}
  for side, name in zip(SIDES, names):
    pts = points if side == "a" else [2 - x for x in points]
    texts = [p.a if side == "a" else p.b for p in pairs]
    wins, losses = counts[side], counts["b" if side == "a" else "a"]
    decisive = [r for r in records if r["outcome"] == side]
    longer = sum(len(r[f"output_{side}"]) > len(r[f"output_{'b' if side == 'a' else 'a'}"])
                 for r in decisive)
    sides[side] = {
        "name": name, "wins": wins, "losses": losses,
        "win_rate": (sum(pts) / (2 * consistent)) if consistent else None,
        "ci95": list(bootstrap_interval(pts, 2, resamples, seed)) if consistent else None,
        "wins_by_the_longer_answer": longer, **_length(texts)}
  summary = {"pairs": n, "a": sides["a"], "b": sides["b"], "ties": counts["tie"],
             "flipped": counts["flipped"], "unparsed": counts["unparsed"],
             "consistent": consistent, "verdicts_by_position": dict(sorted(position.items())),
             "mode": judge.mode, "bootstrap": {"resamples": resamples, "seed": seed,
                                               "level": 0.95},
             "win_rate_counts": "consistent verdicts only; a tie is half a win",
             "truncated_prompts": judge.truncated}
  return records, summary


def format_pairwise(s: dict) -> str:
  def rate(side):
    d = s[side]
    if d["win_rate"] is None:
      return f"{d['name']}: no consistent verdicts"
    return (f"{d['name']}: win rate {100 * d['win_rate']:.1f}% (95% CI "
            f"{100 * d['ci95'][0]:.1f}-{100 * d['ci95'][1]:.1f}), mean length "
            f"{d['mean_words']} words")
  return "\n".join([
      f"pairs {s['pairs']}: {s['a']['name']} wins {s['a']['wins']}, loses {s['a']['losses']}, "
      f"ties {s['ties']}; flipped with the order {s['flipped']}; unparsed {s['unparsed']}",
      rate("a"), rate("b"),
      f"verdicts by position: {s['verdicts_by_position']}"])


# ---------------------------------------------------------------- grade (MT-Bench)

def read_graded_answers(path: str) -> list[dict]:
  """MT-Bench answers as infer writes them: question_id, category, turns, answers."""
  from flanjax.data import sources  # pylint: disable=g-import-not-at-top
  reader = sources.Reader(path, policy="raise")
  out = []
  for where, rec in sources.read_json_or_jsonl(reader):
    turns, answers = rec.get("turns"), rec.get("answers")
    if not (isinstance(turns, list) and isinstance(answers, list) and turns
            and len(answers) == len(turns)
            and all(isinstance(x, str) for x in turns + answers)):
      raise UserError(f"{where}: needs 'turns' (the questions) and 'answers' (one per turn), "
                      "as `python -m flanjax.infer --input mt_bench` writes them")
    out.append(rec)
    reader.report.kept += 1
  reader.done()
  return out


def read_references(path: str | None) -> dict:
  """question_id -> reference answer per turn (MT-Bench's reference_answer file)."""
  if not path:
    return {}
  from flanjax.data import sources  # pylint: disable=g-import-not-at-top
  reader = sources.Reader(path, policy="raise")
  out = {}
  for where, rec in sources.read_json_or_jsonl(reader):
    try:
      out[rec["question_id"]] = list(rec["choices"][0]["turns"])
    except (KeyError, IndexError, TypeError):
      raise UserError(f"{where}: a reference answer needs question_id and choices[0].turns")
    reader.report.kept += 1
  reader.done()
  return out


def grade(judge: Judge, answers: Sequence[dict], references: Mapping,
          max_answer_chars: int | None = 6000) -> tuple[list[dict], dict]:
  """(one record per graded turn, the summary: means overall, per turn, per category)."""
  jobs = []
  for rec in answers:
    ref = None
    if rec.get("category") in NEED_REFERENCE:
      ref = references.get(rec.get("question_id")) or rec.get("reference")
    ans = [clip(a, max_answer_chars) for a in rec["answers"]]
    for t in range(len(rec["turns"])):
      jobs.append((rec, t, ref, grade_prompt(rec["turns"], ans, t, ref)))
  said = judge.ask([j[3] for j in jobs], GRADE_CHOICES, parse_score)
  records = []
  for (rec, t, ref, _), v in zip(jobs, said):
    score = v["verdict"] if isinstance(v["verdict"], int) else (
        int(v["verdict"]) if v["verdict"] is not None else None)
    records.append({"question_id": rec.get("question_id"), "category": rec.get("category"),
                    "turn": t + 1, "question": rec["turns"][t], "answer": rec["answers"][t],
                    "reference": ref[t] if ref and t < len(ref) else None,
                    "score": score, **{k: v[k] for k in v if k != "verdict"}})

  def mean(rs):
    s = [r["score"] for r in rs if r["score"] is not None]
    return round(float(np.mean(s)), 3) if s else None

  by_turn = collections.defaultdict(list)
  by_cat = collections.defaultdict(list)
  for r in records:
    by_turn[r["turn"]].append(r)
    by_cat[r["category"]].append(r)
  summary = {"graded": len(records), "questions": len(answers), "mean": mean(records),
             "unparsed": sum(r["score"] is None for r in records),
             "per_turn": {str(k): mean(v) for k, v in sorted(by_turn.items())},
             "per_category": {str(k): mean(v) for k, v in sorted(by_cat.items())},
             "mode": judge.mode, "truncated_prompts": judge.truncated,
             "mean_counts": "parsed grades only"}
  return records, summary


def format_grade(s: dict) -> str:
  shown = lambda v: "n/a (no grade parsed)" if v is None else v  # noqa: E731
  cats = ", ".join(f"{k} {shown(v)}" for k, v in s["per_category"].items())
  turns = ", ".join(f"turn {k} {shown(v)}" for k, v in s["per_turn"].items())
  return (f"{s['graded']} answers of {s['questions']} questions: mean grade {shown(s['mean'])} "
          f"({turns}); unparsed {s['unparsed']}\nper category: {cats}")


def write_jsonl(path: str, records: Sequence[dict]) -> None:
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    for r in records:
      f.write(json.dumps(r, ensure_ascii=False) + "\n")
  os.replace(path + ".tmp", path)

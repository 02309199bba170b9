"""Open-ended prompt sets (MT-Bench, AlpacaEval, instruction_eval) read as conversations,
and the answers to them that `python -m flanjax.infer --input NAME` writes for the judge.

Sets, by name (read under the data folder, ../shared/data) or by the path of their file:

  mt_bench       mt_bench/question.jsonl: 80 questions of two user turns; the second is
                 answered after the model's own first answer
  alpaca_eval    alpaca_eval/text_davinci_003_outputs.json: 805 instructions (its `output`,
                 the reference answer, is not a prompt and is left out)
  lima, vicuna, koala, sinstruct, wizardlm
                 instruction_eval/*.jsonl, each file with its own fields

Answers (one JSON line per question, written as each batch finishes):

  single turn  {"instruction", "output", "generator", ...the record's ids}  (AlpacaEval's
               layout: what `judge pairwise` reads)
  mt_bench     {"question_id", "category", "turns": [q1, q2], "answers": [a1, a2],
               "generator"}  (what `judge grade` reads)
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Callable, Sequence

from flanjax.data import sources
from flanjax.errors import UserError

# name -> (path under the data folder, how a record becomes (turns, ids kept))
INSTRUCTION_EVAL = {
    "lima": "lima_test.jsonl", "vicuna": "vicuna_test_set.jsonl",
    "koala": "koala_test_set.jsonl", "sinstruct": "sinstruct_test_set.jsonl",
    "wizardlm": "wizardlm_test_set.jsonl",
}
SETS = {"mt_bench": ("mt_bench", "question.jsonl"),
        "alpaca_eval": ("alpaca_eval", "text_davinci_003_outputs.json"),
        **{k: ("instruction_eval", v) for k, v in INSTRUCTION_EVAL.items()}}
# Fields other than the prompt that identify a record and are copied to the answers.
ID_FIELDS = ("question_id", "id", "idx", "category", "dataset", "Skill", "Difficulty",
             "motivation_app", "source")


@dataclasses.dataclass
class Question:
  turns: list  # the user turns, in order
  ids: dict  # question_id, category, dataset ... (copied to the answer)
  reference: list = dataclasses.field(default_factory=list)  # a set's own reference per turn


def set_name(spec: str | None) -> str | None:
  """The prompt set `spec` names (a set name, or the path of a set's file), else None."""
  if not spec:
    return None
  if spec in SETS:
    return spec
  base = os.path.basename(spec)
  parent = os.path.basename(os.path.dirname(os.path.abspath(spec)))
  for name, (folder, file) in SETS.items():
    if base == file and (parent == folder or folder != "mt_bench"):
      return name
  return None


def set_path(spec: str) -> str:
  """The file of a set given by name or by path."""
  if spec in SETS:
    return sources.data_path(*SETS[spec])
  sources.check_file(spec)
  return spec


def _text(rec: dict, where: str, field: str) -> str:
  v = rec.get(field)
  if not isinstance(v, str) or not v.strip():
    raise UserError(f"{where}: '{field}' is missing or empty (has {sorted(rec)}); fix or "
                    "remove that record")
  return v


def _turns(name: str, rec: dict, where: str) -> list[str]:
  if name == "mt_bench":
    turns = rec.get("turns")
    if not isinstance(turns, list) or not turns or not all(
        isinstance(t, str) and t.strip() for t in turns):
      raise UserError(f"{where}: 'turns' must be a non-empty list of questions")
    return list(turns)
  if name == "lima":
    conv = rec.get("conversations")
    if not isinstance(conv, list) or not conv or not isinstance(conv[0], str):
      raise UserError(f"{where}: 'conversations' must be a list starting with the question")
    return [conv[0]]
  if name == "sinstruct":
    inst = _text(rec, where, "instruction")
    first = (rec.get("instances") or [{}])[0]
    extra = first.get("input", "") if isinstance(first, dict) else ""
    return [inst + (f"\n\n{extra}" if isinstance(extra, str) and extra.strip() else "")]
  field = {"alpaca_eval": "instruction", "vicuna": "text", "koala": "prompt",
           "wizardlm": "Instruction"}[name]
  return [_text(rec, where, field)]


def read_set(spec: str, max_questions: int | None = None) -> tuple[str, list[Question]]:
  """(set name, its questions in file order)."""
  name = set_name(spec)
  if name is None:
    raise UserError(f"{spec} is not an open-ended prompt set; give one of {', '.join(SETS)} "
                    "or the path of its file")
  path = set_path(spec)
  reader = sources.Reader(path, policy="raise")
  out = []
  for where, rec in sources.read_json_or_jsonl(reader):
    ref = rec.get("reference") if name == "mt_bench" else None
    out.append(Question(_turns(name, rec, where),
                        {k: rec[k] for k in ID_FIELDS if k in rec},
                        list(ref) if isinstance(ref, list) else []))
    reader.report.kept += 1
    if max_questions and len(out) >= max_questions:
      break
  reader.done()
  return name, out


def conversation(turns: Sequence[str], answers: Sequence[str]) -> list[dict]:
  """The messages before the next answer: user turns with the answers given so far."""
  msgs = []
  for i, q in enumerate(turns):
    msgs.append({"role": "user", "content": q})
    if i < len(answers):
      msgs.append({"role": "assistant", "content": answers[i]})
  return msgs


def render(fmt, turns: Sequence[str], answers: Sequence[str]) -> str:
  """The prompt of the next turn: the lone question as infer wraps it, or the conversation
  so far (the model's own answers included) in the prompt format."""
  if not answers:
    return fmt.wrap(turns[0])
  return fmt.render_prompt(conversation(turns[:len(answers) + 1], answers))


def answer(questions: Sequence[Question], generate: Callable[[list[str]], list[str]], fmt,
           batch_size: int, write: Callable[[int, list], None],
           log: Callable[[str], None] = print) -> list[list[str]]:
  """Answers every turn of every question, turn by turn (turn k+1 sees answer k).

  generate: prompts -> generations (already cut at stop strings and end of turn).
  write(i, answers) is called once question i has all its answers, in order."""
  answers = [[] for _ in questions]
  max_turns = max(len(q.turns) for q in questions)
  total = sum(len(q.turns) for q in questions)
  done, t0, written = 0, time.time(), 0
  for t in range(max_turns):
    todo = [i for i, q in enumerate(questions) if len(q.turns) > t]
    for start in range(0, len(todo), batch_size):
      part = todo[start:start + batch_size]
      outs = generate([render(fmt, questions[i].turns, answers[i]) for i in part])
      for i, o in zip(part, outs):
        answers[i].append(o)
      done += len(part)
      rate = done / max(time.time() - t0, 1e-9)
      log(f"infer: turn {t + 1}/{max_turns}, {done}/{total} answers, {rate:.2f} answers/s, "
          f"ETA {(total - done) / max(rate, 1e-9):.0f}s")
      while written < len(questions) and len(answers[written]) == len(questions[written].turns):
        write(written, answers[written])  # every earlier question is complete
        written += 1
  return answers


def answer_record(name: str, q: Question, answers: Sequence[str], generator: str) -> dict:
  if name == "mt_bench":
    return {**q.ids, "turns": list(q.turns), "answers": list(answers), "generator": generator}
  return {**q.ids, "instruction": q.turns[0], "output": answers[0], "generator": generator}


def infer(spec: str, checkpoint: str, step, fmt, cfg, *, batch_size: int,
          max_input_length: int, output: str | None, max_questions: int | None = None) -> int:
  """`python -m flanjax.infer --input mt_bench` and the like: every turn answered, one JSON
  line per question to `output` (or stdout)."""
  from flanjax import decoding  # pylint: disable=g-import-not-at-top
  from flanjax.models import loading  # pylint: disable=g-import-not-at-top
  name, questions = read_set(spec, max_questions)
  log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
  t0 = time.time()
  loaded = loading.load(checkpoint, step=step)
  log(f"infer: {loaded.source} ({loaded.kind.name}); {len(questions)} {name} questions in "
      f"the {fmt.name} prompt format; {cfg.method} decoding, up to {cfg.max_decode_len} new "
      "tokens")
  gen = decoding.Generator(loaded.model, loaded.params, loaded.vocab, max_input_length, cfg,
                           batch_size=batch_size, kind=loaded.kind)

  def generate(prompts):
    ids = gen.generate_ids([gen.encode(p) for p in prompts])
    return [fmt.cut(gen.decode(row)).strip() for row in ids]

  out = open(output, "w", encoding="utf-8") if output else sys.stdout
  try:
    def write(i, answers):
      out.write(json.dumps(answer_record(name, questions[i], answers, loaded.source),
                           ensure_ascii=False) + "\n")
      out.flush()
    answer(questions, generate, fmt, batch_size, write, log)
  finally:
    if out is not sys.stdout:
      out.close()
  if gen.truncated:
    log(f"infer: {gen.truncated} prompts were longer than --max_input_length="
        f"{max_input_length} tokens and were cut")
  log(f"infer: done in {time.time() - t0:.1f}s" + (f", wrote {output}" if output else ""))
  return 0

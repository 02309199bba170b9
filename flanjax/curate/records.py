"""Records of any format flanjax trains on, kept whole, and written back so they still train.

Reading goes through the readers of `flanjax.data.collections.user` (format
detection, per-format checks, bad records counted by reason), one raw record at
a time, so a record's extra fields (`id`, `score`) survive curation. Also read:
Self-Instruct seed task files (`instances`), one record per instance, and the FLAN
CoT TSV files (question, answer, rationale), both written back as Alpaca records
(as chat `messages`, like every record, when the output mixes formats).

What curation compares: `instruction` (the user's first request; the Alpaca
preamble that some ShareGPT dumps wrap it in is taken off), `input`, `response`
(the assistant's turns), and for duplicates and evaluation overlap `text`: every
turn of a conversation (system, user and assistant), every field of a record.
Written back: the raw record, when every input had one format; else every record as
chat `messages` (the whole conversation) with its other fields (`id`, `score`)
kept. Generated records are Alpaca.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from typing import Iterable, Sequence

from flanjax.data import sources
from flanjax.data.collections import user
from flanjax.errors import UserError

SEED_TASKS = "seed_tasks"
FLAN_COT_TSV = "flan_cot_tsv"  # question, answer, rationale (the FLAN CoT files)
CONVERTED = (SEED_TASKS, FLAN_COT_TSV)  # written back as Alpaca records
# "Below is an instruction that describes a task. ... ### Instruction: X ### Input: Y ### Response:"
_PREAMBLE = re.compile(r"^\s*Below is an instruction that describes a task[^#]*###\s*Instruction:\s*",
                       re.S)
_INPUT = re.compile(r"\s*###\s*Input:\s*")
_RESPONSE = re.compile(r"\s*###\s*Response:\s*$")


@dataclasses.dataclass
class Record:
  raw: dict
  fmt: str
  where: str
  instruction: str
  input: str
  response: str
  task: dict | None = None  # a seed task file's whole task, for self-instruct
  messages: tuple | None = None  # a conversation's every turn ({role, content}), in order

  @property
  def prompt(self) -> str:
    return f"{self.instruction}\n\n{self.input}" if self.input else self.instruction

  @property
  def text(self) -> str:
    """The whole example, for near-duplicate and overlap checks: a conversation's every
    turn (a later user turn can hold evaluation data as well as the first)."""
    if self.messages:
      return "\n\n".join(m["content"] for m in self.messages)
    return f"{self.prompt}\n\n{self.response}"

  def conversation(self) -> list[dict]:
    """The record as chat messages: every turn of a conversation, else the prompt and the
    response."""
    if self.messages:
      return [dict(role=m["role"], content=m["content"]) for m in self.messages]
    return [{"role": "user", "content": self.prompt},
            {"role": "assistant", "content": self.response}]

  @property
  def key(self) -> str:
    return hashlib.sha256(json.dumps(self.raw, sort_keys=True, ensure_ascii=False)
                          .encode()).hexdigest()[:20]


def split_preamble(text: str) -> tuple[str, str]:
  """(instruction, input) of a user turn, without the Alpaca preamble if it has one."""
  if not _PREAMBLE.match(text):
    return text.strip(), ""
  body = _RESPONSE.sub("", _PREAMBLE.sub("", text, count=1))
  parts = _INPUT.split(body, maxsplit=1)
  return parts[0].strip(), (parts[1].strip() if len(parts) > 1 else "")


def alpaca(instruction: str, input_: str, output: str, **extra) -> Record:
  raw = {"instruction": instruction, "input": input_, "output": output, **extra}
  return Record(raw, "alpaca", "generated", instruction, input_, output)


def _from_examples(fmt: str, where: str, rec: dict, examples: list[dict]) -> Record:
  ex = examples[0]
  if "messages" in ex:
    msgs = ex["messages"]
    first_user = next((m["content"] for m in msgs[:ex["turn"]] if m["role"] == "user"), "")
    inst, inp = split_preamble(first_user)
    response = "\n\n".join(m["content"] for m in msgs if m["role"] == "assistant")
    turns = tuple({"role": m["role"], "content": m["content"]} for m in msgs)
    return Record(rec, fmt, where, inst, inp, response, messages=turns)
  if "instruction" in ex:
    return Record(rec, fmt, where, ex["instruction"], ex["input"], ex["answer"])
  inst, inp = split_preamble(ex["prompt"])
  return Record(rec, fmt, where, inst, inp, ex["answer"])


def _seed_records(reader: sources.Reader) -> Iterable[Record]:
  for where, rec in sources.read_jsonl(reader):
    if not sources.require(reader, where, rec, ("instruction", "instances"),
                           non_empty=("instruction",)):
      continue
    insts = rec["instances"] if isinstance(rec["instances"], list) else []
    good = [i for i in insts if isinstance(i, dict) and isinstance(i.get("input"), str)
            and isinstance(i.get("output"), str) and i["output"].strip()]
    if not good:
      reader.bad(where, "tasks without usable instances", "no {input, output} instance with an output",
                 "give each task at least one instance")
      continue
    for k, inst in enumerate(good):
      reader.report.kept += 1  # one record per instance, as they are yielded
      raw = {"instruction": rec["instruction"].strip(), "input": inst["input"].strip(),
             "output": inst["output"].strip()}
      yield Record(raw, SEED_TASKS, f"{where} instance {k}", raw["instruction"], raw["input"],
                   raw["output"], task=rec)


def _tsv_records(reader: sources.Reader) -> Iterable[Record]:
  from flanjax.data.collections import flan_cot  # pylint: disable=g-import-not-at-top
  for where, rec in sources.read_tsv(reader, flan_cot.COLUMNS):
    if sources.require(reader, where, rec, flan_cot.COLUMNS, non_empty=("question", "answer")):
      reader.report.kept += 1
      out = (f"{rec['rationale']} So the answer is {rec['answer']}." if rec["rationale"]
             else rec["answer"])
      raw = {"instruction": rec["question"], "input": "", "output": out}
      yield Record(raw, FLAN_COT_TSV, where, rec["question"], "", out)


def detect(path: str) -> str:
  if path.endswith(".tsv"):
    return FLAN_COT_TSV
  where, rec, problem = sources.first_record(path)
  if rec is None:  # user.detect_format's message offers a format option curate has not
    raise UserError(f"{path}: no record to curate ({problem}); give a file with records, or "
                    "leave it out of the inputs")
  if "instances" in rec and "instruction" in rec:
    return SEED_TASKS
  return user.detect_format(path, named_by=None)  # curate has no format option to name


def read(path: str) -> tuple[list[Record], sources.ReadReport]:
  """The records of one file, any format; bad ones counted by reason in the report."""
  if os.path.isdir(path):
    raise UserError(f"{path} is a folder; curate reads files (JSON, JSON lines)")
  sources.check_file(path)
  fmt = detect(path)
  reader = sources.Reader(path, "skip")
  if fmt in CONVERTED:
    out = list((_seed_records if fmt == SEED_TASKS else _tsv_records)(reader))
  else:
    out = []
    for where, rec in sources.read_json_or_jsonl(reader):
      examples = user.record_examples(reader, fmt, where, rec)
      if examples:
        out.append(_from_examples(fmt, where, rec, examples))
  return out, reader.done()


def read_all(paths: Sequence[str]) -> tuple[list[Record], list[sources.ReadReport]]:
  records, reports = [], []
  for p in paths:
    r, rep = read(p)
    records += r
    reports.append(rep)
  return records, reports


# The fields that hold a record's text in each format; the others (id, score, ...) are kept
# beside the messages when records of several formats are written as chat.
_TEXT_KEYS = {"instruction", "input", "output", "prompt", "completion", "messages", "conversations"}


def as_messages(r: Record) -> dict:
  extra = {k: v for k, v in r.raw.items() if k not in _TEXT_KEYS} if r.fmt not in CONVERTED else {}
  return {**extra, "messages": r.conversation()}


def to_json(r: Record, mixed: bool) -> dict:
  # Mixed output is chat throughout: the trainer detects one format from the first line.
  if mixed:
    return as_messages(r)
  return dict(r.raw) if r.fmt in CONVERTED else r.raw


def write(path: str, records: Sequence[Record]) -> None:
  """JSON lines that runs/user_data.gin trains on as they are; written whole, then renamed."""
  fmts = {"alpaca" if r.fmt in CONVERTED else r.fmt for r in records}
  mixed = len(fmts) > 1
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  try:
    with open(tmp, "w", encoding="utf-8") as f:
      for r in records:
        f.write(json.dumps(to_json(r, mixed), ensure_ascii=False) + "\n")
    os.replace(tmp, path)
  except BaseException:
    if os.path.isfile(tmp):  # no half-written file left beside OUT
      os.remove(tmp)
    raise


def words(text: str) -> list[str]:
  return re.findall(r"\w+", text.lower())

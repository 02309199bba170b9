"""The user's own data, by path: Alpaca, prompt/completion, chat and NIv2 task folders.

Bound in gin, one dict per task::

    user_data.tasks = [
        {'name': 'my_alpaca', 'path': '/data/alpaca.json', 'format': 'alpaca'},
        {'name': 'my_chat', 'path': '/data/chat.jsonl', 'format': 'chat'},
        {'name': 'my_niv2', 'path': '/data/niv2_tasks/', 'format': 'niv2'},
    ]

Formats (records are JSON lines, or a JSON array for alpaca):

  alpaca             {"instruction", "input" (may be empty), "output"}
  prompt_completion  {"prompt", "completion"}
  chat               {"messages": [{"role": "system"|"user"|"assistant", "content"}]};
                     every assistant turn is a target, the conversation before it the input
  niv2               a folder of Super-NaturalInstructions task files (Definition,
                     Positive Examples, Instances); one task per file, and a mixture
                     of them under `name`

Optional keys: 'templates' (a template family, or 'none' for the text as given;
alpaca defaults to the 'instruction' family), 'num_shots', 'validation_share'
(a stable share of records held out as the validation split), 'train_formats'.
Bad records follow `bad_records.policy`.
"""

from __future__ import annotations

import json
import os
import random
from typing import Mapping, Sequence

import gin

from flanjax.data import cache, sources
from flanjax.data.tasks import TaskDef, load_templates
from flanjax.data.templates import Template
from flanjax.errors import UserError

FORMATS = ("alpaca", "prompt_completion", "chat", "niv2")
ROLES = ("system", "user", "assistant")
ROLE_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}
RAW = {"alpaca": Template("{instruction}\n\n{input}"),
       "prompt_completion": Template("{prompt}"),
       "chat": Template("{prompt}")}


def _alpaca(reader):
  for where, rec in sources.read_json_or_jsonl(reader):
    if not sources.require(reader, where, rec, ("instruction", "output"),
                           non_empty=("instruction", "output")):
      continue
    inp = rec.get("input") or ""
    if not isinstance(inp, str):
      reader.bad(where, "records with non-text 'input'", "'input' is not a string",
                 "make 'input' a string (or leave it out)")
      continue
    reader.report.kept += 1
    yield dict(instruction=rec["instruction"].strip(), input=inp.strip(),
               answer=rec["output"].strip())


def _prompt_completion(reader):
  for where, rec in sources.read_jsonl(reader):
    if not sources.require(reader, where, rec, ("prompt", "completion"),
                           non_empty=("prompt", "completion")):
      continue
    reader.report.kept += 1
    # The completion is kept as written (leading space included): it is the target.
    yield dict(prompt=rec["prompt"].rstrip(), answer=rec["completion"].strip())


def render_turns(turns: Sequence[Mapping]) -> str:
  """A conversation so far, ending with the cue for the assistant's next turn."""
  lines = [f"{ROLE_NAMES[t['role']]}: {t['content'].strip()}" for t in turns]
  return "\n".join(lines + ["Assistant:"])


def _chat(reader):
  for where, rec in sources.read_jsonl(reader):
    if not sources.require(reader, where, rec, ("messages",)):
      continue
    msgs = rec["messages"]
    problem = None
    if not isinstance(msgs, list) or not msgs:
      problem = ("chats without messages", "'messages' is not a non-empty list",
                 "give a list of {role, content} messages")
    else:
      for k, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
          problem = ("malformed messages", f"message {k} is not {{role: {'|'.join(ROLES)}, content: str}}",
                     "fix that message")
          break
        if m["role"] == "assistant" and not m["content"].strip():
          problem = ("empty assistant turns", f"message {k} is an empty assistant turn",
                     "remove it or give it text (it would be an empty target)")
          break
      else:
        if not any(m["role"] == "assistant" for m in msgs):
          problem = ("chats without an assistant turn", "no assistant message, so nothing to learn",
                     "add the assistant's reply")
    if problem:
      reader.bad(where, *problem)
      continue
    reader.report.kept += 1
    for k, m in enumerate(msgs):
      if m["role"] == "assistant":
        yield dict(prompt=render_turns(msgs[:k]), answer=m["content"].strip())


_READERS = {"alpaca": _alpaca, "prompt_completion": _prompt_completion, "chat": _chat}


def read_records(reader: sources.Reader, fmt: str):
  """Example dicts (prompt or instruction fields, answer) of a file in format `fmt` (not niv2)."""
  if fmt not in _READERS:
    raise UserError(f"unknown record format {fmt!r}; choose one of {sorted(_READERS)}")
  return _READERS[fmt](reader)


def _split_records(records: Sequence[dict], split: str, share: float) -> list[dict]:
  if not share:
    return list(records)
  held = [sources.holdout(json.dumps(r, sort_keys=True), share) for r in records]
  return [r for r, h in zip(records, held) if h == (split == "validation")]


def _read_file(path: str, fmt: str, policy: str) -> tuple[dict, ...]:
  # Keyed by the file's size and mtime too: a file fixed in place is read again.
  stamp = sources.fingerprint_paths([path]) if os.path.exists(path) else ""
  return _read_file_once(path, fmt, policy, stamp)


@cache.in_process
def _read_file_once(path: str, fmt: str, policy: str, stamp: str) -> tuple[dict, ...]:
  del stamp  # part of the cache key only
  reader = sources.Reader(path, policy)
  out = tuple(read_records(reader, fmt))
  reader.done()
  return out


# ------------------------------------------------------------------ NIv2

def read_niv2_file(path: str, policy: str | None = None) -> dict:
  """One NIv2 task file -> {definition, positives: [(input, output)], instances: [...]}."""
  reader = sources.Reader(path, policy)
  sources.check_file(path)
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except UnicodeDecodeError as e:
    raise UserError(f"{path}: bytes that are not UTF-8 at offset {e.start}; re-encode as UTF-8") from None
  except json.JSONDecodeError as e:
    raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); fix the file") from None
  if not isinstance(data, dict):
    raise UserError(f"{path}: not a Super-NaturalInstructions task file (top level is not an object)")
  for key in ("Definition", "Instances"):
    if key not in data:
      raise UserError(f"{path}: no '{key}' key; a Super-NaturalInstructions task file needs "
                      "'Definition' and 'Instances'")
  definition = data["Definition"]
  if isinstance(definition, list):
    definition = " ".join(definition)
  definition = str(definition).strip()
  positives = []
  for j, ex in enumerate(data.get("Positive Examples") or []):
    if isinstance(ex, dict) and str(ex.get("input", "")).strip() and str(ex.get("output", "")).strip():
      positives.append((str(ex["input"]).strip(), str(ex["output"]).strip()))
  instances = []
  for j, inst in enumerate(data["Instances"]):
    where = f"{path} instance {j}"
    if not isinstance(inst, dict) or "input" not in inst or "output" not in inst:
      reader.bad(where, "instances missing input/output", "needs 'input' and 'output'",
                 "give every instance both")
      continue
    outs = inst["output"] if isinstance(inst["output"], list) else [inst["output"]]
    outs = [str(o).strip() for o in outs if str(o).strip()]
    if not outs:
      reader.bad(where, "instances with empty output", "the output list is empty",
                 "give every instance a non-empty output")
      continue
    reader.report.kept += 1
    instances.append(dict(definition=definition, input=str(inst["input"]).strip(),
                          answer=outs[0], references=outs))
  reader.done()
  return dict(definition=definition, positives=positives, instances=instances)


def _niv2_render(num_shots: int, family: str):
  temps = load_templates(family)

  def render(ex, index, split, fits, input_budget=None):
    del input_budget  # `fits` is the budget
    data = ex["_task"]
    rng = random.Random(f"niv2/{ex['_name']}/{split}/{index}")
    t = temps[rng.randrange(len(temps))] if split == "train" else temps[index % len(temps)]
    # The task's own positive examples are its exemplars; never the instance asked.
    shots = [p for p in data["positives"] if p[0] != ex["input"]][:num_shots]
    while True:
      block = "\n\n".join(f"Example {k + 1}\nInput: {i}\nOutput: {o}" for k, (i, o) in enumerate(shots))
      fields = dict(ex, definition=ex["definition"] + (f"\n\n{block}" if block else ""))
      inputs = t.inputs.format(**{k: v for k, v in fields.items() if isinstance(v, str)})
      if not shots or fits is None or fits(inputs):
        return inputs.strip(), ex["answer"]
      shots = shots[1:]

  render.fingerprint = f"niv2/{num_shots}/{[t.inputs for t in temps]}"
  return render


# ------------------------------------------------------------------ gin entry

def _task_defs_of(spec: Mapping) -> tuple[list[TaskDef], list[str]]:
  """TaskDefs of one user spec, and the mixture members if it is a folder."""
  unknown = set(spec) - {"name", "path", "format", "templates", "num_shots",
                         "validation_share", "train_formats"}
  if unknown:
    raise UserError(f"user_data.tasks entry {spec.get('name')!r}: unknown keys {sorted(unknown)}")
  for key in ("name", "path", "format"):
    if not spec.get(key):
      raise UserError(f"user_data.tasks entry {dict(spec)}: needs '{key}'")
  name, path, fmt = spec["name"], os.path.expanduser(spec["path"]), spec["format"]
  if fmt not in FORMATS:
    raise UserError(f"user_data.tasks entry {name!r}: unknown format {fmt!r}; choose one of {FORMATS}")
  share = float(spec.get("validation_share", 0.0))
  splits = ("train", "validation") if share else ("train",)
  shots = int(spec.get("num_shots", 2))
  policy = sources.bad_records()
  if fmt == "niv2":
    defs = []
    for file in sources.files_in(path, "*.json"):
      stem = os.path.splitext(os.path.basename(file))[0]
      task_name = f"{name}_{stem}"

      def load(split, file=file, stem=stem):
        data = read_niv2_file(file, policy)
        return [dict(r, _task=data, _name=stem) for r in _split_records(data["instances"], split, share)]

      defs.append(TaskDef(
          name=task_name, load=load, splits=splits, templates=spec.get("templates") or "niv2",
          render_fn=_niv2_render(shots, spec.get("templates") or "niv2"),
          fingerprint=lambda f=file: sources.fingerprint_paths([f]) + f"/{share}",
          key=lambda ex: ex["input"], description=f"NIv2 {stem} from {file}"))
    return defs, [d.name for d in defs]
  family = spec.get("templates") or ("instruction" if fmt == "alpaca" else "none")
  templates = [RAW[fmt]] if family == "none" else family
  if os.path.isdir(path):
    raise UserError(f"{path} is a folder; format {fmt!r} reads one file (folders are for 'niv2')")

  def load(split):
    return _split_records(_read_file(path, fmt, policy), split, share)

  formats = tuple(spec.get("train_formats") or (("zero_shot", "few_shot") if shots else ("zero_shot",)))
  if fmt == "chat":
    formats = ("zero_shot",)  # the conversation is the context; no exemplars
  return [TaskDef(name=name, load=load, splits=splits, templates=templates,
                  train_formats=formats, num_shots=shots,
                  fingerprint=lambda: sources.fingerprint_paths([path]) + f"/{share}",
                  description=f"{fmt} records from {path}")], []


@gin.configurable
def user_data(tasks: Sequence[Mapping] = ()) -> tuple[list[TaskDef], dict[str, list[str]]]:
  """TaskDefs of the user's files, and the mixtures of NIv2 folders (name -> tasks)."""
  defs, mixtures = [], {}
  for spec in tasks:
    d, members = _task_defs_of(spec)
    defs.extend(d)
    if members:
      mixtures[spec["name"]] = members
  return defs, mixtures

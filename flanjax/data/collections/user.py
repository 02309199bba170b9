"""The user's own data, by path: Alpaca, prompt/completion, chat, ShareGPT and NIv2 folders.

Bound in gin, one dict per task::

    user_data.tasks = [
        {'name': 'my_alpaca', 'path': '/data/alpaca.json', 'format': 'alpaca'},
        {'name': 'my_chat', 'path': '/data/chat.jsonl'},            # format: auto
        {'name': 'my_niv2', 'path': '/data/niv2_tasks/', 'format': 'niv2'},
    ]
    user_data.prompt_format = 'chatml'   # plain | alpaca | phi3 | chatml | hf_chat_template

Formats (every one reads JSON lines or a JSON array of records):

  auto               (the default) the first record decides, and the choice is printed
  alpaca             {"instruction", "input" (may be empty), "output"}
  prompt_completion  {"prompt", "completion"}
  chat               {"messages": [{"role": "system"|"user"|"assistant", "content"}]}
  sharegpt           {"conversations": [{"from": "system"|"human"|"user"|"gpt"|"assistant",
                     "value"}]}
  niv2               a folder of Super-NaturalInstructions task files (Definition,
                     Positive Examples, Instances); one task per file, and a mixture
                     of them under `name`

Conversations (chat, sharegpt): every assistant turn is one example, its input
the conversation before it, its target the turn (see flanjax/data/chat.py); a
validation share holds out whole conversations. The prompt format
(`user_data.prompt_format`, chat.NAMES) renders every user task: `plain` is
flanjax's own (Alpaca records through the template family 'instruction',
prompts as given, conversations as "User: ...\nAssistant:"); the others render
each record as a conversation, with no template family. hf_chat_template reads
the chat template of `user_data.chat_template` (a tokenizer folder), else of
train.init_from.

Optional keys: 'templates' (a template family, or 'none' for the text as given;
alpaca defaults to the 'instruction' family; plain prompt format only),
'num_shots', 'validation_share' (a stable share of records held out as the
validation split), 'validation_path' (a file of the same kind that is the
validation split; the training file is then all training data, whatever the
share), 'train_formats'. Bad records follow `bad_records.policy`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
from typing import Mapping, Sequence

import gin

from flanjax import config as flan_config
from flanjax.data import cache, chat, sources
from flanjax.data import templates as tmpl
from flanjax.data.tasks import TaskDef, load_templates
from flanjax.data.templates import Template
from flanjax.errors import UserError

FORMATS = ("auto", "alpaca", "prompt_completion", "chat", "sharegpt", "niv2")
ROLES = chat.ROLES
ROLE_NAMES = chat.Plain.ROLE_NAMES
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant"}
# How `auto` tells the formats apart: the keys of a record.
SIGNATURES = (("sharegpt", ("conversations",)), ("chat", ("messages",)),
              ("alpaca", ("instruction", "output")), ("prompt_completion", ("prompt", "completion")))
RAW = {"alpaca": Template("{instruction}\n\n{input}"),
       "prompt_completion": Template("{prompt}"),
       "chat": Template("{prompt}")}


def _records(reader, records):
  """The (where, record) pairs given, else those of the reader's file."""
  return sources.read_json_or_jsonl(reader) if records is None else records


def _alpaca(reader, records=None):
  for where, rec in _records(reader, records):
    if not sources.require(reader, where, rec, ("instruction", "output"),
                           non_empty=("instruction", "output")):
      continue
    inp = rec.get("input") or ""
    if not isinstance(inp, str):
      reader.bad(where, "records with non-text 'input'", "'input' is not a string",
                 "make 'input' a string (or leave it out)")
      continue
    if rec.get("history") or rec.get("system"):  # LLaMA-Factory's multi-turn Alpaca
      turns = _alpaca_turns(reader, where, rec, inp)
      if turns is not None:
        yield from _conversation_examples(reader, where, turns)
      continue
    reader.report.kept += 1
    yield dict(instruction=rec["instruction"].strip(), input=inp.strip(),
               answer=rec["output"].strip())


def _has_turns(path: str) -> bool:
  """Whether an Alpaca file has a record with LLaMA-Factory's history or system (read as
  records only: its bad records are counted or raised where its examples are read)."""
  if not os.path.isfile(path):
    return False
  return _has_turns_once(path, sources.fingerprint_paths([path]))


@cache.in_process
def _has_turns_once(path: str, stamp: str) -> bool:
  del stamp  # part of the cache key only
  try:
    return any(isinstance(rec, dict) and (rec.get("history") or rec.get("system"))
               for _, rec in sources.read_json_or_jsonl(sources.Reader(path, "skip")))
  except UserError:
    return False  # unreadable: reading its examples says why


def _alpaca_turns(reader, where, rec, inp):
  """An Alpaca record's `system` and `history` ([[question, answer], ...], earlier turns
  first), then its own turn, as messages; None (counted) when they are malformed."""
  history, system = rec.get("history") or [], rec.get("system") or ""
  if not isinstance(system, str) or not isinstance(history, list) or not all(
      isinstance(h, (list, tuple)) and len(h) == 2 and all(isinstance(t, str) for t in h)
      for h in history):
    reader.bad(where, "records with malformed 'history' or 'system'",
               "'history' is not a list of [question, answer] string pairs, or 'system' is "
               "not a string", "give 'history' as [[question, answer], ...] and 'system' as text")
    return None
  turns = [{"role": "system", "content": system}] if system.strip() else []
  for question, answer in history:
    turns += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
  ask = rec["instruction"].strip() + (f"\n\n{inp.strip()}" if inp.strip() else "")
  return turns + [{"role": "user", "content": ask}, {"role": "assistant", "content": rec["output"]}]


def _prompt_completion(reader, records=None):
  for where, rec in _records(reader, records):
    if not sources.require(reader, where, rec, ("prompt", "completion"),
                           non_empty=("prompt", "completion")):
      continue
    reader.report.kept += 1
    # The completion is kept as written (leading space included): it is the target.
    yield dict(prompt=rec["prompt"].rstrip(), answer=rec["completion"].strip())


def render_turns(turns: Sequence[Mapping]) -> str:
  """A conversation so far, ending with the cue for the assistant's next turn (plain)."""
  return chat.Plain().render_prompt(turns)


def _check_conversation(msgs) -> tuple[str, str, str] | None:
  """None, or (reason, detail, fix) of what makes a list of messages unusable."""
  if not msgs:
    return ("chats without messages", "the conversation is empty",
            "give a list of messages with at least one assistant turn")
  for k, m in enumerate(msgs):
    if m["role"] == "assistant" and not m["content"].strip():
      return ("empty assistant turns", f"message {k} is an empty assistant turn",
              "remove it or give it text (it would be an empty target)")
  if not any(m["role"] == "assistant" for m in msgs):
    return ("chats without an assistant turn", "no assistant message, so nothing to learn",
            "add the assistant's reply")
  return None


def _conversation_examples(reader, where, msgs):
  """One example per assistant turn; the messages are shared, not copied, so a long
  conversation costs its own size once (see chat.fit_example for its rendering)."""
  # A conversation cut out of a longer one often starts with the assistant: that reply has
  # no question to answer, so it is dropped (as FastChat does), and the drop is counted.
  lead = next((i for i, m in enumerate(msgs) if m["role"] != "system"), len(msgs))
  cut = lead
  while cut < len(msgs) and msgs[cut]["role"] == "assistant":
    cut += 1
  if cut > lead:
    msgs = list(msgs[:lead]) + list(msgs[cut:])
    if not any(m["role"] == "assistant" for m in msgs):
      reader.bad(where, "chats without a user turn", "its assistant turns come before any user "
                 "turn, so no reply answers a question", "add the user's turn before the reply")
      return
    reader.changed(where, "leading assistant turn(s) with no user turn before them dropped")
  problem = _check_conversation(msgs)
  if problem:
    reader.bad(where, *problem)
    return
  reader.report.kept += 1
  msgs = tuple({"role": m["role"], "content": m["content"].strip()} for m in msgs)
  conv = hashlib.sha256(json.dumps(msgs, ensure_ascii=False).encode()).hexdigest()[:16]
  for k, m in enumerate(msgs):
    if m["role"] == "assistant":
      yield dict(messages=msgs, turn=k, answer=m["content"], _conv=conv, _where=where)


def _chat(reader, records=None):
  for where, rec in _records(reader, records):
    if not sources.require(reader, where, rec, ("messages",)):
      continue
    msgs = rec["messages"]
    if not isinstance(msgs, list) or not msgs:
      reader.bad(where, "chats without messages", "'messages' is not a non-empty list",
                 "give a list of {role, content} messages")
      continue
    bad = next((k for k, m in enumerate(msgs) if not isinstance(m, dict)
                or m.get("role") not in ROLES or not isinstance(m.get("content"), str)), None)
    if bad is not None:
      m = msgs[bad]
      found = (f"role {m.get('role')!r}" if isinstance(m, dict) and "role" in m else
               f"keys {sorted(m)[:6]}" if isinstance(m, dict) else type(m).__name__)
      hint = (" (ShareGPT's roles: give the file format 'sharegpt' with 'conversations' of "
              "{from, value})") if isinstance(m, dict) and m.get("role") in ("human", "gpt") else ""
      reader.bad(where, "malformed messages",
                 f"message {bad} is not {{role: {'|'.join(ROLES)}, content: str}} (it has "
                 f"{found}){hint}", "fix that message")
      continue
    yield from _conversation_examples(reader, where, msgs)


def _sharegpt(reader, records=None):
  for where, rec in _records(reader, records):
    if not sources.require(reader, where, rec, ("conversations",)):
      continue
    turns = rec["conversations"]
    if not isinstance(turns, list) or not turns:
      reader.bad(where, "chats without messages", "'conversations' is not a non-empty list",
                 "give a list of {from, value} turns")
      continue
    bad = next((k for k, t in enumerate(turns) if not isinstance(t, dict)
                or t.get("from") not in SHAREGPT_ROLES or not isinstance(t.get("value"), str)),
               None)
    if bad is not None:
      t = turns[bad]
      found = (f"from {t.get('from')!r}" if isinstance(t, dict) and "from" in t else
               f"keys {sorted(t)[:6]}" if isinstance(t, dict) else type(t).__name__)
      reader.bad(where, "malformed turns",
                 f"turn {bad} is not {{from: {'|'.join(SHAREGPT_ROLES)}, value: str}} (it has "
                 f"{found})", "fix that turn (roles are lower case)")
      continue
    yield from _conversation_examples(
        reader, where, [{"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]} for t in turns])


_READERS = {"alpaca": _alpaca, "prompt_completion": _prompt_completion, "chat": _chat,
            "sharegpt": _sharegpt}


def read_records(reader: sources.Reader, fmt: str):
  """Example dicts (prompt or instruction fields, answer) of a file in format `fmt` (not niv2)."""
  if fmt not in _READERS:
    raise UserError(f"unknown record format {fmt!r}; choose one of {sorted(_READERS)}")
  return _READERS[fmt](reader)


def record_examples(reader: sources.Reader, fmt: str, where: str, rec: dict) -> list[dict]:
  """The examples one raw record of format `fmt` gives ([] when the reader's policy skips it
  as bad), for tools that keep records whole (flanjax.curate)."""
  if fmt not in _READERS:
    raise UserError(f"unknown record format {fmt!r}; choose one of {sorted(_READERS)}")
  return list(_READERS[fmt](reader, [(where, rec)]))


def _expected() -> str:
  return "; ".join(f"{f} ({', '.join(repr(k) for k in keys)})" for f, keys in SIGNATURES)


@cache.in_process
def _detect_once(path: str, stamp: str, named_by: str | None) -> str:
  del stamp  # part of the cache key only: a file changed in place is looked at again
  where, rec, problem = sources.first_record(path)
  if rec is None:
    raise UserError(f"{path}: no record to detect the format from ({problem}); fix the file, "
                    f"or name its format, one of {', '.join(_READERS)}")
  for fmt, keys in SIGNATURES:
    if all(k in rec for k in keys):
      other = f"; name another with {named_by}" if named_by else ""
      print(f"data: {path}: format {fmt} (detected from its first record{other})", flush=True)
      return fmt
  raise UserError(f"{where}: a record with keys {sorted(rec)[:8]} matches no format; expected "
                  f"{_expected()}")


def detect_format(path: str, named_by: str | None = "the task's 'format'") -> str | None:
  """The format of a user file from its first record (niv2 for a folder); None when the
  path does not exist (its task then fails when used, naming the path). named_by: how the
  caller names a format instead (None: it cannot)."""
  if os.path.isdir(path):
    return "niv2"
  if not os.path.isfile(path):
    return None
  return _detect_once(path, sources.fingerprint_paths([path]), named_by)


def _input_key(record: dict) -> str:
  fields = {k: record[k] for k in ("instruction", "input", "prompt") if k in record}
  return json.dumps(fields or record, sort_keys=True, ensure_ascii=False)


def _key(record: dict) -> str:
  return record["_conv"] if "_conv" in record else _input_key(record)


def _note_overlap(name: str, held: Sequence[dict], train: Sequence[dict], vpath: str) -> None:
  """A note counting validation records whose input (a conversation: its turns) the
  training file also has: their loss measures training data, not held-out data."""
  seen = {_key(r) for r in train}
  both = sum(_key(r) in seen for r in held)
  if both:
    print(f"note: {name}: {both} of {len(held)} records of {vpath} have an input the training "
          "file also has, so the validation loss partly measures training data", flush=True)


def _split_records(records: Sequence[dict], split: str, share: float) -> list[dict]:
  if not share:
    return list(records)
  # A conversation is held out whole (its key is its turns'); other records by their input
  # (instruction and input, prompt, an NIv2 instance's input), so two records of one input
  # with other outputs never fall on both sides.
  held = [sources.holdout(_key(r), share) for r in records]
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
  data = sources.load_json(path, "fix the file, or restore it from Super-NaturalInstructions")
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


# ------------------------------------------------------------------ prompt formats

def _as_conversation(ex: Mapping) -> tuple[Sequence[Mapping], int]:
  """(messages, index of the target turn) of any user example."""
  if "messages" in ex:
    return ex["messages"], ex["turn"]
  if "instruction" in ex:
    user = {"role": "user", "content": ex["instruction"], "input": ex["input"]}
  else:
    user = {"role": "user", "content": ex["prompt"]}
  return [user, {"role": "assistant", "content": ex["answer"]}], 1


def _render_in(fmt: chat.PromptFormat):
  """A render_fn: the example as a conversation in prompt format `fmt`, fitted to the budget."""

  def render(ex, index, split, fits, input_budget=None):
    del split
    msgs, k = _as_conversation(ex)
    return chat.fit_example(fmt, msgs, k, fits, input_budget,
                            where=ex.get("_where") or f"example {index}")

  render.fingerprint = f"user/v2/{fmt.fingerprint}"
  return render


def _niv2_in(render_fn, fmt: chat.PromptFormat):
  """An NIv2 render_fn whose rendered task becomes one user turn in prompt format `fmt`."""

  def render(ex, index, split, fits, input_budget=None):
    inner = None if fits is None else (lambda text: fits(fmt.render_prompt(
        [{"role": "user", "content": text}])))
    inputs, target = render_fn(ex, index, split, inner, input_budget=input_budget)
    msgs = [{"role": "user", "content": inputs}, {"role": "assistant", "content": target}]
    return chat.fit_example(fmt, msgs, 1, fits, input_budget, where=f"example {index}")

  render.fingerprint = f"{render_fn.fingerprint}/{fmt.fingerprint}"
  return render


def _postprocess(fmt: chat.PromptFormat, conversation: bool = True):
  """The task's postprocess_fn: the answer of a generation cut at the end of its turn.
  Carries the format (and whether the task's prompts are rendered conversations), so a run
  can record what its user tasks were trained with."""

  def postprocess(text, **_):
    return tmpl.extract_answer(fmt.cut(text))

  postprocess.prompt_format = fmt
  postprocess.conversation = conversation
  return postprocess


def _niv2_postprocess(fmt: chat.PromptFormat, conversation: bool = True):
  """As _postprocess; a target of an instance with several outputs keeps them all (scored
  against any, as NIv2's own evaluation does)."""
  base = _postprocess(fmt, conversation)

  def postprocess(text, example=None, is_target=False, **_):
    answer = base(text)
    refs = (example or {}).get("references") if is_target else None
    if refs is not None and len(refs) > 1:
      return tmpl.Answers([answer] + [tmpl.extract_answer(str(r)) for r in refs[1:]])
    return answer

  postprocess.prompt_format, postprocess.conversation = fmt, conversation
  return postprocess


@functools.cache
def _rouge_scorer():
  from rouge_score import rouge_scorer  # pylint: disable=g-import-not-at-top
  return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def niv2_metrics(targets, predictions):
  """NIv2's metrics, in percent: ROUGE-L F1 (rouge_score, stemmed) and exact match after
  SQuAD's normalization, each the best over the instance's outputs."""
  if not targets:
    return {"rougeL": 0.0, "exact_match": 0.0}
  scorer, rouge, em = _rouge_scorer(), 0.0, 0
  for t, p in zip(targets, predictions):
    refs = tmpl.references(t)
    rouge += max(scorer.score(str(r), str(p))["rougeL"].fmeasure for r in refs)
    em += any(tmpl.normalize_text(str(r)) == tmpl.normalize_text(str(p)) for r in refs)
  return {"rougeL": 100.0 * rouge / len(targets), "exact_match": 100.0 * em / len(targets)}


def prompt_format_of(name: str) -> chat.PromptFormat | None:
  """The prompt format of the user tasks of a registered task or mixture; None without any."""
  import seqio  # pylint: disable=g-import-not-at-top
  from flanjax.data import tasks as task_lib  # pylint: disable=g-import-not-at-top
  try:
    task_or_mix = seqio.get_mixture_or_task(name)
  except ValueError:
    return None
  found, conversations_only = None, True
  for leaf in getattr(task_or_mix, "tasks", [task_or_mix]):
    reg = task_lib.DEFS.get(leaf.name)
    post = reg.defn.postprocess_fn if reg else None
    fmt = getattr(post, "prompt_format", None)
    conversations_only &= bool(getattr(post, "conversation", False))
    found = found or fmt
  if found is not None and found.name == "plain" and conversations_only:
    # Every task of the mixture is a conversation: a lone prompt at inference gets their
    # 'User: ...\nAssistant:' layout, not the bare text FLAN's tasks are prompted with.
    return chat.Plain(conversation=True)
  return found


# ------------------------------------------------------------------ gin entry

def _niv2_defs(spec: Mapping, path: str, splits, share: float, shots: int,
               fmt: chat.PromptFormat) -> list[TaskDef]:
  name, family, policy = spec["name"], spec.get("templates") or "niv2", sources.bad_records()
  defs = []
  for file in sources.files_in(path, "*.json"):
    stem = os.path.splitext(os.path.basename(file))[0]

    def load(split, file=file, stem=stem):
      data = read_niv2_file(file, policy)
      return [dict(r, _task=data, _name=stem) for r in _split_records(data["instances"], split, share)]

    render = _niv2_render(shots, family)
    defs.append(TaskDef(
        name=f"{name}_{stem}", load=load, splits=splits, templates=family,
        render_fn=render if fmt.name == "plain" else _niv2_in(render, fmt),
        target_end="" if fmt.name == "plain" else fmt.end_of_turn,
        fingerprint=lambda f=file: sources.fingerprint_paths([f]) + f"/{share}",
        key=lambda ex: ex["input"], postprocess_fn=_niv2_postprocess(fmt, fmt.name != "plain"),
        metric_fns=(niv2_metrics,),
        description=f"NIv2 {stem} from {file}"))
  return defs


def _task_defs_of(spec: Mapping, fmt: chat.PromptFormat) -> tuple[list[TaskDef], list[str]]:
  """TaskDefs of one user spec, and the mixture members if it is a folder."""
  unknown = set(spec) - {"name", "path", "format", "templates", "num_shots",
                         "validation_share", "validation_path", "train_formats"}
  if unknown:
    raise UserError(f"user_data.tasks entry {spec.get('name')!r}: unknown keys {sorted(unknown)}")
  for key in ("name", "path"):
    if not spec.get(key):
      raise UserError(f"user_data.tasks entry {dict(spec)}: needs '{key}'")
  name, path, kind = spec["name"], os.path.expanduser(spec["path"]), spec.get("format") or "auto"
  if kind not in FORMATS:
    raise UserError(f"user_data.tasks entry {name!r}: unknown format {kind!r}; choose one of {FORMATS}")
  if spec.get("templates") and fmt.name != "plain":
    raise UserError(f"user_data.tasks entry {name!r}: 'templates' apply to the plain prompt "
                    f"format only, not {fmt.name!r}; drop one of them")
  # A validation file replaces the held-out share: the training file trains whole.
  vpath = os.path.expanduser(spec["validation_path"]) if spec.get("validation_path") else None
  if vpath and not os.path.isdir(vpath):
    try:  # at the start, not at the first evaluation after training
      sources.check_file(vpath)
    except UserError as e:
      raise UserError(f"user_data.tasks entry {name!r}, validation_path (USER_VALIDATION_FILE): "
                      f"{e}") from None
  share = 0.0 if vpath else float(spec.get("validation_share", 0.0))
  splits = ("train", "validation") if share or vpath else ("train",)
  shots = int(spec.get("num_shots", 2))
  policy = sources.bad_records()
  auto = kind == "auto"
  kind = detect_format(path) if auto else kind
  if vpath and (kind == "niv2" or os.path.isdir(vpath)):
    raise UserError(f"user_data.tasks entry {name!r}: 'validation_path' is one file of records; "
                    f"for a NIv2 folder use 'validation_share'")
  if vpath and os.path.exists(path) and os.path.samefile(path, vpath):
    raise UserError(f"user_data.tasks entry {name!r}: validation_path (USER_VALIDATION_FILE) "
                    f"{vpath} is the training file, so its loss would measure what trains; give "
                    "a held-out file, or drop it and set 'validation_share'")
  if kind == "niv2":
    defs = _niv2_defs(spec, path, splits, share, shots, fmt)
    return defs, [d.name for d in defs]
  if os.path.isdir(path):
    raise UserError(f"{path} is a folder; format {kind!r} reads one file (folders are for 'niv2')")

  def load(split):
    if split == "validation" and vpath:
      sources.check_file(vpath)
      held = list(_read_file(vpath, detect_format(vpath) if auto else kind, policy))
      _note_overlap(name, held, _read_file(path, kind or detect_format(path), policy), vpath)
      return held
    if kind is None:  # auto, and the path did not exist at registration
      sources.check_file(path)
    return _split_records(_read_file(path, kind or detect_format(path), policy), split, share)

  # A file of the data folder's evaluation sets can be evaluated on, never trained on.
  held = sources.evaluation_data(path)
  conversation = kind in ("chat", "sharegpt", None) or fmt.name != "plain" or (
      kind == "alpaca" and _has_turns(path))  # records with history are conversations
  family = spec.get("templates") or ("instruction" if kind == "alpaca" else "none")
  templates = [RAW.get(kind, RAW["chat"])] if family == "none" or conversation else family
  formats = tuple(spec.get("train_formats") or (("zero_shot", "few_shot") if shots else ("zero_shot",)))
  if conversation:
    formats = ("zero_shot",)  # the conversation is the context; no exemplars
  return [TaskDef(name=name, load=load, splits=splits, templates=templates,
                  train_formats=formats, num_shots=shots,
                  render_fn=_render_in(fmt) if conversation else None,
                  target_end=fmt.end_of_turn if conversation else "",
                  fingerprint=lambda: sources.fingerprint_paths(
                      [path] + ([vpath] if vpath and os.path.exists(vpath) else [])) + f"/{share}",
                  postprocess_fn=_postprocess(fmt, conversation),
                  eval_only_splits=("train",) if held else (),
                  eval_only_reason=f"{path} is evaluation data: {held}" if held else "",
                  description=f"{kind or 'auto'} records from {path} ({fmt.name} prompts)")], []


@gin.configurable
def user_data(tasks: Sequence[Mapping] = (), prompt_format: str = "plain",
              chat_template: str | None = None) -> tuple[list[TaskDef], dict[str, list[str]]]:
  """TaskDefs of the user's files, and the mixtures of NIv2 folders (name -> tasks).

  prompt_format: one of chat.NAMES, for every user task. chat_template: for
  hf_chat_template, a tokenizer folder (or its tokenizer_config.json, or a .jinja
  file); unset, the folder of train.init_from.
  """
  if not tasks:
    return [], {}
  source = chat_template
  if prompt_format == "hf_chat_template" and not source:
    source = flan_config.bound_value("train.init_from")
  fmt = chat.get(prompt_format, source)
  defs, mixtures = [], {}
  for spec in tasks:
    d, members = _task_defs_of(spec, fmt)
    defs.extend(d)
    if members:
      mixtures[spec["name"]] = members
  return defs, mixtures

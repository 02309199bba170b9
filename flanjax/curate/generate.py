"""Self-Instruct and Evol-Instruct with a local checkpoint, in our own prompt wording.

Self-Instruct (Wang et al., 2022): each prompt shows 8 tasks (6 human seeds, 2
generated ones once there are some) and asks for a new one; the new instruction
passes the filters (3-150 words, no blacklisted keyword, not starting with
punctuation or a non-ASCII character, ROUGE-L F1 <= 0.7 against every
instruction so far), the model says whether it is a classification task, and
writes instances (output first for classification, input first otherwise).
Instances whose input equals the output or whose output is empty are dropped,
and so are all instances of a task that gives one input different outputs.

Evol-Instruct (Xu et al., 2023): each round rewrites every record's instruction
by one operation, in depth (add constraints, deepen, concretize, more reasoning
steps, complicate the input) or in breadth (a new task in the same domain), and
answers it; an evolution is eliminated when the instruction did not change, the
answer is short and apologetic, the answer is only punctuation and stop words,
or the rewrite copied words of the rewrite prompt. An eliminated record keeps
its previous version for the next round.

Both append what they decide to OUT.progress.jsonl after every batch and
rebuild OUT from it, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import collections
import json
import os
import random
import re
import string

import numpy as np

from flanjax.curate import records as rec_lib
from flanjax.curate.report import Progress
from flanjax.curate.rouge import RougePool
from flanjax.errors import UserError

BLACKLIST = ("image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map",
             "maps", "draw", "plot", "plots", "go to", "video", "audio", "music", "flowchart",
             "diagram", "diagrams")
STOP_WORDS = frozenset(
    "a an the and or but if of to in on at by for with about as is are was were be been being "
    "it its this that these those i you he she we they me him her us them my your our their "
    "do does did not no so than too very can will just".split())
DEPTH = {
    "add_constraints": "Add one more requirement or limit that an answer must meet.",
    "deepen": "Make the request ask about the matter in more depth and breadth.",
    "concretize": "Replace general ideas in the request with more specific ones.",
    "more_reasoning": "Change the request so that answering it takes several explicit steps of "
                      "reasoning.",
    "complicate_input": "Add a piece of input data (a table, a snippet of code, a list) that the "
                        "request must work on.",
}
BREADTH = {"breadth": "Write a brand-new request in the same domain as this one, but about a "
                      "rarer topic, of the same length and difficulty."}
# Words of the rewrite prompt that must not leak into a rewrite.
PROMPT_WORDS = ("original request", "rewritten request", "rewrite the request", "new request:")


# ------------------------------------------------------------------ the model

class Model:
  """A checkpoint behind flanjax.decoding.Generator, sampling, in the run's prompt format."""

  def __init__(self, checkpoint: str, args):
    from flanjax import decoding, infer  # pylint: disable=g-import-not-at-top
    from flanjax.models import loading  # pylint: disable=g-import-not-at-top
    self.loaded = loading.load(checkpoint)
    self.fmt = infer.prompt_format(checkpoint, None)
    self.args, self.decoding = args, decoding
    print(f"curate: generating with {self.loaded.source} ({self.loaded.kind.name}), "
          f"{self.fmt.name} prompts", flush=True)

  def __call__(self, prompts, seed: int, stop=()):
    cfg = self.decoding.DecodeConfig(method="sample", max_decode_len=self.args.max_decode_len,
                                     temperature=self.args.temperature, top_p=self.args.top_p,
                                     seed=seed, stop=tuple(stop))
    gen = self.decoding.Generator(self.loaded.model, self.loaded.params, self.loaded.vocab, 512,
                                  cfg, batch_size=self.args.batch_size, kind=self.loaded.kind)
    return [self.fmt.cut(t).strip() for t in gen.generate_text([self.fmt.wrap(p) for p in prompts])]


# ------------------------------------------------------------------ resumable log

class Log:
  """OUT.progress.jsonl: one line per decided item; OUT is rebuilt from it.

  Its first line records what the run works on (`run_key`): the inputs' content and the
  options that decide the items. A rerun with other inputs or options is refused, since its
  items would index or extend another run's work.
  """

  def __init__(self, out: str, key: dict):
    self.path, self.out, self.key = out + ".progress.jsonl", out, key
    self.items = []
    header, data, good = None, b"", 0  # good: bytes of whole, readable lines
    if os.path.exists(self.path):
      with open(self.path, "rb") as f:
        data = f.read()
      for n, line in enumerate(data.splitlines(keepends=True)):
        try:
          item = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
          break  # a line cut by the interruption: it and anything after are redone
        if n == 0 and isinstance(item, dict) and "progress_of" in item:
          header = item["progress_of"]
        else:
          self.items.append(item)
        good += len(line)
    if not self.items:  # new, or nothing done yet (a run stopped before its first batch)
      self._rewrite([])
      return
    if header is None:
      raise UserError(f"{self.path} does not say which inputs and options it was made with "
                      "(an older flanjax); delete it to start again")
    self._check(header)
    if header != key:  # a grown --num or --rounds: later runs may not shrink it back
      self._rewrite(data[:good].splitlines(keepends=True)[1:])
    elif good < len(data) or not data.endswith(b"\n"):
      # Cut the unreadable tail off (and end the last line), so what is appended next
      # starts a line of its own instead of gluing onto the cut one.
      with open(self.path, "r+b") as f:
        f.truncate(good)
        if not data[:good].endswith(b"\n"):
          f.seek(good)
          f.write(b"\n")
    print(f"curate: continuing from {self.path} ({len(self.items)} done)", flush=True)

  def _rewrite(self, lines) -> None:
    """The header of this run's key, then `lines` (bytes), written whole, then renamed."""
    tmp = self.path + ".tmp"
    with open(tmp, "wb") as f:
      f.write((json.dumps({"progress_of": self.key}, ensure_ascii=False) + "\n").encode())
      for line in lines:
        f.write(line if line.endswith(b"\n") else line + b"\n")
    os.replace(tmp, self.path)

  def _check(self, header: dict) -> None:
    # The inputs first: other inputs make every other difference moot.
    for name in sorted(set(header) | set(self.key), key=lambda n: (n != "inputs", n)):
      was, now = header.get(name), self.key.get(name)
      if name in GROWS and isinstance(was, int) and isinstance(now, int) and now >= was:
        continue  # a larger --num or --rounds continues the run
      if name == "inputs":  # by content: a moved or touched copy of the same inputs continues
        if [i["sha256"] for i in was or []] != [i["sha256"] for i in now or []]:
          raise UserError(
              f"{self.path} continues a run of other inputs ({', '.join(i['path'] for i in was)}"
              f", not {', '.join(i['path'] for i in now)}, or their content changed); delete it "
              "to start again, or rerun with that run's inputs")
      elif was != now:
        raise UserError(
            f"{self.path} continues a run with --{name} {was}, not {now}"
            f"{' (it may only grow)' if name in GROWS else ''}; delete it to start again, or "
            f"rerun with --{name} {was}")

  def append(self, items) -> None:
    with open(self.path, "a", encoding="utf-8") as f:
      for it in items:
        f.write(json.dumps(it, ensure_ascii=False) + "\n")
    self.items += items

  def write_out(self, records) -> None:
    rec_lib.write(self.out, records)


# What decides a generating run's items, so a progress file must have been made with the same.
# --num and --rounds may grow between runs (more of the same run); --batch_size may change.
KEY_OPTIONS = ("command", "checkpoint", "seed", "num", "rounds", "instances", "max_decode_len",
               "temperature", "top_p")
GROWS = ("num", "rounds")


def run_key(args) -> dict:
  """The inputs' content (sha256) and the options that decide a generating run's items."""
  import hashlib  # pylint: disable=g-import-not-at-top
  inputs = []
  for path in args.inputs:
    h = hashlib.sha256()
    with open(path, "rb") as f:
      for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
    inputs.append({"path": os.path.abspath(path), "sha256": h.hexdigest()})
  key = {name: getattr(args, name, None) for name in KEY_OPTIONS}
  key["checkpoint"] = os.path.abspath(key["checkpoint"]) if key["checkpoint"] else None
  if args.command == "self-instruct":
    key.pop("rounds")  # options the command does not read
  else:
    key.pop("num")
    key.pop("instances")
  return dict(key, inputs=inputs)


def _words(text: str) -> list[str]:
  return text.split()


# ------------------------------------------------------------------ self-instruct

def instruction_problem(inst: str, pool: RougePool, threshold: float = 0.7):
  """None, or (reason, detail) of why a generated instruction is filtered out."""
  n = len(_words(inst))
  if n < 3 or n > 150:
    return "length outside 3-150 words", f"{n} words"
  low = inst.lower()
  hit = next((b for b in BLACKLIST if re.search(rf"\b{re.escape(b)}\b", low)), None)
  if hit:
    return "blacklisted keyword", hit
  if inst[0] in string.punctuation:
    return "starts with punctuation", inst[:20]
  if not inst[0].isascii():
    return "starts with a non-ASCII character", inst[:20]
  score, j = pool.max_score(inst, above=threshold)
  if score > threshold:
    return f"ROUGE-L > {threshold} with the pool", f"{score:.2f}"
  return None


def _generation_prompt(tasks) -> str:
  lines = ["Here is a list of tasks that people ask an assistant to do. Add one new task that "
           "is different from all of them.", ""]
  for k, t in enumerate(tasks, 1):
    lines.append(f"Task {k}: {t}")
  lines.append(f"Task {len(tasks) + 1}:")
  return "\n".join(lines)


def _classification_prompt(inst: str) -> str:
  return (f"Task: {inst}\nIs the answer to this task one label from a short fixed list "
          "(yes or no)?\nAnswer:")


def _instance_prompt(inst: str, classification: bool, k: int) -> str:
  if classification:
    return (f"Task: {inst}\nExample {k}: first give one of the labels the task allows, then an "
            "input that has that label.\nLabel:")
  return (f"Task: {inst}\nExample {k}: first give an input for the task (or 'None' when it "
          "needs none), then the right output.\nInput:")


def parse_instance(text: str, classification: bool) -> tuple[str, str]:
  """(input, output) of a generated instance."""
  if classification:
    label, _, rest = text.partition("Input:")
    return rest.strip(), label.strip()
  inp, _, out = text.partition("Output:")
  inp = inp.strip()
  return ("" if inp.lower() in ("none", "none.") else inp), out.strip()


def postprocess_instances(pairs, stats: collections.Counter):
  """The instances kept; dropped ones counted in stats by reason."""
  kept = []
  for inp, out in pairs:
    if not out:
      stats["empty output"] += 1
    elif inp.strip() == out.strip():
      stats["input equals output"] += 1
    else:
      kept.append((inp, out))
  outs = collections.defaultdict(set)
  for inp, out in kept:
    outs[inp].add(out)
  conflicted = {i for i, o in outs.items() if len(o) > 1}
  n = sum(1 for i, _ in kept if i in conflicted)
  if n:
    stats["same input, different outputs"] += n
  kept = [(i, o) for i, o in kept if i not in conflicted]
  return list(dict.fromkeys(kept))  # identical instances once


def _seed_tasks(records):
  tasks = {}
  for r in records:
    t = tasks.setdefault(r.instruction, {"instruction": r.instruction, "classification": False})
    if r.task is not None:
      t["classification"] = bool(r.task.get("is_classification"))
  return list(tasks.values())


def self_instruct(args, report, model, seeds, log) -> tuple[int, int]:
  human = [t["instruction"] for t in _seed_tasks(seeds)]
  if len(human) < 6:
    raise UserError(f"self-instruct needs at least 6 seed tasks; {args.inputs} hold {len(human)}")
  pool = RougePool(human)
  machine, out_records, stats = [], [], collections.Counter()

  def account(item):
    report.candidates(1)
    stats.update(item.get("instance_drops", {}))
    if item["verdict"] != "kept":
      report.drop(item["verdict"], f"candidate {item['i']}", item.get("detail", ""))
      return
    pool.add(item["instruction"])
    machine.append(item["instruction"])
    for inp, out in item["instances"]:
      out_records.append(rec_lib.alpaca(item["instruction"], inp, out,
                                        is_classification=item["classification"]))

  for item in log.items:
    account(item)
  prog = Progress(args.num, "self-instruct")
  prog.done = len(log.items)
  while len(log.items) < args.num:
    b = min(args.batch_size, args.num - len(log.items))
    step = len(log.items)
    rng = random.Random(f"{args.seed}/{step}")
    prompts = []
    for _ in range(b):
      shots = rng.sample(human, 6) + (rng.sample(machine, 2) if len(machine) >= 2 else rng.sample(human, 2))
      rng.shuffle(shots)
      prompts.append(_generation_prompt(shots))
    texts = model(prompts, seed=args.seed + step, stop=("\n", "Task "))
    items, fresh = [], []
    for k, inst in enumerate(texts):
      inst = inst.strip()
      item = {"i": step + k, "instruction": inst}
      problem = instruction_problem(inst, pool) if inst else ("length outside 3-150 words", "empty")
      # Candidates of one batch are compared with each other too.
      if problem is None and any(_same(inst, f["instruction"]) for f in fresh):
        problem = ("ROUGE-L > 0.7 with the pool", "within the batch")
      if problem:
        item.update(verdict=problem[0], detail=problem[1])
      else:
        fresh.append(item)
      items.append(item)
    _instances(model, fresh, args, step)
    log.append(items)
    for item in items:
      account(item)
    log.write_out(out_records)
    prog.update(len(items), f"{len(machine)} kept")
  log.write_out(out_records)
  report.figures["instances"] = {"written": len(out_records), "dropped": dict(stats),
                                 "tasks_kept": len(machine)}
  return len(machine), len(out_records)


def _same(a: str, b: str) -> bool:
  return RougePool([b]).max_score(a)[0] > 0.7


def _instances(model, items, args, step) -> None:
  if not items:
    return
  answers = model([_classification_prompt(it["instruction"]) for it in items],
                  seed=args.seed + step + 1, stop=("\n",))
  for it, a in zip(items, answers):
    it["classification"] = a.strip().lower().startswith("yes")
  prompts, owners = [], []
  for it in items:
    for k in range(1, args.instances + 1):
      prompts.append(_instance_prompt(it["instruction"], it["classification"], k))
      owners.append(it)
  texts = model(prompts, seed=args.seed + step + 2)
  pairs = collections.defaultdict(list)
  for it, t in zip(owners, texts):
    pairs[it["i"]].append(parse_instance(t, it["classification"]))
  for it in items:
    stats = collections.Counter()
    kept = postprocess_instances(pairs[it["i"]], stats)
    it["instances"], it["instance_drops"] = kept, dict(stats)
    it["verdict"] = "kept" if kept else "no valid instance"
    if not kept:
      it["detail"] = ", ".join(f"{n} {r}" for r, n in stats.items())


# ------------------------------------------------------------------ evolve

def _evolve_prompt(op: str, instruction: str) -> str:
  what = {**DEPTH, **BREADTH}[op]
  return (f"You make requests for an assistant harder or more varied. {what} Keep it something "
          f"a person would ask, and write only the new request.\n\nRequest: {instruction}\n"
          "New version:")


def evolution_problem(old: str, new: str, answer: str):
  """None, or (reason, detail) of why an evolution is eliminated."""
  if rec_lib.words(new) == rec_lib.words(old) or not new.strip():
    return "no change from the original", new[:60]
  low = answer.lower()
  if ("sorry" in low or "as an ai" in low or "i cannot" in low) and len(answer.split()) < 80:
    return "short apologetic answer", answer[:60]
  if not [w for w in rec_lib.words(answer) if w not in STOP_WORDS]:
    return "answer is only punctuation or stop words", answer[:60]
  hit = next((w for w in PROMPT_WORDS if w in new.lower()), None)
  if hit:
    return "copies words of the rewrite prompt", hit
  return None


def evolve(args, report, model, records, log) -> tuple[int, int]:
  current = [r.prompt for r in records]
  out_records, kept = [], 0
  done = {(it["round"], it["index"]) for it in log.items}

  def tally(it):  # one logged rewrite, replayed on resume or fresh: counted the same way
    nonlocal kept
    report.candidates(1)
    if it["verdict"] == "kept":
      kept += 1
      current[it["index"]] = it["instruction"]
      out_records.append(_evolved(it))
    else:
      report.drop(it["verdict"], records[it["index"]].where, it.get("detail", ""))

  for it in log.items:
    tally(it)
  total = len(records) * args.rounds
  prog = Progress(total, "evolve")
  prog.done = len(done)
  ops = list(DEPTH) + list(BREADTH)
  for rnd in range(1, args.rounds + 1):
    todo = [i for i in range(len(records)) if (rnd, i) not in done]
    for s in range(0, len(todo), args.batch_size):
      idx = todo[s:s + args.batch_size]
      chosen = [random.Random(f"{args.seed}/{rnd}/{i}").choice(ops) for i in idx]
      seed = args.seed + rnd * 100_003 + s
      news = model([_evolve_prompt(op, current[i]) for op, i in zip(chosen, idx)], seed=seed,
                   stop=("\n\n",))
      answers = model(news, seed=seed + 1)
      items = []
      for i, op, new, ans in zip(idx, chosen, news, answers):
        item = {"round": rnd, "index": i, "operation": op, "from": current[i],
                "instruction": new.strip(), "output": ans.strip()}
        problem = evolution_problem(current[i], new, ans)
        item["verdict"] = problem[0] if problem else "kept"
        if problem:
          item["detail"] = problem[1]
        items.append(item)
      log.append(items)
      for it in items:
        tally(it)
      log.write_out(out_records)
      prog.update(len(items))
  log.write_out(out_records)
  report.figures["evolve"] = {"rounds": args.rounds, "operations": dict(collections.Counter(
      it["operation"] for it in log.items if it["verdict"] == "kept"))}
  return kept, len(out_records)


def _evolved(it) -> rec_lib.Record:
  return rec_lib.alpaca(it["instruction"], "", it["output"], operation=it["operation"],
                        round=it["round"])


# ------------------------------------------------------------------ entry points

def run(args, report) -> tuple[int, int]:
  """Runs self-instruct or evolve; (kept items (tasks or evolutions), records written)."""
  records, reads = rec_lib.read_all(args.inputs)
  log = Log(args.out, run_key(args))  # before the model loads: a mismatch fails fast
  model = Model(args.checkpoint, args)
  for rep in reads:  # the inputs are seeds here, not candidates: only their bad records count
    for reason, n in rep.skipped.items():
      print(f"curate: {rep.path}: {n} {reason} skipped", flush=True)
  if args.command == "self-instruct":
    return self_instruct(args, report, model, records, log)
  return evolve(args, report, model, records, log)


def loglikelihood_quality(checkpoint: str, records, batch_size: int = 16) -> np.ndarray:
  """Mean log-probability per token of each response given its prompt, both in the run's
  prompt format as generation and training use it (a bare prompt is text the model never
  read: a chat-tuned model scores it low whatever the response)."""
  from flanjax import infer  # pylint: disable=g-import-not-at-top
  from flanjax.evaluation import scoring  # pylint: disable=g-import-not-at-top
  from flanjax.models import loading  # pylint: disable=g-import-not-at-top
  loaded = loading.load(checkpoint)
  fmt = infer.prompt_format(checkpoint, None)
  ctx = [loaded.kind.prompt_ids(loaded.vocab, fmt.wrap(r.prompt)) for r in records]
  cont = [list(loaded.vocab.encode(r.response + fmt.end_of_turn)) for r in records]
  sums, _ = scoring.loglikelihood(loaded.model, loaded.params, loaded.kind, ctx, cont,
                                  batch_size=batch_size, max_length=1024, max_target_length=512)
  return sums / np.maximum([len(c) for c in cont], 1)

"""Training examples that share an n-gram (13 words by default) with evaluation data.

Evaluation data: every evaluation-only split of the registered collections (the
TaskDefs' `eval_only_splits`: BBH, GSM8K test, MMLU, TFDS validation where
prepared) and the open-ended evaluation files of the data folder that no task
registers (MT-Bench, AlpacaEval, instruction_eval). Each example's text fields
(inputs and targets: every string and list of strings) are lowercased into words
(`\\w+`), and their n-grams hashed (a 64-bit polynomial over word ids, numpy);
a hash hit is confirmed on the words themselves. An n-gram found in `common` or
more evaluation examples is template text (a task's fixed wording), not an
example's: it is ignored and listed in the report. An example's fields are read
as one text; a field or example shorter than n words (but of `min_words`, 8, or more)
is found whole, wherever its words appear in a row in a training text. Shorter ones
cannot be told from common phrases: they are counted in the report.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import json
import os
from typing import Iterable, Sequence

import numpy as np

from flanjax.curate import records as rec_lib
from flanjax.errors import UserError

P = np.uint64(1_000_003)
# Evaluation files of the data folder that no task registers (relative to data_dir()).
OPEN_ENDED = {"mt_bench": "mt_bench/question.jsonl",
              "mt_bench_reference": "mt_bench/reference_answer_gpt4.jsonl",
              "alpaca_eval": "alpaca_eval/text_davinci_003_outputs.json",
              "instruction_eval": "instruction_eval/*.jsonl"}


def texts_of(example) -> list[str]:
  """The text fields of a raw example: every string and list of strings, nested too."""
  out = []
  if isinstance(example, str):
    out.append(example)
  elif isinstance(example, dict) and "messages" in example and "turn" in example:
    # A chat example shares its conversation with the other turns' examples: it is checked
    # on its own turn, the message before it and the leading system turns, so each message is read
    # once per turn rather than the whole history per turn (quadratic in long chats).
    k, msgs = example["turn"], example["messages"]
    lead = next((i for i, m in enumerate(msgs) if m.get("role") != "system"), len(msgs))
    out += [m["content"] for m in msgs[:min(lead, max(k - 1, 0))]]
    out += [m["content"] for m in msgs[max(k - 1, 0):k + 1]]
  elif isinstance(example, dict):
    for v in example.values():
      if isinstance(v, (str, list, tuple, dict)):
        out += texts_of(v)
  elif isinstance(example, (list, tuple)):
    for v in example:
      out += texts_of(v)
  return out


@dataclasses.dataclass
class EvalSet:
  name: str  # task:split or file set
  examples: Sequence


def _task_defs() -> list:
  """The built-in tasks that may hold evaluation splits."""
  from flanjax.data.collections import bbh, gsm8k, mmlu, tfds_tasks  # pylint: disable=g-import-not-at-top
  return bbh.task_defs() + gsm8k.task_defs() + mmlu.task_defs() + tfds_tasks.task_defs()


def _registered_sets(names: Sequence[str] | None, notes: list) -> list[EvalSet]:
  out, seen = [], set()
  for defn in _task_defs():
    for split in defn.splits:
      name = f"{defn.name}:{split}"
      if not defn.is_eval_only(split) or (names and not _wanted(defn.name, names)):
        continue
      try:
        examples = defn.load(split)
      except UserError as e:
        notes.append(f"{name}: not checked ({e})")  # whole: it ends with the fix
        continue
      except Exception as e:  # pylint: disable=broad-except  (TFDS without data, etc.)
        first = (str(e).splitlines() or [""])[0]
        notes.append(f"{name}: not checked ({type(e).__name__}: {first[:300]})")
        continue
      if id(examples) in seen:  # e.g. bbh_x and bbh_x_direct read the same examples
        continue
      seen.add(id(examples))
      out.append(EvalSet(name, examples))
  return out


def _wanted(name: str, names: Sequence[str]) -> bool:
  import fnmatch  # pylint: disable=g-import-not-at-top
  return any(fnmatch.fnmatch(name, n) or name == n or name.startswith(n + "_") for n in names)


def _open_ended_sets(names: Sequence[str] | None, notes: list) -> list[EvalSet]:
  from flanjax.data import sources  # pylint: disable=g-import-not-at-top
  out = []
  for name, pattern in OPEN_ENDED.items():
    if names and not _wanted(name, names):
      continue
    paths = sorted(glob.glob(os.path.join(sources.data_dir(), pattern)))
    if not paths:
      notes.append(f"{name}: not checked ({pattern} absent under {sources.data_dir()})")
      continue
    for path in paths:
      reader = sources.Reader(path, "skip")
      examples = [rec for _, rec in sources.read_json_or_jsonl(reader)]
      label = name if len(paths) == 1 else f"{name}/{os.path.basename(path)}"
      out.append(EvalSet(label, examples))
  return out


def _known_names() -> list[str]:
  return [d.name for d in _task_defs() if any(d.is_eval_only(s) for s in d.splits)] + list(OPEN_ENDED)


def check_names(names: Sequence[str] | None) -> None:
  """A one-line error for a name that matches no evaluation task (before any data is read)."""
  if names:
    known = _known_names()
    unmatched = [n for n in names if not any(_wanted(k, [n]) for k in known)]
    if unmatched:
      import difflib  # pylint: disable=g-import-not-at-top
      close = sorted({c for n in unmatched for c in difflib.get_close_matches(n, known, 3, 0.6)})
      raise UserError(f"--tasks {' '.join(unmatched)}: no evaluation task of that name"
                      f"{' (did you mean ' + ', '.join(close) + '?)' if close else ''}; names are "
                      "bbh*, gsm8k, mmlu*, tfds tasks, mt_bench, alpaca_eval, instruction_eval, "
                      "and shell patterns of them")


def eval_sets(names: Sequence[str] | None = None) -> tuple[list[EvalSet], list[str]]:
  """The evaluation sets (all, or those whose task names match `names`), and notes."""
  check_names(names)
  notes = []
  sets = _registered_sets(names, notes) + _open_ended_sets(names, notes)
  if not sets:
    raise UserError(f"no evaluation data found{' for ' + ', '.join(names) if names else ''}; "
                    "name registered evaluation tasks (bbh, gsm8k, mmlu_*, mt_bench, alpaca_eval, "
                    "instruction_eval) whose data is present")
  return sets, notes


class _Words:
  def __init__(self):
    self.ids: dict[str, int] = {}

  def __call__(self, text: str) -> np.ndarray:
    return np.fromiter((self.ids.setdefault(w, len(self.ids) + 1) for w in rec_lib.words(text)),
                       np.uint64)


def ngram_hashes(ids: np.ndarray, n: int) -> np.ndarray:
  m = len(ids) - n + 1
  if m <= 0:
    return np.zeros(0, np.uint64)
  h = np.zeros(m, np.uint64)
  for k in range(n):
    h = h * P + ids[k:k + m]
  return h


@dataclasses.dataclass
class Match:
  train_index: int
  train_where: str
  eval_set: str
  eval_index: int
  ngram: str
  shared: int  # n-grams this pair shares

  def as_dict(self, eval_text: str) -> dict:
    return {"training_record": self.train_where, "evaluation_set": self.eval_set,
            "evaluation_example": self.eval_index, "evaluation_text": eval_text[:200],
            "ngram": self.ngram, "shared_ngrams": self.shared}


class Index:
  """The n-grams of evaluation sets, to look training texts up in.

  An example's fields are read as one text, so an n-gram may run from a question into its
  choices. A field (or a whole example) shorter than n words, but of `min_words` or more,
  is a key of its own, found where its words appear in a row in a training text: a short
  question copied verbatim is found although it has no n-gram. Shorter ones cannot be told
  from common phrases and are counted (`fields_shorter_than_min_words`)."""

  def __init__(self, sets: Sequence[EvalSet], n: int = 13, common: int = 20,
               min_words: int = 8):
    self.n, self.sets, self.words = n, list(sets), _Words()
    self.min_words = min(min_words, n)
    hashes, owners = [], []
    self.short_fields = 0
    self.unmatchable_examples = 0
    self.short_lengths: set[int] = set()
    self.eval_examples = 0
    for s_i, s in enumerate(self.sets):
      for e_i, ex in enumerate(s.examples):
        self.eval_examples += 1
        h = []
        for seq in self._keys(ex):
          ids = self.words(" ".join(seq))
          h.append(ngram_hashes(ids, len(ids)) if len(ids) < n else ngram_hashes(ids, n))
          if len(ids) < n:
            self.short_lengths.add(len(ids))
        h = np.unique(np.concatenate(h)) if h else np.zeros(0, np.uint64)
        if not len(h):
          self.unmatchable_examples += 1
        hashes.append(h)
        owners.append(np.full((len(h), 2), (s_i, e_i), np.int64))
    hashes = np.concatenate(hashes) if hashes else np.zeros(0, np.uint64)
    owners = np.concatenate(owners) if owners else np.zeros((0, 2), np.int64)
    order = np.argsort(hashes, kind="stable")
    self.hashes, self.owners = hashes[order], owners[order]
    uniq, start, counts = np.unique(self.hashes, return_index=True, return_counts=True)
    self.common = {int(u): int(c) for u, c in zip(uniq[counts >= common], counts[counts >= common])}
    keep = counts < common
    self.uniq, self.start, self.count = uniq[keep], start[keep], counts[keep]
    self.common_threshold = common
    self.ignored_hits = collections.Counter()  # common n-gram hash -> training texts hit

  def _keys(self, ex, count: bool = True) -> list[tuple[str, ...]]:
    """The word sequences an example is found by: its joined text (its n-grams are taken),
    and each field, and the whole example, shorter than n words but not than min_words."""
    fields = [rec_lib.words(t) for t in texts_of(ex)]
    joined = [w for f in fields for w in f]
    out = [tuple(joined)] if len(joined) >= self.n else []
    short = {tuple(f) for f in fields if self.min_words <= len(f) < self.n}
    if self.min_words <= len(joined) < self.n:
      short.add(tuple(joined))
    if count:
      self.short_fields += sum(1 for f in fields if 0 < len(f) < self.min_words)
    return out + sorted(short)

  def _grams(self, words: Sequence[str], length: int) -> set[str]:
    return {" ".join(words[k:k + length]) for k in range(len(words) - length + 1)}

  def _confirm(self, s_i, e_i, train_words: Sequence[str]) -> str | None:
    """The first key of the example found word for word in the training text (else a hash
    collision: None)."""
    cache = {}
    for seq in self._keys(self.sets[s_i].examples[e_i], count=False):
      length = min(len(seq), self.n)
      if length not in cache:
        cache[length] = self._grams(train_words, length)
      for k in range(len(seq) - length + 1):
        g = " ".join(seq[k:k + length])
        if g in cache[length]:
          return g
    return None

  def _hashes_of(self, text: str) -> np.ndarray:
    ids = self.words(text)
    h = [ngram_hashes(ids, self.n)] + [ngram_hashes(ids, m) for m in sorted(self.short_lengths)]
    return np.unique(np.concatenate(h))

  def find(self, texts: Sequence[str], wheres: Sequence[str], progress=None) -> list[Match]:
    """Matches of training texts (one per training text and evaluation example)."""
    all_h, owner = [], []
    for i, t in enumerate(texts):
      h = self._hashes_of(t)
      all_h.append(h)
      owner.append(np.full(len(h), i, np.int64))
      if progress:
        progress.update()
    if not all_h:
      return []
    all_h, owner = np.concatenate(all_h), np.concatenate(owner)
    common = np.isin(all_h, np.fromiter(self.common, np.uint64, len(self.common)))
    for h in all_h[common]:
      self.ignored_hits[int(h)] += 1
    pos = np.searchsorted(self.uniq, all_h)
    pos = np.minimum(pos, max(len(self.uniq) - 1, 0))
    hit = (self.uniq[pos] == all_h) if len(self.uniq) else np.zeros(len(all_h), bool)
    pairs = collections.defaultdict(int)
    for i, p in zip(owner[hit], pos[hit]):
      s = self.start[p]
      for s_i, e_i in self.owners[s:s + self.count[p]]:
        pairs[(int(i), int(s_i), int(e_i))] += 1
    out = []
    for (i, s_i, e_i), shared in sorted(pairs.items()):
      g = self._confirm(s_i, e_i, rec_lib.words(texts[i]))
      if g is not None:  # else a hash collision
        out.append(Match(i, wheres[i], self.sets[s_i].name, e_i, g, shared))
    return out

  def eval_text(self, m: Match) -> str:
    ex = self.sets[[s.name for s in self.sets].index(m.eval_set)].examples[m.eval_index]
    return " | ".join(texts_of(ex))

  def describe(self) -> dict:
    return {"n": self.n, "min_words": self.min_words,
            "evaluation_sets": {s.name: len(s.examples) for s in self.sets},
            "evaluation_examples": self.eval_examples, "evaluation_ngrams": int(len(self.uniq)),
            "fields_shorter_than_min_words": self.short_fields,
            "examples_too_short_to_find": self.unmatchable_examples,
            "common_ngrams_ignored": len(self.common),
            "common_threshold_examples": self.common_threshold}

  def ignored_report(self, limit: int = 10) -> list[dict]:
    """The template n-grams that training texts hit, with what they are (their text)."""
    out = []
    for h, hits in self.ignored_hits.most_common(limit):
      p = int(np.searchsorted(self.hashes, np.uint64(h)))
      s_i, e_i = self.owners[p]
      text = ""
      for seq in self._keys(self.sets[s_i].examples[e_i], count=False):
        length = min(len(seq), self.n)
        text = next((" ".join(seq[k:k + length]) for k in range(len(seq) - length + 1)
                     if ngram_hashes(self.words(" ".join(seq[k:k + length])), length)[0] == h),
                    "")
        if text:
          break
      out.append({"ngram": text, "evaluation_examples": self.common[h], "training_texts": hits,
                  "first_set": self.sets[s_i].name})
    return out


def check(index: Index, texts: Sequence[str], wheres: Sequence[str], progress=None):
  """(matches, {training index: its matches})."""
  matches = index.find(texts, wheres, progress)
  by_record = collections.defaultdict(list)
  for m in matches:
    by_record[m.train_index].append(m)
  return matches, by_record


def training_texts(examples: Iterable) -> list[str]:
  return ["\n".join(texts_of(ex)) for ex in examples]


def to_jsonable(index: Index, matches: Sequence[Match], limit: int | None = None) -> list[dict]:
  return [m.as_dict(index.eval_text(m)) for m in matches[:limit]]


def save(path: str, data) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(data, f, indent=1, ensure_ascii=False)


# ------------------------------------------------------------------ at training start

MODES = ("warn", "drop", "off")


def _fingerprint_of(defn) -> str:
  fp = defn.fingerprint
  return fp() if callable(fp) else str(fp)


def check_mixture(mixture: str, mode: str = "warn", n: int = 13) -> dict:
  """train.decontamination: the training examples of `mixture`'s tasks that share an
  n-gram with evaluation data, counted per task and printed. 'drop' re-registers each
  affected task without them (its cache key changes with what was dropped); 'warn'
  only counts; 'off' does nothing. Returns {task: {examples, matched, by_set}}."""
  if mode not in MODES:
    raise UserError(f"train.decontamination must be one of {MODES}, not {mode!r}")
  if mode == "off":
    return {}
  import seqio  # pylint: disable=g-import-not-at-top
  from flanjax.data import tasks as task_lib  # pylint: disable=g-import-not-at-top
  obj = seqio.get_mixture_or_task(mixture)
  regs = [task_lib.DEFS[t.name] for t in getattr(obj, "tasks", [obj]) if t.name in task_lib.DEFS]
  regs = [r for r in regs if "train" in r.defn.splits and not r.defn.is_eval_only("train")]
  if not regs:  # e.g. the built-in tasks, generated by the project
    return {}
  texts, wheres, owner = [], [], []
  for r in regs:
    ex = task_lib.raw_examples(r.defn, "train")
    texts += training_texts(ex)
    wheres += [f"{r.defn.name}[{i}]" for i in range(len(ex))]
    owner += [(r, i) for i in range(len(ex))]
  sets, _ = eval_sets()
  index = Index(sets, n=n)
  _, by_record = check(index, texts, wheres)
  out = {}
  for r in regs:
    hits = sorted(i for i in by_record if owner[i][0] is r)
    if not hits:
      continue
    by_set = collections.Counter(by_record[i][0].eval_set for i in hits)
    out[r.defn.name] = {"examples": len(task_lib.raw_examples(r.defn, "train")),
                        "matched": len(hits), "by_set": dict(by_set.most_common())}
    first = by_record[hits[0]][0]
    print(f"decontamination: {r.defn.name}: {len(hits)} of {out[r.defn.name]['examples']:,} "
          f"training examples share a {n}-gram with evaluation data "
          f"({', '.join(f'{s} {c}' for s, c in by_set.most_common(3))}; first: "
          f"\"{first.ngram}\"); {'dropped' if mode == 'drop' else 'kept (warn)'}", flush=True)
    if mode == "drop":
      _register_without(r, {owner[i][1] for i in hits})
  if not out:
    print(f"decontamination: no training example of {mixture} shares a {n}-gram with "
          f"{index.eval_examples:,} evaluation examples", flush=True)
  return out


def summarised(run, contaminated: dict, summary: dict) -> dict:
  """The run's summary with what check_mixture counted, rewritten to summary.json."""
  summary = dict(summary, decontamination=contaminated)
  run.write_summary(summary)
  return summary


def _register_without(reg, drop: set) -> None:
  from flanjax.data import tasks as task_lib  # pylint: disable=g-import-not-at-top
  defn = reg.defn

  def load(split, _load=defn.load):
    examples = list(_load(split))
    if split != "train":
      return examples
    return [ex for i, ex in enumerate(examples) if i not in drop]

  suffix = f"/decontaminated:{sorted(drop)}"
  new = dataclasses.replace(defn, load=load,
                            fingerprint=lambda: _fingerprint_of(defn) + suffix)
  task_lib.register(new, reg.vocabulary, reg.input_length)

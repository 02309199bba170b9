"""Templated tasks: raw examples -> rendered text -> cached tokens -> seqio.Task.

A ``TaskDef`` says where a task's examples come from and how they are phrased
(templates, formats, shots). ``register`` turns it into a ``seqio.Task`` for a
vocabulary and an input length (the input budget: few-shot prompts drop
exemplars until they fit it). The rendered and tokenized examples of a split
are computed once and cached on disk, keyed by everything they depend on
(source files, templates, formats, vocabulary, input budget), so a changed
template or vocabulary never reads a stale cache, and a second run over the
same mixture tokenizes nothing. An entry is checked on read (sizes and
SHA-256 of its files): a damaged one is rebuilt, with a note.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import random
import shutil
import time
import zipfile
from typing import Callable, Mapping, NamedTuple, Sequence

import numpy as np
import seqio
import tensorflow as tf

from flanjax.data import cache
from flanjax.data import templates as tmpl
from flanjax.errors import UserError

# Bump when rendering or the cache layout changes: old caches are then ignored.
# 4: DONE is a manifest (sizes and SHA-256 of the entry's files), checked on read.
CACHE_VERSION = 4
TEMPLATE_DIR = os.path.join(os.path.dirname(__file__), "template_data")

# The input length a task is registered for when none is given.
DEFAULT_INPUT_LENGTH = 1024


@cache.in_process
def load_templates(family: str) -> tuple[tmpl.Template, ...]:
  """The templates of a family, from ``template_data/<family>.json``."""
  path = family if family.endswith(".json") else os.path.join(TEMPLATE_DIR, f"{family}.json")
  if not os.path.exists(path):
    known = sorted(f[:-5] for f in os.listdir(TEMPLATE_DIR) if f.endswith(".json"))
    raise UserError(f"no template family {family!r} ({path} does not exist); known: {known}")
  with open(path, encoding="utf-8") as f:
    data = json.load(f)
  out = []
  for i, t in enumerate(data["templates"]):
    if "inputs" not in t:
      raise UserError(f"{path}: template {i} has no 'inputs' pattern")
    out.append(tmpl.Template(**{k: t[k] for k in ("inputs", "targets", "cot_targets") if k in t}))
  return tuple(out)


def _default_key(ex: Mapping) -> str:
  return json.dumps({k: v for k, v in ex.items() if k not in ("rationale",)},
                    sort_keys=True, ensure_ascii=False)


# eq=False: hashed by identity, so list-valued fields are fine and caches key on the object.
@dataclasses.dataclass(frozen=True, eq=False)
class TaskDef:
  """Where a task's examples come from and how they are rendered."""
  name: str
  # split -> list of example field dicts ("answer" is the target; "options",
  # "rationale" optional). Called lazily, once per split.
  load: Callable[[str], Sequence[dict]]
  splits: Sequence[str]
  # A template family name (template_data/<name>.json) or templates.
  templates: str | Sequence[tmpl.Template]
  train_formats: Sequence[str] = ("zero_shot",)
  eval_format: str = "zero_shot"
  num_shots: int = 3
  exemplar_split: str = "train"
  # Splits used only for evaluation; "*" means every split (e.g. BBH).
  eval_only_splits: Sequence[str] = ()
  # Why they are (for the error that refuses to train on them), when it is not the task itself.
  eval_only_reason: str = ""
  # Identity of the source data for cache keys (see sources.fingerprint_paths).
  fingerprint: str | Callable[[], str] = ""
  options_layouts: Sequence[str] = ("dash", "letters", "inline")
  # Overrides the template rendering:
  # (example, index, split, fits, input_budget=None) -> (inputs, targets).
  render_fn: Callable | None = None
  key: Callable[[Mapping], str] = _default_key
  metric_fns: Sequence[Callable] | None = None
  postprocess_fn: Callable | None = None
  description: str = ""
  # Template modes (templates.MODES) of the training split and of the other splits;
  # tasks.register sets them from gin. A render_fn task has no template: modes do not apply.
  template_mode: str = tmpl.INSTRUCTIONS
  eval_template_mode: str = tmpl.INSTRUCTIONS
  # Text every target ends with (a chat format's end-of-turn marker): a target cut to its
  # length keeps it before EOS, so a cut response still ends its turn as the format does.
  target_end: str = ""
  # The raw inputs of the no_template and dataset_name modes (default: the fields the
  # templates name, in order of first appearance).
  input_fields: Sequence[str] | None = None

  def template_list(self) -> tuple[tmpl.Template, ...]:
    if isinstance(self.templates, str):
      return load_templates(self.templates)
    return tuple(self.templates)

  def is_eval_only(self, split: str) -> bool:
    return "*" in self.eval_only_splits or split in self.eval_only_splits

  def mode(self, split: str) -> str:
    """The template mode `split` renders in (instructions for a render_fn task)."""
    if self.render_fn is not None:
      return tmpl.INSTRUCTIONS
    train = split == "train" and not self.is_eval_only(split)
    return self.template_mode if train else self.eval_template_mode

  def fields(self) -> tuple[str, ...]:
    return tuple(self.input_fields or tmpl.input_fields(self.template_list()))


class Registered(NamedTuple):
  """A task as registered: its definition, vocabulary and input length (the input budget)."""
  defn: TaskDef
  vocabulary: seqio.Vocabulary
  input_length: int

  def tokenized(self, split: str) -> "Tokenized":
    return tokenized_split(self.defn, split, self.vocabulary, self.input_length)


# name -> Registered, for every task registered through this module.
DEFS: dict[str, Registered] = {}


@cache.in_process
def raw_examples(defn: TaskDef, split: str) -> tuple[dict, ...]:
  """The examples of a split as field dicts, before rendering (read once per process)."""
  if split not in defn.splits:
    raise UserError(f"task {defn.name} has no split {split!r}; it has {list(defn.splits)}")
  return tuple(defn.load(split))


def render_split(defn: TaskDef, split: str, fits: Callable[[str], bool] | None = None,
                 limit: int | None = None, fmt: str | None = None, *,
                 input_budget: int | None = None) -> list[dict]:
  """Rendered records of a split: inputs, targets, answer, options, template, format.

  Training splits draw a template and a format per example (seeded by task,
  split and index, so the same every run); other splits cycle through the
  templates in the task's eval format. Few-shot exemplars come from the
  exemplar split, never repeat the example asked (compared by content), and
  are dropped one by one, first first, until ``fits(inputs)``. input_budget:
  the token count ``fits`` checks against, named in notes (render_fn gets it).
  """
  examples = raw_examples(defn, split)
  if limit is not None:
    examples = examples[:limit]
  temps = defn.template_list()
  train = split not in defn.eval_only_splits and split == "train"
  pool = None
  mode, fields = defn.mode(split), (defn.fields() if defn.render_fn is None else ())
  out = []
  for i, ex in enumerate(examples):
    rng = random.Random(f"{defn.name}/{split}/{i}")
    if defn.render_fn is not None:
      inputs, targets = defn.render_fn(ex, i, split, fits, input_budget=input_budget)
      t_idx, f = -1, fmt or (defn.train_formats[0] if train else defn.eval_format)
    else:
      if train:
        t_idx = rng.randrange(len(temps))
        f = fmt or defn.train_formats[rng.randrange(len(defn.train_formats))]
      else:
        t_idx, f = i % len(temps), fmt or defn.eval_format
      layout = defn.options_layouts[rng.randrange(len(defn.options_layouts))]
      exemplars = []
      if f.startswith("few_shot") and defn.num_shots:
        if pool is None:
          pool = raw_examples(defn, defn.exemplar_split)
        key = defn.key(ex)
        candidates = rng.sample(range(len(pool)), min(len(pool), 4 * defn.num_shots + 4))
        for j in candidates:
          if len(exemplars) == defn.num_shots:
            break
          if defn.key(pool[j]) != key:
            exemplars.append(pool[j])
      while True:
        inputs, targets = tmpl.render(temps[t_idx], ex, f, exemplars, options_layout=layout,
                                      mode=mode, task_name=defn.name, fields=fields)
        if not exemplars or fits is None or fits(inputs):
          break
        exemplars = exemplars[1:]
    rec = dict(inputs=inputs, targets=targets, answer=str(ex.get("answer", targets)),
               options=list(ex.get("options") or []), template=t_idx, format=f)
    if len(ex.get("references") or ()) > 1:  # every right answer, for scoring (NIv2)
      rec["references"] = [str(r) for r in ex["references"]]
    out.append(rec)
  return out


def vocab_fingerprint(vocab: seqio.Vocabulary) -> str:
  fp = getattr(vocab, "fingerprint", None)
  if isinstance(fp, str):
    return fp
  if isinstance(vocab, seqio.SentencePieceVocabulary):
    return hashlib.sha256(vocab.sp_model).hexdigest()[:16] + f"/x{vocab.extra_ids}"
  return f"{type(vocab).__name__}/{vocab.vocab_size}"


def _encode_all(vocab: seqio.Vocabulary, texts: Sequence[str]) -> list[list[int]]:
  if isinstance(vocab, seqio.SentencePieceVocabulary):
    return vocab.tokenizer.encode(list(texts))  # one C++ call for the batch
  return [list(vocab.encode(t)) for t in texts]


def _render_fingerprint(fn) -> str:
  fp = getattr(fn, "fingerprint", None)
  if fp is not None:
    return str(fp)
  return getattr(fn, "__qualname__", type(fn).__qualname__)


def cache_key(defn: TaskDef, split: str, vocab: seqio.Vocabulary, input_budget: int) -> str:
  h = hashlib.sha256()
  temps = [dataclasses.astuple(t) for t in defn.template_list()] if defn.render_fn is None \
      else _render_fingerprint(defn.render_fn)
  fp = defn.fingerprint() if callable(defn.fingerprint) else defn.fingerprint
  parts = [CACHE_VERSION, defn.name, split, fp, temps, tuple(defn.train_formats),
           defn.eval_format, defn.num_shots, tuple(defn.options_layouts),
           vocab_fingerprint(vocab), int(input_budget)]
  if defn.mode(split) != tmpl.INSTRUCTIONS:  # instructions keeps the keys it always had
    parts += [defn.mode(split), defn.fields()]
  for part in parts:
    h.update(repr(part).encode() + b"\0")
  return h.hexdigest()[:16]


def _cache_dir(defn: TaskDef, split: str, vocab: seqio.Vocabulary, input_budget: int) -> str:
  return os.path.join(cache.default_cache_dir(), "tasks", defn.name,
                      f"{split}-{cache_key(defn, split, vocab, input_budget)}")


@dataclasses.dataclass
class Tokenized:
  inputs: tf.RaggedTensor | np.ndarray
  inputs_splits: np.ndarray
  targets: np.ndarray
  targets_splits: np.ndarray
  texts: list[dict]  # inputs_pretokenized, targets_pretokenized, answer, options

  def lengths(self, feature: str) -> np.ndarray:
    return np.diff(getattr(self, f"{feature}_splits"))


_MEMO: dict[str, Tokenized] = cache.in_process_dict()
_ARRAYS = ("inputs", "inputs_splits", "targets", "targets_splits")
_FILES = ("tokens.npz", "texts.jsonl")


def _read_entry(path: str) -> Tokenized:
  """A cached split, checked against its manifest; raises cache.Damaged."""
  meta = cache.read_manifest(os.path.join(path, "DONE"))
  try:
    with np.load(os.path.join(path, "tokens.npz"), allow_pickle=False) as arrays:
      parts = [np.asarray(arrays[k]) for k in _ARRAYS]
    with open(os.path.join(path, "texts.jsonl"), encoding="utf-8") as f:
      texts = [json.loads(line) for line in f]
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
    raise cache.Damaged(f"unreadable: {type(e).__name__}") from None
  tok = Tokenized(*parts, texts)
  n = meta.get("examples")
  if not isinstance(n, int):
    raise cache.Damaged("DONE records no example count")
  for feature in ("inputs", "targets"):
    flat, splits = getattr(tok, feature), getattr(tok, f"{feature}_splits")
    if (n != len(texts) or splits.ndim != 1 or len(splits) != n + 1 or splits[0] != 0
        or splits[-1] != len(flat) or np.any(np.diff(splits) < 0)):
      raise cache.Damaged(f"{feature} do not match the {n} examples recorded")
  return tok


def _discard(path: str) -> None:
  """Moves a damaged entry out of the way (atomically), then deletes it."""
  aside = f"{path}.damaged{os.getpid()}"
  try:
    os.replace(path, aside)
  except FileNotFoundError:
    return  # another process took it away first
  if os.path.isdir(aside):
    shutil.rmtree(aside, ignore_errors=True)
  else:
    os.remove(aside)


def _write_entry(tmp: str, tok: Tokenized) -> None:
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  np.savez(os.path.join(tmp, "tokens.npz"), **{k: getattr(tok, k) for k in _ARRAYS})
  with open(os.path.join(tmp, "texts.jsonl"), "w", encoding="utf-8") as f:
    for t in tok.texts:
      f.write(json.dumps(t, ensure_ascii=False) + "\n")
  for name in _FILES:
    cache.fsync_file(os.path.join(tmp, name))
  # Written last: an entry with a valid DONE has complete files.
  done = cache.manifest(tmp, _FILES, examples=len(tok.texts))
  with open(os.path.join(tmp, "DONE"), "w", encoding="utf-8") as f:
    json.dump(done, f)
    f.flush()
    os.fsync(f.fileno())


def _install(tmp: str, path: str) -> None:
  try:
    os.replace(tmp, path)
  except OSError:
    if not os.path.isdir(path):
      raise
    shutil.rmtree(tmp, ignore_errors=True)  # another process finished first; theirs is identical


def tokenized_split(defn: TaskDef, split: str, vocab: seqio.Vocabulary,
                    input_budget: int) -> Tokenized:
  """The split rendered and tokenized, read from the cache or built and written there.

  input_budget: the input feature length; few-shot prompts drop exemplars until
  their tokens and EOS fit it.
  """
  path = _cache_dir(defn, split, vocab, input_budget)
  if path in _MEMO:
    return _MEMO[path]
  if os.path.exists(path):
    try:
      tok = _read_entry(path)
    except cache.Damaged as e:
      cache.note_damaged(f"tokenized {defn.name}/{split}", path, str(e))
      _discard(path)
    else:
      _MEMO[path] = tok
      return tok
  t0 = time.time()
  budget = int(input_budget)
  # EOS takes one position of the budget.
  fits = lambda text: len(vocab.encode(text)) + 1 <= budget  # noqa: E731
  records = render_split(defn, split, fits, input_budget=budget)
  ins = _encode_all(vocab, [r["inputs"] for r in records])
  tgs = _encode_all(vocab, [r["targets"] for r in records])
  keep = [i for i, t in enumerate(tgs) if len(t)]
  if len(keep) < len(records):
    dropped = len(records) - len(keep)
    print(f"data: {defn.name}/{split}: {dropped} examples have targets that tokenize to "
          "nothing; dropped", flush=True)
  texts = [dict(inputs_pretokenized=records[i]["inputs"], targets_pretokenized=records[i]["targets"],
                answer=records[i]["answer"], options=records[i]["options"]) for i in keep]

  def flat(seqs):
    lens = np.array([len(s) for s in seqs], np.int64)
    splits = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    return (np.concatenate([np.asarray(s, np.int32) for s in seqs]) if seqs
            else np.zeros([0], np.int32)), splits

  inputs, in_splits = flat([ins[i] for i in keep])
  targets, tg_splits = flat([tgs[i] for i in keep])
  tok = Tokenized(inputs, in_splits, targets, tg_splits, texts)
  tmp = f"{path}.tmp{os.getpid()}"
  _write_entry(tmp, tok)
  _install(tmp, path)
  logging.info("data: %s/%s: rendered and tokenized %d examples in %.1fs -> %s",
               defn.name, split, len(texts), time.time() - t0, path)
  _MEMO[path] = tok
  return tok


def _dataset_fn(split, shuffle_files, seed=None, *, name):
  tok = DEFS[name].tokenized(split)
  ds = tf.data.Dataset.from_tensor_slices({
      "inputs": tf.RaggedTensor.from_row_splits(tok.inputs, tok.inputs_splits),
      "targets": tf.RaggedTensor.from_row_splits(tok.targets, tok.targets_splits),
      "inputs_pretokenized": [t["inputs_pretokenized"] for t in tok.texts],
      "targets_pretokenized": [t["targets_pretokenized"] for t in tok.texts],
      "answer": [t["answer"] for t in tok.texts],
      "options": [json.dumps(t["options"], ensure_ascii=False) for t in tok.texts],
      "task": [name] * len(tok.texts),
  })
  if shuffle_files:
    # The split is in memory and files are in source order: shuffle all of it,
    # not just seqio's buffer, so early batches are not all from the first rows.
    ds = ds.shuffle(len(tok.texts), seed=seed, reshuffle_each_iteration=True)
  return ds.map(_dense, num_parallel_calls=tf.data.AUTOTUNE)


def _dense(ex):
  # A row of a ragged tensor arrives as a rank-0-ragged value; make it a plain tensor.
  return {k: (v.to_tensor() if isinstance(v, tf.RaggedTensor) else v) for k, v in ex.items()}


class _Source(seqio.FunctionDataSource):
  """A FunctionDataSource whose example counts are read only when asked (mixing rates)."""

  def __init__(self, defn: "TaskDef"):
    super().__init__(functools.partial(_dataset_fn, name=defn.name), splits=list(defn.splits))
    self._defn = defn

  def num_input_examples(self, split: str) -> int:
    return len(raw_examples(self._defn, split))

  def pretokenized_texts(self, split: str) -> list[dict]:
    """Each example's text in source order (*_pretokenized), from the tokenized cache."""
    return DEFS[self._defn.name].tokenized(split).texts  # what _dataset_fn reads


def end_ids(vocabulary: seqio.Vocabulary, text: str) -> tuple[int, ...]:
  """The ids `text` ends a target with, whatever precedes it: the tail its encodings after
  several characters share (a SentencePiece vocabulary encodes it alone with a leading
  word-start piece that it loses after a word)."""
  tails = [list(vocabulary.encode(c + text)) for c in ("", "a", ".", " ", "\n", "1")]
  n = 0
  while all(len(t) > n for t in tails) and len({t[-1 - n] for t in tails}) == 1:
    n += 1
  return tuple(int(i) for i in tails[0][len(tails[0]) - n:])


def target_preprocessors(vocabulary: seqio.Vocabulary, target_end: str) -> list:
  """Trim to length and append EOS (seqio's), first keeping `target_end`'s ids at the end
  of a target that is cut."""
  ids = end_ids(vocabulary, target_end) if target_end else ()
  if not ids:
    return [seqio.preprocessors.append_eos_after_trim]
  return [functools.partial(keep_target_end, end_ids=ids),
          seqio.preprocessors.append_eos_after_trim]


def keep_target_end(dataset, sequence_length=None, end_ids: Sequence[int] = ()):
  """A target longer than its length less EOS is cut to it with `end_ids` as its last
  tokens, where it ended with them; other targets are left to seqio's trim."""
  if not sequence_length or not sequence_length.get("targets") or not end_ids:
    return dataset
  room, end = int(sequence_length["targets"]) - 1, tf.constant(list(end_ids), tf.int32)
  n = len(end_ids)
  if room <= n:
    return dataset

  def if_ends(t):  # t is longer than room > n here
    ends = tf.reduce_all(tf.equal(tf.cast(t[-n:], tf.int32), end))
    return tf.cond(ends, lambda: tf.concat([t[:room - n], tf.cast(end, t.dtype)], 0), lambda: t)

  def cut(ex):
    t = ex["targets"]
    return {**ex, "targets": tf.cond(tf.size(t) > room, lambda: if_ends(t), lambda: t)}
  return dataset.map(cut, num_parallel_calls=tf.data.AUTOTUNE)


def answer_accuracy(targets, predictions):
  """Exact match of the extracted answers, in percent."""
  if not targets:
    return {"accuracy": 0.0}
  hits = sum(tmpl.extract_answer(t) == tmpl.extract_answer(p) for t, p in zip(targets, predictions))
  return {"accuracy": 100.0 * hits / len(targets)}


def _extract(text, **_):
  return tmpl.extract_answer(text)


def output_features(vocabulary: seqio.Vocabulary) -> dict[str, seqio.Feature]:
  return {
      "inputs": seqio.Feature(vocabulary, add_eos=True, required=False),
      "targets": seqio.Feature(vocabulary, add_eos=True),
  }


def check_input_length(input_length, what: str = "input_length") -> int:
  """A positive int, or a UserError naming `what`."""
  if isinstance(input_length, bool) or not isinstance(input_length, (int, np.integer)) \
      or input_length <= 0:
    raise UserError(f"{what} must be a positive number of tokens, not {input_length!r}")
  return int(input_length)


def register(defn: TaskDef, vocabulary: seqio.Vocabulary,
             input_length: int = DEFAULT_INPUT_LENGTH,
             modes: tuple[str, str] | None = None) -> str:
  """Registers (or re-registers, for another vocabulary or length) `defn` as a seqio.Task.

  input_length: the input feature length the examples are made for; few-shot
  prompts drop exemplars until their tokens and EOS fit it. modes: the
  (training, evaluation) template modes it renders in (default: the defn's).
  """
  input_length = check_input_length(input_length)
  if modes is not None and defn.render_fn is None and (
      defn.template_mode, defn.eval_template_mode) != tuple(modes):
    defn = dataclasses.replace(defn, template_mode=tmpl.check_mode(modes[0]),
                               eval_template_mode=tmpl.check_mode(modes[1]))
  if defn.name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(defn.name)
  if defn.name in seqio.MixtureRegistry.names():
    # Left by an earlier registration in this process (a user's NIv2 folder was a
    # mixture of this name); the mixture would shadow the task.
    seqio.MixtureRegistry.remove(defn.name)
  DEFS[defn.name] = Registered(defn, vocabulary, input_length)
  seqio.TaskRegistry.add(
      defn.name,
      source=_Source(defn),
      preprocessors=target_preprocessors(vocabulary, defn.target_end),
      output_features=output_features(vocabulary),
      postprocess_fn=defn.postprocess_fn or _extract,
      metric_fns=list(defn.metric_fns or [answer_accuracy]),
  )
  return defn.name

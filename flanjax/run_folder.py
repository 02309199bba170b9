"""The run folder: every path and file of a training run, written and read here only.

    <model_dir>/
      run_info.json               what the folder's checkpoints are a run of (vocabulary,
                                  model shape, optimizer, mixture); checked on resume
      vocab/                      the run's tokenizer (spiece.model or tokenizer.json)
      prompt_format.json          the prompt format of its user-data tasks (and the chat
                                  template), applied by infer to this run's prompts
      checkpoints/<step>/         orbax: state (params, optimizer, step, rng) + data position
      checkpoints/best/           the best state by train.early_stopping's metric (state/,
                                  best.json: step, metric, value); never rotated
      train_losses.jsonl          one line per step (a resumed run appends; last wins)
      eval_during_training.jsonl  one line per evaluation during training
      summary.json                the end-of-run summary
      tensorboard/                scalars and tables
      curves.png                  training and validation loss, evaluation metrics, best step
      .lock                       held by the one process training in this folder

The trainer writes through a RunFolder; `models.loading`, `infer` and
`evaluate` read through it.
"""

from __future__ import annotations

import json
import os
from typing import Any

from flanjax.errors import UserError
from flanjax.models.fields import TRAINING_FIELDS  # noqa: F401  (train.py reads it here too)

RUN_INFO = "run_info.json"
VOCAB_DIR = "vocab"
CHECKPOINTS_DIR = "checkpoints"
STATE_ITEM = "state"
TRAIN_LOSSES = "train_losses.jsonl"
EVAL_LOG = "eval_during_training.jsonl"
SUMMARY = "summary.json"
PROMPT_FORMAT = "prompt_format.json"
TENSORBOARD = "tensorboard"
BEST_DIR = "best"  # checkpoints/best/
BEST_INFO = "best.json"
CURVES = "curves.png"


def parse_step(text: str) -> int | str:
  """A --step flag: a step number or 'best' (the run's best checkpoint)."""
  import argparse  # pylint: disable=g-import-not-at-top
  if text == BEST_DIR:
    return BEST_DIR
  try:
    return int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} is not a step number or '{BEST_DIR}'") from None




def run_record(mixture: str, vocabulary: str, cfg, kind: str, *, batch_size: int, seed: int,
               lengths, pack: bool) -> dict:
  """What run_info.json records of a run: what shapes its checkpoints (vocabulary, model,
  kind, optimizer; checked on resume), its own tasks (`data`, for evaluating it later) and
  its training settings (`training`: a change on resume is a note)."""
  import jax  # pylint: disable=g-import-not-at-top
  from flanjax.data import registry  # pylint: disable=g-import-not-at-top
  from flanjax.training import optimizers  # pylint: disable=g-import-not-at-top
  info = {"mixture": mixture, "vocabulary": vocabulary, "model": model_record(cfg),
          "kind": kind, "optimizer": optimizers.describe()}
  if data := registry.data_record():
    info["data"] = data
  info["training"] = {"schedule": optimizers.describe_schedule(), "batch_size": int(batch_size),
                      "seed": int(seed), "task_feature_lengths": dict(lengths),
                      "pack": bool(pack), "processes": jax.process_count()}
  return info


# Model fields added after run_info.json began recording the model, with the value every run
# recorded before had: a record without one reads as that (older runs still resume).
ADDED_MODEL_FIELDS = {"sliding_window": None, "qkv_bias": False, "qk_norm": False,
                      "scan_layers": False}  # (scan_layers: recorded only when True)


def model_record(cfg) -> dict:
  """The model config as run_info.json records it, for check_run_info: the fields that
  shape the checkpoint. A scanned stack is recorded, the default unscanned one is not, so
  the runs from before scan_layers existed still compare equal."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  record = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in TRAINING_FIELDS}
  if getattr(cfg, "scan_layers", False):
    record["scan_layers"] = True  # the trainer restores a checkpoint in its own layout only
  return record


def _step_at_most(line: str, step: int) -> bool:
  """Whether a log line is a record of `step` or earlier (blank and unreadable lines go)."""
  try:
    return int(json.loads(line)["step"]) <= step
  except (ValueError, KeyError, TypeError):
    return False


def _moved_base(was, now) -> bool:
  """Whether two adapter records name the same base (its fingerprint) at different paths."""
  if not (isinstance(was, dict) and isinstance(now, dict)):
    return False
  a, b = was.get("base"), now.get("base")
  return (isinstance(a, dict) and isinstance(b, dict) and a.get("fingerprint") is not None
          and a.get("fingerprint") == b.get("fingerprint") and a.get("path") != b.get("path"))


def _is_main() -> bool:
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_index() == 0


def _write_json(path: str, data: Any) -> None:
  """Whole or not at all: a temporary file renamed into place."""
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(data, f, indent=1, ensure_ascii=False)
  os.replace(tmp, path)


def _extra_pieces(spiece: str) -> int:
  """How many of seqio's extra-id pieces ('▁<extra_id_N>') a SentencePiece file holds."""
  import re  # pylint: disable=g-import-not-at-top
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  sp = spm.SentencePieceProcessor(model_file=spiece)
  pattern = re.compile(r"^\u2581<extra_id_\d+>$")
  return sum(1 for i in range(sp.get_piece_size()) if pattern.match(sp.id_to_piece(i)))


class RunFolder:
  """One training run's folder (see the module docstring for its layout)."""

  def __init__(self, path: str):
    self.path = os.path.abspath(os.path.expanduser(path))

  # ---------------------------------------------------------------- paths
  def file(self, name: str) -> str:
    return os.path.join(self.path, name)

  @property
  def run_info_path(self) -> str:
    return self.file(RUN_INFO)

  @property
  def vocab_dir(self) -> str:
    return self.file(VOCAB_DIR)

  @property
  def checkpoints_dir(self) -> str:
    return self.file(CHECKPOINTS_DIR)

  @property
  def tensorboard_dir(self) -> str:
    return self.file(TENSORBOARD)

  @property
  def losses_path(self) -> str:
    return self.file(TRAIN_LOSSES)

  @property
  def eval_log_path(self) -> str:
    return self.file(EVAL_LOG)

  @property
  def summary_path(self) -> str:
    return self.file(SUMMARY)

  @property
  def best_dir(self) -> str:
    return os.path.join(self.checkpoints_dir, BEST_DIR)

  @property
  def best_info_path(self) -> str:
    return os.path.join(self.best_dir, BEST_INFO)

  @property
  def curves_path(self) -> str:
    return self.file(CURVES)

  def lock(self):
    """The folder's run lock (`<path>/.lock`; process 0 of a multi-process run holds it):
    `with run.lock(): ...` refuses a second run on the folder with one line."""
    import jax  # pylint: disable=g-import-not-at-top
    from flanjax.training.run_lock import RunLock  # pylint: disable=g-import-not-at-top
    return RunLock(self.path, process_index=jax.process_index())

  def state_dir(self, step: int | str) -> str:
    """A step's state item; step 'best' is checkpoints/best/state."""
    return os.path.join(self.checkpoints_dir, BEST_DIR if step == BEST_DIR else str(step),
                        STATE_ITEM)

  # ---------------------------------------------------------------- finding runs
  @classmethod
  def find(cls, path: str) -> "RunFolder | None":
    """The run of a run folder or of its checkpoints/ folder; None if neither holds steps."""
    run = cls(path)
    if run.checkpoint_steps():
      return run
    if cls.is_best_dir(path):  # <run>/checkpoints/best
      return cls(os.path.dirname(os.path.dirname(run.path)))
    if os.path.basename(run.path) == CHECKPOINTS_DIR:
      parent = cls(os.path.dirname(run.path))
      if parent.checkpoint_steps():
        return parent
    return None

  def checkpoint_steps(self) -> list[int]:
    """Complete checkpoint steps (an orbax step folder holding its state item)."""
    root = self.checkpoints_dir
    if not os.path.isdir(root):
      return []
    return sorted(int(n) for n in os.listdir(root)
                  if n.isdigit() and os.path.isdir(os.path.join(root, n, STATE_ITEM)))

  @staticmethod
  def is_best_dir(path: str) -> bool:
    """Whether `path` is a run's checkpoints/best folder holding a state."""
    path = os.path.abspath(os.path.expanduser(path))
    return (os.path.basename(path) == BEST_DIR and
            os.path.basename(os.path.dirname(path)) == CHECKPOINTS_DIR and
            os.path.isdir(os.path.join(path, STATE_ITEM)))

  def resolve_step(self, step: int | str | None) -> int | str:
    """The newest step for None; 'best' (checkpoints/best) if the run keeps one."""
    if step == BEST_DIR:
      if self.read_best() is None:
        raise UserError(f"{self.best_dir}: no best checkpoint (kept only by runs with "
                        "train.early_stopping)")
      return BEST_DIR
    steps = self.checkpoint_steps()
    if not steps:
      raise UserError(f"{self.checkpoints_dir}: no checkpoint steps")
    if step is None:
      return steps[-1]
    if step not in steps:
      raise UserError(f"{self.checkpoints_dir}: no step {step} "
                      f"(steps: {', '.join(map(str, steps))})")
    return step

  # ---------------------------------------------------------------- writing
  def check_writable(self) -> None:
    """Fails before training if the folder cannot be written."""
    try:
      os.makedirs(self.path, exist_ok=True)
      probe = self.file(f".write_test.{os.getpid()}")
      with open(probe, "w") as f:
        f.write("ok")
      os.remove(probe)
    except OSError as e:
      raise UserError(f"model directory {self.path} is not writable ({e.strerror}); "
                      "set --gin.train.model_dir to a writable folder") from None

  def read_run_info(self) -> dict | None:
    if not os.path.exists(self.run_info_path):
      return None
    try:
      with open(self.run_info_path, encoding="utf-8") as f:
        return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError):
      raise UserError(f"{self.run_info_path} is not valid JSON, so the run in {self.path} "
                      "cannot be checked against this one; restore that file, or set "
                      "--gin.train.model_dir to a new folder") from None

  def check_run_info(self, info: dict) -> None:
    """A folder belongs to one run: resuming with another vocabulary, model or optimizer
    is refused, naming the fields that differ. Only checks; write_run_info records."""
    old = self.read_run_info()
    if old is None:
      return
    for key, what in (("vocabulary", "vocabulary"), ("model", "model config"),
                      ("kind", "model kind"), ("adapter", "adapter config")):
      if key not in info or (key not in old and key in ("kind", "adapter")):
        continue  # runs from before the field was recorded are checked by their checkpoint
      was, now = old.get(key), info[key]
      if key == "model" and isinstance(was, dict) and isinstance(now, dict):
        was, now = ({**{k: v for k, v in ADDED_MODEL_FIELDS.items() if k in was or k in now},
                     **d} for d in (was, now))
      moved = key == "adapter" and _moved_base(was, now)
      if moved:  # the same base in another folder: its path is no part of the run
        was = dict(was, base=now["base"])
      if was == now:
        if moved:
          print(f"note: {self.path}: the adapters' base (same fingerprint) is now "
                f"{now['base'].get('path')} (was {old[key]['base'].get('path')})", flush=True)
        continue
      fix = "set --gin.train.model_dir to a new folder"
      if isinstance(was, dict) and isinstance(now, dict):  # name the fields that differ
        diff = sorted(k for k in set(was) | set(now) if was.get(k) != now.get(k))
        was, now = ({k: d.get(k) for k in diff} for d in (was, now))
        if diff == ["scan_layers"]:  # a layout of the same weights, not another model
          fix = (f"a run resumes in the layout it trained in: set scan_layers={was[diff[0]]} "
                 f"again, or {fix}")
      raise UserError(
          f"{self.path} holds a run with a different {what} ({self.run_info_path}: {was!r}, "
          f"now {now!r}); its checkpoints cannot be resumed with this one: {fix}")
    self._check_optimizer(old.get("optimizer"), info.get("optimizer"))
    self._note_training(old.get("training"), info.get("training"))
    if old.get("mixture") != info.get("mixture"):
      print(f"note: {self.path} was trained on {old.get('mixture')!r}; continuing on "
            f"{info.get('mixture')!r}", flush=True)

  # Fields of run_info's "training" that decide which batches come next.
  _STREAM_FIELDS = ("batch_size", "seed", "task_feature_lengths", "pack", "processes")

  def _note_training(self, was: dict | None, now: dict | None) -> None:
    """A note for each training setting changed since the run began (runs from before
    they were recorded: none)."""
    if not was or not now:
      return
    flat = lambda d: {**{f"schedule.{k}": v for k, v in (d.get("schedule") or {}).items()},
                      **{k: v for k, v in d.items() if k != "schedule"}}  # noqa: E731
    a, b = flat(was), flat(now)
    changed = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if not changed:
      return
    text = "; ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in changed)
    stream = [k for k in changed if k in self._STREAM_FIELDS]
    tail = (f"; with another {', '.join(stream)} the batches from here on are not the ones "
            "an uninterrupted run would have seen" if stream else "")
    print(f"note: {self.path}: training settings changed since the run began ({text}){tail}",
          flush=True)

  def _check_optimizer(self, was: dict | None, now: dict | None) -> None:
    """Another optimizer (its state has another tree) is refused; new values are a note."""
    if not was or not now:
      return
    from flanjax.training import optimizers  # pylint: disable=g-import-not-at-top
    state, other = optimizers.compare(was, now)
    if state:
      raise UserError(
          f"{self.path} holds a run trained with another optimizer ({'; '.join(state)}); its "
          "checkpoints' optimizer state does not fit this one: train with the run's optimizer "
          "settings, or set --gin.train.model_dir to a new folder")
    if other:
      print(f"note: {self.path}: optimizer settings changed since the run began "
            f"({'; '.join(other)})", flush=True)

  def write_run_info(self, info: dict) -> None:
    if _is_main():
      _write_json(self.run_info_path, info)

  def record_prompt_format(self, mixture: str) -> None:
    """Writes prompt_format.json when `mixture` holds user-data tasks (their prompt
    format; see flanjax/data/chat.py), with a note when it differs from the one before."""
    from flanjax.data.collections import user  # pylint: disable=g-import-not-at-top
    fmt = user.prompt_format_of(mixture)
    if fmt is None or not _is_main():
      return
    old = self.read_prompt_format()
    if old is not None and old != fmt.record():
      print(f"note: {self.path} was trained with prompt format {old.get('name')!r} (or "
            f"another template); continuing with {fmt.name!r}", flush=True)
    _write_json(self.file(PROMPT_FORMAT), fmt.record())

  def read_prompt_format(self) -> dict | None:
    """What record_prompt_format wrote, or None (runs without user data, older runs)."""
    path = self.file(PROMPT_FORMAT)
    if not os.path.exists(path):
      return None
    try:
      with open(path, encoding="utf-8") as f:
        data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError):
      raise UserError(f"{path} is not valid JSON; restore it, or give infer "
                      "--prompt_format") from None
    if not isinstance(data, dict) or not data.get("name"):
      raise UserError(f"{path} names no prompt format; restore it, or give infer --prompt_format")
    return data

  def save_vocabulary(self, vocab) -> None:
    """Keeps the run's tokenizer beside its checkpoints, so an export is self-contained."""
    if not _is_main():
      return
    import seqio  # pylint: disable=g-import-not-at-top
    os.makedirs(self.vocab_dir, exist_ok=True)
    if isinstance(vocab, seqio.SentencePieceVocabulary):
      tmp = os.path.join(self.vocab_dir, f"spiece.model.tmp{os.getpid()}")
      from flanjax.models import hf  # pylint: disable=g-import-not-at-top
      # The model file itself (load_vocabulary adds the extra ids from run_info's fingerprint).
      with open(tmp, "wb") as f:
        f.write(hf.spiece_bytes(vocab))
      os.replace(tmp, os.path.join(self.vocab_dir, "spiece.model"))
    elif hasattr(vocab, "save_tokenizer"):
      vocab.save_tokenizer(self.vocab_dir)

  def drop_records_after(self, step: int) -> None:
    """A resumed run's logs as they stood at its checkpoint's `step`: the losses and
    evaluations of later steps, which it runs again, dropped (so each step has one record
    for whoever reads the files; the readers here keep the last of each step anyway)."""
    if not _is_main():
      return
    for path in (self.losses_path, self.eval_log_path):
      if not os.path.exists(path):
        continue
      with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.readlines()
      kept = [line for line in lines if line.endswith("\n") and _step_at_most(line, step)]
      if len(kept) != len(lines):
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
          f.writelines(kept)
        os.replace(tmp, path)

  def open_losses_log(self):
    """The per-step log for appending (process 0; else None), a last line cut short by a
    kill dropped. A resumed run has dropped the steps after its checkpoint first
    (`drop_records_after`); readers take the last record of each step all the same."""
    if not _is_main():
      return None
    path = self.losses_path
    if os.path.exists(path):
      with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
          f.truncate(data.rfind(b"\n") + 1)
    return open(path, "a", encoding="utf-8")

  def append_eval(self, record: dict) -> None:
    if _is_main():
      with open(self.eval_log_path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")

  def write_summary(self, summary: dict) -> None:
    if _is_main():
      _write_json(self.summary_path, summary)

  # ---------------------------------------------------------------- reading
  def read_losses(self) -> list[dict]:
    """The per-step records, the last record of each step kept, in step order."""
    by_step = {}
    if os.path.exists(self.losses_path):
      with open(self.losses_path, encoding="utf-8") as f:
        for line in f:
          line = line.strip()
          if line:
            rec = json.loads(line)
            by_step[rec["step"]] = rec
    return [by_step[s] for s in sorted(by_step)]

  def read_evals(self) -> list[dict]:
    """The evaluations during training, the last record of each step kept, in step order
    (a resumed run evaluates the steps after its checkpoint again)."""
    by_step = {}
    if os.path.exists(self.eval_log_path):
      with open(self.eval_log_path, encoding="utf-8") as f:
        for line in f:
          line = line.strip()
          if line:
            try:
              rec = json.loads(line)
            except json.JSONDecodeError:
              continue  # a line cut short by a kill
            by_step[rec["step"]] = rec
    return [by_step[s] for s in sorted(by_step)]

  def read_best(self) -> dict | None:
    """checkpoints/best/best.json ({step, metric, value, mode}), or None."""
    try:
      with open(self.best_info_path, encoding="utf-8") as f:
        return json.load(f)
    except (OSError, json.JSONDecodeError):
      return None

  def load_vocabulary(self, run_info: dict | None = None):
    """The tokenizer the run saved in its vocab/ folder."""
    import seqio  # pylint: disable=g-import-not-at-top
    run_info = run_info if run_info is not None else (self.read_run_info() or {})
    spiece = os.path.join(self.vocab_dir, "spiece.model")
    if os.path.isfile(spiece):
      # run_info's fingerprint ends in "/x<extra_ids>" for a SentencePiece vocabulary.
      fp = str(run_info.get("vocabulary", ""))
      tail = fp.rsplit("/x", 1)[1] if "/x" in fp else ""
      extra = int(tail) if tail.isdigit() else 0
      # Runs before 2026-12-05 saved the pieces with the extra ids already appended.
      return seqio.SentencePieceVocabulary(spiece, extra_ids=max(0, extra - _extra_pieces(spiece)))
    if os.path.isfile(os.path.join(self.vocab_dir, "tokenizer.json")):
      from flanjax.data import hf_vocab  # pylint: disable=g-import-not-at-top
      return hf_vocab.HFTokenizerVocabulary.from_directory(self.vocab_dir, model_config={})
    raise UserError(f"{self.path}: the run has no tokenizer in {self.vocab_dir} (runs from "
                    "before it was kept there): copy the run's spiece.model or tokenizer.json "
                    "into it")

  def model_kind(self, run_info: dict | None = None):
    """The kind the run trained: recorded in run_info.json (older runs: enc_dec for a T5
    config, prefix_lm for a decoder config, as flanjax trained them)."""
    from flanjax.models import kinds  # pylint: disable=g-import-not-at-top
    run_info = run_info if run_info is not None else (self.read_run_info() or {})
    if run_info.get("kind"):
      return kinds.get(run_info["kind"])
    model = run_info.get("model") or {}
    return kinds.ENC_DEC if "num_encoder_layers" in model else kinds.PREFIX_LM

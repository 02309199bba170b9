"""Early stopping on an evaluation metric, and the warning that a run is overfitting.

    train.early_stopping = @EarlyStopping()
    EarlyStopping.metric = 'eval/loss'   # any scalar an evaluation writes (TensorBoard tag)
    EarlyStopping.mode = 'auto'          # 'min' | 'max'; auto: min for a loss, else max
    EarlyStopping.patience = 3           # evaluations without improvement; None: never stop
    EarlyStopping.min_delta = 0.0        # what counts as an improvement

Both objects are plain bookkeeping over the sequence of evaluations (step,
value), with no clock and no I/O, so a resumed run replays the recorded
evaluations (eval_during_training.jsonl) into them and continues where the
interrupted run was. The loop (training/loop.py) saves the best checkpoint
when `update` says so and stops when `should_stop` is true.
"""

from __future__ import annotations

import math

import gin

from flanjax.errors import UserError

MODES = ("auto", "min", "max")
# Evaluations in a row for the overfitting warning when early stopping is off.
DEFAULT_PATIENCE = 3


def check_watchable(es: "EarlyStopping | None", eval_every_steps: int,
                    validation_every_steps: int, validation_batches: int) -> None:
  """Early stopping needs evaluations of its metric: refused before a run starts without."""
  if es is None:
    return
  if not (eval_every_steps or (validation_every_steps and validation_batches)):
    raise UserError("train.early_stopping watches evaluations, and none is set: set "
                    "train.eval_every_steps (or train.validation_every_steps for loss-only "
                    "evaluations)")
  if es.metric in ("eval/loss", "eval/token_accuracy") and not validation_batches:
    raise UserError(f"train.early_stopping watches {es.metric}, and "
                    "train.validation_batches=0 measures no validation loss: raise it")


@gin.configurable
class EarlyStopping:
  """Stops when `metric` has not improved by more than `min_delta` for `patience`
  evaluations in a row (Keras' rule: the best moves only on such an improvement)."""

  def __init__(self, metric: str = "eval/loss", mode: str = "auto",
               patience: int | None = DEFAULT_PATIENCE, min_delta: float = 0.0):
    if mode not in MODES:
      raise UserError(f"EarlyStopping.mode={mode!r}: choose one of {', '.join(MODES)}")
    if patience is not None and (not isinstance(patience, int) or patience < 1):
      raise UserError(f"EarlyStopping.patience={patience!r}: a number of evaluations, at least "
                      "1 (None keeps the best checkpoint and never stops)")
    if not min_delta >= 0:
      raise UserError(f"EarlyStopping.min_delta={min_delta!r} must be 0 or more")
    self.metric, self.mode, self.patience, self.min_delta = metric, mode, patience, min_delta
    self.reset()

  def reset(self) -> None:
    """Forgets every evaluation seen."""
    self.best: float | None = None
    self.best_step: int | None = None
    self.wait = 0  # evaluations since the best
    self.last_step: int | None = None

  @property
  def maximize(self) -> bool:
    if self.mode != "auto":
      return self.mode == "max"
    return "loss" not in self.metric.rsplit("/", 1)[-1]

  @property
  def direction(self) -> str:
    return "max" if self.maximize else "min"

  def improves(self, value: float) -> bool:
    """Whether `value` beats the best by more than min_delta (any finite first value does)."""
    if value is None or not math.isfinite(value):
      return False
    if self.best is None:
      return True
    if self.maximize:
      return value > self.best + self.min_delta
    return value < self.best - self.min_delta

  def update(self, step: int, value: float | None, counts: bool = True) -> bool:
    """Records an evaluation; True when it is the new best. counts=False: it may become the
    best but a miss does not count toward patience (an end-of-run report off the
    evaluation grid, so a run extended later stops where a straight run would). A step
    already seen (the end-of-run report of a step evaluated periodically) or a missing
    value is ignored."""
    if value is None or (self.last_step is not None and step <= self.last_step):
      return False
    self.last_step = step
    if self.improves(value):
      self.best, self.best_step, self.wait = float(value), step, 0
      return True
    self.wait += int(counts)
    return False

  @property
  def should_stop(self) -> bool:
    return self.patience is not None and self.wait >= self.patience

  def reason(self) -> str:
    best = "none finite" if self.best is None else f"{self.best:.4f} at step {self.best_step}"
    by = f" by more than {self.min_delta:g}" if self.min_delta else ""
    return (f"{self.metric} has not improved{by} for {self.wait} evaluation"
            f"{'s' if self.wait != 1 else ''} ({self.direction} is better; best {best})")

  def describe(self) -> dict:
    return {"metric": self.metric, "mode": self.direction, "patience": self.patience,
            "min_delta": self.min_delta, "best_step": self.best_step, "best_value": self.best}


class OverfitWatch:
  """Warns when validation loss has risen at each of `patience` evaluations in a row while
  the training loss (the mean over the steps since the evaluation before) fell over them."""

  def __init__(self, patience: int = DEFAULT_PATIENCE):
    self.patience = patience
    self.points: list[tuple[int, float, float | None]] = []  # (step, val, train)

  def update(self, step: int, val_loss: float | None, train_loss: float | None) -> str | None:
    """Records an evaluation; the warning line when the pattern holds now, else None."""
    if val_loss is None or (self.points and step <= self.points[-1][0]):
      return None
    self.points.append((step, float(val_loss), train_loss))
    span = self.points[-self.patience - 1:]
    if len(span) <= self.patience:
      return None
    rising = all(b[1] > a[1] for a, b in zip(span, span[1:]))
    first, last = span[0][2], span[-1][2]
    if not rising or first is None or last is None or not last < first:
      return None
    times = "1 evaluation" if self.patience == 1 else f"{self.patience} evaluations in a row"
    return (f"warning: validation loss has risen for {times} "
            f"(step {span[0][0]}: {span[0][1]:.4f} -> step {step}: {val_loss:.4f}) while "
            f"training loss fell ({first:.4f} -> {last:.4f}): the model is overfitting")

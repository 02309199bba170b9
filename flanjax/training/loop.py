"""The training loop: a Trainer that receives its collaborators as plain objects.

    trainer = Trainer(model=..., kind=..., partitioner=..., optimizer=..., checkpointer=...,
                      data=..., evaluator=..., run=..., vocab=..., mixture=...)
    state = trainer.init_state(params=None)     # sharded from eval_shape + the logical rules
    summary = trainer.fit(state, num_steps=1000)

`python -m flanjax.train` builds these from gin (flanjax/train.py); a Python
user builds them directly. The step itself is pure (trainer.make_train_step);
this module is the loop around it: resume, checkpoints, non-finite steps,
progress, evaluations (with the overfitting warning, early stopping and the
best checkpoint), the summary and curves.png.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import math
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np
import optax

from flanjax.errors import UserError
from flanjax.models import kinds as kinds_lib
from flanjax.training import adapters as adapters_lib
from flanjax.training import checkpoints, partitioning, trainer as step_lib
from flanjax.training import early_stopping as stopping_lib
from flanjax.training import flops as flops_lib
from flanjax.training import metrics as metrics_lib


@dataclasses.dataclass
class Partitioner:
  """The device mesh and the logical axis rules that shard the state and the batch."""
  mesh: Any
  rules: Any

  @classmethod
  def create(cls, mesh_shape=(-1, 1, 1), rules=None) -> "Partitioner":
    return cls(partitioning.make_mesh(mesh_shape),
               rules if rules is not None else partitioning.logical_rules())

  def scope(self):
    """The context in which jitted code sees the mesh and the rules."""
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(self.mesh))
    stack.enter_context(nn.logical_axis_rules(self.rules))
    return stack


@dataclasses.dataclass
class Optimizer:
  """An optax transformation and its learning-rate schedule (for the logs)."""
  tx: optax.GradientTransformation
  lr_fn: Callable


@dataclasses.dataclass
class LossConfig:
  z_loss: float = 1e-4
  label_smoothing: float = 0.0
  loss_normalizing_factor: float | None = None
  microbatches: int = 1
  # Positions of each row the output layer takes at a time inside the loss (loss positions
  # only; trainer.make_train_step); 0: logits at every position, then the loss.
  output_chunk: int = 128


@dataclasses.dataclass
class LogConfig:
  log_every_secs: float = 5.0
  summary_every_steps: int = 10
  peak_flops: float | None = None
  max_nonfinite_in_row: int = 5
  steps_in_flight: int = 2  # steps dispatched before the host reads a step's metrics


class _StepRecorder:
  """Logs each finished step: console progress, train_losses.jsonl, TensorBoard, and the
  streak of non-finite steps (which stops the run, naming the intact checkpoint)."""

  def __init__(self, trainer: "Trainer", num_steps: int, start_step: int, writer):
    self.t, self.num_steps, self.writer = trainer, num_steps, writer
    self.start_step = start_step
    self.history, self.nonfinite_in_row = [], 0
    self._window_start = 0  # history index after the last evaluation
    self.losses_file = trainer.run.open_losses_log()
    cfg = trainer.log
    # The benchmarks' FLOP count (training/flops.py): matmuls and attention, no embeddings.
    self.progress = metrics_lib.Progress(
        num_steps, start_step, cfg.log_every_secs,
        flops_per_token=flops_lib.model_flops_per_token(trainer.model, trainer.data.row_lengths),
        peak_flops=cfg.peak_flops or flops_lib.device_peak_flops())

  def close(self):
    if self.losses_file:
      self.losses_file.close()

  def train_loss_window(self) -> float | None:
    """Mean finite training loss of the steps since the last call (the last evaluation)."""
    recent = [x for x in self.history[self._window_start:] if math.isfinite(x)]
    self._window_start = len(self.history)
    return float(np.mean(recent)) if recent else None

  def record(self, step_no: int, m, real: float, tasks_in_batch: dict) -> None:
    m = {k: float(v) for k, v in jax.device_get(m).items()}
    self.history.append(m["loss"])
    rec = {"step": step_no, **m}
    if m["applied"] == 0:
      rec["tasks"] = tasks_in_batch  # what the skipped batch held
    if self.losses_file:
      self.losses_file.write(json.dumps(rec) + "\n")
      self.losses_file.flush()  # a killed run keeps every step it logged
    if m["applied"] == 0:
      self._nonfinite(step_no, m, tasks_in_batch)
    else:
      self.nonfinite_in_row = 0
    padded = self.t.data.tokens_per_step
    rates = self.progress.update(step_no, m, padded, real, force=step_no == self.num_steps)
    if step_no % self.t.log.summary_every_steps == 0 or rates:
      scal = {k: m[k] for k in ("loss", "cross_entropy", "z_loss", "grad_norm",
                                "learning_rate")}
      scal["non_padding_share"] = real / max(padded, 1)
      scal.update(rates or {})
      self.writer.scalars(step_no, {f"train/{k}": v for k, v in scal.items()})
    if self.t.on_step:
      self.t.on_step(step_no, m)

  def _nonfinite(self, step_no, m, tasks_in_batch):
    self.nonfinite_in_row += 1
    tasks_text = ", ".join(f"{t} ({n})" for t, n in tasks_in_batch.items()) or "not known"
    print(f"step {step_no}: non-finite loss ({m['loss']}) or gradient norm "
          f"({m['grad_norm']}); update skipped; the batch's examples by task: {tasks_text}",
          flush=True)
    n = self.nonfinite_in_row
    if n < self.t.log.max_nonfinite_in_row:
      return
    ckpt = self.t.checkpointer
    ckpt.wait()
    good = ckpt.latest_step()
    kept = (f"the newest checkpoint, step {good}, is from before them and intact" if
            good is not None else "no checkpoint had been written before them")
    raise UserError(
        f"{n} non-finite steps in a row (steps {step_no - n + 1}-{step_no}; last batch's "
        f"tasks: {tasks_text}); stopped, and {kept} in {ckpt.directory}; lower the learning "
        "rate (schedule.peak) or check those tasks' data, then rerun to resume "
        "(train.max_nonfinite_in_row sets how many in a row stop a run)")


@dataclasses.dataclass
class Trainer:
  """Trains `model` (a module of `kind`) on `data`; see the module docstring."""
  model: Any
  kind: kinds_lib.ModelKind
  partitioner: Partitioner
  optimizer: Optimizer
  checkpointer: checkpoints.Checkpointer
  data: Any  # training.data.TrainData
  evaluator: Any  # evaluation.evaluator.Evaluator
  run: Any  # run_folder.RunFolder
  vocab: Any
  mixture: str
  seed: int = 0
  losses: LossConfig = dataclasses.field(default_factory=LossConfig)
  log: LogConfig = dataclasses.field(default_factory=LogConfig)
  run_info: dict | None = None  # written once the folder's checkpoint restored
  on_step: Callable | None = None
  dropout: bool = False
  early_stopping: stopping_lib.EarlyStopping | None = None
  adapters: adapters_lib.Adapters | None = None  # LoRA: the state is the adapters' alone

  # ---------------------------------------------------------------- state
  def abstract_params(self):
    """The parameters' shapes with their logical axis names (no memory used)."""
    return kinds_lib.abstract_params(self.model.config, unbox=False)

  def init_state(self, params=None):
    """The train state, initialised directly into its shardings (params: start from these)."""
    p = self.partitioner
    if self.adapters is not None:
      return self._init_adapter_state()
    state, self.state_shardings = step_lib.create_sharded_state(
        self.model, self.optimizer.tx, p.mesh, p.rules, self.seed,
        self.kind.dummy_batch(1, 8, 8), params=params)
    return state

  def _init_adapter_state(self):
    """The frozen base placed on the devices (self.base, in the adapters' base dtype) and
    the adapters' train state (params, optimizer state, step, rng)."""
    p, a, tx = self.partitioner, self.adapters, self.optimizer.tx
    abstract_base = self.abstract_params()
    self.base_shardings = partitioning.shardings_of(abstract_base, p.mesh, p.rules)
    want = nn.unbox(abstract_base)
    kinds_lib.check_params_fit(want, a.base)
    have = kinds_lib.flat_params(a.base)
    base = jax.tree.unflatten(jax.tree.structure(want), [
        np.asarray(have[k], a.base_dtype()) for k in kinds_lib.flat_params(want)])
    self.base, a.base = jax.device_put(base, self.base_shardings), None
    self._merge = None

    init_fn = adapters_lib.state_init(a, tx)
    rng = jax.random.PRNGKey(self.seed)
    self.state_shardings = step_lib.state_shardings(jax.eval_shape(init_fn, rng), p.mesh,
                                                    p.rules)
    with p.scope():
      return jax.jit(lambda r: nn.unbox(init_fn(r)), out_shardings=self.state_shardings)(rng)

  def eval_params(self, params):
    """The parameters the model runs with: with adapters, the base with them merged."""
    if self.adapters is None:
      return params
    if self._merge is None:
      self._merge = jax.jit(self.adapters.merged, out_shardings=self._merged_shardings())
    return self._merge(self.base, params)

  def _merged_shardings(self):
    return self.adapters.merged_shardings(self.base_shardings, self.state_shardings["params"])

  def resume(self, state):
    """(state, data position): the newest checkpoint that restores, else the fresh state."""
    position = 0
    if self.checkpointer.latest_step() is not None:
      restored = self.checkpointer.restore_latest(
          checkpoints.abstract_like(state, self.state_shardings))
      if restored is not None:
        state, position, step = restored
        print(f"resumed from step {step} in {self.checkpointer.directory}", flush=True)
    if self.run_info is not None:
      self.run.write_run_info(self.run_info)  # the folder's checkpoints fit this run
    return state, position

  def _compile(self):
    p, lc, a = self.partitioner, self.losses, self.adapters
    make = lambda model: step_lib.make_train_step(  # noqa: E731
        model, self.optimizer.tx, self.optimizer.lr_fn, microbatches=lc.microbatches,
        z_loss=lc.z_loss, label_smoothing=lc.label_smoothing,
        loss_normalizing_factor=lc.loss_normalizing_factor, output_chunk=lc.output_chunk,
        dropout=self.dropout or (a is not None and a.dropout > 0),
        model_inputs=self.kind.model_inputs)
    if a is None:
      jit_step = step_lib.jit_train_step(make(self.model), self.state_shardings, p.mesh)
      params_sh = self.state_shardings["params"]
    else:
      jitted = adapters_lib.jit_train_step(make, self.model, a, self.state_shardings,
                                           partitioning.batch_sharding(p.mesh),
                                           self.base_shardings)
      jit_step = lambda state, batch: jitted(state, batch, self.base)  # noqa: E731
      params_sh = self._merged_shardings()
    eval_step = jax.jit(step_lib.make_eval_step(self.model, self.kind.model_inputs,
                                                token_accuracy=True,
                                                output_chunk=lc.output_chunk),
                        in_shardings=(params_sh, partitioning.batch_sharding(p.mesh)))
    return jit_step, self._loss_probe(eval_step)

  def _loss_probe(self, eval_step):
    """(params, task, split, max_batches) -> (summed loss, weight, correct tokens; batches)
    over the first batches of a split: the evaluator's teacher-forced measure."""
    mesh = self.partitioner.mesh

    def probe(params, task, split, max_batches):
      batches = self.data.eval_batches(task, split, max_batches)
      sums = [eval_step(params, partitioning.global_batch(b, mesh)) for b in batches]
      if not sums:
        return np.zeros(3), 0
      return np.asarray(jax.device_get(sums), np.float64).sum(0), len(batches)

    return probe

  # ---------------------------------------------------------------- the loop
  def fit(self, state, num_steps: int, stop_signal=None) -> dict:
    """Trains to `num_steps` (resuming the folder's run), evaluates, returns the summary."""
    t_start = time.time()
    self._check_early_stopping()
    with self.partitioner.scope():
      state, position = self.resume(state)
      start_step = int(jax.device_get(state["step"]))
      # A disk too small for this run's checkpoints is known now, before any step.
      every = self.checkpointer.every_steps
      self.checkpointer.check_free_space(
          state, (num_steps - start_step) // every + 1 if every > 0 else 1,
          best=self.early_stopping is not None)
      self.run.drop_records_after(start_step)  # the steps after it run again
      self._watch_from(state, start_step)
      stream = self.data.stream(position)
      jit_step, self._probe = self._compile()
      writer = metrics_lib.SummaryWriter(self.run.tensorboard_dir)
      rec = _StepRecorder(self, num_steps, start_step, writer)
      stop = stop_signal or step_lib.StopSignal()
      n_virtual = len(self.kind.virtual_tokens)
      soft = f", each example's inputs led by {n_virtual} virtual tokens" if n_virtual else ""
      if getattr(self.model.config, "neftune_alpha", 0):
        soft += f", NEFTune noise (alpha {self.model.config.neftune_alpha:g}) on the embeddings"
      print(f"training: {num_steps} steps of {self.data.batch_size} rows x "
            f"{self.kind.rows_text(self.data.lengths)} tokens{soft}; logs and checkpoints in "
            f"{self.run.path}", flush=True)
      # SIGTERM from here to the final save asks the loop to stop and save instead.
      stop.__enter__()
      try:
        state = self._steps(state, stream, jit_step, rec, writer, num_steps, stop)
      except BaseException:
        # A save in flight completes, so the newest checkpoint is whole; a failure of
        # that save must not hide the error that stopped the run.
        try:
          self.checkpointer.wait()
        except Exception:  # pylint: disable=broad-except
          pass
        stop.__exit__(None, None, None)
        raise
      finally:
        rec.close()
      final_step = int(jax.device_get(state["step"]))
      self.checkpointer.save(final_step, state, stream.position, force=True)
      self.checkpointer.wait()
      stop.__exit__(None, None, None)
      if stop.requested:
        self.checkpointer.close()
        print(f"stopped by SIGTERM at step {final_step}; checkpoint saved in "
              f"{self.checkpointer.directory}", flush=True)
        return {"step": final_step, "stopped": True}
      return self._finish(state, final_step, rec, writer, t_start)

  def _steps(self, state, stream, jit_step, rec, writer, num_steps, stop):
    step = int(jax.device_get(state["step"]))
    # (step, metrics, real tokens, tasks) of the steps dispatched and not yet recorded: the
    # host reads a step's metrics only once `steps_in_flight` newer ones are queued, so a
    # slow batch or log write does not leave the device idle. Saves and evaluations
    # record every pending step first.
    pending = collections.deque()
    mesh = self.partitioner.mesh

    def flush():
      while pending:
        rec.record(*pending.popleft())

    while step < num_steps and not stop.requested and self.stopped_early is None:
      try:
        batch, tasks_in_batch, real = self.data.take(stream)
      except StopIteration:
        break
      state, m = jit_step(state, partitioning.global_batch(batch, mesh))
      step += 1
      pending.append((step, m, real, tasks_in_batch))
      while len(pending) > self.log.steps_in_flight:
        rec.record(*pending.popleft())
      if self.checkpointer.should_save(step):
        flush()
        if rec.nonfinite_in_row:
          # Keep the newest checkpoint the last good step's until updates apply again.
          print(f"step {step}: checkpoint not saved during non-finite steps", flush=True)
        else:
          self.checkpointer.save(step, state, stream.position)
      if pending and self._eval_due(step, num_steps):
        flush()  # the evaluation sees this step's training loss
      self._periodic(state, step, num_steps, writer, rec)
    flush()
    return state

  # ---------------------------------------------------------------- evaluations
  def _eval_due(self, step, num_steps) -> bool:
    ev = self.evaluator
    return ev.due(step, num_steps) or ev.validation_due(step, num_steps)

  def _check_early_stopping(self) -> None:
    ev = self.evaluator
    stopping_lib.check_watchable(self.early_stopping, ev.every_steps,
                                 ev.validation_every_steps, ev.validation_batches)

  def _counts(self, evaluation) -> bool:
    """Whether an evaluation counts toward patience and the overfitting warning: periodic
    ones, and end-of-run ones at a step a longer run would evaluate too (an end-of-run
    report off that grid may still become the best)."""
    return not evaluation.final or self._eval_due(evaluation.step, evaluation.step + 1)

  def _periodic(self, state, step, num_steps, writer, rec):
    """The evaluation due at `step` (generation and loss, or loss only), then what
    follows from it: the overfitting warning, a new best checkpoint, early stopping."""
    if not self._eval_due(step, num_steps):
      return
    generate = self.evaluator.due(step, num_steps)  # else a loss-only evaluation
    evaluation = self._evaluate(state, step, writer, generate=generate,
                                train_loss=rec.train_loss_window())
    if self._observe(evaluation, state):
      es = self.early_stopping
      self.stopped_early = f"stopped early at step {step}: {es.reason()}"
      then = "saving, then the end-of-run evaluation" if self.evaluator.at_end else "saving"
      print(f"{self.stopped_early}; the best checkpoint (step {es.best_step}) is in "
            f"{self.checkpointer.best_dir}; {then}", flush=True)

  def _evaluate(self, state, step, writer, final=False, generate=True, train_loss=None):
    evaluation = self.evaluator.evaluate(
        self.model, self.kind, self.eval_params(state["params"]), self.vocab, self.mixture, step, writer, self.run,
        final=final, probe=self._probe, generate=generate, train_loss=train_loss)
    writer.flush()
    return evaluation

  def _observe(self, evaluation, state, final: bool = False) -> bool:
    """Feeds an evaluation to the overfitting watch and early stopping, and saves the
    state as the best checkpoint when it is the new best. True: stop now."""
    if evaluation is None:
      return False
    es, counts = self.early_stopping, self._counts(evaluation)
    warning = counts and self._overfit.update(evaluation.step, evaluation.loss,
                                              evaluation.train_loss)
    if warning:
      print(warning + ("" if es else "; train.early_stopping = @EarlyStopping() would stop "
                       "there and keep the best checkpoint"), flush=True)
    if es is None:
      return False
    value = evaluation.scalars().get(es.metric)
    if value is None:
      if not evaluation.results and not es.metric.endswith(("loss", "token_accuracy")):
        return False  # a loss-only evaluation: the generating ones report the scores
      if not self._metric_noted:
        self._metric_noted = True
        print(f"note: early stopping watches {es.metric}, which the evaluation at step "
              f"{evaluation.step} does not report (tags like eval/loss, "
              "eval/<task>/<split>/<metric>, eval/mean/<split>/score)", flush=True)
      return False
    if es.update(evaluation.step, value, counts=counts):
      self.checkpointer.save_best(evaluation.step, state, {
          "metric": es.metric, "value": float(value), "mode": es.direction})
      print(f"step {evaluation.step}: best {es.metric} so far, {value:.4f}; kept in "
            f"{self.checkpointer.best_dir}", flush=True)
    return not final and es.should_stop

  def _watch_from(self, state, start_step: int) -> None:
    """The overfitting watch and early stopping as they stood at `start_step`: a resumed
    run replays the evaluations it recorded up to its checkpoint."""
    es = self.early_stopping
    self.stopped_early, self._metric_noted = None, False
    self._overfit = stopping_lib.OverfitWatch(
        (es.patience if es and es.patience else None) or stopping_lib.DEFAULT_PATIENCE)
    if es is not None:
      es.reset()
    if not start_step:
      return
    for evaluation in self.evaluator.recorded(self.run, start_step):
      counts = self._counts(evaluation)
      if counts:
        self._overfit.update(evaluation.step, evaluation.loss, evaluation.train_loss)
      if es is not None:
        es.update(evaluation.step, evaluation.scalars().get(es.metric), counts=counts)
    if es is None or es.best_step is None:
      return
    kept = (self.checkpointer.read_best() or {}).get("step")
    if kept != es.best_step and es.best_step == start_step:
      self.checkpointer.save_best(start_step, state, {"metric": es.metric, "value": es.best,
                                                      "mode": es.direction})
    elif kept != es.best_step:
      print(f"note: {self.checkpointer.best_dir} holds step {kept}, the evaluations up to the "
            f"resumed step {start_step} have their best at step {es.best_step}; it is "
            "replaced at the next new best", flush=True)
    if es.should_stop:
      self.stopped_early = f"stopped early at step {es.last_step}: {es.reason()}"
      print(f"{self.stopped_early} (before this resume); not training further", flush=True)

  def _run_losses(self, final_step: int, history: list) -> list:
    """The whole run's losses up to final_step (train_losses.jsonl: a resumed run's steps
    before this process too), else this process's."""
    try:
      recs = self.run.read_losses()
    except (OSError, ValueError):
      recs = []
    losses = [float(r["loss"]) for r in recs if r.get("step", 0) <= final_step and "loss" in r]
    return losses if len(losses) >= len(history) else list(history)

  def _previous_summary(self) -> dict:
    try:
      with open(self.run.summary_path, encoding="utf-8") as f:
        old = json.load(f)
      return old if isinstance(old, dict) else {}
    except (OSError, ValueError):
      return {}

  def _finish(self, state, final_step, rec, writer, t_start) -> dict:
    train_secs = time.time() - t_start
    history = rec.history
    losses = self._run_losses(final_step, history)
    tail = min(10, len(losses))  # last_loss is their mean: one step alone is noisy
    if history:  # a finished run resumed packs nothing: no empty line
      print(f"packing: {self.data.stats.summary()}", flush=True)
    summary = {"packing": self.data.packing_summary(), "model": type(self.model.config).__name__,
               "kind": self.kind.name, "step": final_step, "train_seconds": round(train_secs, 1),
               "first_loss": losses[0] if losses else None,
               "last_loss": float(np.mean(losses[-tail:])) if losses else None,
               "model_dir": self.run.path, "checkpoint_dir": self.checkpointer.directory}
    if rec.start_step and history:
      summary["resumed_from_step"] = rec.start_step  # train_seconds and packing: since then
    if not history:
      # Nothing trained (the run is already at num_steps): the record of the training that
      # was done stays, not this process's empty one.
      old = self._previous_summary()
      for key in ("packing", "train_seconds", "resumed_from_step"):
        if key in old:
          summary[key] = old[key]
    if self.evaluator.at_end:
      evaluation = self._evaluate(state, final_step, writer, final=True,
                                  train_loss=rec.train_loss_window())
      if evaluation is not None:
        summary.update(self.evaluator.summary(evaluation))
        self._observe(evaluation, state, final=True)
    if self.early_stopping is not None:
      summary["best"] = self.checkpointer.read_best()
      summary["early_stopping"] = dict(self.early_stopping.describe(),
                                       stopped_early=self.stopped_early)
    writer.flush()
    self.checkpointer.close()
    self.run.write_summary(summary)
    self._plot()
    # No steps when resuming a run that already reached num_steps.
    losses = (f"loss {summary['first_loss']:.3f} at step 1 -> {summary['last_loss']:.3f}, the "
              f"mean of the last {tail}" if history
              else f"no steps run (the run is at step {final_step})")
    why = f" ({self.stopped_early})" if self.stopped_early else ""
    print(f"done in {time.time() - t_start:.0f}s{why}: {losses}; summary in "
          f"{self.run.summary_path}", flush=True)
    return summary

  def _plot(self) -> None:
    """curves.png; a failure to draw is a note, never a failed run."""
    if jax.process_index() != 0:
      return
    try:
      from flanjax import plot  # pylint: disable=g-import-not-at-top
      print(f"curves: {plot.write_curves(self.run)}", flush=True)
    except Exception as e:  # pylint: disable=broad-except
      text = (str(e).strip().splitlines() or [""])[0][:200]
      print(f"note: {self.run.curves_path} was not drawn ({type(e).__name__}: {text}); "
            f"python -m flanjax.plot {self.run.path} draws it", flush=True)

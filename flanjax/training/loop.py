"""The training loop: a Trainer that receives its collaborators as plain objects.

    trainer = Trainer(model=..., kind=..., partitioner=..., optimizer=..., checkpointer=...,
                      data=..., evaluator=..., run=..., vocab=..., mixture=...)
    state = trainer.init_state(params=None)     # sharded from eval_shape + the logical rules
    summary = trainer.fit(state, num_steps=1000)

`python -m flanjax.train` builds these from gin (flanjax/train.py); a Python
user builds them directly. The step itself is pure (trainer.make_train_step);
this module is the loop around it: resume, checkpoints, non-finite steps,
progress, evaluations, the summary.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np
import optax

from flanjax.errors import UserError
from flanjax.models import kinds as kinds_lib
from flanjax.training import checkpoints, partitioning, trainer as step_lib
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
    import contextlib  # pylint: disable=g-import-not-at-top
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


@dataclasses.dataclass
class LogConfig:
  log_every_secs: float = 5.0
  summary_every_steps: int = 10
  peak_flops: float | None = None
  max_nonfinite_in_row: int = 5


class _StepRecorder:
  """Logs each finished step: console progress, train_losses.jsonl, TensorBoard, and the
  streak of non-finite steps (which stops the run, naming the intact checkpoint)."""

  def __init__(self, trainer: "Trainer", num_steps: int, start_step: int, writer, n_params):
    self.t, self.num_steps, self.writer = trainer, num_steps, writer
    self.history, self.nonfinite_in_row = [], 0
    self.losses_file = trainer.run.open_losses_log()
    cfg = trainer.log
    # 6 N flops per token for the matmuls of forward and backward.
    self.progress = metrics_lib.Progress(
        num_steps, start_step, cfg.log_every_secs, flops_per_token=6 * n_params,
        peak_flops=cfg.peak_flops or metrics_lib.device_peak_flops())

  def close(self):
    if self.losses_file:
      self.losses_file.close()

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

  # ---------------------------------------------------------------- state
  def abstract_params(self):
    """The parameters' shapes with their logical axis names (no memory used)."""
    dummy = self.kind.dummy_batch(1, 8, 8)
    return jax.eval_shape(lambda: self.model.init(jax.random.PRNGKey(0), **dummy))["params"]

  def init_state(self, params=None):
    """The train state, initialised directly into its shardings (params: start from these)."""
    p = self.partitioner
    self.state_shardings = None
    state, self.state_shardings = step_lib.create_sharded_state(
        self.model, self.optimizer.tx, p.mesh, p.rules, self.seed,
        self.kind.dummy_batch(1, 8, 8), params=params)
    return state

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
    p, lc = self.partitioner, self.losses
    step_fn = step_lib.make_train_step(
        self.model, self.optimizer.tx, self.optimizer.lr_fn, microbatches=lc.microbatches,
        z_loss=lc.z_loss, label_smoothing=lc.label_smoothing,
        loss_normalizing_factor=lc.loss_normalizing_factor, dropout=self.dropout,
        model_inputs=self.kind.model_inputs)
    jit_step = step_lib.jit_train_step(step_fn, self.state_shardings, p.mesh)
    eval_step = jax.jit(step_lib.make_eval_step(self.model, self.kind.model_inputs),
                        in_shardings=(self.state_shardings["params"],
                                      partitioning.batch_sharding(p.mesh)))
    return jit_step, eval_step

  # ---------------------------------------------------------------- the loop
  def fit(self, state, num_steps: int, stop_signal=None) -> dict:
    """Trains to `num_steps` (resuming the folder's run), evaluates, returns the summary."""
    t_start = time.time()
    with self.partitioner.scope():
      state, position = self.resume(state)
      start_step = int(jax.device_get(state["step"]))
      # A disk too small for this run's checkpoints is known now, before any step.
      every = self.checkpointer.every_steps
      self.checkpointer.check_free_space(
          state, (num_steps - start_step) // every + 1 if every > 0 else 1)
      stream = self.data.stream(position)
      jit_step, eval_step = self._compile()
      writer = metrics_lib.SummaryWriter(self.run.tensorboard_dir)
      n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
      rec = _StepRecorder(self, num_steps, start_step, writer, n_params)
      stop = stop_signal or step_lib.StopSignal()
      print(f"training: {num_steps} steps of {self.data.batch_size} rows x "
            f"{self.kind.rows_text(self.data.lengths)} tokens; logs and checkpoints in "
            f"{self.run.path}", flush=True)
      # SIGTERM from here to the final save asks the loop to stop and save instead.
      stop.__enter__()
      try:
        state = self._steps(state, stream, jit_step, eval_step, rec, writer, num_steps, stop)
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
      return self._finish(state, final_step, rec.history, writer, t_start)

  def _steps(self, state, stream, jit_step, eval_step, rec, writer, num_steps, stop):
    step = int(jax.device_get(state["step"]))
    pending = None  # (step, metrics, real tokens, tasks) of the step in flight
    mesh = self.partitioner.mesh
    while step < num_steps and not stop.requested:
      try:
        batch, tasks_in_batch, real = self.data.take(stream)
      except StopIteration:
        break
      state, m = jit_step(state, partitioning.global_batch(batch, mesh))
      step += 1
      if pending:
        rec.record(*pending)
      pending = (step, m, real, tasks_in_batch)
      if self.checkpointer.should_save(step):
        rec.record(*pending)
        pending = None
        if rec.nonfinite_in_row:
          # Keep the newest checkpoint the last good step's until updates apply again.
          print(f"step {step}: checkpoint not saved during non-finite steps", flush=True)
        else:
          self.checkpointer.save(step, state, stream.position)
      self._periodic(state, step, num_steps, eval_step, writer)
    if pending:
      rec.record(*pending)
    return state

  def _periodic(self, state, step, num_steps, eval_step, writer):
    ev = self.evaluator
    if ev.due(step, num_steps):
      ev.evaluate(self.model, self.kind, state["params"], self.vocab, self.mixture, step,
                  writer, self.run)
      writer.flush()
    if ev.validation_due(step):
      val = ev.validation_loss(eval_step, state["params"], self.data, self.partitioner.mesh)
      if val is not None:
        print(f"step {step}: validation loss {val:.4f}", flush=True)
        writer.scalars(step, {"validation/loss": val})

  def _finish(self, state, final_step, history, writer, t_start) -> dict:
    train_secs = time.time() - t_start
    print(f"packing: {self.data.stats.summary()}", flush=True)
    summary = {"packing": self.data.packing_summary(), "model": type(self.model.config).__name__,
               "kind": self.kind.name, "step": final_step, "train_seconds": round(train_secs, 1),
               "first_loss": history[0] if history else None,
               "last_loss": float(np.mean(history[-10:])) if history else None,
               "model_dir": self.run.path, "checkpoint_dir": self.checkpointer.directory}
    if self.evaluator.at_end:
      results = self.evaluator.evaluate(self.model, self.kind, state["params"], self.vocab,
                                        self.mixture, final_step, writer, self.run, final=True)
      if results is not None:
        summary.update(self.evaluator.summary(results))
    writer.flush()
    self.checkpointer.close()
    self.run.write_summary(summary)
    # No steps when resuming a run that already reached num_steps.
    losses = (f"loss {summary['first_loss']:.3f} -> {summary['last_loss']:.3f}" if history
              else "no steps run")
    print(f"done in {time.time() - t_start:.0f}s: {losses}; summary in "
          f"{self.run.summary_path}", flush=True)
    return summary

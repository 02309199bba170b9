"""Progress on the console and scalars in TensorBoard event files."""

from __future__ import annotations

import logging
import os
import sys
import time

import jax

def format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class SummaryWriter:
  """TensorBoard scalars (via tf.summary); only process 0 writes."""

  def __init__(self, logdir: str):
    self._writer = None
    if jax.process_index() == 0:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      os.makedirs(logdir, exist_ok=True)
      self._writer = tf.summary.create_file_writer(logdir)

  def scalars(self, step: int, values: dict):
    if self._writer is None:
      return
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    with self._writer.as_default(step=step):
      for k, v in values.items():
        tf.summary.scalar(k, float(v))

  def text(self, step: int, tag: str, value: str):
    if self._writer is None:
      return
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    with self._writer.as_default(step=step):
      tf.summary.text(tag, value)

  def flush(self):
    if self._writer is not None:
      self._writer.flush()


class Progress:
  """Console line every `every_secs`: step, loss, lr, steps/s, tokens/s, ETA."""

  def __init__(self, total_steps: int, start_step: int = 0, every_secs: float = 5.0,
               flops_per_token: float | None = None, peak_flops: float | None = None,
               stream=None):
    self.total_steps = total_steps
    self.every_secs = every_secs
    self.flops_per_token = flops_per_token
    self.peak_flops = peak_flops
    self.stream = stream or sys.stdout
    self._t0 = self._last_t = time.time()
    self._last_step = start_step
    self._tokens = 0.0
    self._real_tokens = 0.0

  def update(self, step: int, metrics: dict, tokens: float, real_tokens: float,
             force: bool = False) -> dict | None:
    """Counts a step's tokens; returns the rates when a line was printed."""
    self._tokens += tokens
    self._real_tokens += real_tokens
    now = time.time()
    if not force and now - self._last_t < self.every_secs:
      return None
    dt = max(now - self._last_t, 1e-9)
    steps = step - self._last_step
    rates = {"steps_per_sec": steps / dt, "tokens_per_sec": self._tokens / dt,
             "real_tokens_per_sec": self._real_tokens / dt}
    if self.flops_per_token and self.peak_flops:
      rates["mfu"] = self._tokens / dt * self.flops_per_token / (
          self.peak_flops * jax.device_count())
    eta = (self.total_steps - step) / max(rates["steps_per_sec"], 1e-9)
    line = (f"step {step:>6}/{self.total_steps}  loss {metrics['loss']:.4f}  "
            f"lr {metrics['learning_rate']:.2e}  {rates['steps_per_sec']:.2f} steps/s  "
            f"{rates['tokens_per_sec']:,.0f} tok/s ({rates['real_tokens_per_sec']:,.0f} real)")
    if "mfu" in rates:
      line += f"  MFU {100 * rates['mfu']:.1f}%"
    line += f"  ETA {format_duration(eta)}"
    if jax.process_index() == 0:
      print(line, file=self.stream, flush=True)
    logging.debug(line)
    self._last_t, self._last_step = now, step
    self._tokens = self._real_tokens = 0.0
    return rates

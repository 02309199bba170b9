"""Every failure of `python -m flanjax.train` ends the process promptly with a non-zero code.

A stuck non-daemon thread (as a prefetch thread or an asynchronous save can be)
must not keep a failed run alive: the wrapper below starts one, then injects a
failure into the train step, the data stream or a checkpoint save.
"""

import subprocess
import sys
import time

import pytest

TINY = ["--gin_file=flan.gin", "--gin.train.batch_size=4",
        "--gin.train.task_feature_lengths={'inputs': 160, 'targets': 48}",
        "--gin.T5Config.d_model=32", "--gin.T5Config.d_ff=64", "--gin.T5Config.num_heads=2",
        "--gin.T5Config.d_kv=16", "--gin.train.log_every_secs=0", "--gin.train.num_steps=6",
        "--gin.Checkpointer.every_steps=2", "--gin.train.eval_at_end=False"]

WRAPPER = r"""
import sys, threading, time
import jax
from flanjax import config, train
from flanjax.data import pipeline
from flanjax.training import checkpoints, trainer

# A thread that never ends by itself: without a hard exit the interpreter would wait on it.
threading.Thread(target=time.sleep, args=(3600,), daemon=False).start()
mode, argv = sys.argv[1], sys.argv[2:]
if mode == "step":
  real = trainer.jit_train_step
  def failing(*a, **k):
    step = real(*a, **k)
    def run(state, batch):
      if int(jax.device_get(state["step"])) >= 1:
        raise RuntimeError("injected failure in the train step")
      return step(state, batch)
    return run
  trainer.jit_train_step = failing
elif mode == "data":
  real_next = pipeline.BatchStream.__next__
  def failing_next(self):
    if self.position >= 1:
      raise RuntimeError("injected failure in the data stream")
    return real_next(self)
  pipeline.BatchStream.__next__ = failing_next
elif mode == "save":
  def failing_save(self, step, *a, **k):
    raise RuntimeError("injected failure in a save")
  checkpoints.Checkpointer.save = failing_save
config.as_command(train.main, argv)
"""


@pytest.mark.parametrize("mode", ["step", "data", "save"])
def test_an_unexpected_failure_ends_the_process(tmp_path, mode, builtin_vocab):
  t0 = time.time()
  proc = subprocess.run([sys.executable, "-c", WRAPPER, mode, *TINY,
                         f"--gin.train.model_dir={tmp_path / 'run'}"],
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
  assert f"injected failure in {'a save' if mode == 'save' else 'the'}" in proc.stderr
  assert time.time() - t0 < 240

"""Switching the optimizer on a folder with checkpoints: one line, nothing renamed or written."""

import hashlib
import os
import shutil
import subprocess
import sys

from test_train_e2e import TINY


def _tree(path):
  """Every file under `path` with its bytes' hash (names and contents)."""
  out = {}
  for root, _, files in os.walk(path):
    for f in files:
      p = os.path.join(root, f)
      with open(p, "rb") as fh:
        out[os.path.relpath(p, path)] = hashlib.sha256(fh.read()).hexdigest()
  return out


def test_another_optimizer_on_a_run_folder_is_refused_in_one_line(tmp_path, tiny_trained_run):
  # A copy of the shared 10-step Adafactor run (TINY), its checkpoints 8 and 10.
  model_dir = tmp_path / "run"
  shutil.copytree(tiny_trained_run[0], model_dir)
  before = _tree(model_dir / "checkpoints")
  assert any(k.startswith("10/") for k in before)
  second = subprocess.run([sys.executable, "-m", "flanjax.train", *TINY,
                           f"--gin.train.model_dir={model_dir}", "--gin.train.num_steps=14",
                           "--gin.optimizer.name='adamw'"],
                          capture_output=True, text=True, timeout=600)
  assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
  last = second.stderr.strip().splitlines()[-1]
  assert "optimizer" in last and "adafactor" in last and "adamw" in last, last
  assert _tree(model_dir / "checkpoints") == before  # nothing renamed, nothing written
  assert not any(".unreadable" in k for k in _tree(model_dir))

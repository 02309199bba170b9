"""Two processes joined by jax.distributed on loopback train together and agree on the loss."""

import json
import os
import socket
import subprocess
import sys

import pytest

from test_train_e2e import TINY


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_train_three_steps_like_one(tmp_path):
  port = _free_port()
  common = [*TINY, "--gin.train.num_steps=3", "--gin.train.eval_at_end=False",
            "--gin.Checkpointer.every_steps=100"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  procs = []
  for pid in range(2):
    args = [sys.executable, "-m", "flanjax.train", *common,
            f"--gin.train.model_dir={tmp_path / 'two'}",
            f"--gin.distributed.coordinator_address='127.0.0.1:{port}'",
            "--gin.distributed.num_processes=2", f"--gin.distributed.process_id={pid}"]
    procs.append(subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=env))
  outs = []
  for p in procs:
    try:
      out, err = p.communicate(timeout=600)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      pytest.fail("the two processes did not finish in 600 s")
    assert p.returncode == 0, out[-2000:] + err[-3000:]
    outs.append(out)
  assert "process 0 of 2" in outs[0] and "process 1 of 2" in outs[1]
  # Both processes computed the same global loss at every step.
  final = [[l for l in o.splitlines() if l.startswith("done in")][-1] for o in outs]
  assert final[0].split(":", 1)[1].split(";")[0] == final[1].split(":", 1)[1].split(";")[0]
  # Each host read only its own shard of every batch; together they trained 3 steps.
  with open(tmp_path / "two" / "train_losses.jsonl") as f:
    two = {r["step"]: r["loss"] for r in map(json.loads, f)}
  assert sorted(two) == [1, 2, 3] and all(v == v and v < 100 for v in two.values())

"""Two processes joined by jax.distributed on loopback train on disjoint rows, and their
run is the one-process run of the global batch they loaded between them.

How the hosts split the data (flanjax/data/pipeline.py get_dataset): seqio reads
each task with shard_info (index = process, num_shards = processes), so each host
reads its own share of the examples, then shuffles, mixes and packs that share by
itself into rows of batch_size / processes. The global batch of a two-process run
is therefore NOT the batch a one-process run with the same seed loads: not one
row in common (different examples, packed differently; when this test was written
the loss of step 1 differed by ~2e-3 and its loss weight by ~15%). So the one-process run here is fed the
hosts' own batches (tests/_distributed_worker.py records each process's batches
and replays them, concatenated in process order, into a single process): same
config, same seed, same global batch, one device instead of two. Its per-step
losses must then equal the two-process run's: that is the proof that per-host rows
are assembled into the global batch and that gradients and the loss are reduced
over all hosts, not per host.
"""

import ast
import hashlib
import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from test_train_e2e import TINY

REPO = pathlib.Path(__file__).resolve().parents[1]
WORKER = pathlib.Path(__file__).resolve().parent / "_distributed_worker.py"
STEPS = 3
BATCH = 8  # TINY's train.batch_size: 4 rows per host
COMMON = [*TINY, f"--gin.train.num_steps={STEPS}", "--gin.train.eval_at_end=False",
          "--gin.Checkpointer.every_steps=100"]
TIMEOUT = 600


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(tmp_path, name, model_dir, replay=(), extra=()):
  """A worker process (flanjax.train recording its batches to tmp_path/<name>)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
             PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
  args = [sys.executable, str(WORKER), str(tmp_path / name), *map(str, replay), "--", *COMMON,
          f"--gin.train.model_dir={model_dir}", *extra]
  log = open(tmp_path / f"{name}.log", "w+", encoding="utf-8")  # pylint: disable=consider-using-with
  return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, text=True, env=env,
                          cwd=REPO), log


def _wait(started, what):
  """Each process's output; all are killed when one fails or the time runs out."""
  procs = [p for p, _ in started]
  deadline = time.monotonic() + TIMEOUT
  timed_out = False
  try:
    while any(p.poll() is None for p in procs):
      if any(p.returncode not in (None, 0) for p in procs):
        break  # the others may wait for it forever (a jax.distributed barrier)
      if time.monotonic() > deadline:
        timed_out = True
        break
      time.sleep(0.2)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  outs = []
  for _, log in started:
    log.seek(0)
    outs.append(log.read())
    log.close()
  tails = "\n".join(f"--- process {i}:\n{o[-3000:]}" for i, o in enumerate(outs))
  if timed_out:
    pytest.fail(f"{what}: did not finish in {TIMEOUT} s\n{tails}")
  for i, p in enumerate(procs):
    assert p.returncode == 0, f"{what}: process {i} exited {p.returncode}\n{tails}"
  return outs


def _batches(folder):
  """position -> the batch (feature -> array) a process took at that position."""
  return {int(p.stem): dict(np.load(p)) for p in folder.glob("*.npz")}


def _row_digest(batch, i):
  h = hashlib.sha1()
  for k in sorted(batch):
    if k == "task_counts":
      continue
    row = np.ascontiguousarray(batch[k][i])
    h.update(f"{k}:{row.dtype}:{row.shape};".encode())
    h.update(row.tobytes())
  return h.hexdigest()


def _rows(batch):
  return [_row_digest(batch, i) for i in range(len(batch["decoder_target_tokens"]))]


def _examples(batch):
  """(inputs, targets) of each example packed into the batch (split by segment ids)."""
  out = []
  for i in range(len(batch["decoder_target_tokens"])):
    seg_in, seg_out = batch["encoder_segment_ids"][i], batch["decoder_segment_ids"][i]
    for s in sorted(set(seg_out.tolist()) - {0}):
      out.append((tuple(batch["encoder_input_tokens"][i][seg_in == s].tolist()),
                  tuple(batch["decoder_target_tokens"][i][seg_out == s].tolist())))
  return out


def _shards(model_dir, num_shards=2):
  """The examples each host may read, as the packer sees them: the built-in mixture's
  train split of each family, example j to host j % num_shards (seqio shards a
  FunctionDataSource's examples with tf.data's Dataset.shard, before its
  preprocessors), then its preprocessors (registry.register_builtin): tokenized with
  the run's vocabulary, trimmed to the feature length less one, EOS appended."""
  from flanjax.data.collections import builtin  # pylint: disable=g-import-not-at-top
  from flanjax.run_folder import RunFolder  # pylint: disable=g-import-not-at-top
  lengths = ast.literal_eval(next(a for a in TINY if "task_feature_lengths" in a).split("=", 1)[1])
  vocab = RunFolder(str(model_dir)).load_vocabulary()
  shards = [set() for _ in range(num_shards)]
  for fam in builtin.FAMILIES:
    for j, r in enumerate(builtin.rendered_examples(fam.name, "train")):
      shards[j % num_shards].add(tuple(
          tuple(vocab.encode(r[k])[:lengths[k] - 1] + [vocab.eos_id])
          for k in ("inputs", "targets")))
  return shards


def _losses(model_dir):
  with open(model_dir / "train_losses.jsonl") as f:
    return {r["step"]: r for r in map(json.loads, f)}


def test_two_processes_shard_the_batch_and_train_like_one_process(tmp_path):
  port = _free_port()
  two = _wait([_start(tmp_path, f"host{pid}", tmp_path / "two", extra=[
      f"--gin.distributed.coordinator_address='127.0.0.1:{port}'",
      "--gin.distributed.num_processes=2", f"--gin.distributed.process_id={pid}"])
               for pid in range(2)], "two-process run")
  assert "process 0 of 2" in two[0] and "process 1 of 2" in two[1]
  hosts = [_batches(tmp_path / f"host{pid}") for pid in range(2)]
  assert [sorted(h) for h in hosts] == [list(range(1, STEPS + 1))] * 2, "batches taken per host"

  # The processes load different rows: at every step each has its half of the batch,
  # none of its rows in the other's.
  seen = [set(), set()]
  for step in range(1, STEPS + 1):
    rows = [_rows(h[step]) for h in hosts]
    assert [len(r) for r in rows] == [BATCH // 2] * 2, step
    assert not set(rows[0]) & set(rows[1]), f"step {step}: both processes loaded a row"
    for pid in range(2):
      seen[pid].update(_examples(hosts[pid][step]))
  # And from different data: every example a host packed is one of its own shard (not
  # the whole mixture in another order, which different rows alone would not rule out).
  # (The shards are disjoint by index; a few examples are rendered identically in both.)
  shards = _shards(tmp_path / "two")
  for pid in range(2):
    assert seen[pid] and len(seen[pid] - shards[pid]) == 0, (
        f"process {pid}: {len(seen[pid] - shards[pid])} of the {len(seen[pid])} examples it "
        f"packed are not in its shard ({len(seen[pid] & shards[1 - pid])} in the other's)")

  # One process, one device, fed the global batch the two loaded (host 0's rows, then
  # host 1's): the same losses step by step.
  _wait([_start(tmp_path, "one", tmp_path / "one", replay=[tmp_path / "host0",
                                                           tmp_path / "host1"])],
        "one-process run")
  one_batches = _batches(tmp_path / "one")
  assert sorted(one_batches) == list(range(1, STEPS + 1))
  for step in range(1, STEPS + 1):  # it trained on exactly the union of the hosts' rows
    assert sorted(_rows(one_batches[step])) == sorted(_rows(hosts[0][step]) +
                                                      _rows(hosts[1][step])), step
  a, b = _losses(tmp_path / "two"), _losses(tmp_path / "one")
  assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
  for step in a:
    # The loss weight is the global batch's target-token count: a per-host loss would
    # show half of it; then loss, cross-entropy and gradient norm of the same batch.
    assert a[step]["loss_weight"] == b[step]["loss_weight"], (step, a[step], b[step])
    for key in ("loss", "cross_entropy", "z_loss"):
      assert a[step][key] == pytest.approx(b[step][key], abs=1e-5), (step, key, a[step], b[step])
    assert a[step]["grad_norm"] == pytest.approx(b[step]["grad_norm"], rel=1e-4), (step, a[step],
                                                                                   b[step])

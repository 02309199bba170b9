"""The real command, end to end on a tiny config: progress, TensorBoard, checkpoints, resume."""

import glob
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from conftest import command_in_process, devices_env

TINY = ["--gin_file=flan.gin", "--gin.train.batch_size=8",
        "--gin.train.task_feature_lengths={'inputs': 160, 'targets': 48}",
        "--gin.T5Config.d_model=32", "--gin.T5Config.d_ff=64", "--gin.T5Config.num_heads=2",
        "--gin.T5Config.d_kv=16", "--gin.train.log_every_secs=0",
        "--gin.Checkpointer.every_steps=4"]


def run(model_dir, *extra, eval_examples=8, env=None, stderr=False):
  """The command's stdout (and stderr, if asked); it must succeed."""
  args = [sys.executable, "-m", "flanjax.train", *TINY, f"--gin.train.model_dir={model_dir}",
          f"--gin.train.eval_max_examples={eval_examples}", *extra]
  proc = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return (proc.stdout, proc.stderr) if stderr else proc.stdout


def losses(model_dir):
  with open(os.path.join(model_dir, "train_losses.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f)}


def _scalar_tags(logdir):
  """step -> the scalar tags written at it, read back from the event files."""
  import tensorflow as tf
  tags = {}
  for path in glob.glob(str(logdir / "events.out.tfevents.*")):
    for event in tf.compat.v1.train.summary_iterator(path):
      for v in event.summary.value:
        tags.setdefault(event.step, set()).add(v.tag)
  return tags


def _scalars(logdir, tag):
  """step -> value of one scalar tag, read back from the event files."""
  import tensorflow as tf
  out = {}
  for path in glob.glob(str(logdir / "events.out.tfevents.*")):
    for event in tf.compat.v1.train.summary_iterator(path):
      for v in event.summary.value:
        if v.tag == tag:
          out[event.step] = float(tf.make_ndarray(v.tensor))
  return out


def _check_mfu(run_dir, out, peak):
  """The trainer's MFU is tokens/s x training/flops.py's count per token / the peak."""
  from flanjax.models import loading
  from flanjax.training import flops
  cfg = loading.config_from_file(str(run_dir / "run_info.json"))
  devices = int(out.split(" cpu device(s)")[0].rsplit(" ", 1)[-1])
  per_token = flops.flops_per_token(cfg, (160, 48))
  mfu = _scalars(run_dir / "tensorboard", "train/mfu")
  tok = _scalars(run_dir / "tensorboard", "train/tokens_per_sec")
  assert mfu and set(mfu) == set(tok)
  for s in mfu:
    assert mfu[s] == pytest.approx(tok[s] * per_token / (peak * devices), rel=1e-4)


def test_default_job_end_to_end_and_exact_resume(tmp_path, tiny_trained_run):
  straight, out = tiny_trained_run
  step_lines = [l for l in out.splitlines() if l.startswith("step ")]
  assert len(step_lines) >= 5
  for needle in ("loss", "lr", "steps/s", "tok/s", "MFU", "ETA"):
    assert needle in step_lines[-1]
  _check_mfu(straight, out, 1e12)
  assert "exact match" in out and "baseline" in out and "heldout_templates" in out
  assert glob.glob(str(straight / "tensorboard" / "events.out.tfevents.*"))
  steps = sorted(int(os.path.basename(p)) for p in glob.glob(str(straight / "checkpoints" / "*"))
                 if os.path.basename(p).isdigit())
  assert steps[-1] == 10 and 8 in steps
  summary = json.loads((straight / "summary.json").read_text())
  assert summary["step"] == 10 and len(summary["eval"]) == 12
  # The time the loop waited for batches is measured inside the run.
  pk = summary["packing"]
  assert pk["data_first_batch_seconds"] > 0
  assert pk["data_first_batch_seconds"] + pk["data_wait_seconds"] < summary["train_seconds"]

  # Stop at 6, then resume to 10: the same batches, the same losses.
  # Its first part also evaluates every 3 steps, which must not change the losses.
  resumed = tmp_path / "resumed"
  out = run(resumed, "--gin.train.num_steps=6", "--gin.train.eval_at_end=False",
            "--gin.train.eval_every_steps=3", "--gin.train.eval_tasks=['builtin_parity']",
            eval_examples=4)
  assert "step 3: evaluation" in out and "step 6: evaluation" in out
  with open(resumed / "eval_during_training.jsonl") as f:
    evals = [json.loads(l) for l in f]
  assert [e["step"] for e in evals] == [3, 6]
  for e in evals:
    assert {(r["task"], r["split"]) for r in e["results"]} == {
        ("builtin_parity", "validation"), ("builtin_parity", "heldout_templates")}
    assert all(r["examples"] == 4 and 0 <= r["score"] <= 100 for r in e["results"])
  tags = _scalar_tags(resumed / "tensorboard")
  assert "eval/builtin_parity/validation/accuracy" in tags.get(3, set()), tags
  # JAX's compiler logs each cache lookup (hit or miss) at debug level with the program's name.
  out, err = run(resumed, "--gin.train.num_steps=10", "--gin.train.eval_at_end=False",
                 env=dict(os.environ, JAX_DEBUG_LOG_MODULES="jax._src.compiler"), stderr=True)
  assert "resumed from step 6" in out
  a, b = losses(straight), losses(resumed)
  assert sorted(b) == list(range(1, 11))
  for s in range(1, 11):
    assert a[s] == pytest.approx(b[s], abs=1e-6), (s, a[s], b[s])
  # The resumed process took its train step from the compilation cache that earlier processes
  # of these shapes wrote (the suite's JAX_COMPILATION_CACHE_DIR, conftest; a user's run: the
  # commands' own, config.enable_compilation_cache) instead of compiling it again.
  assert "Persistent compilation cache hit for 'jit_step'" in err, err[-3000:]
  assert "COMPILATION CACHE MISS for 'jit_step'" not in err
  # The summary is the whole run's, not the resumed process's alone.
  both = [json.loads((d / "summary.json").read_text()) for d in (straight, resumed)]
  assert both[1]["first_loss"] == pytest.approx(both[0]["first_loss"], abs=1e-6)
  assert both[1]["last_loss"] == pytest.approx(both[0]["last_loss"], abs=1e-6)
  assert both[1]["resumed_from_step"] == 6 and "resumed_from_step" not in both[0]
  # The same command on the finished run trains nothing and keeps the run's record.
  out = run(resumed, "--gin.train.num_steps=10", "--gin.train.eval_at_end=False")
  assert "no steps run (the run is at step 10)" in out
  again = json.loads((resumed / "summary.json").read_text())
  for key in ("first_loss", "last_loss", "packing", "train_seconds", "resumed_from_step"):
    assert again[key] == both[1][key], key


def test_user_files_mixed_with_builtin_through_gin(tmp_path, builtin_vocab):
  """runs/user_data.gin: a user's chat file blended with the built-in tasks, trained and evaluated."""
  convo = lambda i: {"messages": [{"role": "user", "content": f"Say the number {i}."},  # noqa: E731
                                  {"role": "assistant", "content": f"{i}"}]}
  data = tmp_path / "chat.jsonl"
  lines = [json.dumps(convo(i)) for i in range(300)]
  lines[2] = lines[2][:-1]  # a malformed line: line 3 of the file
  data.write_text("\n".join(lines) + "\n")
  model_dir = tmp_path / "run"
  args = [sys.executable, "-m", "flanjax.train", "--gin_file=runs/user_data.gin", *TINY[1:],
          f"--gin.USER_FILE={data}", "--gin.USER_FORMAT=chat", f"--gin.train.model_dir={model_dir}",
          "--gin.train.num_steps=3", "--gin.train.eval_max_examples=4"]
  # By default a bad record stops the run, naming file and line, before any training.
  # (A run that stops before training: its main in this process, not a process of its own.)
  from flanjax import train
  code, _, err = command_in_process(train.main, args[3:], builtin_vocab, train.__file__)
  assert code == 2
  last = err.strip().splitlines()[-1]
  assert f"{data}:3: not valid JSON" in last and "bad_records.policy='skip'" in last
  # With the skip policy it is counted, reported, and the rest trains; the validation split
  # is a file of its own (a JSON array, one record without its 'messages').
  valid = tmp_path / "valid.json"
  records = [convo(i) for i in range(300, 340)]
  records[5] = {"text": "no messages here"}
  valid.write_text(json.dumps(records, indent=1))
  proc = subprocess.run(args + ["--gin.bad_records.policy=skip",
                                f"--gin.USER_VALIDATION_FILE='{valid}'"],
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "299 records kept, 1 skipped: 1 malformed JSON lines" in proc.stdout
  assert f"{valid}: 39 records kept, 1 skipped" in proc.stdout
  summary = json.loads((model_dir / "summary.json").read_text())
  evaluated = {(e["task"], e["split"]) for e in summary["eval"]}
  assert ("user_data", "validation") in evaluated and ("builtin_parity", "validation") in evaluated
  assert summary["packing"]["mask_violations"] == 0
  # A missing user file: one line naming the path and the fix, exit 2.
  code, _, err = command_in_process(
      train.main, args[3:-4] + ["--gin.bad_records.policy=skip",
                                f"--gin.USER_FILE={tmp_path / 'nope.jsonl'}",
                                f"--gin.train.model_dir={tmp_path / 'run2'}"],
      builtin_vocab, train.__file__)
  assert code == 2
  last = err.strip().splitlines()[-1]
  assert "nope.jsonl does not exist" in last and last.startswith("train")


def test_a_trained_run_exports_with_its_own_vocabulary(tmp_path, tiny_trained_run):
  """tools/convert_checkpoint.py orbax-to-hf on a run: transformers and the tokenizer load it."""
  model_dir, _ = tiny_trained_run
  assert (model_dir / "vocab" / "spiece.model").exists()
  out = tmp_path / "export"
  proc = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "..", "tools",
                                                      "convert_checkpoint.py"),
                         "orbax-to-hf", str(model_dir), str(out)],
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  import sentencepiece as spm
  import transformers
  model = transformers.T5ForConditionalGeneration.from_pretrained(str(out))
  sp = spm.SentencePieceProcessor(model_file=str(out / "spiece.model"))
  assert (model_dir / "vocab" / "spiece.model").read_bytes() == (out / "spiece.model").read_bytes()
  assert model.config.vocab_size >= sp.get_piece_size()


def _interrupt_when(cmd, env, checkpoint, sig):
  """Starts a run and sends `sig` once checkpoint `checkpoint` is complete; returns stdout."""
  import time
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                          env=env)
  model_dir = [a for a in cmd if a.startswith("--gin.train.model_dir=")][0].split("=", 1)[1]
  target = os.path.join(model_dir, "checkpoints", str(checkpoint))
  deadline = time.time() + 500
  while time.time() < deadline and proc.poll() is None:
    if os.path.isdir(target):  # orbax renames a checkpoint into place once it is complete
      proc.send_signal(sig)
      break
    time.sleep(0.05)
  out, _ = proc.communicate(timeout=120)
  return proc.returncode, out


def run_beside(cmd, env, log_path, work, timeout):
  """(exit code, output, work()): cmd as a process of its own (stdout and stderr into
  log_path) while this process does work(), e.g. a reference run that needs nothing of
  work's; killed if work fails or the process outlives `timeout` after it."""
  with open(log_path, "w+", encoding="utf-8") as log:
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
    try:
      result = work()
      proc.wait(timeout=timeout)
    finally:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
    log.seek(0)
    return proc.returncode, log.read(), result


def test_sigterm_and_sigkill_then_resume_onto_another_mesh_continue_the_same_run(tmp_path,
                                                                              builtin_vocab):
  """A preempted VM (SIGTERM) saves and exits 0; a kill -9 loses only what followed the newest
  checkpoint. Resumed on a (2,2,2) mesh, then (8,1,1) again, the 30 losses equal an
  uninterrupted (8,1,1) run's."""
  env = devices_env(8, TF_CPP_MIN_LOG_LEVEL="3")
  steps = ["--gin.train.num_steps=30", "--gin.train.eval_at_end=False",
           "--gin.Checkpointer.every_steps=4"]
  mesh8, mesh222 = ["--gin.train.mesh_shape=[8, 1, 1]"], ["--gin.train.mesh_shape=[2, 2, 2]"]

  def cmd(model_dir, *extra):
    return [sys.executable, "-m", "flanjax.train", *TINY, f"--gin.train.model_dir={model_dir}",
            *steps, *extra]

  # The uninterrupted run needs nothing of the others: it runs beside them (its start, the
  # imports and the data, takes one core while theirs take the other), checked at the end.
  # (builtin_vocab: the vocabulary is cached before two runs could both train it.)
  straight = tmp_path / "straight"
  code, out, _ = run_beside(cmd(straight, *mesh8), env, tmp_path / "straight.log", lambda: (
      _interrupted_three_times(cmd, env, tmp_path / "interrupted", mesh8, mesh222)), 600)
  assert code == 0, out[-3000:]
  a, b = losses(straight), losses(tmp_path / "interrupted")
  assert sorted(b) == list(range(1, 31))
  for s in range(1, 31):
    assert a[s] == pytest.approx(b[s], abs=1e-5), (s, a[s], b[s])


def _interrupted_three_times(cmd, env, run_dir, mesh8, mesh222):
  """SIGTERM after checkpoint 4 (mesh8), SIGKILL two checkpoints on (mesh222), then to the end
  (mesh8) in `run_dir`."""
  # 1. SIGTERM after the step-4 checkpoint: a final checkpoint, exit 0.
  code, out = _interrupt_when(cmd(run_dir, *mesh8), env, 4, signal.SIGTERM)
  assert code == 0, out[-2000:]
  stopped = int(out.split("stopped by SIGTERM at step ")[1].split(";")[0])
  assert stopped < 30 and (run_dir / "checkpoints" / str(stopped)).is_dir()
  # 2. Resumed on another mesh, then killed with SIGKILL once a later checkpoint exists.
  later = (stopped // 4 + 2) * 4
  code, out = _interrupt_when(cmd(run_dir, *mesh222), env, later, signal.SIGKILL)
  assert code == -signal.SIGKILL, "the run ended before it could be killed"
  assert f"resumed from step {stopped}" in out and "'data': 2, 'fsdp': 2, 'model': 2" in out
  # 3. Resumed from the newest complete checkpoint, back on the first mesh, to the end.
  final = subprocess.run(cmd(run_dir, *mesh8), capture_output=True, text=True, env=env,
                         timeout=600)
  assert final.returncode == 0, final.stderr[-3000:]
  resumed_from = int(final.stdout.split("resumed from step ")[1].split()[0])
  assert later <= resumed_from < 30


def _file_hashes(path):
  """Every file under `path` with its bytes' hash (names and contents)."""
  out = {}
  for root, _, files in os.walk(path):
    for f in files:
      p = os.path.join(root, f)
      with open(p, "rb") as fh:
        out[os.path.relpath(p, path)] = hashlib.sha256(fh.read()).hexdigest()
  return out


def test_another_optimizer_on_a_run_folder_is_refused_in_one_line(tmp_path, tiny_trained_run):
  """Switching the optimizer on a folder with checkpoints: one line, nothing renamed or written.
  (In this file, not one of its own, so it runs on this file's test worker and reuses its
  tiny_trained_run instead of training another on the other worker.)"""
  # A copy of the shared 10-step Adafactor run (TINY), its checkpoints 8 and 10.
  model_dir = tmp_path / "run"
  shutil.copytree(tiny_trained_run[0], model_dir)
  before = _file_hashes(model_dir / "checkpoints")
  assert any(k.startswith("10/") for k in before)
  second = subprocess.run([sys.executable, "-m", "flanjax.train", *TINY,
                           f"--gin.train.model_dir={model_dir}", "--gin.train.num_steps=14",
                           "--gin.optimizer.name='adamw'"],
                          capture_output=True, text=True, timeout=600)
  assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
  last = second.stderr.strip().splitlines()[-1]
  assert "optimizer" in last and "adafactor" in last and "adamw" in last, last
  assert _file_hashes(model_dir / "checkpoints") == before  # nothing renamed, nothing written
  assert not any(".unreadable" in k for k in _file_hashes(model_dir))

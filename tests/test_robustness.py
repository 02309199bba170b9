"""Bad input, faults and long runs, through the public commands on real files (issue 8).

Most cases call the entry point `python -m flanjax.train` runs (flanjax.train.main
with an argv list) in this process, on a tiny model; real subprocesses only where
the process itself matters (SIGKILL during a save, a disk that refuses writes).
Data files are real rows of ../shared/data, written to tmp_path and broken there.
"""

import contextlib
import hashlib
import importlib.util
import io
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import gin
import pytest

from conftest import REPO, shared_data

TINY = ["--gin.train.batch_size=4",
        "--gin.train.task_feature_lengths={'inputs': 96, 'targets': 32}",
        "--gin.T5Config.d_model=16", "--gin.T5Config.d_ff=32", "--gin.T5Config.num_heads=2",
        "--gin.T5Config.d_kv=8", "--gin.T5Config.num_encoder_layers=1",
        "--gin.T5Config.num_decoder_layers=1", "--gin.corpus_vocabulary.vocab_size=500",
        "--gin.train.log_every_secs=0", "--gin.train.eval_at_end=False",
        "--gin.Checkpointer.every_steps=2"]


@pytest.fixture(scope="module", autouse=True)
def _restore_session(builtin_vocab):
  """In-process runs register tasks with their own vocabulary; put the session's back."""
  yield
  from flanjax.data import registry
  gin.clear_config()
  registry.register_all(builtin_vocab)


def run_train(argv):
  """flanjax.train.main(argv) as the command runs it: (exit code, stdout, stderr)."""
  from flanjax import train
  out, err = io.StringIO(), io.StringIO()
  code = 0
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
      train.main(list(argv))
    except SystemExit as e:
      code = e.code
  return code, out.getvalue(), err.getvalue()


def run_tool(name, argv):
  """tools/<name>.py's main through its guarded entry: (exit code, stdout, stderr)."""
  spec = importlib.util.spec_from_file_location(f"tool_{name}", REPO / "tools" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  from flanjax import config
  out, err = io.StringIO(), io.StringIO()
  code = 0
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
      config.run_plain_main(module.main, name, list(argv))
    except SystemExit as e:
      code = e.code
  return code, out.getvalue(), err.getvalue()


def one_error_line(code, err, expected_code=2):
  """The single 'error:' line of a failed command; no traceback around it."""
  assert code == expected_code, err[-3000:]
  assert "Traceback" not in err, err[-3000:]
  lines = [l for l in err.splitlines() if "error:" in l]
  assert len(lines) == 1, err[-3000:]
  return lines[0]


def user_args(path, model_dir, *extra, fmt="alpaca", steps=4):
  return ["--gin_file=runs/user_data.gin", f"--gin.USER_FILE={path}",
          f"--gin.USER_FORMAT={fmt}", "--gin.MIXTURE='user_data'", *TINY,
          f"--gin.train.model_dir={model_dir}", f"--gin.train.num_steps={steps}", *extra]


def losses(model_dir):
  """Step -> loss, the last record of each step."""
  with open(os.path.join(model_dir, "train_losses.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f)}


def complete_steps(model_dir):
  d = os.path.join(model_dir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit())


def tree_digest(path):
  h = hashlib.sha256()
  for root, dirs, files in sorted(os.walk(path)):
    dirs.sort()
    for f in sorted(files):
      p = os.path.join(root, f)
      h.update(os.path.relpath(p, path).encode() + open(p, "rb").read())
  return h.hexdigest()


@pytest.fixture(scope="module")
def seed_rows():
  """The 175 Self-Instruct seed tasks as Alpaca records (instruction, input, output)."""
  path = shared_data("alpaca_seed_tasks") / "seed_tasks.jsonl"
  rows = []
  for line in path.read_text(encoding="utf-8").splitlines():
    rec = json.loads(line)
    inst = rec["instances"][0]
    rows.append({"instruction": rec["instruction"], "input": inst["input"],
                 "output": inst["output"]})
  return rows


@pytest.fixture(scope="module")
def alpaca_file(seed_rows, tmp_path_factory):
  path = tmp_path_factory.mktemp("data") / "alpaca.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in seed_rows), encoding="utf-8")
  return path


@pytest.fixture(scope="module")
def three_bad_file(seed_rows, tmp_path_factory):
  """The seed tasks with a malformed line, a record without output and one not UTF-8."""
  ls = [json.dumps(r).encode() for r in seed_rows]
  ls[2] = ls[2][:-1]
  ls[4] = json.dumps({"instruction": "x", "input": ""}).encode()
  ls[6] = ls[6].replace(b"e", b"\xff", 1)
  path = tmp_path_factory.mktemp("data") / "three_bad.jsonl"
  path.write_bytes(b"\n".join(ls) + b"\n")
  return path


def skip_args(path, model_dir, *extra, steps=4):
  return user_args(path, model_dir, "--gin.bad_records.policy='skip'", *extra, steps=steps)


@pytest.fixture(scope="module")
def first_run(three_bad_file, tmp_path_factory):
  """Four steps on three_bad_file, skipping its bad records; checkpoints at 2 and 4.

  (model_dir, stdout); tests copy model_dir before writing to it.
  """
  model_dir = tmp_path_factory.mktemp("first") / "run"
  code, out, err = run_train(skip_args(three_bad_file, model_dir))
  assert code == 0, out[-2000:] + err[-2000:]
  assert complete_steps(model_dir) == [2, 4]
  return model_dir, out


# ------------------------------------------------------------------ bad input

def _lines(seed_rows):
  return [json.dumps(r) for r in seed_rows]


def _write(path, lines):
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")
  return path


def _malformed(tmp, rows):
  ls = _lines(rows)
  ls[5] = ls[5][:-1]  # a cut-off object on line 6
  return _write(tmp / "malformed.jsonl", ls), [":6: not valid JSON", "bad_records.policy='skip'"]


def _json_array(tmp, rows):
  text = json.dumps(rows[:20], indent=1).replace('},\n {', '}\n {', 1)  # a missing comma
  (tmp / "alpaca.json").write_text(text, encoding="utf-8")
  return tmp / "alpaca.json", ["not valid JSON", "a JSON array must parse as a whole"]


def _missing(tmp, rows):
  ls = _lines(rows)
  rec = dict(rows[3])
  del rec["output"]
  ls[3] = json.dumps(rec)
  return _write(tmp / "missing.jsonl", ls), [":4: no field 'output'", "add 'output'"]


def _empty_field(tmp, rows):
  ls = _lines(rows)
  ls[3] = json.dumps(dict(rows[3], output="  "))
  return _write(tmp / "empty_field.jsonl", ls), [":4: 'output' is empty", "non-empty 'output'"]


def _not_utf8(tmp, rows):
  ls = [l.encode() for l in _lines(rows)]
  ls[7] = ls[7].replace(b"e", b"\xff\xfe", 1)  # Latin-1-ish bytes on line 8
  (tmp / "latin.jsonl").write_bytes(b"\n".join(ls) + b"\n")
  return tmp / "latin.jsonl", [":8: bytes that are not UTF-8", "re-encode the file as UTF-8"]


def _empty_file(tmp, rows):
  (tmp / "empty.jsonl").write_bytes(b"")
  return tmp / "empty.jsonl", ["is empty; it holds no records"]


def _blank_lines(tmp, rows):
  (tmp / "blank.jsonl").write_text("\n  \n\n")
  return tmp / "blank.jsonl", [": no usable records"]


def _absent(tmp, rows):
  return tmp / "nope.jsonl", ["nope.jsonl does not exist"]


def _wrong_format(tmp, rows):  # Alpaca records read as chat
  return _write(tmp / "alpaca_as_chat.jsonl", _lines(rows)), [":1: no field 'messages'"]


@pytest.mark.parametrize("make", [_malformed, _json_array, _missing, _empty_field, _not_utf8,
                                  _empty_file, _blank_lines, _absent, _wrong_format],
                         ids=lambda f: f.__name__.strip("_"))
def test_bad_user_file_stops_in_one_line_naming_file_record_and_fix(make, seed_rows, tmp_path):
  path, needles = make(tmp_path, seed_rows)
  fmt = "chat" if make is _wrong_format else "alpaca"
  line = one_error_line(*run_train(user_args(path, tmp_path / "run", fmt=fmt))[::2])
  assert str(path) in line
  for needle in needles:
    assert needle in line, line
  assert not (tmp_path / "run" / "train_losses.jsonl").exists()  # before any training


def test_skip_policy_counts_each_bad_record_and_trains_on_the_rest(first_run):
  _, out = first_run
  report = [l for l in out.splitlines() if l.startswith("data: ")]
  assert len(report) == 1, out
  assert "172 records kept, 3 skipped" in report[0]
  for reason in ("1 malformed JSON lines", "1 records missing 'output'", "1 non-UTF-8 lines"):
    assert reason in report[0]


def test_malformed_tsv_row_of_a_flan_cot_file(tmp_path):
  """A real FLAN CoT TSV with one row that lost a tab: named by file and line, or skipped."""
  from flanjax.data import cache
  rows = (shared_data("flan_cot") / "aqua_train.tsv").read_text(encoding="utf-8").splitlines()
  data = tmp_path / "data"
  (data / "flan_cot").mkdir(parents=True)
  rows = rows[:200]
  rows[6] = rows[6].replace("\t", " ", 1)
  tsv = data / "flan_cot" / "aqua_train.tsv"
  tsv.write_text("\n".join(rows) + "\n", encoding="utf-8")
  argv = ["--gin_file=flan.gin", "--gin.MIXTURE='flan_cot_aqua_direct'",
          f"--gin.data_dir.path='{data}'", *TINY, f"--gin.train.model_dir={tmp_path / 'run'}",
          "--gin.train.num_steps=1"]
  cache.clear_caches()  # flan_cot rows are cached by set name; this file is not the shared one
  try:
    line = one_error_line(*run_train(argv)[::2])
    assert f"{tsv}:7: 2 tab-separated fields, expected 3 (question, answer, rationale)" in line
  finally:
    cache.clear_caches()


def test_broken_niv2_task_file(tmp_path):
  src = sorted((shared_data("niv2_sample")).glob("task*.json"))[0]
  folder = tmp_path / "niv2"
  folder.mkdir()
  text = src.read_text(encoding="utf-8")
  (folder / src.name).write_text(text[: len(text) // 2], encoding="utf-8")  # cut short
  line = one_error_line(*run_train(user_args(folder, tmp_path / "run", fmt="niv2"))[::2])
  assert str(folder / src.name) in line and "not valid JSON" in line


@pytest.mark.parametrize("extra, needles", [
    (["--gin.MIXTURE='user_dta'"],
     ["unknown task or mixture 'user_dta'", "did you mean 'user_data'", "show_task.py --list"]),
    (["--gin.MIXTURE='bbh_navigate'"],
     ["'bbh_navigate' would train on evaluation-only data: bbh_navigate",
      "evaluate on it with flanjax.evaluate"]),
    (["--gin.register_all.mixtures=[{'name': 'mine', 'tasks': ['user_data', 'bbh_navigate']}]",
      "--gin.MIXTURE='mine'"],
     ["mixture 'mine' would train on evaluation-only data: bbh_navigate"]),
    (["--gin.bad_records.policy='skp'"], ["bad_records.policy must be one of"]),
    # targets=1: EOS alone (a one-token output with EOS is 2, and a seed task has such).
    (["--gin.train.task_feature_lengths={'inputs': 4, 'targets': 1}"],
     ["inputs=4 is shorter than every example", "targets=1 is shorter than every example",
      "--gin.train.task_feature_lengths="]),
    (["--gin.train.task_feature_lengths={'inputs': 0, 'targets': 32}"],
     ["train.task_feature_lengths['inputs'] = 0", "at least 1"]),
    (["--gin.corpus_vocabulary.vocab_size=40"],
     ["a 40-piece vocabulary cannot hold this text's", "corpus_vocabulary.vocab_size"]),
], ids=["unknown_task", "eval_only_task", "eval_only_in_mixture", "policy_typo",
        "lengths_fit_no_example", "zero_length", "vocabulary_too_small"])
def test_bad_configuration_stops_in_one_line(extra, needles, alpaca_file, tmp_path):
  line = one_error_line(*run_train(user_args(alpaca_file, tmp_path / "run", *extra))[::2])
  for needle in needles:
    assert needle in line, line
  assert not (tmp_path / "run" / "train_losses.jsonl").exists()


def test_gin_file_with_a_typo(alpaca_file, tmp_path):
  gin_file = tmp_path / "mine.gin"
  gin_file.write_text("include 'runs/user_data.gin'\ntrain.num_stepz = 3\n")
  line = one_error_line(*run_train([f"--gin_file={gin_file}",
                                    f"--gin.USER_FILE={alpaca_file}"])[::2])
  assert f"gin file {gin_file}" in line and "num_stepz" in line and "line 2" in line


def test_model_dir_that_cannot_be_written(alpaca_file, tmp_path):
  line = one_error_line(*run_train(user_args(alpaca_file, alpaca_file / "run"))[::2])
  assert f"model directory {alpaca_file / 'run'} is not writable (Not a directory)" in line
  (tmp_path / "run").mkdir()
  (tmp_path / "run" / "checkpoints").write_text("not a folder")
  line = one_error_line(*run_train(user_args(alpaca_file, tmp_path / "run"))[::2])
  assert "checkpoints is a file, not a checkpoint folder" in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through chmod; the file-as-parent "
                    "case in test_model_dir_that_cannot_be_written covers it")
def test_read_only_model_dir(alpaca_file, tmp_path):
  ro = tmp_path / "ro"
  ro.mkdir()
  ro.chmod(0o500)
  try:
    line = one_error_line(*run_train(user_args(alpaca_file, ro / "run"))[::2])
    assert "is not writable (Permission denied)" in line
  finally:
    ro.chmod(0o700)


def test_not_a_model_or_checkpoint_directory(alpaca_file, tmp_path):
  """train.init_from and convert_checkpoint given a folder that holds no model."""
  junk = tmp_path / "junk"
  junk.mkdir()
  (junk / "notes.txt").write_text("not a model")
  line = one_error_line(*run_train(user_args(alpaca_file, tmp_path / "run",
                                             f"--gin.train.init_from='{junk}'"))[::2])
  assert f"{junk}/config.json not found" in line
  code, _, err = run_tool("convert_checkpoint", ["orbax-to-hf", str(junk), str(tmp_path / "o")])
  assert str(junk) in one_error_line(code, err)


def test_show_task_bad_name_and_bad_file(seed_rows, tmp_path):
  code, _, err = run_tool("show_task", ["flan_cot_gsm8", "-n", "1"])
  assert "did you mean 'flan_cot_gsm8k'" in one_error_line(code, err)
  path, _ = _malformed(tmp_path, seed_rows)
  gin_file = tmp_path / "mine.gin"
  gin_file.write_text(f"user_data.tasks = [{{'name': 'mine', 'path': '{path}', "
                      "'format': 'alpaca'}]\n")
  code, _, err = run_tool("show_task", ["mine", "-n", "1", f"--gin_file={gin_file}"])
  assert f"{path}:6: not valid JSON" in one_error_line(code, err)
  gin.clear_config()


def test_vocabulary_or_model_that_does_not_match_the_checkpoint(first_run, three_bad_file,
                                                               tmp_path):
  run = tmp_path / "run"
  shutil.copytree(first_run[0], run)
  before = tree_digest(run)
  line = one_error_line(*run_train(skip_args(three_bad_file, run,
                                             "--gin.corpus_vocabulary.vocab_size=600"))[::2])
  assert f"{run} holds a run with a different vocabulary" in line
  line = one_error_line(*run_train(skip_args(three_bad_file, run,
                                             "--gin.T5Config.d_model=24"))[::2])
  assert "different model config" in line and "{'d_model': 16}, now {'d_model': 24}" in line
  # Layers under nn.scan store another checkpoint tree: a resume in the other layout is refused.
  line = one_error_line(*run_train(skip_args(three_bad_file, run,
                                             "--gin.T5Config.scan_layers=True"))[::2])
  assert "different model config" in line and "{'scan_layers': False}, now {'scan_layers': True}" in line
  assert tree_digest(run) == before  # nothing written, nothing moved
  # Without run_info.json (a copied run), the checkpoint's own shapes tell; nothing is moved.
  os.remove(run / "run_info.json")
  line = one_error_line(*run_train(skip_args(three_bad_file, run,
                                             "--gin.T5Config.d_model=24"))[::2])
  assert "checkpoint step 4" in line and "holds another model" in line and "(16," in line
  assert complete_steps(run) == [2, 4] and not (run / "run_info.json").exists()


# ------------------------------------------------------------------ faults and long runs

def test_same_config_and_seed_give_bit_identical_losses(first_run, three_bad_file, tmp_path):
  code, out, err = run_train(skip_args(three_bad_file, tmp_path / "again"))
  assert code == 0, err[-2000:]
  a = (first_run[0] / "train_losses.jsonl").read_bytes()
  b = (tmp_path / "again" / "train_losses.jsonl").read_bytes()
  assert len(a.splitlines()) == 4 and a == b


def test_non_finite_steps_are_skipped_logged_with_tasks_and_stop_the_run(first_run,
                                                                         three_bad_file, tmp_path):
  """z_loss = inf makes every loss non-finite: each step is skipped and logged with its
  batch's tasks, no checkpoint is written meanwhile, and the third in a row stops the run
  with the last good checkpoint as it was."""
  run = tmp_path / "run"
  shutil.copytree(first_run[0], run)
  good = tree_digest(run / "checkpoints" / "4")
  code, out, err = run_train(skip_args(three_bad_file, run, "--gin.train.z_loss=1e999",
                                       "--gin.train.max_nonfinite_in_row=3", steps=12))
  line = one_error_line(code, err)
  assert "resumed from step 4" in out
  assert "3 non-finite steps in a row (steps 5-7; last batch's tasks: user_data (" in line
  assert "the newest checkpoint, step 4, is from before them and intact" in line
  skipped = [l for l in out.splitlines() if "update skipped" in l]
  assert len(skipped) == 3 and all("by task: user_data (" in l for l in skipped)
  assert "step 6: checkpoint not saved during non-finite steps" in out
  with open(run / "train_losses.jsonl") as f:
    records = {r["step"]: r for r in map(json.loads, f)}
  for s in (5, 6, 7):
    assert records[s]["applied"] == 0 and records[s]["tasks"]["user_data"] >= 1
  assert complete_steps(run) == [2, 4]
  assert tree_digest(run / "checkpoints" / "4") == good


def _popen_train(argv, **kw):
  # The environment of this process, so its losses can be compared bit for bit with ours.
  return subprocess.Popen([sys.executable, "-m", "flanjax.train", *argv], text=True,
                          stdout=subprocess.PIPE, **kw)


def test_sigkill_during_a_save_then_resume_from_the_newest_complete_checkpoint(alpaca_file,
                                                                               tmp_path):
  """Killed while orbax writes step k (its temporary folder on disk): step k-2 is whole, the
  resume takes it and repeats the killed run's losses bit for bit; then a newest step whose
  files were cut short is moved aside and the one before it is used."""
  run = tmp_path / "run"
  ckdir = run / "checkpoints"
  proc = _popen_train(user_args(alpaca_file, run, steps=60), stderr=subprocess.DEVNULL)
  tmp_name, deadline = None, time.time() + 400
  while proc.poll() is None and time.time() < deadline:
    names = os.listdir(ckdir) if ckdir.is_dir() else []
    tmp = [n for n in names if ".orbax-checkpoint-tmp" in n and int(n.split(".")[0]) >= 4]
    if tmp:
      proc.send_signal(signal.SIGKILL)
      tmp_name = tmp[0]
      break
    time.sleep(0.002)
  proc.communicate(timeout=120)
  assert tmp_name and proc.returncode == -signal.SIGKILL, "the run ended before a save was seen"
  k = int(tmp_name.split(".")[0])
  # Killed mid-save: the step's folder is still the temporary one.
  assert (ckdir / tmp_name).is_dir() and not (ckdir / str(k)).exists()
  assert complete_steps(run)[-1] == k - 2
  killed = losses(run)
  assert k in killed  # the killed run had trained past k - 2

  code, out, err = run_train(user_args(alpaca_file, run, steps=k))
  assert code == 0, err[-2000:]
  assert f"resumed from step {k - 2}" in out
  assert not [n for n in os.listdir(ckdir) if "tmp" in n]  # the leftover is cleaned up
  assert complete_steps(run)[-2:] == [k - 2, k]
  resumed = losses(run)
  for s in (k - 1, k):
    assert resumed[s] == killed[s], (s, resumed[s], killed[s])
  # The killed run's records past step k - 2 were dropped at the resume: one per step.
  with open(run / "train_losses.jsonl") as f:
    assert [json.loads(line)["step"] for line in f] == list(range(1, k + 1))

  # The newest step's files cut short (as by a disk that failed under it): moved aside.
  for root, _, files in os.walk(ckdir / str(k) / "state"):
    for f in files:
      p = os.path.join(root, f)
      with open(p, "r+b") as fh:
        fh.truncate(os.path.getsize(p) // 2)
  code, out, err = run_train(user_args(alpaca_file, run, steps=k))
  assert code == 0, err[-2000:]
  assert f"checkpoint step {k} in {ckdir} does not restore" in out
  assert f"resumed from step {k - 2}" in out
  assert (ckdir / f"{k}.unreadable").is_dir() and complete_steps(run)[-1] == k
  again = losses(run)
  assert again[k - 1] == killed[k - 1] and again[k] == killed[k]


@pytest.mark.skipif(not hasattr(resource, "prlimit"), reason="needs Linux prlimit")
def test_a_disk_that_refuses_writes_mid_run(alpaca_file, tmp_path):
  """After checkpoint 4, the process may write no file past 32 KiB (RLIMIT_FSIZE, as a full
  disk would refuse): the next checkpoint fails, the run stops with one line, and checkpoint 4
  is byte for byte as it was (a resume from a whole checkpoint is tested above)."""
  run = tmp_path / "run"
  argv = user_args(alpaca_file, run, "--gin.Checkpointer.every_steps=4", steps=40)
  # Python ignores SIGXFSZ, so a write past the limit fails with EFBIG instead of killing.
  proc = _popen_train(argv, stderr=subprocess.PIPE)
  deadline = time.time() + 400
  while proc.poll() is None and time.time() < deadline and not (run / "checkpoints" / "4").is_dir():
    time.sleep(0.005)
  resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (32 << 10, 32 << 10))
  good = tree_digest(run / "checkpoints" / "4")
  out, err = proc.communicate(timeout=400)
  assert proc.returncode == 2, err[-3000:]
  # Orbax's own thread logs the failure too; ours is the one error line.
  lines = [l for l in err.splitlines() if l.startswith("train.py: error:")]
  assert len(lines) == 1, err[-3000:]
  assert "saving the checkpoint of step 8" in lines[0] and "File too large" in lines[0]
  assert "the complete checkpoints (4) are intact" in lines[0]
  assert complete_steps(run) == [4] and tree_digest(run / "checkpoints" / "4") == good


def test_too_little_free_disk_is_reported_before_training(alpaca_file, tmp_path, monkeypatch):
  from flanjax.training import checkpoints
  real = shutil.disk_usage

  def small(path):
    return real(path)._replace(free=2 << 20)

  monkeypatch.setattr(checkpoints.shutil, "disk_usage", small)
  line = one_error_line(*run_train(user_args(alpaca_file, tmp_path / "run"))[::2])
  assert "not enough disk space for checkpoints" in line and "2.0 MiB free" in line
  assert not (tmp_path / "run" / "train_losses.jsonl").exists()
  assert complete_steps(tmp_path / "run") == []


def test_a_user_data_run_is_evaluated_on_its_own_tasks_without_its_gin(first_run, tmp_path):
  # The run recorded its user tasks (paths made absolute) in run_info.json; evaluate binds
  # them, from another folder, with no --gin_file.
  run = tmp_path / "run"
  shutil.copytree(first_run[0], run)
  data = json.loads((run / "run_info.json").read_text())["data"]
  assert os.path.isabs(data["user_data.tasks"][0]["path"])
  out = tmp_path / "eval"
  proc = subprocess.run(
      [sys.executable, "-m", "flanjax.evaluate", "--checkpoint", str(run),
       "--tasks=user_data", "--max_examples=2", f"--out={out}",
       "--gin.evaluate.input_length=96", "--gin.evaluate.max_decode_len=8"],
      cwd=tmp_path, capture_output=True, text=True, timeout=600,
      env=dict(os.environ, PYTHONPATH=str(REPO)))
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  assert (f"user_data.tasks, user_data.prompt_format, register_all.mixtures, bad_records.policy "
          f"as {run} was trained with") in proc.stdout
  result = json.loads((out / "eval.json").read_text())
  assert {(r["task"], r["split"]) for r in result["tasks"]} == {("user_data", "validation")}
  # What the command line binds wins over the record.
  other = tmp_path / "other.jsonl"
  other.write_text(json.dumps({"instruction": "Say yes.", "input": "", "output": "yes"}) + "\n")
  proc = subprocess.run(
      [sys.executable, "-m", "flanjax.evaluate", "--checkpoint", str(run), "--tasks=mine",
       "--max_examples=1", f"--out={out}", "--gin.evaluate.input_length=96",
       f"--gin.user_data.tasks=[{{'name': 'mine', 'path': '{other}'}}]"],
      cwd=tmp_path, capture_output=True, text=True, timeout=600,
      env=dict(os.environ, PYTHONPATH=str(REPO)))
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  assert "was trained with (its run_info.json)" not in proc.stdout


def test_changed_training_settings_on_resume_are_notes_naming_old_and_new(first_run, three_bad_file,
                                                                          tmp_path):
  run = tmp_path / "run"
  shutil.copytree(first_run[0], run)
  recorded = json.loads((run / "run_info.json").read_text())["training"]
  assert recorded["batch_size"] == 4 and recorded["seed"] == 0 and recorded["processes"] == 1
  code, out, err = run_train(skip_args(three_bad_file, run, "--gin.schedule.peak=0.02",
                                       "--gin.train.batch_size=8", steps=5))
  assert code == 0, out[-2000:] + err[-2000:]
  note = next(l for l in out.splitlines() if "training settings changed" in l)
  assert "batch_size: 4 -> 8" in note and "schedule.peak: 0.01 -> 0.02" in note
  assert "the batches from here on are not the ones an uninterrupted run would have seen" in note
  # The same settings again: no note.
  code, out, _ = run_train(skip_args(three_bad_file, run, "--gin.schedule.peak=0.02",
                                     "--gin.train.batch_size=8", steps=6))
  assert code == 0 and "training settings changed" not in out

"""Gin resolution, overrides and their errors, through the API and the real command."""

import os
import subprocess
import sys

import gin
import pytest

import flanjax.train  # (also registers the configurables)
from conftest import command_in_process
from flanjax import config
from flanjax.errors import UserError
from flanjax.models.t5 import T5Config


def test_bare_name_resolves_to_packaged_config(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # any directory
  path = config.resolve_gin_file("flan.gin")
  assert path == os.path.join(config.PACKAGED_GIN_DIR, "flan.gin")
  assert config.resolve_gin_file("models/tiny") == os.path.join(
      config.PACKAGED_GIN_DIR, "models", "tiny.gin")


def test_includes_resolve_where_the_folder_has_models_and_runs_folders(tmp_path, monkeypatch):
  """`python -m` puts the folder it runs in on sys.path: plain `models/` and `runs/` folders
  there (a run's own, say) are namespace packages to gin's package reader, which raised on
  them; the packaged includes must still resolve."""
  import importlib  # pylint: disable=g-import-not-at-top
  for name in ("models", "runs", "eval"):
    (tmp_path / name).mkdir()
  (tmp_path / "mine.gin").write_text("include 'runs/user_data.gin'\n")
  monkeypatch.chdir(tmp_path)
  monkeypatch.syspath_prepend(str(tmp_path))
  importlib.invalidate_caches()
  try:
    for argv in (["--gin_file=flan.gin"], [f"--gin_file={tmp_path / 'mine.gin'}"]):
      config.parse_gin(config.parse_args(argv), finalize=False)
  finally:
    gin.clear_config()
    for name in ("models", "runs", "eval"):
      sys.modules.pop(name, None)


def test_search_path_wins_over_packaged(tmp_path):
  (tmp_path / "flan.gin").write_text("train.num_steps = 7\n")
  assert config.resolve_gin_file("flan.gin", [str(tmp_path)]) == str(tmp_path / "flan.gin")


def test_missing_gin_file_names_what_was_searched():
  with pytest.raises(UserError, match=r"gin file 'nope.gin' not found.*flan.gin"):
    config.resolve_gin_file("nope.gin")


def test_overrides_apply_after_files():
  args = config.parse_args(["--gin_file=flan.gin", "--gin.train.num_steps=5",
                            "--gin.T5Config.d_model=64", "--gin.train.model_dir=/tmp/x y",
                            "--gin_bindings=train.seed = 3"])
  config.parse_gin(args, finalize=False)
  assert gin.query_parameter("train.num_steps") == 5
  assert gin.query_parameter("train.model_dir") == "/tmp/x y"  # bare string quoted for us
  assert gin.query_parameter("train.seed") == 3
  assert T5Config().d_model == 64
  assert T5Config().num_heads == 4  # from the included models/tiny.gin
  gin.clear_config()


@pytest.mark.parametrize("files", [["runs/finetune_llama.gin", "runs/user_data.gin"],
                                   ["runs/user_data.gin", "runs/finetune_llama.gin"]])
def test_files_that_include_one_file_combine_in_either_order(files):
  # Both include flan.gin; read a second time it would set back the first file's settings
  # over it (Adafactor and flan.gin's schedule and z-loss for the Llama fine-tune).
  config.parse_gin(config.parse_args([f"--gin_file={f}" for f in files]), finalize=False)
  try:
    got = {k: gin.query_parameter(k) for k in (
        "optimizer.name", "schedule.name", "schedule.peak", "train.z_loss")}
    assert got == {"optimizer.name": "adamw", "schedule.name": "constant",
                   "schedule.peak": 2e-5, "train.z_loss": 0.0}
    assert gin.query_parameter("user_data.tasks")[0]["name"] == "user_data"
    assert gin.query_parameter("%MIXTURE") == "user_and_builtin"
  finally:
    gin.clear_config()
  # One file named twice is read once too, and a later parse reads everything again.
  config.parse_gin(config.parse_args(["--gin_file=flan.gin", "--gin_file=flan.gin"]),
                   finalize=False)
  assert gin.query_parameter("train.num_steps") == 800
  gin.clear_config()


@pytest.mark.parametrize("binding, message", [
    ("--gin.train.no_such_arg=1", "no_such_arg"),
    ("--gin.NoSuchThing.x=1", "NoSuchThing"),
    ("--gin.train.num_steps=[1,", "num_steps"),
])
def test_bad_bindings_raise_user_error(binding, message):
  args = config.parse_args(["--gin_file=flan.gin", binding])
  with pytest.raises(UserError, match=message):
    config.parse_gin(args)
  gin.clear_config()


def test_gin_file_with_typo(tmp_path):
  bad = tmp_path / "bad.gin"
  bad.write_text("include 'flan.gin'\ntrain.num_stepz = 3\n")
  with pytest.raises(UserError, match="num_stepz"):
    config.parse_gin(config.parse_args([f"--gin_file={bad}"]))
  gin.clear_config()


def test_every_packaged_gin_file_parses():
  files = [os.path.join(d, f) for d, _, fs in os.walk(config.PACKAGED_GIN_DIR)
           for f in fs if f.endswith(".gin")]
  assert len(files) >= 2
  for f in files:
    config.parse_gin(config.parse_args([f"--gin_file={f}"]), finalize=False)
    gin.clear_config()


def _one_error_line(code, err, needle):
  assert code == 2, err
  errors = [l for l in err.splitlines() if "error:" in l]
  assert len(errors) == 1 and needle in errors[0], err
  assert "Traceback" not in err


def test_command_line_error_ends_the_process_in_one_line(tmp_path):
  # The real command, once: exit 2 and the one line on stderr of the process.
  proc = subprocess.run([sys.executable, "-m", "flanjax.train", "--gin_file=flan.gin",
                         "--gin.train.num_stepz=3"], cwd=tmp_path,
                        capture_output=True, text=True, timeout=300)
  _one_error_line(proc.returncode, proc.stderr, "num_stepz")


@pytest.mark.parametrize("argv, needle", [
    (["--gin_file=does_not_exist.gin"], "does_not_exist.gin"),
    (["--gin_file=flan.gin", "--gin.train.num_stepz=3"], "num_stepz"),
    (["--gin_file=flan.gin", "--bogus"], "--bogus"),
    ([], "--gin_file"),
    (["--gin_file=flan.gin", "--gin.train.num_steps=-3"], "train.num_steps=-3"),
    # A model setting out of its range (the config classes' own checks).
    (["--gin_file=flan.gin", "--gin.T5Config.attention_impl='foo'"], "attention_impl='foo'"),
    (["--gin_file=flan.gin", "--gin.T5Config.remat_policy='most'"], "remat_policy='most'"),
    (["--gin_file=flan.gin", "--gin.T5Config.feed_forward='foo'"], "feed_forward='foo'"),
])
def test_command_line_errors_are_one_line(argv, needle, tmp_path, monkeypatch, builtin_vocab):
  # The command's main in this process: each case would otherwise pay a process start
  # (its TensorFlow and JAX imports) for one line.
  monkeypatch.chdir(tmp_path)
  code, _, err = command_in_process(flanjax.train.main, argv, builtin_vocab)
  _one_error_line(code, err, needle)


def test_a_full_disk_inside_a_configurable_is_one_line_exit_1(capsys):
  # gin re-raises an error inside a configurable as a copy without errno or filename; the
  # machine's error (ENOSPC) is found on the original and reported in one line, exit 1.
  import errno  # pylint: disable=g-import-not-at-top

  @gin.configurable("full_disk_writer")
  def write():
    raise OSError(errno.ENOSPC, "No space left on device", "/runs/x/train_losses.jsonl")

  with pytest.raises(SystemExit) as e:
    config._guarded(write, "flanjax.train")  # pylint: disable=protected-access
  assert e.value.code == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "No space left on device (/runs/x/train_losses.jsonl)" in err[0]
  assert "free disk space" in err[0]
  # A programming error's OSError (not the machine's) still shows its traceback.

  @gin.configurable("bad_fd_user")
  def bad_fd():
    raise OSError(errno.EBADF, "Bad file descriptor")

  with pytest.raises(OSError):
    config._guarded(bad_fd, "flanjax.train")  # pylint: disable=protected-access


def test_a_bad_mesh_shape_is_one_line_naming_the_binding(tmp_path, monkeypatch, builtin_vocab):
  monkeypatch.chdir(tmp_path)
  code, _, err = command_in_process(flanjax.train.main, [
      "--gin_file=flan.gin", "--gin.train.mesh_shape=(3, 1, 1)", "--gin.train.num_steps=1",
      f"--gin.train.model_dir={tmp_path / 'run'}"], builtin_vocab)
  _one_error_line(code, err, "mesh shape [3, 1, 1] needs 3 devices, but 1 are available; "
                  "set --gin.train.mesh_shape=")

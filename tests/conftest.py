import os
import pathlib

# Keep TensorFlow (seqio's input pipeline) quiet and off any accelerator.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# One JAX compilation cache for the session, this process and every command a test starts
# (they inherit the environment): many tests run the same tiny configs through the real
# commands, and each process would otherwise compile the same train and decode steps again.
# A cache hit loads the executable XLA compiled for the same program, so results are the
# same; the folder is fresh each session and removed at its end.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import atexit  # noqa: E402
  import shutil  # noqa: E402
  import tempfile  # noqa: E402
  _JAX_CACHE = tempfile.mkdtemp(prefix="flanjax_test_jax_cache_")
  atexit.register(shutil.rmtree, _JAX_CACHE, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _JAX_CACHE
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

# LLVM at -O0 for the tests' compiles and the commands they start: the suite compiles
# hundreds of tiny programs and runs each for a few steps, so compiling is most of its time
# (test_output_loss + test_t5: 169 s -> 131 s; test_failures_end + test_early_stopping,
# which start training commands: 139 s -> 110 s). XLA's HLO passes are the same, so are the
# operations and their order (the default job's losses agree to the last digit). A test
# whose steps are most of its time starts its command with `optimized_env()` (the default
# job: 0.87 steps/s at -O0 against 1.76). A level already in XLA_FLAGS is kept.
O0 = "--xla_backend_optimization_level=0"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + O0).strip()


def optimized_env(**extra) -> dict:
  """os.environ (plus extra) for a command that runs many steps: XLA's default -O level."""
  env = dict(os.environ, **extra)
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split() if f != O0)
  return env


def devices_env(count: int, **extra) -> dict:
  """os.environ (plus extra) for a command on `count` simulated CPU devices, the suite's
  XLA flags (its -O level) kept: a mesh test compiles one program per mesh."""
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  flags.append(f"--xla_force_host_platform_device_count={count}")
  return dict(os.environ, XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu", **extra)


import pytest  # noqa: E402

# Every module that defines gin configurables, imported before any test: a test
# that parses gin locks its config, and a module first imported after that
# could not register its configurables, whatever order the tests run in.
import benchmarks.run  # noqa: E402,F401
import flanjax.evaluate  # noqa: E402,F401
import flanjax.infer  # noqa: E402,F401
import flanjax.train  # noqa: E402,F401

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
  """Vocabularies and caches go to a temporary folder, not the user's home."""
  old = os.environ.get("FLANJAX_CACHE")
  os.environ["FLANJAX_CACHE"] = str(tmp_path_factory.mktemp("flanjax_cache"))
  yield
  if old is None:
    os.environ.pop("FLANJAX_CACHE", None)
  else:
    os.environ["FLANJAX_CACHE"] = old


@pytest.fixture(scope="module", autouse=True)
def _gin_unlocked_between_files():
  """A file that ends with gin's config finalized (a command parsed in-process and not
  cleared) would leave it locked for whichever file its worker runs next: the order is
  xdist's, so that broke tests by their neighbours (test_tfds_tasks' fixture, 90392a2). So
  no file needs gin.unlock_config() against what another file left."""
  yield
  import gin  # pylint: disable=g-import-not-at-top
  if gin.config_is_locked():
    gin.clear_config()


@pytest.fixture(scope="session")
def builtin_vocab(_isolated_cache):
  from flanjax.data import registry, vocab
  v = vocab.builtin_vocabulary(vocab_size=1000)
  registry.register_builtin(v)
  return v


def shared_data(sub: str) -> pathlib.Path:
  path = SHARED_DATA / sub
  if not path.exists():
    pytest.skip(f"real data {path} is absent (it lives in ../shared/data beside the repo)")
  return path


@pytest.fixture(scope="session")
def tiny_trained_run(tmp_path_factory, builtin_vocab):
  """One finished run of the default job on test_train_e2e.TINY (10 steps, checkpoints every 4,
  the evaluation at the end), shared by the tests that read a trained run folder: (folder,
  stdout). A test that changes the folder works on a copy."""
  from test_train_e2e import run  # pylint: disable=g-import-not-at-top
  model_dir = tmp_path_factory.mktemp("tiny_trained_run") / "straight"
  out = run(model_dir, "--gin.train.num_steps=10", "--gin.train.peak_flops=1e12")
  return model_dir, out


def command_in_process(main_fn, argv, session_vocab, prog_file=None):
  """A command's main(argv) in this process, as its process runs it less the hard exit at
  the end (held by test_failures_end and the tests that start the real command): (exit code,
  stdout, stderr). For runs that stop early or train nothing, where starting a process (its
  TensorFlow and JAX imports) costs more than the run. `prog_file` is the sys.argv[0] its
  error lines are named after; gin and the task registry are the session's again after."""
  import contextlib  # pylint: disable=g-import-not-at-top
  import io  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  import gin  # pylint: disable=g-import-not-at-top
  from flanjax.data import registry  # pylint: disable=g-import-not-at-top
  out, err, code = io.StringIO(), io.StringIO(), 0
  old_argv = sys.argv
  sys.argv = [prog_file or old_argv[0], *argv]
  try:
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
      main_fn(list(argv))
  except SystemExit as e:  # the code the process would end with, as config.as_command sets it
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
  finally:
    sys.argv = old_argv
    gin.clear_config()
    registry.register_all(session_vocab)
  return code, out.getvalue(), err.getvalue()


# The test files that take longest, slowest first (sums of their tests' durations in a full
# `--durations=0` run; docs/results/suite_time.md). xdist hands out the files with the most
# tests first, which put the one-test default-job file last, alone on one worker for ~4
# minutes; the long files first (`--no-loadscope-reorder` in pyproject's addopts keeps this
# order) let the short ones fill in at the end: 3,669 s of tests ended 37 s after half of
# that. A file missing here only runs later; the order changes no result.
SLOWEST_FILES = (
    "test_train_e2e.py", "test_default_job_learns.py", "test_robustness.py",
    "test_lora_training.py", "test_finetune.py", "test_collections.py", "test_sharding.py",
    "test_aot.py", "test_distributed.py", "test_output_loss.py", "test_scan_layers.py",
    "test_decoding.py",
)


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(SLOWEST_FILES)}
  # A stable sort by file keeps each file's tests together and in their own order.
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))

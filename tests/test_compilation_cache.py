"""The commands' compilation cache (flanjax/config.py: as_command -> enable_compilation_cache).

Each case is a small process that runs a jitted function through `as_command`, the entry of
every command (train, infer, evaluate, judge, curate): the folder it picks, the cap that turns
on JAX's file lock, a second process reading what the first wrote, and the two ways it stays
off. The train command's own reuse on resume is checked in test_train_e2e.
"""

import os
import subprocess
import sys

# A program big enough to pass any compile-time threshold is not needed: the threshold is 0.
PROGRAM = r"""
import sys
import jax, jax.numpy as jnp
from flanjax import config

def main(argv):
  f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum(axis=0) * 3.0)
  print("result", f(jnp.arange(12.0).reshape(3, 4) / 7).tolist())
  print("cache_dir", jax.config.jax_compilation_cache_dir)
  print("max_size", jax.config.jax_compilation_cache_max_size)

config.as_command(main)
"""


def _run(env_changes, tmp_path):
  env = {k: v for k, v in os.environ.items()
         if not k.startswith("JAX_COMPILATION_CACHE") and k != "FLANJAX_COMPILATION_CACHE"}
  env.update(FLANJAX_CACHE=str(tmp_path / "cache"), JAX_PLATFORMS="cpu",
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", **env_changes)
  proc = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True,
                        env=env, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  fields = dict(line.split(" ", 1) for line in proc.stdout.splitlines())
  return fields, proc.stderr


def _entries(folder):
  """Cached program -> its last-use stamp (with a size cap JAX rewrites it on every read;
  without one it keeps none: None)."""
  names = os.listdir(folder) if os.path.isdir(folder) else []
  stamp = lambda n: folder / (n[:-len("-cache")] + "-atime")  # noqa: E731
  return {n: stamp(n).read_bytes() if stamp(n).exists() else None
          for n in names if n.endswith("-cache")}


def _ours(entries):
  """The jitted lambda's entry (the threshold 0 caches jnp.arange's programs too)."""
  return [n for n in entries if n.startswith("jit__lambda-")]


def test_a_second_process_reads_what_the_first_compiled(tmp_path):
  folder = tmp_path / "cache" / "xla"
  first, _ = _run({}, tmp_path)
  assert first["cache_dir"] == str(folder)
  assert int(first["max_size"]) == 2 << 30  # the cap: LRU eviction and JAX's file lock
  written = _entries(folder)
  assert _ours(written) and (folder / ".lockfile").exists(), sorted(os.listdir(folder))
  second, _ = _run({}, tmp_path)
  assert second["result"] == first["result"]
  read = _entries(folder)
  assert read.keys() == written.keys()  # nothing compiled anew
  assert all(read[k] != written[k] for k in read), "the cached program was not read"


def test_a_folder_of_ones_own_and_the_users_jax_setting(tmp_path):
  mine = tmp_path / "elsewhere"
  out, _ = _run({"FLANJAX_COMPILATION_CACHE": str(mine)}, tmp_path)
  assert out["cache_dir"] == str(mine) and _ours(_entries(mine))
  # JAX's own variable wins, and its size setting is left as the user has it.
  theirs = tmp_path / "theirs"
  out, _ = _run({"JAX_COMPILATION_CACHE_DIR": str(theirs)}, tmp_path)
  assert out["cache_dir"] == str(theirs) and _ours(_entries(theirs))
  assert int(out["max_size"]) == -1
  assert not (tmp_path / "cache" / "xla").exists()


def test_off_and_an_unwritable_folder_leave_it_off(tmp_path):
  out, err = _run({"FLANJAX_COMPILATION_CACHE": "off"}, tmp_path)
  assert out["cache_dir"] == "None" and not (tmp_path / "cache" / "xla").exists()
  assert "compilation cache" not in err
  blocker = tmp_path / "a_file"
  blocker.write_text("not a folder")
  out, err = _run({"FLANJAX_COMPILATION_CACHE": str(blocker / "xla")}, tmp_path)
  assert out["cache_dir"] == "None" and out["result"]
  lines = [l for l in err.splitlines() if "compilation cache" in l]
  assert len(lines) == 1 and str(blocker / "xla") in lines[0], err[-2000:]
  assert "FLANJAX_COMPILATION_CACHE" in lines[0]


def test_the_default_folder_sits_in_the_data_cache(monkeypatch, tmp_path):
  """The compilation cache lives under the data caches' folder, with FLANJAX_CACHE set,
  unset, and set but empty (which counts as unset: never the working directory)."""
  from flanjax import config
  from flanjax.data import cache
  monkeypatch.delenv("FLANJAX_COMPILATION_CACHE", raising=False)
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  home = os.path.join(str(tmp_path / "home"), ".cache", "flanjax")
  for value, want in ((None, home), (str(tmp_path / "data_cache"), str(tmp_path / "data_cache")),
                      ("", home), ("  ", home)):
    if value is None:
      monkeypatch.delenv("FLANJAX_CACHE", raising=False)
    else:
      monkeypatch.setenv("FLANJAX_CACHE", value)
    assert cache.default_cache_dir() == want, repr(value)
    assert config.compilation_cache_dir() == os.path.join(want, "xla")
  monkeypatch.setenv("FLANJAX_COMPILATION_CACHE", "OFF")
  assert config.compilation_cache_dir() is None

"""A flanjax command runs again at once with glibc's malloc asking for transparent huge
pages (flanjax._huge_pages_for_commands); nothing else is run again."""

import os
import subprocess
import sys
import textwrap

import pytest

import flanjax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_what_counts_as_a_command():
  assert flanjax._is_command(["python", "-m", "flanjax.train", "--gin_file=flan.gin"])
  assert flanjax._is_command(["python", "-u", "-m", "benchmarks.run"])
  assert flanjax._is_command(["python", "/venv/bin/flanjax-train", "--gin_file=x.gin"])
  assert not flanjax._is_command(["python", "-m", "pytest", "-m", "flanjax.train"])
  assert not flanjax._is_command(["python", "-m", "mypackage.flanjax"])
  assert not flanjax._is_command(["python", "script.py", "-m", "x"])
  assert not flanjax._is_command(["python"])


def test_glibc_versions():
  assert flanjax._glibc_at_least("glibc 2.36") and flanjax._glibc_at_least("glibc 2.35")
  assert not flanjax._glibc_at_least("glibc 2.31")
  assert not flanjax._glibc_at_least("")
  assert not flanjax._glibc_at_least("musl 1.2")


def _starts(tmp_path, env_extra):
  """Each Python start of `python -m flanjax.train <bad argument>`: its GLIBC_TUNABLES."""
  probe = tmp_path / "probe"
  probe.mkdir(parents=True, exist_ok=True)
  log = tmp_path / "starts.txt"
  (probe / "sitecustomize.py").write_text(textwrap.dedent(f"""
      import os
      with open({str(log)!r}, "a") as f:
        f.write(repr(os.environ.get("GLIBC_TUNABLES")) + "\\n")
  """))
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "FLANJAX_HUGE_PAGES")}
  env.update(PYTHONPATH=os.pathsep.join([str(probe), ROOT]), JAX_PLATFORMS="cpu", **env_extra)
  proc = subprocess.run([sys.executable, "-m", "flanjax.train", "--no_such_flag"], env=env,
                        cwd=tmp_path, capture_output=True, text=True, timeout=300)
  # The command's own error still ends the (re-run) process with its code.
  assert proc.returncode != 0 and "unknown arguments" in proc.stderr, proc.stderr[-2000:]
  return log.read_text().splitlines()


def test_a_command_runs_again_with_huge_pages_once(tmp_path):
  state = flanjax.huge_pages_state()
  if state["transparent_hugepage"] != "madvise" or not flanjax._glibc_at_least(state["libc"]):
    pytest.skip(f"huge pages are not asked for here: kernel THP mode "
                f"{state['transparent_hugepage']!r}, {state['libc'] or 'no glibc'}")
  assert _starts(tmp_path / "a", {}) == ["None", repr(flanjax.HUGE_PAGES_TUNABLE)]
  # The user's own tunables are kept, and added to.
  got = _starts(tmp_path / "b", {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
  assert got == ["'glibc.malloc.arena_max=2'",
                 repr("glibc.malloc.arena_max=2:" + flanjax.HUGE_PAGES_TUNABLE)]
  # The opt-out and a hugetlb setting of one's own: started once, as it was.
  assert _starts(tmp_path / "c", {"FLANJAX_HUGE_PAGES": "0"}) == ["None"]
  assert _starts(tmp_path / "d", {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) == [
      "'glibc.malloc.hugetlb=0'"]


def test_the_restart_runs_the_same_command_with_the_tunable_added(monkeypatch):
  """In-process, with execve recorded instead of run: the same interpreter and arguments,
  the tunable appended to the user's; nothing without an interpreter path to run."""
  calls = []
  monkeypatch.setattr(flanjax._os, "execve", lambda *a: calls.append(a))
  monkeypatch.setattr(flanjax, "huge_pages_state", lambda: {
      "transparent_hugepage": "madvise", "libc": "glibc 2.36",
      "glibc_tunables": "glibc.malloc.arena_max=2", "opt_out": False})
  monkeypatch.setattr(sys, "platform", "linux")
  monkeypatch.delitem(sys.modules, "jax", raising=False)
  monkeypatch.setattr(sys, "orig_argv", ["python3", "-u", "-m", "flanjax.train", "--x=1"],
                      raising=False)
  flanjax._huge_pages_for_commands()
  (path, argv, env), = calls
  assert path == sys.executable and argv == [sys.executable, "-u", "-m", "flanjax.train", "--x=1"]
  assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:" + flanjax.HUGE_PAGES_TUNABLE
  monkeypatch.setattr(sys, "executable", "")
  flanjax._huge_pages_for_commands()
  monkeypatch.setattr(sys, "executable", None)
  flanjax._huge_pages_for_commands()
  assert len(calls) == 1

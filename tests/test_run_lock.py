"""RunLock: one run per model folder.

Other holders are real processes: a live `sleep` child stands for a run in
progress, a child that has exited (and was reaped) for a run that died.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from flanjax.errors import UserError
from flanjax.training import run_lock
from flanjax.training.run_lock import RunLock

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def sleeper():
  proc = subprocess.Popen(["sleep", "60"])
  yield proc
  proc.kill()
  proc.wait()


def dead_pid():
  proc = subprocess.Popen(["true"])
  proc.wait()  # reaped: the pid is free
  return proc.pid


def write_lock(model_dir, **fields):
  rec = {"host": socket.gethostname(), "pid": 1, "started": "2024-01-02 03:04:05 +0000",
         "argv": ["python", "-m", "flanjax.train", "--gin_file=flan.gin"], "token": "x"}
  rec.update(fields)
  path = model_dir / ".lock"
  path.write_text(json.dumps(rec))
  return path


def test_acquire_writes_who_holds_it_and_release_removes_it(tmp_path):
  d = tmp_path / "run"  # created by acquire
  lock = RunLock(str(d), process_index=0, argv=["train", "--x"]).acquire()
  rec = json.loads((d / ".lock").read_text())
  assert rec["host"] == socket.gethostname() and rec["pid"] == os.getpid()
  assert rec["argv"] == ["train", "--x"] and rec["started"][:2] == "20"
  assert os.listdir(d) == [".lock"]  # no temporary file left
  assert lock.release() and not (d / ".lock").exists()
  assert not lock.release()  # a second release is a no-op


def test_context_manager(tmp_path):
  with RunLock(str(tmp_path), process_index=0) as lock:
    assert lock.held and (tmp_path / ".lock").exists()
  assert not (tmp_path / ".lock").exists()


def test_a_live_holder_on_this_host_is_refused_naming_it(tmp_path, sleeper):
  path = write_lock(tmp_path, pid=sleeper.pid)
  before = path.read_bytes()
  with pytest.raises(UserError) as e:
    RunLock(str(tmp_path), process_index=0).acquire()
  msg = str(e.value)
  assert "\n" not in msg
  assert f"{tmp_path} is in use by another run on this host ({socket.gethostname()}, " \
         f"pid {sleeper.pid}, started 2024-01-02 03:04:05 +0000" in msg
  assert f"python -m flanjax.train --gin_file=flan.gin; lock {tmp_path}/.lock)" in msg
  assert msg.endswith("wait for it, or stop it, or use another --gin.train.model_dir")
  assert path.read_bytes() == before and os.listdir(tmp_path) == [".lock"]


def test_a_second_lock_in_the_same_process_is_refused(tmp_path):
  first = RunLock(str(tmp_path), process_index=0).acquire()
  try:
    with pytest.raises(UserError, match=f"pid {os.getpid()}"):
      RunLock(str(tmp_path), process_index=0).acquire()
    assert first.acquire() is first  # the holder taking it again is a no-op
  finally:
    first.release()


@pytest.mark.parametrize("why", ["dead pid", "zombie", "pid reused", "before a restart",
                                 "this process, not released"])
def test_a_holder_that_is_gone_is_taken_over_with_a_note(tmp_path, capsys, why):
  zombie = None
  if why == "dead pid":
    fields, words = {"pid": dead_pid()}, "which is no longer running"
  elif why == "zombie":
    zombie = subprocess.Popen(["true"])
    deadline = time.time() + 10
    while run_lock._proc_stat(zombie.pid)[0] != "Z" and time.time() < deadline:
      time.sleep(0.01)
    fields, words = {"pid": zombie.pid}, "which has exited (a zombie)"
  elif why == "pid reused":
    # A live pid, but not the process that took the lock: it started at another time.
    fields = {"pid": os.getppid(), "pid_start": -1}
    words = "its pid now belongs to another process"
  elif why == "before a restart":
    fields, words = {"pid": os.getppid(), "boot_id": "an-earlier-boot"}, "restarted"
  else:
    fields, words = {"pid": os.getpid()}, "ended without releasing it"
  if why in ("pid reused", "before a restart") and run_lock._boot_id() is None:
    pytest.skip("needs Linux /proc")
  try:
    write_lock(tmp_path, **fields)
    lock = RunLock(str(tmp_path), process_index=0).acquire()
  finally:
    if zombie is not None:
      zombie.wait()
  out = capsys.readouterr().out
  assert f"note: took over {tmp_path}/.lock from pid {fields['pid']} on this host " \
         "(started 2024-01-02 03:04:05 +0000), " in out and words in out, out
  assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
  lock.release()
  assert not (tmp_path / ".lock").exists()


def test_a_lock_of_another_host_is_refused_with_the_fix(tmp_path):
  path = write_lock(tmp_path, host="node-7", pid=dead_pid())
  with pytest.raises(UserError) as e:
    RunLock(str(tmp_path), process_index=0).acquire()
  assert str(e.value) == (
      f"{tmp_path} is in use by a run on host node-7 (pid {json.loads(path.read_text())['pid']}, "
      f"started 2024-01-02 03:04:05 +0000); if that run is gone, delete {path} and run again, "
      "or use another --gin.train.model_dir")
  assert path.exists()


def test_an_unreadable_lock_is_refused_not_taken(tmp_path):
  (tmp_path / ".lock").write_text("garbage")
  with pytest.raises(UserError, match="exists but is not a lock this version can read"):
    RunLock(str(tmp_path), process_index=0).acquire()
  assert (tmp_path / ".lock").read_text() == "garbage"


def test_only_process_0_takes_it(tmp_path):
  lock = RunLock(str(tmp_path), process_index=1).acquire()
  assert not lock.held and not (tmp_path / ".lock").exists()
  assert not lock.release()


def test_release_leaves_a_lock_that_is_no_longer_ours(tmp_path, sleeper):
  lock = RunLock(str(tmp_path), process_index=0).acquire()
  path = write_lock(tmp_path, pid=sleeper.pid, token="theirs")  # taken over meanwhile
  assert not lock.release()
  assert json.loads(path.read_text())["token"] == "theirs"


def _python(code, **kw):
  env = dict(os.environ, PYTHONPATH=REPO)
  return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_released_at_interpreter_exit_without_keeping_it_alive(tmp_path):
  proc = _python(f"""
      from flanjax.training.run_lock import RunLock
      RunLock({str(tmp_path)!r}, process_index=0).acquire()
      print("held")
      """)
  out, err = proc.communicate(timeout=60)
  assert proc.returncode == 0 and out.strip() == "held", err
  assert not (tmp_path / ".lock").exists()


def test_a_killed_holder_leaves_a_lock_the_next_run_takes_over(tmp_path, capsys):
  proc = _python(f"""
      import time
      from flanjax.training.run_lock import RunLock
      RunLock({str(tmp_path)!r}, process_index=0).acquire()
      print("held", flush=True)
      time.sleep(60)
      """)
  assert proc.stdout.readline().strip() == "held"
  with pytest.raises(UserError, match=f"pid {proc.pid}"):
    RunLock(str(tmp_path), process_index=0).acquire()
  proc.kill()
  proc.communicate(timeout=60)
  lock = RunLock(str(tmp_path), process_index=0).acquire()
  assert f"from pid {proc.pid} on this host" in capsys.readouterr().out
  lock.release()


def test_of_processes_started_together_exactly_one_holds_it(tmp_path):
  """Six processes race for one folder, half of them through a stale lock's takeover."""
  write_lock(tmp_path, pid=dead_pid())
  code = f"""
      import sys, time
      from flanjax.errors import UserError
      from flanjax.training.run_lock import RunLock
      time.sleep(max(0.0, {time.time() + 2.0} - time.time()))
      try:
        RunLock({str(tmp_path)!r}, process_index=0).acquire()
      except UserError:
        print("refused", flush=True)
        sys.exit(0)
      print("held", flush=True)
      time.sleep(3)
      """
  procs = [_python(code) for _ in range(6)]
  outs = [p.communicate(timeout=120)[0].strip().splitlines() for p in procs]
  assert sorted(o[-1] for o in outs) == ["held"] + ["refused"] * 5, outs
  # The stale lock was removed once: one note, by whichever process removed it.
  notes = [line for o in outs for line in o if line.startswith("note: took over")]
  assert len(notes) <= 1, outs
  assert not (tmp_path / ".lock").exists()  # the holder released it at exit

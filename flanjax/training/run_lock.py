"""One run per model folder: ``<model_dir>/.lock``, held by the process that trains there.

Two runs writing one folder would interleave their checkpoints and logs. The
lock file is created atomically (complete, or not at all), holds
``{host, pid, started, argv, ...}`` as JSON, and is removed by its holder on
release, at normal interpreter exit, or when the context manager exits.

A lock whose holder is gone is taken over with a note: on this host, a pid
that is no longer running (or is a zombie, or now belongs to a process
started later, or ran before the machine restarted). A lock from another
host cannot be checked from here: it is refused, and the message says to
delete it if that run is gone.

    with RunLock(model_dir, process_index=jax.process_index()):
      ...  # train

In a multi-process run only process 0 takes the lock; the others do nothing.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import os
import socket
import sys
import time
import uuid

from flanjax.errors import UserError

LOCK_NAME = ".lock"

# Lock path -> the RunLock of this process that holds it (released at exit).
_HELD: dict[str, "RunLock"] = {}


def _read_text(path: str) -> str | None:
  try:
    with open(path, encoding="utf-8") as f:
      return f.read()
  except OSError:
    return None


def _boot_id() -> str | None:
  """This boot of the machine (Linux); pids of an earlier boot are all gone."""
  text = _read_text("/proc/sys/kernel/random/boot_id")
  return text.strip() if text else None


def _proc_stat(pid: int) -> tuple[str, int] | None:
  """(state, start time in clock ticks since boot) of a pid, from /proc (Linux); None elsewhere."""
  text = _read_text(f"/proc/{int(pid)}/stat")
  if not text or ")" not in text:
    return None
  fields = text.rsplit(")", 1)[1].split()  # after "pid (comm)"
  try:
    return fields[0], int(fields[19])
  except (IndexError, ValueError):
    return None


def _short(argv) -> str:
  text = " ".join(str(a) for a in argv or ())
  return text if len(text) <= 160 else text[:157] + "..."


class RunLock:
  """The lock of one model folder; see the module docstring.

  model_dir / process_index may be given here or to acquire(). process_index:
  the jax.process_index() of this process (only 0 takes the lock); None is
  jax's if jax is imported, else 0.
  """

  def __init__(self, model_dir: str | None = None, process_index: int | None = None,
               argv=None):
    self.model_dir = model_dir
    self.process_index = process_index
    self.argv = list(sys.argv if argv is None else argv)
    self.path: str | None = None
    self.held = False
    self._token: str | None = None
    self._pid: int | None = None

  # ---------------------------------------------------------------- public

  def acquire(self, model_dir: str | None = None,
              process_index: int | None = None) -> "RunLock":
    """Takes `<model_dir>/.lock` or raises a one-line UserError; returns self."""
    model_dir = model_dir if model_dir is not None else self.model_dir
    if model_dir is None:
      raise ValueError("RunLock.acquire needs a model_dir")
    self.model_dir = os.path.abspath(model_dir)
    if process_index is not None:
      self.process_index = process_index
    if self._process_index() != 0:
      return self  # process 0 holds the lock for the whole run
    if self.held:
      return self
    os.makedirs(self.model_dir, exist_ok=True)
    path = os.path.join(self.model_dir, LOCK_NAME)
    token = uuid.uuid4().hex
    record = self._record(token)
    took_over = None
    for _ in range(20):
      if _create(path, record):
        self.path, self.held, self._token, self._pid = path, True, token, os.getpid()
        _HELD[path] = self
        if took_over:
          print(f"note: took over {path} from {took_over}", flush=True)
        return self
      holder, text = _read_lock(path)
      if text is None:
        continue  # released in between: try again
      if holder is None:
        raise UserError(
            f"{path} exists but is not a lock this version can read ({text[:80]!r}); if no run "
            f"uses {self.model_dir}, delete it and run again, or use another "
            "--gin.train.model_dir")
      gone = self._gone(holder, path)
      if gone is None:
        raise self._busy(holder)
      # The holder is gone: remove its lock, unless another process did (and took it) first.
      with _dir_lock(self.model_dir):
        _, now = _read_lock(path)
        if now == text:
          os.unlink(path)
          took_over = (f"pid {holder.get('pid')} on this host (started "
                       f"{holder.get('started', '?')}), which {gone}")
    raise UserError(f"could not take {path}: other processes keep changing it; make sure only "
                    f"one run uses {self.model_dir}, or use another --gin.train.model_dir")

  def release(self) -> bool:
    """Removes the lock file if this process holds it (it is ours); True if removed."""
    if not self.held or self._pid != os.getpid():
      return False  # not taken, or a forked child: the parent's lock is not ours to drop
    path = self.path
    self.held = False
    if _HELD.get(path) is self:
      del _HELD[path]
    holder, _ = _read_lock(path)
    if holder is None or holder.get("token") != self._token:
      return False  # gone, or taken over by another run meanwhile: leave it
    try:
      os.unlink(path)
    except FileNotFoundError:
      return False
    return True

  def __enter__(self) -> "RunLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()

  # ---------------------------------------------------------------- internals

  def _process_index(self) -> int:
    if self.process_index is not None:
      return int(self.process_index)
    jax = sys.modules.get("jax")
    return int(jax.process_index()) if jax is not None else 0

  def _record(self, token: str) -> dict:
    pid = os.getpid()
    stat = _proc_stat(pid)
    return {"host": socket.gethostname(), "pid": pid,
            "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "argv": self.argv,
            "boot_id": _boot_id(), "pid_start": stat[1] if stat else None, "token": token}

  def _gone(self, holder: dict, path: str) -> str | None:
    """Why the holder of a lock on this host is gone, or None if it may be running."""
    host, pid = holder.get("host"), holder.get("pid")
    if host != socket.gethostname() or not isinstance(pid, int):
      return None
    boot = _boot_id()
    if holder.get("boot_id") and boot and holder["boot_id"] != boot:
      return "ran before this machine restarted"
    if pid == os.getpid():
      if path in _HELD:
        return None  # another RunLock of this very process holds it
      return "is this process, and no longer holds it (a run in it ended without releasing it)"
    try:
      os.kill(pid, 0)
    except ProcessLookupError:
      return "is no longer running"
    except PermissionError:
      return None  # another user's live process
    stat = _proc_stat(pid)
    if stat is not None:
      if stat[0] in ("Z", "X"):
        return "has exited (a zombie)"
      if holder.get("pid_start") is not None and stat[1] != holder["pid_start"]:
        return "is no longer running (its pid now belongs to another process)"
    return None

  def _busy(self, holder: dict) -> UserError:
    host, pid = holder.get("host", "?"), holder.get("pid", "?")
    started = holder.get("started", "?")
    cmd = _short(holder.get("argv"))
    if host != socket.gethostname():
      return UserError(
          f"{self.model_dir} is in use by a run on host {host} (pid {pid}, started {started}); "
          f"if that run is gone, delete {os.path.join(self.model_dir, LOCK_NAME)} and run "
          "again, or use another --gin.train.model_dir")
    return UserError(
        f"{self.model_dir} is in use by another run on this host ({host}, pid {pid}, started "
        f"{started}" + (f": {cmd}" if cmd else "") + f"; lock {self.model_dir}/{LOCK_NAME}); "
        "wait for it, or stop it, or use another --gin.train.model_dir")


def _create(path: str, record: dict) -> bool:
  """Creates `path` holding `record`, atomically and complete; False if it exists."""
  data = (json.dumps(record) + "\n").encode()
  tmp = f"{path}.{record['pid']}.{record['token']}.tmp"
  with open(tmp, "wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  try:
    os.link(tmp, path)  # fails if path exists; readers never see it half-written
    return True
  except FileExistsError:
    return False
  except OSError:
    pass  # a file system without hard links: O_EXCL, then the content
  finally:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
  try:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
  except FileExistsError:
    return False
  with os.fdopen(fd, "wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  return True


def _read_lock(path: str) -> tuple[dict | None, str | None]:
  """(the lock's record or None if it does not parse, its text or None if there is none)."""
  for _ in range(10):
    text = _read_text(path)
    if text is None:
      return None, None
    try:
      rec = json.loads(text)
      return (rec if isinstance(rec, dict) else None), text
    except ValueError:
      time.sleep(0.05)  # an O_EXCL lock whose content is still being written
  return None, text


@contextlib.contextmanager
def _dir_lock(directory: str):
  """An exclusive flock on the folder itself, around taking over a stale lock."""
  fd = os.open(directory, os.O_RDONLY)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX)
    yield
  finally:
    os.close(fd)  # closing drops the flock


def _release_all() -> None:
  for lock in list(_HELD.values()):
    with contextlib.suppress(Exception):
      lock.release()


atexit.register(_release_all)

"""Machine description, timing and small helpers shared by the benchmark sections."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from typing import Callable

import flanjax  # noqa: F401  pylint: disable=unused-import  # its XLA:CPU flags, before JAX starts


def spread(values, digits: int = 3) -> dict:
  """Median, min and max of a figure's windows or rounds."""
  return {"median": round(statistics.median(values), digits),
          "min": round(min(values), digits), "max": round(max(values), digits)}


def _cpuinfo(field: str) -> str | None:
  """The first value of `field` in /proc/cpuinfo (None where there is none)."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith(field):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return None


def cpu_model() -> str:
  return _cpuinfo("model name") or platform.processor() or platform.machine()


def commit() -> str | None:
  """The repository's HEAD commit (with "+changes" when the tree differs from it)."""
  import subprocess  # pylint: disable=g-import-not-at-top
  here = os.path.dirname(os.path.abspath(__file__))
  try:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, text=True,
                          capture_output=True, check=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                           text=True, capture_output=True, check=True).stdout.strip()
    return head + ("+changes" if dirty else "")
  except (OSError, subprocess.CalledProcessError):
    return None


def usable_cores() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


def load() -> list[float]:
  """1, 5 and 15 minute load averages (how busy the machine was)."""
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:
    return []


def machine(torch_threads: int) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top
  import flax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  dev = jax.devices()[0]
  info = {
      "platform": dev.platform,
      "device": getattr(dev, "device_kind", str(dev)),
      "devices": jax.device_count(),
      "cpu": cpu_model(),
      "cores": usable_cores(),
      "memory_gib": _memory_gib(),
      "python": sys.version.split()[0],
      "versions": {"jax": jax.__version__, "jaxlib": jaxlib.__version__,
                   "flax": flax.__version__, "optax": optax.__version__,
                   "torch": torch.__version__, "transformers": transformers.__version__},
      "threads": {
          "torch_intra_op": torch_threads,
          "torch_inter_op": torch.get_num_interop_threads(),
          # XLA:CPU runs each op on an Eigen pool of one thread per core
          # (--xla_cpu_multi_thread_eigen, default on); XLA_FLAGS as set:
          "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "xla_cpu_threads": usable_cores(),
      },
  }
  info["scheduling"] = _scheduling()
  info["cpu_vector_isa"] = _vector_isa()
  import flanjax  # pylint: disable=g-import-not-at-top
  info["huge_pages"] = flanjax.huge_pages_state()
  if dev.platform == "gpu":
    info["torch_cuda"] = bool(torch.cuda.is_available())
  return info


def _scheduling() -> str:
  """This process's scheduling policy: 'real-time ...' when run under chrt, as the README's
  runs were meant to be."""
  try:
    policy = os.sched_getscheduler(0)
  except (AttributeError, OSError):
    return "unknown"
  names = {getattr(os, n): n[6:].lower() for n in ("SCHED_OTHER", "SCHED_FIFO", "SCHED_RR",
                                                   "SCHED_BATCH", "SCHED_IDLE")
           if hasattr(os, n)}
  name = names.get(policy, str(policy))
  if name in ("fifo", "rr"):
    return f"real-time ({name}, priority {os.sched_getparam(0).sched_priority})"
  return name


def _vector_isa() -> list[str]:
  """The CPU's vector extensions from /proc/cpuinfo (AVX2, AVX-512, AMX), for XLA:CPU's choices."""
  flags = set((_cpuinfo("flags") or "").split())
  return sorted(x for x in flags if x in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni",
                                                 "amx_tile", "amx_bf16", "fma"))


def _memory_gib() -> float | None:
  try:
    with open("/proc/meminfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("MemTotal"):
          return round(int(line.split()[1]) / 2**20, 1)
  except OSError:
    pass
  return None


QUIET_LOAD = 0.5  # 1-minute load average (other jobs) under which a machine counts as quiet
QUIET_OTHERS = 0.10  # share of the machine's CPU time other processes may take in a window


def _cpu_ticks() -> tuple[int, int, int, int] | None:
  """(busy ticks of the whole machine, all ticks, this process's own ticks, steal ticks), or
  None. Steal (the 8th field) is time the hypervisor gave to other virtual machines: busy to
  /proc/stat and lost to this one, though no process here used it."""
  try:
    with open("/proc/stat", encoding="utf-8") as f:
      v = [int(x) for x in f.readline().split()[1:]]
    with open("/proc/self/stat", encoding="utf-8") as f:
      own = f.read().rsplit(")", 1)[1].split()
    # idle and iowait are the 4th and 5th fields; utime, stime, cutime, cstime: 12-15 after ')'
    return (sum(v) - v[3] - v[4], sum(v), sum(int(x) for x in own[11:15]),
            v[7] if len(v) > 7 else 0)
  except (OSError, IndexError, ValueError):
    return None


def _others_share(a, b) -> float:
  return max(0.0, ((b[0] - a[0]) - (b[2] - a[2])) / (b[1] - a[1]))


def _steal_share(a, b) -> float:
  """The part of _others_share that was the hypervisor's steal, not a process here."""
  return max(0.0, (b[3] - a[3]) / (b[1] - a[1]))


class Windows:
  """Timed windows of one figure: each window's rate, and how much of the machine
  other processes took meanwhile (/proc/stat's busy time less this process's own; the
  hypervisor's steal counts, and is also given apart), so a figure taken on a busy machine
  says so."""

  def __init__(self):
    self.rates, self.seconds, self.others, self.steal = [], [], [], []
    self.load_before = load()
    self._first = self._last = None  # ticks around all windows, for windows under a tick


  def time(self, fn: Callable, amount: float):
    """Runs fn() as one window; its rate is amount / seconds."""
    a = _cpu_ticks()
    t0 = time.perf_counter()
    out = fn()
    secs = time.perf_counter() - t0
    b = _cpu_ticks()
    if a and b:
      self._first = self._first or a
      self._last = b
      if b[1] > a[1]:
        self.others.append(_others_share(a, b))
        self.steal.append(_steal_share(a, b))
    self.seconds.append(secs)
    self.rates.append(amount / secs)
    return out

  def summary(self) -> dict:
    r = sorted(self.rates)
    n = len(r)
    median = r[n // 2] if n % 2 else (r[n // 2 - 1] + r[n // 2]) / 2
    out = {"median": round(median, 3), "min": round(r[0], 3), "max": round(r[-1], 3),
           "windows": n, "window_rates": [round(x, 3) for x in self.rates],
           "load_before": self.load_before, "load_after": load()}
    if self.others:
      out["others_cpu_share"] = round(max(self.others), 3)
      out["steal_cpu_share"] = round(max(self.steal), 3)
    elif self._first and self._last:
      # Every window was shorter than a clock tick (fast machines, tiny configs): the share
      # over the span of all windows instead; no tick at all means nothing ran measurably.
      a, b = self._first, self._last
      ticked = b[1] > a[1]
      out["others_cpu_share"] = round(_others_share(a, b), 3) if ticked else 0.0
      out["steal_cpu_share"] = round(_steal_share(a, b), 3) if ticked else 0.0
    out["quiet"] = quiet(out)
    return out


def quiet(fig: dict) -> bool:
  """Whether a figure was taken on a quiet machine: other processes took at most
  QUIET_OTHERS of the CPU in every window. (The load average mid-run counts this
  benchmark's own threads; the run's load before it started is checked apart.)"""
  return fig.get("others_cpu_share", 0.0) <= QUIET_OTHERS


def quiet_start(load_start) -> bool:
  return not load_start or load_start[0] <= QUIET_LOAD * max(usable_cores(), 1)


def write_json(path: str | None, result: dict) -> None:
  if path:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=1)


def timed(fn: Callable, sync: Callable = lambda x: x):
  """(result, seconds) of fn(), with sync applied to the result before the clock stops."""
  t0 = time.perf_counter()
  out = sync(fn())
  return out, time.perf_counter() - t0


class Log:
  """Progress lines on stderr (the table goes to stdout)."""

  def __init__(self, quiet: bool = False):
    self.quiet = quiet
    self.t0 = time.perf_counter()

  def __call__(self, msg: str):
    if not self.quiet:
      print(f"[{time.perf_counter() - self.t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

"""Machine description, timing and small helpers shared by the benchmark sections."""

from __future__ import annotations

import os
import platform
import sys
import time
from typing import Callable


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


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
  if dev.platform == "gpu":
    info["torch_cuda"] = bool(torch.cuda.is_available())
  return info


def _memory_gib() -> float | None:
  try:
    with open("/proc/meminfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("MemTotal"):
          return round(int(line.split()[1]) / 2**20, 1)
  except OSError:
    pass
  return None


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

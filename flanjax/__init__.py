"""flanjax: instruction tuning in JAX."""

import os as _os
import sys as _sys


def _xla_cpu_flags() -> None:
  """XLA:CPU without YNNPACK's dots, unless XLA_FLAGS says otherwise.

  jaxlib 0.10's YNNPACK dot kernel segfaults on some shapes (a Llama-style model of
  t5-base's width with LoRA on packed rows crashed in ynn::dot_fp32_*); Eigen's dots are
  as fast on our benchmark steps (docs: benchmarks/README.md). Set before JAX starts its
  backends; a process that started them first keeps what it has.
  """
  import importlib.metadata  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  flags = _os.environ.get("XLA_FLAGS", "")
  if "xla_cpu_experimental_ynn_fusion_type" in flags:
    return  # the user's choice
  try:
    major_minor = tuple(int(x) for x in importlib.metadata.version("jaxlib").split(".")[:2])
  except (importlib.metadata.PackageNotFoundError, ValueError):
    return
  if not (0, 10) <= major_minor < (0, 12):  # the releases known to have the flag
    return
  if "jax" in sys.modules:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    if xla_bridge.backends_are_initialized():
      return
  _os.environ["XLA_FLAGS"] = (flags + " --xla_cpu_experimental_ynn_fusion_type=").strip()


class _NoSklearnForKeras:
  """Refuses `import sklearn` to keras's scikit-learn wrappers, and only to them.

  TensorFlow imports keras, whose wrappers import scikit-learn when it is installed (lm-eval
  installs it): 1.3 s of every flanjax process's start, for wrappers flanjax never uses.
  keras treats it as absent (its wrappers then say scikit-learn is needed); any other
  importer, lm-eval's metrics included, gets it as usual.
  """

  def find_spec(self, name, path=None, target=None):  # pylint: disable=unused-argument
    if name != "sklearn":  # asked of every import the process makes: answer at once
      return None
    frame = _sys._getframe(1)  # pylint: disable=protected-access
    while frame is not None and frame.f_globals.get("__name__", "").startswith("importlib"):
      frame = frame.f_back  # the import system's own frames, up to the importing module
    if frame is not None and frame.f_globals.get("__name__", "").startswith("keras.src.wrappers"):
      raise ModuleNotFoundError("scikit-learn is not imported for keras's wrappers in flanjax",
                                name=name)
    return None


def _keras_without_sklearn() -> None:
  if "keras" not in _sys.modules and not any(isinstance(f, _NoSklearnForKeras)
                                             for f in _sys.meta_path):
    _sys.meta_path.insert(0, _NoSklearnForKeras())


HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"


def huge_pages_state() -> dict:
  """What decides whether a flanjax command runs with transparent huge pages for malloc's
  large blocks: the kernel's THP mode, glibc's version, GLIBC_TUNABLES and the opt-out."""
  try:
    with open("/sys/kernel/mm/transparent_hugepage/enabled", encoding="utf-8") as f:
      thp = f.read().split("[", 1)[1].split("]", 1)[0]
  except (OSError, IndexError):
    thp = None
  try:
    libc = _os.confstr("CS_GNU_LIBC_VERSION") or ""  # 'glibc 2.36'
  except (AttributeError, ValueError, OSError):
    libc = ""
  return {"transparent_hugepage": thp, "libc": libc,
          "glibc_tunables": _os.environ.get("GLIBC_TUNABLES", ""),
          "opt_out": _os.environ.get("FLANJAX_HUGE_PAGES", "") == "0"}


def _glibc_at_least(libc: str, want=(2, 35)) -> bool:
  name, _, version = libc.partition(" ")
  try:
    return name == "glibc" and tuple(int(x) for x in version.split(".")[:2]) >= want
  except ValueError:
    return False


def _is_command(argv) -> bool:
  """`python -m flanjax.<x>` / `-m benchmarks.<x>`, or an installed flanjax-* script."""
  if "-m" in argv[1:]:
    i = argv.index("-m", 1)
    return i + 1 < len(argv) and argv[i + 1].startswith(("flanjax.", "benchmarks."))
  return len(argv) > 1 and _os.path.basename(argv[1]).startswith("flanjax-")


def _huge_pages_for_commands() -> None:
  """Runs a flanjax command again, at once, with glibc's malloc asking for transparent
  huge pages (GLIBC_TUNABLES=glibc.malloc.hugetlb=1) where the kernel gives them on
  request (THP mode 'madvise').

  XLA:CPU allocates each step's temporaries as one block (219 MB for the T5 benchmark's
  step) and frees it after the step; glibc maps and unmaps such blocks, so every step took
  ~54,000 page faults, ~100 ms of kernel time on two cores (scratch measurements). With
  huge pages the faults are ~1% of that and the step's buffers need fewer TLB entries
  (the whole-step A/B: benchmarks/results/variants_huge_pages_*.json). Only a command is run again (its own process, before jax starts
  anything): never a notebook or a library user's process. FLANJAX_HUGE_PAGES=0 or a
  glibc.malloc.hugetlb of one's own in GLIBC_TUNABLES keeps the process as it is.
  """
  if not _sys.platform.startswith("linux"):
    return
  orig = getattr(_sys, "orig_argv", None)
  if not orig or not _sys.executable or not _is_command(orig) or "jax" in _sys.modules:
    return
  state = huge_pages_state()
  if (state["opt_out"] or state["transparent_hugepage"] != "madvise"
      or "glibc.malloc.hugetlb" in state["glibc_tunables"]
      or not _glibc_at_least(state["libc"])):
    return
  env = dict(_os.environ)
  env["GLIBC_TUNABLES"] = ":".join(t for t in (state["glibc_tunables"], HUGE_PAGES_TUNABLE) if t)
  for stream in (_sys.stdout, _sys.stderr):
    try:
      stream.flush()
    except (AttributeError, OSError, ValueError):
      pass
  try:
    _os.execve(_sys.executable, [_sys.executable] + list(orig[1:]), env)
  except OSError:
    return  # the command goes on as it is: slower, not wrong


_huge_pages_for_commands()
_xla_cpu_flags()
_keras_without_sklearn()

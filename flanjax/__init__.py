"""flanjax: instruction tuning in JAX."""

import os as _os


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


_xla_cpu_flags()

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


_xla_cpu_flags()
_keras_without_sklearn()

"""Import structure: no cycles between flanjax's modules, and light modules stay light."""

import os
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO

TOOL = str(REPO / "tools" / "import_cycles.py")


def _tool(*argv):
  return subprocess.run([sys.executable, TOOL, *argv], capture_output=True, text=True,
                        cwd=REPO, timeout=120)


def test_no_module_level_import_cycle():
  out = _tool()
  assert out.returncode == 0, out.stdout + out.stderr
  assert " 0 module-level cycles" in out.stdout


def test_no_import_cycle_in_flanjax_even_through_lazy_imports():
  out = _tool("--strict")
  assert out.returncode == 0, out.stdout + out.stderr


def test_no_import_cycle_in_the_data_package_even_through_lazy_imports():
  out = _tool("--within", "flanjax.data", "--strict")
  assert out.returncode == 0, out.stdout + out.stderr
  assert "0 module-level cycles, 0 through lazy imports" in out.stdout


@pytest.mark.parametrize("module", ["flanjax.data", "flanjax.data.packing",
                                    "flanjax.data.templates", "flanjax.data.cache"])
def test_light_modules_import_no_tensorflow_seqio_or_jax(module):
  code = textwrap.dedent(f"""
      import sys
      import {module}
      heavy = sorted(m for m in ("tensorflow", "seqio", "jax") if m in sys.modules)
      assert not heavy, heavy
  """)
  env = dict(os.environ, PYTHONPATH=str(REPO))
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                       env=env, timeout=120)
  assert out.returncode == 0, out.stderr


def test_the_data_package_still_offers_the_registry_functions():
  from flanjax import data
  from flanjax.data import registry
  assert (data.list_tasks, data.list_mixtures, data.register_all) == (
      registry.list_tasks, registry.list_mixtures, registry.register_all)
  with pytest.raises(AttributeError):
    data.no_such_name  # pylint: disable=pointless-statement


def _package(tmp_path, files):
  root = tmp_path / "pkg"
  for name, text in files.items():
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
  return str(root)


def test_the_tool_lists_lazy_cycles_as_info_and_skips_type_checking_imports(tmp_path):
  root = _package(tmp_path, {
      "__init__.py": "",
      "one.py": "from pkg import two\n",
      "two.py": "def f():\n  from pkg import one\n",
      # Would be a module-level cycle if TYPE_CHECKING imports counted.
      "three.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n  from pkg import four\n",
      "four.py": "from pkg import three\n",
  })
  out = _tool("--package_dir", root)
  assert out.returncode == 0, out.stdout
  assert "info: import cycle through a function-level import: pkg.one -> pkg.two -> pkg.one" \
      in out.stdout
  assert "two.py:2: pkg.two imports pkg.one (in a function)" in out.stdout
  assert "pkg.three" not in out.stdout and "error" not in out.stdout
  strict = _tool("--package_dir", root, "--strict")
  assert strict.returncode == 1 and "error: import cycle through a function-level" in strict.stdout


def test_the_tool_finds_a_module_level_cycle(tmp_path):
  root = _package(tmp_path, {
      "__init__.py": "",
      "a.py": "import pkg.b\n",
      "b.py": "class X:\n  from pkg.c import y\n",
      "c.py": "try:\n  from . import a\nexcept ImportError:\n  pass\n",
  })
  out = _tool("--package_dir", root)
  assert out.returncode == 1
  assert "error: import cycle at module level: pkg.a -> pkg.b -> pkg.c -> pkg.a" in out.stdout
  assert "b.py:2: pkg.b imports pkg.c" in out.stdout


_DOT_HLO = textwrap.dedent("""
    import os, flanjax, jax, jax.numpy as jnp
    f = jax.jit(lambda a, b: a @ b).lower(jnp.ones((256, 128)), jnp.ones((128, 512)))
    print(os.environ.get("XLA_FLAGS", ""))
    print("__ynn_fusion" in f.compile().as_text())
""")


@pytest.mark.parametrize("user_flags,ynn", [
    ("", False),  # flanjax turns YNNPACK's dots off (their segfault; Eigen's are as fast)
    ("--xla_cpu_experimental_ynn_fusion_type=individual_dot", True),  # the user's choice
])
def test_importing_flanjax_sets_xla_cpu_dots_unless_the_user_did(user_flags, ynn):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=user_flags)
  out = subprocess.run([sys.executable, "-c", _DOT_HLO], capture_output=True, text=True,
                       cwd=REPO, env=env, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  flags, has_ynn = out.stdout.strip().splitlines()[-2:]
  assert has_ynn == str(ynn), (flags, out.stdout)
  assert flags.count("xla_cpu_experimental_ynn_fusion_type") == 1, flags


def test_tensorflows_keras_starts_without_sklearn_and_others_still_get_it():
  """keras's scikit-learn wrappers are refused sklearn (1.3 s of every start); nobody else is."""
  code = textwrap.dedent("""
      import sys
      import flanjax.train
      import keras
      assert "keras.src.wrappers.sklearn_wrapper" in sys.modules  # keras got that far
      assert "sklearn" not in sys.modules, "keras imported scikit-learn"
      from keras.src.wrappers import fixes, sklearn_wrapper
      assert fixes.sklearn is None and sklearn_wrapper.sklearn is None
      from sklearn.metrics import f1_score  # anyone else: the real package
      assert f1_score([1, 0, 1], [1, 0, 0]) == 2 / 3
  """)
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                       env=env, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]

"""What an installed flanjax carries: the wheel holds every module, the gin files
(top-level gin_configs/, installed as flanjax/gin_configs) and the template data,
and bare gin names resolve from a checkout and from an unpacked wheel alike."""

import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

from flanjax import config

REPO = pathlib.Path(__file__).resolve().parents[1]
GIN_SRC = REPO / "gin_configs"


def _files(root: pathlib.Path, skip_py: bool = False) -> list:
  """Relative paths of the files under root, without caches."""
  out = []
  for d, dirs, fs in os.walk(root):
    dirs[:] = [x for x in dirs if x != "__pycache__"]
    for f in fs:
      if f.endswith((".pyc", ".pyo")) or (skip_py and f.endswith(".py")):
        continue
      out.append(pathlib.Path(d, f).relative_to(root).as_posix())
  return sorted(out)


def _gin_files() -> list:
  return [f for f in _files(GIN_SRC) if f.endswith(".gin")]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> pathlib.Path:
  """A wheel built offline from a copy of the project (the build writes build/
  and *.egg-info into its source folder; a copy keeps the working tree clean)."""
  tmp = tmp_path_factory.mktemp("wheel")
  src = tmp / "src"
  src.mkdir()
  for entry in REPO.iterdir():  # every top-level file: pyproject, README, any setup.*
    if entry.is_file():
      shutil.copy2(entry, src / entry.name)
  ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
  for folder in ("flanjax", "gin_configs"):
    shutil.copytree(REPO / folder, src / folder, ignore=ignore)
  out = tmp / "dist"
  proc = subprocess.run(
      [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
       "--no-index", "-q", "-w", str(out), str(src)],
      capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  wheels = list(out.glob("flanjax-*.whl"))
  assert len(wheels) == 1, wheels
  return wheels[0]


@pytest.fixture(scope="module")
def wheel_names(wheel) -> set:
  with zipfile.ZipFile(wheel) as z:
    return set(z.namelist())


def test_gin_configs_live_at_the_top_level():
  assert (GIN_SRC / "flan.gin").is_file()
  assert not (REPO / "flanjax" / "gin_configs").exists()
  assert len(_gin_files()) >= 2


def test_wheel_holds_every_gin_file(wheel_names):
  assert "flanjax/gin_configs/flan.gin" in wheel_names
  missing = [f for f in _gin_files() if f"flanjax/gin_configs/{f}" not in wheel_names]
  assert not missing, f"gin files left out of the wheel: {missing}"


def test_wheel_holds_every_template(wheel_names):
  templates = [f for f in _files(REPO / "flanjax" / "data" / "template_data")
               if f.endswith(".json")]
  assert templates
  missing = [f for f in templates
             if f"flanjax/data/template_data/{f}" not in wheel_names]
  assert not missing, f"templates left out of the wheel: {missing}"


def test_wheel_holds_every_module_and_data_file(wheel_names):
  # A new subpackage must be added to [tool.setuptools] packages in pyproject.toml;
  # a new data file (not .py) to [tool.setuptools.package-data].
  missing = [f for f in _files(REPO / "flanjax") if f"flanjax/{f}" not in wheel_names]
  assert not missing, f"files under flanjax/ left out of the wheel: {missing}"
  stray = sorted(n for n in wheel_names
                 if not n.startswith(("flanjax/", "flanjax-")))
  assert not stray, f"files outside the package in the wheel: {stray}"


@pytest.mark.parametrize("name", _gin_files())
def test_bare_gin_names_resolve(name, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # not the repository
  want = (GIN_SRC / name).read_text()
  for bare in (name, name[:-len(".gin")]):
    path = config.resolve_gin_file(bare)
    assert os.path.samefile(path, os.path.join(config.PACKAGED_GIN_DIR, name))
    assert pathlib.Path(path).read_text() == want


def test_unpacked_wheel_resolves_bare_names_and_includes(wheel, tmp_path):
  # As after a non-editable `pip install .`: the package from the wheel, run
  # from another directory; flan.gin's `include 'models/tiny.gin'` must resolve.
  site = tmp_path / "site"
  with zipfile.ZipFile(wheel) as z:
    z.extractall(site)
  # Only config and the template loader are imported, not the trainer, so this
  # checks the packaging alone; a stand-in T5Config collects the bindings of
  # models/tiny.gin, which flan.gin includes.
  script = (
      "import os, gin\n"
      "from flanjax import config\n"
      "from flanjax.data import tasks\n"
      "site = os.environ['SITE']\n"
      "assert config.__file__.startswith(site), config.__file__\n"
      "assert config.PACKAGED_GIN_DIR == os.path.join(site, 'flanjax', 'gin_configs'), "
      "config.PACKAGED_GIN_DIR\n"
      "assert tasks.TEMPLATE_DIR.startswith(site), tasks.TEMPLATE_DIR\n"
      "assert tasks.load_templates('nli')\n"
      "t5 = gin.external_configurable(lambda **kw: kw, 'T5Config')\n"
      "for p in config.search_paths([]):\n"
      "  gin.add_config_file_search_path(p)\n"
      "path = config.resolve_gin_file('flan.gin')\n"
      "assert path == os.path.join(config.PACKAGED_GIN_DIR, 'flan.gin'), path\n"
      "gin.parse_config_file(path, skip_unknown=True)\n"
      "assert t5().get('num_heads') == 4, t5()\n"
      "print('ok')\n")
  env = dict(os.environ, SITE=str(site), PYTHONPATH=str(site))
  run_dir = tmp_path / "elsewhere"
  run_dir.mkdir()
  proc = subprocess.run([sys.executable, "-c", script], cwd=run_dir, env=env,
                        capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), (
      proc.stdout[-3000:] + proc.stderr[-3000:])

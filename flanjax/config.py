"""Command-line gin handling shared by train, evaluate and infer.

    --gin_file=flan.gin          repeatable; a bare name resolves against the
                                 search paths, then the packaged gin_configs/
    --gin.train.num_steps=100    one binding (any --gin.X=Y)
    --gin_bindings='a.b = 1'     one binding in gin syntax (repeatable)
    --gin_search_paths=a,b       extra folders for gin files and includes
"""

from __future__ import annotations

import ast
import collections.abc
import dataclasses
import errno
import io
import logging
import os
import sys
from typing import Sequence

import gin

from flanjax.errors import UserError


def whole_number(low: int = 1):
  """An argparse type: a whole number of at least `low` (a count, a size, a length), so a
  0 or a negative one is a one-line usage error, not a traceback or an empty run."""
  def parse(text: str) -> int:
    import argparse  # pylint: disable=g-import-not-at-top
    try:
      value = int(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < low:
      raise argparse.ArgumentTypeError(f"{value} is below {low}; give {low} or more")
    return value
  return parse


def _packaged_gin_dir() -> str:
  """The gin_configs/ folder that bare --gin_file names resolve against.

  The files live at the repository's top level (gin_configs/); an installed
  package (`pip install .`) carries them as flanjax/gin_configs (pyproject.toml
  maps the one to the other). A source checkout or an editable install has no
  flanjax/gin_configs, so the top-level folder beside the package is used.
  """
  package = os.path.dirname(os.path.abspath(__file__))
  installed = os.path.join(package, "gin_configs")
  if os.path.isfile(os.path.join(installed, "flan.gin")):
    return installed
  checkout = os.path.join(os.path.dirname(package), "gin_configs")
  if os.path.isfile(os.path.join(checkout, "flan.gin")):
    return checkout
  return installed  # neither holds them: the error then names the installed place


PACKAGED_GIN_DIR = _packaged_gin_dir()


@dataclasses.dataclass
class GinArgs:
  files: list
  bindings: list
  search_paths: list
  rest: list  # arguments that are not gin's


def parse_args(argv: Sequence[str]) -> GinArgs:
  files, bindings, paths, rest = [], [], [], []
  args = list(argv)
  i = 0

  def value(flag):
    nonlocal i
    arg = args[i]
    if "=" in arg:
      return arg.split("=", 1)[1]
    if i + 1 >= len(args):
      raise UserError(f"{flag} needs a value")
    i += 1
    return args[i]

  while i < len(args):
    arg = args[i]
    if arg == "--gin_file" or arg.startswith("--gin_file="):
      files.append(value("--gin_file"))
    elif arg == "--gin_bindings" or arg.startswith("--gin_bindings="):
      bindings.append(value("--gin_bindings"))
    elif arg == "--gin_search_paths" or arg.startswith("--gin_search_paths="):
      paths.extend(p for p in value("--gin_search_paths").split(",") if p)
    elif arg.startswith("--gin."):
      body = arg[len("--gin."):]
      if "=" not in body:
        raise UserError(f"{arg}: a binding needs a value, e.g. --gin.train.num_steps=100")
      key, val = body.split("=", 1)
      bindings.append(f"{key} = {_gin_value(val)}")
    else:
      rest.append(arg)
    i += 1
  return GinArgs(files, bindings, paths, rest)


def _gin_value(text: str) -> str:
  """A command-line value in gin syntax; a bare word becomes a string.

  So --gin.train.model_dir=/tmp/run works without shell-quoted quotes, while
  numbers, lists, 'strings', @references and %MACROS pass through unchanged.
  """
  stripped = text.strip()
  if not stripped or stripped[0] in "@%[({'\"":
    return text
  try:
    ast.literal_eval(stripped)
    return text
  except (ValueError, SyntaxError):
    return repr(stripped)


class _DropGinPathNoise(logging.Filter):
  # gin logs an ERROR for every search path that lacks an included file, even
  # when a later one has it.
  def filter(self, record):
    return not str(record.msg).startswith("Path not found")


def search_paths(extra: Sequence[str]) -> list:
  return [os.path.abspath(p) for p in extra] + [PACKAGED_GIN_DIR]


def resolve_gin_file(name: str, extra_paths: Sequence[str] = ()) -> str:
  """A path as given if it exists, else the first search path that holds it."""
  if os.path.isfile(name):
    return os.path.abspath(name)
  tried = []
  for base in search_paths(extra_paths):
    for candidate in (name, name + ".gin"):
      path = os.path.join(base, candidate)
      tried.append(base)
      if os.path.isfile(path):
        return path
  available = sorted(
      os.path.relpath(os.path.join(d, f), PACKAGED_GIN_DIR)
      for d, _, fs in os.walk(PACKAGED_GIN_DIR) for f in fs if f.endswith(".gin"))
  raise UserError(
      f"gin file {name!r} not found (looked in the current directory and "
      f"{', '.join(dict.fromkeys(tried))}); packaged configs: {', '.join(available)}")


def _one_line(err: Exception) -> str:
  # gin appends "In call to configurable ..." lines to errors raised inside
  # configurables; the user needs the message, not gin's call chain.
  text = " ".join(line.strip() for line in str(err).splitlines()
                  if line.strip() and not line.strip().startswith("In call to configurable"))
  return text or type(err).__name__


def _guard_gin_package_reader() -> None:
  """gin also looks for an include such as 'models/tiny.gin' as a file of a Python package
  named `models`; a plain folder of that name where the command runs (on sys.path under
  `python -m`) is a namespace package without a file, and gin's check then raises a
  TypeError instead of answering no, so the default job failed in any folder holding
  `models/` or `runs/`. The check answers no for any such error."""
  readers = getattr(gin.config, "_FILE_READERS", None)
  if not readers:
    return
  for k, (reader, exists) in enumerate(readers):
    if getattr(exists, "_flanjax_guarded", False) or exists is os.path.isfile:
      continue

    def guarded(path, _exists=exists):
      try:
        return bool(_exists(path))
      except Exception:  # pylint: disable=broad-except
        return False

    guarded._flanjax_guarded = True  # pylint: disable=protected-access
    readers[k] = (reader, guarded)


# The gin files read by the parse_gin under way (real paths); None outside one.
_READ_ONCE: set | None = None


def _include_once() -> None:
  """Each gin file is read once per parse: `--gin_file=runs/finetune_llama.gin
  --gin_file=runs/user_data.gin` both include flan.gin, and a second reading of it would
  set back what the first file set over it (its optimizer, learning rate, z-loss), so
  the result would hang on the order of the files. A file met again reads as empty."""
  readers = getattr(gin.config, "_FILE_READERS", None)
  if not readers:
    return
  for k, (reader, exists) in enumerate(readers):
    if getattr(reader, "_flanjax_once", False):
      continue

    def once(path, _reader=reader):
      if _READ_ONCE is not None:
        real = os.path.realpath(path)
        if real in _READ_ONCE:
          return io.StringIO("")
        _READ_ONCE.add(real)
      return _reader(path)

    once._flanjax_once = True  # pylint: disable=protected-access
    readers[k] = (once, exists)


def parse_gin(args: GinArgs, finalize: bool = True) -> list:
  """Parses files then bindings; every gin problem becomes one UserError. Each file is
  read once, however many of the files include it."""
  global _READ_ONCE
  gin.clear_config()
  _guard_gin_package_reader()
  _include_once()
  _READ_ONCE = set()
  try:
    return _parse_gin(args, finalize)
  finally:
    _READ_ONCE = None


def _parse_gin(args: GinArgs, finalize: bool) -> list:
  logging.getLogger().addFilter(_DropGinPathNoise())
  for p in search_paths(args.search_paths):
    gin.add_config_file_search_path(p)
  paths = [resolve_gin_file(f, args.search_paths) for f in args.files]
  # One at a time, so the message names the file or binding at fault.
  # Whatever gin raises here comes from the user's files or flags.
  for path in paths:
    try:
      gin.parse_config_file(path)
    except Exception as e:  # pylint: disable=broad-except
      raise UserError(f"gin file {path}: {_one_line(e)}") from None
  for binding in args.bindings:
    try:
      gin.parse_config(binding)
    except Exception as e:  # pylint: disable=broad-except
      raise UserError(f"gin binding {binding!r}: {_one_line(e)}") from None
  if finalize:
    try:
      gin.finalize()
    except Exception as e:  # pylint: disable=broad-except
      raise UserError(f"gin: {_one_line(e)}") from None
  return paths


# Errors of the machine, not of the program: a full disk, a read-only or
# vanished folder, no permission. They get one line too (exit 1).
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES,
                      errno.EPERM, errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EIO}


def _environment_error(e: BaseException) -> OSError | None:
  """`e`, or the error it was raised from, when it is an OSError of the machine. gin
  re-raises an error inside a configurable as a copy without its errno and filename; the
  original is its __context__."""
  for _ in range(8):
    if isinstance(e, OSError) and e.errno in ENVIRONMENT_ERRNOS:
      return e
    e = e.__cause__ or e.__context__
    if e is None:
      return None
  return None


def _guarded(fn, prog: str):
  """Runs fn(); a UserError becomes one line on stderr and exit 2, never a traceback.

  An OSError of the environment (disk full, no permission, a missing path)
  becomes one line naming the path, and exit 1.
  """
  try:
    return fn()
  except UserError as e:
    print(f"{prog}: error: {_one_line(e)}", file=sys.stderr)
    sys.exit(2)
  except OSError as e:
    env = _environment_error(e)
    if env is None:
      raise
    e = env
    where = f" ({e.filename})" if e.filename else ""
    print(f"{prog}: error: {e.strerror}{where}; free disk space or fix the path or its "
          "permissions, then run again (checkpoints already complete are kept)", file=sys.stderr)
    sys.exit(1)
  except KeyboardInterrupt:
    print(f"{prog}: interrupted", file=sys.stderr)
    sys.exit(130)


def run_main(main_fn, argv=None, require_gin_file=True):
  """Parses gin from argv and calls main_fn(rest_args); user errors -> one line, exit 2."""
  argv = sys.argv[1:] if argv is None else argv
  prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "flanjax"

  def run():
    args = parse_args(argv)
    if args.rest:
      raise UserError(f"unknown arguments {args.rest}; use --gin_file, --gin.X=Y, "
                      "--gin_bindings, --gin_search_paths")
    if require_gin_file and not args.files:
      raise UserError("no --gin_file given; try --gin_file=flan.gin")
    parse_gin(args)
    return main_fn(args)

  return _guarded(run, prog)


def run_plain_main(main_fn, prog: str, argv=None):
  """For argparse tools: user errors -> one line on stderr, exit 2, no traceback."""
  _guarded(lambda: sys.exit(main_fn(argv)), prog)


def run_gin_command(run_fn, prog: str, argv=None):
  """An argparse command that also takes gin flags (--gin.DecodeConfig.top_p=0.9,
  --gin_file): gin parsed first, run_fn(the other arguments) -> exit code."""
  argv = sys.argv[1:] if argv is None else argv

  def go():
    gin_args = parse_args(argv)
    parse_gin(gin_args)
    return run_fn(gin_args.rest)

  run_plain_main(lambda _: go(), prog, argv)


def bound_value(selector: str, deep: bool = False):
  """The value gin binds to `selector`, macros followed (deep: also those inside lists,
  tuples and dicts); None if it, or a macro it names, is unbound."""
  try:
    return _macros_followed(gin.query_parameter(selector), deep)
  except ValueError:
    return None


def _macros_followed(value, deep: bool, depth: int = 0):
  if depth > 8:  # macros may name macros, but not forever
    return value
  if isinstance(value, gin.config.ConfigurableReference) and str(value).startswith("%"):
    return _macros_followed(gin.query_parameter(str(value)), deep, depth + 1)
  if deep and isinstance(value, collections.abc.Mapping):
    return {k: _macros_followed(v, deep, depth + 1) for k, v in value.items()}
  if deep and isinstance(value, (list, tuple)):
    return type(value)(_macros_followed(v, deep, depth + 1) for v in value)
  return value


def _hard_exit(code: int) -> None:
  """Ends the process now: a failed run must not linger (on a TPU slice, holding the
  hardware) because a prefetch thread or an asynchronous save keeps the interpreter up."""
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except Exception:  # pylint: disable=broad-except
      pass
  os._exit(code)  # pylint: disable=protected-access


# The compiled-program cache of the commands' processes: $FLANJAX_COMPILATION_CACHE (a folder,
# or "off"), else <the data cache>/xla. A user's own JAX_COMPILATION_CACHE_DIR is kept.
COMPILATION_CACHE_ENV = "FLANJAX_COMPILATION_CACHE"
COMPILATION_CACHE_MAX_BYTES = 2 << 30  # least recently used entries go first beyond this


def compilation_cache_dir() -> str | None:
  """The folder the commands cache compiled XLA programs in; None when turned off."""
  value = os.environ.get(COMPILATION_CACHE_ENV, "").strip()
  if value.lower() in ("off", "0", "false", "no", "none"):
    return None
  if value:
    return os.path.abspath(os.path.expanduser(value))
  # The data caches' folder (flanjax.data.cache.default_cache_dir, empty counting as unset),
  # read here from the environment: importing the data package from here, even inside this
  # function, would make an import cycle (tests/test_imports.py); a test keeps the two equal.
  data_cache = os.environ.get("FLANJAX_CACHE", "").strip() or os.path.join(
      os.path.expanduser("~"), ".cache", "flanjax")
  return os.path.join(data_cache, "xla")


def enable_compilation_cache() -> str | None:
  """Turns on JAX's persistent compilation cache for this process; returns its folder.

  A run resumed, a second run of the same shapes, evaluation after training in
  another process: each takes its train, eval and decode steps from disk instead of
  compiling them again (a tiny T5's start: 32 s -> 21 s on 2 cores). Only process 0
  of a multi-host run writes (JAX's rule). The size cap turns on JAX's file lock, so
  processes sharing the folder never read an entry another is writing. A folder that
  cannot be written leaves the cache off, with one line saying so. Called before any
  compile: JAX decides on its first compile whether the process uses a cache.
  """
  if "jax" not in sys.modules:
    return None  # a command that never imports JAX (plot, analyze) compiles nothing
  import jax  # pylint: disable=g-import-not-at-top
  if jax.config.jax_compilation_cache_dir:  # JAX_COMPILATION_CACHE_DIR: the user's own
    return jax.config.jax_compilation_cache_dir
  path = compilation_cache_dir()
  if path is None:
    return None
  try:
    os.makedirs(path, exist_ok=True)
    writable = os.access(path, os.W_OK | os.X_OK)
  except OSError:
    writable = False
  if not writable:
    print(f"compilation cache off: {path} cannot be written (set {COMPILATION_CACHE_ENV} "
          "to another folder, or to off)", file=sys.stderr)
    return None
  jax.config.update("jax_compilation_cache_dir", path)
  if "JAX_COMPILATION_CACHE_MAX_SIZE" not in os.environ:
    jax.config.update("jax_compilation_cache_max_size", COMPILATION_CACHE_MAX_BYTES)
  return path


def as_command(main_fn, argv=None) -> None:
  """Runs a command's main() as a process: any failure, expected or not, ends the process
  at once with a non-zero code (a traceback first for an unexpected one). Compiled
  programs are cached on disk for the next process (enable_compilation_cache)."""
  import traceback  # pylint: disable=g-import-not-at-top
  try:
    enable_compilation_cache()
    main_fn(argv)
  except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    if code:
      _hard_exit(code)
    raise
  except BaseException:  # pylint: disable=broad-except
    traceback.print_exc()
    _hard_exit(1)


# Public names for the other commands (lm_eval adapter, benchmarks, loading).
guarded = _guarded
one_line = _one_line

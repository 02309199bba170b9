"""Caches of the data package: on disk (tokenized splits, vocabularies) and in process.

On disk, an entry is written under a temporary name, flushed, then renamed, so
a reader never sees half of one; and it carries the size and SHA-256 of its
files, checked on read, so an entry damaged anyway (a full disk, a copy cut
short, a bad sector) is rebuilt with a one-line note instead of read as data.

In process, the readers' memoized results (``in_process``) are cleared
together by ``clear_caches()``: after a data file is replaced in place, or in
tests.

Depends on nothing but the standard library: every data module may use it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from typing import Callable, Mapping, Sequence

MANIFEST_VERSION = 1


def default_cache_dir() -> str:
  """$FLANJAX_CACHE, else ~/.cache/flanjax. Set but empty counts as unset: an empty path
  would put the caches in the working directory (a repository's checkout, say)."""
  value = os.environ.get("FLANJAX_CACHE", "").strip()
  return value or os.path.join(os.path.expanduser("~"), ".cache", "flanjax")


# ------------------------------------------------------------------ on disk

class Damaged(Exception):
  """A cache entry that cannot be trusted; the message says why (one line)."""


def sha256_file(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def fsync_file(path: str) -> None:
  with open(path, "rb") as f:
    os.fsync(f.fileno())


def write_atomic(path: str, data: bytes) -> None:
  """Writes `data` to `path` through a temporary file and a rename: all or nothing."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  try:
    with open(tmp, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def manifest(folder: str, files: Sequence[str], **extra) -> dict:
  """Size and SHA-256 of `files` (names inside `folder`), plus `extra` fields."""
  return dict(extra, manifest=MANIFEST_VERSION, files={
      name: {"size": os.path.getsize(os.path.join(folder, name)),
             "sha256": sha256_file(os.path.join(folder, name))} for name in files})


def read_manifest(path: str) -> dict:
  """The manifest written to `path`, checked against the files beside it; raises Damaged."""
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise Damaged(f"{os.path.basename(path)} is unreadable ({type(e).__name__})") from None
  if not isinstance(data, dict) or data.get("manifest") != MANIFEST_VERSION \
      or not isinstance(data.get("files"), Mapping):
    raise Damaged(f"{os.path.basename(path)} is not a manifest")
  check_files(os.path.dirname(path), data["files"])
  return data


def check_files(folder: str, files: Mapping[str, Mapping]) -> None:
  """Raises Damaged unless every file has the size and SHA-256 recorded."""
  for name, want in files.items():
    p = os.path.join(folder, name)
    try:
      size = os.path.getsize(p)
    except OSError:
      raise Damaged(f"{name} is missing") from None
    if not isinstance(want, Mapping) or size != want.get("size"):
      raise Damaged(f"{name} has {size} bytes, {want.get('size') if isinstance(want, Mapping) else '?'}"
                    " were written")
    if sha256_file(p) != want.get("sha256"):
      raise Damaged(f"{name} does not match its checksum")


def note_damaged(what: str, path: str, why: str) -> None:
  print(f"cache: {what}: the cached entry {path} is damaged ({why}); rebuilding it", flush=True)


# ------------------------------------------------------------------ in process

_CLEARERS: list[Callable[[], None]] = []


def in_process(fn):
  """functools.lru_cache(maxsize=None) whose entries ``clear_caches()`` drops."""
  cached = functools.lru_cache(maxsize=None)(fn)
  _CLEARERS.append(cached.cache_clear)
  return cached


def in_process_dict() -> dict:
  """A dict memo that ``clear_caches()`` empties."""
  memo: dict = {}
  _CLEARERS.append(memo.clear)
  return memo


def clear_caches() -> None:
  """Forgets every in-process cache of the data package (read files, rendered and
  tokenized splits, templates); what is on disk stays and is read again."""
  for clear in _CLEARERS:
    clear()

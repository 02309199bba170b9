"""Reading records from local files, with bad records reported, never passed over.

Every reader yields ``(where, record)`` pairs, ``where`` being ``"file:line"``.
A bad record (malformed line, missing or empty field, bytes that are not
UTF-8) either stops the run with a one-line message naming file, line and fix,
or is counted and skipped, by the ``bad_records`` setting. Skips are summed in
a ``ReadReport`` that the caller prints, so nothing is dropped silently.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import glob
import json
import logging
import os
from typing import Iterator, Sequence

import gin

from flanjax.errors import UserError

POLICIES = ("raise", "skip")


@gin.configurable
def bad_records(policy: str = "raise") -> str:
  """What a malformed record does: 'raise' stops the run, 'skip' counts it and goes on."""
  if policy not in POLICIES:
    raise UserError(f"bad_records.policy must be one of {POLICIES}, not {policy!r}")
  return policy


class BadRecord(UserError):
  """A record that cannot be used; the message names file, line and fix."""


@dataclasses.dataclass
class ReadReport:
  """What one read kept and skipped, by reason."""
  path: str
  kept: int = 0
  skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  first: dict = dataclasses.field(default_factory=dict)  # reason -> first message

  @property
  def num_skipped(self) -> int:
    return sum(self.skipped.values())

  def summary(self) -> str:
    if not self.skipped:
      return f"{self.path}: {self.kept} records"
    parts = [f"{n} {reason} (first: {self.first[reason]})"
             for reason, n in sorted(self.skipped.items())]
    return f"{self.path}: {self.kept} records kept, {self.num_skipped} skipped: " + "; ".join(parts)


class Reader:
  """Applies the bad-record policy and keeps the report for one file."""

  def __init__(self, path: str, policy: str | None = None):
    self.path = path
    self.policy = policy or bad_records()
    self.report = ReadReport(path)

  def bad(self, where: str, reason: str, detail: str, fix: str) -> None:
    msg = f"{where}: {detail}; {fix}"
    if self.policy == "raise":
      raise BadRecord(msg + " (or bind bad_records.policy='skip' to count and skip such records)")
    self.report.skipped[reason] += 1
    self.report.first.setdefault(reason, msg)

  def done(self) -> ReadReport:
    if self.report.skipped:
      logging.warning("%s", self.report.summary())
      print(f"data: {self.report.summary()}", flush=True)
    if not self.report.kept:
      raise UserError(f"{self.path}: no usable records"
                      + (f" ({self.report.num_skipped} skipped as bad)" if self.report.skipped else "")
                      + "; check the file and its format")
    return self.report


def check_file(path: str) -> None:
  """A UserError unless `path` is a non-empty file."""
  if not os.path.exists(path):
    raise UserError(f"{path} does not exist; give the path of an existing data file")
  if os.path.isdir(path):
    raise UserError(f"{path} is a folder; give a file (folders are for NIv2 task sets)")
  if os.path.getsize(path) == 0:
    raise UserError(f"{path} is empty; it holds no records")


def _lines(reader: Reader) -> Iterator[tuple[int, str]]:
  with open(reader.path, "rb") as f:
    for n, raw in enumerate(f, 1):
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        reader.bad(f"{reader.path}:{n}", "non-UTF-8 lines",
                   f"bytes that are not UTF-8 at column {e.start + 1}",
                   "re-encode the file as UTF-8")
        continue
      yield n, line.rstrip("\r\n")


def read_jsonl(reader: Reader) -> Iterator[tuple[str, dict]]:
  """One JSON object per line; blank lines are allowed."""
  check_file(reader.path)
  for n, line in _lines(reader):
    if not line.strip():
      continue
    where = f"{reader.path}:{n}"
    try:
      rec = json.loads(line)
    except json.JSONDecodeError as e:
      reader.bad(where, "malformed JSON lines", f"not valid JSON ({e.msg} at column {e.colno})",
                 "fix or remove that line")
      continue
    if not isinstance(rec, dict):
      reader.bad(where, "non-object lines", f"a JSON {type(rec).__name__}, not an object",
                 "write one JSON object per line")
      continue
    yield where, rec


def read_json_or_jsonl(reader: Reader) -> Iterator[tuple[str, dict]]:
  """A JSON array of objects (Alpaca's own files) or JSON lines."""
  check_file(reader.path)
  with open(reader.path, "rb") as f:
    head = f.read(4096).lstrip()
  if not head.startswith(b"["):
    yield from read_jsonl(reader)
    return
  try:
    with open(reader.path, encoding="utf-8") as f:
      data = json.load(f)
  except UnicodeDecodeError as e:
    raise UserError(f"{reader.path}: bytes that are not UTF-8 at offset {e.start}; "
                    "re-encode the file as UTF-8") from None
  except json.JSONDecodeError as e:
    raise UserError(f"{reader.path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno}); "
                    "fix the file (a JSON array must parse as a whole)") from None
  for i, rec in enumerate(data):
    where = f"{reader.path}[{i}]"
    if not isinstance(rec, dict):
      reader.bad(where, "non-object records", f"a JSON {type(rec).__name__}, not an object",
                 "make every array element an object")
      continue
    yield where, rec


def read_tsv(reader: Reader, columns: Sequence[str]) -> Iterator[tuple[str, dict]]:
  """Tab-separated rows with exactly len(columns) fields; literal '\\n' means newline."""
  check_file(reader.path)
  for n, line in _lines(reader):
    if not line.strip():
      continue
    fields = line.split("\t")
    where = f"{reader.path}:{n}"
    if len(fields) != len(columns):
      reader.bad(where, "rows with the wrong number of fields",
                 f"{len(fields)} tab-separated fields, expected {len(columns)} ({', '.join(columns)})",
                 "fix or remove that row")
      continue
    yield where, {c: v.replace("\\n", "\n").strip() for c, v in zip(columns, fields)}


def read_csv(reader: Reader) -> Iterator[tuple[str, dict]]:
  check_file(reader.path)
  with open(reader.path, encoding="utf-8", newline="") as f:
    for i, row in enumerate(csv.DictReader(f), 2):
      yield f"{reader.path}:{i}", row


def require(reader: Reader, where: str, rec: dict, fields: Sequence[str],
            non_empty: Sequence[str] = ()) -> bool:
  """True if `rec` has every field, and the `non_empty` ones are non-blank strings."""
  for f in fields:
    if f not in rec or rec[f] is None:
      reader.bad(where, f"records missing '{f}'", f"no field '{f}' (has {sorted(rec)})",
                 f"add '{f}' to every record")
      return False
  for f in non_empty:
    v = rec[f]
    if not isinstance(v, str):
      reader.bad(where, f"records with non-text '{f}'", f"'{f}' is a {type(v).__name__}",
                 f"make '{f}' a string")
      return False
    if not v.strip():
      reader.bad(where, f"records with empty '{f}'", f"'{f}' is empty",
                 "give every example a non-empty target, or remove it")
      return False
  return True


def files_in(folder: str, pattern: str = "*.json") -> list[str]:
  if not os.path.isdir(folder):
    raise UserError(f"{folder} is not a folder; give the folder that holds the {pattern} files")
  paths = sorted(glob.glob(os.path.join(folder, pattern)))
  if not paths:
    raise UserError(f"{folder} holds no {pattern} files")
  return paths


def fingerprint_paths(paths: Sequence[str]) -> str:
  """Identity of source files for cache keys: path, size and modification time."""
  parts = []
  for p in paths:
    st = os.stat(p)
    parts.append(f"{os.path.abspath(p)}:{st.st_size}:{st.st_mtime_ns}")
  return "|".join(parts)


@gin.configurable
def data_dir(path: str | None = None) -> str:
  """Root of the public data sets (gsm8k/, flan_cot/, bbh/ ...).

  Defaults to $FLANJAX_DATA_DIR, else ../shared/data beside the project root.
  Nothing is downloaded: a missing folder is an error naming this setting.
  """
  if path:
    return path
  env = os.environ.get("FLANJAX_DATA_DIR")
  if env:
    return env
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  return os.path.join(os.path.dirname(root), "shared", "data")


def data_path(*parts: str) -> str:
  path = os.path.join(data_dir(), *parts)
  if not os.path.exists(path):
    raise UserError(f"{path} does not exist; put the data there or bind "
                    "data_dir.path (or set $FLANJAX_DATA_DIR) to the folder that holds it")
  return path


def holdout(key: str, share: float) -> bool:
  """A stable pseudo-random choice of about `share` of the keys, for validation splits."""
  import hashlib  # pylint: disable=g-import-not-at-top
  h = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")
  return h / 2**64 < share

"""Reading records from local files, with bad records reported, never passed over.

Every reader yields ``(where, record)`` pairs, ``where`` being ``"file:line"``.
A bad record (malformed line, missing or empty field, bytes that are not
UTF-8) either stops the run with a one-line message naming file, line and fix,
or is counted and skipped, by the ``bad_records`` setting. Skips are summed in
a ``ReadReport`` that the caller prints, so nothing is dropped silently.
"""

from __future__ import annotations

import codecs
import collections
import csv
import dataclasses
import glob
import json
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
  # Records kept after a change (what was changed -> count, and where it first was).
  changed: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  first_changed: dict = dataclasses.field(default_factory=dict)

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

  def changed(self, where: str, what: str) -> None:
    """A record kept with a change the user should hear of (counted, printed at the end)."""
    self.report.changed[what] += 1
    self.report.first_changed.setdefault(what, where)

  def done(self) -> ReadReport:
    for what, n in sorted(self.report.changed.items()):
      print(f"data: {self.path}: {n} record(s): {what} (first: "
            f"{self.report.first_changed[what]})", flush=True)
    if self.report.skipped:
      print(f"data: {self.report.summary()}", flush=True)  # once: not also a log warning
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
  with open(path, "rb") as f:
    head = f.read(6)
  for magic, name, command in _COMPRESSED:
    if head.startswith(magic):  # else: "bytes that are not UTF-8", which misleads
      raise UserError(f"{path} is {name}-compressed; decompress it ({command} {path}) and give "
                      "the file that makes")


# (leading bytes, format, the command that decompresses it and keeps the original)
_COMPRESSED = ((b"\x1f\x8b", "gzip", "gunzip -k"), (b"BZh", "bzip2", "bunzip2 -k"),
               (b"\xfd7zXZ\x00", "xz", "unxz -k"), (b"\x28\xb5\x2f\xfd", "zstd", "unzstd"),
               (b"PK\x03\x04", "zip", "unzip"))


def load_json(path: str, fix: str):
  """The JSON document in the file at `path` (a byte-order mark allowed). What cannot be read
  or parsed raises a one-line UserError naming the file and, for bad JSON, the line and `fix`
  (what to do about it)."""
  try:
    with open(path, encoding="utf-8-sig") as f:
      return json.load(f)
  except UnicodeDecodeError as e:
    raise _not_utf8(path, e) from None
  except json.JSONDecodeError as e:
    raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno}); "
                    f"{fix}") from None
  except RecursionError:
    raise UserError(f"{path}: JSON nested too deeply to read; {fix}") from None
  except OSError as e:
    raise UserError(f"{path}: cannot be read ({e.strerror or e}); check the path and its "
                    "permissions") from None


def _lines(reader: Reader) -> Iterator[tuple[int, str]]:
  """(line number, text) of a file; \n, \r\n and a lone \r all end a line (one file may
  mix them), a UTF-8 byte-order mark is dropped."""
  with open(reader.path, "rb") as f:
    n = 0
    for raw in f:
      if n == 0 and raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8):]
      for part in raw.rstrip(b"\r\n").split(b"\r") if b"\r" in raw else [raw]:
        n += 1
        try:
          line = part.decode("utf-8")
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
    except RecursionError:
      reader.bad(where, "malformed JSON lines", "JSON nested too deeply to read",
                 "fix or remove that line")
      continue
    if not isinstance(rec, dict):
      reader.bad(where, "non-object lines", f"a JSON {type(rec).__name__}, not an object",
                 "write one JSON object per line")
      continue
    yield where, rec


def _head(path: str, size: int = 4096) -> bytes:
  with open(path, "rb") as f:
    return f.read(size).removeprefix(codecs.BOM_UTF8).lstrip()


# Keys of a record of the formats flanjax reads: an object with one of them is a record,
# not a file's wrapper of records.
_RECORD_KEYS = frozenset({"instruction", "input", "output", "prompt", "completion", "response",
                          "conversations", "messages"})


def _wrapped_key(obj) -> str | None:
  """The key of the one list of objects in `obj` when `obj` wraps records so; None when it
  is not such a wrapper (no such list, several, or a list of chat turns, which makes `obj`
  one conversation record)."""
  if not isinstance(obj, dict) or _RECORD_KEYS & set(obj):
    return None
  keys = [k for k, v in obj.items()
          if isinstance(v, list) and v and all(isinstance(e, dict) for e in v)]
  if len(keys) != 1:
    return None
  turns = obj[keys[0]]
  if all(("role" in e or "from" in e) for e in turns):
    return None  # a ShareGPT or chat record's turns, not records
  return keys[0]


def _not_utf8(path: str, e: UnicodeDecodeError) -> UserError:
  return UserError(f"{path}: bytes that are not UTF-8 at offset {e.start}; re-encode the "
                   "file as UTF-8")


def _read_text(path: str) -> str:
  try:
    with open(path, encoding="utf-8-sig", newline="") as f:  # offsets as in the bytes' text
      return f.read()
  except UnicodeDecodeError as e:
    raise _not_utf8(path, e) from None


def _text_head(path: str, size: int) -> str:
  """The first `size` bytes of `path` as text (a byte-order mark dropped; a character cut by
  the read, or bytes that are not UTF-8, replaced: the whole-file readers report those)."""
  with open(path, "rb") as f:
    return f.read(size).removeprefix(codecs.BOM_UTF8).decode("utf-8", "replace")


def _layout(path: str) -> tuple[str, object]:
  """How a JSON records file is laid out, from its first value: ('array', None), ('lines',
  None) (one object per line; also what a malformed first line falls back to), ('stream',
  None) (objects written over several lines, or several on one line, one after another:
  pretty-printed "JSON lines"), ('wrapped', key) (one object holding its records in the
  list under `key`), or ('object', the object) (one object that holds no records)."""
  head = _head(path)
  if not head.startswith(b"{"):
    return ("array", None) if head.startswith(b"[") else ("lines", None)
  decoder, size, total = json.JSONDecoder(), 1 << 16, os.path.getsize(path)
  while True:
    text = _text_head(path, size)
    start = len(text) - len(text.lstrip())
    try:
      obj, end = decoder.raw_decode(text, start)
      break
    except (json.JSONDecodeError, RecursionError):
      if size >= total:
        return "lines", None  # the first line is bad: the lines reader reports it
      size *= 4
  one_line = "\n" not in text[start:end] and "\r" not in text[start:end]
  line_end = min((i for i in (text.find("\n", end), text.find("\r", end)) if i >= 0),
                 default=len(text))
  only = not text[end:].strip() and (size >= total or not _read_text(path)[end:].strip())
  if only:  # the first value is the whole file
    key = _wrapped_key(obj)
    if key is not None:
      return "wrapped", key
    if one_line:
      return "lines", None
    # One record written over several lines is a file of one record.
    return ("stream", None) if _RECORD_KEYS & set(obj) else ("object", obj)
  if one_line and not text[end:line_end].strip():
    return "lines", None
  return "stream", None


def _line_of(text: str, pos: int, memo: list) -> int:
  """1-based line of `pos`, counting on from the last call's position (memo: [pos, line])."""
  last, line = memo
  line += text.count("\n", last, pos)
  memo[:] = [pos, line]
  return line


def _read_stream(reader: Reader) -> Iterator[tuple[str, dict]]:
  text = _read_text(reader.path)
  decoder, i, memo = json.JSONDecoder(), 0, [0, 1]
  while True:
    while i < len(text) and text[i].isspace():
      i += 1
    if i >= len(text):
      return
    where = f"{reader.path}:{_line_of(text, i, memo)}"
    try:
      rec, i = decoder.raw_decode(text, i)
    except (json.JSONDecodeError, RecursionError) as e:
      detail = (f"not valid JSON ({e.msg})" if isinstance(e, json.JSONDecodeError)
                else "JSON nested too deeply to read")
      # Objects over several lines: where the next one starts after a bad one is unknown.
      raise UserError(f"{where}: {detail}; this file holds JSON objects written over several "
                      "lines, so a bad one cannot be skipped: fix it, or write one object "
                      "per line") from None
    if not isinstance(rec, dict):
      reader.bad(where, "non-object records", f"a JSON {type(rec).__name__}, not an object",
                 "make every record an object")
      continue
    yield where, rec


def _read_wrapped(reader: Reader, key: str) -> Iterator[tuple[str, dict]]:
  data = load_json(reader.path, "fix the file (a JSON object must parse as a whole)")
  for i, rec in enumerate(data[key]):
    yield f"{reader.path}:{key}[{i}]", rec


def read_json_or_jsonl(reader: Reader) -> Iterator[tuple[str, dict]]:
  """Records of a JSON file: an array of objects (Alpaca's own files, ShareGPT dumps), JSON
  lines, objects one after another over several lines (pretty-printed JSON lines), or one
  object holding its records in a single list ({"data": [...]})."""
  check_file(reader.path)
  kind, arg = _layout(reader.path)
  if kind == "object":
    raise UserError(_not_records(reader.path, arg))
  if kind == "lines":
    yield from read_jsonl(reader)
    return
  if kind == "stream":
    yield from _read_stream(reader)
    return
  if kind == "wrapped":
    yield from _read_wrapped(reader, arg)
    return
  data = load_json(reader.path, "fix the file (a JSON array must parse as a whole)")
  if not isinstance(data, list):
    raise UserError(f"{reader.path}: a JSON {type(data).__name__}, not an array of records")
  for i, rec in enumerate(data):
    where = f"{reader.path}[{i}]"
    if not isinstance(rec, dict):
      reader.bad(where, "non-object records", f"a JSON {type(rec).__name__}, not an object",
                 "make every array element an object")
      continue
    yield where, rec


_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number",
               bool: "true/false", type(None): "null"}


def _first_array_element(path: str, max_elements: int = 1000) -> tuple[int, dict | None, str]:
  """(index, the first element of a JSON array that is an object, the problem when there is
  none), read from as much of the file as it takes. Elements before it that are not objects
  are passed over: the reader counts them as bad records."""
  size, total = 1 << 16, os.path.getsize(path)
  decoder = json.JSONDecoder()
  while True:
    text = _text_head(path, size)
    whole = size >= total
    i, n, first_bad = text.index("[") + 1, 0, ""
    while n < max_elements:
      while i < len(text) and text[i].isspace():
        i += 1
      if text[i:i + 1] == "]":
        return n, None, (f"no element is an object ({first_bad})" if n
                         else "an empty JSON array: no records")
      if i >= len(text) and not whole:
        break  # read more of the file
      try:
        rec, i = decoder.raw_decode(text, i)
      except json.JSONDecodeError as e:
        if not whole:
          break  # perhaps only cut by the read
        return n, None, f"element {n}: not valid JSON ({e.msg} at line {e.lineno})"
      except RecursionError:
        return n, None, f"element {n}: JSON nested too deeply to read"
      if isinstance(rec, dict):
        return n, rec, ""
      first_bad = first_bad or f"element {n} is a JSON {_JSON_TYPES.get(type(rec), 'value')}"
      n += 1
      while i < len(text) and text[i].isspace():
        i += 1
      if text[i:i + 1] == ",":
        i += 1
      elif text[i:i + 1] != "]":
        if not whole and i >= len(text):
          break
        return n, None, f"not valid JSON after element {n - 1} (expected ',' or ']')"
    else:
      return n, None, f"none of its first {n} elements is an object ({first_bad})"
    size *= 4


def _not_records(path: str, obj: dict) -> str:
  """What read_json_or_jsonl says of a file that is one JSON object."""
  keys = ", ".join(sorted(obj)[:8])
  lists = [k for k, v in obj.items() if isinstance(v, list) and v and isinstance(v[0], dict)]
  if len(lists) > 1 and not _RECORD_KEYS & set(obj):
    return (f"{path}: one JSON object with {len(lists)} lists of records ({', '.join(lists[:8])}); "
            "write each list to a file of its own")
  return (f"{path}: one JSON object (keys: {keys}), not records; write one record per line "
          "(JSON lines) or a JSON array of records")


def first_record(path: str, max_lines: int = 1000) -> tuple[str, dict | None, str]:
  """(where, the first JSON object of a JSON-lines file or array, the first problem met
  before it); the object is None when none is found in the first `max_lines` lines (or
  array elements). A file that is one JSON object, not records, is a UserError, as when read."""
  check_file(path)
  head = _head(path)
  if head.startswith(b"["):
    i, rec, problem = _first_array_element(path, max_lines)
    return (f"{path}[{i}]" if rec is not None else path), rec, problem
  kind, arg = _layout(path)
  if kind == "object":
    raise UserError(_not_records(path, arg))  # the reader's own message, not "not valid JSON"
  if kind in ("stream", "wrapped"):
    reader = Reader(path, "skip")
    records = _read_stream(reader) if kind == "stream" else _read_wrapped(reader, arg)
    for n, (where, rec) in enumerate(records):
      if n >= max_lines:
        break
      return where, rec, ""
    first = next(iter(reader.report.first.values()), "no JSON object")
    return path, None, first.rstrip("; ")
  reader = Reader(path, "skip")
  for n, line in _lines(reader):
    if n > max_lines:
      break
    if not line.strip():
      continue
    try:
      rec = json.loads(line)
    except (json.JSONDecodeError, RecursionError):
      reader.bad(f"{path}:{n}", "malformed", "not valid JSON", "")
      continue
    if isinstance(rec, dict):
      return f"{path}:{n}", rec, ""
  first = next(iter(reader.report.first.values()), "no JSON object")
  return path, None, first.rstrip("; ")


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
                 f"give every record a non-empty '{f}', or remove the record")
      return False
  return True


def files_in(folder: str, pattern: str = "*.json") -> list[str]:
  if not os.path.isdir(folder):
    raise UserError(f"{folder} is not a folder; give the folder that holds the {pattern} files")
  paths = sorted(glob.glob(os.path.join(folder, pattern)))
  if not paths:
    raise UserError(f"{folder} holds no {pattern} files")
  return paths


# The evaluation data of the data folder (relative to data_dir()): it never enters training.
EVALUATION_DATA = {"bbh": "bbh", "gsm8k test": "gsm8k/test.jsonl", "mmlu": "mmlu",
                   "mt_bench": "mt_bench", "alpaca_eval": "alpaca_eval",
                   "instruction_eval (test prompts)": "instruction_eval"}


def evaluation_data(path: str) -> str | None:
  """The name of the evaluation set `path` is (or lies in) under the data folder; else None.
  By location only: a copy elsewhere is found by its content (flanjax.curate decontaminate,
  train.decontamination)."""
  real = os.path.realpath(os.path.expanduser(path))
  root = os.path.realpath(data_dir())
  for name, rel in EVALUATION_DATA.items():
    target = os.path.join(root, rel)
    if real == target or real.startswith(target + os.sep):
      return name
  return None


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

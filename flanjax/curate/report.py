"""What a curate command kept and dropped, by reason: OUT.report.json and a console table.

Every record read is either kept or dropped for a named reason (records the
reader could not use count as dropped too, by the reader's reason); `finish`
checks that the counts add up before writing, so nothing goes silently.
"""

from __future__ import annotations

import collections
import json
import os
import platform
import subprocess
import sys
import time


def report_path(out: str) -> str:
  return out + ".report.json"


def _commit() -> str:
  here = os.path.dirname(os.path.abspath(__file__))
  try:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                          text=True, timeout=10).stdout.strip() or "unknown"
  except (OSError, subprocess.SubprocessError):
    return "unknown"


class Progress:
  """A console line every `every` seconds: done/total, rate, ETA.

  `done` may be set before the first update (work a resumed run found done); the rate
  counts only what this process did, so the ETA is not flattered by it.
  """

  def __init__(self, total: int, label: str, every: float = 5.0):
    self.total, self.label, self.every = total, label, every
    self.done, self.t0, self.last = 0, time.time(), time.time()
    self.base = None  # `done` at the first update: work of an earlier run

  def update(self, n: int = 1, note: str = "") -> None:
    if self.base is None:
      self.base = self.done
    self.done += n
    now = time.time()
    if now - self.last < self.every and self.done < self.total:
      return
    self.last = now
    rate = (self.done - self.base) / max(now - self.t0, 1e-9)
    left = (self.total - self.done) / rate if rate > 0 else 0
    eta = f"{int(left // 60)}:{int(left % 60):02d}"
    print(f"{self.label}: {self.done:,}/{self.total:,} ({100 * self.done / max(self.total, 1):.0f}%), "
          f"{rate:,.1f}/s, ETA {eta}{'  ' + note if note else ''}", file=sys.stderr, flush=True)


class Report:
  def __init__(self, command: str, argv, inputs, out: str):
    self.out = out
    self.data = {"command": command, "argv": list(argv), "inputs": list(inputs), "out": out,
                 "commit": _commit(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                 "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    self.read = 0
    self.kept = 0
    self.dropped = collections.Counter()
    self.first = {}  # reason -> the first record dropped for it
    self.figures = {}
    self.t0 = time.time()

  def add_read_reports(self, reports) -> None:
    """The reader's counts: records kept for curation, and the unusable ones as drops."""
    for rep in reports:
      self.read += rep.kept + rep.num_skipped
      for reason, n in rep.skipped.items():
        self.dropped[f"unreadable: {reason}"] += n
        self.first.setdefault(f"unreadable: {reason}", rep.first[reason])

  def candidates(self, n: int) -> None:
    """n records entered curation without coming from a file (generated ones)."""
    self.read += n

  def drop(self, reason: str, where: str = "", detail: str = "") -> None:
    self.dropped[reason] += 1
    if reason not in self.first:
      self.first[reason] = f"{where}: {detail}" if detail else where

  def check(self, kept: int) -> None:
    """Every record read is kept or dropped for a reason (raises if not: a bug of ours)."""
    total = kept + sum(self.dropped.values())
    if total != self.read:
      raise AssertionError(f"accounting: {self.read} read but {kept} kept + "
                           f"{sum(self.dropped.values())} dropped")

  def finish(self, kept: int) -> dict:
    self.check(kept)
    self.kept = kept
    self.data.update(read=self.read, kept=kept, dropped=dict(self.dropped.most_common()),
                     first_dropped=self.first, figures=self.figures,
                     seconds=round(time.time() - self.t0, 2))
    tmp = report_path(self.out) + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(self.data, f, indent=1, ensure_ascii=False)
    os.replace(tmp, report_path(self.out))
    print(self.table(), flush=True)
    return self.data

  def table(self) -> str:
    rows = [("read", self.read, ""), ("kept", self.kept, "")]
    rows += [(f"dropped: {r}", n, self.first.get(r, "")[:70]) for r, n in self.dropped.most_common()]
    w = max(len(r[0]) for r in rows)
    lines = [f"{self.data['command']}: {self.out}", f"{'':{w}}  {'records':>8}  {'share':>6}  first"]
    for name, n, first in rows:
      lines.append(f"{name:{w}}  {n:>8,}  {100 * n / max(self.read, 1):>5.1f}%  {first}")
    for k, v in self.figures.items():
      lines.append(f"{k}: {json.dumps(v, ensure_ascii=False)[:200]}")
    return "\n".join(lines)

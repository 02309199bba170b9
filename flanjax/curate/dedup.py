"""Duplicates: exact (normalised text), near (MinHash LSH over word 5-gram shingles), and,
when asked (`rouge`), ROUGE-L of the prompts as Self-Instruct filters its generated tasks.
The first of a group is kept.

The ROUGE-L filter compares prompts (instruction and input), not instructions alone: two
records of one task with different inputs are not duplicates. rouge_score's tokenizer
keeps only ASCII letters and digits, so a prompt with words it cannot see (Chinese, say)
is not compared (counted in the report's figures).

Near duplicates are what the LSH proposes and an exact Jaccard of the shingle sets
confirms (LSH alone has false positives), so the threshold means what it says; its bands
are chosen to propose a pair at the threshold with probability >= 0.99 (`lsh_params`).
"""

from __future__ import annotations

import hashlib
import struct
from typing import Sequence

import numpy as np
from datasketch import MinHash, MinHashLSH

from flanjax.curate import records as rec_lib
from flanjax.curate.report import Progress, Report
from flanjax.curate.rouge import RougePool, tokenizer


def normalised(text: str) -> str:
  return " ".join(rec_lib.words(text))


def shingles(text: str, n: int = 5) -> set[bytes]:
  w = rec_lib.words(text)
  if len(w) <= n:
    return {" ".join(w).encode()} if w else set()
  return {" ".join(w[i:i + n]).encode() for i in range(len(w) - n + 1)}


def _hash32(b: bytes) -> int:
  return struct.unpack("<I", hashlib.sha1(b).digest()[:4])[0]


def minhash(sh: set[bytes], num_perm: int) -> MinHash:
  m = MinHash(num_perm=num_perm, hashfunc=_hash32)
  if sh:
    m.update_batch(list(sh))
  return m


def jaccard(a: set, b: set) -> float:
  return len(a & b) / len(a | b) if a or b else 1.0


LSH_RECALL = 0.99  # of pairs exactly at the threshold; pairs above it are found more often


def lsh_params(threshold: float, num_perm: int, recall: float = LSH_RECALL) -> tuple[int, int]:
  """(bands, rows) of the LSH: the most rows a band (the fewest candidates to confirm) with
  which a pair of Jaccard `threshold` still shares a band with probability >= `recall`.
  datasketch's own choice weighs misses and false candidates alike, and finds a pair at the
  threshold 40% of the time at 0.8; here every candidate is confirmed by its exact Jaccard,
  so a false candidate costs one set intersection, a miss a duplicate kept."""
  for rows in range(num_perm, 0, -1):
    bands = num_perm // rows
    if found_at(threshold, bands, rows) >= recall:
      return bands, rows
  return num_perm, 1


def found_at(threshold: float, bands: int, rows: int) -> float:
  """The probability that the LSH proposes a pair of Jaccard `threshold`."""
  return 1.0 - (1.0 - threshold ** rows) ** bands


def dedup(records: Sequence[rec_lib.Record], report: Report, *, jaccard_threshold: float = 0.8,
          num_perm: int = 128, shingle: int = 5, rouge: float | None = None) -> list:
  """The records that are not duplicates of an earlier one; drops counted by reason."""
  seen: dict[str, str] = {}
  lsh, params = None, None
  if jaccard_threshold:
    params = lsh_params(jaccard_threshold, num_perm)
    lsh = MinHashLSH(num_perm=num_perm, params=params)
  shingle_sets: dict[int, set] = {}
  pool = RougePool() if rouge else None
  rouge_tok = tokenizer() if rouge else None
  pool_where: list[str] = []
  kept, near_pairs, not_compared = [], [], 0
  prog = Progress(len(records), "dedup")
  for i, r in enumerate(records):
    prog.update()
    key = hashlib.sha256(normalised(r.text).encode()).hexdigest()
    if key in seen:
      report.drop("exact duplicate", r.where, f"same text as {seen[key]}")
      continue
    if lsh is not None:
      sh = shingles(r.text, shingle)
      m = minhash(sh, num_perm)
      hits = [(jaccard(sh, shingle_sets[j]), j) for j in lsh.query(m)]
      hits = [h for h in hits if h[0] >= jaccard_threshold]
      if hits:
        score, j = max(hits)
        report.drop("near duplicate (MinHash LSH)", r.where,
                    f"Jaccard {score:.2f} of word {shingle}-grams with {records[j].where}")
        near_pairs.append(score)
        continue
    if pool is not None:
      if len(rouge_tok.tokenize(r.prompt)) < len(rec_lib.words(r.prompt)):
        not_compared += 1  # words ROUGE-L cannot see: any two such prompts would look alike
      else:
        score, j = pool.max_score(r.prompt, above=rouge)
        if score > rouge:
          report.drop(f"prompt ROUGE-L > {rouge}", r.where,
                      f"ROUGE-L {score:.2f} with {pool_where[j]}")
          continue
        pool.add(r.prompt)
        pool_where.append(r.where)
    seen[key] = r.where
    if lsh is not None:
      lsh.insert(i, m)
      shingle_sets[i] = sh
    kept.append(r)
  report.figures["dedup"] = {
      "jaccard_threshold": jaccard_threshold, "num_perm": num_perm, "shingle_words": shingle,
      "lsh_bands_rows": list(params) if params else None,
      "lsh_found_at_threshold": round(found_at(jaccard_threshold, *params), 4) if params else None,
      "rouge_threshold": rouge, "rouge_not_compared_non_ascii": not_compared if rouge else None,
      "near_duplicate_jaccard_mean": round(float(np.mean(near_pairs)), 3) if near_pairs else None}
  return kept

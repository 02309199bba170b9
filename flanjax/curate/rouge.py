"""ROUGE-L F1 of one text against a growing pool, equal to `rouge_score`'s, without its cost.

rouge_score tokenises both texts and fills an O(n*m) Python table on every call;
Self-Instruct calls it once per pool member for every new instruction. Here each
pool text is tokenised once (with rouge_score's own tokenizer, so the tokens are
the same), an inverted index gives every member's multiset overlap with the
query in a few numpy operations, and the overlap bounds the F1
(LCS <= overlap, F1 = 2 * LCS / (len_a + len_b)). Only members whose bound can
reach the threshold (or the best so far) get an exact LCS, computed with
Hyyro's bit-parallel recurrence on Python integers (one pass over the query's
tokens). The F1 is then formed exactly as rouge_score forms it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from rouge_score import tokenizers


def tokenizer(use_stemmer: bool = False):
  return tokenizers.DefaultTokenizer(use_stemmer)


def lcs_length(a: Sequence[int], masks: dict, m: int) -> int:
  """LCS length of token ids `a` and a text of `m` tokens whose token -> bit-position
  masks are `masks` (Hyyro 2004: V = (V + U) | (V - U), U = V & M[c])."""
  full = (1 << m) - 1
  v = full
  for t in a:
    u = v & masks.get(t, 0)
    if u:
      v = ((v + u) | (v - u)) & full
  return m - bin(v).count("1")


def f1(lcs: int, len_target: int, len_prediction: int) -> float:
  """rouge_score's fmeasure, operation for operation."""
  if not lcs or not len_target or not len_prediction:
    return 0.0
  precision, recall = lcs / len_prediction, lcs / len_target
  return 2 * precision * recall / (precision + recall)


class _Postings:
  """token id -> growing numpy arrays of (pool index, count)."""

  def __init__(self):
    self.ids, self.counts, self.size = {}, {}, {}

  def add(self, token: int, index: int, count: int):
    n = self.size.get(token, 0)
    ids = self.ids.get(token)
    if ids is None or n == len(ids):
      cap = max(8, 2 * n)
      new_ids, new_counts = np.zeros(cap, np.int64), np.zeros(cap, np.int32)
      if ids is not None:
        new_ids[:n], new_counts[:n] = ids, self.counts[token]
      self.ids[token], self.counts[token] = new_ids, new_counts
    self.ids[token][n], self.counts[token][n] = index, count
    self.size[token] = n + 1

  def get(self, token: int):
    n = self.size.get(token, 0)
    if not n:
      return None, None
    return self.ids[token][:n], self.counts[token][:n]


class RougePool:
  """Texts to compare new texts with, by ROUGE-L F1 (rouge_score's tokenisation)."""

  def __init__(self, texts: Sequence[str] = (), use_stemmer: bool = False):
    self._tok = tokenizer(use_stemmer)
    self._vocab: dict[str, int] = {}
    self._masks: list[dict] = []
    self._lens: list[int] = []
    self._len_arr = np.zeros(0, np.int64)
    self._post = _Postings()
    self.exact_computed = 0  # how many exact LCS were needed (for the report)
    for t in texts:
      self.add(t)

  def __len__(self) -> int:
    return len(self._lens)

  def ids(self, text: str) -> list[int]:
    return [self._vocab.setdefault(t, len(self._vocab)) for t in self._tok.tokenize(text)]

  def add(self, text: str) -> int:
    ids = self.ids(text)
    index = len(self._lens)
    masks, counts = {}, {}
    for pos, t in enumerate(ids):
      masks[t] = masks.get(t, 0) | (1 << pos)
      counts[t] = counts.get(t, 0) + 1
    for t, c in counts.items():
      self._post.add(t, index, c)
    self._masks.append(masks)
    self._lens.append(len(ids))
    return index

  def _lengths(self) -> np.ndarray:
    if len(self._len_arr) != len(self._lens):
      self._len_arr = np.asarray(self._lens, np.int64)
    return self._len_arr

  def _overlap(self, ids: Sequence[int]) -> np.ndarray:
    ov = np.zeros(len(self._lens), np.int64)
    q = {}
    for t in ids:
      q[t] = q.get(t, 0) + 1
    for t, c in q.items():
      pid, pc = self._post.get(t)
      if pid is not None:
        ov[pid] += np.minimum(pc, c)  # a member appears once per token's postings
    return ov

  def _exact(self, ids, j: int) -> float:
    self.exact_computed += 1
    lcs = lcs_length(ids, self._masks[j], self._lens[j])
    return f1(lcs, len(ids), self._lens[j])

  def scores(self, text: str) -> np.ndarray:
    """ROUGE-L F1 of `text` (the target) against every member (the predictions)."""
    ids = self.ids(text)
    out = np.zeros(len(self._lens), np.float64)
    if not ids:
      return out
    for j in np.flatnonzero(self._overlap(ids)):
      out[j] = self._exact(ids, int(j))
    return out

  def max_score(self, text: str, above: float | None = None) -> tuple[float, int]:
    """(the highest F1 of `text` against the pool, its member; -1 for none).

    above: stop as soon as a member scores above it (the filter's question is only
    whether one does); None: the exact maximum.
    """
    ids = self.ids(text)
    if not ids or not self._lens:
      return 0.0, -1
    ov = self._overlap(ids)
    bound = 2.0 * ov / (len(ids) + self._lengths())
    cand = np.flatnonzero(ov)
    if above is not None:
      cand = cand[bound[cand] > above]
    cand = cand[np.argsort(-bound[cand], kind="stable")]
    best, where = 0.0, -1
    for j in cand:
      if bound[j] < best - 1e-12:
        break
      s = self._exact(ids, int(j))
      if s > best:
        best, where = s, int(j)
        if above is not None and best > above:
          break
    return best, where

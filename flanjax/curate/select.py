"""Choosing k records: longest, quality, QDIT, diverse (k-means), random.

QDIT (Bukharin et al., 2023) maximises (1 - alpha) * facility_location(S) + alpha * quality(S),
facility_location(S) = mean_i max_{j in S} sim(i, j) over the n pool records (0 for the empty
set) and quality(S) = sum_{j in S} q_j / k, the members' quality (min-max scaled to [0, 1])
averaged over the k to choose. Both terms then lie in [0, 1] for a whole selection, so alpha
trades one against the other; a plain sum of quality outweighs the pool mean after a few
picks and made alpha act as on/off. Greedy by marginal gain; lazy evaluation keeps each candidate's last gain as an upper bound (the objective is
submodular, so gains only shrink) and recomputes, a batch at a time, only the candidates on top
of the heap, so the exact greedy choice costs a few columns of the similarity matrix per step.
Ties go to the lower index, as in the brute-force greedy (`brute_force_qdit`).

Embeddings: a hashed TF-IDF vector of the prompt (numpy), or a checkpoint's encoder output
mean-pooled over the prompt's tokens (`encoder_embeddings`).
"""

from __future__ import annotations

import collections
import heapq
import zlib
from typing import Sequence

import numpy as np

from flanjax.curate import records as rec_lib
from flanjax.curate.report import Progress

METHODS = ("longest", "quality", "qdit", "diverse", "random")


# ------------------------------------------------------------------ embeddings

def tfidf_embeddings(texts: Sequence[str], dim: int = 256) -> np.ndarray:
  """L2-normalised TF-IDF of words and word pairs, hashed (crc32) into `dim` buckets."""
  docs = []
  for t in texts:
    w = rec_lib.words(t)
    docs.append(collections.Counter(w + [f"{a} {b}" for a, b in zip(w, w[1:])]))
  df = collections.Counter(tok for d in docs for tok in d)
  n = len(docs)
  bucket = {tok: zlib.crc32(tok.encode()) % dim for tok in df}
  idf = {tok: np.log((1 + n) / (1 + c)) + 1.0 for tok, c in df.items()}
  out = np.zeros((n, dim), np.float32)
  for i, d in enumerate(docs):
    for tok, c in d.items():
      out[i, bucket[tok]] += c * idf[tok]
  norms = np.linalg.norm(out, axis=1, keepdims=True)
  return out / np.maximum(norms, 1e-12)


def encoder_embeddings(loaded, texts: Sequence[str], batch_size: int = 16,
                       max_length: int = 256) -> np.ndarray:
  """Mean-pooled encoder outputs of a loaded checkpoint (models.loading.Loaded), L2-normalised."""
  import jax  # pylint: disable=g-import-not-at-top
  from flanjax.errors import UserError  # pylint: disable=g-import-not-at-top
  if not hasattr(loaded.model, "encode"):
    raise UserError(f"{loaded.source} has no encoder ({loaded.kind.name}); embed with an "
                    "encoder-decoder checkpoint, or leave --embed_checkpoint out for hashed TF-IDF")
  enc = jax.jit(lambda p, x: loaded.model.apply({"params": p}, x, method=loaded.model.encode))
  out = []
  prog = Progress(len(texts), "embed")
  for s in range(0, len(texts), batch_size):
    chunk = [loaded.kind.prompt_ids(loaded.vocab, t)[:max_length] for t in texts[s:s + batch_size]]
    width = max(8, 1 << (max(len(c) for c in chunk) - 1).bit_length())
    ids = np.zeros((batch_size, width), np.int32)
    for j, c in enumerate(chunk):
      ids[j, :len(c)] = c
    h = np.asarray(enc(loaded.params, ids), np.float32)
    mask = (ids != 0)[..., None]
    pooled = (h * mask).sum(1) / np.maximum(mask.sum(1), 1)
    out.append(pooled[:len(chunk)])
    prog.update(len(chunk))
  e = np.concatenate(out)
  return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)


# ------------------------------------------------------------------ QDIT

def _scaled(q: np.ndarray) -> np.ndarray:
  q = np.asarray(q, np.float64)
  span = q.max() - q.min() if len(q) else 0.0
  return (q - q.min()) / span if span > 0 else np.zeros_like(q)


def _first_gains(emb: np.ndarray, q: np.ndarray, alpha: float):
  """Gains on the empty selection, or upper bounds of them, without the n x n matrix.

  Non-negative embeddings (TF-IDF) have non-negative similarities, so the facility
  gain of j is e_j . sum_i e_i / n exactly (stamp 0: fresh). Otherwise a bound
  (stamp -1: to be recomputed): max(0, x) = (x + |x|) / 2 and, by Cauchy-Schwarz,
  sum_i |e_i . e_j| <= sqrt(n * e_j^T (sum_i e_i e_i^T) e_j). `q` is already divided by k.
  """
  n = len(emb)
  total = emb.sum(0, dtype=np.float64)
  lin = emb @ total
  if alpha == 1.0 or emb.min() >= 0:
    return (1 - alpha) * lin / n + alpha * q, np.zeros(n, np.int64)
  cov = emb.T.astype(np.float64) @ emb
  quad = np.einsum("nd,de,ne->n", emb, cov, emb)
  bound = (lin + np.sqrt(np.maximum(n * quad, 0.0))) / (2 * n) + 1e-6
  return (1 - alpha) * bound + alpha * q, np.full(n, -1)


def qdit(emb: np.ndarray, quality: np.ndarray, k: int, alpha: float, batch: int = 64,
         chunk: int = 1024, progress: bool = True) -> list[int]:
  """Greedy QDIT with lazy evaluation; indices in the order chosen."""
  emb = np.asarray(emb) if np.asarray(emb).dtype == np.float64 else np.asarray(emb, np.float32)
  n = len(emb)
  k = min(k, n)
  q = _scaled(quality) / max(k, 1) if alpha else np.zeros(n)
  cur = np.zeros(n, emb.dtype)  # max similarity of each point to the selection so far

  last = {}  # the similarity columns of the last batch evaluated, reused when one is chosen

  def gains(cols: np.ndarray) -> np.ndarray:
    if alpha == 1.0:
      return q[cols].astype(np.float64)
    sim = emb @ emb[cols].T  # [n, len(cols)]
    last.clear()
    last.update((int(c), (sim, i)) for i, c in enumerate(cols))
    fl = np.maximum(sim - cur[:, None], 0.0).sum(0, dtype=np.float64) / n
    return (1 - alpha) * fl + alpha * q[cols]

  heap = [(-g, j, stamp) for j, (g, stamp) in enumerate(zip(*_first_gains(emb, q, alpha)))]
  heapq.heapify(heap)
  chosen, taken = [], np.zeros(n, bool)
  prog = Progress(k, "qdit") if progress else None
  step = 0
  while len(chosen) < k:
    neg, j, stamp = heap[0]
    if stamp == step:  # fresh: its gain beats every other upper bound
      heapq.heappop(heap)
      chosen.append(j)
      taken[j] = True
      if alpha != 1.0:
        col = last[j][0][:, last[j][1]] if j in last else emb @ emb[j]
        np.maximum(cur, col, out=cur)
      step += 1
      if prog:
        prog.update()
      continue
    stale = []
    while heap and len(stale) < batch and heap[0][2] != step:
      stale.append(heapq.heappop(heap)[1])
    cols = np.asarray(stale)
    for g, c in zip(gains(cols), cols):
      heapq.heappush(heap, (-g, int(c), step))
  return chosen


def brute_force_qdit(emb: np.ndarray, quality: np.ndarray, k: int, alpha: float) -> list[int]:
  """The reference: every step evaluates the whole objective for every candidate."""
  emb = np.asarray(emb, np.float64)
  n = len(emb)
  sim = emb @ emb.T
  k = min(k, n)
  q = _scaled(quality) / max(k, 1)
  chosen = []
  for _ in range(k):
    best, arg = -np.inf, -1
    for j in range(n):
      if j in chosen:
        continue
      s = chosen + [j]
      fl = np.maximum(sim[:, s].max(1), 0.0).sum() / n
      val = (1 - alpha) * fl + alpha * q[s].sum()
      if val > best + 1e-12:
        best, arg = val, j
    chosen.append(arg)
  return chosen


# ------------------------------------------------------------------ k-means

def kmeans(emb: np.ndarray, clusters: int, seed: int = 0, iters: int = 25) -> np.ndarray:
  """Cluster labels (Lloyd's algorithm, k-means++ start)."""
  rng = np.random.default_rng(seed)
  n = len(emb)
  clusters = min(clusters, n)
  centers = [emb[rng.integers(n)]]
  d2 = ((emb - centers[0]) ** 2).sum(1)
  for _ in range(1, clusters):
    p = d2 / d2.sum() if d2.sum() > 0 else None
    centers.append(emb[rng.choice(n, p=p)])
    d2 = np.minimum(d2, ((emb - centers[-1]) ** 2).sum(1))
  c = np.stack(centers)
  labels = np.zeros(n, np.int64)
  for _ in range(iters):
    dist = (emb ** 2).sum(1)[:, None] - 2 * emb @ c.T + (c ** 2).sum(1)[None]
    new = dist.argmin(1)
    if (new == labels).all() and _ > 0:
      break
    labels = new
    for j in range(clusters):
      if (labels == j).any():
        c[j] = emb[labels == j].mean(0)
  return labels


def diverse(emb: np.ndarray, k: int, clusters: int, seed: int = 0) -> list[int]:
  """k records drawn evenly from the clusters: round robin, a random member each turn."""
  labels = kmeans(emb, clusters, seed)
  rng = np.random.default_rng(seed)
  members = [list(rng.permutation(np.flatnonzero(labels == c))) for c in np.unique(labels)]
  out = []
  while len(out) < min(k, len(emb)):
    for m in members:
      if m and len(out) < k:
        out.append(int(m.pop()))
  return out


# ------------------------------------------------------------------ figures

def figures(pool_emb: np.ndarray, pool: Sequence, chosen: Sequence[int],
            sample: int = 2000, seed: int = 0) -> dict:
  """Length and diversity of the selection beside the pool's."""
  rng = np.random.default_rng(seed)

  def mean_pairwise(e):
    if len(e) > sample:
      e = e[rng.choice(len(e), sample, replace=False)]
    s = e @ e.T
    m = len(e)
    return float((s.sum() - np.trace(s)) / max(m * (m - 1), 1))

  def describe(idx):
    resp = [len(rec_lib.words(pool[i].response)) for i in idx]
    verbs = collections.Counter((rec_lib.words(pool[i].instruction) or [""])[0] for i in idx)
    return {"records": len(idx), "response_words_mean": round(float(np.mean(resp)), 1),
            "response_words_median": float(np.median(resp)),
            "mean_pairwise_similarity": round(mean_pairwise(pool_emb[list(idx)]), 4),
            "leading_verbs": [[v, n] for v, n in verbs.most_common(8)]}

  chosen = list(chosen)
  out = {"pool": describe(range(len(pool))), "selection": describe(chosen)}
  # Coverage: how close each pool record is to its nearest selected one (mean cosine).
  near = np.zeros(len(pool), np.float32)
  for s in range(0, len(pool), 4096):
    near[s:s + 4096] = (pool_emb[s:s + 4096] @ pool_emb[chosen].T).max(1)
  out["coverage_mean_nearest_similarity"] = round(float(near.mean()), 4)
  return out

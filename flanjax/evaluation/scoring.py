"""Log-likelihood of continuations: rank classification and harness adapters.

    loglikelihood(model, params, kind, contexts, continuations)
        -> (sum of log-probabilities [n], whether greedy decoding gives the continuation [n])

Token ids in, as the model reads them (the caller adds EOS, BOS, spaces; the
model kind's `prompt_ids` / `continuation_ids` do it as training did):

  enc_dec    the encoder reads the context, the decoder is teacher-forced on the
             continuation (shifted right, starting from 0); a task trained with
             seqio's targets ends its continuation in EOS.
  prefix_lm  the row a flanjax prefix-LM trains on, [0, context..., continuation...],
             with the 0 and the context attending both ways (context = the
             inputs, EOS included); the logits at the context's last token
             predict the first continuation token, exactly as in training.
  decoder    causal: the row [context + continuation]; the logits at the last
             context token predict the first continuation token, so the context
             must not be empty (give BOS).

Requests are sorted by length, cut into batches of `batch_size` rows (the last
padded with empty rows) and padded to a few bucketed lengths, so a whole
evaluation compiles a handful of times. Over-long requests follow the one
truncation rule of `ModelKind.fit_prompt`: T5 and prefix-LM contexts keep their
start and closing EOS (as seqio's trim fed training; few-shot prompts drop
exemplars before that), a causal context keeps its end. The continuation is
never cut, unless it alone is longer than the budget.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from flanjax.models import kinds as kinds_lib
from flanjax.models import shared_context

bucket = kinds_lib.bucket


def _as_list(ids) -> list:
  return [int(x) for x in np.asarray(ids, np.int64).reshape(-1)]


def loglikelihood(model, params, kind, contexts: Sequence[Sequence[int]],
                  continuations: Sequence[Sequence[int]], *, batch_size: int = 16,
                  max_length: int | None = None, max_target_length: int | None = None):
  """Sum of log p(continuation | context) per request, and whether it is the greedy one.

  kind: a `kinds.ModelKind` or its name ('enc_dec', 'prefix_lm', 'decoder').
  max_length: the longest decoder row (decoder-only) or encoder input (enc_dec);
  max_target_length: the longest T5 continuation. Returns (np.float64 [n],
  np.bool_ [n]); an empty continuation scores 0.0 and True.
  """
  kind = kinds_lib.get(kind)
  if len(contexts) != len(continuations):
    raise ValueError(f"{len(contexts)} contexts but {len(continuations)} continuations")
  n = len(contexts)
  sums = np.zeros([n], np.float64)
  greedy = np.ones([n], bool)
  reqs = []
  for i, (ctx, cont) in enumerate(zip(contexts, continuations)):
    ctx, cont = _as_list(ctx), _as_list(cont)
    if not cont:
      continue
    try:
      ctx, cont, size = kind.score_request(ctx, cont, max_length, max_target_length)
    except ValueError as e:
      raise ValueError(f"request {i}: {e}") from None
    reqs.append((i, ctx, cont, size))
  # Longest first: rows of a batch have similar lengths, and the first batch
  # (the largest shapes) fails fast on memory.
  reqs.sort(key=lambda r: (-r[3], r[0]))
  for start in range(0, len(reqs), batch_size):
    chunk = reqs[start:start + batch_size]
    s, g = kind.score_batch(model, params, [(r[1], r[2]) for r in chunk], batch_size)
    s, g = np.asarray(s), np.asarray(g)
    for j, r in enumerate(chunk):
      sums[r[0]], greedy[r[0]] = float(s[j]), bool(g[j])
  return sums, greedy


def loglikelihood_groups(model, params, kind, contexts: Sequence[Sequence[int]],
                         continuations: Sequence[Sequence[Sequence[int]]], *,
                         batch_size: int = 16, max_length: int | None = None,
                         max_target_length: int | None = None):
  """`loglikelihood` of several continuations per context (rank classification's options):
  ([sums per continuation] per context, [greedy per continuation] per context).

  The numbers are `loglikelihood`'s on the flattened pairs; an encoder-decoder encodes each
  context once for all its continuations (`models.shared_context`), `batch_size` contexts
  at a time."""
  kind = kinds_lib.get(kind)
  if len(contexts) != len(continuations):
    raise ValueError(f"{len(contexts)} contexts but {len(continuations)} continuation lists")
  if not shared_context.shares_context(kind):
    flat_ctx = [c for c, conts in zip(contexts, continuations) for _ in conts]
    sums, greedy = loglikelihood(model, params, kind, flat_ctx,
                                 [y for conts in continuations for y in conts],
                                 batch_size=batch_size, max_length=max_length,
                                 max_target_length=max_target_length)
    ends = np.cumsum([0] + [len(conts) for conts in continuations])
    return ([sums[a:b] for a, b in zip(ends[:-1], ends[1:])],
            [greedy[a:b] for a, b in zip(ends[:-1], ends[1:])])
  sums = [np.zeros([len(conts)], np.float64) for conts in continuations]
  greedy = [np.ones([len(conts)], bool) for conts in continuations]
  groups = {}  # (context index, fitted context) -> [(continuation index, continuation)]
  for i, (ctx, conts) in enumerate(zip(contexts, continuations)):
    ctx = _as_list(ctx)
    for c, cont in enumerate(conts):
      cont = _as_list(cont)
      if not cont:
        continue
      try:
        fitted, cont, _ = kind.score_request(ctx, cont, max_length, max_target_length)
      except ValueError as e:
        raise ValueError(f"request {i}/{c}: {e}") from None
      groups.setdefault((i, tuple(fitted)), []).append((c, cont))
  # Longest first, as `loglikelihood` batches.
  order = sorted(groups, key=lambda key: (-len(key[1]), key[0]))
  for start in range(0, len(order), batch_size):
    keys = order[start:start + batch_size]
    s, g = shared_context.score_groups(
        model, params, [(list(key[1]), [y for _, y in groups[key]]) for key in keys], batch_size)
    for j, key in enumerate(keys):
      for c_pos, (c, _) in enumerate(groups[key]):
        sums[key[0]][c], greedy[key[0]][c] = float(s[j, c_pos]), bool(g[j, c_pos])
  return sums, greedy

"""Decoding for both model kinds: greedy, beam search and sampling.

Everything is one jit-compiled loop over a key-value cache. T5 runs its encoder
once and projects the cross-attention keys and values once; a decoder-only
model runs its prompt once (prefill) and then one token per step. Beam search
reorders the cache rows of each example's beams after every step.

The loops only ask two things of a model kind (`flanjax.models.kinds`), so the
three methods are written once for every kind:

  kind.decode_start(prompts)   -> logits of the first new token, cache state
  kind.decode_step(state, tok) -> logits of the next token, cache state

Beam search is a port of transformers' vectorised beam search (the version
with `early_stopping` and `length_penalty` applied to finished hypotheses as
score / generated_length ** length_penalty), so that for the same model the
best sequence is the one `generate(num_beams=..., do_sample=False)` returns.
Sampling applies temperature, then top-k, then top-p, as transformers does.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np

from flanjax.errors import UserError
from flanjax.models import kinds as kinds_lib

Array = Any
NEG = -1.0e9  # the "impossible" score transformers' beam search uses
METHODS = ("greedy", "beam", "sample")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DecodeConfig:
  """How to decode. `max_decode_len` counts new tokens, EOS included.

  stop: strings that end a generation: its text is cut before the first
  occurrence of any of them (after decoding; the loop itself runs to EOS or
  max_decode_len). A single string is one stop string.
  """
  method: str = "greedy"  # greedy | beam | sample
  max_decode_len: int = 64
  num_beams: int = 4  # beam
  length_penalty: float = 1.0  # beam: score / generated_length ** length_penalty
  early_stopping: bool = False  # beam: stop once num_beams hypotheses are finished
  temperature: float = 1.0  # sample
  top_k: int = 0  # sample: keep the k most likely tokens (0: all)
  top_p: float = 1.0  # sample: keep the smallest set with this much probability
  seed: int = 0  # sample
  stop: tuple[str, ...] = ()  # cut the text before the first of these

  @classmethod
  def with_default_length(cls, max_decode_len: int) -> "DecodeConfig":
    """The gin-configured DecodeConfig, whose max_decode_len is `max_decode_len` unless
    --gin.DecodeConfig.max_decode_len binds one (an explicit argument would override it)."""
    from flanjax import config as flan_config  # pylint: disable=g-import-not-at-top
    bound = flan_config.bound_value("DecodeConfig.max_decode_len")
    return cls(max_decode_len=max_decode_len if bound is None else int(bound))

  def __post_init__(self):
    stop = (self.stop,) if isinstance(self.stop, str) else self.stop
    if not isinstance(stop, (tuple, list)) or not all(isinstance(x, str) and x for x in stop):
      raise UserError(f"DecodeConfig.stop={self.stop!r}: give a tuple of non-empty strings, "
                      "e.g. ('\\n\\nQ:',)")
    object.__setattr__(self, "stop", tuple(stop))  # hashable: the config is a jit static
    if self.method not in METHODS:
      raise UserError(f"DecodeConfig.method={self.method!r}: use one of {', '.join(METHODS)}")
    if self.max_decode_len < 1:
      raise UserError(f"DecodeConfig.max_decode_len={self.max_decode_len}: must be >= 1")
    if self.method == "beam" and self.num_beams < 1:
      raise UserError(f"DecodeConfig.num_beams={self.num_beams}: must be >= 1")
    if self.method == "sample":
      if not self.temperature > 0:
        raise UserError(f"DecodeConfig.temperature={self.temperature}: must be > 0 "
                        "(for argmax decoding use method='greedy')")
      if not 0 < self.top_p <= 1:
        raise UserError(f"DecodeConfig.top_p={self.top_p}: must be in (0, 1]")
      if self.top_k < 0:
        raise UserError(f"DecodeConfig.top_k={self.top_k}: must be >= 0 (0 keeps all)")


# ---------------------------------------------------------------- logits warpers

def warp_logits(logits: Array, temperature: float = 1.0, top_k: int = 0,
                top_p: float = 1.0) -> Array:
  """Temperature, then top-k, then top-p filtering; removed tokens get -inf.

  Same rules as transformers' TemperatureLogitsWarper, TopKLogitsWarper and
  TopPLogitsWarper (top-p keeps at least the most likely token).
  """
  logits = logits.astype(jnp.float32)
  if temperature != 1.0:
    logits = logits / temperature
  vocab = logits.shape[-1]
  if 0 < top_k < vocab:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    order = jnp.argsort(logits, axis=-1)  # ascending
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    remove_sorted = (cum <= 1.0 - top_p).at[..., -1].set(False)
    remove = jnp.zeros_like(remove_sorted).at[
        jnp.arange(logits.shape[0])[:, None], order].set(remove_sorted)
    logits = jnp.where(remove, -jnp.inf, logits)
  return logits


# ---------------------------------------------------------------- the loops

def _token_loop(model, kind, variables, prompts, lengths, cfg: DecodeConfig, eos_id: int,
                rng):
  """Greedy or sampling: one token per row per step, until every row has EOS."""
  b = prompts.shape[0]
  max_len = cfg.max_decode_len
  logits, state = kind.decode_start(model, variables, prompts, lengths, max_len)
  out = jnp.zeros((b, max_len), jnp.int32)
  scores = jnp.zeros((b,), jnp.float32)
  done = jnp.zeros((b,), bool)

  def choose(logits, i):
    if cfg.method == "greedy":
      return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    warped = warp_logits(logits, cfg.temperature, cfg.top_k, cfg.top_p)
    return jax.random.categorical(jax.random.fold_in(rng, i), warped).astype(jnp.int32)

  def cond(carry):
    i, *_, done = carry
    return (i < max_len) & ~jnp.all(done)

  def body(carry):
    i, logits, state, out, scores, done = carry
    tok = choose(logits, i)
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32)),
                               tok[:, None], axis=-1)[:, 0]
    scores = scores + jnp.where(done, 0.0, logp)
    tok = jnp.where(done, 0, tok)
    out = out.at[:, i].set(tok)
    done = done | (tok == eos_id)
    logits, state = kind.decode_step(model, variables, state, tok, i)
    return i + 1, logits, state, out, scores, done

  carry = (0, logits, state, out, scores, done)
  _, _, _, out, scores, _ = jax.lax.while_loop(cond, body, carry)
  return out, scores


def _beam_loop(model, kind, variables, prompts, lengths, cfg: DecodeConfig, eos_id: int):
  """transformers' beam search (early_stopping True or False) on our cache."""
  b = prompts.shape[0]
  k, max_len, alpha = cfg.num_beams, cfg.max_decode_len, cfg.length_penalty
  keep = 2 * k  # candidates per step: enough that k stay alive even if k end here
  logits, state = kind.decode_start(model, variables, prompts, lengths, max_len)
  # The prompt is encoded once; each example's cache rows are copied to its beams.
  logits = jnp.repeat(logits, k, axis=0)
  state = jax.tree.map(lambda x: jnp.repeat(x, k, axis=0), state)
  vocab = logits.shape[-1]

  run_seq = jnp.zeros((b, k, max_len), jnp.int32)
  run_score = jnp.full((b, k), NEG, jnp.float32).at[:, 0].set(0.0)
  fin_seq = jnp.zeros((b, k, max_len), jnp.int32)
  fin_score = jnp.full((b, k), NEG, jnp.float32)
  fin_done = jnp.zeros((b, k), bool)
  open_ = jnp.ones((b,), bool)  # may a running beam still beat the finished ones?
  hits = jnp.zeros((b, keep), bool)
  top_mask = jnp.arange(keep) < k
  gather = lambda x, idx: jnp.take_along_axis(  # noqa: E731
      x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)

  def cond(c):
    i, *_, fin_done, open_, hits = c
    go = jnp.any(open_) & ~jnp.all(hits)
    if cfg.early_stopping:
      go = go & ~jnp.all(fin_done)
    return (i < max_len) & go

  def body(c):
    i, logits, state, run_seq, run_score, fin_seq, fin_score, fin_done, open_, _ = c
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1).reshape(b, k, vocab)
    logp = (logp + run_score[:, :, None]).reshape(b, k * vocab)
    top_lp, top_idx = jax.lax.top_k(logp, keep)
    src = top_idx // vocab
    tok = (top_idx % vocab).astype(jnp.int32)
    cand = gather(run_seq, src).at[:, :, i].set(tok)
    hits = (tok == eos_id) | (i + 1 >= max_len)

    # Running beams: the best k candidates that did not just end.
    alive_lp = top_lp + hits * NEG
    nxt = jax.lax.top_k(alive_lp, k)[1]
    run_seq = gather(cand, nxt)
    run_score = gather(alive_lp, nxt)
    run_src = gather(src, nxt)

    # Finished: candidates among the top k that ended, scored with the length penalty.
    fin_lp = top_lp / ((i + 1.0) ** alpha)
    if cfg.early_stopping:
      fin_lp = fin_lp + jnp.all(fin_done, axis=-1, keepdims=True) * NEG
    fin_lp = fin_lp + (~open_)[:, None] * NEG
    fin_lp = fin_lp + ~(hits & top_mask) * NEG
    m_seq = jnp.concatenate([fin_seq, cand], axis=1)
    m_score = jnp.concatenate([fin_score, fin_lp], axis=1)
    m_done = jnp.concatenate([fin_done, hits & top_mask], axis=1)
    best = jax.lax.top_k(m_score, k)[1]
    fin_seq, fin_score, fin_done = gather(m_seq, best), gather(m_score, best), gather(
        m_done, best)

    # Each running beam continues from the cache row of the beam it extends.
    rows = (jnp.arange(b)[:, None] * k + run_src).reshape(-1)
    state = jax.tree.map(lambda x: x[rows], state)
    logits, state = kind.decode_step(model, variables, state, run_seq[:, :, i].reshape(-1),
                                      i)

    # transformers' heuristic (early_stopping=False): the best running beam,
    # scored at its current length, against the worst finished one.
    best_running = run_score[:, :1] / ((i + 1.0) ** alpha)
    worst = jnp.where(fin_done, jnp.min(fin_score, axis=1, keepdims=True), NEG)
    open_ = open_ & jnp.any(best_running > worst, axis=-1)
    return i + 1, logits, state, run_seq, run_score, fin_seq, fin_score, fin_done, open_, hits

  carry = (0, logits, state, run_seq, run_score, fin_seq, fin_score, fin_done, open_, hits)
  carry = jax.lax.while_loop(cond, body, carry)
  fin_seq, fin_score = carry[5], carry[6]
  return fin_seq[:, 0], fin_score[:, 0]


@functools.partial(jax.jit, static_argnames=("model", "kind", "config", "eos_id"))
def _generate(model, params, prompts, lengths, rng, *, kind, config: DecodeConfig, eos_id: int):
  variables = {"params": params}
  if config.method == "beam":
    return _beam_loop(model, kind, variables, prompts, lengths, config, eos_id)
  return _token_loop(model, kind, variables, prompts, lengths, config, eos_id, rng)


def generate_with_scores(model, params, prompts, prompt_lengths=None,
                         config: DecodeConfig = DecodeConfig(), eos_id: int = 1,
                         kind=None, rng=None):
  """(ids [b, max_decode_len] with 0 after each row's EOS, scores [b]).

  prompts [b, p]: T5's encoder inputs (0-padded), or a decoder's prompts,
  right-padded to `prompt_lengths` (default: all of p). kind: a
  `kinds.ModelKind` or its name (default: the module's own, a Decoder read
  causally); kinds.PREFIX_LM lets the prompt attend to itself both ways, as
  flanjax trains a decoder-only model.
  Scores: the sum of the chosen tokens' log-probabilities (greedy, sample),
  or the beam's score (that sum / length ** length_penalty).
  """
  kind = kinds_lib.get(kind) if kind is not None else kinds_lib.for_module(model)
  prompts = jnp.asarray(prompts, jnp.int32)
  b, p = prompts.shape
  lengths = (jnp.full((b,), p, jnp.int32) if prompt_lengths is None
             else jnp.asarray(prompt_lengths, jnp.int32))
  if rng is None:
    rng = jax.random.PRNGKey(config.seed)
  # The seed only makes rng, and stop strings act on the text afterwards: leaving them
  # out of the static config spares a recompile.
  ids, scores = _generate(model, params, prompts, lengths, rng, kind=kind,
                          config=dataclasses.replace(config, seed=0, stop=()),
                          eos_id=int(eos_id))
  return np.asarray(ids), np.asarray(scores)


def generate(model, params, prompts, prompt_lengths=None, config: DecodeConfig = DecodeConfig(),
             eos_id: int = 1, kind=None, rng=None) -> np.ndarray:
  """[b, max_decode_len] new token ids, 0 after each row's EOS (see generate_with_scores)."""
  return generate_with_scores(model, params, prompts, prompt_lengths, config, eos_id, kind,
                              rng)[0]


# ---------------------------------------------------------------- text in, text out

def strip_eos(ids: Sequence[int], eos_id: int) -> list[int]:
  ids = list(ids)
  return ids[:ids.index(eos_id)] if eos_id in ids else ids


def stop_at(text: str, stop: Sequence[str]) -> int | None:
  """Where the first stop string in `text` starts, or None if there is none."""
  found = [at for at in (text.find(s) for s in stop if s) if at >= 0]
  return min(found) if found else None


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
  """The text before the first occurrence of any stop string (all of it if none occurs)."""
  at = stop_at(text, stop)
  return text if at is None else text[:at]


def cut_ids_at_stop(ids: Sequence[int], vocab, stop: Sequence[str]) -> list[int]:
  """The fewest leading ids whose text holds everything before the first stop string.

  What the text cut keeps, at token granularity: when a token straddles the
  start of the stop string, it is kept, so its text may end in the first
  characters of the stop string (never in the text after it); `cut_at_stop` on
  the decoded ids gives the exact text.
  """
  ids = list(ids)
  if not stop:
    return ids
  at = stop_at(vocab.decode(ids), stop)
  if at is None:
    return ids
  lo, hi = 0, len(ids)  # the smallest k with len(decode(ids[:k])) >= at
  while lo < hi:
    mid = (lo + hi) // 2
    if len(vocab.decode(ids[:mid])) >= at:
      hi = mid
    else:
      lo = mid + 1
  return ids[:lo]


class Generator:
  """Batched generation over lists of prompts, for infer, evaluation and harnesses.

  input_length: the longest prompt in tokens. A longer prompt is cut by the
  kind's rule (`ModelKind.fit_prompt`): T5 and prefix-LM keep the first
  `input_length - 1` tokens and EOS, as training saw them (seqio's trim); a
  causal LM keeps its last tokens, which it continues.
  Batches have a fixed size and prompts are padded to a few bucketed lengths,
  so one compilation serves many batches.
  """

  def __init__(self, model, params, vocab, input_length: int, config: DecodeConfig,
               batch_size: int = 16, kind=None):
    self.model, self.params, self.vocab = model, params, vocab
    self.kind = kinds_lib.get(kind) if kind is not None else kinds_lib.for_module(model)
    self.input_length, self.config, self.batch_size = input_length, config, batch_size
    self.eos_id = vocab.eos_id
    self.truncated = 0  # prompts cut to input_length so far

  def encode(self, text: str) -> np.ndarray:
    """A prompt's ids as the model was trained to read them."""
    return np.asarray(self.kind.prompt_ids(self.vocab, text), np.int32)

  def _prompt_rows(self, inputs: Sequence[np.ndarray]):
    rows = []
    for r in inputs:
      r = np.asarray(r, np.int32)
      if len(r) > self.input_length:
        self.truncated += 1
        r = self.kind.fit_prompt(r, self.input_length, self.eos_id)
      rows.append(self.kind.decode_prompt(r))
    return rows

  def generate_ids(self, inputs: Sequence[np.ndarray], with_scores: bool = False):
    """inputs: prompt id arrays (from `encode`) -> new ids, EOS stripped.

    With stop strings (DecodeConfig.stop), each row's ids end where its text
    reaches the first stop string (`cut_ids_at_stop`); `decode` gives the exact
    text. Scores are those of the whole generation, before the cut.
    """
    limit = getattr(getattr(self.model, "config", None), "vocab_size", None)
    for r in inputs if limit else ():
      if len(r) and int(np.max(r)) >= limit:
        # Past the embedding table an id reads garbage (NaN scores) instead of failing.
        raise UserError(f"a prompt holds token id {int(np.max(r))}, but the model has "
                        f"{limit} embeddings: its tokenizer is larger than the model's "
                        "vocabulary; give the tokenizer the model was trained with")
    rows = self._prompt_rows(inputs)
    out, scores = [None] * len(rows), [None] * len(rows)
    extra = self.kind.prompt_extra()
    # Longest first: a batch holds prompts of like length, so little of it is padding.
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    for start in range(0, len(rows), self.batch_size):
      which = order[start:start + self.batch_size]
      chunk = [rows[i] for i in which]
      width = kinds_lib.bucket(max(len(r) for r in chunk), cap=self.input_length + extra)
      prompts = np.zeros((self.batch_size, width), np.int32)
      lengths = np.ones((self.batch_size,), np.int32)
      for j, r in enumerate(chunk):
        prompts[j, :len(r)] = r
        lengths[j] = max(len(r), 1)
      ids, sc = generate_with_scores(self.model, self.params, prompts, lengths, self.config,
                                     self.eos_id, self.kind)
      for j, i in enumerate(which):
        out[i] = cut_ids_at_stop(strip_eos(ids[j].tolist(), self.eos_id), self.vocab,
                                 self.config.stop)
        scores[i] = float(sc[j])
    return (out, scores) if with_scores else out

  def decode(self, ids: Sequence[int]) -> str:
    """The text of generated ids, cut before the first stop string."""
    return cut_at_stop(self.vocab.decode(list(ids)), self.config.stop)

  def generate_text(self, prompts: Sequence[str], with_scores: bool = False):
    ids = self.generate_ids([self.encode(p) for p in prompts], with_scores=with_scores)
    if with_scores:
      ids, scores = ids
      return [self.decode(x) for x in ids], scores
    return [self.decode(x) for x in ids]

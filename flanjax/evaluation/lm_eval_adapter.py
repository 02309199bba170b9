"""EleutherAI's lm-evaluation-harness over a flanjax checkpoint: the model "flanjax".

    pip install 'flanjax[lm_eval]'
    python -m flanjax.evaluation.lm_eval_adapter --model_args checkpoint=runs/flan_cot,batch_size=8 \\
        --include_path my_tasks/ --tasks my_task

That command is lm_eval's own (every lm_eval flag works) with the flanjax model
registered and `--model flanjax` implied. From Python:

    import flanjax.evaluation.lm_eval_adapter  # registers "flanjax"
    lm_eval.simple_evaluate(model="flanjax", model_args="checkpoint=...", tasks=[...])

model_args: checkpoint (a training run, a converted orbax directory or a Hugging
Face directory), step, batch_size (16), max_length (2048: the longest prompt,
or decoder row, in tokens), max_gen_toks (256), add_bos (causal LMs: start
prompts with BOS when the tokenizer has one; default true).

How text becomes tokens, per kind (lm_eval's conventions for seq2seq and causal models):

  T5         context + EOS to the encoder; the continuation's tokens, no EOS,
             teacher-forced in the decoder
  prefix-LM  (a flanjax-trained decoder) [0, context..., EOS, continuation...],
             the context attending both ways, as it was trained
  causal LM  (an imported Llama) [BOS] + context + continuation, tokenized together
             and split after the context's tokens

A context's trailing spaces move to the continuation, and an empty context is
BOS (or EOS). Over-long requests are cut by the model kind's one rule
(flanjax.evaluation.scoring). generate_until decodes
(greedy, or sampling when do_sample) up to max_gen_toks new tokens, then cuts
the text at the first `until` string.
"""

from __future__ import annotations

import sys
from typing import Sequence

import numpy as np

from flanjax.errors import UserError
from flanjax.evaluation import scoring
from flanjax.models import kinds

try:
  from lm_eval.api.model import LM
  HAVE_LM_EVAL = True
except ImportError:  # the optional extra is not installed
  HAVE_LM_EVAL = False
  LM = object

INSTALL_HINT = "lm_eval is not installed: pip install 'flanjax[lm_eval]' (lm_eval>=0.4.9,<0.5)"


def _bool(value) -> bool:
  if isinstance(value, str):
    return value.strip().lower() in ("1", "true", "yes", "y")
  return bool(value)


class FlanjaxLM(LM):
  """lm_eval's LM interface (loglikelihood, loglikelihood_rolling, generate_until)."""

  def __init__(self, checkpoint: str | None = None, step=None, batch_size=16,
               max_length=2048, max_gen_toks=256, add_bos=True, loaded=None, **kwargs):
    if not HAVE_LM_EVAL:
      raise UserError(INSTALL_HINT)
    super().__init__()
    del kwargs  # lm_eval also passes max_batch_size and device
    if loaded is None:
      if not checkpoint:
        raise UserError("the flanjax model needs model_args checkpoint=PATH (a training run, a "
                        "converted orbax directory or a Hugging Face directory)")
      from flanjax.models import loading  # pylint: disable=g-import-not-at-top
      loaded = loading.load(checkpoint, step=None if step in (None, "") else int(step))
    self.loaded = loaded
    self.model, self.params, self.vocab = loaded.model, loaded.params, loaded.vocab
    self.kind = loaded.kind
    # lm_eval's own conventions for causal LMs (BOS, the join of context and continuation).
    self.causal = self.kind is kinds.DECODER
    self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16  # "auto" -> 16
    self.max_length = int(max_length)
    self.max_gen_toks = int(max_gen_toks)
    self.eos_id = self.vocab.eos_id
    self.bos_id = None
    if self.causal and _bool(add_bos):
      try:
        bos = self.vocab.bos_id
      except (NotImplementedError, AttributeError):
        bos = None
      self.bos_id = bos if isinstance(bos, int) and bos >= 0 else None
    self._generators = {}

  @classmethod
  def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
    """model_args win over the command line's --batch_size/--device (lm_eval passes both)."""
    from lm_eval import utils  # pylint: disable=g-import-not-at-top
    return cls.create_from_arg_obj(utils.simple_parse_args_string(arg_string), additional_config)

  @classmethod
  def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
    extra = {k: v for k, v in (additional_config or {}).items()
             if v is not None and k not in arg_dict}
    return cls(**arg_dict, **extra)

  # ---------------------------------------------------------------- tokens

  @property
  def prefix_token_id(self) -> int:
    """What an empty context (and the first rolling window) conditions on."""
    return self.bos_id if self.bos_id is not None else self.eos_id

  def tok_encode(self, text: str) -> list[int]:
    return [int(i) for i in self.vocab.encode(text)] if text else []

  def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as the model scores them (module docstring)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
      context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    if self.causal:
      if not context:
        return [self.prefix_token_id], self.tok_encode(continuation)
      prefix = [self.bos_id] if self.bos_id is not None else []
      whole = self.tok_encode(context + continuation)
      ctx = self.tok_encode(context)
      if whole[:len(ctx)] != ctx:  # the join re-tokenized the boundary: split at the text
        return prefix + ctx, self.tok_encode(continuation)
      return prefix + ctx, whole[len(ctx):]
    return self.tok_encode(context) + [self.eos_id], self.tok_encode(continuation)

  def _score(self, contexts, continuations):
    return scoring.loglikelihood(
        self.model, self.params, self.kind, contexts, continuations,
        batch_size=self.batch_size, max_length=self.max_length, max_target_length=self.max_length)

  # ---------------------------------------------------------------- lm_eval's interface

  def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
    pairs = [self.encode_pair(*req.args) for req in requests]
    if not pairs:
      return []
    sums, greedy = self._score([p[0] for p in pairs], [p[1] for p in pairs])
    out = [(float(s), bool(g)) for s, g in zip(sums, greedy)]
    for req, res in zip(requests, out):
      self.cache_hook.add_partial("loglikelihood", req.args, res)
    return out

  def rolling_windows(self, text: str) -> list[tuple[list[int], list[int]]]:
    """Disjoint windows of at most max_length tokens that predict every token of `text` once."""
    from lm_eval import utils  # pylint: disable=g-import-not-at-top
    tokens = self.tok_encode(text)
    if not tokens:
      return []
    window = self.max_length - self.kind.prompt_extra()
    wins = [utils.make_disjoint_window(w) for w in utils.get_rolling_token_windows(
        token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=window, context_len=1)]
    if self.causal:
      return wins
    # T5 and prefix-LM: the window's context is the input, with its EOS.
    return [(ctx + [self.eos_id] if ctx != [self.eos_id] else ctx, cont) for ctx, cont in wins]

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    windows, owner = [], []
    for i, req in enumerate(requests):
      for w in self.rolling_windows(req.args[0]):
        windows.append(w)
        owner.append(i)
    totals = np.zeros([len(requests)], np.float64)
    if windows:
      sums, _ = self._score([w[0] for w in windows], [w[1] for w in windows])
      np.add.at(totals, np.asarray(owner), sums)
    out = [float(t) for t in totals]
    for req, res in zip(requests, out):
      self.cache_hook.add_partial("loglikelihood_rolling", req.args, res)
    return out

  def _generator(self, gen_kwargs: dict):
    from flanjax import decoding  # pylint: disable=g-import-not-at-top
    max_new = int(gen_kwargs.get("max_gen_toks", self.max_gen_toks))
    temperature = float(gen_kwargs.get("temperature", 0.0) or 0.0)
    sample = _bool(gen_kwargs.get("do_sample", False)) and temperature > 0
    if sample:
      cfg = decoding.DecodeConfig(method="sample", max_decode_len=max_new, temperature=temperature,
                                  top_k=int(gen_kwargs.get("top_k", 0) or 0),
                                  top_p=float(gen_kwargs.get("top_p", 1.0) or 1.0),
                                  seed=int(gen_kwargs.get("seed", 0) or 0))
    else:
      cfg = decoding.DecodeConfig(method="greedy", max_decode_len=max_new)
    if cfg not in self._generators:
      self._generators[cfg] = decoding.Generator(
          self.model, self.params, self.vocab, self.max_length, cfg, batch_size=self.batch_size,
          kind=self.kind)
    return self._generators[cfg]

  def prompt_ids(self, context: str) -> np.ndarray:
    ids = self.tok_encode(context)
    if self.causal:
      ids = ([self.bos_id] if self.bos_id is not None else []) + ids
      return np.asarray(ids or [self.prefix_token_id], np.int32)
    return np.asarray(ids + [self.eos_id], np.int32)

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    groups: dict = {}
    for i, req in enumerate(requests):
      context, gen_kwargs = req.args
      gen_kwargs = dict(gen_kwargs or {})
      until = gen_kwargs.pop("until", None)
      until = [until] if isinstance(until, str) else list(until or [])
      gen = self._generator(gen_kwargs)
      groups.setdefault(id(gen), (gen, []))[1].append((i, context, until))
    out = [""] * len(requests)
    for gen, items in groups.values():
      ids = gen.generate_ids([self.prompt_ids(c) for _, c, _ in items])
      for (i, _, until), new in zip(items, ids):
        out[i] = cut_at(self.vocab.decode(new), until)
    for req, res in zip(requests, out):
      self.cache_hook.add_partial("generate_until", req.args, res)
    return out


def cut_at(text: str, until: Sequence[str]) -> str:
  """The text before the first occurrence of any stop string."""
  end = len(text)
  for stop in until:
    if stop:
      at = text.find(stop)
      if 0 <= at < end:
        end = at
  return text[:end]


def register(name: str = "flanjax") -> None:
  """Registers FlanjaxLM with lm_eval under `name` (once; importing this module does it)."""
  if not HAVE_LM_EVAL:
    raise UserError(INSTALL_HINT)
  from lm_eval.api.registry import model_registry  # pylint: disable=g-import-not-at-top
  if name not in model_registry:
    model_registry.register(name)(FlanjaxLM)


if HAVE_LM_EVAL and __name__ != "__main__":
  register()


def main(argv=None):
  """lm_eval's command line with the flanjax model registered (--model flanjax by default)."""
  from flanjax import config as flan_config  # pylint: disable=g-import-not-at-top

  def run():
    if not HAVE_LM_EVAL:
      raise UserError(INSTALL_HINT)
    from lm_eval.__main__ import cli_evaluate  # pylint: disable=g-import-not-at-top
    args = list(sys.argv[1:] if argv is None else argv)
    sub = args[:1] if args[:1] and args[0] in ("run", "ls", "validate") else []
    rest = args[len(sub):]
    if sub in ([], ["run"]) and not any(a == "--model" or a.startswith("--model=") for a in rest):
      rest = ["--model", "flanjax"] + rest
    sys.argv = ["lm_eval"] + (sub or ["run"]) + rest
    return cli_evaluate()

  flan_config.guarded(run, "flanjax.evaluation.lm_eval_adapter")


if __name__ == "__main__":
  # The module by its name (registered once), not this __main__ copy of it.
  from flanjax.evaluation.lm_eval_adapter import main as _main  # pylint: disable=g-import-not-at-top,import-self
  _main()

"""Model kinds: the one place that knows how an encoder-decoder differs from a decoder-only model.

Three kinds, one name each, used everywhere (packing, pipeline, training,
decoding, scoring, evaluation, loading):

  enc_dec    T5: the encoder reads the inputs (+ EOS), the decoder the targets.
  prefix_lm  a decoder-only model as flanjax trains it: one row
             [0, inputs..., EOS, targets...], the 0 and the inputs attending both
             ways, loss on the targets only.
  decoder    a causal decoder-only model (an imported Llama, or one trained with
             train.decoder_objective='causal'): it continues BOS + text; its training
             rows are BOS + inputs + targets, read left to right.

A kind owns building the module from its config, the init batch, the packing
layout, how a prompt and a continuation are encoded, how an over-long prompt
is cut, and decoding's start and step (the cache each kind keeps). Everything
else asks the kind (t5x's EncoderDecoderModel / DecoderOnlyModel split).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flanjax.errors import UserError
from flanjax.models import decoder as decoder_lib
from flanjax.models import t5 as t5_lib


def bos_id(vocab) -> int | None:
  """The vocabulary's BOS id, or None when it has none (SentencePiece T5 vocabularies)."""
  try:
    bos = vocab.bos_id
  except (NotImplementedError, AttributeError):
    return None
  return bos if isinstance(bos, (int, np.integer)) and bos >= 0 else None


def adds_bos(vocab) -> bool:
  """Whether a text starts with BOS, as the tokenizer says (a tokenizer.json vocabulary:
  its post-processor, `add_bos`); a vocabulary that does not say adds one if it has one."""
  flag = getattr(vocab, "add_bos", None)
  return bos_id(vocab) is not None and (flag is None or bool(flag))


def trim_end(ids: np.ndarray, length: int, eos_id: int) -> np.ndarray:
  """At most `length` tokens ending in EOS: the start kept, as seqio's
  append_eos_after_trim feeds training (few-shot prompts drop exemplars first)."""
  ids = np.asarray(ids, np.int32)
  if len(ids) <= length:
    return ids
  return np.concatenate([ids[:length - 1], [eos_id]]).astype(np.int32)


class ModelKind:
  """What differs between model kinds. Instances are immutable and hashable (jit-static)."""

  name: str = ""
  config_type: str = ""  # the "type" of model_config.json: "t5" or "decoder"
  config_class: type = object
  # Prompt tuning: the virtual tokens that start each example's inputs (with_soft_prompt).
  virtual_tokens: tuple = ()

  # -------------------------------------------------------------- building
  def build(self, cfg):
    raise NotImplementedError

  def dummy_batch(self, batch_size: int = 1, input_len: int = 8, target_len: int = 8) -> dict:
    raise NotImplementedError

  def model_inputs(self, batch: dict) -> dict:
    raise NotImplementedError

  def describe(self, cfg) -> str:
    raise NotImplementedError

  # -------------------------------------------------------------- data layout
  @property
  def packing_kind(self) -> str:
    return self.name

  def required_lengths(self) -> tuple[str, ...]:
    return ("inputs", "targets")

  def rows_text(self, lengths) -> str:
    """The shape of one training row, for the console."""
    raise NotImplementedError

  # -------------------------------------------------------------- prompts
  def prompt_ids(self, vocab, text: str) -> list[int]:
    """A prompt's ids as the model was trained to read it: inputs + EOS."""
    return [int(i) for i in vocab.encode(text)] + [int(vocab.eos_id)]

  def continuation_ids(self, vocab, text: str, context: str) -> list[int]:
    """A target as the model scores it: its tokens and EOS."""
    del context
    return [int(i) for i in vocab.encode(text)] + [int(vocab.eos_id)]

  def fit_prompt(self, ids: np.ndarray, input_length: int, eos_id: int) -> np.ndarray:
    """A prompt cut to `input_length` (the one truncation rule: keep the start and EOS)."""
    return trim_end(ids, input_length, eos_id)

  def decode_prompt(self, ids: np.ndarray) -> np.ndarray:
    """The row decoding starts from, given the (fitted) prompt ids."""
    return np.asarray(ids, np.int32)

  def prompt_extra(self) -> int:
    """Positions decode_prompt adds to a prompt."""
    return 0

  def score_length(self, input_length: int) -> int:
    """The longest row log-likelihood scoring builds for prompts of `input_length`."""
    return input_length + 1024

  # -------------------------------------------------------------- scoring
  def score_request(self, ctx: list, cont: list, max_length: int | None,
                    max_target_length: int | None) -> tuple[list, list, int]:
    """(context, continuation, row length) fitted to the lengths (see evaluation.scoring)."""
    raise NotImplementedError

  def score_batch(self, model, params, chunk, batch_size: int):
    """chunk: [(context, continuation)] -> (log-likelihood sums, all-greedy) per row."""
    raise NotImplementedError

  # -------------------------------------------------------------- decoding
  def decode_start(self, model, variables, prompts, lengths, max_len: int):
    """(logits [b, vocab] of the first new token, cache state)."""
    raise NotImplementedError

  def decode_step(self, model, variables, state, token, i):
    """Feeds token [b], the i-th new token (from 0) -> (logits of the next, state)."""
    raise NotImplementedError

  def __repr__(self):
    return f"<model kind {self.name}>"


class EncoderDecoder(ModelKind):
  name = "enc_dec"
  config_type = "t5"
  config_class = t5_lib.T5Config

  def build(self, cfg):
    return t5_lib.T5(cfg)

  def dummy_batch(self, batch_size=1, input_len=8, target_len=8):
    return t5_lib.dummy_batch(batch_size, input_len, target_len)

  def model_inputs(self, batch):
    return t5_lib.model_inputs(batch)

  def describe(self, cfg):
    return f"T5 {cfg.d_model}d x {cfg.num_encoder_layers}+{cfg.num_decoder_layers} layers"

  def rows_text(self, lengths):
    return f"({lengths['inputs']} + {lengths['targets']})"

  def score_length(self, input_length):
    return input_length

  def score_request(self, ctx, cont, max_length, max_target_length):
    if max_target_length is not None and len(cont) > max_target_length:
      cont = cont[:max_target_length]
    if max_length is not None and len(ctx) > max_length:
      ctx = list(trim_end(ctx, max_length, ctx[-1]))  # the start and the closing EOS
    return ctx, cont, len(ctx) + len(cont)

  def score_batch(self, model, params, chunk, batch_size):
    le = bucket(max(len(c) for c, _ in chunk))
    ld = bucket(max(len(y) for _, y in chunk), minimum=8)
    enc = np.zeros((batch_size, le), np.int32)
    dec_in = np.zeros((batch_size, ld), np.int32)
    tgt = np.zeros((batch_size, ld), np.int32)
    w = np.zeros((batch_size, ld), np.int32)
    for j, (ctx, cont) in enumerate(chunk):
      enc[j, :len(ctx)] = ctx
      dec_in[j, 1:len(cont)] = cont[:-1]
      tgt[j, :len(cont)] = cont
      w[j, :len(cont)] = 1
    return _t5_scores(model, params, enc, dec_in, tgt, w)

  def decode_start(self, model, variables, prompts, lengths, max_len):
    del lengths  # T5 prompts are 0-padded; the encoder masks the padding
    encoded = model.apply(variables, prompts, method=model.encode)
    cache = model.apply(variables, encoded, prompts, max_len, method=model.init_decode_state)
    b = prompts.shape[0]
    # T5 starts the decoder from the pad id, 0, at position 0.
    logits, cache = model.apply(variables, cache, prompts, jnp.zeros((b,), jnp.int32), 0,
                                method=model.decode_step)
    return logits, {"t5": cache, "encoder_input_tokens": prompts}

  def decode_step(self, model, variables, state, token, i):
    logits, cache = model.apply(variables, state["t5"], state["encoder_input_tokens"], token,
                                i + 1, method=model.decode_step)
    return logits, {"t5": cache, "encoder_input_tokens": state["encoder_input_tokens"]}


class _DecoderOnly(ModelKind):
  config_type = "decoder"
  config_class = decoder_lib.DecoderConfig
  _bidirectional_prompt = False

  def build(self, cfg):
    return decoder_lib.Decoder(cfg)

  def dummy_batch(self, batch_size=1, input_len=8, target_len=8):
    return decoder_lib.dummy_batch(batch_size, input_len, target_len)

  def model_inputs(self, batch):
    return decoder_lib.model_inputs(batch)

  def describe(self, cfg):
    return (f"decoder-only {cfg.d_model}d x {cfg.num_layers} layers, {cfg.num_heads} heads "
            f"({cfg.num_kv_heads} kv), {self.label}")

  def rows_text(self, lengths):
    return (f"{lengths['inputs'] + lengths['targets']} ({self.label}: {lengths['inputs']} "
            f"inputs + {lengths['targets']} targets)")

  def score_request(self, ctx, cont, max_length, max_target_length):
    del max_target_length
    prefix = [0] if self._bidirectional_prompt else []
    if max_length is not None:
      ctx, cont = self._fit_scored(ctx, cont, max_length - len(prefix))
    if not prefix and not ctx:
      raise ValueError("a causal decoder needs a non-empty context to predict the first "
                       "continuation token (give BOS)")
    return prefix + ctx, cont, len(prefix) + len(ctx) + len(cont) - 1

  def _fit_scored(self, ctx, cont, budget):
    return left_trim(ctx, cont, budget)

  def score_batch(self, model, params, chunk, batch_size):
    length = bucket(max(len(c) + len(y) - 1 for c, y in chunk))
    tok = np.zeros((batch_size, length), np.int32)
    both_ways = np.zeros((batch_size, length), np.int32)
    tgt = np.zeros((batch_size, length), np.int32)
    w = np.zeros((batch_size, length), np.int32)
    for j, (ctx, cont) in enumerate(chunk):
      row = ctx + cont
      tok[j, :len(row) - 1] = row[:-1]
      tgt[j, :len(row) - 1] = row[1:]
      w[j, len(ctx) - 1:len(row) - 1] = 1
      if self._bidirectional_prompt:
        both_ways[j, :len(ctx)] = 1
    return _decoder_scores(model, params, tok, both_ways, tgt, w)

  def decode_start(self, model, variables, prompts, lengths, max_len):
    b, p = prompts.shape
    state = model.apply(variables, b, p + max_len, method=model.init_decode_state)
    both_ways = ((jnp.arange(p)[None, :] < lengths[:, None]).astype(jnp.int32)
                 if self._bidirectional_prompt else None)
    return model.apply(variables, state, prompts, lengths, both_ways, method=model.prefill)

  def decode_step(self, model, variables, state, token, i):
    del i  # the cache keeps each row's position
    return model.apply(variables, state, token, method=model.decode_step)


class PrefixLM(_DecoderOnly):
  name = "prefix_lm"
  label = "prefix-LM"
  _bidirectional_prompt = True

  def decode_prompt(self, ids):
    # A packed prefix-LM row starts with 0, then the inputs and their EOS.
    return np.concatenate([[0], np.asarray(ids, np.int32)]).astype(np.int32)

  def prompt_extra(self):
    return 1

  def _fit_scored(self, ctx, cont, budget):
    # The one truncation rule: the inputs keep their start and EOS, as in training.
    over = len(ctx) + len(cont) - budget
    if 0 < over < len(ctx) - 1:
      return list(trim_end(ctx, len(ctx) - over, ctx[-1])), cont
    return left_trim(ctx, cont, budget)


class CausalDecoder(_DecoderOnly):
  name = "decoder"
  label = "causal"

  @property
  def packing_kind(self) -> str:
    return "causal"  # rows of BOS + inputs + targets, as prompt_ids reads a prompt

  def prompt_ids(self, vocab, text):
    # A causal LM continues BOS + text when its tokenizer adds BOS (not twice: a chat
    # template may have written it), else the text alone.
    ids = [int(i) for i in vocab.encode(text)]
    bos = bos_id(vocab)
    if adds_bos(vocab) and not (ids and ids[0] == bos):
      ids = [bos] + ids
    return ids or [int(vocab.eos_id) if bos is None else bos]

  def continuation_ids(self, vocab, text, context):
    sep = "" if not context or context[-1].isspace() else " "
    return [int(i) for i in vocab.encode(sep + text)]

  def fit_prompt(self, ids, input_length, eos_id):
    del eos_id
    # A causal LM continues its prompt: the end is what it must see.
    ids = np.asarray(ids, np.int32)
    return ids[-input_length:] if len(ids) > input_length else ids



class SoftPrompted(ModelKind):
  """A kind whose prompts start with a soft prompt's virtual tokens (prompt tuning,
  models/prompt_tuning.py): where the inputs start, i.e. after a prefix-LM row's 0."""

  def __init__(self, inner: ModelKind, virtual_tokens: Sequence[int]):
    self.inner, self.virtual_tokens = inner, tuple(int(i) for i in virtual_tokens)
    for attr in ("name", "config_type", "config_class"):
      setattr(self, attr, getattr(inner, attr))
    self._at = len(inner.decode_prompt(np.zeros(0, np.int32)))

  def __eq__(self, other):
    return (isinstance(other, SoftPrompted) and other.inner is self.inner
            and other.virtual_tokens == self.virtual_tokens)

  def __hash__(self):
    return hash((self.inner.name, self.virtual_tokens))

  def __getattr__(self, attr):  # everything not below is the inner kind's
    if attr == "inner":
      raise AttributeError(attr)
    return getattr(self.inner, attr)

  def _insert(self, row):
    row = list(row)
    return row[:self._at] + list(self.virtual_tokens) + row[self._at:]

  def decode_prompt(self, ids):
    return np.asarray(self._insert(self.inner.decode_prompt(ids)), np.int32)

  def prompt_extra(self):
    return self.inner.prompt_extra() + len(self.virtual_tokens)

  def score_length(self, input_length):
    return self.inner.score_length(input_length) + len(self.virtual_tokens)

  def rows_text(self, lengths):
    n = len(self.virtual_tokens)  # rows hold them beyond the inputs' length
    return self.inner.rows_text({**lengths, "inputs": int(lengths["inputs"]) + n})

  def score_request(self, ctx, cont, max_length, max_target_length):
    n = len(self.virtual_tokens)
    ctx, cont, size = self.inner.score_request(
        ctx, cont, None if max_length is None else max_length - n, max_target_length)
    return self._insert(ctx), cont, size + n

  def __repr__(self):
    return f"<model kind {self.name} with {len(self.virtual_tokens)} virtual tokens>"


def _delegated(attr, value):
  if isinstance(value, property):
    return property(lambda self: getattr(self.inner, attr))
  return lambda self, *args, **kwargs: getattr(self.inner, attr)(*args, **kwargs)


# ModelKind's own methods would shadow __getattr__: the inner kind's answer them.
for _attr, _value in list(vars(ModelKind).items()):
  if (callable(_value) or isinstance(_value, property)) and not _attr.startswith("__") \
      and _attr not in vars(SoftPrompted):
    setattr(SoftPrompted, _attr, _delegated(_attr, _value))


def with_soft_prompt(kind: ModelKind, virtual_tokens: Sequence[int]) -> ModelKind:
  """`kind` with prompts that start with these virtual tokens (none: kind itself)."""
  kind = getattr(kind, "inner", kind)
  return SoftPrompted(kind, virtual_tokens) if virtual_tokens else kind


ENC_DEC = EncoderDecoder()
PREFIX_LM = PrefixLM()
DECODER = CausalDecoder()
ALL = (ENC_DEC, PREFIX_LM, DECODER)
NAMES = tuple(k.name for k in ALL)


def get(name_or_kind) -> ModelKind:
  """A kind by name ('enc_dec', 'prefix_lm', 'decoder'), or the kind itself."""
  if isinstance(name_or_kind, ModelKind):
    return name_or_kind
  for k in ALL:
    if k.name == name_or_kind:
      return k
  raise UserError(f"model kind {name_or_kind!r} is not one of {', '.join(NAMES)}")


def for_config(cfg, trained_by_flanjax: bool = True) -> ModelKind:
  """The kind of a model config: T5 -> enc_dec; a decoder config -> prefix_lm as flanjax
  trains it, or decoder (causal) for an imported model."""
  if isinstance(cfg, t5_lib.T5Config):
    return ENC_DEC
  if isinstance(cfg, decoder_lib.DecoderConfig):
    return PREFIX_LM if trained_by_flanjax else DECODER
  raise UserError(f"a model config must be @T5Config() or @DecoderConfig(), "
                  f"not {type(cfg).__name__}")


OBJECTIVES = ("prefix_lm", "causal")  # train.decoder_objective


def for_training(cfg, decoder_objective: str = "prefix_lm") -> ModelKind:
  """The kind a run trains: T5's, or a decoder's by train.decoder_objective."""
  if decoder_objective not in OBJECTIVES:
    raise UserError(f"train.decoder_objective={decoder_objective!r}: give one of "
                    f"{', '.join(OBJECTIVES)}")
  kind = for_config(cfg)
  return DECODER if decoder_objective == "causal" and kind is PREFIX_LM else kind


def for_module(model, prefix_lm: bool = False) -> ModelKind:
  """The kind of a built module (a T5, or a Decoder read causally unless prefix_lm)."""
  if isinstance(model, decoder_lib.Decoder):
    return PREFIX_LM if prefix_lm else DECODER
  if isinstance(model, t5_lib.T5):
    return ENC_DEC
  raise TypeError(f"no model kind known for {type(model).__name__}")


def config_classes() -> dict:
  """model_config.json "type" -> config class."""
  return {k.config_type: k.config_class for k in (ENC_DEC, DECODER)}


def config_type(cfg) -> str:
  return for_config(cfg).config_type


# ---------------------------------------------------------------- scoring helpers

def bucket(n: int, minimum: int = 16, cap: int | None = None) -> int:
  """The padded length of a row of n tokens, for decoding and scoring alike: a power of
  two (at least `minimum`) up to 512, then a multiple of 256, so jit compiles rarely and
  long rows (attention is quadratic) pad little; at most `cap` when given."""
  n = max(int(n), 1)
  out = max(minimum, 1 << (n - 1).bit_length()) if n <= 512 else -(-n // 256) * 256
  return min(out, cap) if cap is not None else out


def left_trim(ctx: list, cont: list, budget: int):
  """(context, continuation) with at most `budget` tokens in all, the end kept."""
  over = len(ctx) + len(cont) - budget
  if over <= 0:
    return ctx, cont
  if over <= len(ctx):
    return ctx[over:], cont
  # The continuation alone does not fit: its first tokens become context.
  cont = cont[over - len(ctx):]
  return cont[:1], cont[1:]


def _gather(logits, targets, weights):
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  tok = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  greedy = jnp.argmax(logits, axis=-1) == targets
  total = jnp.sum(jnp.where(weights > 0, tok, 0.0), axis=-1)
  return total, jnp.all(greedy | (weights == 0), axis=-1)


@functools.partial(jax.jit, static_argnames=("model",))
def _t5_scores(model, params, encoder_tokens, decoder_inputs, targets, weights):
  # Right padding of the decoder never reaches a real position through the causal mask.
  logits = model.apply({"params": params}, encoder_tokens, decoder_inputs)
  return _gather(logits, targets, weights)


@functools.partial(jax.jit, static_argnames=("model",))
def _decoder_scores(model, params, tokens, causal_attention, targets, weights):
  # Right padding never reaches a real token through the causal mask.
  logits = model.apply({"params": params}, tokens, decoder_causal_attention=causal_attention)
  return _gather(logits, targets, weights)


# ---------------------------------------------------------------- parameters

def abstract_params(cfg, unbox: bool = True):
  """The parameter tree (ShapeDtypeStructs) a config's model has; unbox=False keeps the
  logical axis names (what the partitioner reads)."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  kind = for_config(cfg)
  model = kind.build(cfg)
  dummy = kind.dummy_batch(1, 2, 2)
  params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), **dummy))["params"]
  return nn.unbox(params) if unbox else params


def _key_name(k):
  return getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))


def flat_params(tree) -> dict:
  """'a/b/c' -> leaf."""
  return {"/".join(str(_key_name(k)) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def check_params_fit(want, params, source: str = "the loaded parameters") -> None:
  """Loaded params have exactly the model's names and shapes; else a one-line UserError."""
  w, h = flat_params(want), flat_params(params)
  for name in sorted(set(w) | set(h)):
    if name not in h:
      raise UserError(f"{source}: parameter {name} is missing")
    if name not in w:
      raise UserError(f"{source}: parameter {name} is not in the model")
    if tuple(np.shape(h[name])) != tuple(w[name].shape):
      raise UserError(f"{source}: parameter {name} has shape {tuple(np.shape(h[name]))}, "
                      f"the model needs {tuple(w[name].shape)}")

"""Vocabularies: a SentencePiece model trained locally and cached, or one given by path.

A trained model is cached as ``<cache>/vocab/<name>-<size>-<digest>.model``, the
digest hashing its training text and settings, with its SHA-256 beside it in
``<model>.sha256`` (sha256sum's format). A model that does not match its
checksum, or (written before checksums were kept) does not load, is trained
again with a one-line note.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import time
from typing import Iterable

import gin
import seqio

from flanjax.data import cache, registry, tasks
from flanjax.data.collections import builtin
from flanjax.errors import UserError

# T5's conventions: pad 0, eos 1, unk 2, no bos.
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2


TRAINER_SETTINGS = dict(
    # BPE keeps whole frequent words on a small corpus; unigram splits them.
    model_type="bpe",
    character_coverage=1.0,
    # Digits one by one: arithmetic and comparisons see every digit.
    split_digits=True,
    pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1,
    # Keep newlines and repeated spaces: templates use them for layout.
    normalization_rule_name="nfkc",
    remove_extra_whitespaces=False,
    user_defined_symbols=["\n"],
    byte_fallback=True,  # text outside the corpus still round-trips
    hard_vocab_limit=False,  # small corpora: vocab_size is an upper bound
)


def train_sentencepiece(lines: Iterable[str], path: str, vocab_size: int) -> str:
  """Trains a BPE SentencePiece model on `lines` and writes it to `path`."""
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size,
        num_threads=os.cpu_count() or 1, minloglevel=2, **TRAINER_SETTINGS)
  except RuntimeError as e:
    # e.g. "... Vocabulary size is smaller than required_chars. 20 vs 300. ..."
    need = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", str(e))
    if not need:
      raise
    raise UserError(
        f"a {vocab_size}-piece vocabulary cannot hold this text's {need.group(2)} required "
        f"characters and pieces: set the vocabulary's vocab_size to {need.group(2)} or more "
        f"(gin: corpus_vocabulary.vocab_size or builtin_vocabulary.vocab_size)") from None
  data = model.getvalue()
  cache.write_atomic(path, data)  # a reader never sees half a model
  # Written second: a model without its checksum is checked by loading it.
  cache.write_atomic(_checksum_path(path), _checksum_line(path, data))
  return path


def _checksum_path(path: str) -> str:
  return path + ".sha256"


def _checksum_line(path: str, data: bytes) -> bytes:
  return f"{hashlib.sha256(data).hexdigest()}  {os.path.basename(path)}\n".encode()


def check_cached_model(path: str) -> None:
  """Raises cache.Damaged unless `path` is a whole SentencePiece model.

  Checked against `<path>.sha256`; a model without one (cached by an older
  version, or its writer stopped between the two files) must load, and then
  gets its checksum.
  """
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise cache.Damaged(f"unreadable: {e.strerror}") from None
  try:
    with open(_checksum_path(path), "rb") as f:
      want = f.read().split()[:1]
  except FileNotFoundError:
    want = None
  if want is not None:
    if [hashlib.sha256(data).hexdigest().encode()] != want:
      raise cache.Damaged("it does not match its checksum")
    return
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  try:
    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(data)
    ok = sp.GetPieceSize() > UNK_ID and sp.eos_id() == EOS_ID
  except Exception:  # pylint: disable=broad-except
    ok = False
  if not ok:
    raise cache.Damaged("not a SentencePiece model")
  cache.write_atomic(_checksum_path(path), _checksum_line(path, data))


@gin.configurable
def builtin_vocabulary(vocab_size: int = 2000, cache_dir: str | None = None,
                       extra_ids: int = 0) -> seqio.SentencePieceVocabulary:
  """The vocabulary of the built-in collection, trained once and cached.

  The cache key hashes the training text and settings, so a change to any
  template or generator trains a new vocabulary instead of reusing a stale one.
  """
  return _trained("builtin", builtin.all_text(), vocab_size, cache_dir, extra_ids)


def _trained(name: str, text: list[str], vocab_size: int, cache_dir: str | None,
             extra_ids: int) -> seqio.SentencePieceVocabulary:
  digest = hashlib.sha256()
  for line in text:
    digest.update(line.encode("utf-8") + b"\0")
  digest.update(repr(sorted(TRAINER_SETTINGS.items())).encode() + f"/{vocab_size}".encode())
  path = os.path.join(cache_dir or cache.default_cache_dir(), "vocab",
                      f"{name}-{vocab_size}-{digest.hexdigest()[:12]}.model")
  if os.path.exists(path):
    try:
      check_cached_model(path)
    except cache.Damaged as e:
      cache.note_damaged(f"vocabulary {name}", path, str(e))
      for p in (path, _checksum_path(path)):
        try:
          os.remove(p)
        except FileNotFoundError:
          pass
  if not os.path.exists(path):
    t0 = time.time()
    train_sentencepiece(text, path, vocab_size)
    got = seqio.SentencePieceVocabulary(path).vocab_size
    fewer = f" (of {vocab_size:,} asked: the texts hold no more)" if got < vocab_size else ""
    print(f"vocabulary: trained {got:,} pieces{fewer} on {len(text):,} texts in "
          f"{time.time() - t0:.1f}s -> {path}", flush=True)
  return seqio.SentencePieceVocabulary(path, extra_ids=extra_ids)


@gin.configurable
def corpus_vocabulary(mixture: str = "flanjax_builtin", vocab_size: int = 8000,
                      max_texts: int = 100_000, cache_dir: str | None = None,
                      extra_ids: int = 0) -> seqio.SentencePieceVocabulary:
  """A vocabulary trained on the training text of a mixture, once, and cached.

  For the built-in mixture this is `builtin_vocabulary`. For others, the
  training splits of the mixture's tasks are rendered (no tokenizer needed)
  and at most `max_texts` of their strings, drawn evenly, train the model. The
  cache key hashes that text, so new data or templates train a new one.
  """
  if mixture == registry.BUILTIN_MIXTURE:
    return builtin_vocabulary(vocab_size=vocab_size, cache_dir=cache_dir, extra_ids=extra_ids)
  registry.register_all(seqio.ByteVocabulary())  # names and definitions, read nothing
  obj = registry.get_task_or_mixture(mixture)
  text = []
  for task in getattr(obj, "tasks", [obj]):
    if task.name.startswith(registry.BUILTIN_PREFIX):
      recs = builtin.rendered_examples(task.name[len(registry.BUILTIN_PREFIX):], "train")
    else:
      defn = tasks.DEFS[task.name].defn
      if "train" not in defn.splits or defn.is_eval_only("train"):
        continue
      recs = tasks.render_split(defn, "train")
    for r in recs:
      text.extend([r["inputs"], r["targets"]])
  if not text:
    raise ValueError(f"mixture {mixture!r} has no training text to train a vocabulary on")
  step = max(1, len(text) // max_texts)
  return _trained(mixture, text[::step], vocab_size, cache_dir, extra_ids)


@gin.configurable
def sentencepiece_vocabulary(path: str = gin.REQUIRED,
                             extra_ids: int = 0) -> seqio.SentencePieceVocabulary:
  """A SentencePiece model given by path (e.g. a T5 checkpoint's spiece.model)."""
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"SentencePiece model {path} does not exist: point "
        "sentencepiece_vocabulary.path at a .model file")
  return seqio.SentencePieceVocabulary(path, extra_ids=extra_ids)


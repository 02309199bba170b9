"""A seqio Vocabulary over a Hugging Face tokenizer.json (the `tokenizers` library).

So a model imported from a Hugging Face directory without spiece.model (Llama,
most recent models) can tokenize seqio Tasks. encode never adds special tokens
(seqio appends EOS itself); decode stops at EOS and drops special tokens.
`add_bos` says whether the tokenizer's post-processor starts a text with BOS
(model kinds add BOS to a causal prompt only then).
The TensorFlow methods call the Python tokenizer through tf.py_function: fine
for seqio's tokenize-and-cache preprocessing, not for a graph exported
without Python.

Special ids come from tokenizer_config.json, then special_tokens_map.json, then
config.json, then well-known token names. seqio pads with 0, so when the
tokenizer has no pad token pad_id is 0.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Mapping, Sequence

import numpy as np
import seqio
import tensorflow as tf

from flanjax.errors import UserError

COMPANION_FILES = ("tokenizer_config.json", "special_tokens_map.json")
# Kept as they came (transformers 5 writes the chat template here, not in the config).
TEXT_COMPANIONS = ("chat_template.jinja",)
_EOS_NAMES = ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>", "<|eot_id|>", "[SEP]")
_BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "[CLS]")
_PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>")
_UNK_NAMES = ("<unk>", "[UNK]")


def _token_text(value):
  """A tokenizer_config entry: a string or a serialised AddedToken."""
  if isinstance(value, Mapping):
    return value.get("content")
  return value if isinstance(value, str) else None


def _first_id(value):
  if isinstance(value, (list, tuple)):
    value = value[0] if value else None
  return value if isinstance(value, int) and value >= 0 else None


class HFTokenizerVocabulary(seqio.Vocabulary):
  """seqio.Vocabulary backed by a `tokenizers.Tokenizer`."""

  def __init__(self, tokenizer_json: str | bytes, *, eos_id: int | None = None,
               bos_id: int | None = None, pad_id: int | None = None,
               unk_id: int | None = None, extra_ids: int = 0,
               companions: Mapping[str, bytes] | None = None):
    """tokenizer_json: a path to tokenizer.json, or its contents as bytes.

    companions: file name -> bytes of tokenizer files written beside
      tokenizer.json by save_tokenizer (tokenizer_config.json, ...).
    Special ids not given are looked up by well-known token names.
    """
    from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top
    if isinstance(tokenizer_json, str):
      try:
        with open(tokenizer_json, "rb") as f:
          tokenizer_json = f.read()
      except OSError as e:
        raise UserError(f"{e.filename}: cannot read the tokenizer ({e.strerror})") from None
    self._json = bytes(tokenizer_json)
    try:
      self._tokenizer = Tokenizer.from_str(self._json.decode("utf-8"))
    except Exception as e:  # pylint: disable=broad-except
      raise UserError(f"tokenizer.json: not a tokenizers file ({str(e).splitlines()[0]})") \
          from None
    self._companions = dict(companions or {})
    by_name = lambda names: next(
        (i for i in (self._tokenizer.token_to_id(n) for n in names) if i is not None), None)
    self._eos = eos_id if eos_id is not None else by_name(_EOS_NAMES)
    self._bos = bos_id if bos_id is not None else by_name(_BOS_NAMES)
    self._pad = pad_id if pad_id is not None else by_name(_PAD_NAMES)
    self._unk = unk_id if unk_id is not None else self._model_unk()
    super().__init__(extra_ids=extra_ids)
    # Whether a text starts with BOS is the tokenizer's to say: its post-processor
    # (transformers 5 ignores tokenizer_config.json's add_bos_token when tokenizer.json
    # is there, and so do we).
    probe = self._tokenizer.encode("a", add_special_tokens=True).ids
    self._add_bos = self._bos is not None and bool(probe) and probe[0] == self._bos

  def _model_unk(self):
    token = getattr(self._tokenizer.model, "unk_token", None)
    if token:
      return self._tokenizer.token_to_id(token)
    unk = getattr(self._tokenizer.model, "unk_id", None)
    if isinstance(unk, int):
      return unk
    return next((i for i in (self._tokenizer.token_to_id(n) for n in _UNK_NAMES)
                 if i is not None), None)

  @classmethod
  def from_directory(cls, path: str, model_config: Mapping | None = None, **overrides):
    """From a Hugging Face model directory holding tokenizer.json."""
    tok_path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(tok_path):
      raise UserError(f"{tok_path} not found: a tokenizers vocabulary needs tokenizer.json")
    from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top
    with open(tok_path, "rb") as f:
      raw = f.read()
    try:
      tok = Tokenizer.from_str(raw.decode("utf-8"))
    except Exception as e:  # pylint: disable=broad-except
      raise UserError(f"{tok_path}: not a tokenizers file ({str(e).splitlines()[0]})") from None
    companions, settings = {}, []
    for name in COMPANION_FILES:
      full = os.path.join(path, name)
      if os.path.isfile(full):
        with open(full, "rb") as f:
          companions[name] = f.read()
        try:
          settings.append(json.loads(companions[name]))
        except json.JSONDecodeError as e:
          raise UserError(f"{full}: not valid JSON ({e.msg} at line {e.lineno})") from None
    for name in TEXT_COMPANIONS:
      full = os.path.join(path, name)
      if os.path.isfile(full):
        with open(full, "rb") as f:
          companions[name] = f.read()
    if model_config is None and os.path.isfile(os.path.join(path, "config.json")):
      with open(os.path.join(path, "config.json")) as f:
        model_config = json.load(f)
    ids = {}
    for key in ("eos", "bos", "pad", "unk"):
      for s in settings:
        text = _token_text(s.get(f"{key}_token"))
        if text is not None and tok.token_to_id(text) is not None:
          ids[key] = tok.token_to_id(text)
          break
      else:
        value = _first_id((model_config or {}).get(f"{key}_token_id"))
        if value is not None:
          ids[key] = value
    kwargs = {f"{k}_id": v for k, v in ids.items()}
    kwargs.update(overrides)
    return cls(raw, companions=companions, **kwargs)

  # ---------------------------------------------------------------- seqio API

  @property
  def tokenizer(self):
    return self._tokenizer

  @property
  def eos_id(self):
    return self._eos

  @property
  def bos_id(self):
    return self._bos

  @property
  def add_bos(self) -> bool:
    """True when the tokenizer itself starts every text with BOS (its post-processor)."""
    return self._add_bos

  @property
  def pad_id(self) -> int:
    return 0 if self._pad is None else self._pad

  @property
  def unk_id(self):
    return self._unk

  @property
  def _base_vocab_size(self) -> int:
    return self._tokenizer.get_vocab_size(with_added_tokens=True)

  def _encode(self, s: str) -> Sequence[int]:
    return self._tokenizer.encode(s, add_special_tokens=False).ids

  def _decode(self, ids) -> str:
    ids = [int(i) for i in ids]
    if self._eos is not None and self._eos in ids:
      ids = ids[:ids.index(self._eos)]
    return self._tokenizer.decode(ids, skip_special_tokens=True)

  def _encode_tf(self, s):
    def one(x):
      return tf.py_function(
          lambda t: np.asarray(self._encode(t.numpy().decode("utf-8")), np.int32), [x], tf.int32)
    s = tf.convert_to_tensor(s)
    if s.shape.rank == 0:
      out = one(s)
      out.set_shape([None])
      return out
    return tf.map_fn(lambda x: tf.RaggedTensor.from_tensor(one(x)[None])[0], s,
                     fn_output_signature=tf.RaggedTensorSpec([None], tf.int32))

  def _decode_tf(self, ids):
    def py(t):
      arr = t.numpy()
      flat = [self._decode(row).encode("utf-8") for row in arr.reshape(-1, arr.shape[-1])]
      return np.asarray(flat, dtype=object).reshape(arr.shape[:-1])
    ids = tf.convert_to_tensor(ids)
    out = tf.py_function(py, [ids], tf.string)
    out.set_shape(ids.shape[:-1])
    return out

  # ---------------------------------------------------------------- identity

  @property
  def fingerprint(self) -> str:
    """Names this vocabulary in cache keys and run_info.json."""
    h = hashlib.sha256(self._json)
    h.update(repr((self._eos, self._bos, self._pad, self._unk, self.extra_ids)).encode())
    return "tokenizers/" + h.hexdigest()[:16]

  def __eq__(self, other):
    return isinstance(other, HFTokenizerVocabulary) and self.fingerprint == other.fingerprint

  def __hash__(self):
    return hash(self.fingerprint)

  def __getstate__(self):
    return {"json": self._json, "companions": self._companions, "eos": self._eos,
            "bos": self._bos, "pad": self._pad, "unk": self._unk, "extra_ids": self.extra_ids}

  def __setstate__(self, state):
    self.__init__(state["json"], eos_id=state["eos"], bos_id=state["bos"],
                  pad_id=state["pad"], unk_id=state["unk"], extra_ids=state["extra_ids"],
                  companions=state["companions"])

  def save_tokenizer(self, directory: str):
    """Writes tokenizer.json (byte for byte) and its companion files into `directory`."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "tokenizer.json"), "wb") as f:
      f.write(self._json)
    companions = dict(self._companions)
    if "tokenizer_config.json" not in companions:
      # Enough for transformers' AutoTokenizer to load tokenizer.json with our ids.
      text = lambda i: None if i is None else self._tokenizer.id_to_token(i)
      cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": text(self._eos),
             "bos_token": text(self._bos), "pad_token": text(self._pad),
             "unk_token": text(self._unk)}
      companions["tokenizer_config.json"] = json.dumps(
          {k: v for k, v in cfg.items() if v is not None}, indent=1).encode()
    for name, data in companions.items():
      with open(os.path.join(directory, name), "wb") as f:
        f.write(data)

"""Prompt tuning (Lester et al., 2021) for T5 and the Llama-style decoder, as PEFT does it.

A soft prompt P [n, d_model] is trained while the model stays frozen. Each example's
inputs start with n virtual tokens, ids vocab_size + i, whose embeddings the models
replace by P's rows (models/prompt_hook.py): T5 reads [P, inputs, EOS] in its encoder
(PEFT's SEQ_2_SEQ_LM), a causal decoder [P, BOS, text] (CAUSAL_LM), a prefix-LM row
[0, P, inputs, EOS, targets]. Being ordinary positions of the row, the virtual tokens
are packed, numbered and masked like the inputs: every packed example has its own.
P travels in the params as "soft_prompt"; `merge` adds it to a base's params.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import gin
import numpy as np

from flanjax.errors import UserError
from flanjax.models import kinds, lora
from flanjax.models.prompt_hook import KEY

INITS = ("random", "vocab", "text")
_PEFT_INIT = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "TEXT"}


@dataclasses.dataclass(frozen=True)
class PromptTuningConfig:
  """train.peft = @PromptTuningConfig(): num_virtual_tokens soft-prompt rows, started as
  PEFT's inits: 'vocab' (embeddings of tokens drawn from the vocabulary, SAMPLE_VOCAB),
  'random' (N(0, 1), RANDOM) or 'text' (the embeddings of init_text's tokens, repeated or
  cut to the length, TEXT)."""
  num_virtual_tokens: int = 20
  init: str = "vocab"
  init_text: str | None = None

  def __post_init__(self):
    if not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens <= 0:
      raise UserError(f"PromptTuningConfig.num_virtual_tokens={self.num_virtual_tokens!r}: "
                      "give a positive number of virtual tokens")
    if self.init not in INITS:
      raise UserError(f"PromptTuningConfig.init={self.init!r} is not one of {', '.join(INITS)}")
    if (self.init == "text") != bool(self.init_text):
      raise UserError("PromptTuningConfig: init='text' needs init_text (and init_text needs "
                      f"init='text'); got init={self.init!r}, init_text={self.init_text!r}")

  def describe(self) -> dict:
    return {"type": "prompt_tuning", "num_virtual_tokens": self.num_virtual_tokens,
            "init": self.init, "init_text": self.init_text}


# Registered even when a command (infer, evaluate) first reads an adapter after gin locked.
with gin.unlock_config():
  PromptTuningConfig = gin.configurable(PromptTuningConfig)


def virtual_ids(cfg, n: int) -> tuple[int, ...]:
  """The ids of the n virtual tokens of a model of config `cfg`."""
  return tuple(range(cfg.vocab_size, cfg.vocab_size + n))


def init(config: PromptTuningConfig, embedding, vocab=None, cfg=None, seed: int = 0):
  """The starting prompt [n, d] (float32) from the base's token embedding [vocab, d]."""
  n, (size, d) = config.num_virtual_tokens, np.shape(embedding)
  rng = np.random.default_rng(seed)
  if config.init == "random":
    return rng.standard_normal((n, d)).astype(np.float32)
  if config.init == "vocab":
    ids = rng.integers(0, size, n)
  else:
    # As PEFT: the tokenizer's ids of the text (with its BOS or EOS), repeated, cut to n.
    ids = kinds.for_config(cfg, trained_by_flanjax=False).prompt_ids(vocab, config.init_text)
    ids = (ids * math.ceil(n / len(ids)))[:n]
  return np.asarray(embedding, np.float32)[np.asarray(ids)]


def merge(params, prompt) -> dict:
  """The base's params with the soft prompt beside them (what the models run with)."""
  return {**params, KEY: prompt}


def split(params) -> tuple[dict, object]:
  """(the base's params, the soft prompt or None)."""
  if not isinstance(params, dict) or KEY not in params:
    return params, None
  return {k: v for k, v in params.items() if k != KEY}, params[KEY]


def kind_of(kind, cfg, params):
  """The model kind that puts the params' virtual tokens into prompts (kind if none)."""
  prompt = split(params)[1]
  if prompt is None:
    return kind
  return kinds.with_soft_prompt(kind, virtual_ids(cfg, int(np.shape(prompt)[0])))


def check_fits(prompt, cfg, source: str) -> None:
  if np.ndim(prompt) != 2 or np.shape(prompt)[1] != cfg.d_model:
    raise UserError(f"{source}: the soft prompt has shape {tuple(np.shape(prompt))}; this "
                    f"model needs [num_virtual_tokens, {cfg.d_model}]")


# ---------------------------------------------------------------- PEFT's folder

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_TENSOR = "prompt_embeddings"


def peft_type(path: str) -> str | None:
  """The peft_type of a PEFT adapter folder (None when `path` is not one)."""
  conf = os.path.join(path, ADAPTER_CONFIG)
  if not os.path.isfile(conf):
    return None
  with open(conf, encoding="utf-8") as f:
    return json.load(f).get("peft_type")


def read_peft(path: str, cfg) -> tuple[PromptTuningConfig, np.ndarray]:
  """(config, prompt [n, d]) of a PEFT PROMPT_TUNING folder over a base of config `cfg`."""
  conf_path = os.path.join(path, ADAPTER_CONFIG)
  with open(conf_path, encoding="utf-8") as f:
    conf = json.load(f)
  if conf.get("peft_type") != "PROMPT_TUNING":
    raise UserError(f"{conf_path}: peft_type {conf.get('peft_type')!r}, not PROMPT_TUNING")
  n = int(conf["num_virtual_tokens"])
  weights, tensors = lora.peft_tensors(path)
  if PEFT_TENSOR not in tensors:
    raise UserError(f"{weights}: no {PEFT_TENSOR} tensor (has {', '.join(sorted(tensors))})")
  # A seq2seq adapter may hold n rows per submodule; PEFT's forward reads the first n.
  prompt = np.asarray(tensors[PEFT_TENSOR], np.float32)[:n]
  check_fits(prompt, cfg, weights)
  init_kind = {v: k for k, v in _PEFT_INIT.items()}.get(conf.get("prompt_tuning_init"), "random")
  text = conf.get("prompt_tuning_init_text") if init_kind == "text" else None
  return PromptTuningConfig(n, init_kind if (init_kind != "text" or text) else "random",
                            text), prompt


def write_peft(path: str, config: PromptTuningConfig, prompt, cfg,
               base_path: str | None = None) -> None:
  """adapter_config.json and adapter_model.safetensors as PEFT saves a prompt tuning."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  from flanjax.models import lora  # pylint: disable=g-import-not-at-top
  check_fits(prompt, cfg, "the soft prompt")
  os.makedirs(path, exist_ok=True)
  t5 = kinds.for_config(cfg) is kinds.ENC_DEC
  text = config.init == "text"
  conf = {"peft_type": "PROMPT_TUNING", "task_type": lora.task_type(cfg),
          "num_virtual_tokens": config.num_virtual_tokens, "token_dim": cfg.d_model,
          # The encoder's prompt only (PEFT's forward reads no decoder rows for prompt tuning).
          "num_transformer_submodules": 1,
          "num_attention_heads": cfg.num_heads,
          "num_layers": cfg.num_encoder_layers if t5 else cfg.num_layers,
          "prompt_tuning_init": _PEFT_INIT[config.init],
          "prompt_tuning_init_text": config.init_text if text else None,
          "tokenizer_name_or_path": base_path if text else None,
          "inference_mode": True, "base_model_name_or_path": base_path}
  with open(os.path.join(path, ADAPTER_CONFIG), "w", encoding="utf-8") as f:
    json.dump(conf, f, indent=1)
  save_file({PEFT_TENSOR: np.ascontiguousarray(np.asarray(prompt, np.float32))},
            os.path.join(path, ADAPTER_WEIGHTS), metadata={"format": "pt"})

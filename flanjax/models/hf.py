"""Hugging Face T5 checkpoints <-> flanjax parameters.

Works on plain name -> numpy array dicts (a safetensors file, a
pytorch_model.bin, or a torch state_dict), so no PyTorch is needed to import.
"""

from __future__ import annotations

import json
import os
from typing import Mapping

import numpy as np

from flanjax.errors import UserError
from flanjax.models.t5 import T5Config

_FF = {"relu": "relu", "gelu": "gelu", "gated-gelu": "gated-gelu",
       "gated-gelu_new": "gated-gelu", "gelu_new": "gelu", "gated-relu": "gated-relu",
       "gated-silu": "gated-silu"}


def t5_config_from_hf(hf: Mapping) -> T5Config:
  """Our T5Config from a Hugging Face T5 config.json dict."""
  arch = (hf.get("architectures") or ["T5ForConditionalGeneration"])[0]
  if hf.get("model_type") not in (None, "t5", "mt5", "umt5") or "T5" not in arch:
    raise UserError(f"unsupported architecture {arch} (model_type={hf.get('model_type')}); "
                    "flanjax imports T5, T5 v1.1, FLAN-T5 and mT5 checkpoints")
  ff = hf.get("feed_forward_proj", "relu")
  if hf.get("is_gated_act") or (ff.startswith("gated-") and ff not in _FF):
    ff = "gated-" + ff.split("-")[-1]
  if ff not in _FF:
    raise UserError(f"unsupported feed_forward_proj {ff!r} in config.json")
  return T5Config(
      vocab_size=hf["vocab_size"], d_model=hf["d_model"], d_kv=hf["d_kv"], d_ff=hf["d_ff"],
      num_heads=hf["num_heads"], num_encoder_layers=hf["num_layers"],
      num_decoder_layers=hf.get("num_decoder_layers") or hf["num_layers"],
      relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
      relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
      dropout_rate=0.0, layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-6),
      feed_forward=_FF[ff], tie_word_embeddings=hf.get("tie_word_embeddings", True))


def t5_config_to_hf(cfg: T5Config) -> dict:
  return {
      "architectures": ["T5ForConditionalGeneration"], "model_type": "t5",
      "vocab_size": cfg.vocab_size, "d_model": cfg.d_model, "d_kv": cfg.d_kv,
      "d_ff": cfg.d_ff, "num_heads": cfg.num_heads, "num_layers": cfg.num_encoder_layers,
      "num_decoder_layers": cfg.num_decoder_layers,
      "relative_attention_num_buckets": cfg.relative_attention_num_buckets,
      "relative_attention_max_distance": cfg.relative_attention_max_distance,
      "dropout_rate": cfg.dropout_rate, "layer_norm_epsilon": cfg.layer_norm_epsilon,
      "feed_forward_proj": cfg.feed_forward if cfg.feed_forward != "gated-gelu" else "gated-gelu",
      "tie_word_embeddings": cfg.tie_word_embeddings, "is_encoder_decoder": True,
      "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0,
  }


def _ff_names(cfg: T5Config):
  return ("wi_0", "wi_1", "wo") if cfg.feed_forward.startswith("gated") else ("wi", "wo")


def _mapping(cfg: T5Config):
  """(our path, hf name, kind) for every parameter; kind says how to reshape."""
  out = [(("token_embedding",), "shared.weight", "embed")]
  if not cfg.tie_word_embeddings:
    out.append((("lm_head",), "lm_head.weight", "linear"))
  out.append((("encoder_relpos", "rel_embedding"),
              "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", "embed"))
  out.append((("decoder_relpos", "rel_embedding"),
              "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", "embed"))
  out.append((("encoder_norm", "scale"), "encoder.final_layer_norm.weight", "vector"))
  out.append((("decoder_norm", "scale"), "decoder.final_layer_norm.weight", "vector"))

  def attn(ours, hf):
    return [((*ours, n), f"{hf}.{n}.weight", "attn_out" if n == "o" else "attn_in")
            for n in ("q", "k", "v", "o")]

  for i in range(cfg.num_encoder_layers):
    b, h = f"encoder_layer_{i}", f"encoder.block.{i}.layer"
    out += attn((b, "attention"), f"{h}.0.SelfAttention")
    out.append(((b, "pre_attention_norm", "scale"), f"{h}.0.layer_norm.weight", "vector"))
    out += [((b, "mlp", n), f"{h}.1.DenseReluDense.{n}.weight", "linear")
            for n in _ff_names(cfg)]
    out.append(((b, "pre_mlp_norm", "scale"), f"{h}.1.layer_norm.weight", "vector"))
  for i in range(cfg.num_decoder_layers):
    b, h = f"decoder_layer_{i}", f"decoder.block.{i}.layer"
    out += attn((b, "self_attention"), f"{h}.0.SelfAttention")
    out.append(((b, "pre_self_attention_norm", "scale"), f"{h}.0.layer_norm.weight", "vector"))
    out += attn((b, "cross_attention"), f"{h}.1.EncDecAttention")
    out.append(((b, "pre_cross_attention_norm", "scale"), f"{h}.1.layer_norm.weight", "vector"))
    out += [((b, "mlp", n), f"{h}.2.DenseReluDense.{n}.weight", "linear")
            for n in _ff_names(cfg)]
    out.append(((b, "pre_mlp_norm", "scale"), f"{h}.2.layer_norm.weight", "vector"))
  return out


def t5_params_from_hf(weights: Mapping[str, np.ndarray], cfg: T5Config,
                      source: str = "checkpoint") -> dict:
  """flanjax T5 params from HF tensors (name -> array, [out, in] linear weights)."""
  h, k, d = cfg.num_heads, cfg.d_kv, cfg.d_model
  params: dict = {}
  for path, name, kind in _mapping(cfg):
    if name not in weights:
      raise UserError(f"{source}: parameter {name} is missing (needed for {'/'.join(path)})")
    w = np.asarray(weights[name], dtype=np.float32)
    if kind == "attn_in":
      want = (h * k, d)
    elif kind == "attn_out":
      want = (d, h * k)
    elif kind == "vector":
      want = (d,)
    else:
      want = None
    if want is not None and w.shape != want:
      raise UserError(f"{source}: parameter {name} has shape {w.shape}, config.json "
                      f"implies {want}")
    if kind == "attn_in":
      w = w.T.reshape(d, h, k)
    elif kind == "attn_out":
      w = w.T.reshape(h, k, d)
    elif kind == "linear":
      w = w.T
    node = params
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = w
  return params


def t5_params_to_hf(params: Mapping, cfg: T5Config) -> dict[str, np.ndarray]:
  """HF T5 tensors from flanjax params (the inverse of t5_params_from_hf)."""
  h, k, d = cfg.num_heads, cfg.d_kv, cfg.d_model
  out = {}
  for path, name, kind in _mapping(cfg):
    node = params
    for p in path:
      node = node[p]
    w = np.asarray(node, dtype=np.float32)
    if kind == "attn_in":
      w = w.reshape(d, h * k).T
    elif kind == "attn_out":
      w = w.reshape(h * k, d).T
    elif kind == "linear":
      w = w.T
    out[name] = np.ascontiguousarray(w)
  # HF keeps the shared embedding under each stack too.
  out["encoder.embed_tokens.weight"] = out["shared.weight"]
  out["decoder.embed_tokens.weight"] = out["shared.weight"]
  if cfg.tie_word_embeddings:
    out["lm_head.weight"] = out["shared.weight"]
  return out


def read_config(path: str) -> dict:
  cfg_path = os.path.join(path, "config.json")
  if not os.path.isfile(cfg_path):
    raise UserError(f"{cfg_path} not found: a Hugging Face model directory needs config.json")
  try:
    with open(cfg_path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise UserError(f"{cfg_path}: not valid JSON ({e.msg} at line {e.lineno})") from None


def _read_tensors(path: str) -> dict[str, np.ndarray]:
  """All tensors of a model directory: safetensors or pytorch_model.bin, sharded or not."""
  def from_file(fname):
    full = os.path.join(path, fname)
    if not os.path.isfile(full):
      raise UserError(f"{full} not found (listed by the index file or expected by name)")
    if fname.endswith(".safetensors"):
      from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
      try:
        return load_file(full)
      except Exception as e:  # pylint: disable=broad-except
        raise UserError(f"{full}: not a readable safetensors file ({e})") from None
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise UserError(f"{full} is a PyTorch file: install torch to read it, or convert "
                      "the directory to safetensors") from None
    sd = torch.load(full, map_location="cpu", weights_only=True)
    return {k: v.float().numpy() for k, v in sd.items()}

  for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
    if os.path.isfile(os.path.join(path, index)):
      with open(os.path.join(path, index)) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
      out = {}
      for shard in shards:
        out.update(from_file(shard))
      return out
  for single in ("model.safetensors", "pytorch_model.bin"):
    if os.path.isfile(os.path.join(path, single)):
      return from_file(single)
  raise UserError(f"{path}: no model.safetensors, pytorch_model.bin or index file found")


def load(path: str):
  """(model_config, params, vocabulary) from a local Hugging Face T5 directory."""
  import seqio  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(path):
    raise UserError(f"{path} is not a directory: give the folder of a Hugging Face model")
  hf_cfg = read_config(path)
  cfg = t5_config_from_hf(hf_cfg)
  weights = _read_tensors(path)
  if "lm_head.weight" not in weights and not cfg.tie_word_embeddings:
    raise UserError(f"{path}: config says the output is untied, but lm_head.weight is missing")
  params = t5_params_from_hf(weights, cfg, source=path)
  spiece = os.path.join(path, "spiece.model")
  vocabulary = None
  if os.path.isfile(spiece):
    # T5's sentinels <extra_id_*> sit after the SentencePiece pieces.
    n_extra = max(0, min(100, cfg.vocab_size - _sp_size(spiece)))
    vocabulary = seqio.SentencePieceVocabulary(spiece, extra_ids=n_extra)
  return cfg, params, vocabulary


def _sp_size(path: str) -> int:
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  return spm.SentencePieceProcessor(model_file=path).get_piece_size()


def save(model_config: T5Config, params, path: str, vocabulary=None):
  """Writes config.json, model.safetensors (and spiece.model) that transformers loads."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  os.makedirs(path, exist_ok=True)
  tensors = t5_params_to_hf(params, model_config)
  # Tied entries share memory; safetensors stores each tensor once.
  unique = {k: v for k, v in tensors.items()
            if k not in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
            and not (model_config.tie_word_embeddings and k == "lm_head.weight")}
  save_file({k: np.ascontiguousarray(v) for k, v in unique.items()},
            os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(t5_config_to_hf(model_config), f, indent=1)
  if vocabulary is not None and hasattr(vocabulary, "sp_model"):
    with open(os.path.join(path, "spiece.model"), "wb") as f:
      f.write(vocabulary.sp_model)

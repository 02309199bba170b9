"""Hugging Face checkpoints (T5 and Llama) <-> flanjax parameters.

Works on plain name -> numpy array dicts (a safetensors file, a
pytorch_model.bin, or a torch state_dict), so no PyTorch is needed to import.
`load` and `save` dispatch on the model family: config.json's model_type (or
architectures) on import, the config's type on export.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Mapping

import numpy as np

from flanjax.errors import UserError
from flanjax.models import stack
from flanjax.models.decoder import DecoderConfig
from flanjax.models.t5 import T5Config
from flanjax.models.fields import TRAINING_FIELDS

# transformers' feed_forward_proj -> ours: its plain "gelu" is the exact (erf) GELU, its
# "gelu_new" and every gated GELU the tanh one (ours "gelu").
_FF = {"relu": "relu", "gelu": "gelu_exact", "gated-gelu": "gated-gelu",
       "gated-gelu_new": "gated-gelu", "gelu_new": "gelu", "gated-relu": "gated-relu",
       "gated-silu": "gated-silu"}
_FF_TO_HF = {"gelu_exact": "gelu", "gelu": "gelu_new"}
# UMT5 is not here: it keeps a relative-position table in every layer, ours in the first.
T5_TYPES = ("t5", "mt5")
# Mistral: Llama's weights and a sliding window; Qwen2: and biases on q, k and v; Qwen3:
# and an RMSNorm on each head's q and k.
LLAMA_TYPES = ("llama", "mistral", "qwen2", "qwen3")
SAVE_DTYPES = ("float32", "bfloat16", "float16")


def model_family(hf: Mapping, source: str = "config.json") -> str:
  """"t5" or "llama" from a config.json dict; anything else is a UserError."""
  arch = (hf.get("architectures") or [""])[0]
  model_type = hf.get("model_type")
  if model_type in T5_TYPES or (model_type is None and "T5" in arch):
    return "t5"
  if model_type in LLAMA_TYPES or (model_type is None
                                   and arch.startswith(("Llama", "Mistral", "Qwen2ForCausal",
                                                        "Qwen3ForCausal"))):
    return "llama"
  if model_type == "umt5":
    raise UserError(f"{source}: UMT5 keeps a relative-position table in every layer, which "
                    "flanjax's T5 (one table, in the first layer) cannot hold; use a T5, "
                    "T5 v1.1, FLAN-T5 or mT5 checkpoint")
  if model_type is None and not arch:
    # Old T5 configs name neither; a Llama one would have hidden_size.
    return "llama" if "hidden_size" in hf else "t5"
  raise UserError(f"{source}: unsupported architecture {arch or '(none)'} "
                  f"(model_type={model_type}); flanjax imports T5 ({', '.join(T5_TYPES)}) and "
                  f"Llama-style ({', '.join(LLAMA_TYPES)}) checkpoints")


# ---------------------------------------------------------------- T5 config

def t5_config_from_hf(hf: Mapping) -> T5Config:
  """Our T5Config from a Hugging Face T5 config.json dict."""
  arch = (hf.get("architectures") or ["T5ForConditionalGeneration"])[0]
  if hf.get("model_type") not in (None, *T5_TYPES) or "T5" not in arch:
    raise UserError(f"unsupported architecture {arch} (model_type={hf.get('model_type')}); "
                    "flanjax imports T5, T5 v1.1, FLAN-T5 and mT5 checkpoints")
  ff = hf.get("feed_forward_proj", "relu")
  if hf.get("is_gated_act") or (ff.startswith("gated-") and ff not in _FF):
    ff = "gated-" + ff.split("-")[-1]
  if ff not in _FF:
    raise UserError(f"unsupported feed_forward_proj {ff!r} in config.json")
  tie = hf.get("tie_word_embeddings", True)
  if hf.get("scale_decoder_outputs") is False:
    # transformers 5 writes tie_word_embeddings=true for every T5 and marks T5 v1.1's
    # unscaled output here: our untied output (load copies the embedding into lm_head
    # when only the embedding is stored).
    tie = False
  return T5Config(
      vocab_size=hf["vocab_size"], d_model=hf["d_model"], d_kv=hf["d_kv"], d_ff=hf["d_ff"],
      num_heads=hf["num_heads"], num_encoder_layers=hf["num_layers"],
      num_decoder_layers=hf.get("num_decoder_layers") or hf["num_layers"],
      relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
      relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
      dropout_rate=0.0, layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-6),
      feed_forward=_FF[ff], tie_word_embeddings=tie)


def t5_config_to_hf(cfg: T5Config) -> dict:
  return {
      "architectures": ["T5ForConditionalGeneration"], "model_type": "t5",
      "vocab_size": cfg.vocab_size, "d_model": cfg.d_model, "d_kv": cfg.d_kv,
      "d_ff": cfg.d_ff, "num_heads": cfg.num_heads, "num_layers": cfg.num_encoder_layers,
      "num_decoder_layers": cfg.num_decoder_layers,
      "relative_attention_num_buckets": cfg.relative_attention_num_buckets,
      "relative_attention_max_distance": cfg.relative_attention_max_distance,
      "dropout_rate": cfg.dropout_rate, "layer_norm_epsilon": cfg.layer_norm_epsilon,
      "feed_forward_proj": _FF_TO_HF.get(cfg.feed_forward, cfg.feed_forward),
      "tie_word_embeddings": cfg.tie_word_embeddings, "is_encoder_decoder": True,
      "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0,
  }


# ---------------------------------------------------------------- Llama config

def llama_config_from_hf(hf: Mapping, source: str = "config.json") -> DecoderConfig:
  """Our DecoderConfig from a Hugging Face Llama config.json dict."""
  def need(key):
    if key not in hf:
      raise UserError(f"{source}: {key} is missing (a Llama config needs it)")
    return hf[key]

  act = hf.get("hidden_act", "silu")
  if act not in ("silu", "swish"):
    raise UserError(f"{source}: hidden_act={act!r} is not supported (Llama uses silu)")
  arch = (hf.get("architectures") or [""])[0]
  qwen2 = hf.get("model_type") == "qwen2" or arch.startswith("Qwen2ForCausal")
  qwen3 = hf.get("model_type") == "qwen3" or arch.startswith("Qwen3ForCausal")
  for key in ("attention_bias", "mlp_bias"):
    if hf.get(key):  # Llama's attention_bias also puts one on o_proj, which we have not
      raise UserError(f"{source}: {key}=true is not supported (Llama has no biases; Qwen2's "
                      "q, k and v biases are read as model_type qwen2)")
  heads = need("num_attention_heads")
  d_model = need("hidden_size")
  max_pos = hf.get("max_position_embeddings", 2048)
  rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
  if not isinstance(rope, Mapping) or any(isinstance(v, Mapping) for v in rope.values()):
    raise UserError(f"{source}: per-layer rope_parameters are not supported")
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
  scaling = {}
  try:
    if rope_type == "linear":
      scaling = dict(rope_scaling="linear", rope_factor=float(rope["factor"]))
    elif rope_type == "llama3":
      scaling = dict(rope_scaling="llama3", rope_factor=float(rope["factor"]),
                     rope_low_freq_factor=float(rope["low_freq_factor"]),
                     rope_high_freq_factor=float(rope["high_freq_factor"]),
                     rope_original_max_position=int(
                         rope.get("original_max_position_embeddings", max_pos)))
    elif rope_type != "default":
      raise UserError(f"{source}: rope type {rope_type!r} is not supported "
                      "(default, linear and llama3 are)")
  except KeyError as e:
    raise UserError(f"{source}: {rope_type} rope parameters lack {e.args[0]}") from None
  try:
    return DecoderConfig(
        sliding_window=_sliding_window(hf, qwen2 or qwen3, need("num_hidden_layers"), source),
        qkv_bias=qwen2, qk_norm=qwen3,
        vocab_size=need("vocab_size"), d_model=d_model, num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or d_model // heads,
        d_ff=need("intermediate_size"), num_layers=need("num_hidden_layers"),
        rope_theta=float(theta), rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position=max_pos, dropout_rate=0.0, **scaling)
  except ValueError as e:
    raise UserError(f"{source}: {e}") from None


def _sliding_window(hf: Mapping, qwen: bool, layers: int, source: str) -> int | None:
  """The window every layer attends in, or None (full causal attention).

  Mistral windows every layer when sliding_window is set. Qwen2 and Qwen3 only with
  use_sliding_window, and then only the layers from max_window_layers on (or as
  layer_types lists): a window in some layers only is refused."""
  window = hf.get("sliding_window")
  if not qwen:
    return window if hf.get("use_sliding_window", True) else None
  if not hf.get("use_sliding_window") or window is None:
    return None
  types = hf.get("layer_types") or [
      "sliding_attention" if i >= hf.get("max_window_layers", 28) else "full_attention"
      for i in range(layers)]
  slid = {t == "sliding_attention" for t in types[:layers]}
  if slid == {True, False}:
    raise UserError(f"{source}: a sliding window in some layers only (use_sliding_window, "
                    "max_window_layers) is not supported; flanjax applies one attention to "
                    "every layer")
  return window if slid == {True} else None


def llama_config_to_hf(cfg: DecoderConfig) -> dict:
  rope = {"rope_type": "default" if cfg.rope_scaling == "none" else cfg.rope_scaling,
          "rope_theta": cfg.rope_theta}
  if cfg.rope_scaling != "none":
    rope["factor"] = cfg.rope_factor
  if cfg.rope_scaling == "llama3":
    rope.update(low_freq_factor=cfg.rope_low_freq_factor,
                high_freq_factor=cfg.rope_high_freq_factor,
                original_max_position_embeddings=cfg.rope_original_max_position)
  family = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
  if cfg.qkv_bias and cfg.qk_norm:
    raise UserError("DecoderConfig with both qkv_bias and qk_norm has no transformers class "
                    "to export to (Qwen2 has the biases, Qwen3 the norms)")
  if cfg.qkv_bias or cfg.qk_norm:  # Qwen2's class has biases on q, k and v; Qwen3's the norms
    name = "qwen2" if cfg.qkv_bias else "qwen3"
    family = {"architectures": [f"Qwen{name[-1]}ForCausalLM"], "model_type": name,
              "use_sliding_window": cfg.sliding_window is not None,
              "sliding_window": cfg.sliding_window, "max_window_layers": 0,
              "layer_types": ["sliding_attention" if cfg.sliding_window is not None
                              else "full_attention"] * cfg.num_layers}
  elif cfg.sliding_window is not None:  # only Mistral's transformers class applies a window
    family = {"architectures": ["MistralForCausalLM"], "model_type": "mistral",
              "sliding_window": cfg.sliding_window}
  return {
      **family,
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
      "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim, "hidden_act": "silu",
      "max_position_embeddings": cfg.max_position, "rms_norm_eps": cfg.rms_norm_eps,
      "tie_word_embeddings": cfg.tie_word_embeddings,
      "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
      # transformers 5 reads rope_parameters; 4.x reads rope_theta and rope_scaling.
      "rope_parameters": rope, "rope_theta": cfg.rope_theta,
      "rope_scaling": None if cfg.rope_scaling == "none" else dict(rope),
  }


def config_from_hf(hf: Mapping, source: str = "config.json"):
  """T5Config or DecoderConfig, by the family config.json names."""
  if model_family(hf, source) == "t5":
    return t5_config_from_hf(hf)
  return llama_config_from_hf(hf, source)


def config_to_hf(cfg) -> dict:
  if isinstance(cfg, T5Config):
    return t5_config_to_hf(cfg)
  if isinstance(cfg, DecoderConfig):
    return llama_config_to_hf(cfg)
  raise TypeError(f"no Hugging Face export for {type(cfg).__name__}")


# ---------------------------------------------------------------- parameter maps
# Each entry: (our path, HF name, kind, HF shape, our shape). Kinds: "same" (as
# is), "linear" (transposed [out, in] matrix), "attn_in" ([heads*k, d] ->
# [d, heads, k]), "attn_out" ([d, heads*k] -> [heads, k, d]), "bias" ([heads*k] ->
# [heads, k]).

def _ff_names(cfg: T5Config):
  return ("wi_0", "wi_1", "wo") if cfg.feed_forward.startswith("gated") else ("wi", "wo")


def _t5_mapping(cfg: T5Config):
  d, f, h, k, v = cfg.d_model, cfg.d_ff, cfg.num_heads, cfg.d_kv, cfg.vocab_size
  buckets = cfg.relative_attention_num_buckets
  out = [(("token_embedding",), "shared.weight", "same", (v, d), (v, d))]
  if not cfg.tie_word_embeddings:
    out.append((("lm_head",), "lm_head.weight", "linear", (v, d), (d, v)))
  for stack in ("encoder", "decoder"):
    out.append(((f"{stack}_relpos", "rel_embedding"),
                f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight", "same",
                (buckets, h), (buckets, h)))
    out.append(((f"{stack}_norm", "scale"), f"{stack}.final_layer_norm.weight", "same",
                (d,), (d,)))

  def attn(ours, hf):
    return [((*ours, n), f"{hf}.{n}.weight", *(
        ("attn_out", (d, h * k), (h, k, d)) if n == "o" else ("attn_in", (h * k, d), (d, h, k))))
            for n in ("q", "k", "v", "o")]

  def norm(ours, hf):
    return ((*ours, "scale"), hf, "same", (d,), (d,))

  def mlp(ours, hf):
    return [((*ours, n), f"{hf}.{n}.weight", "linear",
             *(((d, f), (f, d)) if n == "wo" else ((f, d), (d, f))))
            for n in _ff_names(cfg)]

  for i in range(cfg.num_encoder_layers):
    b, hb = f"encoder_layer_{i}", f"encoder.block.{i}.layer"
    out += attn((b, "attention"), f"{hb}.0.SelfAttention")
    out.append(norm((b, "pre_attention_norm"), f"{hb}.0.layer_norm.weight"))
    out += mlp((b, "mlp"), f"{hb}.1.DenseReluDense")
    out.append(norm((b, "pre_mlp_norm"), f"{hb}.1.layer_norm.weight"))
  for i in range(cfg.num_decoder_layers):
    b, hb = f"decoder_layer_{i}", f"decoder.block.{i}.layer"
    out += attn((b, "self_attention"), f"{hb}.0.SelfAttention")
    out.append(norm((b, "pre_self_attention_norm"), f"{hb}.0.layer_norm.weight"))
    out += attn((b, "cross_attention"), f"{hb}.1.EncDecAttention")
    out.append(norm((b, "pre_cross_attention_norm"), f"{hb}.1.layer_norm.weight"))
    out += mlp((b, "mlp"), f"{hb}.2.DenseReluDense")
    out.append(norm((b, "pre_mlp_norm"), f"{hb}.2.layer_norm.weight"))
  return out


def _llama_mapping(cfg: DecoderConfig):
  d, f, v, k = cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.head_dim
  h, g = cfg.num_heads, cfg.num_kv_heads
  out = [(("token_embedding",), "model.embed_tokens.weight", "same", (v, d), (v, d)),
         (("final_norm", "scale"), "model.norm.weight", "same", (d,), (d,))]
  if not cfg.tie_word_embeddings:
    out.append((("lm_head",), "lm_head.weight", "linear", (v, d), (d, v)))
  for i in range(cfg.num_layers):
    b, hl = f"layer_{i}", f"model.layers.{i}"
    out += [
        ((b, "attention", "q"), f"{hl}.self_attn.q_proj.weight", "attn_in", (h * k, d), (d, h, k)),
        ((b, "attention", "k"), f"{hl}.self_attn.k_proj.weight", "attn_in", (g * k, d), (d, g, k)),
        ((b, "attention", "v"), f"{hl}.self_attn.v_proj.weight", "attn_in", (g * k, d), (d, g, k)),
        ((b, "attention", "o"), f"{hl}.self_attn.o_proj.weight", "attn_out", (d, h * k), (h, k, d)),
        ((b, "mlp", "wi_0"), f"{hl}.mlp.gate_proj.weight", "linear", (f, d), (d, f)),
        ((b, "mlp", "wi_1"), f"{hl}.mlp.up_proj.weight", "linear", (f, d), (d, f)),
        ((b, "mlp", "wo"), f"{hl}.mlp.down_proj.weight", "linear", (d, f), (f, d)),
        ((b, "pre_attention_norm", "scale"), f"{hl}.input_layernorm.weight", "same", (d,), (d,)),
        ((b, "pre_mlp_norm", "scale"), f"{hl}.post_attention_layernorm.weight", "same",
         (d,), (d,)),
    ]
    if cfg.qkv_bias:
      out += [((b, "attention", f"{n}_bias"), f"{hl}.self_attn.{n}_proj.bias", "bias",
               (heads * k,), (heads, k)) for n, heads in (("q", h), ("k", g), ("v", g))]
    if cfg.qk_norm:
      out += [((b, "attention", f"{n}_norm", "scale"), f"{hl}.self_attn.{n}_norm.weight", "same",
               (k,), (k,)) for n in ("q", "k")]
  return out


def _from_hf(weights: Mapping[str, np.ndarray], mapping, source: str,
             origin: Mapping[str, str] | None) -> dict:
  params: dict = {}
  origin = origin or {}
  for path, name, kind, hf_shape, our_shape in mapping:
    if name not in weights:
      raise UserError(f"{source}: parameter {name} is missing (needed for {'/'.join(path)})")
    w = np.asarray(weights[name], dtype=np.float32)
    if w.shape != hf_shape:
      raise UserError(f"{origin.get(name, source)}: parameter {name} has shape {w.shape}, "
                      f"config.json implies {hf_shape}")
    if kind != "same":
      w = w.T.reshape(our_shape)
    node = params
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = w
  return params


def _to_hf(params: Mapping, mapping) -> dict[str, np.ndarray]:
  out = {}
  for path, name, kind, hf_shape, our_shape in mapping:
    node = params
    for p in path:
      if p not in node:
        raise UserError(f"parameter {'/'.join(path)} is missing from the flanjax params")
      node = node[p]
    w = np.asarray(node, dtype=np.float32)
    if w.shape != our_shape:
      raise UserError(f"parameter {'/'.join(path)} has shape {w.shape}, the model config "
                      f"implies {our_shape}")
    if kind == "attn_out":  # [heads, k, d] -> [heads*k, d] -> [d, heads*k]
      w = w.reshape(-1, our_shape[-1]).T
    elif kind == "bias":
      w = w.reshape(-1)
    elif kind != "same":  # [d, (heads, k) or out] -> [d, out] -> [out, d]
      w = w.reshape(our_shape[0], -1).T
    out[name] = np.ascontiguousarray(w)
  return out


def t5_params_from_hf(weights: Mapping[str, np.ndarray], cfg: T5Config,
                      source: str = "checkpoint", origin: Mapping[str, str] | None = None) -> dict:
  """flanjax T5 params from HF tensors (name -> array, [out, in] linear weights)."""
  return _from_hf(weights, _t5_mapping(cfg), source, origin)


def t5_params_to_hf(params: Mapping, cfg: T5Config) -> dict[str, np.ndarray]:
  """HF T5 tensors from flanjax params (the inverse of t5_params_from_hf)."""
  out = _to_hf(params, _t5_mapping(cfg))
  # HF keeps the shared embedding under each stack too.
  out["encoder.embed_tokens.weight"] = out["shared.weight"]
  out["decoder.embed_tokens.weight"] = out["shared.weight"]
  if cfg.tie_word_embeddings:
    out["lm_head.weight"] = out["shared.weight"]
  return out


def llama_params_from_hf(weights: Mapping[str, np.ndarray], cfg: DecoderConfig,
                         source: str = "checkpoint",
                         origin: Mapping[str, str] | None = None) -> dict:
  """flanjax Decoder params from HF Llama tensors (LlamaForCausalLM or bare LlamaModel names)."""
  if "model.embed_tokens.weight" not in weights and "embed_tokens.weight" in weights:
    weights = {("model." + k if not k.startswith("lm_head.") else k): w
               for k, w in weights.items()}
    origin = {("model." + k if not k.startswith("lm_head.") else k): f
              for k, f in (origin or {}).items()}
  return _from_hf(weights, _llama_mapping(cfg), source, origin)


def llama_params_to_hf(params: Mapping, cfg: DecoderConfig) -> dict[str, np.ndarray]:
  """HF LlamaForCausalLM tensors; tied models have no lm_head.weight of their own."""
  return _to_hf(params, _llama_mapping(cfg))


def linear_modules(cfg):
  """(our path, Hugging Face module name, input shape, output shape) of every projection
  (what LoRA adapts: attention and feed-forward kernels, not embeddings or the head)."""
  mapping = _t5_mapping(cfg) if isinstance(cfg, T5Config) else _llama_mapping(cfg)
  out = []
  for path, name, kind, _, ours in mapping:
    if kind in ("same", "bias") or path == ("lm_head",):
      continue
    n_in = 2 if kind == "attn_out" else 1
    out.append((path, name[:-len(".weight")], tuple(ours[:n_in]), tuple(ours[n_in:])))
  return out


def params_from_hf(weights, cfg, source: str = "checkpoint", origin=None) -> dict:
  """Our params (in the layout cfg's model applies with: scanned or not) from HF tensors."""
  if isinstance(cfg, T5Config):
    return stack.layout(t5_params_from_hf(weights, cfg, source, origin), cfg)
  return stack.layout(llama_params_from_hf(weights, cfg, source, origin), cfg)


def params_to_hf(params, cfg) -> dict[str, np.ndarray]:
  """HF tensors from our params, scanned (scan_layers) or not."""
  params = stack.unscan_params(params)
  if isinstance(cfg, T5Config):
    return t5_params_to_hf(params, cfg)
  if isinstance(cfg, DecoderConfig):
    return llama_params_to_hf(params, cfg)
  raise TypeError(f"no Hugging Face export for {type(cfg).__name__}")


# ---------------------------------------------------------------- files

def read_config(path: str) -> dict:
  cfg_path = os.path.join(path, "config.json")
  if not os.path.isfile(cfg_path):
    raise UserError(f"{cfg_path} not found: a Hugging Face model directory needs config.json")
  try:
    with open(cfg_path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise UserError(f"{cfg_path}: not valid JSON ({e.msg} at line {e.lineno})") from None


def _read_checkpoint(path: str):
  """(tensors, name -> file it came from, the file or index that lists them)."""
  def from_file(fname, listed_by):
    full = os.path.join(path, fname)
    if not os.path.isfile(full):
      raise UserError(f"{full} not found (listed by {listed_by})")
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
    try:
      sd = torch.load(full, map_location="cpu", weights_only=True)
    except Exception as e:  # pylint: disable=broad-except
      raise UserError(f"{full}: not a readable PyTorch file ({type(e).__name__})") from None
    return {k: v.float().numpy() for k, v in sd.items()}

  for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
    index_path = os.path.join(path, index)
    if os.path.isfile(index_path):
      try:
        with open(index_path) as f:
          shards = sorted(set(json.load(f)["weight_map"].values()))
      except (json.JSONDecodeError, KeyError, AttributeError) as e:
        raise UserError(f"{index_path}: not a valid index file ({type(e).__name__})") from None
      tensors, origin = {}, {}
      for shard in shards:
        part = from_file(shard, index_path)
        tensors.update(part)
        origin.update({k: os.path.join(path, shard) for k in part})
      return tensors, origin, index_path
  for single in ("model.safetensors", "pytorch_model.bin"):
    full = os.path.join(path, single)
    if os.path.isfile(full):
      tensors = from_file(single, "name")
      return tensors, {k: full for k in tensors}, full
  raise UserError(f"{path}: no model.safetensors, pytorch_model.bin or index file found")


def _read_tensors(path: str) -> dict[str, np.ndarray]:
  """All tensors of a model directory: safetensors or pytorch_model.bin, sharded or not."""
  return _read_checkpoint(path)[0]


def vocabulary(path: str, cfg, hf_cfg: Mapping):
  """spiece.model if the directory has one, else tokenizer.json, else None."""
  import seqio  # pylint: disable=g-import-not-at-top
  spiece = os.path.join(path, "spiece.model")
  if os.path.isfile(spiece):
    n_extra = 0
    if isinstance(cfg, T5Config):
      # T5's sentinels <extra_id_*> sit after the SentencePiece pieces.
      n_extra = max(0, min(100, cfg.vocab_size - _sp_size(spiece)))
    return seqio.SentencePieceVocabulary(spiece, extra_ids=n_extra)
  if os.path.isfile(os.path.join(path, "tokenizer.json")):
    from flanjax.data import hf_vocab  # pylint: disable=g-import-not-at-top
    return hf_vocab.HFTokenizerVocabulary.from_directory(path, model_config=hf_cfg)
  return None


def load_config(path: str):
  """(model_config, vocabulary or None) of a local Hugging Face directory; no weights read."""
  if not os.path.isdir(path):
    raise UserError(f"{path} is not a directory: give the folder of a Hugging Face model")
  hf_cfg = read_config(path)
  cfg = config_from_hf(hf_cfg, os.path.join(path, "config.json"))
  return cfg, vocabulary(path, cfg, hf_cfg)


def load(path: str):
  """(model_config, params, vocabulary) from a local Hugging Face T5 or Llama directory."""
  if not os.path.isdir(path):
    raise UserError(f"{path} is not a directory: give the folder of a Hugging Face model")
  hf_cfg = read_config(path)
  cfg = config_from_hf(hf_cfg, os.path.join(path, "config.json"))
  weights, origin, where = _read_checkpoint(path)
  if (isinstance(cfg, T5Config) and hf_cfg.get("scale_decoder_outputs") is False
      and "lm_head.weight" not in weights and "shared.weight" in weights):
    # transformers 5's tied but unscaled output: the embedding is the output matrix.
    weights["lm_head.weight"] = weights["shared.weight"]
    origin["lm_head.weight"] = origin.get("shared.weight", where)
  if "lm_head.weight" not in weights and not cfg.tie_word_embeddings:
    raise UserError(f"{where}: parameter lm_head.weight is missing, but config.json says the "
                    "output is untied (tie_word_embeddings=false)")
  params = params_from_hf(weights, cfg, source=where, origin=origin)
  return cfg, params, vocabulary(path, cfg, hf_cfg)


def _sp_size(path: str) -> int:
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  return spm.SentencePieceProcessor(model_file=path).get_piece_size()


def spiece_bytes(vocabulary) -> bytes:
  """A SentencePiece vocabulary's model file as it came: seqio's sp_model has the extra ids
  (T5's sentinels) appended as pieces, which a reader (seqio with extra_ids, transformers'
  T5 tokenizer) appends again."""
  src = getattr(vocabulary, "sentencepiece_model_file", None)
  if src and os.path.isfile(src):
    with open(src, "rb") as f:
      return f.read()
  return vocabulary.sp_model


def _special_ids(vocabulary) -> dict:
  out = {}
  for key, attr in (("bos_token_id", "bos_id"), ("eos_token_id", "eos_id"),
                    ("pad_token_id", "pad_id")):
    try:
      value = getattr(vocabulary, attr)
    except NotImplementedError:  # seqio's bos_id when a vocabulary has none
      continue
    if key == "pad_token_id" and getattr(vocabulary, "_pad", 0) is None:
      continue  # a tokenizer without a pad token (Llama 3): 0 is a real token, not padding
    if value is not None and value >= 0:
      out[key] = int(value)
  return out


def _describes(hf_cfg: Mapping, model_config) -> bool:
  """Whether a config.json maps to model_config (up to the training-only fields)."""
  try:
    ours = config_from_hf(hf_cfg)
  except (UserError, KeyError, TypeError):
    return False
  plain = lambda c: dataclasses.replace(c, **{  # noqa: E731  (the training fields' defaults)
      f.name: f.default for f in dataclasses.fields(c) if f.name in TRAINING_FIELDS})
  return type(ours) is type(model_config) and plain(ours) == plain(model_config)


def save(model_config, params, path: str, vocabulary=None, extra_config: Mapping | None = None,
         dtype: str = "float32"):
  """Writes config.json, model.safetensors and the tokenizer files that transformers loads.

  extra_config: an original config.json. Written as it is when it describes
    model_config (so a round trip keeps every key), else its keys fill in what
    the generated config lacks (token ids, ...).
  dtype: of the stored tensors (float32, bfloat16, float16).
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  if dtype not in SAVE_DTYPES:
    raise UserError(f"dtype {dtype!r} is not one of {', '.join(SAVE_DTYPES)}")
  np_dtype = np.float32
  if dtype == "bfloat16":
    import ml_dtypes  # pylint: disable=g-import-not-at-top
    np_dtype = ml_dtypes.bfloat16
  elif dtype == "float16":
    np_dtype = np.float16
  tensors = params_to_hf(params, model_config)
  if isinstance(model_config, T5Config):
    # Tied entries share memory; safetensors stores each tensor once.
    skip = {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight"}
    if model_config.tie_word_embeddings:
      skip.add("lm_head.weight")
    tensors = {k: v for k, v in tensors.items() if k not in skip}
  hf_cfg = config_to_hf(model_config)
  if extra_config and _describes(extra_config, model_config):
    hf_cfg = dict(extra_config)  # the original, every key kept
  for key, value in (extra_config or {}).items():
    hf_cfg.setdefault(key, value)
  for key in ("dtype", "torch_dtype"):
    if key in hf_cfg:
      hf_cfg[key] = dtype
  if vocabulary is not None:
    for key, value in _special_ids(vocabulary).items():
      hf_cfg.setdefault(key, value)
  if (isinstance(model_config, T5Config) and hf_cfg.get("scale_decoder_outputs") is False
      and hf_cfg.get("tie_word_embeddings") and "lm_head.weight" in tensors
      and np.array_equal(tensors["lm_head.weight"], tensors["shared.weight"])):
    # transformers 5's tied, unscaled output, as load read it: stored once.
    del tensors["lm_head.weight"]
  os.makedirs(path, exist_ok=True)
  save_file({k: np.ascontiguousarray(v.astype(np_dtype)) for k, v in tensors.items()},
            os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf_cfg, f, indent=1)
  if vocabulary is not None and hasattr(vocabulary, "save_tokenizer"):
    vocabulary.save_tokenizer(path)
  elif vocabulary is not None and hasattr(vocabulary, "sp_model"):
    data = spiece_bytes(vocabulary)  # read before the write: it may be this very file
    with open(os.path.join(path, "spiece.model"), "wb") as f:
      f.write(data)

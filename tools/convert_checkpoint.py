"""Converts checkpoints between Hugging Face directories and orbax.

  python tools/convert_checkpoint.py hf-to-orbax HF_DIR OUT_DIR
  python tools/convert_checkpoint.py orbax-to-hf CKPT_DIR OUT_DIR [--config FILE]
      [--step N] [--vocab PATH] [--dtype float32|bfloat16|float16]

hf-to-orbax reads a T5 or Llama directory and writes OUT_DIR/params (an orbax
checkpoint of the float32 parameter tree), OUT_DIR/model_config.json (the
flanjax model config plus the original config.json) and OUT_DIR/hf_files/
(the directory's other files: tokenizer, generation config, ...).

orbax-to-hf takes such a directory, or a training run (its model_dir or its
checkpoints/ folder; the latest step unless --step), and writes a directory
that transformers loads. The model config comes from --config (a .gin file
binding T5Config or DecoderConfig, a model_config.json, a Hugging Face
config.json, or a run_info.json), else from model_config.json or the run's
run_info.json. --vocab adds tokenizer files: a folder's, or one spiece .model
or tokenizer.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flanjax.config import run_plain_main  # noqa: E402
from flanjax.errors import UserError  # noqa: E402

PARAMS_DIR = "params"
CONFIG_FILE = "model_config.json"
HF_FILES_DIR = "hf_files"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt",
                    ".gguf", ".index.json")
_TYPES = {"t5": "T5Config", "decoder": "DecoderConfig"}


def _config_classes():
  from flanjax.models.decoder import DecoderConfig  # pylint: disable=g-import-not-at-top
  from flanjax.models.t5 import T5Config  # pylint: disable=g-import-not-at-top
  return {"t5": T5Config, "decoder": DecoderConfig}


def config_to_json(cfg) -> dict:
  kind = next(k for k, c in _config_classes().items() if isinstance(cfg, c))
  return {"type": kind, "config": dataclasses.asdict(cfg)}


def _config_from_fields(fields: dict, source: str, kind: str | None = None):
  classes = _config_classes()
  if kind is None:
    # T5 has encoder layers; a decoder has num_kv_heads.
    kind = "t5" if "num_encoder_layers" in fields else "decoder"
  if kind not in classes:
    raise UserError(f"{source}: model type {kind!r} is not one of {', '.join(classes)}")
  cls = classes[kind]
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise UserError(f"{source}: {', '.join(unknown)} not a field of {cls.__name__}")
  try:
    return cls(**fields)
  except (TypeError, ValueError) as e:
    raise UserError(f"{source}: {e}") from None


def config_from_file(path: str):
  """A model config from a .gin file or a JSON file (ours, HF's or a run_info.json)."""
  if not os.path.isfile(path):
    raise UserError(f"{path} not found (--config)")
  if path.endswith(".gin"):
    return _config_from_gin(path)
  try:
    with open(path) as f:
      data = json.load(f)
  except json.JSONDecodeError as e:
    raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
  if not isinstance(data, dict):
    raise UserError(f"{path}: expected a JSON object")
  if "model_type" in data or "architectures" in data:
    from flanjax.models import hf  # pylint: disable=g-import-not-at-top
    return hf.config_from_hf(data, path)
  if "type" in data and "config" in data:
    return _config_from_fields(data["config"], path, data["type"])
  if isinstance(data.get("model"), dict):  # run_info.json
    return _config_from_fields(data["model"], path)
  return _config_from_fields(data, path)


def _config_from_gin(path: str):
  import gin  # pylint: disable=g-import-not-at-top
  from flanjax import config as flan_config  # pylint: disable=g-import-not-at-top
  classes = _config_classes()
  gin.clear_config()
  for p in flan_config.search_paths(()):
    gin.add_config_file_search_path(p)
  try:
    # Only the model config matters: the trainer's other bindings are skipped.
    gin.parse_config_file(path, skip_unknown=True)
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f"gin file {path}: {flan_config._one_line(e)}") from None  # pylint: disable=protected-access
  bound = []
  for kind, cls in classes.items():
    for field in dataclasses.fields(cls):
      try:
        gin.query_parameter(f"{cls.__name__}.{field.name}")
        bound.append(kind)
        break
      except ValueError:
        continue
  if len(bound) != 1:
    gin.clear_config()
    what = "both" if bound else "neither"
    raise UserError(f"gin file {path} binds {what} of T5Config and DecoderConfig; "
                    "give one model config")
  try:
    return classes[bound[0]]()
  finally:
    gin.clear_config()


# ---------------------------------------------------------------- orbax side

def _absent_or_empty(path: str, overwrite: bool):
  if os.path.exists(path) and os.listdir(path):
    if not overwrite:
      raise UserError(f"{path} exists and is not empty; pass --overwrite to replace it")
    shutil.rmtree(path)


def write_orbax(out_dir: str, cfg, params, hf_config: dict | None = None,
                files_from: str | None = None, overwrite: bool = False):
  """params + model_config.json (+ the HF directory's non-weight files)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  out_dir = os.path.abspath(out_dir)
  _absent_or_empty(out_dir, overwrite)
  os.makedirs(out_dir, exist_ok=True)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.join(out_dir, PARAMS_DIR), jax.tree.map(np.asarray, params))
  ckptr.wait_until_finished()
  ckptr.close()
  meta = config_to_json(cfg)
  if hf_config is not None:
    meta["hf_config"] = hf_config
  with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
    json.dump(meta, f, indent=1)
  if files_from:
    dest = os.path.join(out_dir, HF_FILES_DIR)
    for name in sorted(os.listdir(files_from)):
      src = os.path.join(files_from, name)
      if os.path.isfile(src) and name != "config.json" and not name.endswith(_WEIGHT_SUFFIXES):
        os.makedirs(dest, exist_ok=True)
        shutil.copy2(src, os.path.join(dest, name))


def _restore_numpy(path: str, subtree: str | None = None):
  """An orbax pytree as numpy arrays on the host, whatever mesh wrote it."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  ckptr = ocp.PyTreeCheckpointer()
  try:
    tree = ckptr.metadata(path).item_metadata.tree
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f"{path}: not a readable orbax checkpoint ({type(e).__name__})") from None
  if subtree is not None:
    if not isinstance(tree, dict) or subtree not in tree:
      raise UserError(f"{path}: the checkpoint has no {subtree!r} entry")
    tree = {subtree: tree[subtree]}
  restore_args = jax.tree.map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  item = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree)
  out = ckptr.restore(path, args=ocp.args.PyTreeRestore(
      item=item, restore_args=restore_args, partial_restore=subtree is not None))
  return out if subtree is None else out[subtree]


def _training_checkpoint(ckpt_dir: str, step: int | None):
  """(step folder's state item, run folder) of a training run, or None."""
  for root in (os.path.join(ckpt_dir, "checkpoints"), ckpt_dir):
    if not os.path.isdir(root):
      continue
    steps = sorted(int(n) for n in os.listdir(root)
                   if n.isdigit() and os.path.isdir(os.path.join(root, n, "state")))
    if not steps:
      continue
    if step is None:
      step = steps[-1]
    elif step not in steps:
      raise UserError(f"{root}: no step {step} (steps: {', '.join(map(str, steps))})")
    run_dir = ckpt_dir if root != ckpt_dir else os.path.dirname(os.path.abspath(root))
    return os.path.join(root, str(step), "state"), run_dir
  return None


def read_orbax(ckpt_dir: str, config: str | None = None, step: int | None = None):
  """(model config, params, original HF config or None, folder of HF files or None)."""
  ckpt_dir = os.path.abspath(ckpt_dir)
  if not os.path.isdir(ckpt_dir):
    raise UserError(f"{ckpt_dir} is not a directory")
  hf_config, files_dir = None, None
  meta_path = os.path.join(ckpt_dir, CONFIG_FILE)
  if os.path.isdir(os.path.join(ckpt_dir, PARAMS_DIR)):
    params = _restore_numpy(os.path.join(ckpt_dir, PARAMS_DIR))
    if config is None:
      if not os.path.isfile(meta_path):
        raise UserError(f"{meta_path} not found: give the model config with --config")
      config = meta_path
    if os.path.isfile(meta_path):
      with open(meta_path) as f:
        hf_config = json.load(f).get("hf_config")
    if os.path.isdir(os.path.join(ckpt_dir, HF_FILES_DIR)):
      files_dir = os.path.join(ckpt_dir, HF_FILES_DIR)
  else:
    found = _training_checkpoint(ckpt_dir, step)
    if found is None:
      raise UserError(f"{ckpt_dir}: neither a converted checkpoint ({PARAMS_DIR}/ and "
                      f"{CONFIG_FILE}) nor a training run (checkpoints/<step>/state)")
    state_dir, run_dir = found
    params = _restore_numpy(state_dir, subtree="params")
    if config is None:
      config = os.path.join(run_dir, "run_info.json")
      if not os.path.isfile(config):
        raise UserError(f"{config} not found: give the model config with --config")
  cfg = config_from_file(config)
  if getattr(cfg, "vocab_size", None) == 0:
    # The trainer sizes the vocabulary from the tokenizer: read it off the params.
    emb = params.get("token_embedding") if isinstance(params, dict) else None
    if emb is None:
      raise UserError(f"{config}: vocab_size is 0 and the params have no token_embedding")
    cfg = dataclasses.replace(cfg, vocab_size=int(emb.shape[0]))
  _check_params(cfg, params, config)
  return cfg, params, hf_config, files_dir


def _check_params(cfg, params, source: str):
  """Params and config describe the same model: same names, same shapes."""
  import jax  # pylint: disable=g-import-not-at-top
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from flanjax.models import decoder, t5  # pylint: disable=g-import-not-at-top
  if isinstance(cfg, t5.T5Config):
    model, dummy = t5.T5(cfg), t5.dummy_batch(1, 2, 2)
  else:
    model, dummy = decoder.Decoder(cfg), decoder.dummy_batch(1, 2)
  want = nn.unbox(jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), **dummy))["params"])
  flat = lambda tree: {"/".join(str(getattr(k, "key", k)) for k in path): leaf
                       for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
  want, have = flat(want), flat(params)
  for name in sorted(set(want) | set(have)):
    if name not in have:
      raise UserError(f"parameter {name} is missing from the checkpoint ({source} describes it)")
    if name not in want:
      raise UserError(f"parameter {name} of the checkpoint is not in the model {source} "
                      "describes")
    if tuple(have[name].shape) != tuple(want[name].shape):
      raise UserError(f"parameter {name} has shape {tuple(have[name].shape)}, {source} "
                      f"implies {tuple(want[name].shape)}")


def _copy_vocab(vocab: str, out_dir: str):
  if os.path.isdir(vocab):
    for name in sorted(os.listdir(vocab)):
      src = os.path.join(vocab, name)
      if os.path.isfile(src) and name != "config.json" and not name.endswith(_WEIGHT_SUFFIXES):
        shutil.copy2(src, os.path.join(out_dir, name))
  elif os.path.isfile(vocab):
    name = "tokenizer.json" if vocab.endswith(".json") else "spiece.model"
    shutil.copy2(vocab, os.path.join(out_dir, name))
  else:
    raise UserError(f"{vocab} not found (--vocab)")


def _vocabulary_in(path: str):
  """The vocabulary of the tokenizer files in `path` (for config.json's token ids)."""
  if os.path.isfile(os.path.join(path, "tokenizer.json")):
    from flanjax.data import hf_vocab  # pylint: disable=g-import-not-at-top
    return hf_vocab.HFTokenizerVocabulary.from_directory(path, model_config={})
  return None


# ---------------------------------------------------------------- commands

def hf_to_orbax(hf_dir: str, out_dir: str, overwrite: bool = False):
  from flanjax.models import hf  # pylint: disable=g-import-not-at-top
  cfg, params, _ = hf.load(hf_dir)
  write_orbax(out_dir, cfg, params, hf_config=hf.read_config(hf_dir), files_from=hf_dir,
              overwrite=overwrite)
  return cfg


def orbax_to_hf(ckpt_dir: str, out_dir: str, config: str | None = None,
                step: int | None = None, vocab: str | None = None, dtype: str | None = None,
                overwrite: bool = False):
  from flanjax.models import hf  # pylint: disable=g-import-not-at-top
  cfg, params, hf_config, files_dir = read_orbax(ckpt_dir, config, step)
  if dtype is None:
    original = (hf_config or {}).get("dtype") or (hf_config or {}).get("torch_dtype")
    dtype = original if original in hf.SAVE_DTYPES else "float32"
  out_dir = os.path.abspath(out_dir)
  _absent_or_empty(out_dir, overwrite)
  os.makedirs(out_dir, exist_ok=True)
  # Tokenizer files first, so config.json can take its token ids from them.
  if files_dir:
    _copy_vocab(files_dir, out_dir)
  run_vocab = os.path.join(ckpt_dir, "vocab")  # a training run keeps its tokenizer there
  if not vocab and not files_dir and os.path.isdir(run_vocab):
    _copy_vocab(run_vocab, out_dir)
  if vocab:
    _copy_vocab(vocab, out_dir)
  hf.save(cfg, params, out_dir, vocabulary=_vocabulary_in(out_dir), extra_config=hf_config,
          dtype=dtype)
  return cfg


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(prog="convert_checkpoint", description=__doc__.split("\n")[0])
  sub = ap.add_subparsers(dest="command", required=True)
  a = sub.add_parser("hf-to-orbax", help="a Hugging Face T5 or Llama folder -> orbax")
  a.add_argument("hf_dir")
  a.add_argument("out_dir")
  a.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
  b = sub.add_parser("orbax-to-hf", help="a converted checkpoint or training run -> HF folder")
  b.add_argument("ckpt_dir")
  b.add_argument("out_dir")
  b.add_argument("--config", default=None,
                 help="model config: .gin, model_config.json, HF config.json or run_info.json")
  b.add_argument("--step", type=int, default=None, help="training step (default: latest)")
  b.add_argument("--vocab", default=None,
                 help="tokenizer files to include: a folder, a .model or a tokenizer.json")
  b.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                 help="dtype of the written tensors (default: the original's, else float32)")
  b.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
  args = ap.parse_args(argv)
  logging.getLogger("absl").setLevel(logging.ERROR)  # orbax's notes on missing metadata
  if args.command == "hf-to-orbax":
    cfg = hf_to_orbax(args.hf_dir, args.out_dir, args.overwrite)
  else:
    cfg = orbax_to_hf(args.ckpt_dir, args.out_dir, args.config, args.step, args.vocab,
                      args.dtype, args.overwrite)
  print(f"wrote {args.out_dir} ({type(cfg).__name__}, {cfg.num_params():,} parameters)")
  return 0


if __name__ == "__main__":
  run_plain_main(main, "convert_checkpoint")

"""Converts checkpoints between Hugging Face directories and orbax.

  python tools/convert_checkpoint.py hf-to-orbax HF_DIR OUT_DIR [--adapter PEFT_DIR]
  python tools/convert_checkpoint.py orbax-to-peft RUN_DIR OUT_DIR [--step N|best]
  python tools/convert_checkpoint.py orbax-to-hf CKPT_DIR OUT_DIR [--config FILE]
      [--step N] [--vocab PATH] [--dtype float32|bfloat16|float16] [--base HF_DIR]

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

LoRA (train.peft): orbax-to-peft writes a LoRA run's adapters in PEFT's format
(adapter_config.json, adapter_model.safetensors; peft.PeftModel.from_pretrained
loads them over the base); orbax-to-hf on a LoRA run writes the merged model
(--base: the base's folder, if it moved; its fingerprint must be the recorded one);
hf-to-orbax --adapter merges a PEFT adapter folder into the converted weights.
Prompt tuning (train.peft = @PromptTuningConfig()): orbax-to-peft writes the soft
prompt as PEFT's PROMPT_TUNING folder (prompt_embeddings), and orbax-to-hf refuses
it (an HF model folder has no soft prompt); hf-to-orbax --adapter
keeps a PEFT soft prompt beside the converted weights (params/soft_prompt), which
infer and evaluate then put before every prompt.
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
from flanjax.models.loading import (  # noqa: E402  pylint: disable=unused-import
    CONFIG_FILE, HF_FILES_DIR, PARAMS_DIR, config_to_json, read_orbax)

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt",
                    ".gguf", ".index.json")


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
  if os.path.isfile(os.path.join(path, "spiece.model")):
    import seqio  # pylint: disable=g-import-not-at-top
    return seqio.SentencePieceVocabulary(os.path.join(path, "spiece.model"))
  return None


def _note_sentencepiece_decoder(cfg, out_dir: str) -> None:
  """transformers reads spiece.model for T5 only: a decoder's export says how to tokenize."""
  from flanjax.models.decoder import DecoderConfig  # pylint: disable=g-import-not-at-top
  if isinstance(cfg, DecoderConfig) and not os.path.isfile(os.path.join(out_dir, "tokenizer.json")) \
      and os.path.isfile(os.path.join(out_dir, "spiece.model")):
    print(f"note: {out_dir} keeps the run's SentencePiece vocabulary as spiece.model, which "
          "transformers' AutoTokenizer reads for T5 only: tokenize with sentencepiece "
          "(SentencePieceProcessor(model_file=.../spiece.model)); config.json has its token "
          "ids, so generate() stops at its EOS. A decoder started from a Hugging Face folder "
          "(train.init_from) exports that folder's tokenizer.json instead", file=sys.stderr,
          flush=True)


# ---------------------------------------------------------------- commands

def hf_to_orbax(hf_dir: str, out_dir: str, overwrite: bool = False, adapter: str | None = None):
  from flanjax.models import hf  # pylint: disable=g-import-not-at-top
  from flanjax.models.loading import merge_adapter, read_adapter  # pylint: disable=g-import-not-at-top
  cfg, params, _ = hf.load(hf_dir)
  if adapter:  # LoRA merged into the weights; a soft prompt kept beside them
    lcfg, adapters, _ = read_adapter(adapter, cfg)
    params = merge_adapter(params, lcfg, adapters, cfg, adapter)
  write_orbax(out_dir, cfg, params, hf_config=hf.read_config(hf_dir), files_from=hf_dir,
              overwrite=overwrite)
  return cfg


def _training_run(ckpt_dir: str, step):
  """(state folder, RunFolder) of a training run's checkpoint, else None (a converted
  checkpoint, no checkpoint at all)."""
  from flanjax.models.loading import training_checkpoint  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(ckpt_dir) or os.path.isdir(os.path.join(ckpt_dir, PARAMS_DIR)):
    return None
  return training_checkpoint(os.path.abspath(ckpt_dir), step)


def _adapter_run(ckpt_dir: str, step):
  """(state folder, RunFolder, run_info's adapter record) of an adapter training run, else
  None (a converted checkpoint, a full fine-tuning run)."""
  found = _training_run(ckpt_dir, step)
  adapter = (found[1].read_run_info() or {}).get("adapter") if found else None
  return (*found, adapter) if adapter else None


def _lora_run_merged(run, base: str | None, config: str | None):
  """(config, params) of a LoRA run merged over its base: `base`, else the recorded one;
  either is checked against the fingerprint the run recorded."""
  from flanjax.models import hf, lora, stack  # pylint: disable=g-import-not-at-top
  from flanjax.models.loading import (  # pylint: disable=g-import-not-at-top
      check_params, config_from_file, merge_into, restore_numpy)
  state_dir, folder, adapter = run
  recorded = adapter["base"]["path"]
  if base is None and not os.path.isdir(recorded):
    raise UserError(f"{folder.path}: the adapters' base {recorded} is not a directory; give "
                    "the folder it moved to with --base BASE_DIR")
  path = os.path.abspath(base or recorded)
  if not os.path.isdir(path):
    raise UserError(f"--base {path} is not a directory; give the LoRA run's base model folder")
  base_cfg, base_params, _ = hf.load(path)
  if lora.fingerprint(base_params) != adapter["base"]["fingerprint"]:
    raise UserError(f"{folder.path}: the base in {path} is not the one the adapters were "
                    "trained over (its fingerprint differs); give that base with --base BASE_DIR")
  params = merge_into((base_cfg, base_params), adapter,
                      restore_numpy(state_dir, subtree="params"), f"{state_dir} (adapters)")
  config = config or folder.run_info_path
  cfg = config_from_file(config)
  if getattr(cfg, "vocab_size", None) == 0:  # as read_orbax: the trainer's size, off the params
    cfg = dataclasses.replace(cfg, vocab_size=int(params["token_embedding"].shape[0]))
  params = stack.layout(params, cfg)  # the run's layout (scan_layers or not)
  check_params(cfg, params, config)
  return cfg, params


def orbax_to_hf(ckpt_dir: str, out_dir: str, config: str | None = None,
                step: int | None = None, vocab: str | None = None, dtype: str | None = None,
                overwrite: bool = False, base: str | None = None):
  from flanjax.models import hf, prompt_tuning  # pylint: disable=g-import-not-at-top
  run = _adapter_run(ckpt_dir, step)
  if run and run[2].get("type") == "prompt_tuning":
    # A Hugging Face model folder has no place for the soft prompt: it would be dropped.
    raise UserError(f"{ckpt_dir} is a prompt-tuning run, whose soft prompt an HF model folder "
                    f"cannot hold; export it with orbax-to-peft {ckpt_dir} OUT_DIR")
  if run:  # LoRA: the base merged with the adapters
    cfg, params = _lora_run_merged(run, base, config)
    hf_config, files_dir = None, None
  elif base is not None:
    raise UserError(f"--base {base}: {ckpt_dir} is not a LoRA training run; --base is the base "
                    "of a LoRA run's adapters only")
  else:
    cfg, params, hf_config, files_dir = read_orbax(ckpt_dir, config, step)
  if prompt_tuning.split(params)[1] is not None:
    raise UserError(f"{ckpt_dir} holds a soft prompt ({PARAMS_DIR}/{prompt_tuning.KEY}) that an "
                    "HF model folder cannot hold; use the PEFT folder it came from with the base")
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
  _note_sentencepiece_decoder(cfg, out_dir)
  _note_prefix_lm(_training_run(ckpt_dir, step), ckpt_dir, "transformers runs the export "
                  "causally, so its outputs differ from flanjax's for --checkpoint RUN "
                  "(flanjax.infer --checkpoint OUT_DIR runs the export causally too)")
  return cfg


def _note_prefix_lm(found, ckpt_dir: str, consequence: str) -> None:
  """A note when `found` (`_training_run`'s answer for `ckpt_dir`) trained a decoder as a
  prefix LM: an HF or PEFT export is run causally there, a layout the weights were not
  trained in."""
  if found and (found[1].read_run_info() or {}).get("kind") == "prefix_lm":
    print(f"note: {ckpt_dir} trained a prefix LM (its prompt read both ways, each row "
          f"[0] + prompt + EOS + response); {consequence}", file=sys.stderr, flush=True)


def orbax_to_peft(run_dir: str, out_dir: str, step=None, overwrite: bool = False):
  """An adapter run's weights (the latest step, or `step`) as a PEFT adapter folder."""
  from flanjax.models import lora, prompt_tuning  # pylint: disable=g-import-not-at-top
  from flanjax.models.loading import (  # pylint: disable=g-import-not-at-top
      config_from_file, read_adapter, training_checkpoint)
  found = training_checkpoint(os.path.abspath(run_dir), step)
  if found is None:
    raise UserError(f"{run_dir}: not a training run (checkpoints/<step>/state)")
  info = found[1].read_run_info() or {}
  cfg = config_from_file(found[1].run_info_path)
  lcfg, adapters, sites = read_adapter(run_dir, cfg, step)
  out_dir = os.path.abspath(out_dir)
  _absent_or_empty(out_dir, overwrite)
  base = info["adapter"]["base"]["path"]
  if isinstance(lcfg, prompt_tuning.PromptTuningConfig):
    prompt_tuning.write_peft(out_dir, lcfg, adapters[prompt_tuning.KEY], cfg, base)
  else:
    lora.write_peft(out_dir, lcfg, adapters, sites, cfg, base)
  _note_prefix_lm(found, run_dir, "PEFT runs the export causally, so its outputs differ "
                  "from flanjax's for --checkpoint BASE --adapter RUN (flanjax.infer "
                  "--adapter OUT_DIR runs the export causally too)")
  return cfg


def _step(text: str):
  from flanjax.run_folder import parse_step  # pylint: disable=g-import-not-at-top
  return parse_step(text)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(prog="convert_checkpoint", description=__doc__.split("\n")[0])
  sub = ap.add_subparsers(dest="command", required=True)
  a = sub.add_parser("hf-to-orbax", help="a Hugging Face T5 or Llama folder -> orbax")
  a.add_argument("hf_dir")
  a.add_argument("out_dir")
  a.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
  a.add_argument("--adapter", default=None, help="a PEFT LoRA folder to merge into the weights, or a "
                 "prompt-tuning folder to keep beside them")
  p = sub.add_parser("orbax-to-peft", help="a LoRA or prompt-tuning run's adapters -> PEFT "
                 "folder")
  p.add_argument("run_dir")
  p.add_argument("out_dir")
  p.add_argument("--step", type=_step, default=None, help="training step or 'best' (default: "
                 "latest)")
  p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
  b = sub.add_parser("orbax-to-hf", help="a converted checkpoint or training run -> HF folder")
  b.add_argument("ckpt_dir")
  b.add_argument("out_dir")
  b.add_argument("--config", default=None,
                 help="model config: .gin, model_config.json, HF config.json or run_info.json")
  b.add_argument("--step", type=_step, default=None, help="training step or 'best' "
                 "(default: latest)")
  b.add_argument("--vocab", default=None,
                 help="tokenizer files to include: a folder, a .model or a tokenizer.json")
  b.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                 help="dtype of the written tensors (default: the original's, else float32)")
  b.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
  b.add_argument("--base", default=None, help="a LoRA run's base model folder, where it moved "
                 "to (default: the one run_info.json records)")
  args = ap.parse_args(argv)
  logging.getLogger("absl").setLevel(logging.ERROR)  # orbax's notes on missing metadata
  if args.command == "hf-to-orbax":
    cfg = hf_to_orbax(args.hf_dir, args.out_dir, args.overwrite, args.adapter)
  elif args.command == "orbax-to-peft":
    cfg = orbax_to_peft(args.run_dir, args.out_dir, args.step, args.overwrite)
    print(f"wrote {args.out_dir} (PEFT adapters over {type(cfg).__name__})")
    return 0
  else:
    cfg = orbax_to_hf(args.ckpt_dir, args.out_dir, args.config, args.step, args.vocab,
                      args.dtype, args.overwrite, args.base)
  print(f"wrote {args.out_dir} ({type(cfg).__name__}, {cfg.num_params():,} parameters)")
  return 0


if __name__ == "__main__":
  run_plain_main(main, "convert_checkpoint")

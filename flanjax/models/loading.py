"""Loading any checkpoint flanjax can read, for inference and evaluation.

Three kinds of folder hold a model:
  - a training run (runs/<mixture>/, read through `flanjax.run_folder`:
    checkpoints/<step>/state, run_info.json for the model config and kind,
    vocab/ for the tokenizer),
  - a converted orbax checkpoint (params/, model_config.json, hf_files/), as
    tools/convert_checkpoint.py hf-to-orbax writes it,
  - a Hugging Face T5 or Llama folder (config.json, weights, tokenizer).
`load` tells them apart and returns the model, its parameters on the host and
its vocabulary; tools/convert_checkpoint.py uses the same readers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any

from flanjax.errors import UserError

PARAMS_DIR = "params"
CONFIG_FILE = "model_config.json"
HF_FILES_DIR = "hf_files"


def config_classes():
  from flanjax.models import kinds  # pylint: disable=g-import-not-at-top
  return kinds.config_classes()


def config_to_json(cfg) -> dict:
  from flanjax.models import kinds  # pylint: disable=g-import-not-at-top
  return {"type": kinds.config_type(cfg), "config": dataclasses.asdict(cfg)}


def _config_from_fields(fields: dict, source: str, kind: str | None = None):
  from flanjax.models import kinds  # pylint: disable=g-import-not-at-top
  classes = config_classes()
  if kind is None:
    # T5 has encoder layers; a decoder has num_kv_heads.
    kind = (kinds.ENC_DEC if "num_encoder_layers" in fields else kinds.DECODER).config_type
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
  classes = config_classes()
  gin.clear_config()
  for p in flan_config.search_paths(()):
    gin.add_config_file_search_path(p)
  try:
    # Only the model config matters: the trainer's other bindings are skipped.
    gin.parse_config_file(path, skip_unknown=True)
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f"gin file {path}: {flan_config.one_line(e)}") from None
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


def restore_numpy(path: str, subtree: str | None = None):
  """An orbax pytree as numpy arrays on the host, whatever mesh wrote it."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  import logging  # pylint: disable=g-import-not-at-top
  ckptr = ocp.PyTreeCheckpointer()
  absl_log = logging.getLogger("absl")
  level = absl_log.level  # orbax warns that a run's state item has no step metadata of its own
  absl_log.setLevel(logging.ERROR)
  try:
    tree = ckptr.metadata(path).item_metadata.tree
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f"{path}: not a readable orbax checkpoint ({type(e).__name__})") from None
  finally:
    absl_log.setLevel(level)
  if subtree is not None:
    if not isinstance(tree, dict) or subtree not in tree:
      raise UserError(f"{path}: the checkpoint has no {subtree!r} entry")
    tree = {subtree: tree[subtree]}
  restore_args = jax.tree.map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  item = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree)
  out = ckptr.restore(path, args=ocp.args.PyTreeRestore(
      item=item, restore_args=restore_args, partial_restore=subtree is not None))
  return out if subtree is None else out[subtree]


def training_checkpoint(ckpt_dir: str, step: int | str | None):
  """(step folder's state item, RunFolder) of a training run, or None.

  step 'best', or ckpt_dir a run's checkpoints/best folder: the best checkpoint
  (kept by runs with train.early_stopping)."""
  from flanjax.run_folder import BEST_DIR, RunFolder  # pylint: disable=g-import-not-at-top
  run = RunFolder.find(ckpt_dir)
  if run is None:
    return None
  if step is None and RunFolder.is_best_dir(ckpt_dir):
    step = BEST_DIR
  return run.state_dir(run.resolve_step(step)), run


def read_orbax(ckpt_dir: str, config: str | None = None, step: int | str | None = None):
  """(model config, params, original HF config or None, folder of HF files or None)."""
  ckpt_dir = os.path.abspath(ckpt_dir)
  if not os.path.isdir(ckpt_dir):
    raise UserError(f"{ckpt_dir} is not a directory")
  hf_config, files_dir = None, None
  meta_path = os.path.join(ckpt_dir, CONFIG_FILE)
  if os.path.isdir(os.path.join(ckpt_dir, PARAMS_DIR)):
    params = restore_numpy(os.path.join(ckpt_dir, PARAMS_DIR))
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
    found = training_checkpoint(ckpt_dir, step)
    if found is None:
      raise UserError(f"{ckpt_dir}: neither a converted checkpoint ({PARAMS_DIR}/ and "
                      f"{CONFIG_FILE}) nor a training run (checkpoints/<step>/state)")
    state_dir, run = found
    params = restore_numpy(state_dir, subtree="params")
    adapter = (run.read_run_info() or {}).get("adapter")
    if adapter:  # a LoRA run: its base with the adapters merged
      params = merge_into(read_base(adapter, run.run_info_path), adapter, params,
                          f"{state_dir} (adapters)")
    if config is None:
      config = run.run_info_path
      if not os.path.isfile(config):
        raise UserError(f"{config} not found: give the model config with --config")
  cfg = config_from_file(config)
  if getattr(cfg, "vocab_size", None) == 0:
    # The trainer sizes the vocabulary from the tokenizer: read it off the params.
    emb = params.get("token_embedding") if isinstance(params, dict) else None
    if emb is None:
      raise UserError(f"{config}: vocab_size is 0 and the params have no token_embedding")
    cfg = dataclasses.replace(cfg, vocab_size=int(emb.shape[0]))
  from flanjax.models import stack  # pylint: disable=g-import-not-at-top
  # A scan_layers run's checkpoint holds its layers stacked: read in the config's layout.
  params = stack.layout(params, cfg)
  check_params(cfg, params, config)
  return cfg, params, hf_config, files_dir


# ---------------------------------------------------------------- adapters

def _adapter_modules():
  """(lora, prompt_tuning): imported here, inside a command, after gin may have locked its
  config, so their configurables register under an unlocked config."""
  import gin  # pylint: disable=g-import-not-at-top
  with gin.unlock_config():
    from flanjax.models import lora, prompt_tuning  # pylint: disable=g-import-not-at-top
  return lora, prompt_tuning


def lora_config(adapter: dict):
  """The adapter config a run recorded in run_info.json's "adapter" (LoRA or prompt tuning)."""
  lora, prompt_tuning = _adapter_modules()
  if adapter.get("type") == "prompt_tuning":
    return prompt_tuning.PromptTuningConfig(adapter["num_virtual_tokens"],
                                            adapter.get("init", "random"),
                                            adapter.get("init_text"))
  targets = adapter.get("targets")
  return lora.LoraConfig(rank=adapter["rank"], alpha=adapter["alpha"],
                         dropout=adapter.get("dropout", 0.0),
                         targets=tuple(targets) if isinstance(targets, list) else targets)


def read_base(adapter: dict, source: str):
  """(config, host params) of the base a LoRA run recorded, checked by its fingerprint."""
  from flanjax.models import hf  # pylint: disable=g-import-not-at-top
  lora, _ = _adapter_modules()
  path = adapter["base"]["path"]
  if not os.path.isdir(path):
    raise UserError(f"{source}: the adapters' base {path} is not a directory; give the base "
                    "with --checkpoint BASE --adapter RUN")
  cfg, params, _ = hf.load(path)
  if lora.fingerprint(params) != adapter["base"]["fingerprint"]:
    raise UserError(f"{source}: the base in {path} is not the one the adapters were trained "
                    "over (its fingerprint differs); give that base with --checkpoint BASE "
                    "--adapter RUN")
  return cfg, params


def merge_adapter(params, config, adapters, cfg, source: str):
  """Host params with adapters applied: LoRA's merged into the kernels, a soft prompt
  put beside them (prompt tuning)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  lora, prompt_tuning = _adapter_modules()
  if isinstance(config, prompt_tuning.PromptTuningConfig):
    prompt = adapters[prompt_tuning.KEY] if isinstance(adapters, dict) else adapters
    prompt_tuning.check_fits(prompt, cfg, source)
    return prompt_tuning.merge(prompt_tuning.split(params)[0], np.asarray(prompt, np.float32))
  return lora.merge_numpy(params, adapters, config, cfg, source)


def merge_into(base, adapter: dict, adapters, source: str):
  """base: (config, params) -> the params with a run's adapters merged."""
  cfg, params = base
  return merge_adapter(params, lora_config(adapter), adapters, cfg, source)


def read_adapter(path: str, cfg, step: int | str | None = None):
  """(config, adapters, LoRA sites) of a PEFT adapter folder (LoRA or prompt tuning) or of
  an adapter training run; a soft prompt's adapters are {KEY: [n, d]}."""
  lora, prompt_tuning = _adapter_modules()
  path = os.path.abspath(os.path.expanduser(path))
  if prompt_tuning.peft_type(path) == "PROMPT_TUNING":
    config, prompt = prompt_tuning.read_peft(path, cfg)
    return config, {prompt_tuning.KEY: prompt}, []
  if lora.is_peft_dir(path):
    return lora.read_peft(path, cfg)
  found = training_checkpoint(path, step)
  adapter = ((found[1].read_run_info() or {}).get("adapter") if found else None)
  if not adapter:
    raise UserError(f"{path} is neither a PEFT adapter folder ({lora.ADAPTER_CONFIG}) nor an "
                    "adapter training run (train.peft)")
  adapters = restore_numpy(found[0], subtree="params")
  config = lora_config(adapter)
  if isinstance(config, prompt_tuning.PromptTuningConfig):
    prompt_tuning.check_fits(adapters.get(prompt_tuning.KEY), cfg, found[0])
    return config, adapters, []
  return config, adapters, lora.fitted_sites(adapters, cfg, found[0])


def check_params(cfg, params, source: str):
  """Params and config describe the same model: same names, same shapes."""
  from flanjax.models import kinds  # pylint: disable=g-import-not-at-top
  _, prompt_tuning = _adapter_modules()
  params = prompt_tuning.split(params)[0]  # a soft prompt is not the model's
  kinds.check_params_fit(kinds.abstract_params(cfg), params,
                         f"the checkpoint (with the model {source} describes)")


# ---------------------------------------------------------------- any checkpoint

@dataclasses.dataclass
class Loaded:
  """A model ready to run: module, host parameters, vocabulary and its kind."""
  model: Any  # t5.T5 or decoder.Decoder
  config: Any
  params: Any
  vocab: Any  # a seqio.Vocabulary
  kind: Any  # a kinds.ModelKind: how to prompt, score and decode it
  source: str  # what was read, for reports
  step: int | None = None  # the training step of a run's checkpoint


def load(path: str, step: int | str | None = None, config: str | None = None,
         adapter: str | None = None) -> Loaded:
  """Reads a training run, a converted orbax checkpoint or a Hugging Face folder.

  A run's best checkpoint: step='best', or path <run>/checkpoints/best. adapter: a
  PEFT LoRA or prompt-tuning folder or such a run, applied to the model read from `path`."""
  if not adapter:
    return _load(path, step, config)
  lora, prompt_tuning = _adapter_modules()
  loaded = _load(path, None, config)  # `step` is the adapter run's
  apath = os.path.abspath(os.path.expanduser(adapter))
  found = None  # the adapter training run, if it is one (a PEFT folder is not)
  if prompt_tuning.peft_type(apath) is None and not lora.is_peft_dir(apath):
    found = training_checkpoint(apath, step)
  _check_base(loaded, adapter, found)
  lcfg, adapters, _ = read_adapter(adapter, loaded.config, step)
  loaded.params = merge_adapter(loaded.params, lcfg, adapters, loaded.config, adapter)
  # An adapter run is read as it trained (a Llama recipe trains a prefix LM over a causal
  # base), so --checkpoint RUN and --checkpoint BASE --adapter RUN run the same model; a
  # PEFT folder records no kind and runs as its base does.
  kind = found[1].model_kind() if found else loaded.kind
  loaded.kind = prompt_tuning.kind_of(kind, loaded.config, loaded.params)
  loaded.model = loaded.kind.build(loaded.config)
  what = "soft prompt" if loaded.kind.virtual_tokens else "LoRA adapters"
  loaded.source += f" with the {what} of {os.path.abspath(adapter)}"
  return loaded


def _check_base(loaded: Loaded, adapter: str, found) -> None:
  """An adapter run (`found`, training_checkpoint's answer) over another model than the one
  it trained over is refused: the base's fingerprint, which run_info.json records, must be
  that of --checkpoint's parameters (a PEFT folder, found None, records none to check)."""
  lora, prompt_tuning = _adapter_modules()
  base = ((found[1].read_run_info() or {}).get("adapter") or {}).get("base") if found else None
  if not isinstance(base, dict) or not base.get("fingerprint"):
    return
  if lora.fingerprint(prompt_tuning.split(loaded.params)[0]) != base["fingerprint"]:
    raise UserError(f"{adapter}: its adapters were trained over {base.get('path')}, and "
                    f"{loaded.source} is another model (its fingerprint differs); give that "
                    "base with --checkpoint")


def _load(path: str, step: int | str | None = None, config: str | None = None) -> Loaded:
  from flanjax.models import hf, kinds  # pylint: disable=g-import-not-at-top
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isdir(path):
    raise UserError(f"{path} is not a directory: give a training run (runs/<mixture>), a "
                    "converted checkpoint or a Hugging Face model folder")
  run = training_checkpoint(path, step)
  is_orbax = os.path.isdir(os.path.join(path, PARAMS_DIR))
  if run is None and not is_orbax:
    if not os.path.isfile(os.path.join(path, "config.json")):
      raise UserError(f"{path} holds no checkpoint: expected checkpoints/<step>/state (a "
                      f"training run), {PARAMS_DIR}/ (a converted checkpoint) or config.json "
                      "and weights (a Hugging Face folder)")
    cfg, params, vocab = hf.load(path)
    if vocab is None:
      raise UserError(f"{path} has no spiece.model or tokenizer.json: add the model's "
                      "tokenizer files there")
    # An imported model reads its prompt as it was pretrained: a decoder causally.
    kind, source, at = kinds.for_config(cfg, trained_by_flanjax=False), \
        f"Hugging Face folder {path}", None
  else:
    cfg, params, hf_config, files_dir = read_orbax(path, config, step)
    if is_orbax:
      vocab = hf.vocabulary(files_dir, cfg, hf_config or {}) if files_dir else None
      if vocab is None:
        raise UserError(f"{path} has no tokenizer ({HF_FILES_DIR}/spiece.model or "
                        "tokenizer.json): convert the model again from a folder that has one")
      kind, source, at = kinds.for_config(cfg, trained_by_flanjax=False), \
          f"converted checkpoint {path}", None
    else:
      state_dir, run_folder = run
      run_info = run_folder.read_run_info() or {}
      vocab = run_folder.load_vocabulary(run_info)
      name = os.path.basename(os.path.dirname(state_dir))
      at = int(name) if name.isdigit() else int(run_folder.read_best()["step"])
      kind, source = run_folder.model_kind(run_info), (
          f"training run {run_folder.path}, step {at}" + ("" if name.isdigit() else
                                                          " (its best checkpoint)"))
  if vocab.vocab_size > cfg.vocab_size:
    # Its pieces past the embedding table (an added token never resized in) cannot be read;
    # decoding refuses a prompt that holds one.
    print(f"note: {path}: its tokenizer has {vocab.vocab_size} pieces, more than the model's "
          f"vocab_size {cfg.vocab_size}; a text holding ids from {cfg.vocab_size} on is refused",
          file=sys.stderr, flush=True)
  _, prompt_tuning = _adapter_modules()
  kind = prompt_tuning.kind_of(kind, cfg, params)  # a prompt-tuning run's soft prompt
  return Loaded(kind.build(cfg), cfg, params, vocab, kind, source, at)

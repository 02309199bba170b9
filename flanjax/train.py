"""python -m flanjax.train --gin_file=flan.gin [--gin.train.num_steps=100 ...]

Builds the vocabulary and tasks, trains a T5 (train.model_config = @T5Config())
or a decoder-only model (@DecoderConfig(), prefix-LM rows: the inputs attend
both ways and carry no loss) on packed batches of the mixture, checkpoints
with orbax, logs to the console and TensorBoard, and ends with an exact-match
evaluation against the trivial baseline.

train.init_from = a local Hugging Face model directory starts from its weights,
config and tokenizer (runs/finetune_flan_t5.gin, runs/finetune_llama.gin).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from typing import Callable, Mapping, Sequence

# Quiet TensorFlow (used by seqio for the input pipeline only) before it loads.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import gin  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import seqio  # noqa: E402

from flanjax import config as flan_config  # noqa: E402
from flanjax import decoding, evaluation  # noqa: E402
# run holds gin's `evaluate`: imported before gin locks its config.
from flanjax.evaluation import harness, run as eval_run  # noqa: E402
# vocab is imported for its gin configurables (builtin_vocabulary, sentencepiece_vocabulary).
from flanjax.data import mixtures, packing, pipeline, registry, tasks as task_lib, vocab as vocab_lib  # noqa: E402,F401
from flanjax.errors import UserError  # noqa: E402
# decoder is imported for its gin configurable DecoderConfig.
from flanjax.models import decoder, hf, t5  # noqa: E402
from flanjax.training import checkpoints, metrics as metrics_lib, optimizers  # noqa: E402
from flanjax.training import partitioning, trainer  # noqa: E402


def _hide_accelerators_from_tf():
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    tf.config.set_visible_devices([], "GPU")
  except Exception:  # pylint: disable=broad-except
    pass


def _check_model_dir(model_dir: str):
  """Fails before training if the model directory cannot be written."""
  try:
    os.makedirs(model_dir, exist_ok=True)
    probe = os.path.join(model_dir, f".write_test.{os.getpid()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise UserError(f"model directory {model_dir} is not writable ({e.strerror}); "
                    "set --gin.train.model_dir to a writable folder") from None


def _save_vocabulary(vocab, directory: str) -> None:
  """Keeps the run's tokenizer beside its checkpoints, so an export is self-contained."""
  if jax.process_index() != 0:
    return
  os.makedirs(directory, exist_ok=True)
  if isinstance(vocab, seqio.SentencePieceVocabulary):
    tmp = os.path.join(directory, "spiece.model.tmp")
    with open(tmp, "wb") as f:
      f.write(vocab.sp_model)
    os.replace(tmp, os.path.join(directory, "spiece.model"))
  elif hasattr(vocab, "save_tokenizer"):
    vocab.save_tokenizer(directory)


def _open_log(path: str):
  """Opens a JSON-lines log for appending, dropping a last line cut short by a kill.

  A resumed run appends the steps after its checkpoint again; readers take the
  last record of each step.
  """
  if os.path.exists(path):
    with open(path, "rb+") as f:
      data = f.read()
      if data and not data.endswith(b"\n"):
        f.truncate(data.rfind(b"\n") + 1)
  return open(path, "a")


def _check_run_info(model_dir: str, info: dict) -> None:
  """A model_dir belongs to one run: resuming with another vocabulary or model is refused.

  Only checks; _write_run_info records the run once its checkpoint (if any) restored.
  """
  path = os.path.join(model_dir, "run_info.json")
  if os.path.exists(path):
    try:
      with open(path) as f:
        old = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError):
      raise UserError(f"{path} is not valid JSON, so the run in {model_dir} cannot be checked "
                      "against this one; restore that file, or set --gin.train.model_dir to a "
                      "new folder") from None
    for key, what in (("vocabulary", "vocabulary"), ("model", "model config")):
      if old.get(key) != info[key]:
        was, now = old.get(key), info[key]
        if isinstance(was, dict) and isinstance(now, dict):  # name the fields that differ
          diff = sorted(k for k in set(was) | set(now) if was.get(k) != now.get(k))
          was, now = ({k: d.get(k) for k in diff} for d in (was, now))
        raise UserError(
            f"{model_dir} holds a run with a different {what} ({path}: {was!r}, now "
            f"{now!r}); its checkpoints cannot be resumed with this one: set "
            "--gin.train.model_dir to a new folder")
    if old.get("mixture") != info["mixture"]:
      print(f"note: {model_dir} was trained on {old.get('mixture')!r}; continuing on "
            f"{info['mixture']!r}", flush=True)


def _write_run_info(model_dir: str, info: dict) -> None:
  path = os.path.join(model_dir, "run_info.json")
  if jax.process_index() == 0:
    with open(path + ".tmp", "w") as f:
      json.dump(info, f, indent=1)
    os.replace(path + ".tmp", path)


ModelConfig = t5.T5Config | decoder.DecoderConfig
# What a resumed or fine-tuned run may change: nothing here shapes the parameters.
TRAINING_FIELDS = ("dtype", "remat", "dropout_rate")


def _vocab_size_for(model_config: ModelConfig, vocabulary) -> ModelConfig:
  needed = vocabulary.vocab_size
  if model_config.vocab_size == 0:
    # Rounded up to a multiple of 128 for efficient matmuls.
    return dataclasses.replace(model_config, vocab_size=int(math.ceil(needed / 128) * 128))
  if model_config.vocab_size < needed:
    raise UserError(f"{type(model_config).__name__}.vocab_size={model_config.vocab_size} is "
                    f"smaller than the vocabulary ({needed} pieces); raise it or set it to 0 "
                    "(automatic)")
  return model_config


def _model_for(cfg: ModelConfig):
  """(model, init batch, packing kind) of a T5Config or a DecoderConfig."""
  if isinstance(cfg, t5.T5Config):
    return t5.T5(cfg), t5.dummy_batch(1, 8, 8), "enc_dec"
  if isinstance(cfg, decoder.DecoderConfig):
    return decoder.Decoder(cfg), decoder.dummy_batch(1, 8, 8), "prefix_lm"
  raise UserError(f"train.model_config must be @T5Config() or @DecoderConfig(), "
                  f"not {type(cfg).__name__}")


def _describe(cfg: ModelConfig) -> str:
  if isinstance(cfg, t5.T5Config):
    return f"T5 {cfg.d_model}d x {cfg.num_encoder_layers}+{cfg.num_decoder_layers} layers"
  return (f"decoder-only {cfg.d_model}d x {cfg.num_layers} layers, {cfg.num_heads} heads "
          f"({cfg.num_kv_heads} kv), prefix-LM")


def _from_hf_dir(path: str, model_config: ModelConfig | None, vocabulary, with_params: bool):
  """(config, params or None, vocabulary) for a run started from a Hugging Face folder.

  The folder gives the shapes; train.model_config, when it is the same kind,
  gives only the training fields (dtype, remat, dropout_rate).
  """
  if with_params:
    cfg, params, vocab = hf.load(path)
  else:  # resuming: the checkpoint has the weights
    (cfg, vocab), params = hf.load_config(path), None
  if vocab is None:
    if vocabulary is None:
      raise UserError(f"{path} has no spiece.model or tokenizer.json: add the model's "
                      "tokenizer there, or bind train.vocabulary")
    print(f"note: {path} has no tokenizer; using train.vocabulary", flush=True)
    vocab = vocabulary
  if model_config is not None:
    if type(model_config) is type(cfg):
      cfg = dataclasses.replace(cfg, **{k: getattr(model_config, k) for k in TRAINING_FIELDS})
    else:
      print(f"note: {path} holds a {type(cfg).__name__}; train.model_config "
            f"({type(model_config).__name__}) is not used", flush=True)
  return cfg, params, vocab


@gin.configurable(denylist=["stop_signal", "on_step"])
def train(
    *,
    model_dir: str | None = None,
    mixture: str = registry.BUILTIN_MIXTURE,
    vocabulary=None,
    register_fns: Sequence[Callable] = (registry.register_all,),
    model_config: ModelConfig | None = None,
    init_from: str | None = None,
    task_feature_lengths: Mapping[str, int] = None,
    batch_size: int = 32,
    num_steps: int = 1000,
    microbatches: int = 1,
    seed: int = 0,
    pack: bool = True,
    z_loss: float = 1e-4,
    label_smoothing: float = 0.0,
    loss_normalizing_factor: float | None = None,
    mesh_shape: Sequence[int] = (-1, 1, 1),
    log_every_secs: float = 5.0,
    summary_every_steps: int = 10,
    validation_every_steps: int = 0,
    validation_batches: int = 4,
    eval_every_steps: int = 0,
    max_nonfinite_in_row: int = 5,
    peak_flops: float | None = None,
    eval_at_end: bool = True,
    eval_tasks: Sequence[str] | None = None,
    eval_splits: Sequence[str] = registry.EVAL_SPLITS,
    eval_max_examples: int | None = None,
    max_decode_len: int | None = None,
    stop_signal=None,
    on_step: Callable | None = None,
) -> dict:
  """Trains and evaluates; returns a summary dict (also written to model_dir).

  init_from: a local Hugging Face model directory (T5 or Llama). A fresh run
  takes its config, weights and tokenizer (which replaces `vocabulary`); a
  resumed run takes config and tokenizer from it and the weights from its
  checkpoint. Only dtype, remat and dropout_rate of `model_config` apply then.
  """
  _hide_accelerators_from_tf()
  lengths = pipeline.check_lengths(task_feature_lengths or {"inputs": 256, "targets": 64})
  # One folder per mixture by default, so switching mixture never resumes another run.
  model_dir = os.path.abspath(model_dir or os.path.join("runs", mixture))
  _check_model_dir(model_dir)
  t_start = time.time()
  ckpt = checkpoints.Checkpointer(model_dir, cleanup_tmp=True)
  latest = ckpt.latest_step()

  # ---- model config and vocabulary (from a Hugging Face folder if given)
  init_params = None
  if init_from:
    model_config, init_params, vocabulary = _from_hf_dir(
        init_from, model_config, vocabulary, with_params=latest is None)
  if model_config is None:
    raise UserError("no model: bind train.model_config (@T5Config() or @DecoderConfig()) "
                    "or train.init_from (a Hugging Face model directory)")
  if vocabulary is None:
    raise UserError("no vocabulary: bind train.vocabulary or train.init_from")

  # ---- data
  vocab = vocabulary
  # Few-shot prompts drop exemplars until they fit the input length.
  task_lib.set_input_budget(lengths["inputs"])
  for fn in register_fns:
    fn(vocab)
  registry.get_task_or_mixture(mixture)  # unknown name -> clear error
  mixtures.check_trainable(mixture, "train")  # BBH, GSM8K test: never trained on
  print(f"vocabulary: {vocab.vocab_size} pieces", flush=True)
  rep = pipeline.length_report(mixture, "train", lengths)
  print(f"lengths: {rep.summary(lengths)}", flush=True)
  rep.check_some_fit(lengths, mixture)

  # ---- model, optimizer, mesh
  cfg = _vocab_size_for(model_config, vocab)
  # Only what shapes the parameters: dtype, remat and dropout may change on resume.
  shape_cfg = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in TRAINING_FIELDS}
  run_info = {"mixture": mixture, "vocabulary": task_lib.vocab_fingerprint(vocab),
              "model": shape_cfg}
  _check_run_info(model_dir, run_info)
  _save_vocabulary(vocab, os.path.join(model_dir, "vocab"))
  model, dummy, kind = _model_for(cfg)
  tx, lr_fn = optimizers.optimizer()
  mesh = partitioning.make_mesh(mesh_shape)
  rules = partitioning.logical_rules()
  state, shardings = trainer.create_sharded_state(model, tx, mesh, rules, seed, dummy,
                                                  params=init_params)
  del init_params  # the state holds them now
  n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
  print(f"model: {_describe(cfg)}, {n_params / 1e6:.2f}M parameters; mesh {dict(mesh.shape)} "
        f"on {jax.device_count()} {jax.devices()[0].platform} device(s)", flush=True)
  if init_from and latest is None:
    print(f"initialised from {os.path.abspath(init_from)}", flush=True)

  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    position = 0
    if latest is not None:
      # The newest checkpoint that restores; an unreadable one is moved aside.
      restored = ckpt.restore_latest(checkpoints.abstract_like(state, shardings))
      if restored is not None:
        state, position, latest = restored
        print(f"resumed from step {latest} in {ckpt.directory}", flush=True)
    _write_run_info(model_dir, run_info)  # the folder's checkpoints fit this run
    start_step = int(jax.device_get(state["step"]))
    # A disk too small for this run's checkpoints is known now, before any step.
    every = ckpt.every_steps
    ckpt.check_free_space(state, (num_steps - start_step) // every + 1 if every > 0 else 1)

    pack_stats = packing.PackingStats()
    make_ds = lambda: pipeline.get_dataset(mixture, lengths, "train", batch_size, seed, pack,  # noqa: E731
                                           stats=pack_stats, kind=kind, with_tasks=True)
    # Each row counts its examples per task, so a bad batch names its tasks.
    batch_task_names = pipeline.task_names(mixture, "train")
    stream = pipeline.BatchStream(make_ds, position)

    step_fn = trainer.make_train_step(
        model, tx, lr_fn, microbatches=microbatches, z_loss=z_loss,
        label_smoothing=label_smoothing, loss_normalizing_factor=loss_normalizing_factor,
        dropout=cfg.dropout_rate > 0)
    jit_step = trainer.jit_train_step(step_fn, shardings, mesh)
    eval_step = jax.jit(trainer.make_eval_step(model),
                        in_shardings=(shardings["params"], partitioning.batch_sharding(mesh)))

    writer = metrics_lib.SummaryWriter(os.path.join(model_dir, "tensorboard"))
    # Positions per row: inputs + targets either way (a prefix-LM row holds both).
    row_len = sum(packing.row_lengths(lengths, kind))
    tokens_per_step = batch_size * row_len
    # 6 N flops per token for the matmuls of forward and backward.
    progress = metrics_lib.Progress(
        num_steps, start_step, log_every_secs, flops_per_token=6 * n_params,
        peak_flops=peak_flops or metrics_lib.device_peak_flops())
    losses_path = os.path.join(model_dir, "train_losses.jsonl")
    losses_file = _open_log(losses_path) if jax.process_index() == 0 else None
    history = []
    nonfinite_in_row = 0
    pending = None  # (step, metrics, batch stats, batch tasks) of the step in flight
    stop = stop_signal or trainer.StopSignal()
    shape = (f"({lengths['inputs']} + {lengths['targets']})" if kind == "enc_dec" else
             f"{row_len} (prefix-LM: {lengths['inputs']} inputs + {lengths['targets']} targets)")
    print(f"training: {num_steps} steps of {batch_size} rows x {shape} tokens; logs and "
          f"checkpoints in {model_dir}", flush=True)

    def finish(pend):
      nonlocal nonfinite_in_row
      step_no, m, real, padded, tasks_in_batch = pend
      m = {k: float(v) for k, v in jax.device_get(m).items()}
      history.append(m["loss"])
      record = {"step": step_no, **m}
      if m["applied"] == 0:
        record["tasks"] = tasks_in_batch  # what the skipped batch held
      if losses_file:
        losses_file.write(json.dumps(record) + "\n")
        losses_file.flush()  # a killed run keeps every step it logged
      if m["applied"] == 0:
        nonfinite_in_row += 1
        tasks_text = (", ".join(f"{t} ({n})" for t, n in tasks_in_batch.items())
                      or "not known")
        print(f"step {step_no}: non-finite loss ({m['loss']}) or gradient norm "
              f"({m['grad_norm']}); update skipped; the batch's examples by task: {tasks_text}",
              flush=True)
        if nonfinite_in_row >= max_nonfinite_in_row:
          ckpt.wait()
          good = ckpt.latest_step()
          kept = (f"the newest checkpoint, step {good}, is from before them and intact" if
                  good is not None else "no checkpoint had been written before them")
          raise UserError(
              f"{nonfinite_in_row} non-finite steps in a row (steps "
              f"{step_no - nonfinite_in_row + 1}-{step_no}; last batch's tasks: {tasks_text}); "
              f"stopped, and {kept} in {ckpt.directory}; lower the learning rate "
              "(schedule.peak) or check those tasks' data, then rerun to resume "
              "(train.max_nonfinite_in_row sets how many in a row stop a run)")
      else:
        nonfinite_in_row = 0
      rates = progress.update(step_no, m, padded, real, force=step_no == num_steps)
      if step_no % summary_every_steps == 0 or rates:
        scal = {k: m[k] for k in ("loss", "cross_entropy", "z_loss", "grad_norm",
                                  "learning_rate")}
        scal["non_padding_share"] = real / max(padded, 1)
        if rates:
          scal.update(rates)
        writer.scalars(step_no, {f"train/{k}": v for k, v in scal.items()})
      if on_step:
        on_step(step_no, m)

    step = start_step
    # SIGTERM from here to the final save asks the loop to stop and save instead.
    stop.__enter__()
    try:
      while step < num_steps and not stop.requested:
        try:
          batch = next(stream)
        except StopIteration:
          break
        tasks_in_batch = pipeline.batch_tasks(batch, batch_task_names)  # this host's rows
        batch.pop(pipeline.TASK_COUNTS, None)
        real = float(pipeline.real_tokens(batch))
        gbatch = partitioning.global_batch(batch, mesh)
        state, m = jit_step(state, gbatch)
        step += 1
        if pending:
          finish(pending)
        pending = (step, m, real * jax.process_count(), tokens_per_step, tasks_in_batch)
        if ckpt.should_save(step):
          finish(pending)
          pending = None
          if nonfinite_in_row:
            # Keep the newest checkpoint the last good step's until updates apply again.
            print(f"step {step}: checkpoint not saved during non-finite steps", flush=True)
          else:
            ckpt.save(step, state, stream.position)
        if eval_every_steps and step % eval_every_steps == 0 and (step < num_steps or not eval_at_end):
          _evaluate_during_training(model, state["params"], vocab, kind, mixture, eval_tasks,
                                    eval_max_examples, lengths,
                                    max_decode_len or lengths["targets"], writer, step,
                                    model_dir)
        if validation_every_steps and step % validation_every_steps == 0:
          val = _validation_loss(eval_step, mixture, lengths, batch_size, seed, pack,
                                 validation_batches, state, mesh, kind)
          if val is not None:
            print(f"step {step}: validation loss {val:.4f}", flush=True)
            writer.scalars(step, {"validation/loss": val})
      if pending:
        finish(pending)
        pending = None
    except BaseException:
      # A save in flight completes, so the newest checkpoint is whole; a failure of
      # that save must not hide the error that stopped the run.
      try:
        ckpt.wait()
      except Exception:  # pylint: disable=broad-except
        pass
      stop.__exit__(None, None, None)
      raise
    finally:
      if losses_file:
        losses_file.close()
    final_step = int(jax.device_get(state["step"]))
    ckpt.save(final_step, state, stream.position, force=True)
    ckpt.wait()
    stop.__exit__(None, None, None)
    train_secs = time.time() - t_start
    if stop.requested:
      ckpt.close()
      print(f"stopped by SIGTERM at step {final_step}; checkpoint saved in {ckpt.directory}",
            flush=True)
      return {"step": final_step, "stopped": True}

    # Counted over every row the packer built (a few batches run ahead in prefetch).
    print(f"packing: {pack_stats.summary()}", flush=True)
    packed = {"non_padding_share": round(pack_stats.share(), 4)}
    for key, feature in (("encoder_share", "encoder_input_tokens"),
                         ("decoder_share", "decoder_target_tokens")):
      if feature in pack_stats.positions:  # a prefix-LM row is all decoder
        packed[key] = round(pack_stats.share(feature), 4)
    packed["mask_violations"] = pack_stats.violations
    summary = {"packing": packed, "model": type(cfg).__name__}
    summary.update({"step": final_step, "train_seconds": round(train_secs, 1),
               "first_loss": history[0] if history else None,
               "last_loss": float(np.mean(history[-10:])) if history else None,
               "model_dir": model_dir, "checkpoint_dir": ckpt.directory})
    if eval_at_end and jax.process_count() > 1:
      # Decoding here runs on one host's inputs; across hosts it would need every
      # process in each step. Evaluate the checkpoint in a single process instead.
      print("note: evaluation at the end is skipped in a multi-process run", flush=True)
    elif eval_at_end:
      names = list(eval_tasks) if eval_tasks else evaluation.tasks_of(mixture)
      params = state["params"]
      scores, secs = evaluation.evaluate_tasks(
          model, params, names, eval_splits, lengths["inputs"],
          max_decode_len or lengths["targets"], max_examples=eval_max_examples)
      table = evaluation.format_table(scores)
      print(f"\nevaluation ({secs:.0f}s, greedy decoding, exact match of the answer):\n"
            f"{table}\n", flush=True)
      for s in scores:
        writer.scalars(final_step, {f"eval/{s.task}/{s.split}/exact_match": s.accuracy})
      writer.text(final_step, "eval/table", "```\n" + table + "\n```")
      summary["eval"] = [dataclasses.asdict(s) for s in scores]
      for split in eval_splits:
        ss = [s for s in scores if s.split == split]
        if ss:
          summary[f"mean_accuracy_{split}"] = float(np.mean([s.accuracy for s in ss]))
          summary[f"mean_baseline_{split}"] = float(np.mean([s.baseline for s in ss]))
    writer.flush()
    ckpt.close()
    if jax.process_index() == 0:
      with open(os.path.join(model_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    # No steps when resuming a run that already reached num_steps.
    losses = (f"loss {summary['first_loss']:.3f} -> {summary['last_loss']:.3f}" if history
              else "no steps run")
    print(f"done in {time.time() - t_start:.0f}s: {losses}; summary in "
          f"{os.path.join(model_dir, 'summary.json')}", flush=True)
    return summary


def _evaluate_during_training(model, params, vocab, kind, mixture, eval_tasks, max_examples,
                              lengths, max_decode_len, writer, step, model_dir):
  """train.eval_every_steps: the evaluation harness on eval_tasks (default: the mixture's
  tasks, their evaluation splits); console table, eval/... scalars at this step, and one
  line per evaluation in <model_dir>/eval_during_training.jsonl."""
  if jax.process_count() > 1:
    return  # decoding runs on one host's inputs; see the note at the end of train()
  names = (eval_run.resolve_tasks(eval_tasks) if eval_tasks else evaluation.tasks_of(mixture))
  t0 = time.time()
  results = harness.evaluate_suite(
      model, params, vocab, "t5" if kind == "enc_dec" else "decoder", kind == "prefix_lm", names,
      input_length=lengths["inputs"],
      decode=decoding.DecodeConfig(max_decode_len=max_decode_len), max_examples=max_examples,
      writer=writer, step=step, progress_every_secs=30.0, num_samples=0,
      log=lambda line: print(line, flush=True))
  secs = time.time() - t0
  print(f"step {step}: evaluation ({secs:.0f}s)\n{harness.format_results(results)}",
        flush=True)
  writer.flush()
  if jax.process_index() == 0:
    with open(os.path.join(model_dir, "eval_during_training.jsonl"), "a") as f:
      f.write(json.dumps({"step": step, "seconds": round(secs, 1),
                          "results": [r.to_json() for r in results]}) + "\n")


def _validation_loss(eval_step, mixture, lengths, batch_size, seed, pack, num_batches,
                     state, mesh, kind="enc_dec"):
  task_or_mix = registry.get_task_or_mixture(mixture)
  tasks = getattr(task_or_mix, "tasks", [task_or_mix])
  if not any("validation" in t.splits for t in tasks):
    return None
  total, weight = 0.0, 0.0
  for name in [t.name for t in tasks if "validation" in t.splits]:
    ds = pipeline.get_dataset(name, lengths, "validation", batch_size, seed, pack,
                              shuffle=False, num_epochs=1, kind=kind)
    for batch in ds.take(num_batches).as_numpy_iterator():
      if batch["decoder_target_tokens"].shape[0] * jax.process_count() != batch_size:
        continue  # a short last batch would not shard evenly
      s, w = eval_step(state["params"], partitioning.global_batch(batch, mesh))
      total, weight = total + float(s), weight + float(w)
  return total / weight if weight else None


@gin.configurable
def distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                process_id: int | None = None, auto: bool = False) -> None:
  """Joins a multi-process run through jax.distributed, before JAX touches a device.

  auto=True lets JAX detect the cluster (Cloud TPU VMs, SLURM, ...). Otherwise a
  coordinator address (gin, or $FLANJAX_COORDINATOR with $FLANJAX_NUM_PROCESSES
  and $FLANJAX_PROCESS_ID) starts one; with neither this is a single process.
  """
  coordinator_address = coordinator_address or os.environ.get("FLANJAX_COORDINATOR")
  if num_processes is None and os.environ.get("FLANJAX_NUM_PROCESSES"):
    num_processes = int(os.environ["FLANJAX_NUM_PROCESSES"])
  if process_id is None and os.environ.get("FLANJAX_PROCESS_ID"):
    process_id = int(os.environ["FLANJAX_PROCESS_ID"])
  if auto:
    jax.distributed.initialize()
  elif coordinator_address:
    if num_processes is None or process_id is None:
      raise UserError("distributed.coordinator_address needs num_processes and process_id "
                      "(or $FLANJAX_NUM_PROCESSES and $FLANJAX_PROCESS_ID)")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  else:
    return
  print(f"distributed: process {jax.process_index()} of {jax.process_count()}, "
        f"{jax.local_device_count()} local of {jax.device_count()} devices", flush=True)


def _bound(selector: str):
  """The value gin binds to `selector`, macros followed; LookupError if unbound."""
  try:
    value = gin.query_parameter(selector)
    for _ in range(8):  # %MIXTURE -> its value (macros may name macros)
      if isinstance(value, gin.config.ConfigurableReference) and str(value).startswith("%"):
        value = gin.query_parameter(str(value))
  except ValueError:
    raise LookupError(selector) from None
  return value


def check_mixture_early() -> None:
  """An evaluation-only task as the training mixture fails before any vocabulary or data work.

  train() checks again; this only moves the message ahead of a vocabulary
  trained on the mixture's text (which would fail on it less clearly).
  """
  try:
    mixture = _bound("train.mixture")
  except LookupError:
    return  # the default, the built-in mixture
  if not isinstance(mixture, str):
    return
  registry.register_all(seqio.ByteVocabulary())  # names and definitions; reads nothing
  if mixture in seqio.TaskRegistry.names() or mixture in seqio.MixtureRegistry.names():
    mixtures.check_trainable(mixture, "train")


def main(argv=None):
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
  # seqio warns on every dataset built from an in-memory source that restarts
  # may reshuffle differently; our resume skips a deterministic stream instead.
  logging.getLogger("absl").setLevel(logging.ERROR)
  flan_config.run_main(lambda args: (distributed(), check_mixture_early(), train())[2], argv)


if __name__ == "__main__":
  main()

"""python -m flanjax.train --gin_file=flan.gin [--gin.train.num_steps=100 ...]

Builds the vocabulary and tasks, trains a T5 (train.model_config = @T5Config())
or a decoder-only model (@DecoderConfig(), prefix-LM rows: the inputs attend
both ways and carry no loss) on packed batches of the mixture, checkpoints
with orbax, logs to the console and TensorBoard, and ends with an evaluation
against the majority-answer baseline.

train.init_from = a local Hugging Face model directory starts from its weights,
config and tokenizer (runs/finetune_flan_t5.gin, runs/finetune_llama.gin).

This file only composes: gin binds `train`'s plain arguments, `train` builds
the collaborators (model kind, partitioner, optimizer, checkpointer, data,
evaluator, run folder) and hands them to `training.loop.Trainer`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Callable, Mapping, Sequence

# Quiet TensorFlow (used by seqio for the input pipeline only) before it loads.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import gin  # noqa: E402
import jax  # noqa: E402
import seqio  # noqa: E402

from flanjax import config as flan_config  # noqa: E402
# run holds gin's `evaluate`: imported before gin locks its config.
from flanjax.evaluation import evaluator as evaluator_lib, run as eval_run  # noqa: E402,F401
# vocab is imported for its gin configurables (builtin_vocabulary, sentencepiece_vocabulary).
from flanjax.data import mixtures, pipeline, registry, tasks as task_lib, vocab as vocab_lib  # noqa: E402,F401
from flanjax.curate import decontaminate  # noqa: E402
from flanjax.errors import UserError  # noqa: E402
# decoder and t5 are imported for their gin configurables DecoderConfig and T5Config.
from flanjax.models import decoder, hf, kinds, stack, t5  # noqa: E402,F401
from flanjax.run_folder import (  # noqa: E402
    TRAINING_FIELDS, RunFolder, model_record, run_record)
from flanjax.training import adapters, checkpoints, early_stopping as stopping, loop, optimizers  # noqa: E402,E501
from flanjax.training.partitioning import check_divisible  # noqa: E402
from flanjax.training.data import TrainData  # noqa: E402
# distributed is gin's `distributed` (multi-process start-up).
from flanjax.training.distributed import distributed  # noqa: E402


def _hide_accelerators_from_tf():
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    tf.config.set_visible_devices([], "GPU")
  except Exception:  # pylint: disable=broad-except
    pass


def _vocab_size_for(model_config, vocabulary):
  needed = vocabulary.vocab_size
  if model_config.vocab_size == 0:
    # Rounded up to a multiple of 128 for efficient matmuls.
    return dataclasses.replace(model_config, vocab_size=int(math.ceil(needed / 128) * 128))
  if model_config.vocab_size < needed:
    raise UserError(f"{type(model_config).__name__}.vocab_size={model_config.vocab_size} is "
                    f"smaller than the vocabulary ({needed} pieces); raise it or set it to 0 "
                    "(automatic)")
  return model_config


def _from_hf_dir(path: str, model_config, vocabulary, with_params: bool):
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
      params = None if params is None else stack.layout(params, cfg)  # scan_layers
    else:
      print(f"note: {path} holds a {type(cfg).__name__}; train.model_config "
            f"({type(model_config).__name__}) is not used", flush=True)
  return cfg, params, vocab


def _model_and_vocab(model_config, vocabulary, init_from, resuming: bool):
  params = None
  if init_from:
    model_config, params, vocabulary = _from_hf_dir(init_from, model_config, vocabulary,
                                                    with_params=not resuming)
  if model_config is None:
    raise UserError("no model: bind train.model_config (@T5Config() or @DecoderConfig()) "
                    "or train.init_from (a Hugging Face model directory)")
  if vocabulary is None:
    raise UserError("no vocabulary: bind train.vocabulary or train.init_from")
  return model_config, params, vocabulary


def _register_data(vocab, register_fns, mixture, lengths: dict, decontamination: str) -> dict:
  # Few-shot prompts drop exemplars until they fit the input length.
  registry.call_register_fns(register_fns, vocab, input_length=lengths["inputs"])
  registry.get_task_or_mixture(mixture)  # unknown name -> clear error
  mixtures.check_trainable(mixture, "train")  # BBH, GSM8K test: never trained on
  # Training examples sharing a 13-gram with evaluation data: counted, or dropped.
  contaminated = decontaminate.check_mixture(mixture, decontamination)
  print(f"vocabulary: {vocab.vocab_size} pieces", flush=True)
  rep = pipeline.length_report(mixture, "train", lengths)
  print(f"lengths: {rep.summary(lengths)}", flush=True)
  rep.check_some_fit(lengths, mixture)
  return contaminated


@gin.configurable(denylist=["stop_signal", "on_step"])
def train(
    *, model_dir: str | None = None, mixture: str = registry.BUILTIN_MIXTURE, vocabulary=None,
    register_fns: Sequence[Callable] = (registry.register_all,), model_config=None,
    init_from: str | None = None, task_feature_lengths: Mapping[str, int] = None,
    batch_size: int = 32, num_steps: int = 1000, microbatches: int = 1, seed: int = 0,
    pack: bool = True, z_loss: float = 1e-4, label_smoothing: float = 0.0,
    loss_normalizing_factor: float | None = None, mesh_shape: Sequence[int] = (-1, 1, 1),
    log_every_secs: float = 5.0, summary_every_steps: int = 10,
    validation_every_steps: int = 0, validation_batches: int = 4, eval_every_steps: int = 0,
    max_nonfinite_in_row: int = 5, peak_flops: float | None = None, eval_at_end: bool = True,
    eval_tasks: Sequence[str] | None = None, eval_splits: Sequence[str] | None = None,
    eval_max_examples: int | None = None, eval_batch_size: int = 64,
    eval_rank_classification: bool = False, max_decode_len: int | None = None,
    early_stopping=None, peft=None, init_adapter: str | None = None, stop_signal=None,
    on_step: Callable | None = None, decontamination: str = "warn", output_chunk: int = 128,
    decoder_objective: str = "prefix_lm",
) -> dict:
  """Trains and evaluates; returns a summary dict (also written to model_dir).

  init_from: a local Hugging Face model directory (T5 or Llama). A fresh run
  takes its config, weights and tokenizer (which replaces `vocabulary`); a
  resumed run takes config and tokenizer from it and the weights from its
  checkpoint. Only dtype, remat and dropout_rate of `model_config` apply then.
  eval_tasks: task specs (names, mixtures, patterns such as 'bbh_*', 'task:split'),
  default the mixture's tasks; eval_splits: default each task's evaluation splits.
  early_stopping: @EarlyStopping() (training/early_stopping.py) on the evaluations.
  decontamination: 'warn' | 'drop' | 'off' (flanjax/curate/decontaminate.check_mixture).
  output_chunk: the output layer runs inside the loss, at loss positions only, this many
  positions of each row at a time (losses.output_cross_entropy); 0: logits everywhere.
  decoder_objective: a decoder's rows, 'prefix_lm' ([0] + inputs + EOS + targets, inputs read
  both ways) or 'causal' (BOS + inputs + targets, as transformers runs it; kinds.for_training).
  peft: @LoraConfig() or @PromptTuningConfig() trains over init_from's frozen model (read on
  resuming too); init_adapter: a PEFT adapter folder to start from.
  """
  _hide_accelerators_from_tf()
  if num_steps < 0:
    raise UserError(f"train.num_steps={num_steps}: give the step to train to (0 evaluates "
                    "the checkpoint without training)")
  lengths = pipeline.check_lengths(task_feature_lengths or {"inputs": 256, "targets": 64})
  stopping.check_watchable(early_stopping, eval_every_steps, validation_every_steps, validation_batches)
  run = RunFolder(model_dir or os.path.join("runs", mixture))  # a mixture's own by default
  run.check_writable()
  with run.lock():  # one run per folder; released at the end, also on failure
    ckpt = checkpoints.Checkpointer(run.path, cleanup_tmp=True)
    cfg, init_params, vocab = _model_and_vocab(model_config, vocabulary, init_from, resuming=(
        ckpt.latest_step() is not None and peft is None and init_adapter is None))
    contaminated = _register_data(vocab, register_fns, mixture, lengths, decontamination)
    cfg, kind = _vocab_size_for(cfg, vocab), kinds.for_training(cfg, decoder_objective)
    run_info = run_record(mixture, task_lib.vocab_fingerprint(vocab), cfg, kind.name,
                          batch_size=batch_size, seed=seed, lengths=lengths, pack=pack)
    adapter = adapters.setup(peft, cfg, init_params, init_from, init_adapter, vocab, seed)
    if adapter is not None:
      run_info["adapter"], kind = adapter.describe(), adapter.kind(kind)
    run.check_run_info(run_info)
    run.save_vocabulary(vocab)
    run.record_prompt_format(mixture)  # user data's prompt format, for infer
    tx, lr_fn = optimizers.optimizer()
    evaluator = evaluator_lib.Evaluator(
        tasks=list(eval_tasks or ()), splits=eval_splits, input_length=lengths["inputs"],
        max_decode_len=max_decode_len or lengths["targets"], max_examples=eval_max_examples,
        batch_size=eval_batch_size, rank_classification=eval_rank_classification,
        every_steps=eval_every_steps, at_end=eval_at_end,
        validation_every_steps=validation_every_steps, validation_batches=validation_batches)
    trainer = loop.Trainer(
        model=kind.build(cfg), kind=kind, partitioner=loop.Partitioner.create(mesh_shape),
        optimizer=loop.Optimizer(tx, lr_fn), checkpointer=ckpt,
        data=TrainData(mixture, lengths, batch_size, seed, pack, kind), evaluator=evaluator,
        run=run, vocab=vocab, mixture=mixture, seed=seed,
        losses=loop.LossConfig(z_loss, label_smoothing, loss_normalizing_factor, microbatches,
                              output_chunk),
        log=loop.LogConfig(log_every_secs, summary_every_steps, peak_flops, max_nonfinite_in_row),
        run_info=run_info, on_step=on_step, dropout=cfg.dropout_rate > 0 or cfg.neftune_alpha > 0,
        early_stopping=early_stopping, adapters=adapter)
    check_divisible(trainer.partitioner.mesh, batch_size, microbatches,
                    trainer.abstract_params(), trainer.partitioner.rules)
    state = trainer.init_state(None if adapter else init_params)
    _announce(kind, cfg, state, trainer.partitioner.mesh,
              init_from if ckpt.latest_step() is None else None, init_params if adapter else None)
    del init_params  # the state holds them now
    return decontaminate.summarised(run, contaminated, trainer.fit(state, num_steps, stop_signal))


def _announce(kind, cfg, state, mesh, init_from: str | None, frozen_base) -> None:
  """frozen_base: an adapter run's base parameters (its state holds the adapters alone)."""
  n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
  size = f"{n_params / 1e6:.2f}M parameters"
  if frozen_base is not None:
    base = sum(x.size for x in jax.tree.leaves(frozen_base))
    size = f"{base / 1e6:.2f}M parameters, frozen; training {n_params:,} adapter parameters"
  print(f"model: {kind.describe(cfg)}, {size}; mesh "
        f"{dict(mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} device(s)",
        flush=True)
  if init_from:
    print(f"initialised from {os.path.abspath(init_from)}", flush=True)


def check_mixture_early() -> None:
  """An evaluation-only task as the training mixture fails before any vocabulary or data work.

  train() checks again; this only moves the message ahead of a vocabulary
  trained on the mixture's text (which would fail on it less clearly).
  """
  mixture = flan_config.bound_value("train.mixture")
  if not isinstance(mixture, str):
    return  # unbound (the built-in mixture) or not a name
  registry.register_all(seqio.ByteVocabulary())  # names and definitions; reads nothing
  if mixture in seqio.TaskRegistry.names() or mixture in seqio.MixtureRegistry.names():
    mixtures.check_trainable(mixture, "train")


def main(argv=None):
  import logging  # pylint: disable=g-import-not-at-top
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
  # seqio warns on every dataset built from an in-memory source that restarts
  # may reshuffle differently; our resume skips a deterministic stream instead.
  logging.getLogger("absl").setLevel(logging.ERROR)
  flan_config.run_main(lambda args: (distributed(), check_mixture_early(), train())[2], argv)


def command():
  """The console script `flanjax-train`."""
  flan_config.as_command(main)


if __name__ == "__main__":
  flan_config.as_command(main)

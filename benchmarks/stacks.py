"""The two stacks, built from one config and one set of initial weights.

flanjax: the model, `trainer.create_sharded_state` and the trainer's own
jit-compiled step (`make_train_step` + `jit_train_step`, state donated), with
optax.adamw. PyTorch: the same weights exported by `flanjax.models.hf.save` and
loaded by transformers' `T5ForConditionalGeneration` / `LlamaForCausalLM`,
with torch.optim.AdamW (fused where this torch has it) and the same
hyperparameters; a step is forward with labels, backward, optimizer step,
zero_grad.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile

import numpy as np

from flanjax.data import packing

IGNORE = -100  # transformers' ignored label


@dataclasses.dataclass(frozen=True)
class AdamW:
  lr: float = 1e-4
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  weight_decay: float = 0.01

  def optax(self):
    """The same AdamW as an optax transformation (flanjax's side)."""
    import optax  # pylint: disable=g-import-not-at-top
    return optax.adamw(self.lr, b1=self.b1, b2=self.b2, eps=self.eps,
                       weight_decay=self.weight_decay)


def family(cfg) -> str:
  from flanjax.models import t5  # pylint: disable=g-import-not-at-top
  return "t5" if isinstance(cfg, t5.T5Config) else "decoder"


def auto_attention(cfg, batch: int, length: int, dropout: bool = False) -> str:
  """What attention_impl='auto' runs in cfg's self-attention on rows of `length` tokens on
  this machine (attention.auto_impl on the step's shapes; T5's carries its position bias).
  dropout: whether the step applies dropout (stacks.Flanjax's does not)."""
  import types  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from flanjax.models import attention  # pylint: disable=g-import-not-at-top
  t5_kind = family(cfg) == "t5"
  dim = cfg.d_kv if t5_kind else cfg.head_dim
  kv_heads = cfg.num_heads if t5_kind else cfg.num_kv_heads
  q = jax.ShapeDtypeStruct((batch, length, cfg.num_heads, dim), cfg.compute_dtype)
  k = jax.ShapeDtypeStruct((batch, length, kv_heads, dim), cfg.compute_dtype)
  spec = types.SimpleNamespace(rel_table=True if t5_kind else None, causal=not t5_kind,
                               aligned=True)
  drop = (lambda p: p) if dropout and cfg.dropout_rate > 0 else None  # noqa: E731
  return attention.auto_impl(q, k, spec, drop)


def packing_kind(cfg) -> str:
  return "enc_dec" if family(cfg) == "t5" else "prefix_lm"


# ---------------------------------------------------------------- flanjax

class Flanjax:
  """flanjax's train step on one model; params start from a seeded random init."""

  def __init__(self, cfg, opt: AdamW | None, seed: int = 0, output_chunk: int | None = None,
               tx=None, lr_fn=None, **step_settings):
    """opt: the benchmark's AdamW, or None with `tx` and `lr_fn` (an optax transformation
    and its learning-rate schedule, e.g. training/optimizers.optimizer()'s). step_settings:
    more of trainer.make_train_step's (z_loss, microbatches, dropout, ...)."""
    import flax.linen as nn  # pylint: disable=g-import-not-at-top
    import jax  # pylint: disable=g-import-not-at-top
    from flanjax.models import decoder, t5  # pylint: disable=g-import-not-at-top
    from flanjax.training import partitioning, trainer  # pylint: disable=g-import-not-at-top
    self.cfg = cfg
    if family(cfg) == "t5":
      self.model, dummy = t5.T5(cfg), t5.dummy_batch(1, 8, 8)
    else:
      self.model, dummy = decoder.Decoder(cfg), decoder.dummy_batch(1, 8, 8)
    if opt is not None:
      tx = opt.optax()
      lr_fn = lambda s: opt.lr  # noqa: E731
    self.mesh = partitioning.make_mesh((-1, 1, 1))
    self.rules = partitioning.logical_rules()
    self.state, shardings = trainer.create_sharded_state(
        self.model, tx, self.mesh, self.rules, seed, dummy)
    self.num_params = int(sum(x.size for x in jax.tree.leaves(self.state["params"])))
    more = {} if output_chunk is None else {"output_chunk": output_chunk}
    step = trainer.make_train_step(self.model, tx, lr_fn, **step_settings, **more)
    self._step = trainer.jit_train_step(step, shardings, self.mesh)
    self._ctx = lambda: _Both(jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules))
    self._jax = jax
    self._eval = jax.jit(trainer.make_eval_step(self.model))
    dev = jax.devices()[0]
    self.device = f"{dev.platform} ({getattr(dev, 'device_kind', dev.platform)})"
    self.dtype = str(cfg.dtype)

  def params(self):
    """The current params as numpy (a copy: the state is donated at each step)."""
    return self._jax.tree.map(np.asarray, self._jax.device_get(self.state["params"]))

  def train(self, batches) -> float:
    """Runs a step per batch, dispatched asynchronously as the trainer does; waits for the last."""
    with self._ctx():
      metrics = None
      for b in batches:
        self.state, metrics = self._step(self.state, b)
      return None if metrics is None else float(self._jax.block_until_ready(metrics)["loss"])

  def loss(self, batch) -> float:
    """Mean loss per target token of the batch the step trains on (no update): the
    trainer's own loss (its eval step, no z-loss), for the parity check."""
    with self._ctx():
      loss_sum, weight = self._eval(self.state["params"], batch)
    return float(loss_sum) / max(float(weight), 1.0)


class _Both:
  def __init__(self, *ctxs):
    self.ctxs = ctxs

  def __enter__(self):
    for c in self.ctxs:
      c.__enter__()

  def __exit__(self, *exc):
    for c in reversed(self.ctxs):
      c.__exit__(*exc)


def pack_rows(examples, lengths, kind, window=packing.DEFAULT_WINDOW):
  """Packed rows of our packer with, for each, the indices of its examples and
  whether the packer was in steady state (its window full) when it was emitted."""
  packer = packing.Packer(lengths, kind, pack=True, window=window, record=True)
  rows, steady = [], []
  for i, ex in enumerate(examples):
    for row in packer.add(ex):
      rows.append(row)
      steady.append(i >= window)
  for row in packer.flush():
    rows.append(row)
    steady.append(False)
  return rows, packer.record, steady


def stack_rows(rows, batch_size: int) -> dict:
  """B rows -> one batch; fewer rows are topped up with empty (all-padding) rows.

  A prefix-LM row is made causal (decoder_causal_attention dropped, as the causal
  'decoder' kind's rows have none): the decoder is timed on the objective PyTorch's
  LlamaForCausalLM trains, causal attention with the loss on the targets. (Not a
  zeros mask: without a prefix the attention skips the keys a causal mask hides.)"""
  out = {}
  for k in rows[0]:
    if k == "decoder_causal_attention":
      continue
    a = np.stack([r[k] for r in rows])
    if len(rows) < batch_size:
      a = np.concatenate([a, np.zeros((batch_size - len(rows),) + a.shape[1:], a.dtype)])
    out[k] = a
  return out


def flanjax_counts(batch: dict, kind: str) -> tuple[int, int]:
  """(real tokens, padded positions) of a packed batch, counted from its segment ids."""
  feats = ("encoder_segment_ids", "decoder_segment_ids") if kind == "enc_dec" else (
      "decoder_segment_ids",)
  return (sum(int(np.count_nonzero(batch[f])) for f in feats),
          sum(batch[f].size for f in feats))


# ---------------------------------------------------------------- PyTorch

class Torch:
  """transformers' model on the same weights, with torch.optim.AdamW."""

  def __init__(self, cfg, params, opt: AdamW):
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
    from flanjax.models import hf  # pylint: disable=g-import-not-at-top
    self.torch = torch
    self.kind = packing_kind(cfg)
    cls = (transformers.T5ForConditionalGeneration if self.kind == "enc_dec"
           else transformers.LlamaForCausalLM)
    with tempfile.TemporaryDirectory() as tmp:
      hf.save(cfg, params, tmp)
      transformers.logging.set_verbosity_error()
      transformers.logging.disable_progress_bar()
      self.model = cls.from_pretrained(tmp, dtype=torch.float32)
    # The device and dtype flanjax runs in: CUDA when JAX and torch both see a GPU,
    # and bf16 autocast when the flanjax config computes in bf16.
    import jax  # pylint: disable=g-import-not-at-top
    gpu = jax.devices()[0].platform == "gpu" and torch.cuda.is_available()
    self.dev = torch.device("cuda" if gpu else "cpu")
    self.model.to(self.dev)
    self.autocast = None if str(cfg.dtype) == "float32" else getattr(torch, str(cfg.dtype))
    self.device = str(self.dev) + (f" ({torch.cuda.get_device_name()})" if gpu else "")
    self.dtype = "float32" if self.autocast is None else f"{cfg.dtype} autocast"
    self.model.train()
    self.attn_implementation = getattr(self.model.config, "_attn_implementation", None)
    self.optimizer_impl = "fused"
    try:
      self.opt = torch.optim.AdamW(self.model.parameters(), lr=opt.lr, betas=(opt.b1, opt.b2),
                                   eps=opt.eps, weight_decay=opt.weight_decay, fused=True)
    except (RuntimeError, TypeError):
      self.optimizer_impl = "foreach"
      self.opt = torch.optim.AdamW(self.model.parameters(), lr=opt.lr, betas=(opt.b1, opt.b2),
                                   eps=opt.eps, weight_decay=opt.weight_decay, foreach=True)
    self.compiled = None

  def compile(self):
    if self.compiled is None:
      self.compiled = self.torch.compile(self.model)
    return self.compiled

  def _cast(self):
    if self.autocast is None:
      return contextlib.nullcontext()
    return self.torch.autocast(self.dev.type, dtype=self.autocast)

  def to_device(self, batch) -> dict:
    return {k: v.to(self.dev, non_blocking=True) for k, v in batch.items()}

  def train(self, batches, compiled: bool = False) -> float:
    """A step per batch (moved to the device first); waits for the last step's loss."""
    fwd = self.compiled if compiled else self.model
    loss = None
    for b in batches:
      with self._cast():
        loss = fwd(**self.to_device(b)).loss
      loss.backward()
      self.opt.step()
      self.opt.zero_grad(set_to_none=True)
    return None if loss is None else float(loss.detach())

  def loss(self, batch) -> float:
    self.model.eval()
    with self.torch.no_grad(), self._cast():
      out = float(self.model(**self.to_device(batch)).loss)
    self.model.train()
    return out

  def packed_batch(self, fj_batch) -> dict:
    """flanjax's packed decoder rows as a padding-free batch: position ids restarting at
    each example and a block-diagonal causal mask [b, 1, l, l] (each token sees only
    its own example's earlier tokens); labels already shifted. The mask is explicit:
    transformers 5.24 builds none from position ids alone outside flash attention (the
    examples then attend to each other: 0.015 off flanjax's loss on the benchmark's rows).
    A boolean mask for SDPA (True = attend), an additive one for the eager attention."""
    torch = self.torch
    w = fj_batch["decoder_loss_weights"] > 0
    labels = np.where(w, fj_batch["decoder_target_tokens"], IGNORE).astype(np.int64)
    seg = fj_batch["decoder_segment_ids"]
    length = seg.shape[1]
    allowed = (seg[:, :, None] == seg[:, None, :]) & np.tril(np.ones((length, length), bool))
    mask = torch.from_numpy(allowed[:, None])
    if self.attn_implementation != "sdpa":
      mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    return {"input_ids": torch.from_numpy(fj_batch["decoder_input_tokens"].astype(np.int64)),
            "position_ids": torch.from_numpy(fj_batch["decoder_positions"].astype(np.int64)),
            "attention_mask": mask,
            "labels": torch.from_numpy(labels), "shift_labels": torch.from_numpy(labels)}

  def batch(self, examples) -> dict:
    """Examples padded to the longest in the batch, as DataCollatorForSeq2Seq pads."""
    torch = self.torch
    n = len(examples)
    if self.kind == "enc_dec":
      li = max(len(e["inputs"]) for e in examples)
      lt = max(len(e["targets"]) for e in examples)
      ids = np.zeros((n, li), np.int64)
      labels = np.full((n, lt), IGNORE, np.int64)
      for i, e in enumerate(examples):
        ids[i, :len(e["inputs"])] = e["inputs"]
        labels[i, :len(e["targets"])] = e["targets"]
      return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(
          (np.arange(li)[None] < np.array([len(e["inputs"]) for e in examples])[:, None])
          .astype(np.int64)), "labels": torch.from_numpy(labels)}
    # Decoder-only: the tokens of flanjax's row, 0 then inputs then targets (less the
    # last), each position predicting the next; loss on the targets (labels already
    # shifted, as flanjax's decoder_target_tokens are).
    seqs = [np.concatenate([[0], e["inputs"], e["targets"][:-1]]) for e in examples]
    length = max(len(s) for s in seqs)
    ids = np.zeros((n, length), np.int64)
    labels = np.full((n, length), IGNORE, np.int64)
    mask = np.zeros((n, length), np.int64)
    for i, (e, s) in enumerate(zip(examples, seqs)):
      ids[i, :len(s)] = s
      mask[i, :len(s)] = 1
      labels[i, len(e["inputs"]):len(s)] = e["targets"]
    labels = torch.from_numpy(labels)
    return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask),
            "labels": labels, "shift_labels": labels}

  def counts(self, batch) -> tuple[int, int]:
    """(real tokens, padded positions) of a padded batch."""
    real = int(batch["attention_mask"].sum())
    total = batch["input_ids"].numel()
    if self.kind == "enc_dec":
      real += int((batch["labels"] != IGNORE).sum())
      total += batch["labels"].numel()
    return real, total


def grouped_order(examples, batch: int, seed: int, kind: str) -> list[int]:
  """transformers' group_by_length order (LengthGroupedSampler): a random
  permutation cut into megabatches of 50 batches, each sorted longest first."""
  rng = np.random.default_rng(seed)
  perm = rng.permutation(len(examples))
  size = lambda i: (len(examples[i]["inputs"]) if kind == "enc_dec"  # noqa: E731
                    else len(examples[i]["inputs"]) + len(examples[i]["targets"]))
  out = []
  for s in range(0, len(perm), 50 * batch):
    out.extend(sorted(perm[s:s + 50 * batch], key=size, reverse=True))
  return [int(i) for i in out]


def torch_threads() -> int:
  import torch  # pylint: disable=g-import-not-at-top
  from benchmarks.common import usable_cores  # pylint: disable=g-import-not-at-top
  n = usable_cores()
  torch.set_num_threads(n)
  return n


def fresh_inductor_cache():
  """A new, empty inductor cache, so torch.compile's time is a cold compile like XLA's."""
  os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-")

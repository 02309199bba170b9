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


def family(cfg) -> str:
  from flanjax.models import t5  # pylint: disable=g-import-not-at-top
  return "t5" if isinstance(cfg, t5.T5Config) else "decoder"


def packing_kind(cfg) -> str:
  return "enc_dec" if family(cfg) == "t5" else "prefix_lm"


# ---------------------------------------------------------------- flanjax

class Flanjax:
  """flanjax's train step on one model; params start from a seeded random init."""

  def __init__(self, cfg, opt: AdamW, seed: int = 0):
    import flax.linen as nn  # pylint: disable=g-import-not-at-top
    import jax  # pylint: disable=g-import-not-at-top
    import optax  # pylint: disable=g-import-not-at-top
    from flanjax.models import decoder, t5  # pylint: disable=g-import-not-at-top
    from flanjax.training import partitioning, trainer  # pylint: disable=g-import-not-at-top
    self.cfg = cfg
    if family(cfg) == "t5":
      self.model, dummy = t5.T5(cfg), t5.dummy_batch(1, 8, 8)
    else:
      self.model, dummy = decoder.Decoder(cfg), decoder.dummy_batch(1, 8, 8)
    tx = optax.adamw(opt.lr, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay)
    self.mesh = partitioning.make_mesh((-1, 1, 1))
    self.rules = partitioning.logical_rules()
    self.state, shardings = trainer.create_sharded_state(
        self.model, tx, self.mesh, self.rules, seed, dummy)
    self.num_params = int(sum(x.size for x in jax.tree.leaves(self.state["params"])))
    step = trainer.make_train_step(self.model, tx, lambda s: opt.lr)
    self._step = trainer.jit_train_step(step, shardings, self.mesh)
    self._ctx = lambda: _Both(jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules))
    self._jax = jax

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

  def loss(self, examples) -> float:
    """Mean target-token loss of fixed-length examples (no update), computed as
    transformers computes it, for the parity check: T5 on (inputs, targets);
    the decoder causally over inputs + targets, loss on the targets."""
    from flanjax.training.losses import cross_entropy  # pylint: disable=g-import-not-at-top
    variables = {"params": self.state["params"]}
    inp = np.stack([e["inputs"] for e in examples])
    tgt = np.stack([e["targets"] for e in examples])
    if family(self.cfg) == "t5":
      dec_in = np.concatenate([np.zeros_like(tgt[:, :1]), tgt[:, :-1]], axis=1)
      logits = self.model.apply(variables, inp, dec_in, decoder_target_tokens=tgt)
      weights = np.ones(tgt.shape, np.float32)
    else:
      seq = np.concatenate([inp, tgt], axis=1)
      logits = self.model.apply(variables, seq)[:, :-1]
      tgt = seq[:, 1:]
      weights = (np.arange(tgt.shape[1]) >= inp.shape[1] - 1)[None].repeat(len(seq), 0)
    loss, _ = cross_entropy(logits, tgt, weights.astype(np.float32))
    return float(loss)


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
  """B rows -> one batch; fewer rows are topped up with empty (all-padding) rows."""
  out = {}
  for k in rows[0]:
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

  def train(self, batches, compiled: bool = False) -> float:
    fwd = self.compiled if compiled else self.model
    loss = None
    for b in batches:
      loss = fwd(**b).loss
      loss.backward()
      self.opt.step()
      self.opt.zero_grad(set_to_none=True)
    return None if loss is None else float(loss.detach())

  def loss(self, batch) -> float:
    self.model.eval()
    with self.torch.no_grad():
      out = float(self.model(**batch).loss)
    self.model.train()
    return out

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
    # Decoder-only: inputs then targets in one sequence; loss on the targets.
    seqs = [np.concatenate([e["inputs"], e["targets"]]) for e in examples]
    length = max(len(s) for s in seqs)
    ids = np.zeros((n, length), np.int64)
    labels = np.full((n, length), IGNORE, np.int64)
    mask = np.zeros((n, length), np.int64)
    for i, (e, s) in enumerate(zip(examples, seqs)):
      ids[i, :len(s)] = s
      mask[i, :len(s)] = 1
      labels[i, len(e["inputs"]):len(s)] = e["targets"]
    return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask),
            "labels": torch.from_numpy(labels)}

  def counts(self, batch) -> tuple[int, int]:
    """(real tokens, padded positions) of a batch."""
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

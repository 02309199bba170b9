"""LoRA vs full fine-tuning, flanjax vs Hugging Face PEFT + PyTorch, side by side in one run.

  python benchmarks/lora_bench.py [--size tiny|small|base] [--targets default|all] \\
      [--windows 5] [--steps 2] [--mixture flan_cot|synthetic] \\
      [--out benchmarks/results/lora_bench.json]

For T5 (gated-gelu, FLAN-T5's layout; --size base is t5-base's shape) and the
Llama-style decoder: flanjax full fine-tuning (AdamW over every parameter),
flanjax LoRA r=8 and r=16 (PEFT's default targets for the model kind, T5 q and
v, Llama q_proj and v_proj, unless --targets all; AdamW over the adapters, the
base frozen) and PEFT + PyTorch LoRA of the same config (torch.optim.AdamW
over the adapters), on the same random batches. The setups run interleaved:
each of >= 5 windows times `steps` steps of every setup in turn, so a load
change on the shared machine hits them alike; LoRA's step vs full is the
median over windows of the two setups' ratio in that window. Per setup: the
step time (median of the windows, min, max, the load before and after, other
processes' CPU share), XLA's FLOPs of the compiled step (cost_analysis: a
figure the load cannot change), peak memory (flanjax: XLA's compiled step,
arguments + outputs + temporaries, the frozen base included; PyTorch: the
process's peak RSS growth over its first steps, taken before flanjax ran),
optimizer-state bytes and trainable parameters.

Real lengths: flan_cot's examples (tokenized as benchmarks/train_bench.py
does; FLANJAX_DATA_DIR) through flanjax LoRA r=8 on its packed rows and
through PEFT r=8 in batches padded to each batch's longest, the same examples
on both, interleaved windows of real (non-padding) tokens/s.

Targets (issue 14): flanjax LoRA's step <= 0.7x flanjax full fine-tuning's,
its optimizer state < 2% of full's, its real-length tokens/s >= 1.0x PEFT's.
"""

from __future__ import annotations

import argparse
import faulthandler
import math
import os
import resource
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402

SIZES = {  # d_model, d_ff, layers, heads, head dim, batch, length (random batches)
    "tiny": (64, 128, 2, 4, 16, 4, 128),
    "small": (256, 1024, 4, 8, 32, 8, 128),
    "base": (768, 2048, 12, 12, 64, 8, 256),  # t5-base (FLAN-T5-base)
}
REAL = {"tiny": (4, 512, 128), "small": (4, 512, 128), "base": (4, 512, 128)}  # rows, in, tg
T5_ALL = ["q", "k", "v", "o", "wi_0", "wi_1", "wo"]
LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEFAULT = {"t5": ["q", "v"], "decoder": ["q_proj", "v_proj"]}  # PEFT's for T5 and Llama
RANKS = (8, 16)


def _hf_models(size: str, vocab: int):
  import transformers  # pylint: disable=g-import-not-at-top
  d, f, n, h, k, _, _ = SIZES[size]
  t5 = transformers.T5ForConditionalGeneration(transformers.T5Config(
      vocab_size=vocab, d_model=d, d_ff=f, num_layers=n, num_decoder_layers=n, num_heads=h,
      d_kv=k, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, dropout_rate=0.0))
  llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=vocab, hidden_size=d, intermediate_size=f, num_hidden_layers=n,
      num_attention_heads=h, num_key_value_heads=h, head_dim=k, max_position_embeddings=2048,
      tie_word_embeddings=False, pad_token_id=0))
  return {"t5": t5, "decoder": llama}


def _batches(family: str, size: str, vocab: int, n: int):
  """n random batches: every position real, the same on both stacks."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  *_, b, length = SIZES[size]
  rng = np.random.default_rng(0)
  out = []
  for _ in range(n):
    tok = rng.integers(2, vocab, size=(b, length)).astype(np.int32)
    if family == "t5":
      tgt = rng.integers(2, vocab, size=(b, length // 2)).astype(np.int32)
      dec_in = np.concatenate([np.zeros((b, 1), np.int32), tgt[:, :-1]], axis=1)
      out.append({"encoder_input_tokens": tok, "decoder_input_tokens": dec_in,
                  "decoder_target_tokens": tgt, "decoder_loss_weights": np.ones_like(tgt)})
    else:
      out.append({"decoder_input_tokens": tok[:, :-1], "decoder_target_tokens": tok[:, 1:],
                  "decoder_loss_weights": np.ones_like(tok[:, 1:])})
  return out


def _tree_bytes(tree) -> int:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  return int(sum(np.size(x) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)
                 if hasattr(x, "dtype")))


class FlanjaxSetup:
  """One flanjax setup through the trainer's own code: full fine-tuning, or LoRA of `rank`
  over `targets`. train(batches) runs the trainer's jitted step on each."""

  def __init__(self, tmodel, family, rank=None, targets=None):
    import jax  # pylint: disable=g-import-not-at-top
    import optax  # pylint: disable=g-import-not-at-top
    from flanjax.models import hf, kinds, lora  # pylint: disable=g-import-not-at-top
    from flanjax.training import adapters, loop  # pylint: disable=g-import-not-at-top
    self.jax = jax
    sd = {k: v.detach().numpy() for k, v in tmodel.state_dict().items()}
    cfg = hf.config_from_hf(tmodel.config.to_dict())
    params = hf.params_from_hf(sd, cfg)
    self.kind = kinds.for_config(cfg, trained_by_flanjax=family == "t5")
    tx = optax.adamw(1e-4, weight_decay=0.0)
    ad = None
    if rank:
      config = lora.LoraConfig(rank=rank, alpha=2.0 * rank, targets=targets)
      ad = adapters.LoraAdapters(config, cfg, lora.select(cfg, config.targets), params,
                                 {"path": "-", "fingerprint": "-"})
    self.part = loop.Partitioner.create((1, 1, 1))
    self.trainer = loop.Trainer(
        model=self.kind.build(cfg), kind=self.kind, partitioner=self.part,
        optimizer=loop.Optimizer(tx, lambda s: 1e-4), checkpointer=None, data=None,
        evaluator=None, run=None, vocab=None, mixture="", adapters=ad)
    self.state = self.trainer.init_state(None if ad else params)
    self.step, _ = self.trainer._compile()  # pylint: disable=protected-access
    self.loss = None

  def batch(self, b):
    from flanjax.training import partitioning  # pylint: disable=g-import-not-at-top
    return partitioning.global_batch(b, self.part.mesh)

  def train(self, batches):
    with self.part.scope():
      m = None
      for b in batches:
        self.state, m = self.step(self.state, b)
      self.loss = float(self.jax.block_until_ready(m["loss"]))

  def compiled(self, batch) -> dict:
    """XLA's FLOPs and memory of the compiled step (the same function the trainer jits)."""
    jax = self.jax
    from flanjax.training import adapters  # pylint: disable=g-import-not-at-top
    from flanjax.training import trainer as step_lib  # pylint: disable=g-import-not-at-top
    t, lc = self.trainer, self.trainer.losses
    make = lambda model: step_lib.make_train_step(  # noqa: E731
        model, t.optimizer.tx, t.optimizer.lr_fn, z_loss=lc.z_loss,
        model_inputs=t.kind.model_inputs, output_chunk=lc.output_chunk)
    with self.part.scope():
      if t.adapters is None:
        c = jax.jit(make(t.model)).lower(self.state, batch).compile()
      else:
        fn = lambda s, b, base: make(adapters.Bound(t.model, base, t.adapters))(s, b)  # noqa: E731
        c = jax.jit(fn).lower(self.state, batch, t.base).compile()
    cost = c.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    m = c.memory_analysis()
    return {"flops": float(cost.get("flops", 0.0)),
            "bytes_accessed": float(cost.get("bytes accessed", 0.0)),
            "peak_memory_bytes": int(m.argument_size_in_bytes + m.output_size_in_bytes
                                     + m.temp_size_in_bytes)}

  def sizes(self) -> dict:
    return {"optimizer_state_bytes": _tree_bytes(self.state["opt_state"]),
            "trainable_parameters": int(sum(x.size for x in
                                            self.jax.tree.leaves(self.state["params"])))}


class PeftSetup:
  """PEFT + PyTorch LoRA of the same config; train(batches) does forward, cross-entropy
  (labels -100 ignored), backward, AdamW step, zero_grad per batch."""

  def __init__(self, tmodel, family, rank, targets):
    import copy  # pylint: disable=g-import-not-at-top
    import peft  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
    self.torch, self.family = torch, family
    self.model = peft.get_peft_model(copy.deepcopy(tmodel), peft.LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=targets, lora_dropout=0.0))
    self.model.train()
    self.trainable = [p for p in self.model.parameters() if p.requires_grad]
    self.opt = torch.optim.AdamW(self.trainable, lr=1e-4, weight_decay=0.0)
    self.loss = None

  def batch(self, b):
    """A random batch of flanjax's features as the model's tensors."""
    t = lambda x: self.torch.tensor(x, dtype=self.torch.long)  # noqa: E731
    if self.family == "t5":
      return {"input_ids": t(b["encoder_input_tokens"]),
              "decoder_input_ids": t(b["decoder_input_tokens"]),
              "labels": t(b["decoder_target_tokens"])}
    return {"input_ids": t(b["decoder_input_tokens"]), "labels": t(b["decoder_target_tokens"])}

  def padded(self, examples):
    """Examples padded to the batch's longest (inputs and targets; the decoder's rows
    inputs + targets, loss on the targets)."""
    import numpy as np  # pylint: disable=g-import-not-at-top
    t = lambda x: self.torch.tensor(np.asarray(x), dtype=self.torch.long)  # noqa: E731
    if self.family == "t5":
      n_in = max(len(e["inputs"]) for e in examples)
      n_tg = max(len(e["targets"]) for e in examples)
      ids = [np.pad(e["inputs"], (0, n_in - len(e["inputs"]))) for e in examples]
      mask = [np.arange(n_in) < len(e["inputs"]) for e in examples]
      lab = [np.pad(e["targets"], (0, n_tg - len(e["targets"])), constant_values=-100)
             for e in examples]
      dec = [np.pad(e["targets"][:-1], (1, n_tg - len(e["targets"]))) for e in examples]
      return {"input_ids": t(ids), "attention_mask": t(mask), "decoder_input_ids": t(dec),
              "labels": t(lab)}
    n = max(len(e["inputs"]) + len(e["targets"]) for e in examples)
    ids, mask, lab = [], [], []
    for e in examples:
      row = np.concatenate([e["inputs"], e["targets"]])
      ids.append(np.pad(row, (0, n - len(row))))
      mask.append(np.arange(n) < len(row))
      lab.append(np.pad(np.concatenate([np.full(len(e["inputs"]), -100), e["targets"]]),
                        (0, n - len(row)), constant_values=-100))
    return {"input_ids": t(ids), "attention_mask": t(mask), "labels": t(lab)}

  def train(self, batches):
    torch = self.torch
    for b in batches:
      kw = {k: v for k, v in b.items() if k != "labels"}
      logits = self.model(**kw).logits
      labels = b["labels"]
      if self.family == "decoder" and "attention_mask" in b:  # next-token targets
        logits, labels = logits[:, :-1], labels[:, 1:]
      loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(),
                                               labels.flatten(), ignore_index=-100)
      loss.backward()
      self.opt.step()
      self.opt.zero_grad(set_to_none=True)
    self.loss = loss.item()

  def sizes(self) -> dict:
    torch = self.torch
    state = sum(t.numel() * t.element_size() for s in self.opt.state.values()
                for t in s.values() if torch.is_tensor(t))
    return {"optimizer_state_bytes": int(state),
            "trainable_parameters": int(sum(p.numel() for p in self.trainable))}


def _interleaved(setups: dict, batches: dict, windows: int, amount) -> dict:
  """{name: common.Windows}: each window runs every setup on its batches in turn."""
  w = {name: common.Windows() for name in setups}
  for i in range(windows):
    for name, s in setups.items():
      bs = batches[name][i]
      w[name].time(lambda s=s, bs=bs: s.train(bs), amount(name, bs))
  return w


def _ratio(num: common.Windows, den: common.Windows) -> dict:
  """num's window time over den's, window by window (the same load for both)."""
  r = sorted(a / b for a, b in zip(num.seconds, den.seconds))
  return {"median": round(statistics.median(r), 3), "min": round(r[0], 3),
          "max": round(r[-1], 3)}


def _step_figure(w: common.Windows, steps: int) -> dict:
  fig = w.summary()  # rates: steps per second
  return {"step_seconds": round(1 / fig["median"], 5), "step_seconds_min": round(
      1 / fig["max"], 5), "step_seconds_max": round(1 / fig["min"], 5),
          "windows": fig["windows"], "steps_per_window": steps,
          "load_before": fig["load_before"], "load_after": fig["load_after"],
          "others_cpu_share": fig.get("others_cpu_share"),
          "steal_cpu_share": fig.get("steal_cpu_share"), "quiet": fig["quiet"]}


def _peak_rss_growth(fn) -> int:
  """Growth of the process's peak RSS over fn() (0 if an earlier peak was higher)."""
  before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  fn()
  return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024


def step_times(tmodel, family, size, vocab, targets, windows, steps, log) -> dict:
  n = windows * steps + 1
  batches = _batches(family, size, vocab, n)
  names = ["flanjax_full"] + [f"flanjax_lora_r{r}" for r in RANKS] + [
      f"peft_lora_r{r}" for r in RANKS]
  setups, rows = {}, {}
  for r in RANKS:  # PyTorch first: its peak RSS growth before flanjax's compiles
    name = f"peft_lora_r{r}"
    log(f"{family}: {name}")
    s = setups[name] = PeftSetup(tmodel, family, r, targets)
    warm = [s.batch(batches[0])]
    rows[name] = {"peak_rss_growth_bytes": _peak_rss_growth(lambda s=s, w=warm: s.train(w))}
  for name in names[:3]:
    log(f"{family}: {name} (compiling)")
    rank = None if name == "flanjax_full" else int(name.rsplit("r", 1)[1])
    s = setups[name] = FlanjaxSetup(tmodel, family, rank, targets)
    b0 = s.batch(batches[0])
    rows[name] = s.compiled(b0)
    s.train([b0])  # warm-up
  setups = {k: setups[k] for k in names}
  per = {}
  for name, s in setups.items():
    conv = [s.batch(b) for b in batches[1:]]
    per[name] = [conv[i * steps:(i + 1) * steps] for i in range(windows)]
  log(f"{family}: {windows} interleaved windows of {steps} steps per setup")
  w = _interleaved(setups, per, windows, lambda name, bs: len(bs))
  full = rows["flanjax_full"]
  for name, s in setups.items():
    rows[name].update(_step_figure(w[name], steps), **s.sizes(), last_loss=s.loss)
  for r in RANKS:
    row, peft_row = rows[f"flanjax_lora_r{r}"], rows[f"peft_lora_r{r}"]
    row["step_vs_full"] = _ratio(w[f"flanjax_lora_r{r}"], w["flanjax_full"])
    row["flops_vs_full"] = round(row["flops"] / full["flops"], 3)
    row["optimizer_state_vs_full"] = round(
        row["optimizer_state_bytes"] / full["optimizer_state_bytes"], 5)
    row["step_vs_peft"] = _ratio(w[f"flanjax_lora_r{r}"], w[f"peft_lora_r{r}"])
    peft_row["step_vs_flanjax_full"] = _ratio(w[f"peft_lora_r{r}"], w["flanjax_full"])
  return rows


def real_lengths(tmodel, family, size, targets, examples, windows, log) -> dict:
  """flanjax LoRA r=8 on packed rows vs PEFT r=8 on padded batches of the same examples."""
  from benchmarks import examples as ex_lib  # pylint: disable=g-import-not-at-top
  from benchmarks import stacks, train_bench  # pylint: disable=g-import-not-at-top
  rows_per_step, n_in, n_tg = REAL[size]
  lengths = {"inputs": n_in, "targets": n_tg}
  kind = "enc_dec" if family == "t5" else "prefix_lm"
  rows, members, steady = stacks.pack_rows(examples, lengths, kind)
  timed, warm = train_bench._real_rows(  # pylint: disable=protected-access
      rows, members, steady, rows_per_step, windows, real_examples=0)
  fj_batches = train_bench.stack_steps(rows, timed, rows_per_step)
  ids = sorted(i for j in timed for i in members[j])
  warm_ids = sorted(i for j in warm for i in members[j])
  per_step = max(1, int(round(len(ids) / len(fj_batches))))
  log(f"{family} real lengths: {len(ids)} examples, {len(fj_batches)} packed steps of "
      f"{rows_per_step} rows; PEFT {per_step} padded examples a step")
  fj = FlanjaxSetup(tmodel, family, 8, targets)
  pt = PeftSetup(tmodel, family, 8, targets)
  fj.train([fj.batch(train_bench.stack_steps(rows, warm, rows_per_step)[0])])
  pt.train([pt.padded([examples[i] for i in warm_ids[:per_step]])])
  fj_w = [[fj.batch(b) for b in wb] for wb in train_bench._split(fj_batches, windows)]  # pylint: disable=protected-access
  pt_all = [pt.padded([examples[i] for i in ids[s:s + per_step]])
            for s in range(0, len(ids), per_step)]
  pt_w = train_bench._split(pt_all, windows)  # pylint: disable=protected-access
  real = {}
  for i, wb in enumerate(train_bench._split(fj_batches, windows)):  # pylint: disable=protected-access
    real[("flanjax_lora_r8", i)] = sum(stacks.flanjax_counts(b, kind)[0] for b in wb)
  for i, wb in enumerate(pt_w):
    real[("peft_lora_r8", i)] = sum(int(b["attention_mask"].sum()) + (
        int((b["labels"] != -100).sum()) if family == "t5" else 0) for b in wb)
  index = {}
  for name, ws in (("flanjax_lora_r8", fj_w), ("peft_lora_r8", pt_w)):
    for i, wb in enumerate(ws):
      index[id(wb)] = real[(name, i)]
  w = _interleaved({"flanjax_lora_r8": fj, "peft_lora_r8": pt},
                   {"flanjax_lora_r8": fj_w, "peft_lora_r8": pt_w}, windows,
                   lambda name, bs: index[id(bs)])
  out = {"examples": len(ids), "lengths": ex_lib.length_summary([examples[i] for i in ids]),
         "flanjax_rows_per_step": rows_per_step, "flanjax_row_lengths": lengths,
         "peft_examples_per_step": per_step,
         "real_tokens": {"flanjax_lora_r8": sum(v for (n, _), v in real.items()
                                                if n == "flanjax_lora_r8"),
                         "peft_lora_r8": sum(v for (n, _), v in real.items()
                                             if n == "peft_lora_r8")}}
  for name, ws in w.items():
    fig = ws.summary()
    out[name] = {"real_tokens_per_s": fig["median"], "real_tokens_per_s_min": fig["min"],
                 "real_tokens_per_s_max": fig["max"], "windows": fig["windows"],
                 "load_before": fig["load_before"], "load_after": fig["load_after"],
                 "others_cpu_share": fig.get("others_cpu_share"),
                 "steal_cpu_share": fig.get("steal_cpu_share"), "quiet": fig["quiet"]}
  r = sorted(a / b for a, b in zip(w["flanjax_lora_r8"].rates, w["peft_lora_r8"].rates))
  out["flanjax_vs_peft_tokens_per_s"] = {"median": round(statistics.median(r), 3),
                                         "min": round(r[0], 3), "max": round(r[-1], 3)}
  return out


def run(size, targets_kind, windows, steps, mixture, examples_n, log, families=("t5", "decoder"),
        save=lambda results: None) -> dict:
  """Every phase's figures go to save() as soon as they exist: a crash later loses none."""
  import torch  # pylint: disable=g-import-not-at-top
  from benchmarks import examples as ex_lib  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  _, n_in, n_tg = REAL[size]
  lengths = {"inputs": n_in, "targets": n_tg}
  if mixture == "synthetic":
    examples, vocab_ids, what = ex_lib.synthetic_examples(lengths, examples_n, 0, 8000)
  else:
    examples, vocab_ids, what = ex_lib.mixture_examples(mixture, lengths, examples_n, 0, 8000)
  vocab = int(math.ceil(vocab_ids / 128) * 128)  # as the trainer rounds the vocabulary
  log(f"examples: {what}")
  out = {"examples": what, "vocab_size": vocab}
  for family, tmodel in _hf_models(size, vocab).items():
    if family not in families:
      continue
    targets = DEFAULT[family] if targets_kind == "default" else (
        T5_ALL if family == "t5" else LLAMA_ALL)
    res = out[family] = {"targets": targets}
    res["step"] = step_times(tmodel, family, size, vocab, targets, windows, steps, log)
    save(out)
    res["real_lengths"] = real_lengths(tmodel, family, size, targets, examples, windows, log)
    save(out)
  return out


def table(results: dict) -> str:
  lines = ["| model | setup | step (ms) [min-max] | vs full (window ratio) | FLOPs vs full "
           "| peak memory (MiB) | optimizer state (KiB) | vs full | trainable params |",
           "|---|---|---|---|---|---|---|---|---|"]
  for family in [f for f in ("t5", "decoder") if "step" in results.get(f, {})]:
    rows = results[family]["step"]
    for name, r in rows.items():
      mem = r.get("peak_memory_bytes") or r.get("peak_rss_growth_bytes")
      vs = r.get("step_vs_full") or r.get("step_vs_flanjax_full")
      vs = f"{vs['median']} [{vs['min']}-{vs['max']}]" if vs else ""
      lines.append(
          f"| {family} | {name} | {1000 * r['step_seconds']:.1f} "
          f"[{1000 * r['step_seconds_min']:.0f}-{1000 * r['step_seconds_max']:.0f}] | {vs} | "
          f"{r.get('flops_vs_full', '')} | {mem / 2**20 if mem else float('nan'):.1f} | "
          f"{r['optimizer_state_bytes'] / 1024:.1f} | {r.get('optimizer_state_vs_full', '')} | "
          f"{r['trainable_parameters']:,} |")
  lines += ["", "| model | real tokens/s: flanjax LoRA r8 (packed) | PEFT LoRA r8 (padded) "
            "| flanjax / PEFT (window ratio) |", "|---|---|---|---|"]
  for family in [f for f in ("t5", "decoder") if "real_lengths" in results.get(f, {})]:
    r = results[family]["real_lengths"]
    f, p, x = r["flanjax_lora_r8"], r["peft_lora_r8"], r["flanjax_vs_peft_tokens_per_s"]
    lines.append(f"| {family} | {f['real_tokens_per_s']:,.0f} [{f['real_tokens_per_s_min']:,.0f}"
                 f"-{f['real_tokens_per_s_max']:,.0f}] | {p['real_tokens_per_s']:,.0f} "
                 f"[{p['real_tokens_per_s_min']:,.0f}-{p['real_tokens_per_s_max']:,.0f}] | "
                 f"{x['median']} [{x['min']}-{x['max']}] |")
  return "\n".join(lines)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
  ap.add_argument("--targets", choices=("default", "all"), default="default",
                  help="default: PEFT's for the model kind (T5 q, v; Llama q_proj, v_proj)")
  ap.add_argument("--windows", type=int, default=5)
  ap.add_argument("--steps", type=int, default=2, help="steps per window and setup")
  ap.add_argument("--mixture", default="flan_cot",
                  help="real lengths' examples: flan_cot (FLANJAX_DATA_DIR), or synthetic")
  ap.add_argument("--examples", type=int, default=600)
  ap.add_argument("--families", default="t5,decoder",
                  help="comma-separated model kinds to run: t5, decoder")
  ap.add_argument("--out", default=None,
                  help="JSON file for the results (rewritten after every phase)")
  args = ap.parse_args(argv)
  families = [f.strip() for f in args.families.split(",") if f.strip()]
  if not families or set(families) - {"t5", "decoder"}:
    ap.error(f"--families {args.families!r}: give t5, decoder or t5,decoder")
  faulthandler.enable()  # a native crash (XLA, torch) prints where it happened
  if args.windows < 5:
    ap.error("--windows must be at least 5 (each figure is a median of >= 5 windows)")
  import torch  # pylint: disable=g-import-not-at-top
  threads = torch.get_num_threads()
  load_start = common.load()
  d, f, n, h, k, b, length = SIZES[args.size]
  head = {"command": "python benchmarks/lora_bench.py " + " ".join(
      sys.argv[1:] if argv is None else argv),
          "commit": common.commit(), "machine": common.machine(threads),
          "load_start": load_start, "quiet_start": common.quiet_start(load_start),
          "size": args.size, "windows": args.windows, "steps_per_window": args.steps}

  def save(results, complete=False):
    common.write_json(args.out, dict(
        head, load_end=common.load(), complete=complete,
        sizes={"d_model": d, "d_ff": f, "layers": n, "heads": h, "head_dim": k,
               "vocab": results["vocab_size"], "batch": b, "length": length},
        results=results))

  results = run(args.size, args.targets, args.windows, args.steps, args.mixture,
                args.examples, common.Log(), families, save)
  save(results, complete=True)
  print(table(results))
  return 0


if __name__ == "__main__":
  sys.exit(main())

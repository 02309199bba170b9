"""LoRA vs full fine-tuning, flanjax vs Hugging Face PEFT + PyTorch, side by side in one run.

  python benchmarks/lora_bench.py [--size tiny|small] [--steps 6] \\
      [--out benchmarks/results/lora_bench.json]

For T5 (gated-gelu, FLAN-T5's layout) and the Llama-style decoder, on the same
random batches: flanjax full fine-tuning (AdamW over every parameter), flanjax
LoRA r=8 and r=16 (all seven projection kinds, AdamW over the adapters, the
base frozen) and PEFT + PyTorch LoRA of the same config (torch.optim.AdamW over
the adapters). Per setup: the median step time after a warm-up step, peak
memory (flanjax: XLA's compiled step, arguments + outputs + temporaries; PyTorch:
the process's peak RSS growth over the steps), optimizer-state bytes and
trainable parameters. Targets (issue 14): flanjax LoRA's step <= 0.7x flanjax
full fine-tuning's, its optimizer state < 2% of full's.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402

SIZES = {  # d_model, d_ff, layers, heads, head dim, vocab, batch, length
    "tiny": (64, 128, 2, 4, 16, 512, 4, 64),
    "small": (256, 1024, 4, 8, 32, 4096, 8, 128),
}
T5_NAMES = ["q", "k", "v", "o", "wi_0", "wi_1", "wo"]
LLAMA_NAMES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _hf_models(size: str):
  import transformers  # pylint: disable=g-import-not-at-top
  d, f, n, h, k, v, _, _ = SIZES[size]
  t5 = transformers.T5ForConditionalGeneration(transformers.T5Config(
      vocab_size=v, d_model=d, d_ff=f, num_layers=n, num_decoder_layers=n, num_heads=h,
      d_kv=k, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, dropout_rate=0.0))
  llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=v, hidden_size=d, intermediate_size=f, num_hidden_layers=n,
      num_attention_heads=h, num_key_value_heads=h, head_dim=k, max_position_embeddings=1024,
      tie_word_embeddings=False))
  return {"t5": (t5, T5_NAMES), "decoder": (llama, LLAMA_NAMES)}


def _batches(family: str, size: str, steps: int):
  import numpy as np  # pylint: disable=g-import-not-at-top
  *_, v, b, length = SIZES[size]
  rng = np.random.default_rng(0)
  out = []
  for _ in range(steps):
    tok = rng.integers(2, v, size=(b, length)).astype(np.int32)
    if family == "t5":
      tgt = rng.integers(2, v, size=(b, length // 2)).astype(np.int32)
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


def flanjax_setup(tmodel, family, batches, rank=None):
  """One flanjax setup through the trainer's own code: full fine-tuning, or LoRA of `rank`."""
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from flanjax.models import hf, kinds, lora  # pylint: disable=g-import-not-at-top
  from flanjax.training import adapters, loop, partitioning  # pylint: disable=g-import-not-at-top
  sd = {k: v.detach().numpy() for k, v in tmodel.state_dict().items()}
  cfg = hf.config_from_hf(tmodel.config.to_dict())
  params = hf.params_from_hf(sd, cfg)
  kind = kinds.for_config(cfg, trained_by_flanjax=family == "t5")
  tx = optax.adamw(1e-4, weight_decay=0.0)
  ad = None
  if rank:
    config = lora.LoraConfig(rank=rank, alpha=2.0 * rank,
                             targets=T5_NAMES if family == "t5" else LLAMA_NAMES)
    ad = adapters.LoraAdapters(config, cfg, lora.select(cfg, config.targets), params,
                           {"path": "-", "fingerprint": "-"})
  part = loop.Partitioner.create((1, 1, 1))
  trainer = loop.Trainer(model=kind.build(cfg), kind=kind, partitioner=part,
                         optimizer=loop.Optimizer(tx, lambda s: 1e-4), checkpointer=None,
                         data=None, evaluator=None, run=None, vocab=None, mixture="", adapters=ad)
  state = trainer.init_state(None if ad else params)
  step, _ = trainer._compile()  # pylint: disable=protected-access
  times = []
  with part.scope():
    for b in batches:
      t0 = time.perf_counter()
      state, m = step(state, partitioning.global_batch(b, part.mesh))
      jax.block_until_ready(m["loss"])
      times.append(time.perf_counter() - t0)
  mem = _compiled_memory(trainer, state, batches[0], part)
  return {"step_seconds": statistics.median(times[1:]), "peak_memory_bytes": mem,
          "optimizer_state_bytes": _tree_bytes(state["opt_state"]),
          "trainable_parameters": int(sum(x.size for x in jax.tree.leaves(state["params"]))),
          "last_loss": float(m["loss"])}


def _compiled_memory(trainer, state, batch, part):
  """XLA's account of the compiled step: arguments + outputs + temporaries (the base too)."""
  import jax  # pylint: disable=g-import-not-at-top
  from flanjax.training import trainer as step_lib  # pylint: disable=g-import-not-at-top
  lc = trainer.losses
  make = lambda model: step_lib.make_train_step(  # noqa: E731
      model, trainer.optimizer.tx, trainer.optimizer.lr_fn, z_loss=lc.z_loss,
      model_inputs=trainer.kind.model_inputs)
  try:
    with part.scope():
      if trainer.adapters is None:
        c = jax.jit(make(trainer.model)).lower(state, batch).compile()
      else:
        from flanjax.training import adapters  # pylint: disable=g-import-not-at-top
        fn = lambda s, b, base: make(adapters.Bound(trainer.model, base, trainer.adapters))(s, b)  # noqa: E731
        c = jax.jit(fn).lower(state, batch, trainer.base).compile()
    m = c.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes)
  except Exception:  # pylint: disable=broad-except
    return None


def peft_setup(tmodel, family, names, batches, rank):
  """PEFT + PyTorch LoRA of the same config on the same batches."""
  import copy  # pylint: disable=g-import-not-at-top
  import peft  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  model = peft.get_peft_model(copy.deepcopy(tmodel), peft.LoraConfig(
      r=rank, lora_alpha=2 * rank, target_modules=names, lora_dropout=0.0))
  model.train()
  trainable = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.0)
  rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  times = []
  for b in batches:
    t0 = time.perf_counter()
    if family == "t5":
      out = model(input_ids=torch.tensor(b["encoder_input_tokens"], dtype=torch.long),
                  decoder_input_ids=torch.tensor(b["decoder_input_tokens"], dtype=torch.long))
    else:
      out = model(input_ids=torch.tensor(b["decoder_input_tokens"], dtype=torch.long))
    loss = torch.nn.functional.cross_entropy(
        out.logits.flatten(0, 1), torch.tensor(b["decoder_target_tokens"],
                                               dtype=torch.long).flatten())
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    times.append(time.perf_counter() - t0)
  state_bytes = sum(t.numel() * t.element_size() for s in opt.state.values()
                    for t in s.values() if torch.is_tensor(t))
  return {"step_seconds": statistics.median(times[1:]),
          "peak_rss_growth_bytes": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                    - rss0) * 1024,
          "optimizer_state_bytes": int(state_bytes),
          "trainable_parameters": int(sum(p.numel() for p in trainable)),
          "last_loss": float(loss)}


def run(size: str, steps: int, log) -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  results = {}
  for family, (tmodel, names) in _hf_models(size).items():
    batches = _batches(family, size, steps)
    rows = {}
    log(f"{family}: flanjax full fine-tuning")
    rows["flanjax_full"] = flanjax_setup(tmodel, family, batches)
    for r in (8, 16):
      log(f"{family}: flanjax LoRA r={r}")
      rows[f"flanjax_lora_r{r}"] = flanjax_setup(tmodel, family, batches, rank=r)
      log(f"{family}: PEFT + PyTorch LoRA r={r}")
      rows[f"peft_lora_r{r}"] = peft_setup(tmodel, family, names, batches, r)
    full = rows["flanjax_full"]
    for r in (8, 16):
      row = rows[f"flanjax_lora_r{r}"]
      row["step_vs_full"] = round(row["step_seconds"] / full["step_seconds"], 3)
      row["optimizer_state_vs_full"] = round(
          row["optimizer_state_bytes"] / full["optimizer_state_bytes"], 5)
    results[family] = rows
  return results


def table(results: dict) -> str:
  lines = ["| model | setup | step (ms) | vs full | peak memory (MiB) | optimizer state (KiB) "
           "| trainable params |", "|---|---|---|---|---|---|---|"]
  for family, rows in results.items():
    for name, r in rows.items():
      mem = r.get("peak_memory_bytes") or r.get("peak_rss_growth_bytes")
      lines.append(
          f"| {family} | {name} | {1000 * r['step_seconds']:.1f} | "
          f"{r.get('step_vs_full', '')} | {mem / 2**20 if mem else float('nan'):.1f} | "
          f"{r['optimizer_state_bytes'] / 1024:.1f} | {r['trainable_parameters']:,} |")
  return "\n".join(lines)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
  ap.add_argument("--steps", type=int, default=6)
  ap.add_argument("--out", default=None, help="JSON file for the results")
  args = ap.parse_args(argv)
  import torch  # pylint: disable=g-import-not-at-top
  threads = torch.get_num_threads()
  load_start = common.load()
  results = run(args.size, args.steps, common.Log())
  out = {"command": "python benchmarks/lora_bench.py " + " ".join(argv or sys.argv[1:]),
         "commit": common.commit(), "machine": common.machine(threads),
         "load_start": load_start, "load_end": common.load(), "size": args.size,
         "sizes": dict(zip(("d_model", "d_ff", "layers", "heads", "head_dim", "vocab", "batch",
                            "length"), SIZES[args.size])),
         "steps": args.steps, "results": results}
  common.write_json(args.out, out)
  print(table(results))
  return 0


if __name__ == "__main__":
  sys.exit(main())

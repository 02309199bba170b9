"""Training throughput: padded tokens/s, and real tokens/s on a real length distribution.

Padded: B rows of exactly (inputs + targets) random tokens, the same tensors on
both stacks; tokens/s counts every position.

Real: the same examples on both stacks. flanjax trains on packed rows of its
own packer (rows emitted once the packer's window is full, i.e. steady
state); PyTorch trains on those same examples in batches padded to the batch's
longest (DataCollatorForSeq2Seq), K examples a step where K is what a packed
step holds on average (so both take the same number of optimizer steps), in
the stream's random order and, separately, in transformers' group_by_length
order. Real tokens/s counts non-padding positions; both stacks see exactly the
same number of them.
"""

from __future__ import annotations

import time

import numpy as np

from benchmarks import examples as ex_lib
from benchmarks import stacks


def _run(fn, *args, **kw):
  t0 = time.perf_counter()
  out = fn(*args, **kw)
  return out, time.perf_counter() - t0


def _result(seconds, steps, real, padded, examples=None, **extra) -> dict:
  r = {"steps": steps, "seconds": round(seconds, 4), "real_tokens": int(real),
       "padded_tokens": int(padded), "tokens_per_s": round(padded / seconds, 1),
       "real_tokens_per_s": round(real / seconds, 1),
       "non_padding_share": round(real / max(padded, 1), 4)}
  if examples is not None:
    r["examples"] = int(examples)
    r["examples_per_s"] = round(examples / seconds, 2)
  r.update(extra)
  return r


def run(cfg, examples, lengths: dict, batch_size: int, steps: int, warmup: int,
        torch_compile: bool, opt: stacks.AdamW, seed: int, log, vocab_ids: int) -> dict:
  kind = stacks.packing_kind(cfg)
  name = stacks.family(cfg)
  out = {"kind": kind}
  fj = stacks.Flanjax(cfg, opt, seed)
  out["num_params"] = fj.num_params
  log(f"{name}: {fj.num_params / 1e6:.2f}M parameters; building the PyTorch twin")
  th = stacks.Torch(cfg, fj.params(), opt)
  out["torch"] = {"attn_implementation": th.attn_implementation,
                  "optimizer": f"torch.optim.AdamW ({th.optimizer_impl})"}
  out["flanjax"] = {"optimizer": "optax.adamw"}

  # ---- padded: every position real, the same tensors on both stacks
  # One example of exactly inputs + targets tokens per row: the packer's layout, no padding.
  fixed = ex_lib.fixed_examples(batch_size, lengths["inputs"], lengths["targets"], seed,
                                vocab_ids)
  rows, _, _ = stacks.pack_rows(fixed, lengths, kind)
  fj_batch = stacks.stack_rows(rows, batch_size)
  th_batch = th.batch(fixed)
  real, padded = stacks.flanjax_counts(fj_batch, kind)
  t_real, t_padded = th.counts(th_batch)
  assert (real, padded) == (t_real, t_padded) == (padded, padded), (real, t_real, padded)

  # Parity: both stacks give the same loss on the same weights and batch.
  out["parity"] = {"flanjax_loss": round(fj.loss(fixed), 6),
                   "torch_loss": round(th.loss(th_batch), 6)}
  out["parity"]["abs_diff"] = round(abs(out["parity"]["flanjax_loss"]
                                        - out["parity"]["torch_loss"]), 6)
  log(f"{name}: initial loss flanjax {out['parity']['flanjax_loss']:.5f}, "
      f"PyTorch {out['parity']['torch_loss']:.5f}")

  padded_res = {}
  _, compile_s = _run(fj.train, [fj_batch])
  fj.train([fj_batch] * max(warmup - 1, 0))
  _, secs = _run(fj.train, [fj_batch] * steps)
  padded_res["flanjax"] = _result(secs, steps, real * steps, padded * steps,
                                  compile_and_first_step_s=round(compile_s, 2))
  log(f"{name} padded: flanjax {padded_res['flanjax']['tokens_per_s']:,.0f} tok/s "
      f"(compile + first step {compile_s:.1f}s)")
  th.train([th_batch] * warmup)
  _, secs = _run(th.train, [th_batch] * steps)
  padded_res["torch_eager"] = _result(secs, steps, real * steps, padded * steps)
  log(f"{name} padded: PyTorch eager {padded_res['torch_eager']['tokens_per_s']:,.0f} tok/s")
  if torch_compile:
    try:
      th.compile()
      _, compile_s = _run(th.train, [th_batch], compiled=True)
      th.train([th_batch] * max(warmup - 1, 0), compiled=True)
      _, secs = _run(th.train, [th_batch] * steps, compiled=True)
      padded_res["torch_compile"] = _result(secs, steps, real * steps, padded * steps,
                                            compile_and_first_step_s=round(compile_s, 2))
      log(f"{name} padded: PyTorch compiled "
          f"{padded_res['torch_compile']['tokens_per_s']:,.0f} tok/s "
          f"(compile + first step {compile_s:.1f}s)")
    except Exception as e:  # pylint: disable=broad-except
      padded_res["torch_compile"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
      log(f"{name} padded: torch.compile failed: {e}")
  else:
    padded_res["torch_compile"] = {"skipped": "torch_compile=False"}
  out["padded"] = padded_res

  # ---- real lengths: packed (flanjax) vs dynamic padding (PyTorch), same examples
  rows, members, steady = stacks.pack_rows(examples, lengths, kind)
  good = [i for i, s in enumerate(steady) if s]
  if len(good) < (steps + 1) * batch_size:
    # Too few examples for a full window: take the stream from its start.
    good = list(range(len(rows)))
  if len(good) < (steps + 1) * batch_size:
    raise ValueError(f"{len(examples)} examples pack into {len(rows)} rows; the real-length "
                     f"benchmark needs {(steps + 1) * batch_size}: raise examples")
  timed_rows = good[:steps * batch_size]
  warm_rows = good[steps * batch_size:(steps + 1) * batch_size]
  fj_batches = [stacks.stack_rows([rows[j] for j in timed_rows[s:s + batch_size]], batch_size)
                for s in range(0, len(timed_rows), batch_size)]
  fj_warm = stacks.stack_rows([rows[j] for j in warm_rows], batch_size)
  ids = sorted(i for j in timed_rows for i in members[j])  # the stream's (random) order
  warm_ids = sorted(i for j in warm_rows for i in members[j])
  per_step = max(1, int(round(len(ids) / steps)))
  fj_real = sum(stacks.flanjax_counts(b, kind)[0] for b in fj_batches)
  fj_pad = sum(stacks.flanjax_counts(b, kind)[1] for b in fj_batches)
  real_res = {"examples": len(ids), "torch_examples_per_step": per_step,
              "flanjax_rows_per_step": batch_size,
              "lengths": ex_lib.length_summary([examples[i] for i in ids])}

  fj.train([fj_warm])
  _, secs = _run(fj.train, fj_batches)
  real_res["flanjax_packed"] = _result(secs, len(fj_batches), fj_real, fj_pad, len(ids))
  log(f"{name} real: flanjax packed {real_res['flanjax_packed']['real_tokens_per_s']:,.0f} "
      f"real tok/s (share {real_res['flanjax_packed']['non_padding_share']:.3f})")

  orders = {"random": ids,
            "grouped": [ids[k] for k in stacks.grouped_order([examples[i] for i in ids],
                                                             per_step, seed, kind)]}
  for order, seq in orders.items():
    batches = [th.batch([examples[i] for i in seq[s:s + per_step]])
               for s in range(0, len(seq), per_step)]
    t_real = sum(th.counts(b)[0] for b in batches)
    t_pad = sum(th.counts(b)[1] for b in batches)
    assert t_real == fj_real, (t_real, fj_real)  # the same examples, the same real tokens
    th.train([th.batch([examples[i] for i in warm_ids[:per_step]])])
    _, secs = _run(th.train, batches)
    real_res[f"torch_eager_{order}"] = _result(secs, len(batches), t_real, t_pad, len(ids))
    log(f"{name} real: PyTorch eager, {order} order "
        f"{real_res[f'torch_eager_{order}']['real_tokens_per_s']:,.0f} real tok/s "
        f"(share {real_res[f'torch_eager_{order}']['non_padding_share']:.3f})")
  real_res["torch_compile"] = {"skipped": "dynamic shapes: a compiled model recompiles per "
                                          "batch shape"}
  out["real"] = real_res
  return out

"""Attention's share of the train step on real packed rows, and what skipping keys could save.

    python -m benchmarks.attention_share --out benchmarks/results/attention_share_cpu.json

Why this exists: against `group_by_length` (issue 20's 1.5x target) PyTorch trains on rows as
long as each batch's longest example (~200-260 tokens on flan_cot), flanjax on packed rows of
640, whose attention spans the row's other examples and masks them out. This measures how
much that costs and how much a block-sparse attention could win back:

  step    the train step as it ships against the same step with the attention core (scores,
          mask, position bias, softmax, values, and their backward) replaced by a stand-in
          that keeps q, k and v live (q + 1e-9 x (mean k + mean v)): the projections, norms,
          feed-forwards, loss and optimizer are the same, so the difference is the core's
          time. Both on the benchmark's own steady-state packed rows of flan_cot (cpu.gin's
          models, 4 rows of 512 + 128), in interleaved windows.
  keys    for each attention of the model, the (query, key) pairs its query blocks score
          now (every key; under a causal mask the keys up to the block's last query)
          against those they would score if each block skipped the keys none of its
          queries may see (another example's, or padding), at block sizes 32 / 64 / 128
          with keys in blocks of the same size: one window for the batch's rows (one
          einsum) or one per row; and the floor, the allowed pairs alone (per-example
          attention, as PyTorch's grouped rows nearly have it).
  bound   the step if the core's time fell in proportion to the pairs scored, per row at
          the best block size: an upper bound on that lever (smaller blocks cost more ops,
          and a row's own window needs a branch per row and block under XLA's static
          shapes).
  blocks  the step with the reference attention's query blocks smaller than it ships
          (attention.QUERY_BLOCK): under a causal mask each block reads keys only up to its
          last query, so smaller blocks score fewer pairs with no branch at all; this
          times what the extra, smaller ops cost against the pairs they save.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _real_batches(model: str, n_steps: int, batch: int, seed: int):
  """(config, [batches]): steady-state packed rows of the benchmark's flan_cot examples."""
  from benchmarks import examples as ex_lib, profile_step, stacks, train_bench  # pylint: disable=g-import-not-at-top
  cfg = profile_step._configs(model)  # pylint: disable=protected-access
  lengths = {"inputs": 512, "targets": 128}
  exs, _, _ = ex_lib.mixture_examples("flan_cot", lengths, 2200, seed, 8000)
  rows, _, steady = stacks.pack_rows(exs, lengths, stacks.packing_kind(cfg))
  good = [i for i, s in enumerate(steady) if s]
  if len(good) < n_steps * batch:
    raise SystemExit(f"attention_share: {len(good)} steady packed rows, {n_steps * batch} "
                     "needed: lower --steps")
  return cfg, train_bench.stack_steps(rows, good[:n_steps * batch], batch)


def _stand_in(q, k, v, spec, **_):
  del spec
  return q + (1e-9 * (k.mean() + v.mean())).astype(q.dtype)


def _attentions(model: str, b: dict) -> dict:
  """{name: (q segments, kv segments, causal, kv padding)} as the model builds its Specs."""
  if model == "decoder":
    s = np.asarray(b["decoder_segment_ids"])
    return {"decoder self-attention (causal)": (s, s, True, False)}
  enc, dec = np.asarray(b["encoder_segment_ids"]), np.asarray(b["decoder_segment_ids"])
  return {"encoder self-attention": (enc, enc, False, True),
          "cross-attention": (dec, enc, False, True),
          "decoder self-attention (causal)": (dec, dec, True, False)}


def _blocks(lq: int, size: int) -> list[tuple[int, int]]:
  return [(lo, min(lo + size, lq)) for lo in range(0, lq, size)]


def pairs_scored(bsz: int, lq: int, lk: int, causal: bool, query_block: int) -> int:
  """(query, key) pairs attention._reference scores with its query blocks of ~query_block:
  every key, or under a causal mask the keys up to each block's last query."""
  n = max(1, round(lq / query_block))  # attention._reference's blocks
  return sum(bsz * (hi - lo) * (min(hi, lk) if causal else lk)
             for lo, hi in _blocks(lq, -(-lq // n)))


def key_work(q_seg, kv_seg, causal: bool, kv_padding: bool, block: int,
             now_block: int) -> dict:
  """(query, key) pairs scored, over rows and query blocks, now and with per-block key windows.

  q_seg [b, q], kv_seg [b, k]; queries and keys at index positions (causal: key <= query).
  A window spans, in key blocks of `block`, from the first to the last key any of the
  block's queries may see; a block with a query that may see none keeps every key (the
  reference gives such a query a uniform softmax over all of them)."""
  bsz, lq = q_seg.shape
  lk = kv_seg.shape[1]
  allowed = q_seg[:, :, None] == kv_seg[:, None, :]
  if kv_padding:
    allowed &= kv_seg[:, None, :] > 0
  if causal:
    allowed &= np.arange(lk)[None, None, :] <= np.arange(lq)[None, :, None]
  now = pairs_scored(bsz, lq, lk, causal, now_block)
  batch = row = 0
  for lo, hi in _blocks(lq, block):
    a = allowed[:, lo:hi]
    seen = a.any(axis=1)  # [b, k]: a key some query of the block sees
    full = ~a.any(axis=2).all(axis=1)  # a row with a query that sees no key
    first = np.where(seen.any(1), seen.argmax(1), 0)
    last = np.where(seen.any(1), lk - 1 - seen[:, ::-1].argmax(1), lk - 1)
    first = np.where(full, 0, first // block * block)
    last = np.where(full, lk, np.minimum(lk, -(-(last + 1) // block) * block))
    batch += bsz * (hi - lo) * (last.max() - first.min())
    row += (hi - lo) * int((last - first).sum())
  return {"now": int(now), "batch_window": int(batch), "row_window": int(row),
          "allowed_pairs": int(allowed.sum()),
          "batch_window_of_now": round(batch / now, 3), "row_window_of_now": round(row / now, 3),
          "allowed_pairs_of_now": round(allowed.sum() / now, 3)}


def measure(model: str, steps: int, windows: int, batch: int, seed: int,
            query_blocks: tuple = ()) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  from benchmarks import stacks, variants  # pylint: disable=g-import-not-at-top
  from flanjax.models import attention  # pylint: disable=g-import-not-at-top
  cfg, batches = _real_batches(model, steps, batch, seed)
  dev = [jax.device_put(b) for b in batches]
  fns = {}
  for name, setting in (("step as it ships", None),
                        ("attention core replaced", lambda: variants._setting(  # pylint: disable=protected-access
                            "flanjax.models.attention", "attend", _stand_in))):
    fj = stacks.Flanjax(cfg, stacks.AdamW())
    run = lambda fj=fj: fj.train(dev)  # noqa: E731
    fns[name] = run if setting is None else variants._first_call_under(setting, run)  # pylint: disable=protected-access
  for qb in query_blocks:
    fj = stacks.Flanjax(cfg, stacks.AdamW())
    fns[f"query blocks of {qb}"] = variants._first_call_under(  # pylint: disable=protected-access
        lambda qb=qb: variants._setting("flanjax.models.attention", "QUERY_BLOCK", qb),  # pylint: disable=protected-access
        lambda fj=fj: fj.train(dev))
  timed = variants._interleaved(fns, windows, 1)  # pylint: disable=protected-access
  step_ms = {k: v["ms"] / steps for k, v in timed.items()}
  ship, stand = step_ms["step as it ships"], step_ms["attention core replaced"]
  keys = {}
  for name in _attentions(model, batches[0]):
    keys[name] = {}
    for block in (32, 64, 128):
      tot = None
      for b in batches:
        w = key_work(*_attentions(model, b)[name], block, attention.QUERY_BLOCK)
        tot = w if tot is None else {k: tot[k] + w[k] for k in ("now", "batch_window",
                                                                 "row_window", "allowed_pairs")}
      for k in ("batch_window", "row_window", "allowed_pairs"):
        tot[k + "_of_now"] = round(tot[k] / tot["now"], 3)
      keys[name][f"block_{block}"] = tot
  # The model's pairs scored now and per row at the best block size, over all its attentions.
  now = sum(keys[n]["block_64"]["now"] for n in keys)
  best = min((sum(keys[n][f"block_{bl}"]["row_window"] for n in keys), bl) for bl in (32, 64, 128))
  floor = sum(keys[n]["block_64"]["allowed_pairs"] for n in keys)
  core = ship - stand
  blocks = {}
  for qb in query_blocks:  # `now` is the pairs scored with the shipped blocks
    pairs = sum(pairs_scored(q.shape[0], q.shape[1], kv.shape[1], causal, qb)
                for b in batches for q, kv, causal, _ in _attentions(model, b).values())
    blocks[qb] = {"step_ms": round(step_ms[f"query blocks of {qb}"], 2),
                  "step_vs_shipped": round(step_ms[f"query blocks of {qb}"] / ship, 3),
                  "pairs_of_shipped": round(pairs / now, 3)}
  real = sum(stacks.flanjax_counts(b, stacks.packing_kind(cfg))[0] for b in batches) / steps
  return {"model": model, "steps_per_window": steps, "rows_per_step": batch,
          "real_tokens_per_step": round(real, 1),
          "step_ms": {k: round(v, 2) for k, v in step_ms.items()},
          "windows": timed,
          "attention_core_ms": round(core, 2), "attention_core_share": round(core / ship, 3),
          "keys": keys, "query_blocks": {"shipped": attention.QUERY_BLOCK, **blocks},
          "bound": {"row_window_block": best[1], "keys_of_now": round(best[0] / now, 3),
                    "step_ms": round(stand + core * best[0] / now, 2),
                    "step_speedup": round(ship / (stand + core * best[0] / now), 3),
                    "floor_keys_of_now": round(floor / now, 3),
                    "floor_step_speedup": round(ship / (stand + core * floor / now), 3),
                    "real_tokens_per_s_now": round(real / ship * 1e3, 1)}}


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--models", default="t5,decoder")
  ap.add_argument("--steps", type=int, default=10, help="packed steps a window")
  ap.add_argument("--windows", type=int, default=7)
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--query_blocks", default="80,32",
                  help="reference attention query blocks to time beside the shipped one")
  ap.add_argument("--out")
  a = ap.parse_args(argv)
  from benchmarks import common, stacks  # pylint: disable=g-import-not-at-top
  threads = stacks.torch_threads()
  res = {"command": "python -m benchmarks.attention_share " + " ".join(argv or sys.argv[1:]),
         "commit": common.commit(), "machine": common.machine(threads),
         "load_before": common.load(), "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
         "models": {}}
  qbs = tuple(int(x) for x in a.query_blocks.split(",") if x)
  for m in a.models.split(","):
    r = res["models"][m] = measure(m, a.steps, a.windows, a.batch, a.seed, qbs)
    bd = r["bound"]
    print(f"{m}: step {r['step_ms']['step as it ships']:.1f} ms, attention core "
          f"{r['attention_core_ms']:.1f} ms ({r['attention_core_share']:.0%}); per-row key "
          f"windows in blocks of {bd['row_window_block']} score {bd['keys_of_now']:.0%} of "
          "today's (query, key) pairs: "
          f"at best x{bd['step_speedup']:.3f} a step (per-example floor "
          f"{bd['floor_keys_of_now']:.0%}, x{bd['floor_step_speedup']:.3f})", flush=True)
    for qb, q in r["query_blocks"].items():
      if qb != "shipped":
        print(f"  query blocks of {qb}: {q['pairs_of_shipped']:.0%} of the pairs, step "
              f"x{q['step_vs_shipped']:.3f} the shipped one's time", flush=True)
  res["load_after"] = common.load()
  res["quiet"] = common.quiet_start(res["load_before"]) and all(
      w.get("quiet", True) for r in res["models"].values() for w in r["windows"].values())
  if a.out:
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w", encoding="utf-8") as f:
      json.dump(res, f, indent=1)
    print(f"written: {a.out}")


if __name__ == "__main__":
  main()

"""Packed rows of the full length against rows as short as their examples allow.

    python -m benchmarks.bucket_rows --model=decoder
    python -m benchmarks.bucket_rows --model=t5 --fractions=0.25,0.5,1 --out=/tmp/b.json

A question issue 20 left open: flanjax packs every example into rows of the full length
(512 + 128), where `group_by_length`'s rows are only as long as their batch's longest
example; attention costs more per token in a longer row. Skipping the keys of other
examples in a row would need a branch per row and block under XLA's static shapes
(`benchmarks.attention_share`). Shorter rows get most of that saving with static shapes:
each example goes to the shortest of a few row lengths (`--fractions` of the full
lengths) that holds it, each length is packed on its own, and a step holds
round(batch / fraction) rows, so every step has about the same padded positions.

Both layouts hold the same flan_cot examples (the mixture's stream after the packer's
first window, as the benchmark's real-length rows), only their full steps. The same
flanjax train step (a compile per row length) trains on each in alternating rounds,
all of a layout's steps in a shuffled order per round; each figure is the median of the
rounds with min and max: real tokens/s, padded positions/s and their share, and the
(query, key) pairs that attention scores, counted from the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

FULL = {"inputs": 512, "targets": 128}


def row_lengths_for(kind: str, fraction: float) -> dict:
  """The packer's lengths for rows `fraction` of the full ones. A shorter prefix-LM row
  is given by its total alone (the packer's {'targets': total}: any split of inputs and
  targets that fits the row)."""
  if fraction >= 1:
    return dict(FULL)
  if kind == "enc_dec":
    return {k: int(v * fraction) for k, v in FULL.items()}
  return {"targets": int((FULL["inputs"] + FULL["targets"]) * fraction)}


def fits(ex, lengths: dict, kind: str) -> bool:
  n_in, n_t = ex["inputs"].size, ex["targets"].size
  if kind == "enc_dec":
    return n_in <= lengths["inputs"] and n_t <= lengths["targets"]
  if "inputs" not in lengths:
    return n_in + n_t <= lengths["targets"]
  return (n_in <= lengths["inputs"] and n_t <= lengths["targets"]
          and n_in + n_t <= lengths["inputs"] + lengths["targets"])


def layouts(examples, kind: str, fractions, batch: int) -> dict:
  """{'full': [...], 'bucketed': [...]} lists of flanjax batches over the same examples."""
  from benchmarks import stacks  # pylint: disable=g-import-not-at-top
  fractions = sorted(fractions)
  if fractions[-1] < 1:
    raise ValueError(f"--fractions must include 1 (the full rows) for the longest "
                     f"examples, got {fractions}")
  groups: dict[float, list] = {f: [] for f in fractions}
  for ex in examples:
    groups[next(f for f in fractions if fits(ex, row_lengths_for(kind, f), kind))].append(ex)

  def steps(exs, fraction):
    rows, _, _ = stacks.pack_rows(exs, row_lengths_for(kind, fraction), kind)
    per = max(1, int(round(batch / fraction)))
    return [stacks.stack_rows(rows[s:s + per], per) for s in range(0, len(rows), per)
            if s + per <= len(rows)]  # full steps only

  return {"full": steps(examples, 1.0),
          "bucketed": [b for f in fractions if groups[f] for b in steps(groups[f], f)],
          "examples_per_fraction": {str(f): len(g) for f, g in groups.items()}}


def attention_pairs(batches, kind: str) -> int:
  """(query, key) pairs each layout's attention scores: every pair of a row's positions
  (T5: encoder self, decoder self and cross; the decoder: causal, so the pairs up to the
  diagonal), whatever their examples."""
  total = 0
  for b in batches:
    if kind == "enc_dec":
      li, lt = b["encoder_segment_ids"].shape[1], b["decoder_segment_ids"].shape[1]
      total += b["encoder_segment_ids"].shape[0] * (li * li + lt * lt + lt * li)
    else:
      length = b["decoder_segment_ids"].shape[1]
      total += b["decoder_segment_ids"].shape[0] * length * (length + 1) // 2
  return total


def main(argv=None):
  ap = argparse.ArgumentParser(prog="python -m benchmarks.bucket_rows")
  ap.add_argument("--model", default="decoder", choices=("decoder", "t5"))
  ap.add_argument("--fractions", default="0.25,0.5,1")
  ap.add_argument("--batch", type=int, default=4, help="full rows a step")
  ap.add_argument("--examples", type=int, default=2200)
  ap.add_argument("--skip", type=int, default=1024, help="examples not used (the packer's "
                  "first window in the benchmark)")
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--out")
  a = ap.parse_args(argv)
  try:
    fractions = [float(x) for x in a.fractions.split(",")]
  except ValueError:
    ap.error(f"--fractions takes numbers separated by commas, got {a.fractions!r}")
  if min(fractions) <= 0 or max(fractions) != 1:
    ap.error(f"--fractions must lie in (0, 1] and include 1 (the full rows, for the longest "
             f"examples), got {a.fractions}")
  if a.rounds < 1 or a.examples <= a.skip:
    ap.error("--rounds must be at least 1 and --examples more than --skip")

  from benchmarks import common, profile_step, stacks  # pylint: disable=g-import-not-at-top
  from benchmarks import examples as ex_lib  # pylint: disable=g-import-not-at-top
  res = {"command": "python -m benchmarks.bucket_rows " + " ".join(argv or sys.argv[1:]),
         "commit": common.commit(), "machine": common.machine(stacks.torch_threads()),
         "load_before": common.load(), "model": a.model, "fractions": fractions}
  cfg = profile_step._configs(a.model)  # pylint: disable=protected-access
  kind = stacks.packing_kind(cfg)
  exs, _, what = ex_lib.mixture_examples("flan_cot", FULL, a.examples, 0, 8000)
  res["data"] = f"{what}, examples {a.skip}..{a.examples}"
  lay = layouts(exs[a.skip:], kind, fractions, a.batch)
  res["examples_per_fraction"] = lay.pop("examples_per_fraction")
  fj = stacks.Flanjax(cfg, stacks.AdamW())
  counts = {k: [stacks.flanjax_counts(b, kind) for b in v] for k, v in lay.items()}
  for k, batches in lay.items():
    seen = set()
    for b in batches:  # compile each row length, and one warm step
      shape = b["decoder_segment_ids"].shape
      if shape not in seen:
        seen.add(shape)
        fj.train([b])
  wins = {k: common.Windows() for k in lay}
  rng = random.Random(0)
  for r in range(a.rounds):
    for k, batches in lay.items():
      order = list(range(len(batches)))
      rng.shuffle(order)
      real = sum(counts[k][i][0] for i in order)
      wins[k].time(lambda order=order, batches=batches: fj.train([batches[i] for i in order]),
                   real)
      print(f"round {r}: {k} {wins[k].rates[-1]:,.0f} real tokens/s", flush=True)
  res["layouts"] = {}
  for k, batches in lay.items():
    real = sum(c[0] for c in counts[k])
    padded = sum(c[1] for c in counts[k])
    s = wins[k].summary()
    shapes = sorted({(b["decoder_segment_ids"].shape[0],)
                     + tuple(b[f].shape[1] for f in ("encoder_segment_ids",
                                                     "decoder_segment_ids") if f in b)
                     for b in batches})
    res["layouts"][k] = {
        "steps": len(batches), "real_tokens": real, "padded_positions": padded,
        "non_padding_share": round(real / padded, 4),
        "attention_pairs": attention_pairs(batches, kind),
        # [rows, encoder length, decoder length] (T5) or [rows, length] (decoder)
        "step_shapes": [list(x) for x in shapes],
        "real_tokens_per_s": s["median"], "real_tokens_per_s_min": s["min"],
        "real_tokens_per_s_max": s["max"],
        "padded_per_s": round(s["median"] * padded / real, 1),
        "window_rates": s["window_rates"], "others_cpu_share": s.get("others_cpu_share"),
        "steal_cpu_share": s.get("steal_cpu_share"), "quiet": s["quiet"]}
  full, buck = res["layouts"]["full"], res["layouts"]["bucketed"]
  res["bucketed_vs_full"] = {
      "real_tokens_per_s": round(buck["real_tokens_per_s"] / full["real_tokens_per_s"], 3),
      "padded_per_s": round(buck["padded_per_s"] / full["padded_per_s"], 3),
      "attention_pairs_per_padded": round(
          (buck["attention_pairs"] / buck["padded_positions"])
          / (full["attention_pairs"] / full["padded_positions"]), 3)}
  res["load_after"] = common.load()
  res["quiet"] = common.quiet_start(res["load_before"]) and all(
      v["quiet"] for v in res["layouts"].values())
  for k, v in res["layouts"].items():
    print(f"{a.model} {k}: {v['real_tokens_per_s']:,.0f} real tokens/s "
          f"[{v['real_tokens_per_s_min']:,.0f}-{v['real_tokens_per_s_max']:,.0f}], "
          f"{v['padded_per_s']:,.0f} padded/s, share {v['non_padding_share']:.3f}, "
          f"{v['steps']} steps {v['step_shapes']}")
  print(f"bucketed / full: {res['bucketed_vs_full']}; load {res['load_before']} before, "
        f"{res['load_after']} after{'' if res['quiet'] else '  (NOT quiet)'}")
  if a.out:
    with open(a.out, "w") as f:
      json.dump(res, f, indent=1)
  return res


if __name__ == "__main__":
  main()

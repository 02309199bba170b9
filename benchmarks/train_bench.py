"""Training throughput: padded tokens/s, and real tokens/s on a real length distribution.

Every figure is the median of `windows` timed windows (>= 5), with their min and
max (the real-length runs deal their steps out to the windows in turn, so each
window spans the run's lengths: `_split`), the device and dtype it ran in, the
load average before and after, the share of the machine's CPU other
processes took during its windows (a figure above common.QUIET_OTHERS is marked
not quiet). Each stack is warmed up and compiled before its windows; each window
starts with an untimed step; `interleave` times window 1 of each stack, then window
2 of each, ... (`_measure`).

Padded: B rows of exactly (inputs + targets) random tokens, the same tensors on
both stacks; tokens/s counts every position.

Real: the same examples on both stacks, at least `real_examples` of them.
flanjax trains on packed rows of its own packer (rows emitted once the packer's
window is full, i.e. steady state). PyTorch trains on those same examples in
batches padded to the batch's longest (DataCollatorForSeq2Seq), K examples a
step where K is what a packed step holds on average (so both take about the
same number of optimizer steps), in the stream's random order and, separately,
in transformers' group_by_length order; and, for the decoder, on flanjax's
packed rows themselves, padding-free (position ids restart per example and a
block-diagonal causal mask keeps each example to itself). Real
tokens/s counts non-padding positions; every run sees the same real tokens.

The decoder's objective is the same on both sides: causal attention, loss on
the targets (flanjax's prefix-LM rows without decoder_causal_attention, i.e. causal;
PyTorch's rows hold the same tokens). The parity check compares the two
stacks' losses on the timed batches themselves before any update.
"""

from __future__ import annotations

from benchmarks import common
from benchmarks import examples as ex_lib
from benchmarks import stacks


def _measure(entries: dict, interleave: bool = False, warm: dict | None = None) -> dict:
  """Times every entry's windows: all of one entry's, then the next entry's (the default), or
  interleaved (window 1 of each, then window 2 of each, ...: benchmark.interleave).

  entries: name -> (stack, windows_batches, train, counts, examples or None), where
  counts(b) -> (real, padded) of a batch and train(batches) runs them. warm: name -> a
  callable run before that entry's first window (in turn: just before it; interleaved: all
  before any window); one that raises drops its entry, whose result is {"error": ...}.
  Each window starts with one untimed step of its first batch: flanjax's first step after a
  PyTorch chunk took ~1.5x its next ones, PyTorch's did not (`python -m
  benchmarks.bandwidth_step`, `first_step_ms`), and a training run never switches stacks.
  In turn, each stack's warm-up runs just before its own windows (the order of the runs
  before 2026-12-05). Interleaved, both stacks sample the same stretches of a host whose
  speed drifts, but in one process flanjax then always runs right after PyTorch."""
  warm = warm or {}
  failed = {}

  def warm_up(name):
    try:
      if name in warm:
        warm[name]()
    except Exception as e:  # pylint: disable=broad-except
      failed[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}

  timers = {name: common.Windows() for name in entries}
  tally = {name: [0, 0] for name in entries}
  n = max(len(e[1]) for e in entries.values())
  if interleave:
    for name in entries:
      warm_up(name)
  order = ([(w, name) for w in range(n) for name in entries] if interleave else
           [(w, name) for name in entries for w in range(n)])
  for w, name in order:
    if w == 0 and not interleave:
      warm_up(name)
    _, windows_batches, train, counts, _ = entries[name]
    if w >= len(windows_batches) or name in failed:
      continue
    wb = windows_batches[w]
    c = [counts(b) for b in wb]
    tally[name][0] += sum(x[0] for x in c)
    tally[name][1] += sum(x[1] for x in c)
    train(wb[:1])  # untimed (see above)
    timers[name].time(lambda wb=wb, train=train: train(wb), sum(x[0] for x in c))
  return {name: failed.get(name) or _result(entries[name][0], timers[name], entries[name][1],
                                            *tally[name], entries[name][4])
          for name in entries}


def _result(stack, w, windows_batches, real, padded, examples) -> dict:
  fig = w.summary()
  secs = sum(w.seconds)
  r = {"device": stack.device, "dtype": stack.dtype, "windows": fig["windows"],
       "steps": sum(len(wb) for wb in windows_batches), "seconds": round(secs, 3),
       "real_tokens": int(real), "padded_tokens": int(padded),
       # the figure: median over windows of real tokens / s (every position when padded)
       "real_tokens_per_s": fig["median"], "real_tokens_per_s_min": fig["min"],
       "real_tokens_per_s_max": fig["max"], "window_rates": fig["window_rates"],
       # every window's tokens over every window's seconds (the median's check)
       "real_tokens_per_s_overall": round(real / max(secs, 1e-9), 1),
       "non_padding_share": round(real / max(padded, 1), 4),
       "load_before": fig["load_before"], "load_after": fig["load_after"],
       "others_cpu_share": fig.get("others_cpu_share"),
       "steal_cpu_share": fig.get("steal_cpu_share"), "quiet": fig["quiet"]}
  if real == padded:  # every position real: the padded-token rate is the same figure
    r.update(tokens_per_s=fig["median"], tokens_per_s_min=fig["min"],
             tokens_per_s_max=fig["max"])
  else:
    r["tokens_per_s"] = round(padded / secs, 1)
  if examples is not None:
    r["examples"] = int(examples)
    r["examples_per_s"] = round(examples * fig["median"] / max(real, 1), 2)
  return r


def _split(batches, windows: int) -> list[list]:
  """Near-equal windows of steps, dealt out back and forth: 0, 1, .., w-1, w-1, .., 0, 0, ..

  Not consecutive runs: group_by_length's order is sorted by length (one megabatch
  holds all ~500 examples), so consecutive windows would each time one length band,
  and their median would be one band's rate, not the run's (3e1ebbb's PyTorch T5
  windows ran 3,828-6,595 tokens/s by band; their median 4,497, the whole run 5,522).
  Dealt back and forth, each window takes two of every 2w steps (one going, one coming
  back), and a sorted order gives every window about the same mix of lengths."""
  out = [[] for _ in range(windows)]
  for i, b in enumerate(batches):
    r = i % (2 * windows)
    out[r if r < windows else 2 * windows - 1 - r].append(b)
  return [w for w in out if w]


def _real_rows(rows, members, steady, batch_size, windows, real_examples):
  """Steady-state row indices covering >= real_examples examples, in whole steps
  (a multiple of `windows` of them), and one more step's rows for the warm-up."""
  good = [i for i, s in enumerate(steady) if s] or list(range(len(rows)))
  seen, k = 0, 0
  while k < len(good) and seen < real_examples:
    seen += len(members[good[k]])
    k += 1
  n_steps = -(-k // batch_size)
  n_steps = max(windows, -(-n_steps // windows) * windows)
  need = (n_steps + 1) * batch_size
  if seen < real_examples or len(good) < need:
    raise ValueError(f"the real-length benchmark needs {real_examples} examples in "
                     f"{need} steady-state rows; {len(good)} rows hold fewer: raise "
                     "benchmark.examples (the packer's first window of examples is skipped)")
  return good[:n_steps * batch_size], good[n_steps * batch_size:need]


def stack_steps(rows, indices, batch_size: int) -> list[dict]:
  """The rows at `indices`, in order, stacked into steps of batch_size rows."""
  return [stacks.stack_rows([rows[j] for j in indices[s:s + batch_size]], batch_size)
          for s in range(0, len(indices), batch_size)]


def run(cfg, examples, lengths: dict, batch_size: int, steps: int, warmup: int,
        torch_compile: bool, opt: stacks.AdamW, seed: int, log, vocab_ids: int,
        windows: int = 5, real_examples: int = 500, interleave: bool = False) -> dict:
  kind = stacks.packing_kind(cfg)
  name = stacks.family(cfg)
  out = {"kind": kind, "objective": "causal LM, loss on targets" if kind != "enc_dec"
         else "encoder-decoder, loss on targets"}
  fj = stacks.Flanjax(cfg, opt, seed)
  out["num_params"] = fj.num_params
  log(f"{name}: {fj.num_params / 1e6:.2f}M parameters; building the PyTorch twin")
  th = stacks.Torch(cfg, fj.params(), opt)
  out["torch"] = {"attn_implementation": th.attn_implementation, "device": th.device,
                  "dtype": th.dtype, "optimizer": f"torch.optim.AdamW ({th.optimizer_impl})"}
  out["flanjax"] = {"optimizer": "optax.adamw", "device": fj.device, "dtype": fj.dtype}

  # ---- the batches. Padded: one example of exactly inputs + targets tokens per row.
  fixed = ex_lib.fixed_examples(batch_size, lengths["inputs"], lengths["targets"], seed,
                                vocab_ids)
  rows, _, _ = stacks.pack_rows(fixed, lengths, kind)
  fj_batch = stacks.stack_rows(rows, batch_size)
  th_batch = th.batch(fixed)
  real, padded = stacks.flanjax_counts(fj_batch, kind)
  assert (real, padded) == th.counts(th_batch) == (padded, padded), (real, padded)
  # Real lengths: packed rows (flanjax), the same examples padded per batch (PyTorch).
  rows, members, steady = stacks.pack_rows(examples, lengths, kind)
  timed_rows, warm_rows = _real_rows(rows, members, steady, batch_size, windows,
                                     real_examples)
  fj_batches = stack_steps(rows, timed_rows, batch_size)
  fj_warm, = stack_steps(rows, warm_rows, batch_size)
  ids = sorted(i for j in timed_rows for i in members[j])  # the stream's (random) order
  warm_ids = sorted(i for j in warm_rows for i in members[j])
  per_step = max(1, int(round(len(ids) / len(fj_batches))))
  fj_counts = lambda b: stacks.flanjax_counts(b, kind)  # noqa: E731

  # Parity before any update, on the batches timed: the same loss on the same weights.
  first_ids = sorted(i for j in timed_rows[:batch_size] for i in members[j])
  par = {"flanjax_loss": fj.loss(fj_batch), "torch_loss": th.loss(th_batch),
         "flanjax_real_loss": fj.loss(fj_batches[0]),
         "torch_real_loss": th.loss(th.batch([examples[i] for i in first_ids]))}
  if kind != "enc_dec":
    par["torch_packed_loss"] = th.loss(th.packed_batch(fj_batches[0]))
  par = {k: round(v, 6) for k, v in par.items()}
  par["abs_diff"] = round(max(abs(par["flanjax_loss"] - par["torch_loss"]),
                              abs(par["flanjax_real_loss"] - par["torch_real_loss"]),
                              abs(par["flanjax_real_loss"]
                                  - par.get("torch_packed_loss", par["torch_real_loss"]))), 6)
  out["parity"] = par
  log(f"{name}: initial loss flanjax {par['flanjax_loss']:.5f}, PyTorch "
      f"{par['torch_loss']:.5f} (largest difference over the checked batches {par['abs_diff']})")

  # ---- padded: each stack warmed (compiled) before its windows (_measure)
  compile_s = {}

  def warm_flanjax():
    compile_s["flanjax"] = common.timed(lambda: fj.train([fj_batch]))[1]
    fj.train([fj_batch] * max(warmup - 1, 0))

  def warm_compiled():
    th.compile()
    compile_s["torch_compile"] = common.timed(lambda: th.train([th_batch], compiled=True))[1]
    th.train([th_batch] * max(warmup - 1, 0), compiled=True)

  padded = {"flanjax": (fj, [[fj_batch] * steps] * windows, fj.train, fj_counts, None),
            "torch_eager": (th, [[th_batch] * steps] * windows, th.train, th.counts, None)}
  warms = {"flanjax": warm_flanjax, "torch_eager": lambda: th.train([th_batch] * warmup)}
  if torch_compile:
    padded["torch_compile"] = (th, [[th_batch] * steps] * windows,
                               lambda bs: th.train(bs, compiled=True), th.counts, None)
    warms["torch_compile"] = warm_compiled
  padded_res = _measure(padded, interleave, warms)
  if "error" in padded_res["flanjax"]:
    raise RuntimeError(f"flanjax's padded step failed: {padded_res['flanjax']['error']}")
  padded_res["flanjax"]["compile_and_first_step_s"] = round(compile_s["flanjax"], 2)
  log(f"{name} padded: flanjax {padded_res['flanjax']['tokens_per_s']:,.0f} tok/s "
      f"(compile + first step {compile_s['flanjax']:.1f}s)")
  log(f"{name} padded: PyTorch eager {padded_res['torch_eager']['tokens_per_s']:,.0f} tok/s")
  if not torch_compile:
    padded_res["torch_compile"] = {"skipped": "torch_compile=False"}
  elif "error" in padded_res["torch_compile"]:
    log(f"{name} padded: torch.compile failed: {padded_res['torch_compile']['error']}")
  else:
    padded_res["torch_compile"]["compile_and_first_step_s"] = round(
        compile_s["torch_compile"], 2)
    log(f"{name} padded: PyTorch compiled "
        f"{padded_res['torch_compile']['tokens_per_s']:,.0f} tok/s "
        f"(compile + first step {compile_s['torch_compile']:.1f}s)")
  out["padded"] = padded_res

  # ---- real lengths
  fj_real = sum(fj_counts(b)[0] for b in fj_batches)
  real_res = {"examples": len(ids), "steps": len(fj_batches), "windows": windows,
              "torch_examples_per_step": per_step, "flanjax_rows_per_step": batch_size,
              "lengths": ex_lib.length_summary([examples[i] for i in ids])}
  real = {"flanjax_packed": (fj, _split(fj_batches, windows), fj.train, fj_counts, len(ids))}
  warms = {"flanjax_packed": lambda: fj.train([fj_warm])}
  orders = {"random": ids,
            "grouped": [ids[k] for k in stacks.grouped_order([examples[i] for i in ids],
                                                             per_step, seed, kind)]}
  th_warm = th.batch([examples[i] for i in warm_ids[:per_step]])
  for order, seq in orders.items():
    batches = [th.batch([examples[i] for i in seq[s:s + per_step]])
               for s in range(0, len(seq), per_step)]
    assert sum(th.counts(b)[0] for b in batches) == fj_real  # the same real tokens
    real[f"torch_eager_{order}"] = (th, _split(batches, windows), th.train, th.counts,
                                    len(ids))
    warms[f"torch_eager_{order}"] = lambda: th.train([th_warm])
  if kind != "enc_dec":
    packed = [th.packed_batch(b) for b in fj_batches]
    counts = dict(zip(map(id, packed), map(fj_counts, fj_batches)))
    real["torch_eager_packed"] = (th, _split(packed, windows), th.train,
                                  lambda b: counts[id(b)], len(ids))
    warms["torch_eager_packed"] = lambda: th.train([th.packed_batch(fj_warm)])
  real_res.update(_measure(real, interleave, warms))
  for k in real:
    if "error" in real_res[k]:
      raise RuntimeError(f"{name} real lengths, {k}: {real_res[k]['error']}")
  _log_real(log, name, "flanjax packed", real_res["flanjax_packed"])
  for order in orders:
    _log_real(log, name, f"PyTorch eager, {order} order", real_res[f"torch_eager_{order}"])
  if kind != "enc_dec":
    _log_real(log, name, "PyTorch eager, packed padding-free", real_res["torch_eager_packed"])
  else:
    real_res["torch_eager_packed"] = {
        "skipped": "transformers' T5 has no per-example (segment) masks for packed rows"}
  real_res["torch_compile"] = {"skipped": "dynamic shapes: a compiled model recompiles per "
                                          "batch shape"}
  out["real"] = real_res
  return out


def _log_real(log, name, what, r):
  log(f"{name} real: {what} {r['real_tokens_per_s']:,.0f} real tok/s "
      f"[{r['real_tokens_per_s_min']:,.0f}-{r['real_tokens_per_s_max']:,.0f}] "
      f"(share {r['non_padding_share']:.3f})")

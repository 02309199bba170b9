"""flanjax against Hugging Face PyTorch, both stacks in one run on one machine.

    python -m benchmarks.run                            # benchmarks/configs/cpu.gin
    python -m benchmarks.run --gin_file=benchmarks/configs/gpu.gin
    python -m benchmarks.run --gin.benchmark.steps=8 --gin.T5Config.d_model=512 --out=/tmp/b.json

Sections (benchmark.sections):
  train     training tokens/s, T5 v1.1 (T5Config) vs T5ForConditionalGeneration and the
            decoder-only model (DecoderConfig) vs LlamaForCausalLM: per padded token, and
            real tokens/s on the mixture's lengths (flanjax packed, PyTorch padded per batch)
  generate  greedy new tokens/s at batch 1 and 16 vs `generate`
  pipeline  examples/s from raw files to packed batches, beside what the trainer consumes
  mfu       on a GPU: MFU of T5-base, T5-large and a 1.1B decoder, bf16 ("no GPU" elsewhere)

Each figure is the median of `windows` (>= 5) timed windows, printed with its min and
max, and carries its device, dtype, the load average before and after and the share of
the CPU other processes took meanwhile; the table warns when the machine was not quiet.
Prints a markdown table with the ratios and writes JSON to
benchmarks/results/<name>.json (name: the platform, e.g. cpu) or --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import math
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Both stacks share one GPU in this process: JAX takes memory as it needs it instead of
# 75% up front, leaving PyTorch the rest.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import gin  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_GIN = os.path.join(HERE, "configs", "cpu.gin")
# Issue 20's targets (issue 7's 2.0x over randomly ordered padded batches kept beside them).
TARGETS = {"padded_vs_eager": 1.0, "real_vs_eager": 2.0, "real_vs_grouped": 1.5,
           "real_vs_packed": 1.0, "pipeline_vs_trainer": 5.0, "mfu_h100": 0.45}


@gin.configurable
def benchmark(
    sections=("train", "generate", "pipeline", "mfu"),
    models=("t5", "decoder"),
    t5_config=None,
    decoder_config=None,
    mixture: str = "flan_cot",  # or "synthetic": flan_cot-like lengths, no data needed
    vocab_size: int = 8000,
    lengths=None,
    batch_size: int = 4,
    steps: int = 2,
    windows: int = 5,
    real_examples: int = 500,
    warmup: int = 2,
    examples: int = 2200,
    torch_compile: bool = True,
    cold_inductor_cache: bool = True,
    learning_rate: float = 1e-4,
    seed: int = 0,
    gen_batch_sizes=(1, 16),
    gen_prompt_len: int = 128,
    gen_new_tokens: int = 32,
    gen_reps: int = 5,
    gen_min_window_s: float = 0.5,
    pipeline_batches: int = 100,
    pipeline_cold: bool = True,
    mfu_sizes=("t5_base", "t5_large", "decoder_1b"),
    mfu_steps: int = 10,
    mfu_overrides=None,
    mfu_force: bool = False,
    mfu_torch: bool = True,
    interleave: bool = False,
):
  """The settings of one run (gin: benchmark.*); returns them as a dict."""
  from flanjax.models import decoder, t5  # pylint: disable=g-import-not-at-top
  return dict(
      sections=tuple(sections), models=tuple(models),
      t5_config=t5_config or t5.T5Config(), decoder_config=decoder_config or decoder.DecoderConfig(),
      mixture=mixture, vocab_size=vocab_size,
      lengths=dict(lengths or {"inputs": 512, "targets": 128}), batch_size=batch_size,
      steps=steps, windows=windows, real_examples=real_examples, warmup=warmup,
      examples=examples, torch_compile=torch_compile,
      cold_inductor_cache=cold_inductor_cache, learning_rate=learning_rate, seed=seed,
      gen_batch_sizes=tuple(gen_batch_sizes), gen_prompt_len=gen_prompt_len,
      gen_new_tokens=gen_new_tokens, gen_reps=gen_reps,
      gen_min_window_s=gen_min_window_s, pipeline_batches=pipeline_batches,
      pipeline_cold=pipeline_cold, mfu_sizes=tuple(mfu_sizes), mfu_steps=mfu_steps,
      mfu_overrides=dict(mfu_overrides or {}), mfu_force=mfu_force,
      mfu_torch=mfu_torch, interleave=interleave)


def _vocab_sized(cfg, vocab_ids: int):
  if cfg.vocab_size == 0:  # as the trainer does: the vocabulary's, rounded up to 128
    return dataclasses.replace(cfg, vocab_size=int(math.ceil(vocab_ids / 128) * 128))
  if cfg.vocab_size < vocab_ids:
    raise ValueError(f"vocab_size {cfg.vocab_size} < the vocabulary's {vocab_ids}")
  return cfg


def _plain(x):
  if dataclasses.is_dataclass(x):
    return dataclasses.asdict(x)
  if isinstance(x, dict):
    return {str(k): _plain(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_plain(v) for v in x]
  return x


def run(settings: dict, log, command: str = "", save=None) -> dict:
  """The sections asked for; `save(partial_result)` after each MFU size (long GPU runs)."""
  from benchmarks import common, examples as ex_lib, stacks  # pylint: disable=g-import-not-at-top
  s = settings
  threads = stacks.torch_threads()
  if s["cold_inductor_cache"]:
    stacks.fresh_inductor_cache()
  result = {"command": command, "commit": common.commit(), "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "load_start": common.load(), "machine": common.machine(threads),
            "settings": _plain(s)}
  t_start = __import__("time").perf_counter()
  lengths = s["lengths"]

  # ---- the examples both stacks train on
  if s["mixture"] == "synthetic":
    vocab_ids = max(s["vocab_size"], 16)
    exs, vocab_ids, what = ex_lib.synthetic_examples(lengths, s["examples"], s["seed"], vocab_ids)
  elif "train" in s["sections"] or "pipeline" in s["sections"]:
    log(f"loading {s['examples']} examples of {s['mixture']} (vocabulary, tokenization cached)")
    exs, vocab_ids, what = ex_lib.mixture_examples(s["mixture"], lengths, s["examples"],
                                                   s["seed"], s["vocab_size"])
  else:
    exs, vocab_ids, what = [], s["vocab_size"], "none"
  result["data"] = {"source": what, "lengths": lengths}
  if exs:
    result["data"]["sample"] = ex_lib.length_summary(exs)
  cfgs = {"t5": _vocab_sized(s["t5_config"], vocab_ids),
          "decoder": _vocab_sized(s["decoder_config"], vocab_ids)}
  result["models"] = {m: _plain(cfgs[m]) for m in s["models"]}

  if "train" in s["sections"]:
    from benchmarks import train_bench  # pylint: disable=g-import-not-at-top
    result["train"] = {}
    for m in s["models"]:
      result["train"][m] = train_bench.run(
          cfgs[m], exs, lengths, s["batch_size"], s["steps"], s["warmup"], s["torch_compile"],
          stacks.AdamW(lr=s["learning_rate"]), s["seed"], log, vocab_ids,
          windows=s["windows"], real_examples=s["real_examples"], interleave=s["interleave"])
  if "generate" in s["sections"]:
    from benchmarks import gen_bench  # pylint: disable=g-import-not-at-top
    result["generate"] = {m: gen_bench.run(cfgs[m], s["gen_batch_sizes"], s["gen_prompt_len"],
                                           s["gen_new_tokens"], s["gen_reps"], s["seed"],
                                           vocab_ids, log, s["gen_min_window_s"])
                          for m in s["models"]}
  if "pipeline" in s["sections"]:
    if s["mixture"] == "synthetic":
      result["pipeline"] = {"skipped": "synthetic examples have no raw files"}
    else:
      from benchmarks import pipeline_bench  # pylint: disable=g-import-not-at-top
      result["pipeline"] = pipeline_bench.run(s["mixture"], lengths, s["batch_size"],
                                              s["pipeline_batches"], s["vocab_size"],
                                              s["pipeline_cold"], s["seed"], "enc_dec", log,
                                              s["windows"])
  if "mfu" in s["sections"]:
    from benchmarks import mfu  # pylint: disable=g-import-not-at-top
    on_size = None if save is None else (lambda m: save({**result, "mfu": m, "partial": True}))
    result["mfu"] = mfu.run(s["mfu_sizes"], s["mfu_steps"], s["warmup"], s["mfu_force"], log,
                            s["mfu_overrides"], windows=s["windows"],
                            torch_side=s["mfu_torch"], on_size=on_size)
  result["total_seconds"] = round(__import__("time").perf_counter() - t_start, 1)
  result["load_end"] = common.load()
  result["targets"] = targets(result)
  result["warnings"] = warnings(result)
  result["quiet"] = not any(w.startswith("WARNING") for w in result["warnings"])
  result["table"] = table(result)
  return result


# ---------------------------------------------------------------- report

def _get(d, *keys):
  for k in keys:
    if not isinstance(d, dict) or k not in d:
      return None
    d = d[k]
  return d


def _ratio(a, b):
  return round(a / b, 2) if a and b else None


def _packing_bound(tr: dict) -> str | None:
  """What packing alone can win over group_by_length: the ratio of the two non-padding shares.

  Beyond it a ratio to group_by_length needs flanjax faster per token, so a target above
  it asks the step for the rest; the note says how much, and how fast flanjax is per padded
  token on these very batches (the other factor of the ratio).
  """
  packed = _get(tr, "real", "flanjax_packed") or {}
  grouped = _get(tr, "real", "torch_eager_grouped") or {}
  ours, theirs = packed.get("non_padding_share"), grouped.get("non_padding_share")
  if not ours or not theirs:
    return None
  bound = ours / theirs
  note = (f"group_by_length's batches are {theirs:.0%} real tokens, flanjax's packed rows "
          f"{ours:.0%}: packing alone gains at most {bound:.2f}x over them, so "
          f"{TARGETS['real_vs_grouped']}x needs flanjax "
          f"{TARGETS['real_vs_grouped'] / bound:.2f}x faster per token")
  # Grouped rows are as long as their batch's longest example, packed rows the full length,
  # and attention costs more per token in a longer row: this factor sits below the padded
  # benchmark's.
  ours_tps, theirs_tps = packed.get("real_tokens_per_s"), grouped.get("real_tokens_per_s")
  rows = _get(tr, "real", "flanjax_rows_per_step")
  if (ours_tps and theirs_tps and rows and packed.get("steps") and packed.get("padded_tokens")
      and grouped.get("examples") and grouped.get("padded_tokens")):
    per_token = (ours_tps / ours) / (theirs_tps / theirs)
    note += (f"; per padded token on these batches flanjax runs {per_token:.2f}x PyTorch's "
             f"grouped step (its packed rows {packed['padded_tokens'] / packed['steps'] / rows:.0f}"
             f" tokens, the grouped rows {grouped['padded_tokens'] / grouped['examples']:.0f} on "
             "average)")
  return note


def targets(r: dict) -> list[dict]:
  """Each target of issue 20 (and issue 7's) with the measured value and whether it is met."""
  out = []
  on_cpu = _get(r, "machine", "platform") == "cpu"

  def add(target, num, den, goal, note=None):
    v = _ratio(num, den)
    t = {"target": target, "value": v, "met": None if v is None else v >= goal}
    if note:
      t["note"] = note
    out.append(t)

  for m in ("t5", "decoder"):
    tr = _get(r, "train", m)
    if not tr:
      continue
    ours = _get(tr, "real", "flanjax_packed", "real_tokens_per_s")
    add(f"{m}: tokens/s per padded token >= {TARGETS['padded_vs_eager']}x PyTorch eager"
        + ("" if on_cpu else " (target is for CPU)"),
        _get(tr, "padded", "flanjax", "tokens_per_s"),
        _get(tr, "padded", "torch_eager", "tokens_per_s"), TARGETS["padded_vs_eager"])
    if _get(tr, "real", "torch_eager_grouped"):
      add(f"{m}: real tokens/s on the mixture's lengths >= {TARGETS['real_vs_grouped']}x "
          "PyTorch eager with group_by_length", ours,
          _get(tr, "real", "torch_eager_grouped", "real_tokens_per_s"),
          TARGETS["real_vs_grouped"], _packing_bound(tr))
    packed = _get(tr, "real", "torch_eager_packed") or {}
    if packed:
      add(f"{m}: real tokens/s on the mixture's lengths >= {TARGETS['real_vs_packed']}x "
          "PyTorch eager on the same packed rows (padding-free)", ours,
          packed.get("real_tokens_per_s"), TARGETS["real_vs_packed"], packed.get("skipped"))
    add(f"{m}: real tokens/s on the mixture's lengths >= {TARGETS['real_vs_eager']}x PyTorch "
        "eager, batches padded in random order (issue 7)", ours,
        _get(tr, "real", "torch_eager_random", "real_tokens_per_s"), TARGETS["real_vs_eager"])
  pipe = _get(r, "pipeline", "warm", "examples_per_s")
  trainer = _get(r, "train", "t5", "real", "flanjax_packed", "examples_per_s")
  if pipe and trainer:
    add(f"data pipeline >= {TARGETS['pipeline_vs_trainer']}x what the T5 trainer consumes "
        "(examples/s)", pipe, trainer, TARGETS["pipeline_vs_trainer"])
  mfu = r.get("mfu") or {}
  if "skipped" in mfu:
    out.append({"target": f"H100: MFU >= {TARGETS['mfu_h100']:.0%} at the largest size that fits",
                "value": None, "met": None, "note": mfu["skipped"]})
  elif mfu:
    vals = [(k, v["mfu"]) for k, v in mfu.items() if isinstance(v, dict) and v.get("mfu")]
    for name, v in vals:
      out.append({"target": f"MFU >= {TARGETS['mfu_h100']:.0%} ({name}, {mfu.get('device')})",
                  "value": v, "met": v >= TARGETS["mfu_h100"]})
      sp = _get(mfu, name, "speedup_vs_torch")
      if sp:
        out.append({"target": f"{name}: train step >= 1.0x PyTorch eager on the same GPU",
                    "value": sp, "met": sp >= 1.0})
  return out


def _fmt(x, unit=""):
  if x is None:
    return "n/a"
  if isinstance(x, float) and x < 100:
    return f"{x:.2f}{unit}"
  return f"{x:,.0f}{unit}"


def _mfu_cell(side: dict) -> str:
  """MFU at the median window, with the windows' range; or the side's error."""
  if side.get("mfu") is None:
    return side.get("error", "n/a")[:60]
  s = side["steps_per_s"]
  scale = side["mfu"] * side["seconds_per_step"]  # MFU per step/s
  return f"{side['mfu']:.1%} [{scale * s['min']:.1%}-{scale * s['max']:.1%}]"


def _x(x):
  return "n/a" if x is None else f"**{x:.2f}x**"


def _cell(fig, key):
  """'median [min-max]' of a figure (min and max where the figure has them)."""
  v = _get(fig, key)
  lo, hi = _get(fig, key + "_min"), _get(fig, key + "_max")
  if v is None or lo is None:
    return _fmt(v)
  return f"{_fmt(v)} [{_fmt(lo)}-{_fmt(hi)}]"


def _figures(r: dict):
  """Every timed figure of a result (a dict with a device and a median)."""
  for sec in ("train", "generate"):
    for part in (r.get(sec) or {}).values():
      for group in part.values():
        if isinstance(group, dict):
          yield from (f for f in group.values() if isinstance(f, dict) and "quiet" in f)
  warm = _get(r, "pipeline", "warm")
  if isinstance(warm, dict) and "quiet" in warm:
    yield warm


def warnings(r: dict) -> list[str]:
  """Why the figures of a run may not hold: a busy machine, too few windows or examples."""
  from benchmarks import common  # pylint: disable=g-import-not-at-top
  out = []
  if not common.quiet_start(r.get("load_start")):
    out.append(f"WARNING: the machine was not quiet: load average {r.get('load_start')} at "
               f"start (over {common.QUIET_LOAD} x cores); these figures are loaded, not "
               "to be quoted")
  loud = [f for f in _figures(r) if not f["quiet"]]
  if loud:
    busy = max(f.get("others_cpu_share") for f in loud)
    steal = max(f.get("steal_cpu_share") or 0.0 for f in loud)
    out.append(f"WARNING: the machine was not quiet: other processes took up to "
               f"{busy:.0%} of the CPU during {len(loud)} figure(s)' windows (over "
               f"{common.QUIET_OTHERS:.0%}; the hypervisor's steal for other virtual machines "
               f"up to {steal:.0%}); these figures are loaded, not to be quoted")
  n = _get(r, "settings", "windows")
  if n is not None and n < 5:
    out.append(f"note: {n} timed windows per figure (5 or more for a figure to quote)")
  for m in ("t5", "decoder"):
    ex = _get(r, "train", m, "real", "examples")
    if ex is not None and ex < 500:
      out.append(f"note: {m} real-length figures on {ex} examples (500 or more to quote)")
  return out


def table(r: dict) -> str:
  lines = ["Figures: median [min-max] over the timed windows.", "",
           "| measure | flanjax | PyTorch eager | PyTorch compiled | flanjax / eager | "
           "flanjax / compiled |", "| --- | ---: | ---: | ---: | ---: | ---: |"]

  def row(name, ours, eager, comp, key):
    lines.append(f"| {name} | {_cell(ours, key)} | {_cell(eager, key)} | {_cell(comp, key)} | "
                 f"{_x(_ratio(_get(ours, key), _get(eager, key)))} | "
                 f"{_x(_ratio(_get(ours, key), _get(comp, key)))} |")

  label = {"t5": "T5", "decoder": "decoder (Llama, causal both sides)"}
  mixture = _get(r, "settings", "mixture")
  for m in ("t5", "decoder"):
    tr = _get(r, "train", m)
    if not tr:
      continue
    p = tr["padded"]
    row(f"{label[m]} train, tokens/s per padded token", p.get("flanjax"),
        p.get("torch_eager"), p.get("torch_compile"), "tokens_per_s")
    q = tr["real"]
    for order, what in (("random", "padded per batch, random batches"),
                        ("grouped", "padded per batch, group_by_length"),
                        ("packed", "PyTorch on the same packed rows, padding-free")):
      if "skipped" in (q.get(f"torch_eager_{order}") or {}):
        continue
      row(f"{label[m]} train, real tokens/s on {mixture} lengths (flanjax packed vs {what})",
          q.get("flanjax_packed"), q.get(f"torch_eager_{order}"), None, "real_tokens_per_s")
  for m in ("t5", "decoder"):
    g = _get(r, "generate", m)
    if not g:
      continue
    for k in sorted((k for k in g if k.startswith("batch_")), key=lambda k: int(k[6:])):
      row(f"{label[m]} greedy generation, new tokens/s, batch {k[6:]}",
          _get(g, k, "flanjax"), _get(g, k, "torch_eager"), None, "tokens_per_s")
  lines.append("")
  lines.append("| other | value |")
  lines.append("| --- | ---: |")
  for m in ("t5", "decoder"):
    tr = _get(r, "train", m)
    if not tr:
      continue
    q = tr["real"]
    lines.append(f"| {label[m]}: device / dtype, flanjax; PyTorch | "
                 f"{_get(tr, 'flanjax', 'device')} / {_get(tr, 'flanjax', 'dtype')}; "
                 f"{_get(tr, 'torch', 'device')} / {_get(tr, 'torch', 'dtype')} |")
    lines.append(f"| {label[m]}: real-length examples per stack, steps, windows | "
                 f"{q.get('examples')}, {q.get('steps')}, {q.get('windows')} |")
    lines.append(f"| {label[m]}: non-padding share, flanjax packed / PyTorch random / "
                 f"grouped | {_fmt(_get(q, 'flanjax_packed', 'non_padding_share'))} / "
                 f"{_fmt(_get(q, 'torch_eager_random', 'non_padding_share'))} / "
                 f"{_fmt(_get(q, 'torch_eager_grouped', 'non_padding_share'))} |")
    lines.append(f"| {label[m]}: compile + first step, flanjax (XLA) / torch.compile (s) | "
                 f"{_fmt(_get(tr, 'padded', 'flanjax', 'compile_and_first_step_s'))} / "
                 f"{_fmt(_get(tr, 'padded', 'torch_compile', 'compile_and_first_step_s'))} |")
    lines.append(f"| {label[m]}: initial loss on the timed batches, flanjax / PyTorch "
                 f"(same weights; largest difference) | {_get(tr, 'parity', 'flanjax_loss')} / "
                 f"{_get(tr, 'parity', 'torch_loss')} ({_get(tr, 'parity', 'abs_diff')}) |")
  pipe = r.get("pipeline") or {}
  trainer = _get(r, "train", "t5", "real", "flanjax_packed", "examples_per_s")
  if "warm" in pipe:
    lines.append(f"| data pipeline, cache -> packed batches (examples/s) | "
                 f"{_cell(pipe['warm'], 'examples_per_s')} |")
    if "cold" in pipe:
      lines.append(f"| data pipeline, raw files -> tokenized, first run (examples/s) | "
                   f"{_fmt(pipe['cold']['examples_per_s'])} |")
    if trainer:
      lines.append(f"| T5 trainer consumes (examples/s) | {_fmt(trainer)} |")
      lines.append(f"| pipeline / trainer | {_x(_ratio(pipe['warm']['examples_per_s'], trainer))} |")
  mfu = r.get("mfu") or {}
  if "skipped" in mfu:
    lines.append(f"| MFU (bf16, GPU) | {mfu['skipped']} |")
  for k, v in mfu.items():
    if isinstance(v, dict) and isinstance(v.get("flanjax"), dict):
      fj, th = v["flanjax"], v.get("torch")
      twin = _mfu_cell(th) if th else (f"as {v['torch_of']}" if "torch_of" in v else "not run")
      cells = [_mfu_cell(fj), twin, _x(v.get("speedup_vs_torch"))]
      lines.append(f"| MFU {k}, batch {v['batch']}, bf16: flanjax / PyTorch eager / speed-up | "
                   + " / ".join(cells) + " |")
    elif isinstance(v, dict) and "error" in v:
      lines.append(f"| MFU {k} | {v['error'][:80]} |")
  lines.append("")
  lines.append("Targets:")
  for t in r.get("targets", []):
    mark = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
    val = "" if t["value"] is None else f" ({t['value']:.2f}" + (
        ")" if "MFU" not in t["target"] else "")
    lines.append(f"- {t['target']}: {mark}{val}" + (f" - {t['note']}" if t.get("note") else ""))
  m = r.get("machine", {})
  lines.append("")
  lines.append(f"Machine: {m.get('device')} ({m.get('platform')}), {m.get('cpu')}, "
               f"{m.get('cores')} cores; torch threads {_get(m, 'threads', 'torch_intra_op')}; "
               f"load average (1/5/15 min) {r.get('load_start')} at start, {r.get('load_end')} "
               f"at end; {r.get('total_seconds')} s in all.")
  warn = warnings(r)
  if warn:
    lines.append("")
    lines.extend(warn)
  return "\n".join(lines)


# ---------------------------------------------------------------- command line

def main(argv=None):
  from flanjax import config as flan_config  # pylint: disable=g-import-not-at-top
  # Registers T5Config and DecoderConfig with gin before the files are parsed.
  from flanjax.models import decoder, t5  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  from benchmarks import common  # pylint: disable=g-import-not-at-top
  argv = sys.argv[1:] if argv is None else list(argv)

  def go():
    gargs = flan_config.parse_args(argv)
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run")
    ap.add_argument("--out", help="JSON path (default benchmarks/results/<name>.json)")
    ap.add_argument("--name", help="result name (default: the platform, e.g. cpu)")
    ap.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    opts = ap.parse_args(gargs.rest)
    if not gargs.files:
      gargs.files = [DEFAULT_GIN]
    gargs.search_paths = list(gargs.search_paths) + [os.path.join(HERE, "configs")]
    # Not locked: flanjax modules imported later register their own configurables.
    flan_config.parse_gin(gargs, finalize=False)
    settings = benchmark()
    log = common.Log(opts.quiet)
    # seqio warns on every in-memory source it builds; the benchmark reads them once.
    logging.getLogger("absl").setLevel(logging.ERROR)
    command = "python -m benchmarks.run " + " ".join(argv)
    save = None if not opts.out else (lambda partial: common.write_json(opts.out, partial))
    result = run(settings, log, command.strip(), save)
    name = opts.name or result["machine"]["platform"]
    out = opts.out or os.path.join(HERE, "results", f"{name}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=1)
    print(result["table"])
    print(f"\nwritten: {out}")
    return 0

  flan_config.guarded(go, "benchmarks.run")


if __name__ == "__main__":
  main()

"""Measured proposals for the decoder's train step, A/B against what ships, at the benchmark size.

    python -m benchmarks.variants                  # cpu.gin's decoder, batch 4 x 640
    python -m benchmarks.variants --windows=7 --out=/tmp/v.json

Variants are timed in interleaved windows (A, B, C, A, B, C, ...), so a machine
whose load drifts slows them alike; each figure is the median ms per step over
the windows, with min and max, and its ratio to the first variant.

  step/attention_impl=*   the real flanjax step (trainer's jitted step, AdamW) with
                          DecoderConfig.attention_impl 'reference' (what the
                          default 'auto' runs on a CPU),
                          'dot_product' (jax.nn.dot_product_attention), 'blockwise'
  proxy/qkv_*             forward + backward of the q, k, v projections alone (pure
                          JAX, the decoder's shapes): three einsums as the model does
                          them vs one fused [d, (h + 2 kv) * k] matmul split after
  proxy/layout_*          attention (scores, softmax, mixing, output projection) with
                          q kept [b, l, h, k] as the model does vs projected straight
                          into [b, h, l, k] (no transposes around the attention dots)
  proxy/gqa_*             attention scores and mixing with grouped-query heads:
                          key/value heads repeated to the query heads (HF's
                          repeat_kv) vs queries grouped per kv head (no copy)
  choice/*                the real step as it ships vs with one of its choices
                          undone: dense=xla (XLA's own kernel gradients instead of
                          dense.py's custom VJP), query_block=all (the reference
                          attention's scores in one block over all keys instead of
                          ~160-query blocks that skip keys past a causal block),
                          output_chunk=0 (logits at every position, then the loss,
                          instead of the output layer inside the loss at loss
                          positions only: losses.output_cross_entropy),
                          update_skip=select (a non-finite step's update undone by
                          a select over every parameter and moment instead of
                          skipped by a conditional: trainer._update_if),
                          softmax_values=off (the reference attention's softmax
                          by jax.nn.softmax and its gradient, then the values dot,
                          instead of attention._softmax_values),
                          loss_single_pass=off (rows no longer than a loss chunk
                          sorted loss positions first and taken through the chunked
                          loop, instead of every position in one pass),
                          post_gradient=separate (the gradients divided by the loss
                          weight after differentiating and their norm by
                          optax.tree.norm, instead of the loss divided before and
                          the norm by trainer.global_norm's dots),
                          rope_lookup=off (the decoder's RoPE cos and sin computed
                          from the positions in the step, instead of looked up from
                          tables made at trace time: decoder.rope_tables),
                          loss_rows=each (each row's loss positions taken a chunk
                          at a time, so every row runs as many chunks as the row
                          with the most, instead of a device's rows' positions
                          sorted together: losses.GROUP_ROWS),
                          keys_major=off (the reference attention's scores laid
                          out [b, h, queries, keys] instead of keys-major:
                          attention.KEYS_MAJOR),
                          narrow_b=transposed (a narrow-output kernel's gradient
                          x^T dy with dy transposed first, instead of one dot
                          reading x transposed: dense.NARROW_B_PLAIN); --choices picks
                          some; --rows=flan_cot times them on the step
                          benchmark's real packed rows instead of full ones
  post/*                  the step's part after differentiating alone
                          (trainer.apply_gradients: gradient norm, non-finite check,
                          AdamW), as it ships vs POST_GRADIENT "separate"
  eval/output_chunk=*     the validation step (loss and token accuracy,
                          trainer.make_eval_step) with logits at loss positions only
                          (128, ships) vs at every position (0); with each one's XLA
                          temporary memory

  flags/*                 the shipped step under other XLA:CPU flags, each in its own
                          process (XLA reads XLA_FLAGS once, at start): processes
                          alternate (A, B, C, A, B, C, ... for --rounds rounds) and
                          each figure pools every window of its processes; the
                          per-process medians are kept beside it. Every set keeps
                          flanjax's YNNPACK-off default (flanjax/__init__.py);
                          huge_pages=off is the shipped flags in a process without
                          glibc's huge pages for malloc's large blocks

    python -m benchmarks.variants --model=t5 --parts=choice   # T5's step (4 x 512 + 128)
    python -m benchmarks.variants --parts=flags --rounds=3 --out=benchmarks/results/variants_flags_decoder.json
    python -m benchmarks.variants --parts=eval --out=benchmarks/results/variants_eval_decoder.json
    python -m benchmarks.variants --model=t5 --parts=flags --flag_sets=huge_pages=off --rounds=3
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402


def _figure(window_ms: list) -> dict:
  """Median, min and max ms of a figure's windows, and the windows in the order run."""
  ms = sorted(window_ms)
  return {"ms": round(float(np.median(ms)), 2), "ms_min": round(ms[0], 2),
          "ms_max": round(ms[-1], 2), "windows": len(ms),
          "window_ms": [round(x, 2) for x in window_ms]}


def _add_ratios(out: dict, base: str) -> dict:
  """Each measured figure's vs_first: its median over the `base` figure's."""
  ms = out[base].get("ms")
  for v in out.values():
    if "ms" in v and ms:
      v["vs_first"] = round(v["ms"] / ms, 3)
  return out


def _interleaved(fns: dict, windows: int, per_window: int) -> dict:
  """{name: median/min/max ms per call} of callables timed in interleaved windows."""
  from benchmarks import common  # pylint: disable=g-import-not-at-top
  for f in fns.values():
    f()  # compile and warm up
  w = {k: common.Windows() for k in fns}
  for _ in range(windows):
    for k, f in fns.items():
      w[k].time(lambda f=f: [f() for _ in range(per_window)], per_window)
  out = {}
  for k, win in w.items():
    s = win.summary()
    out[k] = {**_figure([1e3 * t / per_window for t in win.seconds]),
              "others_cpu_share": s.get("others_cpu_share"),
              "steal_cpu_share": s.get("steal_cpu_share"), "quiet": s["quiet"]}
  return _add_ratios(out, next(iter(out)))


def step_variants(cfg, batch, impls) -> dict:
  from benchmarks import stacks  # pylint: disable=g-import-not-at-top
  fns = {}
  for impl in impls:
    fj = stacks.Flanjax(dataclasses.replace(cfg, attention_impl=impl), stacks.AdamW())
    fns[f"step/attention_impl={impl}"] = lambda fj=fj: fj.train([batch])
  return fns


def _first_call_under(setting, f):
  """f, whose first call (the trace and compile) runs under the context `setting()`."""
  traced = []

  def g():
    if traced:
      return f()
    with setting():
      out = f()
    traced.append(True)
    return out

  return g


@contextlib.contextmanager
def _setting(module: str, name: str, value):
  """One of flanjax's module-level settings, changed while the traces inside run."""
  import importlib  # pylint: disable=g-import-not-at-top
  mod = importlib.import_module(module)
  old = getattr(mod, name)
  setattr(mod, name, value)
  try:
    yield
  finally:
    setattr(mod, name, old)


CHOICES = ("dense=xla", "query_block=all", "output_chunk=0", "update_skip=select",
           "softmax_values=off", "loss_single_pass=off", "post_gradient=separate",
           "rope_lookup=off", "loss_rows=each", "keys_major=off", "narrow_b=transposed")


def flan_cot_rows(cfg, batch_size: int, inputs: int, targets: int) -> list[dict]:
  """The step benchmark's real-length batches (benchmarks.run, train section): steady-state
  packed rows of 2,200 flan_cot examples, at least 500 examples' worth, in the stream's order."""
  from benchmarks import examples as ex_lib, stacks, train_bench  # pylint: disable=g-import-not-at-top
  lengths = {"inputs": inputs, "targets": targets}
  exs, _, _ = ex_lib.mixture_examples("flan_cot", lengths, 2200, 0, 8000)
  rows, members, steady = stacks.pack_rows(exs, lengths, stacks.packing_kind(cfg))
  try:
    timed, _ = train_bench._real_rows(rows, members, steady, batch_size, 5, 500)  # pylint: disable=protected-access
  except ValueError as e:
    raise SystemExit(f"benchmarks.variants --rows=flan_cot: {e}") from None
  return train_bench.stack_steps(rows, timed, batch_size)


def _cycle(batches):
  """A callable giving the batches in turn, from the first again after the last."""
  return itertools.cycle(batches).__next__


def choice_variants(cfg, batch, only=None) -> dict:
  """The shipped step and the step with one of this project's CPU choices undone
  (`only`: those of CHOICES, the shipped step always). batch: one batch, or a list
  that each variant steps through in the same order."""
  from benchmarks import stacks  # pylint: disable=g-import-not-at-top
  from flanjax.models import dense  # pylint: disable=g-import-not-at-top
  settings = {"choice/shipped": contextlib.nullcontext,
              "choice/dense=xla": lambda: dense.mode("xla"),
              "choice/query_block=all": lambda: _setting("flanjax.models.attention",
                                                         "QUERY_BLOCK", 1 << 30),
              "choice/output_chunk=0": contextlib.nullcontext,
              "choice/update_skip=select": lambda: _setting("flanjax.training.trainer",
                                                            "UPDATE_SKIP", "select"),
              "choice/softmax_values=off": lambda: _setting("flanjax.models.attention",
                                                            "SOFTMAX_VALUES", False),
              "choice/loss_single_pass=off": lambda: _setting("flanjax.training.losses",
                                                              "SINGLE_PASS", False),
              "choice/post_gradient=separate": lambda: _setting(
                  "flanjax.training.trainer", "POST_GRADIENT", "separate"),
              "choice/rope_lookup=off": lambda: _setting("flanjax.models.decoder",
                                                         "ROPE_LOOKUP", False),
              "choice/loss_rows=each": lambda: _setting("flanjax.training.losses",
                                                        "GROUP_ROWS", False),
              "choice/keys_major=off": lambda: _setting("flanjax.models.attention",
                                                        "KEYS_MAJOR", False),
              "choice/narrow_b=transposed": lambda: _setting("flanjax.models.dense",
                                                             "NARROW_B_PLAIN", False)}
  if only:
    settings = {k: v for k, v in settings.items()
                if k == "choice/shipped" or k.split("/", 1)[1] in only}
  fns = {}
  for name, setting in settings.items():
    fj = stacks.Flanjax(cfg, stacks.AdamW(), output_chunk=0 if "output_chunk" in name else None)
    nxt = _cycle(batch if isinstance(batch, list) else [batch])
    fns[name] = _first_call_under(setting, lambda fj=fj, nxt=nxt: fj.train([nxt()]))
  return fns


def post_gradient_variants(cfg) -> dict:
  """The train step's part after differentiating (trainer.apply_gradients: the gradient
  norm, the non-finite check and AdamW's update) alone, on the model's parameters, as it
  ships (the loss divided before differentiating, trainer.global_norm) and with
  POST_GRADIENT "separate" (the gradients divided here, optax.tree.norm)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from benchmarks import stacks  # pylint: disable=g-import-not-at-top
  from flanjax.training import trainer  # pylint: disable=g-import-not-at-top
  opt = stacks.AdamW()
  tx = opt.optax()
  fns = {}
  for name, value in (("post/shipped", "fused"), ("post/post_gradient=separate", "separate")):
    state = stacks.Flanjax(cfg, opt).state
    grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), state["params"])
    with _setting("flanjax.training.trainer", "POST_GRADIENT", value):
      f = jax.jit(lambda p, o, g: trainer.apply_gradients(tx, g, p, o, jnp.float32(1.0),
                                                          jnp.float32(3.0))[:2],
                  donate_argnums=(0, 1)).lower(state["params"], state["opt_state"],
                                               grads).compile()
    box = {"p": state["params"], "o": state["opt_state"]}

    def run(f=f, box=box, grads=grads):
      box["p"], box["o"] = f(box["p"], box["o"], grads)
      jax.block_until_ready(box["p"])

    fns[name] = run
  return fns


def proxy_variants(cfg, b: int, s: int) -> dict:
  """{name: (jitted gradient, its arguments)}: each pair computes the same gradients."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  d, h, kv, k = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((b, s, d)), jnp.float32)
  wq, wk, wv = (jnp.asarray(rng.standard_normal((d, n, k)) * d ** -0.5, jnp.float32)
                for n in (h, kv, kv))
  wqkv = jnp.concatenate([wq, wk, wv], axis=1)

  def separate(w, x):
    q = jnp.einsum("bld,dhk->blhk", x, w[0])
    kk = jnp.einsum("bld,dhk->blhk", x, w[1])
    v = jnp.einsum("bld,dhk->blhk", x, w[2])
    return jnp.sum(q * q) + jnp.sum(kk * v)

  def fused(w, x):
    qkv = jnp.einsum("bld,dhk->blhk", x, w)
    q, kk, v = qkv[:, :, :h], qkv[:, :, h:h + kv], qkv[:, :, h + kv:]
    return jnp.sum(q * q) + jnp.sum(kk * v)

  q = jnp.asarray(rng.standard_normal((b, s, h, k)), jnp.float32)
  kv_ = jnp.asarray(rng.standard_normal((b, s, kv, k)), jnp.float32)
  mask = jnp.tril(jnp.ones((s, s), bool))

  def repeated(q, kk):
    kr = jnp.repeat(kk, h // kv, axis=2)
    p = jax.nn.softmax(jnp.where(mask, jnp.einsum("bqhk,bthk->bhqt", q, kr), -1e9), -1)
    return jnp.sum(jnp.einsum("bhqt,bthk->bqhk", p, kr))

  def grouped(q, kk):
    qg = q.reshape(b, s, kv, h // kv, k)
    p = jax.nn.softmax(jnp.where(mask, jnp.einsum("bqgjk,btgk->bgjqt", qg, kk), -1e9), -1)
    return jnp.sum(jnp.einsum("bgjqt,btgk->bqgjk", p, kk))

  wq_full = jnp.asarray(rng.standard_normal((d, h, k)) * d ** -0.5, jnp.float32)
  wo = jnp.asarray(rng.standard_normal((h, k, d)) * (h * k) ** -0.5, jnp.float32)

  def heads_inner(w, x):  # as the model lays them out: [b, l, h, k] around [b, h, q, t]
    q = jnp.einsum("bld,dhk->blhk", x, w[0])
    p = jax.nn.softmax(jnp.where(mask, jnp.einsum("bqhk,bthk->bhqt", q, q), -1e9), -1)
    return jnp.sum(jnp.einsum("bqhk,hkd->bqd", jnp.einsum("bhqt,bthk->bqhk", p, q), w[1]) ** 2)

  def heads_outer(w, x):  # projected straight into [b, h, l, k]
    q = jnp.einsum("bld,dhk->bhlk", x, w[0])
    p = jax.nn.softmax(jnp.where(mask, jnp.einsum("bhqk,bhtk->bhqt", q, q), -1e9), -1)
    return jnp.sum(jnp.einsum("bhqk,hkd->bqd", jnp.einsum("bhqt,bhtk->bhqk", p, q), w[1]) ** 2)

  return {"proxy/layout_blhk": (jax.jit(jax.grad(heads_inner)), ((wq_full, wo), x)),
          "proxy/layout_bhlk": (jax.jit(jax.grad(heads_outer)), ((wq_full, wo), x)),
          "proxy/qkv_separate": (jax.jit(jax.grad(separate)), ((wq, wk, wv), x)),
          "proxy/qkv_fused": (jax.jit(jax.grad(fused)), (wqkv, x)),
          "proxy/gqa_repeat_kv": (jax.jit(jax.grad(repeated, argnums=(0, 1))), (q, kv_)),
          "proxy/gqa_grouped": (jax.jit(jax.grad(grouped, argnums=(0, 1))), (q, kv_))}


def eval_variants(cfg, batch) -> tuple[dict, dict]:
  """The validation step at output_chunk 128 (ships) and 0: callables, and MiB of XLA temps."""
  import jax  # pylint: disable=g-import-not-at-top
  from benchmarks import stacks  # pylint: disable=g-import-not-at-top
  from flanjax.training import trainer  # pylint: disable=g-import-not-at-top
  fj = stacks.Flanjax(cfg, stacks.AdamW())
  params = fj.state["params"]
  fns, temp = {}, {}
  for chunk in (128, 0):
    f = jax.jit(trainer.make_eval_step(fj.model, token_accuracy=True, output_chunk=chunk))
    name = f"eval/output_chunk={chunk}"
    mem = f.lower(params, batch).compile().memory_analysis()
    temp[name] = round(mem.temp_size_in_bytes / 2 ** 20, 1) if mem is not None else None
    fns[name] = lambda f=f: jax.block_until_ready(f(params, batch))
  return fns, temp


FLAG_SETS = {
    "shipped": "",
    "tree_reduction_rewriter=off": "--xla_disable_hlo_passes=tree_reduction_rewriter",
    "onednn_dot": "--xla_cpu_experimental_onednn_fusion_type=dot",
    "xnnpack": "--xla_cpu_use_xnnpack=true",
    # XLA:CPU's loops use 256-bit vectors by default, also on AVX-512 hosts.
    "vector_width=512": "--xla_cpu_prefer_vector_width=512",
    # Not an XLA flag: the process without glibc's huge pages for malloc's large blocks
    # (flanjax/__init__.py asks for them in a command's process); see _child_env.
    "huge_pages=off": "",
}


def _child_flags(flags: str) -> str:
  """XLA_FLAGS of a flag set's process: this process's (the user's, with flanjax's
  YNNPACK-off default that `import flanjax` added) and then the set's own."""
  return f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()


def _child_env(name: str, flags: str) -> dict:
  """The environment of a flag set's process: XLA_FLAGS as _child_flags says; for
  huge_pages=off also without glibc.malloc.hugetlb (which this process's own start put
  into GLIBC_TUNABLES, and a child inherits) and with flanjax's opt-out."""
  env = dict(os.environ, XLA_FLAGS=_child_flags(flags))
  if name == "huge_pages=off":
    kept = [t for t in env.get("GLIBC_TUNABLES", "").split(":")
            if t and not t.startswith("glibc.malloc.hugetlb")]
    env["GLIBC_TUNABLES"] = ":".join(kept)
    env["FLANJAX_HUGE_PAGES"] = "0"
  return env


def flag_variants(a, flag_sets: dict) -> dict:
  """The shipped step under each XLA flag set, in alternating child processes.

  A set whose process fails (XLA crashed, or it ran past --child_timeout) is recorded
  with its round and takes no further rounds; what its earlier processes measured
  is kept."""
  import json  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  runs = {k: [] for k in flag_sets}
  failed = {}
  for r in range(a.rounds):
    for name, flags in flag_sets.items():
      if name in failed:
        continue
      with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [sys.executable, "-m", "benchmarks.variants", f"--model={a.model}",
               "--parts=shipped", f"--batch={a.batch}", f"--inputs={a.inputs}",
               f"--targets={a.targets}", f"--windows={a.windows}", f"--steps={a.steps}",
               f"--out={f.name}"]
        env = _child_env(name, flags)
        try:
          p = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False,
                             timeout=a.child_timeout)
          why = None if p.returncode == 0 else (
              f"the process exited {p.returncode}: "
              + (p.stderr.strip().splitlines() or [""])[-1][:300])
        except subprocess.TimeoutExpired:
          why = f"the process ran past --child_timeout={a.child_timeout} s"
        if why:  # a flag set that crashes XLA is a finding, not the end of the run
          failed[name] = {"failed": why, "failed_round": r + 1}
          print(f"round {r + 1} flags/{name}: {why}", flush=True)
          continue
        with open(f.name) as fh:
          child = json.load(fh)
      runs[name].append(child["shipped"]["choice/shipped"])
      print(f"round {r + 1} flags/{name}: {runs[name][-1]['ms']:.1f} ms", flush=True)
  out = {}
  for name, rs in runs.items():
    v = {"xla_flags": _child_flags(flag_sets[name]),
         "glibc_tunables": _child_env(name, flag_sets[name]).get("GLIBC_TUNABLES", ""),
         **failed.get(name, {})}
    if rs:
      shares = [r["others_cpu_share"] for r in rs]
      v.update({**_figure([x for r in rs for x in r["window_ms"]]),
                "process_medians_ms": [r["ms"] for r in rs],
                "others_cpu_share": None if None in shares else max(shares),
                "quiet": all(r["quiet"] for r in rs)})
    out[f"flags/{name}"] = v
  return _add_ratios(out, f"flags/{next(iter(flag_sets))}")


def _args(argv):
  """The parsed command line and the parts to run (checked: errors exit 2)."""
  ap = argparse.ArgumentParser(prog="python -m benchmarks.variants")
  ap.add_argument("--model", default="decoder", choices=("decoder", "t5"))
  ap.add_argument("--parts", default="choice,step,proxy",
                  help="which of choice, post, step (decoder), proxy (decoder), eval, flags "
                  "to run")
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--inputs", type=int, default=512)
  ap.add_argument("--targets", type=int, default=128)
  ap.add_argument("--windows", type=int, default=5)
  ap.add_argument("--steps", type=int, default=2, help="steps (calls) per window")
  ap.add_argument("--impls", default="reference,dot_product,blockwise")
  ap.add_argument("--rounds", type=int, default=3, help="processes per flag set (flags)")
  ap.add_argument("--flag_sets", default=",".join(FLAG_SETS),
                  help="which of " + ", ".join(FLAG_SETS) + " (flags; shipped is always "
                  "run, first: the others' ratios are to it)")
  ap.add_argument("--child_timeout", type=int, default=1800,
                  help="seconds a flag set's process may take (flags)")
  ap.add_argument("--choices", default=",".join(CHOICES),
                  help="which of " + ", ".join(CHOICES) + " (choice; the shipped step is "
                  "always run, first)")
  ap.add_argument("--rows", default="full", choices=("full", "flan_cot"),
                  help="choice: rows of exactly inputs + targets tokens, or the step "
                  "benchmark's packed flan_cot rows (a different batch each step)")
  ap.add_argument("--out")
  a = ap.parse_args(argv)
  parts = [p for p in ("choice", "post", "step", "proxy", "eval", "flags", "shipped")
           if p in a.parts.split(",")]
  if a.model == "t5" and set(parts) - {"choice", "post", "eval", "flags", "shipped"}:
    ap.error("--model=t5 runs --parts=choice,post,eval,flags only (step and proxy are the "
             "decoder's)")
  unknown = set(a.choices.split(",")) - set(CHOICES)
  if unknown:
    ap.error(f"--choices: unknown {sorted(unknown)}; choose from {', '.join(CHOICES)}")
  unknown = set(a.flag_sets.split(",")) - set(FLAG_SETS)
  if unknown:
    ap.error(f"--flag_sets: unknown {sorted(unknown)}; choose from {', '.join(FLAG_SETS)}")
  if min(a.rounds, a.windows, a.steps, a.child_timeout) < 1:
    ap.error("--rounds, --windows, --steps and --child_timeout must be at least 1")
  return a, parts


def main(argv=None):
  a, parts = _args(argv)
  from benchmarks import common, profile_step, stacks  # pylint: disable=g-import-not-at-top
  threads = stacks.torch_threads()
  cfg = lengths = batch = None  # the flags part's children build their own rows
  if set(parts) - {"flags"}:
    cfg, lengths, _, batch = profile_step.full_rows(a.model, a.batch, a.inputs, a.targets)
  if "shipped" in parts:
    fj_shipped = stacks.Flanjax(cfg, stacks.AdamW())
  res = {"command": "python -m benchmarks.variants " + " ".join(argv or sys.argv[1:]),
         "commit": common.commit(), "machine": common.machine(threads),
         "load_before": common.load(), "model": a.model, "batch": a.batch, "lengths": lengths,
         "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
         "xla_flags": os.environ.get("XLA_FLAGS", "")}
  if "choice" in parts:
    rows = batch
    if a.rows == "flan_cot":
      rows = flan_cot_rows(cfg, a.batch, a.inputs, a.targets)
      res["rows"] = {"kind": "flan_cot packed rows", "batches": len(rows)}
    res["choice"] = _interleaved(choice_variants(cfg, rows, a.choices.split(",")),
                                 a.windows, a.steps)
  if "post" in parts:
    res["post"] = _interleaved(post_gradient_variants(cfg), a.windows, a.steps)
  if "step" in parts:
    res["step"] = _interleaved(step_variants(cfg, batch, a.impls.split(",")), a.windows,
                               a.steps)
  if "proxy" in parts:
    import jax  # pylint: disable=g-import-not-at-top
    proxies = {k: (lambda f=f, x=x: jax.block_until_ready(f(*x)))
               for k, (f, x) in proxy_variants(cfg, a.batch, a.inputs + a.targets).items()}
    res["proxy"] = {}
    for pair in ("proxy/layout_", "proxy/qkv_", "proxy/gqa_"):  # each against what ships
      res["proxy"].update(_interleaved({k: f for k, f in proxies.items() if k.startswith(pair)},
                                       a.windows, a.steps))
  if "shipped" in parts:  # one flag set's child process (flag_variants)
    res["shipped"] = _interleaved({"choice/shipped": lambda: fj_shipped.train([batch])},
                                  a.windows, a.steps)
  if "flags" in parts:
    names = ["shipped"] + [k for k in a.flag_sets.split(",") if k != "shipped"]
    res["flags"] = flag_variants(a, {k: FLAG_SETS[k] for k in names})
    res["lengths"] = {"inputs": a.inputs, "targets": a.targets}
    res["xla_flags_note"] = "each flags/* entry's xla_flags are its processes'"
  if "eval" in parts:
    fns, res["eval_temp_mib"] = eval_variants(cfg, batch)
    res["eval"] = _interleaved(fns, a.windows, a.steps)
  res["load_after"] = common.load()
  res["quiet"] = common.quiet_start(res["load_before"]) and all(
      v.get("quiet", True) for part in parts for v in res[part].values())
  for part in parts:
    for k, v in res[part].items():
      if "failed" in v:
        print(f"{k:40s} failed: {v['failed']}")
        continue
      print(f"{k:40s} {v['ms']:9.1f} ms [{v['ms_min']:.1f}-{v['ms_max']:.1f}]  "
            f"x{v['vs_first']:.3f}" + ("" if v["quiet"] else "  (not quiet)"))
  if "eval" in parts:
    print("XLA temporary memory (MiB):", res["eval_temp_mib"])
  print(f"load average {res['load_before']} before, {res['load_after']} after")
  common.write_json(a.out, res)
  if "flags" in parts and "vs_first" not in res["flags"]["flags/shipped"]:
    print("the shipped flag set measured nothing: no ratios (see its 'failed')", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())

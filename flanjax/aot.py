"""Ahead-of-time compilation of the real train step for a TPU topology, from a CPU host.

    python -m flanjax.aot --gin_file=flan.gin --gin_file=models/t5_xl.gin \\
        --gin.train.task_feature_lengths="{'inputs': 2048, 'targets': 512}" --topology=v5e:2x4

Reads the same gin as training (model, lengths, batch, microbatches, mesh, optimizer, and
train.peft: LoRA or prompt tuning over a frozen base held in its base_dtype),
builds the step the trainer builds (training/trainer.py: make_train_step, the state's
shardings from the logical rules, the batch sharded over data x fsdp), compiles it
against the topology's devices with libtpu (`pip install -e '.[tpu]'`), and prints
per device: parameters, optimizer state, temporaries and the total against the chip's
memory, FLOPs per step (XLA's cost analysis) and the step time at the chip's peak and at
50% MFU. Exit code 0: fits; 1: does not fit (a step XLA refuses to compile for the chip's
memory ends with one line: what it needed, and the fixes); 2: a user error. With --decode, one
decoding step (the KV cache of --decode_batch rows) is compiled and reported too.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from flanjax import config as flan_config
from flanjax import train as _train  # noqa: F401  registers train's gin configurables
from flanjax.data import packing
from flanjax.errors import UserError
from flanjax.models import dense, kinds
from flanjax.training import flops as flops_lib
from flanjax.models import lora, prompt_tuning
from flanjax.training import adapters as adapters_lib
from flanjax.training import loop, optimizers, partitioning
from flanjax.training import trainer as step_lib

GIB = 1 << 30
# device_kind -> (HBM bytes, peak bf16 FLOP/s) per chip, from the vendor's spec sheets.
CHIPS = {
    "TPU v4": (32 * GIB, 275e12),
    "TPU v5 lite": (16 * GIB, 197e12),
    "TPU v5": (95 * GIB, 459e12),
    "TPU v5p": (95 * GIB, 459e12),
    "TPU v6 lite": (32 * GIB, 918e12),
}


def topology_devices(name: str):
  """The devices of a TPU topology such as 'v5e:2x4' (needs libtpu, not a TPU)."""
  try:
    import libtpu  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    raise UserError("compiling for a TPU topology needs libtpu: pip install -e '.[tpu]' in "
                    f"the repository (or jax[tpu]=={jax.__version__})") from None
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  # Compiling touches no chip: let several compiles (and tests) load libtpu side by side.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    # JAX runs a v4 chip's two TensorCores as one device (megacore); libtpu's topology
    # default for v4 is one device per TensorCore, which no v4 job sees. v5e/v5p: one a chip.
    kwargs = {"chip_config_name": "megacore"} if name.startswith("v4") else {}
    return topologies.get_topology_desc(topology_name=name, platform="tpu", **kwargs).devices
  except Exception as e:  # pylint: disable=broad-except
    text = (str(e).strip().splitlines() or [type(e).__name__])[-1][:200]
    raise UserError(f"--topology={name}: libtpu does not know it ({text}); use e.g. "
                    "v4:2x2x2, v5e:2x4, v5p:2x2x1") from None


_SIZE = r"([\d.]+)\s*([KMGT]?)i?B?"
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
# XLA:TPU's compile-time refusals for memory, newer and older wording: (needed, available).
_REFUSALS = (re.compile(r"(?:Ran out of memory on HBM, the total memory )?required for HLO "
                        r"temporaries \(" + _SIZE + r"\) exceeds available HBM \(" + _SIZE
                        + r"\)"),
             re.compile(r"Used " + _SIZE + r" of " + _SIZE + r" hbm"))


def hbm_refusal(error: BaseException):
  """(GiB wanted, GiB available, XLA's sentence) when XLA refused to compile a step for
  the chip's memory (RESOURCE_EXHAUSTED at compile time), else None."""
  text = str(error)
  if "RESOURCE_EXHAUSTED" not in text:
    return None
  for pattern in _REFUSALS:
    m = pattern.search(text)
    if m:
      want, have = (float(m.group(i)) * _UNITS[m.group(i + 1)] / GIB for i in (1, 3))
      return want, have, m.group(0)
  lines = [x.strip() for x in text.splitlines() if "RESOURCE_EXHAUSTED" in x]
  return None, None, lines[0][:300]


def refusal_line(what: str, topology: str, devices, settings: dict, refusal,
                 decode_batch=None) -> str:
  """One line for a step XLA would not compile for memory: what, how much, the fixes
  (decode_batch: the decoding step's rows, for a refused decode step)."""
  want, have, sentence = refusal
  cfg = settings["config"]
  owner = type(cfg).__name__
  hbm = CHIPS.get(devices[0].device_kind, (None,))[0]
  need = (f"{want:.2f} GiB of temporaries per chip against the {have:.2f} GiB XLA leaves "
          f"free" + (f" of {hbm / GIB:.0f} GiB HBM" if hbm else "")
          if want is not None else f"XLA: {sentence}")
  if decode_batch is None:
    fixes = [f"a smaller train.batch_size (now {settings['batch_size']}) or shorter "
             "train.task_feature_lengths",
             f"more train.microbatches (now {settings['microbatches']})"]
  else:
    fixes = [f"a smaller --decode_batch (now {decode_batch}) or shorter "
             "train.task_feature_lengths"]
  if getattr(cfg, "remat_policy", "none") == "none" and not getattr(cfg, "remat", True):
    fixes.append(f"{owner}.remat=True")
  if getattr(cfg, "attention_impl", "blockwise") in ("auto", "reference"):
    fixes.append(f"{owner}.attention_impl='blockwise'")
  if str(getattr(cfg, "dtype", "bfloat16")) == "float32":
    fixes.append(f"{owner}.dtype='bfloat16'")
  fixes.append(f"more chips (a topology larger than {topology})")
  return (f"{what} does NOT fit {len(devices)} x {devices[0].device_kind} ({topology}): "
          f"it needs {need}; fix: {', '.join(fixes[:-1])} or {fixes[-1]}")


def _bound(selector, default):
  value = flan_config.bound_value(selector)
  return default if value is None else value


def _class_name(ref) -> str:
  """'T5Config' of a gin reference such as @T5Config() or @flanjax.models.t5.T5Config()."""
  return str(ref).lstrip("@").split("(")[0].split(".")[-1]


def train_settings() -> dict:
  """What the trainer would be built from, read from the parsed gin (as flanjax.train)."""
  ref = flan_config.bound_value("train.model_config")
  if ref is None:
    raise UserError("no model: bind train.model_config (e.g. --gin_file=models/t5_xl.gin with "
                    "train.model_config = @T5Config())")
  classes = {c.__name__: c for c in kinds.config_classes().values()}
  name = _class_name(ref)
  if name not in classes:
    raise UserError(f"train.model_config = {ref}: not one of {', '.join(classes)}")
  cfg = classes[name]()
  if cfg.vocab_size == 0:  # taken from the vocabulary: its bound size, rounded up to 128
    size = int(_bound("corpus_vocabulary.vocab_size", 32000))
    cfg = dataclasses.replace(cfg, vocab_size=-(-size // 128) * 128)
  return {"config": cfg, "peft": _peft(), "lengths": dict(_bound("train.task_feature_lengths",
                                                {"inputs": 256, "targets": 64})),
          "batch_size": int(_bound("train.batch_size", 32)),
          "microbatches": int(_bound("train.microbatches", 1)),
          "mesh_shape": tuple(_bound("train.mesh_shape", (-1, 1, 1))),
          "pack": bool(_bound("train.pack", True)), "z_loss": float(_bound("train.z_loss", 1e-4)),
          "output_chunk": int(_bound("train.output_chunk", 128)),
          "kind": kinds.for_training(cfg, _bound("train.decoder_objective", "prefix_lm"))}


def _peft():
  """train.peft's config (gin applies its bindings), or None for full fine-tuning."""
  ref = flan_config.bound_value("train.peft")
  if ref is None:
    return None
  classes = {"LoraConfig": lora.LoraConfig, "PromptTuningConfig": prompt_tuning.PromptTuningConfig}
  name = _class_name(ref)
  if name not in classes:
    raise UserError(f"train.peft = {ref}: not one of @LoraConfig(), @PromptTuningConfig()")
  return classes[name]()


def _abstract(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def _per_device_bytes(tree) -> int:
  return sum(jnp.dtype(x.dtype).itemsize * math.prod(x.sharding.shard_shape(x.shape))
             for x in jax.tree.leaves(tree))


def compile_train_step(settings: dict, devices):
  """(compiled step, abstract state) of the trainer's step for `devices`."""
  cfg = settings["config"]
  kind = settings.get("kind") or kinds.for_config(cfg)
  model = kind.build(cfg)
  tx, lr_fn = optimizers.optimizer()
  part = loop.Partitioner(partitioning.make_mesh(settings["mesh_shape"], devices),
                          partitioning.logical_rules())
  partitioning.check_divisible(part.mesh, settings["batch_size"], settings["microbatches"],
                               kinds.abstract_params(cfg, unbox=False), part.rules,
                               num_processes=1)
  peft = settings.get("peft")
  if peft is None:
    init_fn = lambda rng: step_lib.init_state(model, tx, rng, kind.dummy_batch(1, 8, 8))  # noqa
  else:  # the trainer's adapter state; the frozen base enters the step as an argument
    adapter = adapters_lib.for_shapes(peft, cfg)
    kind = adapter.kind(kind)
    init_fn = adapters_lib.state_init(adapter, tx)
    base_boxed = kinds.abstract_params(cfg, unbox=False)
    base_sh = partitioning.shardings_of(base_boxed, part.mesh, part.rules)
    base = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, adapter.base_dtype(),
                                                           sharding=sh),
                        nn.unbox(base_boxed), base_sh)
  boxed = jax.eval_shape(init_fn, jax.random.PRNGKey(0))
  shardings = step_lib.state_shardings(boxed, part.mesh, part.rules)
  state = _abstract(nn.unbox(boxed), shardings)
  lengths = packing.model_lengths(settings["lengths"], kind.packing_kind, settings["pack"])
  batch_sh = partitioning.batch_sharding(part.mesh)
  batch = {k: jax.ShapeDtypeStruct((settings["batch_size"], n), jnp.int32, sharding=batch_sh)
           for k, n in lengths.items()}
  make = lambda m: step_lib.make_train_step(  # noqa: E731
      m, tx, lr_fn, microbatches=settings["microbatches"], z_loss=settings["z_loss"],
      model_inputs=kind.model_inputs, output_chunk=settings.get("output_chunk", 128))
  # dense.py's CPU formulation is for XLA:CPU; a TPU compiles XLA's own gradient.
  with part.scope(), dense.mode("xla"):
    if peft is None:
      compiled = step_lib.jit_train_step(make(model), shardings, part.mesh).lower(
          state, batch).compile()
    else:
      compiled = adapters_lib.jit_train_step(make, model, adapter, shardings, batch_sh,
                                             base_sh).lower(state, batch, base).compile()
      state = dict(state, base=base)
  return compiled, state, part.mesh


def model_flops_per_device(settings: dict, num_devices: int) -> float:
  """The model's training FLOPs per step and device (training/flops.py, the MFU count).

  XLA's cost analysis counts a scanned layer stack's loop body once, so it cannot
  stand for the step under scan_layers; this count is the same in either layout."""
  cfg = settings["config"]
  rows = packing.row_lengths(settings["lengths"],
                             (settings.get("kind") or kinds.for_config(cfg)).packing_kind)
  full = flops_lib.step_flops(cfg, rows, settings["batch_size"]) / num_devices
  # Over a frozen base (LoRA, prompt tuning) the forward and the input gradients remain and
  # the base's weight gradients go: 2/3 of full fine-tuning (the adapters' own are left out).
  return full if settings.get("peft") is None else full * 2 / 3


def report(compiled, state, devices, what: str = "train step", hbm_gib=None,
           model_flops=None) -> dict:
  """Per-device memory and FLOPs of a compiled step, against the chip (or hbm_gib).

  model_flops: the model's FLOPs per device (model_flops_per_device); the step times
  come from it when given (MFU's definition), else from XLA's count."""
  kind = devices[0].device_kind
  hbm, peak = CHIPS.get(kind, (None, None))
  hbm = hbm_gib * GIB if hbm_gib else hbm
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", 0.0)) if cost else 0.0
  total = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
           + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)
  out = {"what": what, "devices": len(devices), "device_kind": kind,
         "params_gib": _per_device_bytes(state["params"]) / GIB if "params" in state else None,
         "frozen_base_gib": _per_device_bytes(state["base"]) / GIB if "base" in state else None,
         "opt_state_gib": (_per_device_bytes(state["opt_state"]) / GIB
                           if "opt_state" in state else None),
         "arguments_gib": mem.argument_size_in_bytes / GIB,
         "temp_gib": mem.temp_size_in_bytes / GIB, "total_gib": total / GIB,
         "hbm_gib": hbm / GIB if hbm else None, "fits": bool(hbm is None or total <= hbm),
         "flops_per_device": flops, "model_flops_per_device": model_flops}
  timed = model_flops if model_flops else flops
  out.update(step_seconds_at_peak=timed / peak if peak else None,
             step_seconds_at_50pct_mfu=2 * timed / peak if peak else None)
  return out


def _print(r: dict) -> None:
  g = lambda x: "n/a" if x is None else f"{x:.3f} GiB"  # noqa: E731
  print(f"{r['what']} on {r['devices']} x {r['device_kind']}, per device:")
  if r.get("frozen_base_gib") is not None:
    print(f"  frozen base     {g(r['frozen_base_gib'])}")
  if r.get("params_gib") is not None:
    label = "adapters       " if r.get("frozen_base_gib") is not None else "parameters     "
    print(f"  {label} {g(r['params_gib'])}")
  if r.get("opt_state_gib") is not None:
    print(f"  optimizer state {g(r['opt_state_gib'])}")
  print(f"  arguments       {g(r['arguments_gib'])}")
  print(f"  temporaries     {g(r['temp_gib'])}")
  verdict = "fits" if r["fits"] else "does NOT fit"
  print(f"  total           {g(r['total_gib'])} of {g(r['hbm_gib'])} HBM: {verdict}")
  print(f"  FLOPs per step  {r['flops_per_device']:.3e} (XLA's count; a scanned stack's "
        "loop body once)")
  if r.get("model_flops_per_device"):
    frozen = (": 2/3 of full fine-tuning's, no weight gradients for the frozen base"
              if r.get("frozen_base_gib") is not None else "")
    print(f"  model FLOPs     {r['model_flops_per_device']:.3e} (matmuls and attention, "
          f"forward + backward{frozen}; the step times below use it)")
  if r["step_seconds_at_peak"] is not None:
    print(f"  step time       {r['step_seconds_at_peak'] * 1e3:.1f} ms at peak, "
          f"{r['step_seconds_at_50pct_mfu'] * 1e3:.1f} ms at 50% MFU", flush=True)


def compile_decode_step(settings: dict, devices, batch: int):
  """One cached decoding step of the kind (its KV cache for the lengths), params sharded."""
  cfg = settings["config"]
  kind = settings.get("kind") or kinds.for_config(cfg)
  model = kind.build(cfg)
  part = loop.Partitioner(partitioning.make_mesh(settings["mesh_shape"], devices),
                          partitioning.logical_rules())
  boxed = kinds.abstract_params(cfg, unbox=False)
  params = _abstract(nn.unbox(boxed), partitioning.shardings_of(boxed, part.mesh, part.rules))
  lengths = settings["lengths"]
  prompt_len = int(lengths.get("inputs", lengths["targets"]))
  max_len = int(lengths["targets"])
  prompts = jax.ShapeDtypeStruct((batch, prompt_len), jnp.int32)
  token = jax.ShapeDtypeStruct((batch,), jnp.int32)

  def start(p, prompts):
    return kind.decode_start(model, {"params": p}, prompts,
                             jnp.full((batch,), prompt_len, jnp.int32), max_len)

  with part.scope(), dense.mode("xla"):
    state = jax.eval_shape(start, params, prompts)[1]
    step = jax.jit(lambda p, s, t: kind.decode_step(model, {"params": p}, s, t, 1))
    compiled = step.lower(params, state, token).compile()
  return compiled, {"params": params}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m flanjax.aot", description=__doc__.split("\n")[0])
  parser.add_argument("--topology", required=True, help="e.g. v4:2x2x2, v5e:2x4, v5p:2x2x1")
  parser.add_argument("--decode", action="store_true", help="also compile one decoding step")
  parser.add_argument("--decode_batch", type=int, default=32)
  parser.add_argument("--hbm_gib", type=float, help="memory per device to fit in "
                      "(default: the chip's HBM)")
  parser.add_argument("--json", help="also write the report here")
  args = parser.parse_args(argv)
  devices = topology_devices(args.topology)
  settings = train_settings()
  cfg = settings["config"]
  peft = settings["peft"]
  print(f"{kinds.for_config(cfg).describe(cfg)}, {cfg.num_params() / 1e9:.3f}B parameters"
        + (f" ({type(peft).__name__}: {peft.describe()})" if peft is not None else "") + "; "
        f"lengths {settings['lengths']}, batch {settings['batch_size']}, mesh "
        f"{settings['mesh_shape']}, topology {args.topology} ({len(devices)} devices)", flush=True)
  t0 = time.time()
  results = []

  def refused(what, e, decode_batch=None):
    # XLA refuses at compile time a step whose temporaries exceed the chip: a verdict, not
    # a crash. One line, exit 1 (does not fit), and the row in --json.
    found = hbm_refusal(e)
    if found is None:
      raise e
    results.append({"what": what, "devices": len(devices), "topology": args.topology,
                    "device_kind": devices[0].device_kind, "fits": False,
                    "temp_gib": found[0], "total_gib": None, "hbm_gib": found[1],
                    "error": "XLA: " + found[2], "compile_seconds": round(time.time() - t0, 1)})
    return refusal_line(what, args.topology, devices, settings, found, decode_batch)

  line = None
  try:
    compiled, state, mesh = compile_train_step(settings, devices)
  except Exception as e:  # pylint: disable=broad-except
    line = refused("train step", e)
  else:
    result = report(compiled, state, devices, hbm_gib=args.hbm_gib,
                    model_flops=model_flops_per_device(settings, len(devices)))
    result.update(compile_seconds=round(time.time() - t0, 1), topology=args.topology,
                  mesh=dict(mesh.shape))
    _print(result)
    results.append(result)
  if args.decode and line is None:
    t0 = time.time()
    what = f"decode step ({args.decode_batch} rows)"
    try:
      compiled, state = compile_decode_step(settings, devices, args.decode_batch)
    except Exception as e:  # pylint: disable=broad-except
      line = refused(what, e, args.decode_batch)
    else:
      dec = report(compiled, state, devices, what=what, hbm_gib=args.hbm_gib)
      dec["compile_seconds"] = round(time.time() - t0, 1)
      _print(dec)
      results.append(dec)
  print(f"compiled in {sum(r['compile_seconds'] for r in results):.0f}s", flush=True)
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(results, f, indent=1)
  if line:
    print(line, flush=True)
    return 1
  return 0 if all(r["fits"] for r in results) else 1


def command(argv=None):
  flan_config.run_gin_command(main, "flanjax.aot", argv)


if __name__ == "__main__":
  command(sys.argv[1:])

"""Writes docs/results/aot_table.json: flanjax.aot's train step for FLAN's lengths (inputs
2048, targets 512) on TPU topologies, per model: fits or not, GiB per chip.

    PYTHONPATH=<libtpu folder> python tools/aot_table.py [--models t5_xl,...] [--topologies ...]

Every entry: the gin of flan.gin (Adafactor) with the model, batch 32, a fully sharded
(FSDP) mesh over all chips, bfloat16 activations, remat, blockwise attention and the layers
under nn.scan (scan_layers: one layer's body compiled, whatever the depth). The file is
rewritten after each entry, so an interrupted run keeps what it measured; each row records
its compile time and the machine's load average.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from flanjax import aot  # noqa: E402  pylint: disable=g-import-not-at-top
from flanjax import config as flan_config  # noqa: E402  pylint: disable=g-import-not-at-top
from flanjax.errors import UserError  # noqa: E402  pylint: disable=g-import-not-at-top

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "results",
                   "aot_table.json")
COMMON = ["train.task_feature_lengths = {'inputs': 2048, 'targets': 512}",
          "train.batch_size = 32", "train.mesh_shape = (1, -1, 1)"]
T5 = ["T5Config.dtype = 'bfloat16'", "T5Config.remat = True",
      "T5Config.attention_impl = 'blockwise'", "T5Config.scan_layers = True"]
LLAMA = ["train.model_config = @DecoderConfig()", "DecoderConfig.dtype = 'bfloat16'",
         "DecoderConfig.remat = True", "DecoderConfig.attention_impl = 'blockwise'",
         "DecoderConfig.scan_layers = True",
         "DecoderConfig.vocab_size = 128256", "DecoderConfig.num_kv_heads = 8",
         "DecoderConfig.rope_theta = 500000.0"]
# Llama 3.2 1B and Llama 3.1 8B shapes.
MODELS = {
    "t5_small": (["models/t5_small.gin"], T5), "t5_base": (["models/t5_base.gin"], T5),
    "t5_large": (["models/t5_large.gin"], T5), "t5_xl": (["models/t5_xl.gin"], T5),
    "t5_xxl": (["models/t5_xxl.gin"], T5),
    "decoder_1b": ([], LLAMA + ["DecoderConfig.d_model = 2048", "DecoderConfig.num_heads = 32",
                                "DecoderConfig.head_dim = 64", "DecoderConfig.d_ff = 8192",
                                "DecoderConfig.num_layers = 16",
                                "DecoderConfig.tie_word_embeddings = True"]),
    "decoder_8b": ([], LLAMA + ["DecoderConfig.d_model = 4096", "DecoderConfig.num_heads = 32",
                                "DecoderConfig.head_dim = 128", "DecoderConfig.d_ff = 14336",
                                "DecoderConfig.num_layers = 32"]),
}
TOPOLOGIES = {"v5e-8": "v5e:2x4", "v5p-8": "v5p:2x2x1", "v4-32": "v4:2x2x4"}


def measure(model: str, topology: str) -> dict:
  files, bindings = MODELS[model]
  flan_config.parse_gin(flan_config.GinArgs(["flan.gin"] + files, COMMON + bindings, [], []))
  devices = aot.topology_devices(topology)
  t0 = time.time()
  settings = aot.train_settings()
  try:
    compiled, state, mesh = aot.compile_train_step(settings, devices)
    r = aot.report(compiled, state, devices,
                   model_flops=aot.model_flops_per_device(settings, len(devices)))
    mesh = dict(mesh.shape)
  except Exception as e:  # pylint: disable=broad-except
    # XLA refuses a step whose temporaries alone exceed the chip: a "does not fit" row.
    found = aot.hbm_refusal(e)
    if found is None:
      raise
    r = {"what": "train step", "devices": len(devices), "device_kind": devices[0].device_kind,
         "fits": False, "temp_gib": found[0], "total_gib": None, "hbm_gib": found[1],
         "error": "XLA: RESOURCE_EXHAUSTED, " + found[2]}
    mesh = None
  r.update(model=model, topology=topology, mesh=mesh,
           parameters=settings["config"].num_params(),
           compile_seconds=round(time.time() - t0, 1),
           load_average=[round(x, 2) for x in os.getloadavg()])
  return r


NAMES = {"t5_small": "T5 small", "t5_base": "T5 base", "t5_large": "T5 large",
         "t5_xl": "T5-XL", "t5_xxl": "T5-XXL", "decoder_1b": "decoder 1B (Llama 3.2 shapes)",
         "decoder_8b": "decoder 8B (Llama 3.1 shapes)"}


def markdown(doc: dict) -> str:
  """The README's table from the JSON: per model and slice, fits or not and GiB per chip."""
  rows = {(r["model"], r["chips"]): r for r in doc["rows"]}
  chips = [c for c in TOPOLOGIES if any(k[1] == c for k in rows)]
  head = []
  for c in chips:
    r = next(r for k, r in rows.items() if k[1] == c)
    hbm = aot.CHIPS.get(r["device_kind"], (None,))[0]
    head.append(f"{c} ({r['devices']} x {hbm / aot.GIB:.0f} GiB)" if hbm else c)
  lines = ["| model | parameters | " + " | ".join(head) + " |",
           "|---|---|" + "---|" * len(chips)]
  for model in [m for m in MODELS if any(k[0] == m for k in rows)]:
    params = next((r["parameters"] for k, r in rows.items()
                   if k[0] == model and r.get("parameters")), None)
    cells = [NAMES[model], f"{params / 1e9:.2f}B" if params else ""]
    for c in chips:
      r = rows.get((model, c))
      if r is None:
        cells.append("not measured")
      elif r["fits"]:
        cells.append(f"yes, {r['total_gib']:.2f} ({r['compile_seconds']:.0f} s)")
      elif r.get("total_gib") is not None:
        cells.append(f"no, {r['total_gib']:.2f} ({r['compile_seconds']:.0f} s)")
      else:
        cells.append(f"no: XLA refuses {r['temp_gib']:.2f} GiB of temporaries "
                     f"({r['compile_seconds']:.0f} s)")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _names(text: str, known: dict, flag: str) -> list:
  names = [n for n in text.split(",") if n]
  unknown = [n for n in names if n not in known]
  if unknown or not names:
    raise UserError(f"{flag}={text!r}: {', '.join(unknown) or 'nothing'} not among "
                    f"{', '.join(known)}")
  return names


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="tools/aot_table.py")
  parser.add_argument("--models", default=",".join(MODELS))
  parser.add_argument("--topologies", default=",".join(TOPOLOGIES))
  parser.add_argument("--markdown", action="store_true",
                      help="print the README's table from the JSON (compiles nothing)")
  args = parser.parse_args(argv)
  if args.markdown:
    with open(OUT, encoding="utf-8") as f:
      print(markdown(json.load(f)))
    return 0
  models = _names(args.models, MODELS, "--models")
  topologies = _names(args.topologies, TOPOLOGIES, "--topologies")
  commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, check=False).stdout.strip()
  doc = {"command": "python tools/aot_table.py " + " ".join(sys.argv[1:]), "commit": commit,
         "machine": f"{platform.node()} ({os.cpu_count()} CPUs)", "settings": COMMON,
         "rows": []}
  if os.path.exists(OUT):
    try:
      with open(OUT, encoding="utf-8") as f:
        doc["rows"] = json.load(f).get("rows", [])
    except (ValueError, AttributeError):
      raise UserError(f"{OUT} is not the table's JSON: move it away and run again") from None
  for topo_name in topologies:
    for model in models:
      print(f"{model} on {topo_name} ...", flush=True)
      r = measure(model, TOPOLOGIES[topo_name])
      r.update(chips=topo_name, commit=commit, command=doc["command"])
      doc["rows"] = [x for x in doc["rows"]
                     if (x["model"], x["chips"]) != (model, topo_name)] + [r]
      need = r["total_gib"] or r["temp_gib"] or float("nan")  # a refusal: temporaries only
      print(f"  {need:.1f} GiB of {r['hbm_gib']:.0f}: "
            f"{'fits' if r['fits'] else 'does not fit'} ({r['compile_seconds']:.0f}s)",
            flush=True)
      with open(OUT, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
  return 0


if __name__ == "__main__":
  flan_config.run_plain_main(main, "tools/aot_table.py", sys.argv[1:])

"""The FLAN paper's ablation of instructions (section 4.3) on the built-in families.

  python tools/ablation.py [--steps 400] [--seeds 0,1,2] [--heldout sentiment,parity]

Trains one model per template mode (instructions, no_template, dataset_name) and
seed with gin_configs/experiments/flan_ablation.gin, whole families held out of
training, and evaluates each zero-shot WITH instructions (the paper's protocol:
without a template a held-out task does not say what to do) on

  - the held-out families (their validation split: templates never trained on,
    tasks never trained on), exact match and rank classification;
  - the held-out templates of the trained families (heldout_templates split);
  - the trained families' validation split (seen templates), for reference;

beside the majority-answer baseline the evaluator computes (always the train
split's most common answer) and, for rank classification, chance (1 / options).
The dataset_name arm is also scored with the dataset's name as its prompt
(--name_eval), which the paper reports too. Every arm gets the same vocabulary
(trained on the collection's instructions text), so only the template mode
differs. Prints a table (mean and standard deviation over seeds, with the range)
and writes <out>.json (command, commit, machine, load average, wall times,
every run's numbers) and <out>.md.

Runs train in this process, one after another (python -m flanjax.train's own
entry point), in <work>/<mode>_s<seed>/ (removed first: each arm trains from
scratch).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from flanjax.config import run_plain_main  # noqa: E402
from flanjax.errors import UserError  # noqa: E402

GIN_FILE = "experiments/flan_ablation.gin"
MODES = ("instructions", "no_template", "dataset_name")
FAMILIES = ("arithmetic", "comparison", "parity", "sentiment", "category", "list_reverse")
PREFIX = "builtin_"
TRAIN_MIXTURE = "flan_ablation_train"
# Rows of the table: (key, what it measures).
MEASURES = (
    ("heldout_families", "held-out families, zero-shot with instructions, exact match %"),
    ("heldout_families_rank", "held-out families, rank classification %"),
    ("heldout_templates", "trained families, held-out templates, exact match %"),
    ("seen_templates", "trained families, seen templates (validation), exact match %"),
)


def _parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(prog="tools/ablation.py", description=__doc__.split("\n")[0])
  ap.add_argument("--steps", type=int, default=400, help="training steps per run")
  ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
  ap.add_argument("--modes", default=",".join(MODES), help="template modes to train")
  ap.add_argument("--heldout", default="sentiment,parity",
                  help="families never trained on (at least one)")
  ap.add_argument("--batch_size", type=int, default=32)
  ap.add_argument("--max_examples", type=int, default=60, help="per task and split")
  ap.add_argument("--no_name_eval", dest="name_eval", action="store_false",
                  help="skip scoring the dataset_name arm with dataset-name prompts")
  ap.add_argument("--work", default=os.path.join("runs", "flan_ablation"),
                  help="run folders go here")
  ap.add_argument("--out", default=os.path.join(REPO, "docs", "results", "flan_ablation"),
                  help="writes OUT.json and OUT.md")
  ap.add_argument("--vocab_size", type=int, default=1000)
  ap.add_argument("--note", default="", help="a sentence for the results (e.g. why reduced)")
  ap.add_argument("--gin", action="append", default=[], metavar="X=Y",
                  help="extra gin binding for every run (repeatable), e.g. T5Config.d_model=64")
  return ap


def _families(text: str) -> list[str]:
  out = [f.strip() for f in text.split(",") if f.strip()]
  bad = [f for f in out if f not in FAMILIES]
  if bad:
    raise UserError(f"--heldout {','.join(bad)}: not a built-in family; use some of "
                    f"{', '.join(FAMILIES)}")
  return out


class LoadSampler:
  """The 1-minute load average every `every` seconds, in a thread, while runs go on."""

  def __init__(self, every: float = 30.0):
    self.samples, self._stop = [os.getloadavg()[0]], threading.Event()
    self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)
    self._thread.start()

  def _run(self, every):
    while not self._stop.wait(every):
      self.samples.append(os.getloadavg()[0])

  def stop(self) -> None:
    self._stop.set()

  def summary(self) -> dict:
    s = list(self.samples)
    return {"mean_1min": round(statistics.mean(s), 2), "max_1min": round(max(s), 2),
            "samples": len(s), "at_end": [round(x, 2) for x in os.getloadavg()]}


def machine() -> dict:
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    pass
  import jax  # pylint: disable=g-import-not-at-top
  return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
          "python": platform.python_version(), "jax": jax.__version__,
          "devices": f"{jax.device_count()} {jax.devices()[0].platform}"}


def commit() -> str:
  try:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True,
                          capture_output=True, check=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                           text=True, capture_output=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"
  return head + (" (working tree has uncommitted changes)" if dirty else "")


def _instructions_vocabulary(vocab_size: int) -> str:
  """The built-in vocabulary of the instructions text: the same for every arm."""
  import gin  # pylint: disable=g-import-not-at-top
  from flanjax.data import vocab  # pylint: disable=g-import-not-at-top
  gin.clear_config()  # unbound: the instructions mode
  return vocab.builtin_vocabulary(vocab_size=vocab_size).sentencepiece_model_file


def train_argv(mode: str, seed: int, args, trained: list[str], vocab_path: str,
               model_dir: str) -> list[str]:
  tasks = [PREFIX + f for f in trained]
  return [f"--gin_file={GIN_FILE}",
          f"--gin.template_mode.mode='{mode}'",
          "--gin.template_mode.eval_mode='instructions'",
          f"--gin.train.seed={seed}",
          f"--gin.train.num_steps={args.steps}",
          f"--gin.train.batch_size={args.batch_size}",
          f"--gin.train.eval_max_examples={args.max_examples}",
          f"--gin.train.model_dir='{model_dir}'",
          f"--gin.register_all.mixtures=[{{'name': '{TRAIN_MIXTURE}', 'tasks': {tasks!r}}}]",
          "--gin.train.vocabulary=@sentencepiece_vocabulary()",
          f"--gin.sentencepiece_vocabulary.path='{vocab_path}'",
          ] + [f"--gin.{b}" for b in args.gin]


def name_eval_argv(model_dir: str, args, heldout: list[str]) -> list[str]:
  return ["--checkpoint", model_dir, "--tasks", ",".join(PREFIX + f for f in heldout),
          "--max_examples", str(args.max_examples), "--out", os.path.join(model_dir, "name_eval"),
          "--gin.template_mode.mode='dataset_name'", "--gin.template_mode.eval_mode='dataset_name'",
          "--gin.evaluate.input_length=192", "--gin.evaluate.max_decode_len=64",
          "--gin.evaluate.batch_size=64", "--gin.evaluate.splits=['validation']",
          "--gin.evaluate.num_samples=0"] + [f"--gin.{b}" for b in args.gin
                                             if b.split(".")[0] in ("T5Config",)]


def _mean(xs):
  xs = [x for x in xs if x is not None]
  return float(statistics.mean(xs)) if xs else None


def chance(options_per_example) -> float | None:
  """Rank classification's chance: the mean of 1 / number of options, in percent."""
  return _mean([100.0 / n for n in options_per_example if n])


def measures(results: list[dict], heldout: list[str]) -> dict:
  """The table's numbers of one run from its end-of-run results (TaskResult JSON)."""
  held = {PREFIX + f for f in heldout}
  pick = lambda split, inside: [r for r in results  # noqa: E731
                                if r["split"] == split and (r["task"] in held) == inside]
  out = {}
  for key, rows in (("heldout_families", pick("validation", True)),
                    ("heldout_templates", pick("heldout_templates", False)),
                    ("seen_templates", pick("validation", False))):
    out[key] = _mean([r["score"] for r in rows])
    out[key + "_baseline"] = _mean([r.get("baseline") for r in rows])
  rows = pick("validation", True)
  out["heldout_families_rank"] = _mean([r.get("rank_classification") for r in rows])
  out["per_task"] = {f"{r['task']}/{r['split']}": round(r["score"], 2) for r in results}
  return out


def _options_chance(heldout: list[str]) -> float | None:
  from flanjax.data.collections import builtin  # pylint: disable=g-import-not-at-top
  counts = [len(ex.get("options") or []) for f in heldout
            for ex in builtin.raw_examples(f, "validation")]
  return chance(counts)


def run_arm(mode, seed, args, trained, heldout, vocab_path) -> dict:
  from flanjax import evaluate as evaluate_cmd  # pylint: disable=g-import-not-at-top
  from flanjax import train as train_cmd  # pylint: disable=g-import-not-at-top
  model_dir = os.path.abspath(os.path.join(args.work, f"{mode}_s{seed}"))
  shutil.rmtree(model_dir, ignore_errors=True)  # each arm trains from scratch
  t0 = time.time()
  from flanjax.run_folder import RunFolder  # pylint: disable=g-import-not-at-top
  train_cmd.main(train_argv(mode, seed, args, trained, vocab_path, model_dir))
  try:
    with open(RunFolder(model_dir).summary_path, encoding="utf-8") as f:
      summary = json.load(f)
  except (OSError, ValueError):
    summary = {}
  if "eval" not in summary:
    raise UserError(f"the {mode} run (seed {seed}) returned no end-of-run evaluation; see "
                    f"its output above and {model_dir}")
  rec = {"mode": mode, "seed": seed, "model_dir": model_dir,
         "train_seconds": round(time.time() - t0, 1),
         "first_loss": summary.get("first_loss"), "last_loss": summary.get("last_loss"),
         **measures(summary["eval"], heldout)}
  if mode == "dataset_name" and args.name_eval:
    t1 = time.time()
    report = evaluate_cmd.main(name_eval_argv(model_dir, args, heldout))
    named = measures([dict(r, baseline=None) for r in report["tasks"]], heldout)
    rec["heldout_families_named"] = named["heldout_families"]
    rec["heldout_families_rank_named"] = named["heldout_families_rank"]
    rec["name_eval_seconds"] = round(time.time() - t1, 1)
  rec["seconds"] = round(time.time() - t0, 1)
  return rec


def _spread(xs) -> dict | None:
  xs = [x for x in xs if x is not None]
  if not xs:
    return None
  return {"mean": round(statistics.mean(xs), 2),
          "sd": round(statistics.stdev(xs), 2) if len(xs) > 1 else 0.0,
          "min": round(min(xs), 2), "max": round(max(xs), 2), "n": len(xs)}


def aggregate(runs: list[dict], modes) -> dict:
  keys = [k for k, _ in MEASURES] + ["heldout_families_named", "heldout_families_rank_named"]
  table = {}
  for mode in modes:
    these = [r for r in runs if r["mode"] == mode]
    table[mode] = {k: _spread([r.get(k) for r in these]) for k in keys}
  base = {}
  for k, _ in MEASURES:
    if not k.endswith("_rank"):
      base[k] = _spread([r.get(k + "_baseline") for r in runs])
  return {"by_mode": table, "baseline": base}


def _cell(s) -> str:
  if not s:
    return "-"
  if s["n"] == 1:
    return f"{s['mean']:.1f}"
  return f"{s['mean']:.1f} ± {s['sd']:.1f} [{s['min']:.0f}-{s['max']:.0f}]"


def _baseline_cell(s) -> str:
  """The majority answer depends on the data alone: one number unless it varied."""
  return "-" if not s else (f"{s['mean']:.1f}" if s["min"] == s["max"] else _cell(s))


def markdown(result: dict) -> str:
  agg, modes = result["table"], result["settings"]["modes"]
  head = "| measure | " + " | ".join(modes) + " | baseline |"
  lines = [head, "|" + " --- |" * (len(modes) + 2)]
  for key, what in MEASURES:
    base = (f"{result['rank_chance']:.1f} (chance)" if key.endswith("_rank") and
            result.get("rank_chance") is not None else _baseline_cell(agg["baseline"].get(key)))
    lines.append(f"| {what} | " + " | ".join(_cell(agg["by_mode"][m][key]) for m in modes)
                 + f" | {base} |")
  if "dataset_name" in modes and any(agg["by_mode"]["dataset_name"].get(k) for k in (
      "heldout_families_named",)):
    named = agg["by_mode"]["dataset_name"]
    lines.append("| held-out families, prompted with the dataset name: exact match % / rank "
                 "classification % | " + " | ".join(
                     f"{_cell(named['heldout_families_named'])} / "
                     f"{_cell(named['heldout_families_rank_named'])}"
                     if m == "dataset_name" else "-" for m in modes) + " | |")
  return "\n".join(lines)


def write(result: dict, out: str) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out + ".json", "w", encoding="utf-8") as f:
    json.dump(result, f, indent=1)
    f.write("\n")
  s = result["settings"]
  with open(out + ".md", "w", encoding="utf-8") as f:
    f.write(f"# FLAN ablation of instructions on the built-in families\n\n"
            f"Command: `{result['command']}`  \nCommit {result['commit']}; {result['machine']['cpu']}, "
            f"{result['machine']['cores']} cores; load average (1 min) mean "
            f"{result['load']['mean_1min']}, max {result['load']['max_1min']}; wall time "
            f"{result['wall_seconds'] / 60:.1f} min for {len(result['runs'])} runs"
            f"{'' if result['complete'] else ' (INCOMPLETE: ' + result['runs_done'] + ')'}.  \n"
            f"Trained on {', '.join(s['trained'])}; held out: {', '.join(s['heldout'])}; "
            f"{s['steps']} steps x {s['batch_size']} rows, seeds {s['seeds']}, "
            f"{s['max_examples']} examples per task and split; evaluated zero-shot with "
            "instructions. Cells: mean ± sd over seeds [min-max].\n")
    if result.get("note"):
      f.write(f"\n{result['note']}\n")
    f.write("\n" + markdown(result) + "\n")


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  heldout = _families(args.heldout)
  trained = [f for f in FAMILIES if f not in heldout]
  if not heldout or len(trained) < 1:
    raise UserError("--heldout: hold out at least one family and train on at least one")
  modes = [m.strip() for m in args.modes.split(",") if m.strip()]
  bad = [m for m in modes if m not in MODES]
  if bad:
    raise UserError(f"--modes {','.join(bad)}: use some of {', '.join(MODES)}")
  try:
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
  except ValueError:
    raise UserError(f"--seeds {args.seeds!r}: give comma-separated integers") from None
  t0, load = time.time(), LoadSampler()
  vocab_path = _instructions_vocabulary(args.vocab_size)
  runs, plan = [], [(m, s) for s in seeds for m in modes]
  settings = {"modes": modes, "seeds": seeds, "steps": args.steps,
              "batch_size": args.batch_size, "max_examples": args.max_examples,
              "trained": trained, "heldout": heldout, "gin": args.gin,
              "gin_file": GIN_FILE, "eval_mode": "instructions",
              "vocabulary": f"{args.vocab_size}-piece BPE on the instructions text"}
  command = "python tools/ablation.py " + " ".join(argv if argv is not None else sys.argv[1:])
  for i, (mode, seed) in enumerate(plan):
    print(f"ablation: run {i + 1}/{len(plan)}: {mode}, seed {seed} "
          f"({(time.time() - t0) / 60:.1f} min so far, load {os.getloadavg()[0]:.1f})",
          flush=True)
    try:
      runs.append(run_arm(mode, seed, args, trained, heldout, vocab_path))
    finally:
      import gin  # pylint: disable=g-import-not-at-top
      gin.clear_config()  # the run's bindings (its template mode) do not outlive it
    done = time.time() - t0
    print(f"ablation: {mode} seed {seed} done in {runs[-1]['seconds']:.0f}s; "
          f"ETA {done / (i + 1) * (len(plan) - i - 1) / 60:.1f} min", flush=True)
    # Written after every run: a run cut short still leaves the seeds it finished.
    result = {
        "command": command, "commit": commit(), "machine": machine(),
        "load": load.summary(), "wall_seconds": round(done, 1),
        "complete": len(runs) == len(plan), "runs_done": f"{len(runs)} of {len(plan)}",
        "note": args.note, "settings": settings, "rank_chance": _options_chance(heldout),
        "table": aggregate(runs, modes), "runs": runs,
    }
    write(result, args.out)
  load.stop()
  print("\n" + markdown(result))
  print(f"\nwrote {args.out}.json and {args.out}.md ({result['wall_seconds'] / 60:.1f} min, "
        f"load {result['load']['mean_1min']} mean)", flush=True)
  return 0


if __name__ == "__main__":
  run_plain_main(main, "ablation")

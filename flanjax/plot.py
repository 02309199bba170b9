"""python -m flanjax.plot RUN_DIR [--out PATH]: a run's curves as a picture.

Draws RUN_DIR/curves.png (matplotlib, Agg backend; no display needed):

  left   training loss (cross-entropy) against steps (each step, and a moving mean)
         from train_losses.jsonl, and the validation loss (eval/loss) of every
         evaluation in eval_during_training.jsonl;
  right  the evaluation metrics: per split, the mean score of the tasks
         (generation) and the token accuracy (teacher-forced), in percent.

The best step is marked in both: the best checkpoint's (checkpoints/best, kept
with train.early_stopping), else the evaluation with the lowest validation
loss. The trainer draws it at the end of every run.
"""

from __future__ import annotations

import argparse
import math
import os

import numpy as np

from flanjax.errors import UserError
from flanjax.run_folder import RunFolder


def _finite(v) -> bool:
  return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def _moving_mean(values: list[float], width: int) -> np.ndarray:
  x = np.asarray(values, np.float64)
  if width <= 1 or len(x) < width:
    return x
  kernel = np.ones(width) / width
  head = np.cumsum(x[:width - 1]) / np.arange(1, width)  # shorter windows at the start
  return np.concatenate([head, np.convolve(x, kernel, mode="valid")])


def curves(run: RunFolder) -> dict:
  """What the picture shows, read from the run folder: train (steps, losses), val
  (steps, losses), metrics {label: (steps, values)}, best (step, label) or None."""
  # Cross-entropy, as the validation loss is (the training loss adds the z-loss).
  train = [(r["step"], r.get("cross_entropy", r.get("loss"))) for r in run.read_losses()]
  train = [(s, v) for s, v in train if _finite(v)]
  evals = run.read_evals()
  val = [(e["step"], e["loss"]) for e in evals if _finite(e.get("loss"))]
  metrics: dict = {}
  for e in evals:
    by_split: dict = {}
    for r in e.get("results", []):
      if _finite(r.get("score")):
        by_split.setdefault(r["split"], []).append(r["score"])
    for split, scores in by_split.items():
      metrics.setdefault(f"score, {split}", []).append((e["step"], float(np.mean(scores))))
    pooled: dict = {}  # split -> [accuracy x tokens, tokens] over its tasks
    for x in e.get("losses", []) or []:
      t = pooled.setdefault(x["split"], [0.0, 0])
      t[0] += x["token_accuracy"] * x["tokens"]
      t[1] += x["tokens"]
    for split, (acc, tokens) in pooled.items():
      if tokens:
        metrics.setdefault(f"token accuracy, {split}", []).append((e["step"], acc / tokens))
  best = run.read_best()
  if best is not None:
    value = best.get("value")
    label = f"best {best.get('metric', '')}" + (f" {value:.4f}" if _finite(value) else "")
    best = (best["step"], f"{label} (step {best['step']})")
  elif val:
    step, loss = min(val, key=lambda p: p[1])
    best = (step, f"lowest validation loss {loss:.4f} (step {step})")
  return {"train": train, "val": val, "metrics": metrics, "best": best}


def write_curves(run: RunFolder | str, out: str | None = None) -> str:
  """Draws the run's curves to `out` (default RUN_DIR/curves.png); returns the path."""
  run = run if isinstance(run, RunFolder) else RunFolder(run)
  data = curves(run)
  if not data["train"] and not data["val"]:
    raise UserError(f"{run.path}: no training losses ({run.losses_path}) and no evaluations "
                    "to draw")
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(12, 4.5))
  try:
    _draw_losses(ax_loss, data)
    _draw_metrics(ax_metric, data)
    fig.suptitle(os.path.basename(run.path) or run.path)
    fig.tight_layout()
    out = out or run.curves_path
    tmp = f"{out}.tmp{os.getpid()}.png"
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, out)  # whole or not at all
  finally:
    plt.close(fig)
  return out


def _mark_best(ax, data, with_label: bool) -> None:
  if data["best"] is not None:
    ax.axvline(data["best"][0], color="tab:green", linestyle="--", linewidth=1,
               label=data["best"][1] if with_label else None)


def _draw_losses(ax, data) -> None:
  if data["train"]:
    steps, losses = zip(*data["train"])
    ax.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=0.8)
    width = max(1, len(losses) // 50)
    ax.plot(steps, _moving_mean(list(losses), width), color="tab:blue",
            label="training loss" + (f" (mean of {width} steps)" if width > 1 else ""))
  if data["val"]:
    steps, losses = zip(*data["val"])
    ax.plot(steps, losses, color="tab:orange", marker="o", markersize=3,
            label="validation loss (eval/loss)")
  _mark_best(ax, data, with_label=True)
  ax.set_xlabel("step")
  ax.set_ylabel("loss (per target token)")
  ax.set_title("loss")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)


def _draw_metrics(ax, data) -> None:
  for label, points in sorted(data["metrics"].items()):
    steps, values = zip(*points)
    ax.plot(steps, values, marker="o", markersize=3, label=label)
  _mark_best(ax, data, with_label=False)
  ax.set_xlabel("step")
  ax.set_ylabel("percent")
  ax.set_title("evaluation metrics")
  ax.grid(alpha=0.3)
  if data["metrics"]:
    ax.legend(fontsize=8)
  else:
    ax.text(0.5, 0.5, "no evaluations recorded", ha="center", va="center",
            transform=ax.transAxes)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(prog="python -m flanjax.plot", description=__doc__.split("\n")[0])
  ap.add_argument("run_dir", help="a training run's folder (--gin.train.model_dir)")
  ap.add_argument("--out", help="the picture's path (default RUN_DIR/curves.png)")
  args = ap.parse_args(argv)
  if not os.path.isdir(args.run_dir):
    raise UserError(f"{args.run_dir} is not a directory: give a training run's folder")
  print(write_curves(args.run_dir, args.out))
  return 0


def command(argv=None) -> None:
  """A user error is one line on stderr and exit 2."""
  from flanjax import config as flan_config  # pylint: disable=g-import-not-at-top
  flan_config.run_plain_main(main, "flanjax.plot", argv)


if __name__ == "__main__":
  from flanjax import config as flan_config  # pylint: disable=g-import-not-at-top
  flan_config.as_command(command)

"""Validation loss on the evaluation path, early stopping, the best checkpoint, curves.png."""

import json
import random
import subprocess
import sys

import jax
import numpy as np
import pytest

from flanjax.training.early_stopping import EarlyStopping, OverfitWatch
from test_train_e2e import _scalar_tags


def brute_force_stop(values, patience, min_delta, maximize=False):
  """(index it stops at or None, index of the best) by the definition, from scratch per index:
  an evaluation is accepted as the best when it beats the last accepted one by more
  than min_delta; stop at the first index `patience` evaluations past the last accepted."""
  def beats(v, ref):
    return v > ref + min_delta if maximize else v < ref - min_delta

  def last_accepted(upto):
    best = 0
    for j in range(1, upto + 1):
      if beats(values[j], values[best]):
        best = j
    return best

  for i in range(len(values)):
    if i - last_accepted(i) >= patience:
      return i, last_accepted(i)
  return None, last_accepted(len(values) - 1)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("patience,min_delta,mode", [(1, 0.0, "min"), (3, 0.0, "min"),
                                                      (2, 0.05, "min"), (3, 0.02, "max")])
def test_early_stopping_equals_a_brute_force_reference(seed, patience, min_delta, mode):
  rng = np.random.default_rng(seed)
  # A noisy U: falls, then rises (overfitting), as validation loss does.
  n = 25
  values = list(np.abs(np.linspace(-1, 1, n)) + rng.normal(0, 0.08, n))
  if mode == "max":
    values = [-v for v in values]
  es = EarlyStopping(metric="eval/mean/validation/score", mode=mode, patience=patience,
                     min_delta=min_delta)
  stopped = None
  for i, v in enumerate(values):
    es.update(step=10 * (i + 1), value=float(v))
    if es.should_stop:
      stopped = i
      break
  want_stop, want_best = brute_force_stop(values, patience, min_delta, mode == "max")
  assert stopped == want_stop
  assert es.best_step == 10 * (want_best + 1)
  assert es.best == pytest.approx(values[want_best])


def test_early_stopping_rules():
  es = EarlyStopping()  # eval/loss: a loss, so lower is better
  assert not es.maximize and EarlyStopping("eval/mean/validation/score").maximize
  assert es.update(4, float("nan")) is False and es.wait == 1  # never a best
  assert es.update(8, 2.0) and es.best_step == 8
  assert es.update(8, 1.0) is False  # a step seen (the end-of-run report of it)
  assert es.update(12, 2.5, counts=False) is False and es.wait == 0  # off the grid
  assert es.update(16, 1.5, counts=False) and es.best_step == 16  # but it may be the best
  with pytest.raises(Exception, match="patience"):
    EarlyStopping(patience=0)
  with pytest.raises(Exception, match="mode"):
    EarlyStopping(mode="lowest")


def test_overfit_warning_needs_validation_rising_while_training_falls():
  w = OverfitWatch(patience=2)
  assert w.update(1, 3.0, 5.0) is None
  assert w.update(2, 3.1, 4.0) is None
  assert "risen for 2 evaluations" in w.update(3, 3.2, 3.0)
  one = OverfitWatch(1)
  one.update(1, 3.0, 4.0)
  assert "has risen for 1 evaluation (step 1" in one.update(2, 3.1, 3.5)
  w = OverfitWatch(patience=2)  # both rising: not overfitting, something else
  for step, (val, train) in enumerate([(3.0, 3.0), (3.1, 3.1), (3.2, 3.2)]):
    assert w.update(step, val, train) is None


# ---------------------------------------------------------------- the real command

def _overfit_file(path, n=64, seed=3):
  """Prompts with random answers: nothing generalises past the words' frequencies, so a
  tiny model memorises the training records and validation loss turns up (this seed and
  size: up three evaluations in a row by 0.04 or more, on the validation records split by
  prompt, since 4f8f84f)."""
  rng = random.Random(seed)
  words = ["red", "blue", "green", "apple", "river", "stone", "cloud", "tiger", "lamp",
           "glass", "moon", "sand"]
  path.write_text("".join(json.dumps({"prompt": f"Item {i}: name the hidden words.",
                                      "completion": " ".join(rng.choice(words) for _ in range(3))})
                          + "\n" for i in range(n)))


def test_a_run_that_overfits_stops_keeps_the_best_and_draws_its_curves(tmp_path, builtin_vocab):
  data, run = tmp_path / "data.jsonl", tmp_path / "run"
  _overfit_file(data)
  patience, num_steps = 3, 60
  args = [sys.executable, "-m", "flanjax.train", "--gin_file=flan.gin",
          "--gin.train.batch_size=8", "--gin.train.task_feature_lengths={'inputs': 48, 'targets': 16}",
          "--gin.T5Config.d_model=32", "--gin.T5Config.d_ff=64", "--gin.T5Config.num_heads=2",
          "--gin.T5Config.d_kv=16", "--gin.train.log_every_secs=0",
          "--gin.Checkpointer.every_steps=4", "--gin.Checkpointer.keep=30",
          "--gin.user_data.tasks=[{'name': 'overfit', 'path': '%s', 'format': "
          "'prompt_completion', 'validation_share': 0.25, 'num_shots': 0}]" % data,
          "--gin.MIXTURE='overfit'", "--gin.corpus_vocabulary.mixture='flanjax_builtin'",
          f"--gin.train.model_dir={run}", f"--gin.train.num_steps={num_steps}",
          "--gin.train.eval_every_steps=4", "--gin.train.eval_max_examples=2",
          "--gin.train.max_decode_len=4", "--gin.schedule.name='constant'",
          "--gin.schedule.peak=0.05", "--gin.schedule.warmup_steps=0",
          "--gin.train.early_stopping=@EarlyStopping()",
          f"--gin.EarlyStopping.patience={patience}"]
  proc = subprocess.run(args, capture_output=True, text=True, timeout=600)
  out = proc.stdout
  assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]

  # The periodic evaluations' validation losses decide, by the definition.
  evals = [json.loads(line) for line in (run / "eval_during_training.jsonl").open()]
  periodic = [e for e in evals if not e["final"]]
  want_stop, want_best = brute_force_stop([e["loss"] for e in periodic], patience, 0.0)
  assert want_stop is not None, [e["loss"] for e in periodic]  # it did overfit
  stop_step, best_step = periodic[want_stop]["step"], periodic[want_best]["step"]
  assert stop_step < num_steps
  assert f"stopped early at step {stop_step}: eval/loss has not improved" in out
  assert "warning: validation loss has risen for 3 evaluations in a row" in out
  summary = json.loads((run / "summary.json").read_text())
  assert summary["step"] == stop_step and summary["best"]["step"] == best_step
  assert summary["best"]["value"] == pytest.approx(periodic[want_best]["loss"])
  assert summary["validation_loss"] == pytest.approx(periodic[want_stop]["loss"])
  # Every evaluation has its per-task, per-split measures, the end-of-run one too.
  assert evals[-1]["final"] and evals[-1]["step"] == stop_step
  for e in evals:
    (split_loss,) = e["losses"]
    assert (split_loss["task"], split_loss["split"]) == ("overfit", "validation")
    assert split_loss["loss"] == pytest.approx(e["loss"]) and 0 <= e["token_accuracy"] <= 100

  # checkpoints/best holds the state of the best step: the rolling checkpoint of that step.
  from flanjax.models import loading
  best = loading.load(str(run / "checkpoints" / "best"))
  same_step = loading.load(str(run), step=best_step)
  assert best.step == best_step and "best checkpoint" in best.source
  for a, b in zip(*(jax.tree.leaves(x.params) for x in (best, same_step))):
    np.testing.assert_array_equal(a, b)

  png = (run / "curves.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000

  tags = _scalar_tags(run / "tensorboard")
  assert {"eval/loss", "eval/token_accuracy", "eval/overfit/validation/loss",
          "eval/overfit/validation/token_accuracy"} <= tags.get(best_step, set())


def test_plot_command_draws_from_the_run_folder(tmp_path):
  from flanjax import plot
  run = tmp_path / "run"
  run.mkdir()
  (run / "train_losses.jsonl").write_text("".join(
      json.dumps({"step": s, "loss": 3 / s, "cross_entropy": 3 / s}) + "\n" for s in range(1, 41)))
  (run / "eval_during_training.jsonl").write_text("".join(json.dumps({
      "step": s, "final": False, "loss": 1 + (s - 20) ** 2 / 400, "token_accuracy": 50.0,
      "results": [{"task": "t", "split": "validation", "score": 40.0}],
      "losses": [{"task": "t", "split": "validation", "loss": 1.0, "token_accuracy": 50.0,
                  "tokens": 10, "batches": 1}]}) + "\n" for s in range(10, 41, 10)))
  assert plot.main([str(run)]) == 0
  data = plot.curves(plot.RunFolder(str(run)))
  assert data["best"][0] == 20 and len(data["val"]) == 4 and len(data["metrics"]) == 2
  assert (run / "curves.png").read_bytes()[:4] == b"\x89PNG"
  # Nothing to draw: one line, exit 2.
  empty = subprocess.run([sys.executable, "-m", "flanjax.plot", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
  assert empty.returncode == 2 and "no training losses" in empty.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("extra,message", [
    ((), "train.early_stopping watches evaluations, and none is set"),
    (("--gin.train.validation_every_steps=5", "--gin.train.validation_batches=0",
      "--gin.train.eval_every_steps=5"), "train.validation_batches=0 measures no validation loss")])
def test_early_stopping_without_its_evaluations_is_refused_before_the_run_folder(
    tmp_path, extra, message):
  run = tmp_path / "run"
  proc = subprocess.run(
      [sys.executable, "-m", "flanjax.train", "--gin_file=flan.gin", f"--gin.train.model_dir={run}",
       "--gin.train.early_stopping=@EarlyStopping()", *extra],
      capture_output=True, text=True, timeout=600)
  assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
  assert message in proc.stderr and "Traceback" not in proc.stderr
  assert not run.exists()  # nothing made, nothing to clean up


def test_one_tasks_score_has_the_mean_tag_early_stopping_can_watch():
  # A user's own data is one task: its split has no MEAN row, but the tag the README
  # gives for early stopping (eval/mean/<split>/score) must exist all the same.
  from flanjax.evaluation import report  # pylint: disable=g-import-not-at-top
  one = report.TaskResult("user_data", "validation", 20, {"rouge_l": 41.5}, "rouge_l")
  tags = report.scalars([one])
  assert tags["eval/mean/validation/score"] == 41.5
  assert "MEAN" not in report.format_results([one])  # no table row for a mean of one
  two = [one, report.TaskResult("other", "validation", 10, {"accuracy": 60.0}, "accuracy")]
  assert report.scalars(two)["eval/mean/validation/score"] == pytest.approx((41.5 + 60) / 2)
  es = EarlyStopping(metric="eval/mean/validation/score", patience=1)
  assert es.update(4, tags["eval/mean/validation/score"]) and es.maximize

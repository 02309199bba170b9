"""tools/ablation.py at a minuscule size: one mode, one seed, a few steps of a 32-d T5."""

import importlib.util
import json
import statistics

import pytest

from conftest import REPO
from flanjax.run_folder import RunFolder


def _tool():
  spec = importlib.util.spec_from_file_location("ablation_tool", REPO / "tools" / "ablation.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def ablation(tmp_path_factory):
  tool = _tool()
  tmp = tmp_path_factory.mktemp("ablation")
  out = tmp / "result"
  argv = ["--steps", "3", "--seeds", "0", "--modes", "dataset_name", "--heldout", "parity",
          "--batch_size", "4", "--max_examples", "6", "--work", str(tmp / "runs"),
          "--out", str(out), "--vocab_size", "1000",
          "--gin", "T5Config.d_model=32", "--gin", "T5Config.d_ff=64",
          "--gin", "train.task_feature_lengths={'inputs': 96, 'targets': 48}",
          "--gin", "train.eval_tasks=['builtin_parity', 'builtin_comparison']",
          "--gin", "train.validation_batches=0"]
  assert tool.main(argv) == 0
  return tool, json.loads((tmp / "result.json").read_text()), (tmp / "result.md").read_text()


def test_the_driver_trains_evaluates_and_writes_the_table(ablation):
  tool, result, md = ablation
  assert result["complete"] and result["runs_done"] == "1 of 1"
  assert result["settings"]["heldout"] == ["parity"] and "parity" not in result["settings"][
      "trained"]
  assert result["machine"]["cores"] >= 1 and result["load"]["samples"] >= 1
  assert result["command"].startswith("python tools/ablation.py --steps 3")
  (run,) = result["runs"]
  # The run's numbers are its own summary's, read back from the run folder.
  with open(RunFolder(run["model_dir"]).summary_path, encoding="utf-8") as f:
    summary = json.load(f)
  by = {(r["task"], r["split"]): r for r in summary["eval"]}
  assert run["heldout_families"] == by[("builtin_parity", "validation")]["score"]
  assert run["heldout_families_baseline"] == by[("builtin_parity", "validation")]["baseline"]
  assert run["heldout_templates"] == by[("builtin_comparison", "heldout_templates")]["score"]
  assert run["seen_templates"] == by[("builtin_comparison", "validation")]["score"]
  assert run["heldout_families_rank"] == by[("builtin_parity", "validation")][
      "rank_classification"]
  # The dataset_name arm is also scored with names as prompts, options ranked from the
  # options feature (its prompts have no option header).
  with open(f"{run['model_dir']}/name_eval/eval.json", encoding="utf-8") as f:
    named = json.load(f)
  (parity,) = named["tasks"]
  assert parity["samples"] == [] and run["heldout_families_named"] == parity["score"]
  assert parity["rank_examples"] == 6 and run["heldout_families_rank_named"] == parity[
      "rank_classification"]
  # One row per measure, the mode's column and the baseline's; chance is 1/2 for parity.
  assert result["rank_chance"] == 50.0
  for _, what in tool.MEASURES:
    assert what in md
  assert "| measure | dataset_name | baseline |" in md


def test_the_spread_over_seeds_is_mean_sd_and_range():
  tool = _tool()
  runs = [{"mode": "no_template", "heldout_families": x, "heldout_families_baseline": 50.0}
          for x in (40.0, 55.0, 61.0)]
  agg = tool.aggregate(runs, ["no_template"])
  cell = agg["by_mode"]["no_template"]["heldout_families"]
  assert cell == {"mean": round(statistics.mean([40, 55, 61]), 2),
                  "sd": round(statistics.stdev([40, 55, 61]), 2), "min": 40.0, "max": 61.0,
                  "n": 3}
  assert agg["baseline"]["heldout_families"]["mean"] == 50.0
  assert tool.chance([2, 2, 4]) == pytest.approx(100 * (0.5 + 0.5 + 0.25) / 3)


def test_bad_arguments_are_one_line():
  tool = _tool()
  from flanjax.errors import UserError
  with pytest.raises(UserError, match="not a built-in family"):
    tool.main(["--heldout", "poetry"])
  with pytest.raises(UserError, match="--modes plain"):
    tool.main(["--modes", "plain"])

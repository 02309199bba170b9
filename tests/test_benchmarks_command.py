"""benchmarks/command_bench.py: the console's figures read back, and a minuscule whole run."""

import json
import math
import os
import statistics
import subprocess
import sys

import pytest

from benchmarks import command_bench

CONSOLE = """\
vocabulary: 1000 pieces
training: 12 steps of 8 rows x (160 + 48) tokens; logs and checkpoints in /tmp/x
step      1/12  loss 7.3945  lr 1.00e-04  0.01 steps/s  49 tok/s (41 real)  ETA 2:44:18
step      4/12  loss 7.1000  lr 4.00e-04  0.60 steps/s  1,000 tok/s (900 real)  ETA 0:13
step      7/12  loss 6.9000  lr 7.00e-04  0.62 steps/s  1,040 tok/s (930 real)  ETA 0:08
step     10/12  loss 6.5000  lr 1.00e-03  0.58 steps/s  960 tok/s (860 real)  ETA 0:03
step     12/12  loss 6.4000  lr 1.20e-03  0.40 steps/s  666 tok/s (600 real)  ETA 0:00
stopped by nothing
"""


def test_console_lines_and_late_intervals():
  lines, shape = command_bench.parse_progress(CONSOLE)
  assert shape == {"num_steps": 12, "batch_size": 8, "lengths": {"inputs": 160, "targets": 48}}
  assert [x["step"] for x in lines] == [1, 4, 7, 10, 12]
  assert lines[2] == {"step": 7, "steps_per_s": 0.62, "tokens_per_s": 1040.0,
                      "real_tokens_per_s": 930.0}
  # Lines every 5 s: the compile's interval and the forced last one are left out.
  late = command_bench.late_intervals(lines, 12, 0, 5.0)
  assert [x["step"] for x in late] == [4, 7, 10]
  assert [x["step"] for x in command_bench.late_intervals(lines, 12, 4, 5.0)] == [7, 10]
  # A line every step: the last is a whole interval.
  assert [x["step"] for x in command_bench.late_intervals(lines, 12, 0, 0)] == [4, 7, 10, 12]


TINY = ["--gin=train.batch_size=8", "--gin=train.task_feature_lengths={'inputs': 160, 'targets': 48}",
        "--gin=T5Config.d_model=32", "--gin=T5Config.d_ff=64", "--gin=T5Config.num_heads=2",
        "--gin=T5Config.d_kv=16", "--gin=train.log_every_secs=0", "--gin=T5Config.remat=True",
        "--gin=train.label_smoothing=0.1"]


def test_minuscule_run_records_every_figure(tmp_path, builtin_vocab):
  out = tmp_path / "command.json"
  proc = subprocess.run(
      [sys.executable, "-m", "benchmarks.command_bench", *TINY, "--flanjax_steps=8",
       "--skip_steps=2", "--warmup=1", "--windows=5", "--steps_per_window=1", "--quiet",
       f"--out={out}"], capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  r = json.loads(out.read_text())
  fj, th = r["flanjax"], r["torch"]
  assert r["job"]["batch_size"] == 8 and r["job"]["lengths"] == {"inputs": 160, "targets": 48}
  assert r["job"]["tokens_per_step"] == 8 * 208
  # flanjax: the console's late lines (steps 3..8, one a step), their median, min and max.
  assert fj["window_end_steps"] == [3, 4, 5, 6, 7, 8] and fj["windows"] == 6
  assert fj["tokens_per_s"] == statistics.median(fj["window_rates"])
  assert fj["tokens_per_s_min"] == min(fj["window_rates"]) > 0
  assert fj["tokens_per_s_max"] == max(fj["window_rates"])
  assert math.isclose(fj["steps_per_s"], fj["tokens_per_s"] / (8 * 208), rel_tol=1e-3)
  assert fj["steps"] == 8 and "--gin.train.num_steps=8" in fj["command"]
  run_dir = [a.split("=", 1)[1] for a in fj["command"] if a.startswith("--gin.train.model_dir=")]
  assert len(run_dir) == 1 and not os.path.exists(run_dir[0])  # the temporary run is removed
  assert 0 < fj["non_padding_share"] <= 1 and fj["data_wait_seconds"] >= 0
  assert 0 <= fj["data_wait_share_of_step"] and 0 <= fj["data_wait_share_of_train_seconds"] <= 1
  # PyTorch: 5 windows of one step each, the same model as the command trained.
  assert th["windows"] == 5 and len(th["window_rates"]) == 5
  assert th["tokens_per_s_min"] <= th["tokens_per_s"] <= th["tokens_per_s_max"]
  from flanjax.models import kinds, loading  # pylint: disable=g-import-not-at-top
  (tmp_path / "model.json").write_text(json.dumps(r["job"]["model"]))
  cfg = loading.config_from_file(str(tmp_path / "model.json"))
  import jax  # pylint: disable=g-import-not-at-top
  assert th["num_params"] == sum(x.size for x in jax.tree.leaves(kinds.abstract_params(cfg)))
  for f in (fj, th, r["flanjax_step"]):
    assert len(f["load_before"]) == 3 and len(f["load_after"]) == 3
    assert isinstance(f["quiet"], bool) and f["others_cpu_share"] is not None
  assert r["ratio"] == round(fj["tokens_per_s"] / th["tokens_per_s"], 3)
  # The command's own step alone, timed as PyTorch's loop is, on the same model.
  st = r["flanjax_step"]
  assert st["num_params"] == th["num_params"] and st["windows"] == 5
  assert st["tokens_per_s"] == statistics.median(st["window_rates"]) > 0
  assert st["tokens_per_s_min"] <= st["tokens_per_s"] <= st["tokens_per_s_max"]
  assert r["step_ratio"] == round(st["tokens_per_s"] / th["tokens_per_s"], 3)
  assert r["command_of_step"] == round(fj["tokens_per_s"] / st["tokens_per_s"], 3)
  assert "flanjax step alone / PyTorch" in proc.stdout
  # ... with the command's training fields and loss settings, which run_info.json leaves out.
  assert r["job"]["model_training"]["remat"] is True and st["model_training"]["remat"] is True
  assert st["step_settings"]["label_smoothing"] == 0.1 and st["step_settings"]["z_loss"] == 1e-4
  assert isinstance(r["quiet"], bool) and r["machine"]["cores"] >= 1 and r["commit"]
  assert "flanjax / PyTorch" in proc.stdout


def test_readmes_amd_command_rows_are_the_committed_json():
  """The README's command table on the AMD host: the figures of command_cpu_amd_ad5f95a.json."""
  import pathlib
  repo = pathlib.Path(command_bench.__file__).resolve().parent.parent
  r = json.loads((repo / "benchmarks" / "results" / "command_cpu_amd_ad5f95a.json").read_text())
  assert r["quiet"] and r["commit"] == "ad5f95a"
  readme = (repo / "README.md").read_text()
  for name, key in (("flanjax command (console, 9 late intervals)", "flanjax"),
                    ("flanjax step alone (5 windows of 4 steps)", "flanjax_step"),
                    ("PyTorch loop (eager, 5 windows of 4 steps)", "torch")):
    f = r[key]
    row = (f"| {name} | {f['tokens_per_s']:,.0f} [{f['tokens_per_s_min']:,.0f}-"
           f"{f['tokens_per_s_max']:,.0f}] | {f['steps_per_s']:.2f} |")
    assert row in readme, row
  assert r["flanjax"]["windows"] == 9
  text = " ".join(readme.split())
  assert (f"The step alone runs {r['step_ratio']:.2f}x PyTorch's loop; the command reaches "
          f"{100 * r['command_of_step']:.0f}% of its step alone") in text
  assert (f"the command is at **{r['ratio']:.2f}x** PyTorch ({r['ratio_min_max'][0]:.2f}x-"
          f"{r['ratio_min_max'][1]:.2f}x over the windows' extremes)") in text


def test_readmes_two_amd_command_runs_at_3e1ebbb_are_the_committed_jsons():
  """The README's two-run command table at 3e1ebbb: each cell is its JSON's figure; the
  second run is marked not quiet in its JSON and in its file's name."""
  import pathlib
  repo = pathlib.Path(command_bench.__file__).resolve().parent.parent
  runs = [json.loads((repo / "benchmarks" / "results" /
                      f"command_cpu_amd_3e1ebbb_run{n}.json").read_text())
          for n in ("1", "2_not_quiet")]
  assert all(r["commit"].startswith("3e1ebbb") for r in runs)
  assert runs[0]["quiet"] and not runs[1]["quiet"]
  readme = (repo / "README.md").read_text()
  cell = lambda f: (f"{f['tokens_per_s']:,.0f} [{f['tokens_per_s_min']:,.0f}-"  # noqa: E731
                    f"{f['tokens_per_s_max']:,.0f}]")
  for name, key in (("flanjax command (console, late intervals)", "flanjax"),
                    ("flanjax step alone (5 windows of 4 steps)", "flanjax_step"),
                    ("PyTorch loop (eager, 5 windows of 4 steps)", "torch")):
    row = f"| {name} | {cell(runs[0][key])} | {cell(runs[1][key])} |"
    assert row in readme, row
  text = " ".join(readme.split())
  a, b = runs
  assert (f"at **{a['ratio']:.2f}x** and **{b['ratio']:.2f}x** PyTorch "
          f"({a['ratio_min_max'][0]:.2f}x-{a['ratio_min_max'][1]:.2f}x and "
          f"{b['ratio_min_max'][0]:.2f}x-{b['ratio_min_max'][1]:.2f}x over the windows' "
          "extremes); its step alone at "
          f"{a['step_ratio']:.2f}x and {b['step_ratio']:.2f}x; the command kept "
          f"{100 * a['command_of_step']:.0f}% and {100 * b['command_of_step']:.0f}%") in text


@pytest.mark.parametrize("json_name,commit", [("command_cpu_amd_ef9d321.json", "ef9d321"),
                                              ("command_cpu_intel_ed15ca5.json", "ed15ca5")])
def test_readmes_one_run_command_tables_are_the_committed_jsons(json_name, commit):
  """The README's one-run command tables (AMD at ef9d321, Intel at ed15ca5): each cell and
  ratio is its JSON's."""
  import pathlib
  repo = pathlib.Path(command_bench.__file__).resolve().parent.parent
  r = json.loads((repo / "benchmarks" / "results" / json_name).read_text())
  assert r["commit"].startswith(commit) and r["quiet"]
  readme = (repo / "README.md").read_text()
  cell = lambda f: (f"{f['tokens_per_s']:,.0f} [{f['tokens_per_s_min']:,.0f}-"  # noqa: E731
                    f"{f['tokens_per_s_max']:,.0f}]")
  for name, key in ((f"flanjax command (console, {r['flanjax']['windows']} late intervals)",
                     "flanjax"),
                    ("flanjax step alone (5 windows of 4 steps)", "flanjax_step"),
                    ("PyTorch loop (eager, 5 windows of 4 steps)", "torch")):
    row = f"| {name} | {cell(r[key])} |"
    assert row in readme, row
  text = " ".join(readme.split())
  assert (f"The command is at **{r['ratio']:.2f}x** PyTorch ({r['ratio_min_max'][0]:.2f}x-"
          f"{r['ratio_min_max'][1]:.2f}x over the windows' extremes), its step alone at "
          f"{r['step_ratio']:.2f}x; the command kept {100 * r['command_of_step']:.0f}% of its "
          "step alone") in text
  assert f"`benchmarks/results/{json_name}`" in text
  assert {"ef9d321": "(1.09x in a quiet run at ef9d321;",
          "ed15ca5": "(1.71x in a quiet run at ed15ca5,"}[commit] in text

"""Checkpointer.restore_latest: only damaged checkpoints are moved aside.

A tiny train state (three random arrays, optimizer state of flanjax's
adafactor or adamw) saved at steps 2 and 4. A resume with another
optimizer, or one whose restore fails for a reason of its own (out of
memory, a bug), leaves every file as it was; a step whose files are missing
or cut short goes to <step>.unreadable and the step before it is used.
"""

import glob
import hashlib
import os

import jax
import numpy as np
import pytest

from flanjax.errors import UserError
from flanjax.training import checkpoints, optimizers


def make_state(opt="adafactor", emb_rows=256):
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  params = {"dense": {"kernel": jax.random.normal(k1, (128, 64)),
                      "bias": jax.random.normal(k2, (64,))},
            "emb": jax.random.normal(k3, (emb_rows, 128))}
  tx, _ = optimizers.optimizer(name=opt, learning_rate=1e-3)
  return {"params": params, "opt_state": tx.init(params),
          "step": jax.numpy.zeros((), jax.numpy.int32)}


def abstract(state):
  sh = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return checkpoints.abstract_like(state, jax.tree.map(lambda _: sh, state))


def tree_digest(path):
  """Every file's relative path and bytes, and every folder's name."""
  h = hashlib.sha256()
  for root, dirs, files in sorted(os.walk(path)):
    dirs.sort()
    h.update(b"D" + os.path.relpath(root, path).encode())
    for f in sorted(files):
      p = os.path.join(root, f)
      with open(p, "rb") as fh:
        h.update(b"F" + os.path.relpath(p, path).encode() + fh.read())
  return h.hexdigest()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """A model dir with adafactor checkpoints at steps 2 and 4 (positions 20 and 40)."""
  d = tmp_path_factory.mktemp("run")
  state = make_state()
  ck = checkpoints.Checkpointer(str(d), async_save=False)
  for step in (2, 4):
    state = dict(state, step=jax.numpy.asarray(step, jax.numpy.int32))
    assert ck.save(step, state, step * 10)
  ck.close()
  return d


@pytest.fixture
def run(saved, tmp_path):
  """A fresh copy of the saved run, and a Checkpointer on it."""
  import shutil
  d = tmp_path / "run"
  shutil.copytree(saved, d)
  ck = checkpoints.Checkpointer(str(d), async_save=False)
  yield d, ck
  ck.close()


def names(d):
  return sorted(os.listdir(d / "checkpoints"))


def test_a_whole_checkpoint_restores(run):
  d, ck = run
  state, position, step = ck.restore_latest(abstract(make_state()))
  assert (step, position, int(state["step"])) == (4, 40, 4)
  np.testing.assert_array_equal(state["params"]["emb"], make_state()["params"]["emb"])
  assert ck.find_damage(4) is None and ck.find_damage(2) is None


@pytest.mark.parametrize("other,needles", [
    ("adamw", ["holds optimizer state of another optimizer",
               "it has opt_state/0/0/v/", "this run has opt_state/0/0/mu/"]),
])
def test_another_optimizer_is_one_line_and_nothing_is_touched(run, other, needles):
  d, ck = run
  before, listing = tree_digest(d), names(d)
  with pytest.raises(UserError) as e:
    ck.restore_latest(abstract(make_state(other)))
  msg = str(e.value)
  assert "\n" not in msg and msg.startswith("checkpoint step 4 in ")
  for n in needles:
    assert n in msg, msg
  assert "--gin.train.model_dir" in msg
  assert names(d) == listing == ["2", "4"]
  assert tree_digest(d) == before


def test_an_optimizer_state_of_another_shape_is_one_line(run, tmp_path):
  """Same optimizer, a leaf of another shape (a factored statistic of another length)."""
  d, ck = run
  before = tree_digest(d)
  want = abstract(make_state())
  want["opt_state"][0][0].v_row["emb"] = jax.ShapeDtypeStruct(
      (512,), want["opt_state"][0][0].v_row["emb"].dtype,
      sharding=want["opt_state"][0][0].v_row["emb"].sharding)
  with pytest.raises(UserError, match=r"holds optimizer state .* \(it has "
                     r"opt_state/0/0/v_row/emb of shape \(128,\), this run \(512,\)\)"):
    ck.restore_latest(want)
  assert tree_digest(d) == before


def test_adafactor_with_weight_decay_has_another_layout(run):
  """Weight decay adds an (empty) element to adafactor's chain: the leaves are the same, the
  tree orbax restores onto is not."""
  d, ck = run
  before = tree_digest(d)
  state = make_state()
  tx, _ = optimizers.optimizer(name="adafactor", learning_rate=1e-3, weight_decay=0.01)
  with pytest.raises(UserError, match=r"holds optimizer state .* \(it has no opt_state/0/5\)"):
    ck.restore_latest(abstract(dict(state, opt_state=tx.init(state["params"]))))
  assert tree_digest(d) == before


def test_another_model_is_one_line_naming_the_parameter(run):
  d, ck = run
  before = tree_digest(d)
  with pytest.raises(UserError, match=r"checkpoint step 4 .* holds another model \(it has "
                     r"params/emb of shape \(256, 128\), this run \(300, 128\)\)"):
    ck.restore_latest(abstract(make_state(emb_rows=300)))
  assert tree_digest(d) == before


@pytest.mark.parametrize("error,expect", [
    (MemoryError(), UserError),
    (ValueError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.2G"), UserError),
    (RuntimeError("a bug in the restore path"), RuntimeError),
    (TypeError("unexpected keyword"), TypeError),
])
def test_a_restore_that_fails_for_its_own_reason_moves_nothing(run, monkeypatch, capsys, error,
                                                               expect):
  d, ck = run
  before = tree_digest(d)

  def fail(*args, **kwargs):
    raise error
  monkeypatch.setattr(ck.manager, "restore", fail)
  with pytest.raises(expect) as e:
    ck.restore_latest(abstract(make_state()))
  if expect is UserError:
    msg = str(e.value)
    assert "\n" not in msg and "checkpoint step 4" in msg and "out of memory" in msg
    assert "left as it is" in msg
  else:
    assert e.value is error
    assert "yet its files read back whole; nothing was moved" in capsys.readouterr().out
  assert names(d) == ["2", "4"] and tree_digest(d) == before


def test_metadata_read_failing_for_its_own_reason_moves_nothing(run, monkeypatch):
  d, ck = run
  before = tree_digest(d)

  def fail(*args, **kwargs):
    raise RuntimeError("no metadata today")
  monkeypatch.setattr(ck.manager, "item_metadata", fail)
  with pytest.raises(RuntimeError, match="no metadata today"):
    ck.restore_latest(abstract(make_state()))
  assert tree_digest(d) == before


def test_files_that_cannot_be_checked_are_not_guessed_damaged(run, monkeypatch, capsys):
  d, ck = run
  before = tree_digest(d)
  monkeypatch.setattr(ck.manager, "restore", lambda *a, **k: (_ for _ in ()).throw(
      RuntimeError("restore failed")))
  monkeypatch.setattr(checkpoints, "_arrays_damage", lambda *a: (_ for _ in ()).throw(
      ValueError("PERMISSION_DENIED: Error opening file")))
  with pytest.raises(RuntimeError, match="restore failed"):
    ck.restore_latest(abstract(make_state()))
  assert "could not be checked" in capsys.readouterr().out
  assert tree_digest(d) == before


def _largest_data_file(step_dir):
  files = glob.glob(str(step_dir / "state" / "ocdbt.process_*" / "d" / "*"))
  return max(files, key=os.path.getsize)


def _truncate(path, size=None):
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2 if size is None else size)


def _every_state_file_halved(step_dir):
  for root, _, files in os.walk(step_dir / "state"):
    for f in files:
      _truncate(os.path.join(root, f))


DAMAGE = {
    "data file cut short": (lambda s: _truncate(_largest_data_file(s)), "OUT_OF_RANGE"),
    "data file emptied": (lambda s: _truncate(_largest_data_file(s), 0), "does not read"),
    "data file deleted": (lambda s: os.remove(_largest_data_file(s)), "does not read"),
    "b-tree node deleted": (lambda s: [os.remove(p) for p in glob.glob(str(s / "state/d/*"))],
                            "NOT_FOUND"),
    "state metadata deleted": (lambda s: os.remove(s / "state" / "_METADATA"),
                               "state/_METADATA is missing"),
    "state metadata cut short": (lambda s: _truncate(s / "state" / "_METADATA"),
                                 "state/_METADATA does not parse"),
    "data position cut short": (lambda s: _truncate(s / "data" / "metadata"),
                                "data/metadata does not parse"),
    "ocdbt manifest deleted": (lambda s: os.remove(s / "state" / "manifest.ocdbt"),
                               "state/manifest.ocdbt is missing"),
    "every state file halved": (_every_state_file_halved, "does not parse"),
}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_a_damaged_newest_step_is_moved_aside_and_the_one_before_used(run, capsys, kind):
  d, ck = run
  ckdir = d / "checkpoints"
  older = tree_digest(ckdir / "2")
  damage, words = DAMAGE[kind]
  damage(ckdir / "4")
  assert ck.find_damage(4) is not None
  state, position, step = ck.restore_latest(abstract(make_state()))
  assert (step, position, int(state["step"])) == (2, 20, 2)
  out = capsys.readouterr().out
  assert f"checkpoint step 4 in {ckdir} does not restore, it is damaged (" in out
  assert words in out, out
  assert "moved to 4.unreadable" in out and "resuming from step 2" in out
  assert names(d) == ["2", "4.unreadable"]
  assert tree_digest(ckdir / "2") == older  # the step used is untouched
  assert ck.all_steps() == [2]


def test_every_step_damaged_is_one_line_after_moving_them(run, capsys):
  d, ck = run
  for step in ("2", "4"):
    os.remove(d / "checkpoints" / step / "state" / "_METADATA")
  with pytest.raises(UserError, match=r"no checkpoint in .* restores onto this model \(step 4: "
                     r"state/_METADATA is missing; step 2: state/_METADATA is missing\)"):
    ck.restore_latest(abstract(make_state()))
  assert names(d) == ["2.unreadable", "4.unreadable"]


def test_a_damaged_step_before_a_mismatch_is_moved_then_the_mismatch_stops(run):
  """The newest step is damaged (moved), the older one holds adafactor state: this run's adamw
  stops there, with that step untouched."""
  d, ck = run
  _truncate(_largest_data_file(d / "checkpoints" / "4"))
  older = tree_digest(d / "checkpoints" / "2")
  # The damage is in array data, which a metadata-only check does not see: with another
  # optimizer the mismatch of step 4 stops the run before any array is read.
  with pytest.raises(UserError, match="checkpoint step 4 .* another optimizer"):
    ck.restore_latest(abstract(make_state("adamw")))
  assert names(d) == ["2", "4"]
  os.remove(d / "checkpoints" / "4" / "state" / "_METADATA")
  with pytest.raises(UserError, match="checkpoint step 2 .* another optimizer"):
    ck.restore_latest(abstract(make_state("adamw")))
  assert names(d) == ["2", "4.unreadable"]
  assert tree_digest(d / "checkpoints" / "2") == older


def test_tree_difference_names_the_first_path():
  have = {("params", "a"): (2,), ("opt_state", "0", "v_row", "a"): (1,),
          ("opt_state", "0", "v_col", "a"): (1,), ("step",): ()}
  want = {("params", "a"): (2,), ("opt_state", "0", "mu", "a"): (2,),
          ("opt_state", "0", "nu", "a"): (2,), ("step",): ()}
  assert checkpoints.tree_difference(have, have) is None
  part, words = checkpoints.tree_difference(have, want)
  assert part == "opt_state"
  assert words == "has opt_state/0/v_col/a, this run has opt_state/0/mu/a; 2 more paths differ"
  part, words = checkpoints.tree_difference({**have, ("params", "a"): (3,)}, want)
  assert (part, words) == ("params", "has params/a of shape (3,), this run (2,)")
  assert checkpoints.tree_difference({("step",): ()}, {("step",): (), ("rng",): (2,)}) == (
      "rng", "has no rng")


# ------------------------------------------------------------------ optimizer description

CONFIGS = [dict(name="adafactor"), dict(name="adafactor", grad_clip=1.0),
           dict(name="adafactor", weight_decay=0.01), dict(name="adafactor", weight_decay=0.02),
           dict(name="adamw"), dict(name="adamw", weight_decay=0.1),
           dict(name="adamw", grad_clip=1.0), dict(name="adamw", grad_clip=2.0),
           dict(name="adamw", b1=0.8)]


def test_describe_reads_gin_and_is_json():
  import json

  import gin
  assert optimizers.describe() == {"name": "adafactor", "grad_clip": None, "weight_decay": 0.0,
                                   **optimizers.ADAFACTOR_SETTINGS}
  with gin.unlock_config():
    gin.parse_config("optimizer.name = 'adamw'\noptimizer.grad_clip = 1\n"
                     "optimizer.b2 = 0.95\nschedule.peak = 0.5")
  try:
    got = optimizers.describe()
  finally:
    gin.clear_config()
  assert got == {"name": "adamw", "grad_clip": 1.0, "weight_decay": 0.0, "b1": 0.9, "b2": 0.95}
  assert json.loads(json.dumps(got)) == got
  assert optimizers.describe(name="adamw", weight_decay=0.1)["weight_decay"] == 0.1


@pytest.mark.parametrize("a", range(len(CONFIGS)))
def test_compare_flags_exactly_the_changes_of_the_state_tree(a):
  """compare()'s state changes against the truth: the optimizer states' trees (leaf paths,
  shapes and empty entries, as a resume checks them) of the two configurations."""
  params = make_state()["params"]

  def layout(cfg):
    tx, _ = optimizers.optimizer(learning_rate=1e-3, **cfg)
    return checkpoints._shapes(tx.init(params))

  for b in range(len(CONFIGS)):
    state, other = optimizers.compare(optimizers.describe(**CONFIGS[a]),
                                      optimizers.describe(**CONFIGS[b]))
    assert bool(state) == (layout(CONFIGS[a]) != layout(CONFIGS[b])), (CONFIGS[a], CONFIGS[b])
    assert (a == b) == (not state and not other)
  state, other = optimizers.compare(optimizers.describe(name="adafactor"),
                                    optimizers.describe(name="adamw", grad_clip=1.0))
  assert state[0] == "name: 'adafactor' -> 'adamw'" and "grad_clip: None -> 1.0" in state


def test_a_run_recorded_before_a_model_field_existed_resumes_and_a_changed_one_is_refused(
    tmp_path):
  import dataclasses
  from flanjax.errors import UserError
  from flanjax.models.decoder import DecoderConfig
  from flanjax.run_folder import ADDED_MODEL_FIELDS, RunFolder, model_record
  run = RunFolder(str(tmp_path))
  cfg = DecoderConfig(vocab_size=128, d_model=16, num_heads=2, num_kv_heads=2, head_dim=8,
                      d_ff=32, num_layers=1)
  now = {"mixture": "m", "vocabulary": "v", "model": model_record(cfg), "kind": "prefix_lm"}
  assert set(ADDED_MODEL_FIELDS) - {"scan_layers"} <= set(now["model"])
  older = {k: v for k, v in now["model"].items() if k not in ADDED_MODEL_FIELDS}
  run.write_run_info(dict(now, model=older))
  run.check_run_info(now)  # recorded before sliding_window, qkv_bias and qk_norm: the same
  for field, value in (("qkv_bias", True), ("qk_norm", True), ("sliding_window", 64)):
    with pytest.raises(UserError, match=rf"different model config .*'{field}'"):
      run.check_run_info(dict(now, model=model_record(dataclasses.replace(cfg, **{field: value}))))
  # scan_layers (recorded only when True) reads False, not None, and the fix says so.
  with pytest.raises(UserError, match=r"\{'scan_layers': False\}, now \{'scan_layers': True\}\).*"
                     r"resumes in the layout it trained in: set scan_layers=False again"):
    run.check_run_info(dict(now, model=model_record(dataclasses.replace(cfg, scan_layers=True))))

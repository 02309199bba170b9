"""The same losses on every mesh of 8 simulated CPU devices as on one device."""

import json
import os
import subprocess
import sys

import pytest
from conftest import devices_env

from flanjax.training import partitioning


@pytest.fixture(scope="module")
def worker(builtin_vocab):
  """One process of 16 simulated devices for the module (a process start and JAX's set-up
  cost more than either part): _mesh_worker.py's losses on meshes of 8 devices, then the
  divisibility cases below; {"meshes": ..., "divisible": ...}. The workers read the
  session's built-in vocabulary from its cache."""
  env = devices_env(16)
  script = ("import sys; sys.path.insert(0, sys.argv[1]); import _mesh_worker\n"
            "_mesh_worker.main()\nprint('\\n--- divisible ---')\n" + _DIVISIBLE_WORKER)
  proc = subprocess.run([sys.executable, "-c", script, os.path.dirname(__file__)], env=env,
                        capture_output=True, text=True, timeout=1200)
  assert proc.returncode == 0, proc.stderr[-3000:]
  meshes, divisible = proc.stdout.split("\n--- divisible ---\n")
  return {"meshes": json.loads(meshes.strip().splitlines()[-1]),
          "divisible": json.loads(divisible.strip().splitlines()[-1])}


def test_meshes_agree_with_one_device(worker):
  res = worker["meshes"]
  ref = res["(1, 1, 1)"]["losses"]
  assert len(ref) == 5 and ref[-1] < ref[0]
  for shape in ("(8, 1, 1)", "(2, 2, 2)", "(1, 1, 8)"):
    assert res[shape]["losses"] == pytest.approx(ref, abs=1e-5), shape
  # The parameters really are split: vocab over `model`, embed over `fsdp`.
  for shape in ("(1, 1, 8)", "(2, 2, 2)"):
    assert res[shape]["embedding_spec"] in ("P('model', 'fsdp')",
                                            "PartitionSpec('model', 'fsdp')"), res[shape]
    assert res[shape]["embedding_shards"] == 8


def test_mesh_shape_errors():
  import jax
  with pytest.raises(ValueError, match="at most one entry may be -1"):
    partitioning.make_mesh((-1, -1, 1))
  with pytest.raises(ValueError, match="needs 3 devices"):
    partitioning.make_mesh((3, 1, 1), jax.devices()[:1])


# ------------------------------------------------------------------ divisibility

# Runs in a subprocess with 16 simulated devices: each case's check_divisible outcome
# (None or its message) and what JAX itself does with that batch or model ("ok" or the
# exception's type), so the check is held to the failures it stands for.
_DIVISIBLE_WORKER = r"""
import json, sys
import jax, numpy as np, optax
from flanjax.errors import UserError
from flanjax.models import t5
from flanjax.training import partitioning, trainer

def mesh(shape, n=8):
  return partitioning.make_mesh(shape, jax.devices()[:n])

def model(**kw):
  cfg = dict(vocab_size=1024, d_model=32, d_kv=8, d_ff=64, num_heads=8,
             num_encoder_layers=1, num_decoder_layers=1)
  cfg.update(kw)
  return t5.T5(t5.T5Config(**cfg))

def check(**kw):
  try:
    partitioning.check_divisible(**kw)
    return None
  except UserError as e:
    return str(e)

def real(fn):
  try:
    fn()
    return "ok"
  except Exception as e:
    return type(e).__name__

out = {}
for name, shape, batch in [("batch4_data8", (8, 1, 1), 4), ("batch12_data8", (8, 1, 1), 12),
                           ("batch8_data8", (8, 1, 1), 8), ("batch8_data4_fsdp2", (4, 2, 1), 8)]:
  m = mesh(shape)
  out[name] = [check(mesh=m, batch_size=batch, num_processes=1), real(
      lambda: partitioning.global_batch({"x": np.zeros((batch, 3), np.int32)}, m))]
out["micro4"] = [check(mesh=mesh((2, 2, 2)), batch_size=8, microbatches=4, num_processes=1)]
out["micro3"] = [check(mesh=mesh((2, 2, 2)), batch_size=8, microbatches=3, num_processes=1)]
out["micro2"] = [check(mesh=mesh((2, 2, 2)), batch_size=8, microbatches=2, num_processes=1)]
# Two processes of 8 devices each, one batch of 8 rows in all.
out["two_processes"] = [check(mesh=mesh((16, 1, 1), 16), batch_size=8, num_processes=2)]
dummy = t5.dummy_batch(1, 8, 8)
rules = partitioning.logical_rules()
for name, shape, kw in [("heads6_model8", (1, 1, 8), dict(num_heads=6)),
                        ("dff60_model8", (1, 1, 8), dict(d_ff=60)),
                        ("dmodel36_fsdp8", (1, 8, 1), dict(d_model=36)),
                        ("fits_222", (2, 2, 2), {})]:
  mdl, m = model(**kw), mesh(shape)
  params = jax.eval_shape(lambda: mdl.init(jax.random.PRNGKey(0), **dummy))["params"]
  out[name] = [check(mesh=m, batch_size=8, params=params, rules=rules, num_processes=1),
               real(lambda: trainer.create_sharded_state(mdl, optax.adafactor(1e-2), m, rules,
                                                         0, dummy))]
json.dump(out, sys.stdout)
"""


@pytest.fixture(scope="module")
def divisible_cases(worker):
  return worker["divisible"]


def test_check_divisible_agrees_with_jax(divisible_cases):
  """Each case the check refuses, JAX fails too (and the reverse): the check only
  says earlier, in one line, what JAX would say from inside train."""
  for name, res in divisible_cases.items():
    if len(res) == 2:
      assert (res[0] is None) == (res[1] == "ok"), (name, res)
      assert res[1] in ("ok", "IndivisibleError", "ValueError"), (name, res)
    if res[0] is not None:
      assert "\n" not in res[0] and res[0].count(";") == 1, (name, res[0])


def test_batch_messages_name_axes_sizes_and_a_batch_that_works(divisible_cases):
  c = divisible_cases
  assert c["batch8_data8"][0] is None and c["batch8_data4_fsdp2"][0] is None
  assert c["micro2"][0] is None and c["fits_222"][0] is None
  assert c["batch4_data8"][0] == (
      "train.batch_size=4 does not divide over the 8 data-parallel devices of mesh {'data': 8, "
      "'fsdp': 1, 'model': 1} (its axes data x fsdp); use --gin.train.batch_size=8 (a multiple "
      "of 8), or a mesh with fewer data-parallel devices (--gin.train.mesh_shape)")
  assert "--gin.train.batch_size=16 (a multiple of 8)" in c["batch12_data8"][0]
  assert ("gives microbatches of 2 rows (train.microbatches=4), which do not divide over the 4 "
          "data-parallel devices of mesh {'data': 2, 'fsdp': 2, 'model': 2}"
          in c["micro4"][0] and "--gin.train.batch_size=16 (a multiple of 16)" in c["micro4"][0])
  assert ("does not split into train.microbatches=3 equal parts" in c["micro3"][0]
          and "--gin.train.batch_size=12 (a multiple of 12), or another "
          "--gin.train.microbatches" in c["micro3"][0])
  two = c["two_processes"][0]
  assert "16 data-parallel devices" in two and "--gin.train.batch_size=16" in two


def test_parameter_messages_name_the_axis_and_a_mesh_that_works(divisible_cases):
  c = divisible_cases
  heads = c["heads6_model8"][0]
  assert heads.startswith("parameter decoder_layer_0/cross_attention/k (shape (32, 6, 8)) does "
                          "not divide over mesh axis 'model' of size 8: its 'heads' dimension "
                          "is 6 (")
  assert "--gin.train.mesh_shape=(-1, 1, 2)" in heads and "num_heads is a multiple of 8" in heads
  dff = c["dff60_model8"][0]
  assert "'mlp' dimension is 60" in dff and "--gin.train.mesh_shape=(-1, 1, 4)" in dff
  assert "d_ff is a multiple of 8" in dff
  emb = c["dmodel36_fsdp8"][0]
  assert "mesh axis 'fsdp' of size 8: its 'embed' dimension is 36" in emb
  assert "--gin.train.mesh_shape=(-1, 4, 1)" in emb and "d_model is a multiple of 8" in emb


def test_make_mesh_says_when_it_falls_back_to_plain_order(monkeypatch, capsys):
  import jax

  def no_topology(*args, **kwargs):
    raise ValueError("cannot place this topology\nsecond line")
  monkeypatch.setattr(partitioning.mesh_utils, "create_device_mesh", no_topology)
  mesh = partitioning.make_mesh((1, 1, 1), jax.devices()[:1])
  assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "model": 1}
  out = capsys.readouterr().out
  assert ("note: mesh {'data': 1, 'fsdp': 1, 'model': 1} laid out in plain device order over 1 "
          in out and "(JAX's topology-aware layout failed: cannot place this topology)" in out)

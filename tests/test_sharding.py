"""The same losses on every mesh of 8 simulated CPU devices as on one device."""

import json
import os
import subprocess
import sys

import pytest

from flanjax.training import partitioning


def test_meshes_agree_with_one_device(builtin_vocab):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__),
                                                      "_mesh_worker.py")],
                        env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  res = json.loads(proc.stdout.strip().splitlines()[-1])
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

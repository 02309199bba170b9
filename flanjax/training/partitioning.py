"""Device mesh, logical axis rules and the shardings derived from them.

The model names its axes (embed, mlp, heads, vocab, ...); one table maps those
names to the mesh axes (data, fsdp, model). Changing the parallelism is
changing that table or the mesh shape, never the model.
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import gin
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "model")

# Logical name -> mesh axis (or None: replicated). FSDP shards the embed axis
# of every weight; tensor parallelism shards heads, mlp and vocab.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("mlp", "model"),
    ("heads", "model"),
    ("kv", None),
    ("vocab", "model"),
    ("relpos_buckets", None),
)


@gin.configurable
def make_mesh(shape: Sequence[int] = (-1, 1, 1),
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, model) mesh; one -1 entry takes the remaining devices."""
  devices = list(devices if devices is not None else jax.devices())
  shape = list(shape)
  if len(shape) != 3:
    raise ValueError(f"mesh shape {shape} must have 3 entries (data, fsdp, model)")
  if shape.count(-1) > 1:
    raise ValueError(f"mesh shape {shape}: at most one entry may be -1")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if len(devices) % known:
      raise ValueError(f"mesh shape {shape} does not divide {len(devices)} devices")
    shape[shape.index(-1)] = len(devices) // known
  if math.prod(shape) != len(devices):
    raise ValueError(f"mesh shape {shape} needs {math.prod(shape)} devices, "
                     f"but {len(devices)} are available")
  try:
    arr = jax.experimental.mesh_utils.create_device_mesh(shape, devices)
  except Exception:  # pylint: disable=broad-except
    arr = np.asarray(devices).reshape(shape)  # CPU or unusual topologies
  return Mesh(arr, MESH_AXES)


@gin.configurable
def logical_rules(rules=DEFAULT_RULES):
  return tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in rules)


def shardings_of(abstract_tree, mesh: Mesh, rules) -> object:
  """NamedShardings for a tree of (possibly boxed) abstract arrays."""
  specs = nn.get_partition_spec(abstract_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(("data", "fsdp")))


def global_batch(local: dict, mesh: Mesh) -> dict:
  """Assembles per-host numpy batches into global jax.Arrays sharded on batch."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}

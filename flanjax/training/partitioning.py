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
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from flanjax.errors import UserError

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
  fix = "; set --gin.train.mesh_shape=(data, fsdp, model), one entry -1 for the rest"
  if len(shape) != 3:
    raise UserError(f"mesh shape {shape} must have 3 entries (data, fsdp, model){fix}")
  if shape.count(-1) > 1:
    raise UserError(f"mesh shape {shape}: at most one entry may be -1{fix}")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if len(devices) % known:
      raise UserError(f"mesh shape {shape} does not divide {len(devices)} devices{fix}")
    shape[shape.index(-1)] = len(devices) // known
  if math.prod(shape) != len(devices):
    raise UserError(f"mesh shape {shape} needs {math.prod(shape)} devices, "
                    f"but {len(devices)} are available{fix}")
  try:
    arr = mesh_utils.create_device_mesh(shape, devices)
  except Exception as e:  # pylint: disable=broad-except
    # Unusual topologies: the devices in their listed order, which may put
    # neighbours of a mesh axis far apart (slower collectives, same results).
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    print(f"note: mesh {dict(zip(MESH_AXES, shape))} laid out in plain device order over "
          f"{len(devices)} {devices[0].platform} devices (JAX's topology-aware layout failed: "
          f"{reason})", flush=True)
    arr = np.asarray(devices).reshape(shape)
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


# ------------------------------------------------------------------ divisibility

# What a user changes to resize each logical axis of the models.
_AXIS_FIELDS = {"heads": "num_heads", "kv_heads": "num_kv_heads", "mlp": "d_ff",
                "embed": "d_model", "vocab": "vocab_size", "kv": "d_kv"}


def _axes_size(mesh: Mesh, axes) -> tuple[tuple[str, ...], int]:
  """(mesh axis names, product of their sizes) of one PartitionSpec entry."""
  if axes is None:
    return (), 1
  names = tuple(axes) if isinstance(axes, (tuple, list)) else (axes,)
  return names, math.prod(mesh.shape[a] for a in names)


def _axes_words(mesh: Mesh, names) -> str:
  if len(names) == 1:
    return f"mesh axis '{names[0]}' of size {mesh.shape[names[0]]}"
  return (f"mesh axes {' x '.join(names)} of size "
          f"{' x '.join(str(mesh.shape[a]) for a in names)}")


def _nearest_multiple(n: int, k: int) -> int:
  """The multiple of k nearest n (the larger one on a tie), at least k."""
  lo = (n // k) * k
  return max(k, lo if n - lo < lo + k - n else lo + k)


def check_divisible(mesh: Mesh, batch_size: int, microbatches: int = 1, params=None,
                    rules=None, num_processes: int | None = None) -> None:
  """A one-line UserError if the batch or a parameter does not split evenly over `mesh`.

  batch_size: the global batch (all processes); it must split into
  `microbatches` parts, over the processes, and each microbatch over the
  batch's mesh axes (those of batch_sharding: data x fsdp). params: a tree of
  the model's abstract parameters with their logical axis names (boxed, as
  `jax.eval_shape(model.init, ...)["params"]` gives them); each dimension
  must divide over the mesh axes `rules` (default logical_rules()) map its
  name to. The message names the axis and sizes, and a batch size or mesh
  that works.
  """
  batch_axes, n = _axes_size(mesh, batch_sharding(mesh).spec[0])
  procs = jax.process_count() if num_processes is None else int(num_processes)
  micro = max(int(microbatches), 1)
  need = math.lcm(n * micro, procs)
  if batch_size <= 0 or batch_size % need:
    devices = (f"the {n} data-parallel devices of mesh {dict(mesh.shape)} (its axes "
               f"{' x '.join(batch_axes)})")
    fix = "or a mesh with fewer data-parallel devices (--gin.train.mesh_shape)"
    if micro > 1 and batch_size % micro:
      why = f"does not split into train.microbatches={micro} equal parts"
      fix = "or another --gin.train.microbatches"
    elif batch_size % procs:
      why = f"does not split over the {procs} processes"
    elif micro > 1:
      why = (f"gives microbatches of {batch_size // micro} rows (train.microbatches={micro}), "
             f"which do not divide over {devices}")
    else:
      why = f"does not divide over {devices}"
    raise UserError(
        f"train.batch_size={batch_size} {why}; use "
        f"--gin.train.batch_size={_nearest_multiple(batch_size, need)} (a multiple of {need}), "
        + fix)
  if params is None:
    return
  rules = logical_rules() if rules is None else rules
  bad = []
  boxed = lambda x: isinstance(x, nn.meta.AxisMetadata)  # noqa: E731
  for path, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=boxed)[0]:
    if not boxed(leaf) or not getattr(leaf, "names", None):
      continue  # an unnamed parameter is replicated
    spec = P(*leaf.names)
    shape = tuple(nn.unbox(leaf).shape)
    mesh_spec = nn.logical_to_mesh_axes(spec, rules)
    for dim, (logical, axes) in enumerate(zip(spec, mesh_spec)):
      names, size = _axes_size(mesh, axes)
      if size > 1 and shape[dim] % size:
        bad.append((path, dim, logical, names, size, shape))
  if bad:
    path, dim, logical, names, size, shape = bad[0]
    name = "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                    for k in path)
    width = shape[dim]
    fit = math.gcd(width, size)
    field = _AXIS_FIELDS.get(logical)
    if len(names) == 1:
      shape_now = dict(mesh.shape)
      shape_now[names[0]] = fit
      if names[0] != "data":
        shape_now["data"] = -1  # the devices freed go to data parallelism
      fix = (f"a mesh whose '{names[0]}' axis divides {width} (e.g. --gin.train.mesh_shape="
             f"({', '.join(str(shape_now[a]) for a in MESH_AXES)}))")
    else:
      fix = f"a mesh whose {' x '.join(names)} size divides {width}"
    if field:
      fix += f", or a model whose {field} is a multiple of {size}"
    more = len({b[0] for b in bad}) - 1
    raise UserError(
        f"parameter {name} (shape {shape}) does not divide over {_axes_words(mesh, names)}: "
        f"its '{logical}' dimension is {width}"
        + (f" ({more} more parameters alike)" if more else "")
        + f"; use {fix}")

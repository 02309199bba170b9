"""Layer stacks of both model kinds: a loop of named layers, or one layer under nn.scan.

Unscanned (the default, and the layout of every file flanjax reads or writes:
Hugging Face weights, PEFT adapters, converted checkpoints) a stack is layers
named `<prefix>_<i>` (encoder_layer_0, ..., layer_31), each traced and compiled
on its own. With the config's `scan_layers`, the stack is one module named
`<prefix>s` (encoder_layers, decoder_layers, layers) run under nn.scan: every
parameter (and LoRA adapter) gets a leading axis of the layer count, named
'layers' for the partitioner (no rule maps it, so it is never sharded), and XLA
compiles one layer's body however deep the model is.

`scan_params` / `unscan_params` convert any tree keyed like the params (params,
adapters, their logical axis names) between the two layouts; `layout` gives the
one a config's model applies with. Both are no-ops on a tree already in the
wanted layout.

`remat_policy` names what the backward pass keeps of each layer's forward pass
(jax.checkpoint_policies): 'none' (everything, no recomputation), 'full' (only
the layer's input; `remat=True` means this), 'dots_saveable' (every matmul's
output), 'dots_with_no_batch_dims_saveable' (the projections' outputs, not the
attention scores).
"""

from __future__ import annotations

import re
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flanjax.errors import UserError

LAYERS_AXIS = "layers"
PREFIXES = ("encoder_layer", "decoder_layer", "layer")
_UNSCANNED = re.compile(r"^(encoder_layer|decoder_layer|layer)_(\d+)$")
REMAT_POLICIES = {
    "none": None,
    "full": lambda: jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": lambda: jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable":
        lambda: jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def check_config(owner: str, cfg) -> None:
  if cfg.remat_policy not in REMAT_POLICIES:
    raise UserError(f"{owner}.remat_policy={cfg.remat_policy!r} is not one of "
                     f"{', '.join(REMAT_POLICIES)}")
  alpha = cfg.neftune_alpha
  if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha >= 0:
    raise UserError(f"{owner}.neftune_alpha={alpha!r} must be 0 (off) or more; NEFTune's "
                    "paper used 5 to 15")


def policy_name(cfg) -> str:
  """The remat policy in force: remat_policy, or 'full' for remat=True without one."""
  if cfg.remat_policy != "none":
    return cfg.remat_policy
  return "full" if cfg.remat else "none"


def layer_class(cls, cfg, static_argnums: tuple):
  """The layer class under the config's remat policy (static_argnums: `deterministic`'s
  position counted with self as 0)."""
  name = policy_name(cfg)
  if name == "none":
    return cls
  # Under scan the body is traced once: CSE across its iterations cannot undo the remat.
  return nn.remat(cls, static_argnums=static_argnums, policy=REMAT_POLICIES[name](),
                  prevent_cse=not cfg.scan_layers)


def build(cls, cfg, num: int, prefix: str, static_argnums: tuple):
  """The stack's modules, for a parent's setup(): a list of `num` layers named
  `<prefix>_<i>`, or (scan_layers) the one scanned layer, named `<prefix>s`."""
  cls = layer_class(cls, cfg, static_argnums)
  if cfg.scan_layers:
    return cls(cfg, name=f"{prefix}s")
  return [cls(cfg, name=f"{prefix}_{i}") for i in range(num)]


def _scan(fn: Callable, length: int):
  # Per-layer inputs and outputs (decoding caches) keep the batch first and the layers
  # second, so that decoding's beam search reorders every state leaf on axis 0 alike.
  return nn.scan(fn, variable_axes={"params": 0, "lora": 0},
                 split_rngs={"params": True, "dropout": True}, length=length,
                 in_axes=1, out_axes=1, metadata_params={nn.PARTITION_NAME: LAYERS_AXIS})


def run(layers, length: int, x, *args, per_layer: dict | None = None, **kwargs):
  """x through every layer: layer(x, *args, **kwargs, **(layer i's slice of per_layer)).

  A layer returns x or (x, out); run returns (x, outs): a list of the outs
  unscanned, the outs stacked on axis 1 scanned (None without outs). per_layer values:
  lists (unscanned) or trees stacked on axis 1 (scanned), as run and `each` return them."""
  per_layer = per_layer or {}
  if isinstance(layers, (list, tuple)):
    outs = []
    for i, layer in enumerate(layers):
      y = layer(x, *args, **kwargs, **{k: v[i] for k, v in per_layer.items()})
      x, out = y if isinstance(y, tuple) else (y, None)
      outs.append(out)
    return x, (None if all(o is None for o in outs) else outs)

  def body(layer, carry, xs):
    y = layer(carry, *args, **kwargs, **xs)
    return y if isinstance(y, tuple) else (y, None)

  return _scan(body, length)(layers, x, per_layer)


def each(layers, length: int, fn: Callable):
  """fn(layer) of every layer: a list unscanned, stacked on axis 1 scanned."""
  if isinstance(layers, (list, tuple)):
    return [fn(layer) for layer in layers]
  return _scan(lambda layer, carry, _: (carry, fn(layer)), length)(layers, (), {})[1]


def cache_length(cache) -> int:
  """The positions a decoding cache holds ([..., batch, positions, heads, head_dim])."""
  return jax.tree.leaves(cache)[0].shape[-3]


# ---------------------------------------------------------------- parameter layouts

def is_scanned(tree) -> bool:
  return isinstance(tree, dict) and any(f"{p}s" in tree for p in PREFIXES)


def _map_leaves(fn, node):
  if isinstance(node, dict):
    return {k: _map_leaves(fn, v) for k, v in node.items()}
  return fn(node)


def _zip_leaves(fn, nodes: list, where: str):
  if isinstance(nodes[0], dict):
    keys = set(nodes[0])
    if any(set(n) != keys for n in nodes[1:]):
      raise UserError(f"{where}: the layers hold different entries ({sorted(keys)} and "
                      f"{sorted(next(set(n) for n in nodes if set(n) != keys))}), so they "
                      "cannot be stacked for scan_layers; set scan_layers=False")
    return {k: _zip_leaves(fn, [n[k] for n in nodes], f"{where}/{k}") for k in nodes[0]}
  return fn(nodes)


def _stack(leaves):
  if isinstance(leaves[0], tuple):  # logical axis names
    return (LAYERS_AXIS,) + leaves[0]
  if isinstance(leaves[0], nn.LogicallyPartitioned):
    return leaves[0].replace(value=_stack([x.value for x in leaves]),
                             names=(LAYERS_AXIS,) + tuple(leaves[0].names))
  if all(isinstance(x, np.ndarray) for x in leaves):
    return np.stack(leaves)
  return jnp.stack(leaves)


def _slice(leaf, i: int):
  if isinstance(leaf, tuple):  # logical axis names
    return leaf[1:]
  if isinstance(leaf, nn.LogicallyPartitioned):
    return leaf.replace(value=leaf.value[i], names=tuple(leaf.names)[1:])
  return leaf[i]


def _depth(node) -> int:
  if isinstance(node, dict):
    return _depth(next(iter(node.values())))
  if isinstance(node, nn.LogicallyPartitioned):
    return node.value.shape[0]
  return np.shape(node)[0]


def scan_params(tree: dict, counts: dict | None = None) -> dict:
  """`<prefix>_<i>` subtrees stacked into `<prefix>s` (params, adapters or axis names).

  counts: {prefix: number of layers} to check (a stack must hold every layer)."""
  groups: dict = {}
  out = {}
  for k, v in tree.items():
    m = _UNSCANNED.match(k)
    if m:
      groups.setdefault(m.group(1), {})[int(m.group(2))] = v
    else:
      out[k] = v
  for prefix, layers in groups.items():
    n = (counts or {}).get(prefix, len(layers))
    if sorted(layers) != list(range(n)):
      missing = sorted(set(range(n)) - set(layers))
      raise UserError(f"{prefix}s: scan_layers stacks every layer alike, but "
                      f"{prefix}_{missing[0] if missing else max(layers)} differs from the "
                      "others (e.g. LoRA on some layers only); set scan_layers=False")
    out[f"{prefix}s"] = _zip_leaves(_stack, [layers[i] for i in range(n)], f"{prefix}s")
  return out


def unscan_params(tree: dict) -> dict:
  """The inverse of scan_params: `<prefix>s` split into `<prefix>_<i>`."""
  out = {}
  for k, v in tree.items():
    if k[:-1] in PREFIXES and k.endswith("s") and isinstance(v, dict):
      for i in range(_depth(v)):
        out[f"{k[:-1]}_{i}"] = _map_leaves(lambda x, i=i: _slice(x, i), v)
    else:
      out[k] = v
  return out


def axes_of(flat_axes: dict, path) -> tuple:
  """The logical axis names of the unscanned parameter `path` ('a/b/c' -> names of either
  layout, e.g. kinds.abstract_params' of a scanned model)."""
  key = "/".join(path)
  if key in flat_axes:
    return tuple(flat_axes[key])
  m = _UNSCANNED.match(path[0])
  scanned = "/".join((f"{m.group(1)}s",) + tuple(path[1:])) if m else key
  if scanned not in flat_axes:
    raise KeyError(key)
  return tuple(flat_axes[scanned])[1:]


def layer_counts(cfg) -> dict:
  if hasattr(cfg, "num_encoder_layers"):
    return {"encoder_layer": cfg.num_encoder_layers, "decoder_layer": cfg.num_decoder_layers}
  return {"layer": cfg.num_layers}


def layout(tree: dict, cfg) -> dict:
  """tree in the layout cfg's model applies with (scanned or not)."""
  if getattr(cfg, "scan_layers", False):
    return scan_params(unscan_params(tree), layer_counts(cfg))
  return unscan_params(tree)



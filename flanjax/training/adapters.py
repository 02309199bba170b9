"""Parameter-efficient fine-tuning in the trainer: the frozen base and the trained adapters.

train.peft = @LoraConfig() (models/lora.py) trains LoRA adapters over the
model of train.init_from; train.init_adapter = a PEFT adapter folder starts
them from its weights (and takes its rank, alpha and targets). The train state
is the adapters' alone (params, optimizer state, step, rng), so checkpoints and
the optimizer hold nothing of the base; the base stays on the devices beside
it, sharded by the same logical rules, optionally in bfloat16, and enters the
step as an argument that has no gradient. run_info.json records the adapter
config and the base (path and fingerprint): resuming over another base is
refused.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flanjax.errors import UserError
from flanjax.models import kinds, lora


fingerprint = lora.fingerprint


@dataclasses.dataclass
class Adapters:
  """LoRA over a base model: which projections, the base's host params, the start weights."""
  config: lora.LoraConfig
  model_config: Any
  sites: list
  base: Any  # host params of the base model
  base_info: dict  # {"path", "fingerprint"}
  start: Any = None  # adapter weights to start from (a PEFT folder's), else A random, B 0

  def describe(self) -> dict:
    return dict(self.config.describe(), modules=len(self.sites), base=self.base_info)

  def num_params(self) -> int:
    r = self.config.rank
    return sum(r * (int(np.prod(s.in_shape)) + int(np.prod(s.out_shape))) for s in self.sites)

  def base_dtype(self):
    return jnp.dtype(self.config.base_dtype)

  # ------------------------------------------------------------ trees
  def boxed(self, rng):
    """The adapter tree with its logical axis names (A: the kernel's input axes, B: its
    output axes, the rank axis unsharded)."""
    axes = lora.logical_axes(self.sites, _kernel_axes(self.model_config))
    values = (lora.init(self.sites, self.config.rank, rng) if self.start is None
              else jax.tree.map(jnp.asarray, self.start))
    return jax.tree.map(lambda v, names: nn.LogicallyPartitioned(v, names=names), values, axes)

  def variables(self, base, adapters) -> dict:
    return lora.variables(base, adapters, self.config.scale)

  def merged(self, base, adapters, dtype=jnp.float32):
    return lora.merge(base, adapters, self.config.scale, dtype=dtype)


def _kernel_axes(cfg) -> dict:
  """'a/b/c' -> the logical axis names of each base parameter."""
  boxed = kinds.abstract_params(cfg, unbox=False)
  flat = jax.tree_util.tree_flatten_with_path(boxed, is_leaf=lambda x: isinstance(
      x, nn.Partitioned))[0]
  return {"/".join(str(kinds._key_name(k)) for k in path): leaf.names  # pylint: disable=protected-access
          for path, leaf in flat}


def setup(peft, model_config, params, init_from: str | None,
          init_adapter: str | None = None) -> Adapters | None:
  """The run's adapters (train.peft, train.init_adapter), or None for full fine-tuning."""
  if peft is None and init_adapter is None:
    return None
  if peft is not None and not isinstance(peft, lora.LoraConfig):
    raise UserError(f"train.peft must be @LoraConfig(), not {type(peft).__name__}")
  if params is None or not init_from:
    raise UserError("train.peft trains adapters over a pretrained model: bind train.init_from "
                    "(its Hugging Face folder)")
  start = None
  if init_adapter:
    config, start, sites = lora.read_peft(init_adapter, model_config)
    if peft is not None:  # the run's dropout and base dtype; the folder's shapes
      config = dataclasses.replace(config, dropout=peft.dropout, base_dtype=peft.base_dtype)
  else:
    config = peft
    sites = lora.select(model_config, config.targets)
  for s in sites:
    lora.check_rank(s, config.rank)
  info = {"path": os.path.abspath(init_from), "fingerprint": fingerprint(params)}
  out = Adapters(config, model_config, sites, params, info, start)
  total = sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(params))
  print(f"LoRA: rank {config.rank}, alpha {config.alpha:g} on {len(sites)} modules "
        f"({', '.join(sorted({s.short for s in sites}))}): {out.num_params():,} trainable "
        f"parameters, {100 * out.num_params() / total:.2f}% of the base's {total:,}"
        + (f"; started from {os.path.abspath(init_adapter)}" if init_adapter else ""),
        flush=True)
  return out


class Bound:
  """The base model with its frozen params bound: apply({"params": adapters}, ...) runs it
  with the adapters, so the trainer's step differentiates the adapters only."""

  def __init__(self, model, base, adapters: Adapters):
    self.model, self.base, self.adapters = model, base, adapters
    self.config = model.config

  def apply(self, variables, *args, **kwargs):
    with lora.dropout(self.adapters.config.dropout):
      return self.model.apply(self.adapters.variables(self.base, variables["params"]),
                              *args, **kwargs)

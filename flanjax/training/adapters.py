"""Parameter-efficient fine-tuning in the trainer: the frozen base and the trained adapters.

train.peft = @LoraConfig() (models/lora.py) trains LoRA adapters, and
@PromptTuningConfig() (models/prompt_tuning.py) a soft prompt, over the
model of train.init_from; train.init_adapter = a PEFT adapter folder starts
them from its weights (and takes its rank, alpha and targets, or its length). The train state
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
from flanjax.models import kinds, lora, prompt_tuning
from flanjax.models.prompt_hook import KEY


fingerprint = lora.fingerprint


@dataclasses.dataclass
class Adapters:
  """Weights trained over a frozen base: the config, the base's host params and what they
  are (path, fingerprint), the start weights (a PEFT folder's) if any."""
  config: Any
  model_config: Any
  sites: list  # LoRA: the adapted projections
  base: Any  # host params of the base model
  base_info: dict  # {"path", "fingerprint"}
  start: Any = None  # adapter weights to start from, else the method's initialisation

  def describe(self) -> dict:
    return dict(self.config.describe(), modules=len(self.sites), base=self.base_info)

  @property
  def dropout(self) -> float:
    return getattr(self.config, "dropout", 0.0)

  def base_dtype(self):
    return jnp.dtype(getattr(self.config, "base_dtype", "float32"))

  def kind(self, kind):
    """The model kind the adapted model is read with."""
    return kind

  def merged_shardings(self, base_shardings, params_shardings):
    """The shardings of `merged`'s output."""
    del params_shardings
    return base_shardings


class LoraAdapters(Adapters):
  """LoRA over a base model: which projections, A random and B 0 unless `start`."""

  def rank(self, site) -> int:
    """A module's rank: the config's, or a started adapter's own (PEFT's rank_pattern)."""
    return self.config.rank if self.start is None else lora.site_rank(self.start, site)

  def num_params(self) -> int:
    return sum(self.rank(s) * (int(np.prod(s.in_shape)) + int(np.prod(s.out_shape)))
               for s in self.sites)

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


class PromptAdapters(Adapters):
  """A soft prompt over a base model (prompt tuning): the train state is {KEY: [n, d]}."""

  def num_params(self) -> int:
    return int(np.prod(np.shape(self.start)))

  def boxed(self, rng):
    del rng  # started in setup, from the base's embeddings or a PEFT folder
    return {KEY: nn.LogicallyPartitioned(jnp.asarray(self.start, jnp.float32),
                                         names=(None, "embed"))}

  def variables(self, base, adapters) -> dict:
    return {"params": self.merged(base, adapters)}

  def merged(self, base, adapters, dtype=None):
    del dtype  # the base is not changed
    return prompt_tuning.merge(base, adapters[KEY])

  def merged_shardings(self, base_shardings, params_shardings):
    return prompt_tuning.merge(base_shardings, params_shardings[KEY])

  def kind(self, kind):
    return kinds.with_soft_prompt(kind, prompt_tuning.virtual_ids(
        self.model_config, self.config.num_virtual_tokens))


def _kernel_axes(cfg) -> dict:
  """'a/b/c' -> the logical axis names of each base parameter."""
  boxed = kinds.abstract_params(cfg, unbox=False)
  flat = jax.tree_util.tree_flatten_with_path(boxed, is_leaf=lambda x: isinstance(
      x, nn.Partitioned))[0]
  return {"/".join(str(kinds._key_name(k)) for k in path): leaf.names  # pylint: disable=protected-access
          for path, leaf in flat}


def setup(peft, model_config, params, init_from: str | None,
          init_adapter: str | None = None, vocab=None, seed: int = 0) -> Adapters | None:
  """The run's adapters (train.peft, train.init_adapter), or None for full fine-tuning."""
  if peft is None and init_adapter is None:
    return None
  if isinstance(peft, (list, tuple)):
    raise UserError("train.peft takes one method: @LoraConfig() or @PromptTuningConfig(), "
                    "not both")
  if peft is not None and not isinstance(peft, (lora.LoraConfig,
                                                prompt_tuning.PromptTuningConfig)):
    raise UserError("train.peft must be @LoraConfig() or @PromptTuningConfig(), not "
                    f"{type(peft).__name__}")
  if params is None or not init_from:
    raise UserError("train.peft trains adapters over a pretrained model: bind train.init_from "
                    "(its Hugging Face folder)")
  info = {"path": os.path.abspath(init_from), "fingerprint": fingerprint(params)}
  folder = prompt_tuning.peft_type(init_adapter) if init_adapter else None
  prompted = isinstance(peft, prompt_tuning.PromptTuningConfig)
  if folder is not None and peft is not None and (folder == "PROMPT_TUNING") != prompted:
    raise UserError(f"train.init_adapter {init_adapter} is a {folder} adapter and train.peft "
                    f"a {type(peft).__name__}: one method at a time, give a matching pair")
  if prompted or folder == "PROMPT_TUNING":
    out = _prompt_adapters(peft, model_config, params, info, init_adapter, vocab, seed)
    what = (f"prompt tuning: {out.config.num_virtual_tokens} virtual tokens "
            f"(init {out.config.init})")
  else:
    out = _lora_adapters(peft, model_config, params, info, init_adapter)
    c = out.config
    others = sorted({out.rank(s) for s in out.sites} - {c.rank})  # PEFT's rank_pattern
    rank = f"{c.rank} (some modules {', '.join(map(str, others))})" if others else c.rank
    what = (f"LoRA: rank {rank}, alpha {c.alpha:g} on {len(out.sites)} modules "
            f"({', '.join(sorted({s.short for s in out.sites}))})")
  total = sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(params))
  print(f"{what}: {out.num_params():,} trainable parameters, "
        f"{100 * out.num_params() / total:.2f}% of the base's {total:,}"
        + (f"; started from {os.path.abspath(init_adapter)}" if init_adapter else ""),
        flush=True)
  return out


def _lora_adapters(peft, model_config, params, info, init_adapter):
  start = None
  if init_adapter:
    config, start, sites = lora.read_peft(init_adapter, model_config)
    if peft is not None:  # the run's dropout and base dtype; the folder's shapes
      config = dataclasses.replace(config, dropout=peft.dropout, base_dtype=peft.base_dtype)
  else:
    config = peft
    sites = lora.select(model_config, config.targets)
  for s in sites:
    lora.check_rank(s, config.rank if start is None else lora.site_rank(start, s))
  return LoraAdapters(config, model_config, sites, params, info, start)


def _prompt_adapters(peft, model_config, params, info, init_adapter, vocab, seed):
  if init_adapter:
    config, start = prompt_tuning.read_peft(init_adapter, model_config)
  else:
    config = peft
    if config.init == "text" and vocab is None:
      raise UserError("PromptTuningConfig.init='text' needs the model's tokenizer")
    start = prompt_tuning.init(config, params["token_embedding"], vocab, model_config, seed)
  return PromptAdapters(config, model_config, [], params, info, start)


def for_shapes(peft, model_config) -> Adapters:
  """Adapters of train.peft's shapes over no base weights: what flanjax.aot compiles (the
  values never exist; A, B and the soft prompt are traced, the base is an argument)."""
  if isinstance(peft, prompt_tuning.PromptTuningConfig):
    start = np.zeros((peft.num_virtual_tokens, model_config.d_model), np.float32)
    return PromptAdapters(peft, model_config, [], None, {}, start)
  if isinstance(peft, lora.LoraConfig):
    sites = lora.select(model_config, peft.targets)
    for s in sites:
      lora.check_rank(s, peft.rank)
    return LoraAdapters(peft, model_config, sites, None, {})
  raise UserError("train.peft must be @LoraConfig() or @PromptTuningConfig(), not "
                  f"{type(peft).__name__}")


def state_init(adapters: Adapters, tx):
  """rng -> the adapters' boxed train state (params, optimizer state, step, rng)."""

  def init_fn(rng):
    params_rng, state_rng = jax.random.split(rng)
    boxed = adapters.boxed(params_rng)
    return {"params": boxed, "opt_state": tx.init(nn.unbox(boxed)),
            "step": jnp.zeros((), jnp.int32), "rng": state_rng}

  return init_fn


def jit_train_step(make, model, adapters: Adapters, state_shardings, batch_sharding,
                   base_shardings):
  """(state, batch, base) -> (state, metrics): make(model)'s step over the adapters, the
  base an argument (no gradient, never donated), not part of the state."""
  step = lambda state, batch, base: make(Bound(model, base, adapters))(state, batch)  # noqa: E731
  return jax.jit(step, in_shardings=(state_shardings, batch_sharding, base_shardings),
                 out_shardings=(state_shardings, None), donate_argnums=(0,))


class Bound:
  """The base model with its frozen params bound: apply({"params": adapters}, ...) runs it
  with the adapters, so the trainer's step differentiates the adapters only."""

  def __init__(self, model, base, adapters: Adapters):
    self.model, self.base, self.adapters = model, base, adapters
    self.config = model.config

  def apply(self, variables, *args, **kwargs):
    with lora.dropout(self.adapters.dropout):
      return self.model.apply(self.adapters.variables(self.base, variables["params"]),
                              *args, **kwargs)

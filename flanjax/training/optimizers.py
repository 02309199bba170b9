"""Optimizers and learning-rate schedules, configured by gin."""

from __future__ import annotations

import inspect

import gin
import jax.numpy as jnp
import optax


@gin.configurable
def schedule(name: str = "rsqrt", peak: float = 0.01, warmup_steps: int = 100,
             total_steps: int | None = None, end_value: float = 0.0):
  """constant | rsqrt (T5's inverse square root) | linear | cosine, each with linear warmup."""
  warmup_steps = max(int(warmup_steps), 0)

  def warm(step):
    if warmup_steps == 0:
      return jnp.ones_like(step, jnp.float32)
    return jnp.minimum(1.0, (step + 1.0) / warmup_steps)

  if name == "constant":
    return lambda step: peak * warm(step)
  if name == "rsqrt":
    # Flat at the peak through warmup, then peak * sqrt(warmup / step).
    return lambda step: peak * warm(step) * jnp.sqrt(
        max(warmup_steps, 1) / jnp.maximum(step + 1.0, max(warmup_steps, 1)))
  if name in ("linear", "cosine"):
    if not total_steps:
      raise ValueError(f"schedule {name!r} needs schedule.total_steps")
    decay_steps = max(total_steps - warmup_steps, 1)
    if name == "linear":
      decay = optax.linear_schedule(peak, end_value, decay_steps)
    else:
      decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=end_value / peak)
    return lambda step: jnp.where(step < warmup_steps, peak * warm(step),
                                  decay(jnp.maximum(step - warmup_steps, 0)))
  raise ValueError(f"unknown schedule {name!r}: use constant, rsqrt, linear or cosine")


@gin.configurable
def optimizer(name: str = "adafactor", learning_rate=None, grad_clip: float | None = None,
              weight_decay: float = 0.0, b1: float = 0.9, b2: float = 0.999):
  """adafactor (T5's defaults: factored second moments, no momentum, update
  clipping at 1, updates scaled by parameter RMS) or adamw."""
  lr = learning_rate if learning_rate is not None else schedule()
  parts = []
  if grad_clip:
    parts.append(optax.clip_by_global_norm(grad_clip))
  if name == "adafactor":
    parts.append(optax.adafactor(learning_rate=lr, multiply_by_parameter_scale=True,
                                 clipping_threshold=1.0, momentum=None,
                                 decay_rate=0.8, min_dim_size_to_factor=128,
                                 weight_decay_rate=weight_decay or None))
  elif name == "adamw":
    parts.append(optax.adamw(lr, b1=b1, b2=b2, weight_decay=weight_decay))
  else:
    raise ValueError(f"unknown optimizer {name!r}: use adafactor or adamw")
  return optax.chain(*parts), lr


# ------------------------------------------------------------------ description
# What the run's optimizer is, for run_info.json: a resume compares it with the
# run's own, because the optimizer state in the checkpoints has its layout.

# The settings optimizer() gives optax.adafactor (keep the two in step).
ADAFACTOR_SETTINGS = {"factored": True, "multiply_by_parameter_scale": True,
                      "clipping_threshold": 1.0, "momentum": None, "decay_rate": 0.8,
                      "min_dim_size_to_factor": 128}
# Fields whose change changes the optimizer state's tree (its leaves, their shapes, or
# the empty entries orbax restores onto); a change of any other is only new values.
_STATE_FIELDS = ("name", "grad_clip", "factored", "momentum", "min_dim_size_to_factor")


def _num(x):
  return None if x is None else float(x)


def describe(**overrides) -> dict:
  """The gin-configured optimizer() as a small JSON-able dict (learning rate not included).

  {'name': 'adafactor', 'grad_clip': None, 'weight_decay': 0.0, 'factored': True, ...}
  or {'name': 'adamw', 'grad_clip': 1.0, 'weight_decay': 0.1, 'b1': 0.9, 'b2': 0.999}.
  Reads optimizer()'s gin bindings over its defaults; `overrides` (the same
  argument names) win over both, as arguments to optimizer() would.
  """
  args = {k: p.default for k, p in inspect.signature(optimizer).parameters.items()}
  args.update(gin.get_bindings(optimizer))
  args.update(overrides)
  out = {"name": str(args["name"]), "grad_clip": _num(args["grad_clip"]) or None,
         "weight_decay": _num(args["weight_decay"]) or 0.0}
  if out["name"] == "adafactor":
    out.update(ADAFACTOR_SETTINGS)
  else:
    out.update(b1=_num(args["b1"]), b2=_num(args["b2"]))
  return out


def describe_schedule() -> dict:
  """The gin-configured schedule() as a JSON-able dict (its bindings over its defaults)."""
  args = {k: p.default for k, p in inspect.signature(schedule).parameters.items()}
  args.update(gin.get_bindings(schedule))
  return {k: (v if isinstance(v, (str, type(None))) else _num(v)) for k, v in args.items()}


def compare(old: dict, new: dict) -> tuple[list[str], list[str]]:
  """(state changes, other changes) from describe() `old` (a run's) to `new` (this one's).

  Each a list of 'field: old -> new'. A state change makes the run's
  checkpoints unusable with this optimizer (another name, gradient clipping
  switched on or off, adafactor's weight decay switched on or off, another
  factoring); other changes only change values (b1, a weight decay rate).
  """
  state, other = [], []
  for k in sorted(set(old) | set(new), key=lambda k: (k != "name", k)):
    a, b = old.get(k), new.get(k)
    if a == b:
      continue
    shapes_state = k in _STATE_FIELDS and not (k == "grad_clip" and bool(a) == bool(b))
    if k == "weight_decay" and new.get("name") == old.get("name") == "adafactor":
      shapes_state = bool(a) != bool(b)  # adafactor adds a step for weight decay
    (state if shapes_state else other).append(f"{k}: {a!r} -> {b!r}")
  return state, other

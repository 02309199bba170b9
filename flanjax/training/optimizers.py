"""Optimizers and learning-rate schedules, configured by gin."""

from __future__ import annotations

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

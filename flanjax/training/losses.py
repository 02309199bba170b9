"""Masked cross-entropy with z-loss and label smoothing."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy(logits, targets, weights, *, z_loss: float = 0.0,
                  label_smoothing: float = 0.0, normalize_by: float | None = None):
  """Weighted token cross-entropy.

  Args:
    logits: [batch, length, vocab] float.
    targets: [batch, length] int token ids.
    weights: [batch, length]; 0 on padding and on tokens that carry no loss.
    z_loss: coefficient of log(Z)^2, which keeps the softmax normaliser near 1.
    label_smoothing: mass spread uniformly over the vocabulary.
    normalize_by: None divides by the number of weighted tokens (per-token
      mean); a number divides by that fixed factor (T5's loss_normalizing_factor).

  Returns:
    (loss, aux) where aux holds the summed loss, z-loss and weight.
  """
  logits = logits.astype(jnp.float32)
  vocab = logits.shape[-1]
  log_z = jax.nn.logsumexp(logits, axis=-1)
  log_probs = logits - log_z[..., None]
  confidence = 1.0 - label_smoothing
  soft = jax.nn.one_hot(targets, vocab) * confidence + label_smoothing / vocab
  token_loss = -jnp.sum(soft * log_probs, axis=-1)
  if label_smoothing > 0:
    # Subtract the entropy of the smoothed target so a perfect model scores 0.
    low = label_smoothing / vocab
    entropy = -(confidence * jnp.log(confidence + 1e-20)
                + (vocab - 1) * low * jnp.log(low + 1e-20))
    token_loss = token_loss - entropy
  token_z = z_loss * jnp.square(log_z)
  weights = weights.astype(jnp.float32)
  total = jnp.sum((token_loss + token_z) * weights)
  weight_sum = jnp.sum(weights)
  denom = weight_sum if normalize_by is None else jnp.float32(normalize_by)
  loss = total / jnp.maximum(denom, 1e-8)
  aux = {"loss_sum": jnp.sum(token_loss * weights),
         "z_loss_sum": jnp.sum(token_z * weights),
         "weight_sum": weight_sum}
  return loss, aux

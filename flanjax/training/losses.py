"""Masked cross-entropy with z-loss and label smoothing: from logits (cross_entropy), or with
the output layer inside, at loss positions only (output_cross_entropy, the train step's)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


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


# ------------------------------------------------------------------ output layer + loss

# Rows no longer than a chunk take every position in one pass (no sort, gathers or loop).
# False sends them through the chunked loop as well: for benchmarks.variants' A/B only.
SINGLE_PASS = True
GROUP_ROWS = True  # output_cross_entropy sorts the loss positions of a device's rows together


def row_groups(b: int) -> int:
  """How many groups output_cross_entropy sorts a batch's loss positions in: one per shard
  of the batch axis (partitioning.batch_sharding shards it over the mesh axes data x fsdp),
  so no row's hidden states leave its device; 1 without a mesh. Every row alone (b) where
  that count does not divide the batch."""
  shape = dict(getattr(jax.sharding.get_abstract_mesh(), "shape", None) or {})
  g = int(shape.get("data", 1)) * int(shape.get("fsdp", 1))
  return g if g >= 1 and b % g == 0 else b


def output_cross_entropy(x, head, targets, weights, *, transposed: bool = False,
                         z_loss: float = 0.0, label_smoothing: float = 0.0, chunk: int = 128,
                         accuracy: bool = False):
  """The output layer and the weighted cross-entropy together, at loss positions only.

  x [b, l, d] are the final hidden states, head the output matrix ([d, vocab], or
  [vocab, d] when `transposed`: a tied embedding). Equal to
  cross_entropy(x @ head, targets, weights, normalize_by=1.0) summed, but a row's
  positions without loss weight (a prefix-LM's inputs, a chat's prompts, padding)
  get no logits at all, and the [b, l, vocab] logits never exist: the loss positions
  of a device's rows are sorted first together and taken `chunk` per row at a time
  (row_groups), and the gradients with respect to x and
  head are made in the same pass as the loss (a training step always wants them),
  so the backward pass only scales them.

  Returns (total, aux): total = summed loss + z-loss, the value to differentiate;
  aux holds loss_sum, z_loss_sum and weight_sum as cross_entropy's does (aux is
  reported, not differentiated: its cotangents are ignored); with `accuracy` also
  correct_sum, the weight of the positions whose argmax logit is the target.
  """
  return _output_ce(x, head, targets, weights, transposed, float(z_loss),
                    float(label_smoothing), int(chunk), bool(accuracy))


def _loss_order(weights, chunk: int):
  """Each row's positions with loss weight first ([b, l] padded to a multiple of chunk
  with position 0), their counts [b], and the number of chunks the longest row needs."""
  l = weights.shape[1]
  has = weights != 0
  order = jnp.argsort(jnp.logical_not(has), axis=1, stable=True).astype(jnp.int32)
  padded = -(-l // chunk) * chunk
  order = jnp.pad(order, ((0, 0), (0, padded - l)))
  counts = jnp.sum(has, axis=1, dtype=jnp.int32)
  chunks = (jnp.max(counts) + chunk - 1) // chunk
  return order, counts, chunks


def _output_ce_pass(x, head, targets, weights, transposed, z_loss, label_smoothing, chunk,
                    accuracy: bool, with_grads: bool):
  from flanjax.models import dense  # pylint: disable=g-import-not-at-top
  b, l, d = x.shape
  w_mat = head.astype(x.dtype)
  vocab = w_mat.shape[0] if transposed else w_mat.shape[1]
  chunk = max(1, min(chunk, l))
  weights = weights.astype(jnp.float32)
  confidence = 1.0 - label_smoothing
  entropy = 0.0
  if label_smoothing > 0:
    low = label_smoothing / vocab
    entropy = -(confidence * np.log(confidence + 1e-20) + (vocab - 1) * low * np.log(low + 1e-20))
  cpu = dense.cpu_formulation()

  def logits_of(xc):
    if transposed:  # xc [n, d] . head [v, d]^T
      return jax.lax.dot_general(xc, w_mat, (((1,), (1,)), ((), ())),
                                 preferred_element_type=jnp.float32)
    return jax.lax.dot_general(xc, w_mat, (((1,), (0,)), ((), ())),
                               preferred_element_type=jnp.float32)

  def terms(xc, tc, wc):
    """One chunk's (loss, z-loss, correct, dx [n, d] f32, d_head f32) sums."""
    # A position without weight may hold any id (a prompt-tuning virtual token is >= vocab,
    # and an out-of-range gather would be NaN): it weighs 0, so read id 0 there.
    tc = jnp.where(wc != 0, tc, 0)
    logits = logits_of(xc)  # [n, v] f32
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, tc[:, None], axis=-1)[:, 0]
    token_loss = log_z - confidence * target_logit
    if label_smoothing > 0:
      token_loss = token_loss - label_smoothing / vocab * jnp.sum(logits, axis=-1) - entropy
    loss = jnp.sum(token_loss * wc)
    z = jnp.sum(z_loss * jnp.square(log_z) * wc)
    correct = jnp.zeros((), jnp.float32)
    if accuracy:
      hit = (jnp.argmax(logits, axis=-1) == tc) & (wc > 0)
      correct = jnp.sum(jnp.where(hit, wc, 0.0))
    if not with_grads:
      return loss, z, correct, None, None
    dlogits = _dlogits(logits, log_z, tc, wc, z_loss, confidence, label_smoothing).astype(
        x.dtype)
    if transposed:  # dx = dlogits . head; d_head = dlogits^T . xc
      dxc = jax.lax.dot_general(dlogits, w_mat, (((1,), (0,)), ((), ())),
                                preferred_element_type=jnp.float32)
      dh = (dense._at_b(dlogits, xc) if cpu else  # pylint: disable=protected-access
            jnp.einsum("nv,nd->vd", dlogits, xc, preferred_element_type=jnp.float32))
    else:  # dx = dlogits . head^T; d_head = xc^T . dlogits
      dxc = jax.lax.dot_general(dlogits, w_mat, (((1,), (1,)), ((), ())),
                                preferred_element_type=jnp.float32)
      dh = (dense._at_b(xc, dlogits) if cpu else  # pylint: disable=protected-access
            jnp.einsum("nd,nv->dv", xc, dlogits, preferred_element_type=jnp.float32))
    return loss, z, correct, dxc, dh.astype(jnp.float32)

  aux = {"weight_sum": jnp.sum(weights)}
  if l <= chunk and SINGLE_PASS:
    # One chunk holds every position: sorting the loss positions first would gain nothing.
    loss_sum, z_sum, correct, dxc, d_head = terms(x.reshape(b * l, d), targets.reshape(-1),
                                                  weights.reshape(-1))
    dx = None if dxc is None else dxc.reshape(b, l, d)
  else:
    # The loss positions of a group of rows (the rows one device holds) are taken together,
    # rows_per_group * chunk at a time: per row, every row ran as many chunks as the row
    # with the most loss positions needed.
    groups = row_groups(b) if GROUP_ROWS else b
    per = b // groups
    loss_sum, z_sum, correct, dx, d_head = _chunked(
        x.reshape(groups, per * l, d), targets.reshape(groups, per * l),
        weights.reshape(groups, per * l), chunk * per, terms, with_grads)
    dx = None if dx is None else dx.reshape(b, l, d)
  aux.update(loss_sum=loss_sum, z_loss_sum=z_sum)
  if accuracy:
    aux["correct_sum"] = correct
  if not with_grads:
    return loss_sum + z_sum, aux, None
  return loss_sum + z_sum, aux, (dx.astype(x.dtype), d_head)


def _chunked(x, targets, weights, chunk, terms, with_grads):
  """terms() summed over each row's loss positions, `chunk` of them at a time."""
  b, l, d = x.shape
  order, counts, n_chunks = _loss_order(weights, chunk)

  def chunk_terms(k):
    pos = jax.lax.dynamic_slice_in_dim(order, k * chunk, chunk, axis=1)  # [b, c]
    slot = k * chunk + jnp.arange(chunk, dtype=jnp.int32)[None]
    valid = slot < counts[:, None]
    xc = jnp.take_along_axis(x, pos[..., None], axis=1).reshape(b * chunk, d)
    # A slot past a row's loss positions weighs 0 (terms then reads id 0 there).
    tc = jnp.take_along_axis(targets, pos, axis=1).reshape(-1)
    wc = jnp.where(valid, jnp.take_along_axis(weights, pos, axis=1), 0.0).reshape(-1)
    return terms(xc, tc, wc)

  def body(carry):
    k, dx_sorted, d_head, loss_sum, z_sum, correct = carry
    loss, z, hit, dxc, dh = chunk_terms(k)
    if with_grads:
      dx_sorted = jax.lax.dynamic_update_slice_in_dim(
          dx_sorted, dxc.reshape(b, chunk, d), k * chunk, axis=1)
      d_head = d_head + dh
    return k + 1, dx_sorted, d_head, loss_sum + loss, z_sum + z, correct + hit

  # The first chunk is taken outside the loop, so its gradient starts the output matrix's
  # sum (no zero-filled [vocab, d] accumulator and one pass less over it); were there no
  # loss positions at all, its weights are all 0 and it adds nothing.
  loss_sum, z_sum, correct, dxc, d_head = chunk_terms(0)
  padded = order.shape[1]
  if with_grads:
    dx_sorted = jnp.zeros((b, padded, d), jnp.float32)
    dx_sorted = jax.lax.dynamic_update_slice_in_dim(dx_sorted, dxc.reshape(b, chunk, d), 0,
                                                    axis=1)
  else:
    dx_sorted, d_head = jnp.zeros((0, 0, 0), jnp.float32), jnp.zeros((0,), jnp.float32)
  _, dx_sorted, d_head, loss_sum, z_sum, correct = jax.lax.while_loop(
      lambda c: c[0] < n_chunks, body, (jnp.int32(1), dx_sorted, d_head, loss_sum, z_sum,
                                        correct))
  if not with_grads:
    return loss_sum, z_sum, correct, None, None
  # Back from loss-first order to positions: each position sits at one slot.
  inverse = jnp.argsort(order[:, :l], axis=1).astype(jnp.int32)
  dx = jnp.take_along_axis(dx_sorted, inverse[..., None], axis=1)
  return loss_sum, z_sum, correct, dx, d_head


def _dlogits(logits, log_z, tc, wc, z_loss, confidence, label_smoothing):
  """d(summed loss + z-loss)/d logits for one chunk [n, vocab], float32."""
  vocab = logits.shape[-1]
  probs = jnp.exp(logits - log_z[:, None])
  dlogits = probs * (wc * (1.0 + 2.0 * z_loss * log_z))[:, None]
  dlogits = dlogits - jax.nn.one_hot(tc, vocab, dtype=jnp.float32) * (confidence * wc)[:, None]
  if label_smoothing > 0:
    dlogits = dlogits - (label_smoothing / vocab) * wc[:, None]
  return dlogits


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def _output_ce(x, head, targets, weights, transposed, z_loss, label_smoothing, chunk,
               accuracy):
  total, aux, _ = _output_ce_pass(x, head, targets, weights, transposed, z_loss,
                                  label_smoothing, chunk, accuracy, with_grads=False)
  return total, aux


def _output_ce_fwd(x, head, targets, weights, transposed, z_loss, label_smoothing, chunk,
                   accuracy):
  total, aux, grads = _output_ce_pass(x, head, targets, weights, transposed, z_loss,
                                      label_smoothing, chunk, accuracy, with_grads=True)
  return (total, aux), (grads, head, targets, weights)


def _output_ce_bwd(transposed, z_loss, label_smoothing, chunk, accuracy, res, g):
  del transposed, z_loss, label_smoothing, chunk, accuracy
  (dx, d_head), head, targets, weights = res
  g_total = g[0]
  return ((dx * g_total.astype(dx.dtype)), (d_head * g_total).astype(head.dtype),
          _int_zeros(targets), jnp.zeros_like(weights) if jnp.issubdtype(
              weights.dtype, jnp.floating) else _int_zeros(weights))


def _int_zeros(a):
  return np.zeros(a.shape, jax.dtypes.float0)


_output_ce.defvjp(_output_ce_fwd, _output_ce_bwd)

"""The attention core both model kinds share: scores, mask, position bias, softmax, values.

A model projects q, k and v and describes what may attend to what with a `Spec`
(segment ids, index positions, causal / prefix-LM, key padding, T5's relative
position table); `attend` does the rest with one of three implementations,
chosen by the config's `attention_impl`:

  auto         (the default) dot_product where cuDNN's fused attention runs and has
               been measured (a GPU, bf16/fp16, a causal self-attention without T5's
               position bias, no attention dropout: `auto_impl`), reference elsewhere.
  reference    the scores [b, heads, q, k] materialised in float32, a block of
               about 160 queries at a time (the original arithmetic row by row,
               kept as the reference; the only one with attention dropout); the
               softmax is normalised after the values dot and differentiated as
               FlashAttention does (`_softmax_values`), fewer passes over [q, k];
               on XLA:CPU the scores are laid out [b, heads, k, q] (`KEYS_MAJOR`).
  blockwise    query and key blocks under lax.map / lax.scan with an online
               softmax: the mask and T5's bias are computed per block from the
               positions, never [q, k] at once; the backward pass recomputes
               each block (jax.checkpoint), so memory is linear in the length.
  dot_product  jax.nn.dot_product_attention with the mask and bias materialised:
               cuDNN's fused attention on a GPU where it applies (`sdpa_backend`),
               XLA elsewhere.
  flash        on a TPU, the Pallas flash kernel (models/flash_tpu.py; segments,
               causal, T5's bias as a full [b, h, q, k] array, so for T5 blockwise
               needs less memory); prefix-LM masks and decoding fall back to blockwise.

A masked score is NEG_INF (finite), so a row with no allowed key gets a uniform
softmax in every implementation, as in the reference.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp

from flanjax.errors import UserError
from flanjax.models import dense

Array = Any
NEG_INF = -1e10  # mask bias; finite so a fully masked row gives a uniform softmax, not NaN
_PAD = -1e30  # keys added to fill the last block: below any mask, so they never count
IMPLS = ("auto", "reference", "blockwise", "dot_product", "flash")


def check_impl(owner: str, impl: str, block: int) -> None:
  if impl not in IMPLS:
    raise UserError(f"{owner}.attention_impl={impl!r} is not one of {', '.join(IMPLS)}")
  if block < 1:
    raise UserError(f"{owner}.attention_block={block} must be positive")


def relative_position_bucket(relative_position: Array, bidirectional: bool,
                             num_buckets: int, max_distance: int) -> Array:
  """T5's bucketing of (key - query) distances: exact when near, log-spaced when far."""
  ret = 0
  n = relative_position
  if bidirectional:
    num_buckets //= 2
    ret += (n > 0).astype(jnp.int32) * num_buckets
    n = jnp.abs(n)
  else:
    n = -jnp.minimum(n, 0)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  # log(0) is never selected (is_small covers it); clamp to keep it finite.
  val_if_large = max_exact + (
      jnp.log(jnp.maximum(n, 1).astype(jnp.float32) / max_exact)
      / math.log(max_distance / max_exact) * (num_buckets - max_exact)).astype(jnp.int32)
  val_if_large = jnp.minimum(val_if_large, num_buckets - 1)
  return ret + jnp.where(is_small, n, val_if_large)


@flax.struct.dataclass
class Spec:
  """Which keys each query sees, and the position bias; all arrays, so it passes remat/scan.

  q_segments [b, q], kv_segments [b, k]: a query sees only keys of its segment;
    with kv_padding, keys of segment 0 are seen by none.
  q_positions [b or 1, q], kv_positions [b or 1, k]: index positions; causal
    lets a query see keys at positions <= its own, and q_prefix / kv_prefix
    [b, q] / [b, k] (prefix-LM) also let prefix queries see every prefix key.
  rel_table [buckets, heads]: T5's relative position bias, looked up from
    kv_positions - q_positions of row 0 (shared by the batch).
  """
  q_segments: Array
  kv_segments: Array
  q_positions: Array
  kv_positions: Array
  q_prefix: Array | None = None
  kv_prefix: Array | None = None
  rel_table: Array | None = None
  causal: bool = flax.struct.field(pytree_node=False, default=False)
  # Query i is key i (q_positions == kv_positions, one sequence): lets the reference
  # skip, per query block, the keys a causal mask hides from all of its rows.
  aligned: bool = flax.struct.field(pytree_node=False, default=False)
  kv_padding: bool = flax.struct.field(pytree_node=False, default=False)
  rel_bidirectional: bool = flax.struct.field(pytree_node=False, default=True)
  rel_max_distance: int = flax.struct.field(pytree_node=False, default=128)

  def allowed(self, q_seg, kv_seg, q_pos, kv_pos, q_pre=None, kv_pre=None,
              keys_major=False) -> Array:
    """bool [b, q, k] for one block of queries and keys (the arguments: slices of the fields);
    [b, k, q] if keys_major, made in that layout, not transposed."""
    def pair(qx, kx):  # [b, q] and [b, k] broadcast against each other in the layout
      if keys_major:
        return qx[:, None, :], kx[:, :, None]
      return qx[:, :, None], kx[:, None, :]

    qs, ks = pair(q_seg, kv_seg)
    ok = qs == ks
    if self.kv_padding:
      ok = ok & (ks > 0)
    if self.causal:
      qp, kp = pair(q_pos, kv_pos)
      see = kp <= qp
      if q_pre is not None:
        qr, kr = pair(q_pre, kv_pre)
        see = see | (qr & kr)
      ok = ok & see
    return ok

  def position_bias(self, q_pos, kv_pos, keys_major=False) -> Array | None:
    """float32 [heads, q, k] ([heads, k, q] if keys_major) for q_pos [q], kv_pos [k], or
    None without a table."""
    if self.rel_table is None:
      return None
    rel = kv_pos[:, None] - q_pos[None, :] if keys_major else kv_pos[None, :] - q_pos[:, None]
    buckets = relative_position_bucket(rel, self.rel_bidirectional,
                                       self.rel_table.shape[0], self.rel_max_distance)
    return jnp.transpose(self.rel_table[buckets], (2, 0, 1))

  def full(self):
    """The whole mask [b, q, k] and bias [heads, q, k] (or None)."""
    allowed = self.allowed(self.q_segments, self.kv_segments, self.q_positions,
                           self.kv_positions, self.q_prefix, self.kv_prefix)
    return allowed, self.position_bias(self.q_positions[0], self.kv_positions[0])


def auto_impl(q: Array, k: Array, spec: Spec, dropout: Callable | None = None) -> str:
  """What attention_impl='auto' runs for these operands.

  cuDNN's fused attention keeps no [q, k] probabilities for the backward pass, which at a
  1.1B decoder's 16 x 2,048 rows would be 8.6 GB a layer in float32 (the reference's
  scores); on an H200 it ran that decoder at 48% MFU. It is chosen only for what was run
  there: causal self-attention (decoder rows, packed or prefix-LM: the mask is an array
  either way) with no position bias. T5's attention (its bias, and cross-attention) stays
  on the reference until it is measured on a GPU; CPU and TPU keep the reference, the
  fastest measured on XLA:CPU at the benchmark's sizes."""
  if (dropout is None and spec.rel_table is None and spec.causal and spec.aligned
      and sdpa_backend(q, k) == "cudnn"):
    return "dot_product"
  return "reference"


def attend(q: Array, k: Array, v: Array, spec: Spec, *, impl: str = "auto",
           scale: float | None = None, block: int = 512,
           dropout: Callable | None = None) -> Array:
  """q [b, q, heads, d], k and v [b, k, kv_heads, d] -> [b, q, heads, d] in q's dtype.

  Query head j reads key/value head j // (heads / kv_heads) (grouped-query
  attention in Hugging Face's repeat_kv order). scale multiplies the scores
  (None: not scaled, as T5). dropout: applied to the probabilities (reference only).
  """
  if impl == "auto":
    impl = auto_impl(q, k, spec, dropout)
  if impl == "reference":
    return _reference(q, k, v, spec, scale, dropout)
  if dropout is not None:
    raise UserError(f"attention_impl={impl!r} applies no attention dropout: set "
                     "dropout_rate=0 or attention_impl='reference'")
  if impl == "blockwise":
    return _blockwise(q, k, v, spec, scale, block)
  if impl == "dot_product":
    return _dot_product(q, k, v, spec, scale)
  if impl == "flash":  # the Pallas TPU kernel; imported here, as only TPU runs need it
    from flanjax.models import flash_tpu  # pylint: disable=g-import-not-at-top
    out = flash_tpu.attend(q, k, v, spec, scale, block)
    return _blockwise(q, k, v, spec, scale, block) if out is None else out
  raise UserError(f"attention_impl={impl!r} is not one of {', '.join(IMPLS)}")


def _grouped(q, k):
  b, lq, h, d = q.shape
  g = k.shape[2]
  return q.reshape(b, lq, g, h // g, d)


@jax.custom_vjp
def _add_shared(scores, bias):
  """scores [b, ...] + bias [...] (one bias for the whole batch)."""
  return scores + bias[None]


def _add_shared_fwd(scores, bias):
  return _add_shared(scores, bias), scores.shape[0]


def _add_shared_bwd(b, g):
  # The bias's gradient sums g over the batch. As a reduction over that leading axis
  # XLA:CPU took 9.8 ms for [4, 4, 128, 512] (T5's encoder: 108 ms a layer); as a dot
  # with ones, 0.9 ms.
  return g, jnp.einsum("b,b...->...", jnp.ones((b,), g.dtype), g)


_add_shared.defvjp(_add_shared_fwd, _add_shared_bwd)


def _softmax_values_rule(keys_major: bool):
  """softmax(scores) @ v over the keys for float32 scores [b, h, q, t] (or, keys_major,
  [b, h, t, q]) and v [b, h, t, d]: [b, h, q, d] in float32, the same as jax.nn.softmax
  then the dot, in fewer passes over the scores.

  The exponentials are normalised after the values dot (a [q, d] division, not [q, t]),
  and the backward pass takes the softmax's row term from the [q, d] output and its
  gradient, sum(dO * O), instead of reducing dP * P over the keys (FlashAttention's
  backward, with the exponentials kept rather than recomputed).

  Keys-major, the softmax's max and sum run over a major axis, across contiguous queries,
  which XLA:CPU vectorises; over the minor axis it splits each into an unfused
  reduce-window of 32 and a reduce (the T5 step's reduce-windows were 11% of its op
  time). The dots read the [t, q] operand transposed, which Eigen does without a copy."""
  st = "bhtq" if keys_major else "bhqt"
  axis = 2 if keys_major else 3

  def fwd(scores, v):
    m = jax.lax.stop_gradient(jnp.max(scores, axis=axis, keepdims=True))
    # In v's dtype throughout (the dot's operand, the total and the backward's), so a
    # bf16 row's probabilities sum to 1 as used and its score gradient sums to 0.
    e = jnp.exp(scores - m).astype(v.dtype)
    total = jnp.sum(e.astype(jnp.float32), axis=axis, keepdims=True)
    if keys_major:
      total = jnp.swapaxes(total, 2, 3)  # [b, h, q, 1]
    out = jnp.einsum(f"{st},bhtd->bhqd", e, v, preferred_element_type=jnp.float32) / total
    return out, (e, total, out, v)

  def bwd(res, g):
    e, total, out, v = res
    g = (g.astype(jnp.float32) / total).astype(v.dtype)
    dv = jnp.einsum(f"{st},bhqd->bhtd", e, g)
    dp = jnp.einsum(f"bhqd,bhtd->{st}", g, v, preferred_element_type=jnp.float32)
    row = jnp.sum(g.astype(jnp.float32) * out, axis=-1)  # [b, h, q]
    row = row[:, :, None, :] if keys_major else row[..., None]
    ds = e.astype(jnp.float32) * (dp - row)
    return ds, dv.astype(v.dtype)

  f = jax.custom_vjp(lambda scores, v: fwd(scores, v)[0])
  f.defvjp(fwd, bwd)
  return f


SOFTMAX_VALUES = True  # the reference's softmax and values dot as _softmax_values (no dropout)
_softmax_values = _softmax_values_rule(keys_major=False)
_softmax_values_keys_major = _softmax_values_rule(keys_major=True)


QUERY_BLOCK = 160  # rows of scores the reference materialises at once (about; see _reference)
# The reference's scores (without dropout) as [b, h, keys, queries] where traces take
# XLA:CPU's formulations (dense.cpu_formulation): see _softmax_values_rule. Other
# backends, and False (for A/B runs), keep [b, h, queries, keys].
KEYS_MAJOR = True


def _heads_major_blocks(q, k, v, spec):
  """q, k, v as [b, h, l, d] (k and v repeated to every query head, repeat_kv's order: the
  dots then need no transposes of the scores) and the reference's query blocks, (lo, hi,
  kend): queries lo:hi against keys :kend."""
  b, lq, h, d = q.shape
  lk, g = k.shape[1], k.shape[2]
  qh = jnp.transpose(q, (0, 2, 1, 3))
  kh = jnp.repeat(jnp.transpose(k, (0, 2, 1, 3)), h // g, axis=1)
  vh = jnp.repeat(jnp.transpose(v, (0, 2, 1, 3)), h // g, axis=1)
  n = max(1, round(lq / QUERY_BLOCK))
  size = -(-lq // n)
  truncate = spec.aligned and spec.causal and spec.q_prefix is None and not spec.kv_padding
  blocks = []
  for lo in range(0, lq, size):
    hi = min(lo + size, lq)
    blocks.append((lo, hi, min(hi, lk) if truncate else lk))
  return qh, kh, vh, blocks


def _reference(q, k, v, spec, scale, dropout):
  """The scores in float32, a static block of queries at a time, heads-major.

  Row by row this is the softmax over all keys; blocks only bound what is live at
  once (on XLA:CPU, [b, h, 160, k] blocks run the decoder benchmark's attention in
  half the time of one [b, h, q, k] tensor). When queries and keys are the same
  positions under a causal mask (training rows), block i reads only the keys up to
  its last query: the keys after it are masked for all its rows, so they would add
  exp(NEG_INF) = 0 to every sum. Where traces take XLA:CPU's formulations, the scores,
  mask and bias are [b, h, keys, queries] (KEYS_MAJOR; see _softmax_values_rule).
  """
  fused = dropout is None and SOFTMAX_VALUES
  keys_major = fused and KEYS_MAJOR and dense.cpu_formulation()
  allowed = spec.allowed(spec.q_segments, spec.kv_segments, spec.q_positions,
                         spec.kv_positions, spec.q_prefix, spec.kv_prefix, keys_major)
  qh, kh, vh, blocks = _heads_major_blocks(q, k, v, spec)
  outs = []
  for lo, hi, kend in blocks:
    if keys_major:
      scores = jnp.einsum("bhtd,bhqd->bhtq", kh[:, :, :kend], qh[:, :, lo:hi])
      mask = allowed[:, :kend, lo:hi]
    else:
      scores = jnp.einsum("bhqd,bhtd->bhqt", qh[:, :, lo:hi], kh[:, :, :kend])
      mask = allowed[:, lo:hi, :kend]
    scores = scores.astype(jnp.float32)
    if scale is not None:
      scores = scores * scale
    # Added here, where they fuse into the softmax, rather than summed to [b, h, q, k] first.
    scores = scores + jnp.where(mask, 0.0, NEG_INF).astype(jnp.float32)[:, None]
    # T5's bias looked up per block: its gradient then goes straight into the table, not
    # through [heads, q, k] pads summed over blocks (a 108 ms YNN reduction each on CPU).
    bias = spec.position_bias(spec.q_positions[0, lo:hi], spec.kv_positions[0, :kend],
                              keys_major=keys_major)
    if bias is not None:
      scores = _add_shared(scores, bias)
    if fused:
      rule = _softmax_values_keys_major if keys_major else _softmax_values
      outs.append(rule(scores, vh[:, :, :kend]).astype(q.dtype))
      continue
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    if dropout is not None:
      probs = dropout(probs)
    outs.append(jnp.einsum("bhqt,bhtd->bhqd", probs, vh[:, :, :kend]))
  out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=2)
  return jnp.transpose(out, (0, 2, 1, 3))


def _dot_product(q, k, v, spec, scale):
  allowed, bias = spec.full()
  if bias is not None:
    bias = bias[None].astype(q.dtype)
  return jax.nn.dot_product_attention(
      q, k, v, bias=bias, mask=allowed[:, None],
      scale=1.0 if scale is None else scale, implementation=sdpa_backend(q, k)).astype(q.dtype)


def sdpa_backend(q, k=None) -> str | None:
  """'cudnn' (fused flash attention: no [q, k] probabilities kept for the backward pass) on
  an NVIDIA GPU that cuDNN's flash attention runs on (compute capability 8.0 or newer) for
  the shapes it takes: bf16/fp16, head dim a multiple of 8 up to 128, more than one query
  (not a decoding step), and an even number of queries and keys (k: the keys, or None for
  as many as queries; with a bias or mask jax's cuDNN path refuses odd lengths in training).
  None (XLA's einsums) elsewhere: jax's own default is XLA everywhere. The mask and T5's
  bias travel as one additive bias, whose gradient jax's cuDNN path returns (measured on an
  H200 for the decoder; T5 not yet run there)."""
  d = q.shape[-1]
  if not (jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
          and d % 8 == 0 and d <= 128 and q.shape[1] > 1 and q.shape[1] % 2 == 0
          and (k is None or k.shape[1] % 2 == 0)):
    return None
  try:
    major = int(str(getattr(jax.devices()[0], "compute_capability", "0")).split(".")[0])
  except ValueError:
    return None
  return "cudnn" if major >= 8 else None


def _blocks(x, n, size, fill):
  """[b, l, ...] -> [n, b, size, ...], padded at the end with `fill`."""
  pad = n * size - x.shape[1]
  if pad:
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
  x = x.reshape((x.shape[0], n, size) + x.shape[2:])
  return jnp.moveaxis(x, 1, 0)


def _blockwise(q, k, v, spec, scale, block):
  b, lq, h, d = q.shape
  lk, g = k.shape[1], k.shape[2]
  bq, bk = min(block, lq), min(block, lk)
  nq, nk = -(-lq // bq), -(-lk // bk)
  qb = _blocks(_grouped(q, k), nq, bq, 0)
  bcast = lambda x, n: jnp.broadcast_to(x, (n,) + x.shape[1:])  # noqa: E731
  q_side = (_blocks(spec.q_segments, nq, bq, 0), _blocks(bcast(spec.q_positions, b), nq, bq, 0),
            None if spec.q_prefix is None else _blocks(spec.q_prefix, nq, bq, False))
  valid = jnp.arange(nk * bk).reshape(nk, 1, bk) < lk
  kv_side = (_blocks(k, nk, bk, 0), _blocks(v, nk, bk, 0), _blocks(spec.kv_segments, nk, bk, 0),
             _blocks(bcast(spec.kv_positions, b), nk, bk, 0),
             None if spec.kv_prefix is None else _blocks(spec.kv_prefix, nk, bk, False), valid)

  def kv_step(q_blk, q_seg, q_pos, q_pre, carry, kv):
    m, l, acc = carry
    k_blk, v_blk, kv_seg, kv_pos, kv_pre, ok = kv
    s = jnp.einsum("bqgrd,btgd->bgrqt", q_blk, k_blk).astype(jnp.float32)
    if scale is not None:
      s = s * scale
    bias = spec.position_bias(q_pos[0], kv_pos[0])
    if bias is not None:
      s = s + bias.reshape((g, h // g) + bias.shape[1:])[None]
    allowed = spec.allowed(q_seg, kv_seg, q_pos, kv_pos, q_pre, kv_pre)
    s = jnp.where(allowed[:, None, None], s, NEG_INF)
    s = jnp.where(ok[:, None, None], s, _PAD)
    m_new = jnp.maximum(m, s.max(-1))
    p = jnp.exp(s - m_new[..., None])
    alpha = jnp.exp(m - m_new)
    l = alpha * l + p.sum(-1)
    acc = alpha[..., None] * acc + jnp.einsum("bgrqt,btgd->bgrqd", p.astype(v_blk.dtype),
                                              v_blk).astype(jnp.float32)
    return (m_new, l, acc), None

  @jax.checkpoint
  def q_block(xs):
    q_blk, q_seg, q_pos, q_pre = xs
    step = jax.checkpoint(lambda c, kv: kv_step(q_blk, q_seg, q_pos, q_pre, c, kv))
    shape = (b, g, h // g, bq)
    init = (jnp.full(shape, _PAD, jnp.float32), jnp.zeros(shape, jnp.float32),
            jnp.zeros(shape + (d,), jnp.float32))
    (_, l, acc), _ = jax.lax.scan(step, init, kv_side)
    out = (acc / l[..., None]).astype(q.dtype)  # [b, g, r, bq, d]
    return jnp.moveaxis(out, 3, 1).reshape(b, bq, h, d)

  out = jax.lax.map(q_block, (qb,) + q_side)  # [nq, b, bq, h, d]
  return jnp.moveaxis(out, 0, 1).reshape(b, nq * bq, h, d)[:, :lq]

"""attention_impl='flash': the Pallas flash-attention kernel for TPU
(jax.experimental.pallas.ops.tpu.flash_attention), behind attention.attend's interface.

What the kernel takes, and how a `Spec` maps onto it:
  segment ids   q_segments / kv_segments as they are; with kv_padding, key segment 0
                becomes -1 so no query sees it (a query of segment 0 then sees nothing
                and gets a uniform softmax, as in the reference).
  causal        by index, not by position: the same in training rows, whose packed
                segments are contiguous runs with positions counting up (the segment
                ids keep segments apart).
  T5's bias     the kernel's `ab`, which must be [b, heads, q, k]: the bias is
                materialised per batch row (and its gradient with it), so on T5 the
                kernel saves the fp32 probabilities but not the [q, k] bias; blockwise
                stays the linear-memory choice there.
  GQA           key/value heads repeated to the query heads (Hugging Face's order).
Not supported by the kernel, and sent to the blockwise path instead: the prefix-LM mask
(q_prefix) and a causal block whose queries are not its keys (the KV-cache decode step).

Under a mesh (the trainer's jax.set_mesh) the kernel runs under shard_map, batch rows over
'data' x 'fsdp' and heads over 'model' (XLA cannot partition a Mosaic call); a batch or
head count those axes do not divide goes to blockwise.

Lengths are padded to a multiple of the block (a multiple of 128, the kernel's lane
width) with segment ids no query matches, and cut back afterwards; a query that sees no
key (padding) then averages over the padded keys too, an output nothing reads. Off TPU, the kernel
runs in Pallas's TPU interpreter only inside pltpu.force_tpu_interpret_mode() (tests).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from flanjax.errors import UserError

if TYPE_CHECKING:  # attention calls this module: no import back at run time
  from flanjax.models import attention

Array = Any
LANES = 128  # the kernel's key blocks are multiples of the TPU's lane width
_PAD_Q, _PAD_KV = -2, -3  # segment ids of the padding: seen by nothing, seeing nothing


def supported(q: Array, k: Array, spec: "attention.Spec") -> bool:
  """Whether the kernel computes this attention exactly (else blockwise does)."""
  if spec.q_prefix is not None or spec.kv_prefix is not None:
    return False
  return not (spec.causal and q.shape[1] != k.shape[1])


def _block(block: int, length: int) -> int:
  up = lambda n: -(-n // LANES) * LANES  # noqa: E731
  return min(up(block), up(length))


def _pad(x: Array, length: int, fill) -> Array:
  extra = length - x.shape[1]
  if not extra:
    return x
  return jnp.pad(x, [(0, 0), (0, extra)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)


def attend(q: Array, k: Array, v: Array, spec: "attention.Spec", scale: float | None = None,
           block: int = 512) -> Array | None:
  """q [b, q, heads, d], k and v [b, k, kv_heads, d] -> [b, q, heads, d] in q's dtype,
  as attention.attend (scale None: not scaled, as T5); None where the kernel cannot
  answer (the caller, attention.attend, then runs blockwise)."""
  if not supported(q, k, spec) or not _on_tpu_or_refused():
    return None
  from jax.experimental.pallas.ops.tpu import flash_attention as fa  # pylint: disable=g-import-not-at-top
  b, lq, h, d = q.shape
  lk, g = k.shape[1], k.shape[2]
  bq, bk = _block(block, lq), _block(block, lk)
  pq, pk = -(-lq // bq) * bq, -(-lk // bk) * bk
  if g != h:  # query head j reads key/value head j // (h / g)
    k, v = jnp.repeat(k, h // g, axis=2), jnp.repeat(v, h // g, axis=2)
  kv_seg = spec.kv_segments.astype(jnp.int32)
  if spec.kv_padding:
    kv_seg = jnp.where(kv_seg > 0, kv_seg, -1)
  segments = fa.SegmentIds(q=_pad(spec.q_segments.astype(jnp.int32), pq, _PAD_Q),
                           kv=_pad(kv_seg, pk, _PAD_KV))
  heads_first = lambda x, n: jnp.swapaxes(_pad(x, n, 0), 1, 2)  # noqa: E731  [b, h, l, d]
  ab = spec.position_bias(spec.q_positions[0], spec.kv_positions[0])  # [h, q, k] or None
  if ab is not None:
    if scale is not None:  # the kernel scales the sum (q.k + ab); the reference, q.k alone
      ab = ab / scale
    ab = jnp.pad(ab, [(0, 0), (0, pq - lq), (0, pk - lk)])
    ab = jnp.broadcast_to(ab[None], (b,) + ab.shape)
  sizes = fa.BlockSizes(block_q=bq, block_k_major=bk, block_k=bk, block_b=1,
                        block_q_major_dkv=bq, block_k_major_dkv=bk, block_k_dkv=bk,
                        block_q_dkv=bq, block_k_major_dq=bk, block_k_dq=bk, block_q_dq=bq)
  kernel = lambda q, k, v, ab, segments: fa.flash_attention(  # noqa: E731
      q, k, v, ab, segments, causal=spec.causal,
      sm_scale=1.0 if scale is None else float(scale), block_sizes=sizes)
  args = (heads_first(q, pq), heads_first(k, pk), heads_first(v, pk), ab, segments)
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty and mesh.size > 1:
    # A Mosaic kernel is not partitioned by XLA: run it per shard, rows over the batch
    # axes and heads over 'model', as the trainer shards them.
    from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
    rows = tuple(a for a in ("data", "fsdp") if a in mesh.shape and mesh.shape[a] > 1) or None
    heads = "model" if mesh.shape.get("model", 1) > 1 else None
    n_rows = 1 if rows is None else int(np.prod([mesh.shape[a] for a in rows]))
    if b % n_rows or (heads and h % mesh.shape["model"]):
      return None
    bh = P(rows, heads)
    kernel = jax.shard_map(kernel, mesh=mesh, check_vma=False,
                           in_specs=(bh, bh, bh, None if ab is None else bh,
                                     fa.SegmentIds(q=P(rows), kv=P(rows))), out_specs=bh)
  out = kernel(*args)
  return jnp.swapaxes(out, 1, 2)[:, :lq].astype(q.dtype)


def _on_tpu_or_refused() -> bool:
  """Whether the kernel is lowered here: for a TPU (the mesh's devices, a topology's when
  compiled ahead, else the default backend) or in Pallas's interpreter (tests). Under a mesh
  of other devices (a training run) a one-line refusal instead of Pallas's traceback at the
  first step; outside any mesh off a TPU (shape-only traces such as flanjax.aot's init,
  evaluation on a CPU) blockwise answers, as it does for what the kernel cannot mask."""
  from jax._src import config as jax_config  # pylint: disable=g-import-not-at-top
  interpret = getattr(jax_config, "pallas_tpu_interpret_mode_context_manager", None)
  if getattr(interpret, "value", None) is not None:
    return True
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else getattr(mesh, "abstract_device", None)
  if device is None:
    return on_tpu()
  if device.platform == "tpu":
    return True
  raise UserError(f"attention_impl='flash' is the Pallas TPU kernel, and this run is on "
                  f"{device.platform}: set attention_impl='auto' (or 'blockwise', memory "
                  "linear in the length)")


def on_tpu() -> bool:
  return jax.default_backend() == "tpu"

"""attention_impl='auto' against the reference on this machine's own device: a decoder's
logits and gradients on packed rows (several examples a row, padding) and on prefix-LM rows.

    python -m benchmarks.attention_parity --out=benchmarks/results/attention_parity_gpu.json

On a GPU in bf16, 'auto' runs cuDNN's fused attention (attention.auto_impl), which the CPU
tests cannot reach: this is the check that its masks (segments, causal, prefix-LM, padding)
give the reference's numbers there. Off a GPU 'auto' is the reference itself; `--impl` names
another implementation to compare (the test runs 'dot_product' on the CPU). Writes JSON with
what ran, the largest differences and whether they are within `--tol` (relative to each
array's largest magnitude); exits 1 when they are not.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import numpy as np


def _packed(rng, rows: int, length: int, vocab: int):
  """tokens, segment ids and per-segment positions of rows holding examples of 20-300
  tokens (the last slots of a row padding, segment 0)."""
  tok, seg, pos = (np.zeros((rows, length), np.int32) for _ in range(3))
  for r in range(rows):
    at, s = 0, 1
    while at < length - 16:
      n = int(min(rng.integers(20, 300), length - at - int(rng.integers(0, 8))))
      if n <= 0:
        break
      tok[r, at:at + n] = rng.integers(2, vocab, n)
      seg[r, at:at + n], pos[r, at:at + n] = s, np.arange(n)
      at, s = at + n, s + 1
  return tok, seg, pos


def compare(cfg, impl: str, rows: int, length: int, seed: int = 0) -> dict:
  """Largest relative differences of `impl` against the reference, causal and prefix-LM."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from benchmarks import stacks  # pylint: disable=g-import-not-at-top
  from flanjax.models import decoder  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  tok, seg, pos = _packed(rng, rows, length, cfg.vocab_size)
  ref_model = decoder.Decoder(dataclasses.replace(cfg, attention_impl="reference"))
  model = decoder.Decoder(dataclasses.replace(cfg, attention_impl=impl))
  base = dict(decoder_input_tokens=tok, decoder_segment_ids=seg, decoder_positions=pos)
  params = jax.jit(ref_model.init)(jax.random.PRNGKey(seed), **base)["params"]
  runs = stacks.auto_attention(cfg, rows, length) if impl == "auto" else impl
  out = {"impl": impl, "runs": runs, "rows": rows, "length": length,
         "segments_per_row": float(np.mean(seg.max(1))), "dtype": str(cfg.dtype)}
  for name, extra in (("packed_causal", {}),
                      ("packed_prefix_lm",
                       {"decoder_causal_attention": ((pos < 12) & (seg > 0)).astype(np.int32)})):
    batch = {**base, **extra}

    def loss_and_logits(m, p, batch=batch):
      logits = m.apply({"params": p}, **batch).astype(jnp.float32)
      real = (seg > 0)[..., None]
      return jnp.sum(jnp.where(real, jax.nn.log_softmax(logits), 0.0)), logits

    got, want = (jax.jit(jax.value_and_grad(lambda p, m=m: loss_and_logits(m, p),
                                            has_aux=True))(params)
                 for m in (model, ref_model))
    (_, lg), g = got
    (_, lw), w = want
    real = np.asarray(seg > 0)
    logit_diff = float(np.abs(np.asarray(lg)[real] - np.asarray(lw)[real]).max()
                       / max(float(np.abs(np.asarray(lw)[real]).max()), 1e-9))
    grad_diff = max(float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max()
                          / max(float(np.abs(np.asarray(b, np.float32)).max()), 1e-9))
                    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(w)))
    out[name] = {"logits_max_rel_diff": round(logit_diff, 6),
                 "grads_max_rel_diff": round(grad_diff, 6)}
  return out


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(prog="python -m benchmarks.attention_parity")
  ap.add_argument("--impl", default="auto", help="the implementation set against 'reference'")
  ap.add_argument("--dtype", default="bfloat16")
  ap.add_argument("--rows", type=int, default=4)
  ap.add_argument("--length", type=int, default=1024)
  ap.add_argument("--tol", type=float, default=0.05,
                  help="largest relative difference accepted (bf16 rounds to about 0.4%%)")
  ap.add_argument("--out")
  a = ap.parse_args(argv)
  import jax  # pylint: disable=g-import-not-at-top
  from benchmarks import common  # pylint: disable=g-import-not-at-top
  from flanjax.models import decoder  # pylint: disable=g-import-not-at-top
  # Llama-like heads (head dim 64, 4 query heads a key/value head), small otherwise.
  cfg = decoder.DecoderConfig(vocab_size=512, d_model=256, num_heads=8, num_kv_heads=2,
                              head_dim=64, d_ff=512, num_layers=2, dtype=a.dtype)
  res = compare(cfg, a.impl, a.rows, a.length)
  dev = jax.devices()[0]
  res.update({"device": getattr(dev, "device_kind", dev.platform), "platform": dev.platform,
              "jax": jax.__version__, "commit": common.commit(), "tol": a.tol})
  worst = max(v[k] for v in res.values() if isinstance(v, dict) for k in v)
  res["within_tol"] = bool(worst <= a.tol)
  print(json.dumps(res, indent=1))
  if a.out:
    common.write_json(a.out, res)
  if not res["within_tol"]:
    print(f"attention_parity: {a.impl} ({res['runs']}) differs from the reference by {worst} "
          f"(relative), over --tol {a.tol}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())

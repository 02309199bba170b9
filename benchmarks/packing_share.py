"""Non-padding share of a mixture's batches: flanjax's packer, seqio's packer, padded.

    python -m benchmarks.packing_share                      # flan_cot at 1024/256, batch 32
    python -m benchmarks.packing_share --out=benchmarks/results/packing_share_flan_cot.json

The same stream three ways: `pipeline.get_dataset` packed (flanjax's best-fit packer) and
not packed (one example a row), and seqio's own `EncDecFeatureConverter(pack=True)` over
the mixture's dataset. Each share is real tokens over all positions of `--batches` batches
(both features together, as `pipeline.non_padding_share`); `tests/test_collections.py`
asserts the order and the 0.90 floor on the same settings.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402


def run(mixture: str, lengths: dict, batch_size: int, batches: int, vocab_size: int) -> dict:
  import seqio  # pylint: disable=g-import-not-at-top
  from flanjax.data import packing, pipeline, registry, vocab  # pylint: disable=g-import-not-at-top
  v = vocab.corpus_vocabulary(mixture=mixture, vocab_size=vocab_size)
  registry.register_all(v, input_length=lengths["inputs"])
  shares, violations = {}, 0
  for pack in (True, False):
    stats = packing.PackingStats()
    it = pipeline.get_dataset(mixture, lengths, "train", batch_size, seed=0, pack=pack,
                              stats=stats).as_numpy_iterator()
    shares["packed" if pack else "padded"] = float(np.mean(
        [pipeline.non_padding_share(next(it)) for _ in range(batches)]))
    violations += stats.violations
  ds = registry.get_task_or_mixture(mixture).get_dataset(lengths, "train", seed=0)
  it = seqio.EncDecFeatureConverter(pack=True)(ds, lengths).batch(batch_size).as_numpy_iterator()
  shares["seqio_packer"] = float(np.mean(
      [pipeline.non_padding_share(next(it)) for _ in range(batches)]))
  return {"mixture": mixture, "lengths": lengths, "batch_size": batch_size,
          "batches": batches, "vocab_size": vocab_size,
          "non_padding_share": {k: round(x, 4) for k, x in shares.items()},
          "mask_violations": violations}


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--mixture", default="flan_cot")
  ap.add_argument("--inputs", type=int, default=1024)
  ap.add_argument("--targets", type=int, default=256)
  ap.add_argument("--batch_size", type=int, default=32)
  ap.add_argument("--batches", type=int, default=30)
  ap.add_argument("--vocab_size", type=int, default=8000)
  ap.add_argument("--out", default=None, help="JSON file to write (default: print only)")
  args = ap.parse_args(argv)
  result = run(args.mixture, {"inputs": args.inputs, "targets": args.targets},
               args.batch_size, args.batches, args.vocab_size)
  result.update(commit=common.commit(), cpu=common.cpu_model(), load_at_end=common.load())
  s = result["non_padding_share"]
  print(f"{args.mixture} {args.inputs}/{args.targets}, {args.batches} batches of "
        f"{args.batch_size}: non-padding share packed {s['packed']:.3f}, seqio's packer "
        f"{s['seqio_packer']:.3f}, padded {s['padded']:.3f}")
  common.write_json(args.out, result)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())

"""Peak memory of the default job's model (tiny T5, 1,024-piece vocabulary) on 3,072-token
prompts, BBH CoT 3-shot's input length, with each attention implementation.

    python benchmarks/attention_memory.py [--batch 4] [--eval_batch 16]

For each of 'reference' and 'blockwise', a fresh process greedily decodes 32 tokens for
`--batch` random prompts of 3,072 tokens (the encoder, then the cached decoder: what the BBH
evaluation runs) and reports its peak RSS and the ids it generated; the compiled temporary
memory (XLA's memory_analysis) of the encoder at the evaluation's batch (`--eval_batch`) is
reported beside it. Writes docs/results/attention_memory.json.
"""

import argparse
import dataclasses
import json
import os
import platform
import resource
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "results",
                   "attention_memory.json")
LENGTH = 3072


def _model(impl):
  import gin  # pylint: disable=g-import-not-at-top
  from flanjax.models import t5  # pylint: disable=g-import-not-at-top
  gin.clear_config()
  gin.parse_config_file(os.path.join(os.path.dirname(OUT), "..", "..", "gin_configs", "models",
                                     "tiny.gin"))
  cfg = dataclasses.replace(t5.T5Config(vocab_size=1024), attention_impl=impl)
  gin.clear_config()
  return cfg, t5.T5(cfg)


def child(impl: str, batch: int, eval_batch: int) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flanjax import decoding  # pylint: disable=g-import-not-at-top
  cfg, model = _model(impl)
  from flanjax.models import t5  # pylint: disable=g-import-not-at-top
  params = model.init(jax.random.PRNGKey(0), **t5.dummy_batch(1, 8, 8))["params"]
  tokens = jax.ShapeDtypeStruct((eval_batch, LENGTH), jnp.int32)
  encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode))
  temp = encode.lower(params, tokens).compile().memory_analysis().temp_size_in_bytes
  prompts = np.random.default_rng(0).integers(2, cfg.vocab_size, (batch, LENGTH)).astype(np.int32)
  prompts[1::2, LENGTH // 2:] = 0  # half the rows padded, as a batch of real prompts is
  ids = decoding.generate(model, params, prompts, eos_id=-1,
                          config=decoding.DecodeConfig(max_decode_len=32))
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  return {"impl": impl, "batch": batch, "peak_rss_gib": rss / 2**30,
          "encoder_temp_gib_at_eval_batch": temp / 2**30, "eval_batch": eval_batch,
          "ids": np.asarray(ids).tolist()}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--eval_batch", type=int, default=16)
  parser.add_argument("--child")
  args = parser.parse_args()
  if args.child:
    print(json.dumps(child(args.child, args.batch, args.eval_batch)))
    return
  rows = []
  for impl in ("reference", "blockwise"):
    got = subprocess.run([sys.executable, __file__, "--child", impl, "--batch", str(args.batch),
                          "--eval_batch", str(args.eval_batch)], capture_output=True, text=True,
                         check=True)
    rows.append(json.loads(got.stdout.strip().splitlines()[-1]))
    print(f"{impl}: peak RSS {rows[-1]['peak_rss_gib']:.2f} GiB; encoder temporaries at batch "
          f"{args.eval_batch}: {rows[-1]['encoder_temp_gib_at_eval_batch']:.2f} GiB", flush=True)
  same = rows[0]["ids"] == rows[1]["ids"]
  print(f"generated ids identical: {same}")
  commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, check=False).stdout.strip()
  doc = {"command": "python benchmarks/attention_memory.py " + " ".join(sys.argv[1:]),
         "commit": commit, "machine": f"{platform.node()} ({os.cpu_count()} CPUs)",
         "length": LENGTH, "identical_ids": same,
         "rows": [{k: v for k, v in r.items() if k != "ids"} for r in rows]}
  with open(OUT, "w", encoding="utf-8") as f:
    json.dump(doc, f, indent=1)


if __name__ == "__main__":
  main()

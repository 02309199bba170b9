"""Benchmarks of flanjax.curate, each beside its reference, in one run:

  python -m benchmarks.curate_bench [--out benchmarks/results/curate.json]

- ROUGE-L filtering: new instructions against a pool of 5,000 (real instructions from
  the data folder), RougePool vs rouge_score's RougeScorer called pairwise (the
  Self-Instruct loop); the decisions (max score > 0.7) and scores compared.
- QDIT: 1,000 of 50,000 examples with 256-dimensional embeddings (hashed TF-IDF of
  real prompts), lazy greedy; on a small pool against the brute-force greedy.
- Decontamination: 50,000 training examples (flan_cot rows and instruction pool
  records) against every evaluation set.
The load average is recorded: the machine may be shared.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np


def _texts():
  from flanjax.curate import records  # pylint: disable=g-import-not-at-top
  from flanjax.data import sources  # pylint: disable=g-import-not-at-top
  root = sources.data_dir()
  files = sorted(glob.glob(f"{root}/flan_cot/*_train.tsv")) + sorted(
      glob.glob(f"{root}/instruction_pool/*.json"))
  out = []
  for f in files:
    out += records.read(f)[0]
  return out


def bench_rouge(recs, pool_size=5000, queries=100):
  from rouge_score import rouge_scorer  # pylint: disable=g-import-not-at-top
  from flanjax.curate.rouge import RougePool  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  insts = list(dict.fromkeys(r.instruction for r in recs))
  order = rng.permutation(len(insts))
  pool_texts = [insts[i] for i in order[:pool_size]]
  new = [insts[i] for i in order[pool_size:pool_size + queries]]
  # A few near copies, so that the filter has something to drop.
  new[::10] = [pool_texts[i] + " Explain briefly." for i in range(0, len(new[::10]))]
  t = time.perf_counter()
  pool = RougePool(pool_texts)
  ours = [pool.max_score(q, above=0.7)[0] > 0.7 for q in new]
  ours_s = time.perf_counter() - t
  exact = [pool.scores(q) for q in new[:20]]
  scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
  t = time.perf_counter()
  ref_scores = [[scorer.score(q, p)["rougeL"].fmeasure for p in pool_texts] for q in new]
  ref_s = time.perf_counter() - t
  ref = [max(s) > 0.7 for s in ref_scores]
  return {"pool": len(pool_texts), "new_instructions": len(new),
          "flanjax_s": round(ours_s, 3), "rouge_score_pairwise_s": round(ref_s, 2),
          "speedup": round(ref_s / ours_s, 1), "same_decisions": ours == ref,
          "dropped": int(sum(ours)),
          "scores_equal_first_20": all(e.tolist() == r for e, r in zip(exact, ref_scores[:20])),
          "exact_lcs_computed": pool.exact_computed}


def bench_qdit(recs, n=50_000, k=1000, dim=256):
  from flanjax.curate import select  # pylint: disable=g-import-not-at-top
  texts = [r.prompt for r in recs]
  texts = (texts * (n // len(texts) + 1))[:n]
  emb = select.tfidf_embeddings(texts, dim)
  # Repeated texts would tie; a little noise keeps every point its own.
  emb = emb + np.random.default_rng(0).random(emb.shape).astype(np.float32) * 0.01
  emb /= np.linalg.norm(emb, axis=1, keepdims=True)
  q = np.asarray([len(t) for t in texts], np.float64)
  t = time.perf_counter()
  chosen = select.qdit(emb, q, k, 0.5)
  secs = time.perf_counter() - t
  small = emb[:300].astype(np.float64)
  small /= np.linalg.norm(small, axis=1, keepdims=True)
  lazy = select.qdit(small, q[:300], 30, 0.5, progress=False)
  brute = select.brute_force_qdit(small, q[:300], 30, 0.5)
  return {"pool": n, "k": k, "dim": dim, "alpha": 0.5, "seconds": round(secs, 1),
          "distinct": len(set(chosen)), "small_pool_equals_brute_force": lazy == brute}


def bench_decontaminate(recs, n=50_000):
  from flanjax.curate import decontaminate as dc  # pylint: disable=g-import-not-at-top
  # The data folder has fewer distinct training examples than n: repeated to reach n.
  reps = n // len(recs) + 1
  texts = ([r.text for r in recs] * reps)[:n]
  wheres = ([r.where for r in recs] * reps)[:n]
  t = time.perf_counter()
  sets, _ = dc.eval_sets()
  index = dc.Index(sets)
  built = time.perf_counter() - t
  matches, by_record = dc.check(index, texts, wheres)
  secs = time.perf_counter() - t
  return {"training_examples": len(texts), "evaluation_examples": index.eval_examples,
          "index_s": round(built, 1), "total_s": round(secs, 1),
          "records_with_matches": len(by_record), "matches": len(matches)}


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default="benchmarks/results/curate.json")
  ap.add_argument("--parts", default="rouge,decontaminate,qdit",
                  help="comma-separated: rouge (slow: rouge_score pairwise), decontaminate, qdit")
  args = ap.parse_args(argv)
  parts = set(args.parts.split(","))
  load_before = os.getloadavg()
  t0 = time.time()
  recs = _texts()
  out = {"command": " ".join(["python -m benchmarks.curate_bench", *(argv or sys.argv[1:])])}
  for part, key, fn in (("rouge", "rouge_filter", bench_rouge),
                        ("decontaminate", "decontamination", bench_decontaminate),
                        ("qdit", "qdit", bench_qdit)):
    if part in parts:
      out[key] = fn(recs)
      print(json.dumps(out[key]), flush=True)
  commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
  out["machine"] = {"platform": platform.platform(), "processor": platform.processor(),
                    "cpus": os.cpu_count(), "load_average_before": [round(x, 2) for x in load_before],
                    "load_average_after": [round(x, 2) for x in os.getloadavg()],
                    "note": "see the load averages: above ~2 other jobs ran beside this one"}
  out["commit"], out["seconds"] = commit, round(time.time() - t0, 1)
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(out, f, indent=1)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()

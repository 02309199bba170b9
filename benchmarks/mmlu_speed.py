"""MMLU on a checkpoint, before and after the grouped scoring: seconds a question.

  python benchmarks/mmlu_speed.py CHECKPOINT N SUBJECT... (OUT=file.json)

For the first N test questions of each subject: rank classification as before (each
(prompt, letter) pair its own forward pass, `scoring.loglikelihood`, reference attention)
and as now (`scoring.loglikelihood_groups`: one encoder pass per prompt, reference and
blockwise attention), and 4-token greedy generation with either attention; each timed on its
second call (the first compiles), and the largest difference of the log-likelihoods."""
import os, sys, time, json, dataclasses  # noqa: E401
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import numpy as np
from flanjax.models import loading
from flanjax.data import registry
from flanjax.evaluation import harness, scoring, examples as ex_lib
from flanjax import decoding


def main():
  ck, n = sys.argv[1], int(sys.argv[2])
  L = loading.load(ck)
  registry.call_register_fns((registry.register_all,), L.vocab, input_length=4096)
  models = {impl: L.kind.build(dataclasses.replace(L.config, attention_impl=impl)) for impl in ("reference", "blockwise")}
  import subprocess
  out = {"command": " ".join(["python"] + sys.argv), "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(), "cpus": os.cpu_count(), "questions_per_subject": n, "load_start": os.getloadavg()}
  for subj in sys.argv[3:]:
    exs = ex_lib.load_examples(f"mmlu_{subj}", "test", L.vocab, 4096, n)
    ctx = [L.kind.prompt_ids(L.vocab, e.inputs) for e in exs]
    conts = [[harness.option_ids(L.kind, L.vocab, c, e.inputs, eos=False) for c in "ABCD"] for e in exs]
    row = {"prompt_tokens_mean": float(np.mean([len(c) for c in ctx]))}
    def old(m):  # before: every (prompt, letter) pair its own encoder pass
      return scoring.loglikelihood(m, L.params, L.kind, [c for c in ctx for _ in range(4)], [y for cs in conts for y in cs], batch_size=4, max_length=4096)[0]
    def new(m):
      return np.concatenate(scoring.loglikelihood_groups(m, L.params, L.kind, ctx, conts, batch_size=4, max_length=4096)[0])
    def gen(m):
      return decoding.Generator(m, L.params, L.vocab, 4096, decoding.DecodeConfig(method="greedy", max_decode_len=4), batch_size=4, kind=L.kind).generate_ids([np.asarray(c, np.int32) for c in ctx])
    vals = {}
    for name, fn, impl in [("rank_old_reference", old, "reference"), ("rank_new_reference", new, "reference"), ("rank_new_blockwise", new, "blockwise"), ("generate_reference", gen, "reference"), ("generate_blockwise", gen, "blockwise")]:
      t = time.time(); r = fn(models[impl]); c = time.time() - t
      t = time.time(); r = fn(models[impl]); s = time.time() - t
      row[name] = {"first_call_s": round(c, 2), "per_question_s": round(s / n, 3)}
      if name.startswith("rank"): vals[name] = np.asarray(r)
      print(subj, name, row[name], flush=True)
    row["max_abs_diff_new_vs_old"] = float(max(np.max(np.abs(vals[k] - vals["rank_old_reference"])) for k in vals))
    out[subj] = row
  out["load_end"] = os.getloadavg()
  print(json.dumps(out, indent=1))
  json.dump(out, open(os.environ.get("OUT", "mmlu_speed.json"), "w"), indent=1)


if __name__ == "__main__":
  main()

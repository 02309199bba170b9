"""python -m flanjax.curate COMMAND INPUT... --out OUT.jsonl [options]

Commands (each reads Alpaca JSON/JSONL, prompt/completion, chat messages, ShareGPT
conversations or Self-Instruct seed task files; writes JSON lines that
runs/user_data.gin trains on as they are, and OUT.report.json with what was kept
and what was dropped for which reason, also printed as a table):

  self-instruct  SEEDS --checkpoint CKPT --num N   generate N candidate tasks from seed tasks
  evolve         INPUT --checkpoint CKPT --rounds R rewrite instructions (Evol-Instruct)
  select         INPUT --method longest|quality|qdit|diverse|random --k N
  dedup          INPUT      exact, MinHash LSH near duplicates, ROUGE-L of instructions
  decontaminate  INPUT      n-gram overlap with evaluation data (--drop writes the clean file)

The generating commands append to OUT as they go and continue where an
interrupted run stopped; the others are fast and write OUT whole.
"""

from __future__ import annotations

import argparse
import math
import random
import sys

import numpy as np

from flanjax import config as flan_config
from flanjax.curate import records as rec_lib
from flanjax.curate.report import Progress, Report
from flanjax.errors import UserError

COMMANDS = ("self-instruct", "evolve", "select", "dedup", "decontaminate")


def _parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(prog="python -m flanjax.curate", description=__doc__.split("\n")[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter,
                               epilog="\n".join(__doc__.split("\n")[2:]))
  ap.add_argument("command", choices=COMMANDS)
  ap.add_argument("inputs", nargs="+", help="data files (any format flanjax trains on)")
  ap.add_argument("--out", required=True, help="the JSONL file to write")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--allow_evaluation_data", action="store_true",
                  help="read inputs that are the data folder's evaluation sets (BBH, GSM8K test, "
                  "MMLU, MT-Bench, AlpacaEval, the test prompts); refused otherwise, since what "
                  "curate writes is meant for training")
  g = ap.add_argument_group("select")
  g.add_argument("--method", choices=("longest", "quality", "qdit", "diverse", "random"))
  g.add_argument("--k", type=int, help="how many records to select")
  g.add_argument("--alpha", type=float, default=0.5, help="QDIT: weight of quality (0..1)")
  g.add_argument("--clusters", type=int, help="diverse: k-means clusters (default sqrt(k))")
  g.add_argument("--dim", type=int, default=256, help="hashed TF-IDF dimensions")
  g.add_argument("--embed_checkpoint", help="embed with this checkpoint's encoder (mean-pooled)")
  g.add_argument("--quality_checkpoint", help="quality = this model's per-token log-likelihood "
                 "of the response (default: each record's 'score' field)")
  g = ap.add_argument_group("dedup")
  g.add_argument("--jaccard", type=float, default=0.8, help="near-duplicate Jaccard threshold "
                 "(0: off)")
  g.add_argument("--num_perm", type=int, default=128)
  g.add_argument("--rouge", type=float, default=0.0, help="drop a record whose prompt "
                 "(instruction and input) has ROUGE-L above this against a kept one's, as "
                 "Self-Instruct filters its generated tasks (0: off, the default: records that "
                 "share a task's wording but not its input are not duplicates)")
  g = ap.add_argument_group("decontaminate")
  g.add_argument("--n", type=int, default=13, help="n-gram length in words")
  g.add_argument("--tasks", nargs="*", help="evaluation tasks to check (default: all)")
  g.add_argument("--common", type=int, default=20, help="n-grams in this many evaluation "
                 "examples are template text and ignored")
  g.add_argument("--min_words", type=int, default=8, help="an evaluation field shorter than n "
                 "words is matched whole when it has at least this many words")
  g.add_argument("--drop", action="store_true", help="write the records without a match")
  g = ap.add_argument_group("self-instruct and evolve")
  g.add_argument("--checkpoint", help="a run folder, converted checkpoint or HF folder")
  g.add_argument("--num", type=int, default=100, help="self-instruct: candidate instructions "
                 "to generate; the filters keep some of them, and each kept task writes up to "
                 "--instances records")
  g.add_argument("--rounds", type=int, default=1, help="evolve: rounds")
  g.add_argument("--instances", type=int, default=2, help="self-instruct: instances per task")
  g.add_argument("--batch_size", type=int, default=8)
  g.add_argument("--max_decode_len", type=int, default=96)
  g.add_argument("--temperature", type=float, default=0.7)
  g.add_argument("--top_p", type=float, default=0.95)
  return ap


# (option, lowest, highest, inclusive of the lowest): checked before any data is read.
_RANGES = (("k", 1, None, True), ("alpha", 0.0, 1.0, True), ("clusters", 1, None, True),
           ("dim", 1, None, True), ("jaccard", 0.0, 1.0, True), ("num_perm", 1, None, True),
           ("rouge", 0.0, 1.0, True), ("n", 1, None, True), ("common", 2, None, True),
           ("min_words", 1, None, True), ("num", 1, None, True), ("rounds", 1, None, True),
           ("instances", 1, None, True), ("batch_size", 1, None, True),
           ("max_decode_len", 1, None, True), ("temperature", 0.0, None, False),
           ("top_p", 0.0, 1.0, False))


def check_options(args) -> None:
  """A one-line error for an option outside its range (some would silently turn a check off:
  --n 0 or --common 1 match nothing)."""
  for name, lo, hi, closed in _RANGES:
    v = getattr(args, name, None)
    if v is None:
      continue
    low_ok = v >= lo if closed else v > lo
    if not low_ok or (hi is not None and v > hi):
      span = f"{'[' if closed else '('}{lo}, {f'{hi}]' if hi is not None else 'inf)'}"
      raise UserError(f"--{name} {v} is outside {span}; give a value in that range")


def check_out(args) -> None:
  """OUT must be a new or a regular file, and none of the inputs (it is replaced whole)."""
  import os  # pylint: disable=g-import-not-at-top
  if os.path.isdir(args.out):
    raise UserError(f"--out {args.out} is a folder; give the path of a JSON lines file to write, "
                    f"e.g. --out {os.path.join(args.out, args.command + '.jsonl')}")
  for path in args.inputs:
    if os.path.exists(path) and os.path.exists(args.out) and os.path.samefile(path, args.out):
      raise UserError(f"--out {args.out} is the input {path}, which writing it would overwrite; "
                      "give --out another path")


def check_inputs(args) -> None:
  """Refuses the data folder's evaluation sets as inputs (curate writes training data)."""
  from flanjax.data import sources  # pylint: disable=g-import-not-at-top
  if args.allow_evaluation_data:
    return
  for path in args.inputs:
    held = sources.evaluation_data(path)
    if held:
      raise UserError(f"{path} is evaluation data ({held}), which never enters training; "
                      "curate another file, or pass --allow_evaluation_data to read it anyway")


def check_command(args) -> None:
  """What a command needs besides its inputs, checked before they are read."""
  if args.command == "select":
    _need(args, "method", "k")
  elif args.command == "decontaminate":
    from flanjax.curate import decontaminate as dc  # pylint: disable=g-import-not-at-top
    dc.check_names(args.tasks)
  elif args.command in ("self-instruct", "evolve"):
    _need(args, "checkpoint")


def _need(args, *names):
  for n in names:
    if getattr(args, n) is None:
      raise UserError(f"{args.command} needs --{n}")


def run_dedup(args, records, report):
  from flanjax.curate import dedup  # pylint: disable=g-import-not-at-top
  return dedup.dedup(records, report, jaccard_threshold=args.jaccard, num_perm=args.num_perm,
                     rouge=args.rouge or None)


def _quality(args, records) -> np.ndarray:
  if args.quality_checkpoint:
    from flanjax.curate import generate  # pylint: disable=g-import-not-at-top
    return generate.loglikelihood_quality(args.quality_checkpoint, records, args.batch_size)
  missing = next((r for r in records if isinstance(r.raw.get("score"), bool)
                  or not isinstance(r.raw.get("score"), (int, float))
                  or not math.isfinite(r.raw["score"])), None)
  if missing is not None:
    what = "a non-finite" if isinstance(missing.raw.get("score"), float) else "no numeric"
    raise UserError(f"{missing.where}: {what} 'score' field ({missing.raw.get('score')!r}); give "
                    "every record a finite score, or --quality_checkpoint CKPT to score "
                    "responses by the model's log-likelihood")
  return np.asarray([float(r.raw["score"]) for r in records])


def _embeddings(args, records) -> np.ndarray:
  from flanjax.curate import select as sel  # pylint: disable=g-import-not-at-top
  texts = [r.prompt for r in records]
  if args.embed_checkpoint:
    from flanjax.models import loading  # pylint: disable=g-import-not-at-top
    return sel.encoder_embeddings(loading.load(args.embed_checkpoint), texts)
  return sel.tfidf_embeddings(texts, args.dim)


def choose(args, records) -> list[int]:
  """Indices of the selection, in the order chosen."""
  from flanjax.curate import select as sel  # pylint: disable=g-import-not-at-top
  k = min(args.k, len(records))
  if args.method == "longest":
    lengths = [len(r.response) for r in records]
    return sorted(range(len(records)), key=lambda i: (-lengths[i], i))[:k]
  if args.method == "random":
    return sorted(random.Random(args.seed).sample(range(len(records)), k))
  if args.method == "quality":
    q = _quality(args, records)
    return sorted(range(len(records)), key=lambda i: (-q[i], i))[:k]
  emb = args._emb  # pylint: disable=protected-access
  if args.method == "diverse":
    return sel.diverse(emb, k, args.clusters or max(1, int(round(k ** 0.5))), args.seed)
  q = _quality(args, records) if args.alpha > 0 else np.zeros(len(records))
  return sel.qdit(emb, q, k, args.alpha)


def run_select(args, records, report):
  from flanjax.curate import select as sel  # pylint: disable=g-import-not-at-top
  args._emb = _embeddings(args, records)  # pylint: disable=protected-access
  chosen = choose(args, records)
  picked = set(chosen)
  for i, r in enumerate(records):
    if i not in picked:
      report.drop(f"not selected ({args.method})", r.where)
  report.figures["select"] = {"method": args.method, "k": args.k, "alpha": args.alpha,
                              "embeddings": args.embed_checkpoint or f"hashed TF-IDF, {args.dim} dims"}
  report.figures.update(sel.figures(args._emb, records, chosen))  # pylint: disable=protected-access
  return [records[i] for i in chosen]


def run_decontaminate(args, records, report):
  from flanjax.curate import decontaminate as dc  # pylint: disable=g-import-not-at-top
  sets, notes = dc.eval_sets(args.tasks)
  index = dc.Index(sets, n=args.n, common=args.common, min_words=args.min_words)
  prog = Progress(len(records), "decontaminate")
  matches, by_record = dc.check(index, [r.text for r in records], [r.where for r in records], prog)
  report.figures["decontamination"] = dict(index.describe(), notes=notes,
                                           records_with_matches=len(by_record),
                                           matches_by_set=dict(_count(m.eval_set for m in matches)),
                                           ignored_template_ngrams=index.ignored_report())
  report.figures["matches"] = dc.to_jsonable(index, matches)
  for m in matches[:20]:
    print(f"match: {m.train_where} ~ {m.eval_set} #{m.eval_index}: \"{m.ngram}\"", flush=True)
  kept = []
  for i, r in enumerate(records):
    if i in by_record and args.drop:
      m = by_record[i][0]
      report.drop("shares an n-gram with evaluation data", r.where,
                  f"{m.eval_set} #{m.eval_index}: \"{m.ngram}\"")
    else:
      kept.append(r)
  return kept


def _count(items):
  import collections  # pylint: disable=g-import-not-at-top
  return collections.Counter(items).most_common()


def run(argv) -> int:
  args = _parser().parse_args(argv)
  check_options(args)
  check_out(args)
  check_inputs(args)
  check_command(args)
  report = Report(args.command, argv, args.inputs, args.out)
  if args.command in ("self-instruct", "evolve"):
    from flanjax.curate import generate  # pylint: disable=g-import-not-at-top
    kept, written = generate.run(args, report)
    report.finish(kept)
    what = "tasks" if args.command == "self-instruct" else "evolutions"
    print(f"curate: wrote {written:,} records ({kept:,} {what} kept of {report.read:,} "
          f"candidates) to {args.out} (report: {args.out}.report.json)", file=sys.stderr, flush=True)
    return 0
  records, reads = rec_lib.read_all(args.inputs)
  report.add_read_reports(reads)
  handler = {"select": run_select, "dedup": run_dedup, "decontaminate": run_decontaminate}
  kept = handler[args.command](args, records, report)
  report.check(len(kept))  # before OUT is written: a file that looks complete is complete
  rec_lib.write(args.out, kept)
  report.finish(len(kept))
  print(f"curate: wrote {len(kept):,} records to {args.out} (report: {args.out}.report.json)",
        file=sys.stderr, flush=True)
  return 0


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  flan_config.run_plain_main(lambda _: run(argv), "flanjax.curate", argv)


if __name__ == "__main__":
  flan_config.as_command(main)

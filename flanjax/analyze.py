"""python -m flanjax.analyze token-shift --base B --tuned T --prompts FILE [--out DIR]

Token shift (as in Lin et al. 2023, "The Unlocking Spell on Base LLMs"): how much
instruction tuning changed what a model writes, token by token. The tuned model
answers each prompt greedily (flanjax.decoding's Generator); then the base model
reads the same prompt and is teacher-forced on that answer, and each generated
token is placed by its rank among the base model's next-token predictions:

  unshifted  the base model's top-1 token too
  marginal   in the base model's top 3, not its top 1
  shifted    outside the base model's top 3

Reports the share of each over all generated positions (EOS included, when the
tuned model wrote it), the most frequent shifted tokens (with what the base
model preferred there), per prompt the tokens and their ranks, as JSON
(<out>/token_shift.json) and a self-contained HTML page marking each token
(<out>/token_shift.html). Both models must share a vocabulary: ranks compare ids.

Checkpoints: a training run, a converted orbax folder or a Hugging Face folder
(models/loading.py). Prompts: a text file (one per line) or JSON lines (--field),
wrapped in the tuned run's recorded prompt format (or --prompt_format).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import json
import os
import sys
import time
from typing import Sequence

import numpy as np

from flanjax import config as flan_config
from flanjax.errors import UserError

TOP_K = 3
CLASSES = ("unshifted", "marginal", "shifted")


def shift_class(rank: int) -> str:
  """rank: how many tokens the base model scores strictly above the generated one."""
  return "unshifted" if rank == 0 else ("marginal" if rank < TOP_K else "shifted")


# ---------------------------------------------------------------- the base model, teacher-forced

@functools.lru_cache(maxsize=None)
def _forced_fn():
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  @functools.partial(jax.jit, static_argnames=("model", "kind", "length"))
  def forced(model, params, prompts, lengths, tokens, *, kind, length):
    """Feeds `tokens` [b, length] after the prompts through the kind's decoding start and
    step (the cache decoding uses); per position: the token's rank under the logits that
    predict it, the top-1 token there, and the token's log-probability."""
    variables = {"params": params}
    logits, state = kind.decode_start(model, variables, prompts, lengths, length)

    def body(carry, inp):
      logits, state = carry
      tok, i = inp
      logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
      tok_lp = jnp.take_along_axis(logp, tok[:, None], axis=-1)[:, 0]
      rank = jnp.sum(logp > tok_lp[:, None], axis=-1)
      top = jnp.argmax(logp, axis=-1)
      logits, state = kind.decode_step(model, variables, state, tok, i)
      return (logits, state), (rank, top, tok_lp)

    _, (rank, top, lp) = jax.lax.scan(body, (logits, state),
                                      (tokens.T, jnp.arange(length, dtype=jnp.int32)))
    return rank.T, top.T, lp.T

  return forced


def base_ranks(loaded, prompt_ids: Sequence[np.ndarray], generated: Sequence[Sequence[int]],
               input_length: int, length: int, batch_size: int = 8):
  """Per prompt: (ranks, base top-1 ids, log-probs) of each generated token under `loaded`.

  Batches, prompt widths and the cache length (`length`, the decoding limit) are those of
  decoding.Generator, so a model scored on its own greedy output sees the logits it chose
  from.
  """
  from flanjax import decoding  # pylint: disable=g-import-not-at-top
  from flanjax.models import kinds  # pylint: disable=g-import-not-at-top
  gen = decoding.Generator(loaded.model, loaded.params, loaded.vocab, input_length,
                           decoding.DecodeConfig(), batch_size=batch_size, kind=loaded.kind)
  rows = gen._prompt_rows(prompt_ids)  # pylint: disable=protected-access  (fitted as decoding fits)
  if any(len(g) > length for g in generated):
    raise ValueError(f"a generation is longer than the decoding limit {length}")
  out = [None] * len(rows)
  forced = _forced_fn()
  order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))  # as Generator batches
  for start in range(0, len(rows), batch_size):
    which = order[start:start + batch_size]
    width = kinds.bucket(max(len(rows[i]) for i in which),
                         cap=input_length + loaded.kind.prompt_extra())
    prompts = np.zeros((batch_size, width), np.int32)
    lengths = np.ones((batch_size,), np.int32)
    tokens = np.zeros((batch_size, length), np.int32)
    for j, i in enumerate(which):
      prompts[j, :len(rows[i])] = rows[i]
      lengths[j] = max(len(rows[i]), 1)
      tokens[j, :len(generated[i])] = generated[i]
    rank, top, lp = (np.asarray(x) for x in forced(
        loaded.model, loaded.params, prompts, lengths, tokens, kind=loaded.kind, length=length))
    for j, i in enumerate(which):
      n = len(generated[i])
      out[i] = (rank[j, :n].tolist(), top[j, :n].tolist(), lp[j, :n].tolist())
  return out


# ---------------------------------------------------------------- the analysis

def check_same_vocabulary(base, tuned, base_path: str, tuned_path: str) -> None:
  from flanjax.data import tasks  # pylint: disable=g-import-not-at-top
  a, b = tasks.vocab_fingerprint(base.vocab), tasks.vocab_fingerprint(tuned.vocab)
  if a != b:
    raise UserError(f"--base {base_path} and --tuned {tuned_path} have different vocabularies "
                    f"({a} vs {b}); token shift compares token ids, so give two models that "
                    "share a tokenizer")


def token_texts(vocab, ids: Sequence[int]) -> list[str]:
  """Each token's text as it reads inside the sequence (the decoded prefix's growth), so
  SentencePiece's leading spaces are kept."""
  out, before = [], ""
  for k in range(1, len(ids) + 1):
    now = vocab.decode(list(ids[:k]))
    out.append(now[len(before):] if now.startswith(before) else vocab.decode([ids[k - 1]]))
    before = now
  return out


@dataclasses.dataclass
class Shift:
  prompts: list  # per prompt: {"prompt", "generation", "tokens": [{...}]}
  counts: dict  # class -> positions

  @property
  def positions(self) -> int:
    return sum(self.counts.values())

  def shares(self) -> dict:
    n = max(self.positions, 1)
    return {c: self.counts.get(c, 0) / n for c in CLASSES}

  def top_shifted(self, n: int = 20) -> list[dict]:
    seen = collections.Counter()
    preferred = collections.defaultdict(collections.Counter)
    for p in self.prompts:
      for t in p["tokens"]:
        if t["class"] == "shifted":
          seen[t["text"]] += 1
          preferred[t["text"]][t["base_top1_text"]] += 1
    return [{"token": tok, "count": c, "base_preferred": preferred[tok].most_common(1)[0][0]}
            for tok, c in seen.most_common(n)]


def token_shift(base, tuned, prompts: Sequence[str], *, max_new_tokens: int = 64,
                input_length: int = 512, batch_size: int = 8, log=print) -> Shift:
  """The tuned model's greedy answers, each token ranked by the base model (module doc)."""
  from flanjax import decoding  # pylint: disable=g-import-not-at-top
  cfg = decoding.DecodeConfig(method="greedy", max_decode_len=max_new_tokens)
  gen = decoding.Generator(tuned.model, tuned.params, tuned.vocab, input_length, cfg,
                           batch_size=batch_size, kind=tuned.kind)
  t0 = time.time()
  encoded_tuned = [gen.encode(p) for p in prompts]
  ids = gen.generate_ids(encoded_tuned)
  eos = tuned.vocab.eos_id
  # generate_ids strips EOS: a generation shorter than the limit ended with one.
  generated = [list(x) + ([eos] if len(x) < max_new_tokens else []) for x in ids]
  log(f"token-shift: {len(prompts)} prompts answered by the tuned model in "
      f"{time.time() - t0:.1f}s ({sum(map(len, generated))} tokens)")
  base_gen = decoding.Generator(base.model, base.params, base.vocab, input_length, cfg,
                                kind=base.kind)
  scored = base_ranks(base, [base_gen.encode(p) for p in prompts], generated, input_length,
                      max_new_tokens, batch_size)
  counts = collections.Counter()
  out = []
  for prompt, new, toks, (ranks, tops, lps) in zip(prompts, ids, generated, scored):
    texts = token_texts(tuned.vocab, toks)
    rows = []
    for tok, text, rank, top, lp in zip(toks, texts, ranks, tops, lps):
      cls = shift_class(int(rank))
      counts[cls] += 1
      rows.append({"id": int(tok), "text": text, "rank": int(rank), "class": cls,
                   "base_top1": int(top), "base_top1_text": tuned.vocab.decode([int(top)]),
                   "base_logprob": round(float(lp), 4)})
    out.append({"prompt": prompt, "generation": tuned.vocab.decode(list(new)), "tokens": rows})
  log(f"token-shift: scored by the base model in {time.time() - t0:.1f}s in all")
  return Shift(out, dict(counts))


# ---------------------------------------------------------------- reports

_STYLE = """body{font-family:sans-serif;max-width:60em;margin:2em auto;line-height:1.6}
.p{color:#555;white-space:pre-wrap;border-left:3px solid #ccc;padding-left:.6em}
.g{white-space:pre-wrap;font-family:monospace}
.unshifted{}.marginal{background:#fde9a9}.shifted{background:#f7a6a6}
table{border-collapse:collapse}td,th{padding:.2em .8em;border-bottom:1px solid #ddd}"""


def to_json(shift: Shift, base_path: str, tuned_path: str, top_n: int = 20) -> dict:
  return {"base": base_path, "tuned": tuned_path, "prompts": len(shift.prompts),
          "positions": shift.positions, "counts": {c: shift.counts.get(c, 0) for c in CLASSES},
          "shares": shift.shares(), "top_k": TOP_K,
          "top_shifted_tokens": shift.top_shifted(top_n), "per_prompt": shift.prompts}


def to_html(report: dict) -> str:
  """One page, no outside resources; every text from the models or prompts is escaped."""
  from flanjax.evaluation.review import escape as e  # pylint: disable=g-import-not-at-top
  s = report["shares"]
  parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>token shift</title>",
           f"<style>{_STYLE}</style></head><body><h1>Token shift</h1>",
           f"<p>base <code>{e(report['base'])}</code>, tuned <code>{e(report['tuned'])}</code>; "
           f"{report['prompts']} prompts, {report['positions']} generated tokens.</p>",
           "<table><tr><th>class</th><th>meaning</th><th>share</th></tr>"]
  meaning = {"unshifted": "the base model's top-1", "marginal": f"in its top {TOP_K}",
             "shifted": f"outside its top {TOP_K}"}
  for c in CLASSES:
    parts.append(f"<tr><td class='{c}'>{c}</td><td>{meaning[c]}</td>"
                 f"<td>{100 * s[c]:.1f}%</td></tr>")
  parts.append("</table><h2>Most frequent shifted tokens</h2><table>"
               "<tr><th>token</th><th>count</th><th>base preferred</th></tr>")
  for t in report["top_shifted_tokens"]:
    parts.append(f"<tr><td><code>{e(repr(t['token']))}</code></td><td>{t['count']}</td>"
                 f"<td><code>{e(repr(t['base_preferred']))}</code></td></tr>")
  parts.append("</table><h2>Generations</h2>")
  for p in report["per_prompt"]:
    spans = "".join(
        f"<span class='{t['class']}' title='{e('rank ' + str(t['rank']) + ', base: ' + repr(t['base_top1_text']))}'>"
        f"{e(t['text'])}</span>" for t in p["tokens"])
    parts.append(f"<div class='p'>{e(p['prompt'])}</div><p class='g'>{spans}</p>")
  parts.append("</body></html>")
  return "\n".join(parts)


# ---------------------------------------------------------------- the command

def _parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(prog="python -m flanjax.analyze",
                               description="Analyses of trained models.")
  sub = ap.add_subparsers(dest="command", required=True)
  ts = sub.add_parser("token-shift", help="where a tuned model's tokens leave a base model's "
                      "top choices")
  ts.add_argument("--base", required=True, help="the base model (run, orbax or HF folder)")
  ts.add_argument("--tuned", required=True, help="the tuned model")
  ts.add_argument("--prompts", required=True, help="a .txt (one per line) or .jsonl file")
  ts.add_argument("--field", default=None, help="the prompt field of a JSONL file")
  ts.add_argument("--out", default="token_shift", help="folder for token_shift.json/.html")
  ts.add_argument("--max_new_tokens", type=int, default=64)
  ts.add_argument("--input_length", type=int, default=512)
  ts.add_argument("--batch_size", type=int, default=8)
  ts.add_argument("--top", type=int, default=20, help="how many shifted tokens to list")
  ts.add_argument("--prompt_format", default=None,
                  help="wrap prompts in this format (default: the tuned run's recorded one)")
  return ap


def run_token_shift(args) -> dict:
  from flanjax import infer  # pylint: disable=g-import-not-at-top
  from flanjax.models import loading  # pylint: disable=g-import-not-at-top
  if args.max_new_tokens < 1 or args.input_length < 2 or args.batch_size < 1:
    raise UserError("--max_new_tokens, --batch_size must be >= 1 and --input_length >= 2")
  prompts = [p for p, _ in infer.read_prompts(args.prompts, args.field)]
  fmt = infer.prompt_format(args.tuned, args.prompt_format)
  base, tuned = loading.load(args.base), loading.load(args.tuned)
  check_same_vocabulary(base, tuned, args.base, args.tuned)
  log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
  log(f"token-shift: base {base.source} ({base.kind.name}), tuned {tuned.source} "
      f"({tuned.kind.name}); {len(prompts)} prompts, {fmt.name} prompt format")
  shift = token_shift(base, tuned, [fmt.wrap(p) for p in prompts],
                      max_new_tokens=args.max_new_tokens, input_length=args.input_length,
                      batch_size=args.batch_size, log=log)
  report = to_json(shift, args.base, args.tuned, args.top)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "token_shift.json"), "w", encoding="utf-8") as f:
    json.dump(report, f, ensure_ascii=False, indent=1)
  with open(os.path.join(args.out, "token_shift.html"), "w", encoding="utf-8") as f:
    f.write(to_html(report))
  s = report["shares"]
  print(f"token shift over {report['positions']} tokens of {len(prompts)} generations: "
        f"unshifted (base top-1) {100 * s['unshifted']:.1f}%, marginal (top {TOP_K}) "
        f"{100 * s['marginal']:.1f}%, shifted {100 * s['shifted']:.1f}%", flush=True)
  if report["top_shifted_tokens"]:
    print("most frequent shifted tokens: " + ", ".join(
        f"{t['token']!r} x{t['count']}" for t in report["top_shifted_tokens"][:10]))
  print(f"wrote {os.path.join(args.out, 'token_shift.json')} and token_shift.html", flush=True)
  return report


def main(argv=None):
  import logging  # pylint: disable=g-import-not-at-top
  logging.getLogger("absl").setLevel(logging.ERROR)
  argv = sys.argv[1:] if argv is None else list(argv)
  return flan_config.run_plain_main(
      lambda a: (run_token_shift(_parser().parse_args(a)), 0)[1], "flanjax.analyze", argv)


if __name__ == "__main__":
  flan_config.as_command(main)

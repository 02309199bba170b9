"""Generates from a checkpoint: prompts in, JSON lines out.

  python -m flanjax.infer --checkpoint runs/flanjax_builtin "What is 3 plus 4?"
  python -m flanjax.infer --checkpoint ~/models/flan-t5-small --input prompts.txt
  python -m flanjax.infer --checkpoint runs/x --input data.jsonl --field question \\
      --output out.jsonl --method beam --num_beams 4

--checkpoint: a training run (its newest checkpoint, or --step), a converted
orbax checkpoint, or a Hugging Face T5 / Llama folder. Prompts come from the
command line, a text file (one prompt per line) or a JSONL file (the --field
of each record; the record's other fields are copied to the output). Output:
one JSON object per prompt, {"prompt", "generation", "score", ...}, to
--output or stdout, written as each batch finishes so an interrupted run
keeps what it produced. Decoding settings are flags or gin bindings of
DecodeConfig (--gin.DecodeConfig.top_p=0.9). --stop TEXT (repeatable) cuts each
generation before the first occurrence of TEXT ('\\n\\nQ:' is read with its escapes).
--input mt_bench | alpaca_eval | lima | vicuna | koala | sinstruct | wizardlm (or the
set's file) answers an open-ended prompt set for `python -m flanjax.judge`, MT-Bench's
second turn after the model's own first answer (flanjax/evaluation/open_prompts.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from flanjax import config as flan_config
from flanjax import decoding
from flanjax.data import chat, sources
from flanjax.errors import UserError
from flanjax.evaluation import open_prompts

PROMPT_FIELDS = ("prompt", "inputs", "input", "question", "instruction", "text")


def _step(text: str):
  from flanjax.run_folder import parse_step  # pylint: disable=g-import-not-at-top
  return parse_step(text)


def _parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(prog="python -m flanjax.infer",
                               description=__doc__.split("\n")[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter,
                               epilog="\n".join(__doc__.split("\n")[2:]))
  ap.add_argument("prompts", nargs="*", help="prompts given on the command line")
  ap.add_argument("--checkpoint", required=True, help="run dir, converted checkpoint or HF dir")
  ap.add_argument("--step", type=_step, help="a training run's step, or 'best' (its best "
                  "checkpoint; default: the newest)")
  ap.add_argument("--adapter", help="LoRA adapters over --checkpoint: a LoRA training run (at "
                  "--step) or a PEFT adapter folder")
  ap.add_argument("--input", help="a .txt (one prompt per line) or .jsonl file of prompts")
  ap.add_argument("--field", help=f"the JSONL field holding the prompt (default: the first "
                  f"of {', '.join(PROMPT_FIELDS)} that the first record has)")
  ap.add_argument("--output", help="JSONL file to write (default: stdout)")
  ap.add_argument("--method", choices=decoding.METHODS)
  ap.add_argument("--max_decode_len", type=flan_config.whole_number())
  ap.add_argument("--num_beams", type=flan_config.whole_number())
  ap.add_argument("--length_penalty", type=float)
  ap.add_argument("--temperature", type=float)
  ap.add_argument("--top_k", type=flan_config.whole_number(0), help="0: off")
  ap.add_argument("--top_p", type=float)
  ap.add_argument("--seed", type=int)
  ap.add_argument("--stop", action="append", metavar="TEXT",
                  help="cut each generation before the first occurrence of TEXT (repeatable; "
                  "escapes such as \\n are read as in Python: --stop '\\n\\nQ:')")
  ap.add_argument("--batch_size", type=flan_config.whole_number(), default=16)
  ap.add_argument("--prompt_format", choices=chat.NAMES,
                  help="wrap each prompt in this format (default: the one a training run "
                  "recorded, else plain: the prompt as given)")
  ap.add_argument("--max_input_length", type=flan_config.whole_number(), default=2048,
                  help="longer prompts are cut to this many tokens (and counted)")
  return ap


def read_prompts(path: str, field: str | None):
  """[(prompt, extra fields)] from a text or JSONL file; bad records name file and line."""
  if path.endswith((".jsonl", ".json")):
    reader = sources.Reader(path)
    out = []
    for where, rec in sources.read_jsonl(reader):
      if field is None:
        field = next((f for f in PROMPT_FIELDS if f in rec), None)
        if field is None:
          raise UserError(f"{where}: no prompt field (has {sorted(rec)}); name it with --field")
      if sources.require(reader, where, rec, [field], non_empty=[field]):
        reader.report.kept += 1
        out.append((rec[field], {k: v for k, v in rec.items() if k != field}))
    reader.done()
    return out
  if not os.path.isfile(path):
    raise UserError(f"{path} does not exist; give a .txt or .jsonl file of prompts")
  try:
    with open(path, encoding="utf-8") as f:
      lines = [line.rstrip("\r\n") for line in f]
  except UnicodeDecodeError as e:
    raise UserError(f"{path}: bytes that are not UTF-8 at offset {e.start}; re-encode the file "
                    "as UTF-8") from None
  prompts = [(line, {}) for line in lines if line.strip()]
  if not prompts:
    raise UserError(f"{path} holds no prompts (one per line)")
  return prompts


def prompt_format(checkpoint: str, name: str | None) -> chat.PromptFormat:
  """The format of --prompt_format, else the one the run recorded, else plain.
  hf_chat_template given by name: the run's recorded template, else the checkpoint's
  (or its vocab/ folder's) tokenizer_config.json."""
  from flanjax.run_folder import RunFolder  # pylint: disable=g-import-not-at-top
  run = RunFolder.find(checkpoint)
  recorded = run.read_prompt_format() if run else None
  if recorded and name in (None, recorded.get("name")):
    return chat.from_record(recorded)
  if name != "hf_chat_template":
    return chat.get(name or "plain")
  folders = [checkpoint] + ([run.vocab_dir] if run else [])
  return chat.load_hf_template(next((f for f in folders if os.path.isfile(
      os.path.join(f, "tokenizer_config.json"))), checkpoint))


def _decode_config(args) -> decoding.DecodeConfig:
  base = decoding.DecodeConfig()  # gin bindings, else the defaults
  flags = {k: getattr(args, k) for k in ("method", "max_decode_len", "num_beams",
                                         "length_penalty", "temperature", "top_k", "top_p",
                                         "seed") if getattr(args, k) is not None}
  if args.stop is not None:
    flags["stop"] = tuple(_unescape(s) for s in args.stop)
  return decoding.DecodeConfig(**{**base.__dict__, **flags})


def _unescape(text: str) -> str:
  """'\\n\\nQ:' as typed in a shell -> the string with two newlines."""
  try:
    return text.encode("latin-1", "backslashreplace").decode("unicode_escape")
  except UnicodeDecodeError:
    raise UserError(f"--stop {text!r}: a malformed escape; write e.g. '\\n\\nQ:'") from None


def _check_output(args) -> None:
  """--output is replaced as generations come: never a folder or the prompts' own file."""
  if not args.output:
    return
  if os.path.isdir(args.output):
    raise UserError(f"--output {args.output} is a folder; give the path of a JSON lines file, "
                    f"e.g. --output {os.path.join(args.output, 'generations.jsonl')}")
  if args.input and os.path.exists(args.input) and os.path.exists(args.output) \
      and os.path.samefile(args.input, args.output):
    raise UserError(f"--output {args.output} is the --input file, which writing would "
                    "overwrite before its prompts are read; give --output another path")


def run(argv) -> int:
  args = _parser().parse_args(argv)
  _check_output(args)
  if open_prompts.set_name(args.input):  # mt_bench, alpaca_eval ...: every turn, for the judge
    return open_prompts.infer(
        args.input, args.checkpoint, args.step, prompt_format(args.checkpoint, args.prompt_format),
        _decode_config(args), batch_size=args.batch_size,
        max_input_length=args.max_input_length, output=args.output)
  prompts = [(p, {}) for p in args.prompts]
  if args.input:
    prompts += read_prompts(args.input, args.field)
  if not prompts:
    raise UserError("no prompts: give them as arguments or with --input FILE")
  cfg = _decode_config(args)
  fmt = prompt_format(args.checkpoint, args.prompt_format)
  from flanjax.models import loading  # pylint: disable=g-import-not-at-top  (imports jax)
  t0 = time.time()
  loaded = loading.load(args.checkpoint, step=args.step, adapter=args.adapter)
  print(f"infer: {loaded.source} ({loaded.kind.name}); {len(prompts)} prompts in the "
        f"{fmt.name} prompt format; {cfg.method} decoding, up to {cfg.max_decode_len} new "
        "tokens", file=sys.stderr, flush=True)
  gen = decoding.Generator(loaded.model, loaded.params, loaded.vocab, args.max_input_length,
                           cfg, batch_size=args.batch_size, kind=loaded.kind)
  encoded = [gen.encode(fmt.wrap(p)) for p, _ in prompts]
  gen.input_length = max(1, min(args.max_input_length, max(len(e) for e in encoded)))
  out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
  done, new_tokens, t1 = 0, 0, time.time()
  try:
    for start in range(0, len(prompts), args.batch_size):
      chunk = slice(start, start + args.batch_size)
      ids, scores = gen.generate_ids(encoded[chunk], with_scores=True)
      for (prompt, extra), row, score in zip(prompts[chunk], ids, scores):
        rec = {**extra, "prompt": prompt, "generation": fmt.cut(gen.decode(row)),
               "score": round(score, 6), "new_tokens": len(row)}
        out.write(json.dumps(rec, ensure_ascii=False) + "\n")
        new_tokens += len(row)
      out.flush()
      done = min(len(prompts), start + args.batch_size)
      secs = time.time() - t1
      print(f"infer: {done}/{len(prompts)} prompts, {done / secs:.1f} prompts/s, "
            f"{new_tokens / secs:.0f} new tokens/s", file=sys.stderr, flush=True)
  finally:
    if out is not sys.stdout:
      out.close()
  if gen.truncated:
    print(f"infer: {gen.truncated} prompts were longer than --max_input_length="
          f"{args.max_input_length} tokens and were cut", file=sys.stderr)
  print(f"infer: done in {time.time() - t0:.1f}s" +
        (f", wrote {args.output}" if args.output else ""), file=sys.stderr)
  return 0


def main(argv=None):
  flan_config.run_gin_command(run, "flanjax.infer", argv)


if __name__ == "__main__":
  flan_config.as_command(main)

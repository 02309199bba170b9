"""The gin-configurable `evaluate`: a checkpoint on evaluation tasks -> table, JSON, TensorBoard.

Kept apart from flanjax/evaluate.py (the command, run as __main__) so that gin
sees one `evaluate` configurable whether the gin files or the command import it.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import json
import os
import time
from typing import Callable, Sequence

import gin

from flanjax import decoding
from flanjax.data import registry
from flanjax.errors import UserError
from flanjax.evaluation import harness, review
from flanjax.evaluation.harness import evaluate_suite, format_results

LIST_HINT = "list them with `python -m flanjax.evaluate --list_tasks`"


def resolve_tasks(specs: Sequence[str]) -> list[str]:
  """Names, mixtures, 'name:split' and fnmatch patterns -> registered names (order kept).

  An unknown name is one UserError naming it, the closest names, and how to list them.
  """
  known_tasks = registry.list_tasks()
  known = sorted(set(known_tasks) | set(registry.list_mixtures()))
  out = []
  for spec in specs:
    spec = spec.strip()
    if not spec:
      continue
    name, _, split = spec.partition(":")
    suffix = f":{split}" if split else ""
    if any(c in name for c in "*?["):
      matched = [t for t in known_tasks if fnmatch.fnmatchcase(t, name)]
      if not matched:
        raise UserError(f"no task matches {name!r}; {LIST_HINT}")
      out += [m + suffix for m in matched]
    elif name in known:
      out.append(name + suffix)
    else:
      close = difflib.get_close_matches(name, known, n=3)
      hint = f" (did you mean {', '.join(close)}?)" if close else ""
      raise UserError(f"unknown task {name!r}{hint}; {LIST_HINT} (a task of your own files "
                      "is registered by the --gin_file / --gin.user_data.tasks you trained "
                      "with: pass them here too)")
  return list(dict.fromkeys(out))


def _step_of(loaded, step):
  found = getattr(loaded, "step", None)
  return int(found) if found is not None else (int(step) if step is not None else 0)


def _load(checkpoint: str, step, prompt_format: str | None, log, adapter: str | None = None,
          attention_impl: str | None = None):
  """(the loaded checkpoint, its prompt format: the one given, else the run's recorded one,
  else plain, as python -m flanjax.infer chooses it); attention_impl replaces the model's."""
  from flanjax.infer import prompt_format as format_of  # pylint: disable=g-import-not-at-top
  from flanjax.models import loading  # pylint: disable=g-import-not-at-top
  fmt = format_of(checkpoint, prompt_format)
  t0 = time.time()
  loaded = loading.load(checkpoint, step=step, adapter=adapter)
  if attention_impl and attention_impl != loaded.config.attention_impl:
    # The same weights and arithmetic; blockwise never holds a [length, length] score matrix.
    try:
      loaded.config = dataclasses.replace(loaded.config, attention_impl=attention_impl)
    except ValueError as e:
      raise UserError(f"evaluate.attention_impl: {e}") from None
    loaded.model = loaded.kind.build(loaded.config)
  log(f"checkpoint: {loaded.source} ({loaded.kind.name}), loaded in {time.time() - t0:.0f}s; "
      f"prompts in the {fmt.name} prompt format")
  return loaded, fmt


def _bind_run_data(checkpoint: str, adapter: str | None, log) -> None:
  """The user tasks and mixtures a training run recorded (run_info.json "data"), bound where
  this command's gin leaves them unbound: `--tasks my_task` works without the run's gin."""
  from flanjax.run_folder import RunFolder  # pylint: disable=g-import-not-at-top
  for path in (adapter, checkpoint):  # an adapter run is the run that trained
    folder = RunFolder(path) if path else None
    if folder is None or not os.path.isfile(folder.run_info_path):
      continue
    record = (folder.read_run_info() or {}).get("data") or {}
    bound = registry.bind_recorded_data(record)
    if bound:
      log(f"data: {', '.join(bound)} as {path} was trained with (its run_info.json)")
    return


def _out_dir(out_dir: str | None, checkpoint: str, adapter: str | None) -> str:
  """The results' folder, made: `out_dir`, else <adapter>/eval or <checkpoint>/eval, and
  for a run's own checkpoint folder <run>/eval/<step or best> (a checkpoint is replaced
  whole, results inside it with it). An adapter's results go with it: beside its base, a
  second adapter's would overwrite them (and a shared base folder may not be writable)."""
  from flanjax.run_folder import CHECKPOINTS_DIR  # pylint: disable=g-import-not-at-top
  if out_dir is None:
    parent, leaf = os.path.split(os.path.abspath(adapter or checkpoint))
    if os.path.basename(parent) == CHECKPOINTS_DIR:  # a step folder is replaced whole
      out_dir = os.path.join(os.path.dirname(parent), "eval", leaf)
    else:
      out_dir = os.path.join(parent, leaf, "eval")
  out_dir = os.path.abspath(out_dir)
  try:
    os.makedirs(out_dir, exist_ok=True)
  except OSError as e:
    raise UserError(f"output directory {out_dir} cannot be created ({e.strerror}); "
                    "give --out DIR") from None
  return out_dir


@gin.configurable(denylist=["log"])
def evaluate(
    *,
    checkpoint: str | None = None,
    step: int | None = None,
    tasks: Sequence[str] = (),
    splits: Sequence[str] | None = None,
    input_length: int = 2048,
    decode: decoding.DecodeConfig | None = None,
    max_decode_len: int | None = None, batch_size: int = 16, max_examples: int | None = None,
    rank_classification: bool = True, generate: bool = True,
    out_dir: str | None = None,
    name: str = "eval",
    register_fns: Sequence[Callable] = (registry.register_all,),
    num_samples: int = 3, prompt_format: str | None = None,
    review_examples: int = 200, adapter: str | None = None, attention_impl: str | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
  """Evaluates a checkpoint on `tasks`; writes <out_dir>/<name>.json, .md, .html, tensorboard/.

  decode: a DecodeConfig (default greedy); max_decode_len, when given, replaces its
  max_decode_len. prompt_format (data/chat.py): default the run's recorded one, else plain,
  as flanjax.infer chooses. review_examples: per task and split on the review page <name>.html.
  adapter: LoRA adapters (a LoRA run, at `step`, or a PEFT folder). attention_impl: the model's
  attention (models/attention.py; 'blockwise' for long prompts), default the checkpoint's.
  generate=False: tasks with options answer by rank classification (MMLU as lm_eval)."""
  log = log or (lambda line: print(line, flush=True))
  t0, load0 = time.time(), os.getloadavg()  # the whole call's time, and the machine's load
  if not checkpoint:
    raise UserError("no checkpoint: give --checkpoint PATH (a training run, a converted orbax "
                    "directory or a Hugging Face directory) or evaluate.checkpoint")
  if not tasks:
    raise UserError("no tasks: give --gin_file=eval/bbh.gin (or eval/gsm8k.gin, "
                    f"eval/bbh_gsm8k.gin, eval/mmlu.gin) or --tasks=a,b; {LIST_HINT}")
  _check_sizes(input_length, batch_size, max_examples)
  decode = decode or decoding.DecodeConfig.with_default_length(256)
  if max_decode_len is not None:
    decode = dataclasses.replace(decode, max_decode_len=int(max_decode_len))
  _bind_run_data(checkpoint, adapter, log)  # a user-data run's own tasks
  names = resolve_tasks(tasks)  # a typo fails here, before a checkpoint is read
  if not os.path.exists(checkpoint):
    raise UserError(f"checkpoint {checkpoint} does not exist; give --checkpoint a training "
                    "run, a converted checkpoint or a Hugging Face model folder")

  loaded, fmt = _load(checkpoint, step, prompt_format, log, adapter, attention_impl)
  step_no = _step_of(loaded, step)
  # The tasks tokenize with the checkpoint's vocabulary.
  registry.call_register_fns(register_fns, loaded.vocab, input_length=input_length)
  out_dir = _out_dir(out_dir, checkpoint, adapter)

  from flanjax.training import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  writer = metrics_lib.SummaryWriter(os.path.join(out_dir, "tensorboard"))
  t1 = time.time()
  results = evaluate_suite(
      loaded.model, loaded.params, loaded.vocab, loaded.kind, names,
      splits=splits, input_length=input_length, decode=decode, batch_size=batch_size,
      max_examples=max_examples, rank_classification=rank_classification, generate=generate,
      writer=writer, step=step_no, num_samples=num_samples, log=log,
      keep_examples=review_examples, prompt_format=fmt)
  secs = time.time() - t1
  table = format_results(results)
  log(f"\nevaluation of {loaded.source} ({secs:.0f}s, {decode.method} decoding):\n{table}\n")
  report = {
      "checkpoint": os.path.abspath(checkpoint),
      "adapter": os.path.abspath(adapter) if adapter else None, "source": loaded.source,
      "kind": loaded.kind.name, "step": step_no, "input_length": input_length,
      "prompt_format": fmt.name, "decode": dataclasses.asdict(decode),
      "max_examples": max_examples, "batch_size": batch_size, "generate": generate,
      "attention_impl": loaded.config.attention_impl, "seconds": round(secs, 1),
      "seconds_whole_call": round(time.time() - t0, 1),
      "machine": {**machine(), "load_average_1_5_15_at_start": load0},
      "tasks": [r.to_json() for r in results], "summary": harness.summary_rows(results)}
  paths = _write_report(report, results, out_dir, name, loaded.source, decode, input_length,
                        max_examples)
  writer.flush()
  log(f"wrote {', '.join(paths)} (review page) and {os.path.join(out_dir, 'tensorboard')}")
  return report


def _check_sizes(input_length, batch_size, max_examples) -> None:
  for name, value, low in (("input_length", input_length, 8), ("batch_size", batch_size, 1),
                           ("max_examples", max_examples, 1)):
    if name == "max_examples" and value is None:
      continue  # every example
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
      raise UserError(f"evaluate.{name}={value!r}: give a whole number of at least {low}"
                      + (" (None: every example)" if name == "max_examples" else ""))


def machine() -> dict:
  """Where a measurement ran: CPU count, load averages, the accelerator, the commit."""
  import platform  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  try:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, timeout=10, cwd=os.path.dirname(__file__)).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    commit = ""
  load = os.getloadavg() if hasattr(os, "getloadavg") else None
  return {"cpus": os.cpu_count(), "load_average_1_5_15_at_end": load,
          "processor": platform.processor() or platform.machine(),
          "devices": [d.device_kind for d in jax.devices()], "commit": commit or None}


def _write_report(report, results, out_dir, name, source, decode, input_length, max_examples):
  """<out_dir>/<name>.json (whole or not at all), <name>.md and <name>.html (the review
  page); returns their paths."""
  json_path = os.path.join(out_dir, f"{name}.json")
  md_path = os.path.join(out_dir, f"{name}.md")
  with open(json_path + ".tmp", "w", encoding="utf-8") as f:
    json.dump(report, f, indent=1, ensure_ascii=False)
  os.replace(json_path + ".tmp", json_path)
  with open(md_path, "w", encoding="utf-8") as f:
    f.write(f"# Evaluation of `{source}`\n\n{decode.method} decoding, at most "
            f"{decode.max_decode_len} new tokens; inputs up to {input_length} tokens"
            f"{f'; at most {max_examples} examples per task' if max_examples else ''}.\n\n"
            f"{format_results(results, markdown=True)}\n")
  html_path = review.write_page(os.path.join(out_dir, f"{name}.html"), review.evaluation_page(
      f"Evaluation of {source}", report, results))
  return json_path, md_path, html_path

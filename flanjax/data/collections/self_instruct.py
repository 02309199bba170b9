"""The 175 human-written seed tasks of Self-Instruct (Alpaca's seeds).

File: ``alpaca_seed_tasks/seed_tasks.jsonl`` under the data folder, each line
``{"id", "name", "instruction", "instances": [{"input", "output"}], "is_classification"}``.
Every instance is one example.
"""

from __future__ import annotations

from flanjax.data import cache, sources
from flanjax.data.tasks import TaskDef

NAME = "self_instruct_seed"


def path() -> str:
  return sources.data_path("alpaca_seed_tasks", "seed_tasks.jsonl")


@cache.in_process
def load(split: str) -> tuple[dict, ...]:
  del split  # one split
  reader = sources.Reader(path())
  out = []
  for where, rec in sources.read_jsonl(reader):
    if not sources.require(reader, where, rec, ("instruction", "instances"), non_empty=("instruction",)):
      continue
    instances = rec["instances"] if isinstance(rec["instances"], list) else []
    if not instances:
      reader.bad(where, "tasks without instances", "'instances' is empty or not a list",
                 "give each task at least one {input, output} instance")
      continue
    for j, inst in enumerate(instances):
      if not sources.require(reader, f"{where} instance {j}", inst, ("input", "output"),
                             non_empty=("output",)):
        continue
      out.append(dict(instruction=rec["instruction"].strip(), input=inst["input"].strip(),
                      answer=inst["output"].strip(), name=rec.get("name", "")))
    reader.report.kept += 1
  reader.done()
  return tuple(out)


def task_defs() -> list[TaskDef]:
  return [TaskDef(name=NAME, load=load, splits=("train",), templates="instruction",
                  train_formats=("zero_shot",), num_shots=0,
                  fingerprint=lambda: sources.fingerprint_paths([path()]),
                  description="Self-Instruct's 175 seed tasks, one example per instance")]

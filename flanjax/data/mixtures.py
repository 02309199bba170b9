"""Mixtures: examples-proportional with a cap and temperature, and FLAN 2022-style blends.

Rates follow FLAN and T5: a task's weight is ``min(n, cap) ** (1 / temperature)``
(n = its training examples), so large tasks do not drown small ones. A blend
mixes submixtures with their own caps and fixed shares of the whole.
Evaluation-only tasks (BBH, GSM8K test, MMLU) are refused in any training mixture.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import seqio

from flanjax.data import tasks as task_lib
from flanjax.errors import UserError


def num_train_examples(task, split: str = "train") -> int:
  if isinstance(task, seqio.Mixture):
    return sum(t.num_input_examples(split) for t in task.tasks if split in t.splits)
  return task.num_input_examples(split)


def _proportional_rate(maximum: int | None, temperature: float):
  def rate(task) -> float:
    n = num_train_examples(task)
    return float(min(n, maximum) if maximum else n) ** (1.0 / temperature)
  return rate


def _leaf_tasks(name: str) -> list[seqio.Task]:
  obj = seqio.get_mixture_or_task(name)
  return list(getattr(obj, "tasks", [obj]))


def unknown_name(name: str, what: str = "task or mixture") -> str:
  """'unknown task ...' with the closest registered names, not all of them."""
  import difflib  # pylint: disable=g-import-not-at-top
  known = sorted(set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()))
  close = difflib.get_close_matches(str(name), known, n=3, cutoff=0.6)
  hint = f"did you mean {', '.join(map(repr, close))}? " if close else ""
  return (f"unknown {what} {name!r}; {hint}python tools/show_task.py --list shows all "
          f"{len(known)} registered names")


def check_trainable(name: str, split: str = "train", within: str | None = None) -> None:
  """Raises if `name` (task or mixture) would train on evaluation-only data.

  within: the mixture being defined with `name` in it, for the message.
  """
  try:
    leaves = _leaf_tasks(name)
  except ValueError:
    raise UserError(unknown_name(name)) from None
  bad = []
  for t in leaves:
    reg = task_lib.DEFS.get(t.name)
    if reg is not None and reg.defn.is_eval_only(split):
      why = reg.defn.eval_only_reason
      bad.append(f"{t.name} ({why})" if why else t.name)
  if bad:
    them = "them" if len(bad) > 1 else "it"
    what = f"mixture {within!r}" if within else repr(name)
    raise UserError(
        f"{what} would train on evaluation-only data: {', '.join(sorted(bad))} "
        f"(split {split!r}); remove {them} from the training mixture and evaluate on {them} "
        "with flanjax.evaluate instead")


def _replace(name: str) -> None:
  if name in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.remove(name)


def add_mixture(name: str, tasks: Iterable[str | tuple[str, float]], maximum: int | None = None,
                temperature: float = 1.0, training: bool = True) -> seqio.Mixture:
  """Registers an examples-proportional mixture (or one with the rates given).

  `tasks` holds names (rate from their sizes, capped at `maximum`, with
  `temperature`) or (name, rate) pairs. A training mixture refuses
  evaluation-only tasks at once, not when the run reaches them.
  """
  tasks = list(tasks)
  if not tasks:
    raise UserError(f"mixture {name!r} has no tasks")
  names = [t if isinstance(t, str) else t[0] for t in tasks]
  for n in names:
    if n not in seqio.TaskRegistry.names() and n not in seqio.MixtureRegistry.names():
      raise UserError(f"mixture {name!r}: {unknown_name(n, 'task')}")
    if training:
      check_trainable(n, within=name)
  if all(isinstance(t, str) for t in tasks):
    # Rates are computed when the mixture is first used, not now: registering
    # must not read data (it may be absent on this machine, and unused).
    if temperature <= 0:
      raise UserError(f"mixture {name!r}: temperature must be > 0, not {temperature}")
    pairs = [(n, _proportional_rate(maximum, temperature)) for n in names]
  else:
    pairs = [(t, None) if isinstance(t, str) else t for t in tasks]
    if any(r is None for _, r in pairs):
      raise UserError(f"mixture {name!r}: give a rate for every task or for none")
    if maximum is not None or temperature != 1.0:
      # Rates given are the rates: a cap or temperature would be silently ignored.
      raise UserError(f"mixture {name!r}: its tasks have rates, so maximum={maximum} and "
                      f"temperature={temperature} would not apply; drop them, or name the "
                      "tasks without rates to have rates from their sizes")
  _replace(name)
  return seqio.MixtureRegistry.add(name, pairs)


def add_blend(name: str, parts: Sequence[tuple[str, float]]) -> seqio.Mixture:
  """A FLAN 2022-style blend: submixtures (or tasks), each a fixed share of the whole.

  Within each submixture, tasks keep the proportions of that submixture.
  """
  if not parts:
    raise UserError(f"blend {name!r} has no parts")
  total = float(sum(r for _, r in parts))
  pairs = []
  for sub, share in parts:
    check_trainable(sub, within=name)
    obj = seqio.get_mixture_or_task(sub)
    if isinstance(obj, seqio.Mixture):
      pairs.extend((t.name, _share_of(obj, share / total)) for t in obj.tasks)
    else:
      pairs.append((sub, share / total))
  merged: dict[str, list] = {}
  for t, r in pairs:  # a task in two submixtures gets both shares
    merged.setdefault(t, []).append(r)
  _replace(name)
  return seqio.MixtureRegistry.add(name, sorted((t, _summed(rs)) for t, rs in merged.items()))


def _share_of(mixture: seqio.Mixture, share: float):
  """Rate of a task inside a blend: its share of the submixture, times the submixture's share."""
  def rate(task) -> float:
    inner = sum(mixture.get_rate(t) for t in mixture.tasks)
    return share * mixture.get_rate(task) / inner
  return rate


def _summed(rates):
  if len(rates) == 1:
    return rates[0]
  return lambda task: sum(r(task) if callable(r) else r for r in rates)


def mixture_rates(name: str) -> dict[str, float]:
  """Normalised rates of the leaf tasks of a mixture."""
  obj = seqio.get_mixture_or_task(name)
  if not isinstance(obj, seqio.Mixture):
    return {obj.name: 1.0}
  rates = {t.name: obj.get_rate(t) for t in obj.tasks}
  total = sum(rates.values())
  return {k: v / total for k, v in rates.items()}

"""Orbax checkpoints: train state plus the data pipeline's position.

Never half-written: orbax writes each step to ``<step>.orbax-checkpoint-tmp-*``
and renames it into place when complete, so a kill during a save leaves the
earlier checkpoints as they were, and only complete steps are ever listed.
A resume takes the newest step that restores; one that does not (say, files
cut short by a disk that filled outside orbax's control) is moved aside to
``<step>.unreadable`` with a note, and the next older one is used.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time

import gin
import jax
import numpy as np
import orbax.checkpoint as ocp

from flanjax.errors import UserError

# Orbax's per-checkpoint metadata, and room for the logs beside the checkpoints.
_OVERHEAD_BYTES = 1 << 20
_LOG_HEADROOM_BYTES = 16 << 20


class StorageError(UserError):
  """Writing a checkpoint failed (disk full, folder gone, no permission)."""


def _first_line(e: BaseException) -> str:
  """A short account of an error: the OS error if one is named, else its first line."""
  text = str(e)
  # tensorstore (under orbax) reports OS errors as "... [os_error_code='28']".
  code = re.search(r"os_error_code='?(\d+)", text)
  if code or isinstance(e, OSError):
    num = int(code.group(1)) if code else e.errno
    where = re.search(r'local file "([^"]+)"', text)
    path = where.group(1) if where else getattr(e, "filename", None)
    return f"{os.strerror(num) if num else text}" + (f" writing {path}" if path else "")
  lines = text.strip().splitlines()
  return f"{type(e).__name__}: {lines[0][:300]}" if lines else type(e).__name__


def _mib(n: float) -> str:
  return f"{n / 2**20:,.1f} MiB"


@gin.configurable
class Checkpointer:
  """Saves every `every_steps` steps (asynchronously), keeps the last `keep`.

  cleanup_tmp: remove what killed saves left (`*.orbax-checkpoint-tmp-*`); only
  for the run that owns the folder (a reader beside a live run would delete
  the save in flight).
  """

  def __init__(self, directory: str, every_steps: int = 200, keep: int = 3,
               async_save: bool = True, cleanup_tmp: bool = False):
    self.directory = os.path.abspath(os.path.join(directory, "checkpoints"))
    self.every_steps = every_steps
    self.keep = keep
    self._in_flight = None  # step of the last save started
    if os.path.exists(self.directory) and not os.path.isdir(self.directory):
      raise UserError(f"{self.directory} is a file, not a checkpoint folder; move it away or "
                      "set --gin.train.model_dir to another folder")
    try:
      self.manager = ocp.CheckpointManager(
          self.directory,
          options=ocp.CheckpointManagerOptions(
              max_to_keep=keep,
              save_interval_steps=1,  # we decide when; see should_save
              enable_async_checkpointing=async_save,
              create=True,
              # Leftovers of a save that was killed are never listed as steps.
              cleanup_tmp_directories=cleanup_tmp,
          ),
          # Handlers named up front, so a fresh process can read a step's metadata.
          item_handlers={"state": ocp.StandardCheckpointHandler(),
                         "data": ocp.JsonCheckpointHandler()},
      )
    except OSError as e:
      raise StorageError(f"cannot use {self.directory} for checkpoints ({e.strerror or e}); "
                         "set --gin.train.model_dir to a writable folder") from None

  def latest_step(self):
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def should_save(self, step: int) -> bool:
    return self.every_steps > 0 and step % self.every_steps == 0

  def save(self, step: int, state, data_position: int, force: bool = False) -> bool:
    """Starts saving `step`; an error of this save or of the one before is a StorageError."""
    if step in self.manager.all_steps():
      return False
    try:
      saved = self.manager.save(
          step,
          args=ocp.args.Composite(
              state=ocp.args.StandardSave(state),
              data=ocp.args.JsonSave({"position": int(data_position), "step": int(step)})),
          force=force)
    except Exception as e:  # pylint: disable=broad-except
      # Orbax reports a failed asynchronous save when the next one starts.
      raise self._failed(step, e) from None
    if saved:
      self._in_flight = step
      logging.info("Saving checkpoint at step %d -> %s", step, self.directory)
    return saved

  def _failed(self, step: int, e: BaseException) -> StorageError:
    try:
      self.manager.reload()
      done = self.all_steps()
    except Exception:  # pylint: disable=broad-except
      done = []
    if self._in_flight is not None and self._in_flight not in done:
      step = self._in_flight  # the asynchronous save that failed, found out later
    kept = (f"the complete checkpoints ({', '.join(map(str, done))}) are intact" if done
            else "no checkpoint was complete")
    return StorageError(f"saving the checkpoint of step {step} in {self.directory} failed "
                        f"({_first_line(e)}); {kept}; free disk space or fix the folder, "
                        "then run the same command again to resume")

  def restore(self, step: int, abstract_state):
    """Restores onto the shardings of `abstract_state` (any mesh)."""
    restored = self.manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=ocp.args.JsonRestore()))
    return restored["state"], int(restored["data"]["position"])

  def check_fits(self, step: int, abstract_state) -> None:
    """Raises a UserError if checkpoint `step` holds another model's shapes (it is whole)."""
    meta = self.manager.item_metadata(step)["state"]
    if meta is None:
      raise ValueError("no metadata")
    have, want = _shapes(meta), _shapes(abstract_state)
    # Parameters first: the message names the first that differs.
    for key in sorted(set(have) | set(want), key=lambda k: (k[0] != "params", k)):
      if key[0] != "params" and (key not in have or key not in want):
        continue  # optimizer bookkeeping may be laid out differently; params decide
      if have.get(key) != want.get(key):
        name = "/".join(key)
        what = (f"has no {name}" if key not in have else f"has {name}, which this model lacks"
                if key not in want else f"has {name} of shape {have[key]}, this model "
                f"{want[key]}")
        raise UserError(f"checkpoint step {step} in {self.directory} holds another model (it "
                        f"{what}); train with the model config it was made with, or set "
                        "--gin.train.model_dir to a new folder")

  def restore_latest(self, abstract_state):
    """(state, data position, step) of the newest checkpoint that restores, or None.

    A checkpoint of another model is a UserError (nothing is moved). An
    unreadable step is moved aside (to `<step>.unreadable`), so that a new
    save of that step is possible and the next resume does not try it again.
    """
    failures = []
    for step in reversed(self.all_steps()):
      try:
        self.check_fits(step, abstract_state)
        state, position = self.restore(step, abstract_state)
      except UserError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        failures.append(f"step {step}: {_first_line(e)}")
        self._set_aside(step, e)
        continue
      if failures:
        print(f"note: resuming from step {step}, the newest checkpoint that restores",
              flush=True)
      return state, position, step
    if failures:
      raise UserError(f"no checkpoint in {self.directory} restores onto this model "
                      f"({'; '.join(failures)}); they were moved aside as <step>.unreadable; "
                      "run again to start afresh, or set --gin.train.model_dir to a new folder")
    return None

  def _set_aside(self, step: int, error: BaseException):
    src = os.path.join(self.directory, str(step))
    dst = f"{src}.unreadable"
    if jax.process_index() == 0 and os.path.isdir(src):
      if os.path.exists(dst):
        dst = f"{dst}.{int(time.time())}"
      os.replace(src, dst)
    print(f"note: checkpoint step {step} in {self.directory} does not restore "
          f"({_first_line(error)}); moved to {os.path.basename(dst)}", flush=True)
    self.manager.reload()

  def check_free_space(self, state, saves_left: int) -> None:
    """Fails before training when the disk cannot hold the checkpoints this run will write.

    Peak use is keep + 1 checkpoints (the oldest goes once a new one is
    complete); those already on disk count as written. Sizes are the state's
    bytes plus orbax's metadata, or the newest existing checkpoint's if larger.
    """
    per = state_bytes(state) + _OVERHEAD_BYTES
    existing = self.all_steps()
    if existing:
      per = max(per, _du(os.path.join(self.directory, str(existing[-1]))))
    new = max(min(self.keep + 1, len(existing) + max(saves_left, 1)) - len(existing), 1)
    need = new * per + _LOG_HEADROOM_BYTES
    free = shutil.disk_usage(self.directory).free
    if free < need:
      raise StorageError(
          f"not enough disk space for checkpoints in {self.directory}: {_mib(free)} free, this "
          f"run needs about {_mib(need)} ({new} checkpoint{'s' if new > 1 else ''} of "
          f"{_mib(per)}); free space, lower --gin.Checkpointer.keep, or set "
          "--gin.train.model_dir to a bigger disk")

  def wait(self):
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._failed(self._in_flight, e) from None

  def close(self):
    self.wait()
    self.manager.close()


def state_bytes(state) -> int:
  """Bytes of a (global) train state: what one checkpoint holds."""
  return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(state)))


def _shapes(tree) -> dict:
  """Key path (as strings) -> shape, for a state, its abstract form or orbax's metadata."""
  def name(k):
    return str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
  return {tuple(name(k) for k in path): tuple(getattr(leaf, "shape", ()))
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _du(path: str) -> int:
  total = 0
  for root, _, files in os.walk(path):
    for f in files:
      try:
        total += os.path.getsize(os.path.join(root, f))
      except OSError:
        pass
  return total


def abstract_like(state, shardings):
  """ShapeDtypeStructs with shardings, the restore target for orbax."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)

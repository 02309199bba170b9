"""Orbax checkpoints: train state plus the data pipeline's position.

Never half-written: orbax writes each step to ``<step>.orbax-checkpoint-tmp-*``
and renames it into place when complete, so a kill during a save leaves the
earlier checkpoints as they were, and only complete steps are ever listed.

A resume takes the newest step that restores. Only a step shown to be damaged
(a file missing or cut short, metadata that does not parse, an array that
does not read back) is moved aside, to ``<step>.unreadable`` with a note, and
the next older one is used. A step that holds another model or another
optimizer's state is a one-line error, and a restore that fails for any other
reason (out of memory, a bug) stops the run: in both cases nothing is moved.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time

import gin
import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts

from flanjax.errors import UserError
from flanjax.run_folder import BEST_DIR, BEST_INFO

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
    if cleanup_tmp:
      self._recover_best()

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

  # ---------------------------------------------------------------- the best checkpoint
  # checkpoints/best/ (state/ as orbax writes a step's state item, and best.json) sits
  # beside the step folders; orbax lists only numbered steps, so it is never rotated.
  # It is replaced whole: written to best.saving/, then renamed over best/ (the old one
  # passing through best.old/, which a run started after a kill puts back).

  @property
  def best_dir(self) -> str:
    return os.path.join(self.directory, BEST_DIR)

  def _recover_best(self) -> None:
    if jax.process_index() != 0:
      return
    best, old = self.best_dir, self.best_dir + ".old"
    if os.path.isdir(old):
      if os.path.isdir(best):
        shutil.rmtree(old, ignore_errors=True)
      else:
        os.replace(old, best)
    shutil.rmtree(best + ".saving", ignore_errors=True)

  def save_best(self, step: int, state, info: dict) -> None:
    """Saves `state` (synchronously) as the best checkpoint, with `info` (metric, value,
    ...) and the step in best.json; a failure is a StorageError naming what is kept."""
    new, old = self.best_dir + ".saving", self.best_dir + ".old"
    main = jax.process_index() == 0
    try:
      if main:
        shutil.rmtree(new, ignore_errors=True)
      _sync_hosts("flanjax_best_clear")
      writer = ocp.StandardCheckpointer()
      writer.save(os.path.join(new, "state"), state)
      writer.wait_until_finished()
      writer.close()
      if main:
        with open(os.path.join(new, BEST_INFO), "w", encoding="utf-8") as f:
          json.dump({"step": int(step), **info}, f, indent=1)
        if os.path.isdir(self.best_dir):
          os.replace(self.best_dir, old)
        os.replace(new, self.best_dir)
        shutil.rmtree(old, ignore_errors=True)
      _sync_hosts("flanjax_best_done")
    except Exception as e:  # pylint: disable=broad-except
      have = self.read_best()
      kept = (f"the best checkpoint of step {have['step']} is kept" if have else
              "no best checkpoint is kept")
      raise StorageError(f"saving the best checkpoint (step {step}) in {self.best_dir} failed "
                         f"({_first_line(e)}); {kept}; free disk space or fix the folder, then "
                         "run the same command again to resume") from None

  def read_best(self) -> dict | None:
    """best.json of the best checkpoint ({step, metric, value, ...}), or None."""
    try:
      with open(os.path.join(self.best_dir, BEST_INFO), encoding="utf-8") as f:
        info = json.load(f)
    except (OSError, ValueError):
      return None
    return info if isinstance(info, dict) and "step" in info else None

  def restore_best(self, abstract_state):
    """(state, best.json) of the best checkpoint onto `abstract_state`'s shardings, or None."""
    info = self.read_best()
    if info is None:
      return None
    reader = ocp.StandardCheckpointer()
    try:
      state = reader.restore(os.path.join(self.best_dir, "state"), abstract_state)
    finally:
      reader.close()
    return state, info

  def check_fits(self, step: int, abstract_state, meta=None) -> None:
    """Raises a UserError if checkpoint `step` holds another model's or optimizer's state.

    Compares every leaf's key path and shape (params, opt_state, step, rng)
    with the checkpoint's metadata; reads no array. `meta`: the step's state
    metadata if already read. The message names the first path that differs.
    """
    if meta is None:
      meta = self.manager.item_metadata(step)["state"]
    if meta is None:
      raise ValueError("no metadata")
    diff = tree_difference(_shapes(meta), _shapes(abstract_state))
    if diff is None:
      return
    part, what = diff
    where = f"checkpoint step {step} in {self.directory}"
    new_dir = "or set --gin.train.model_dir to a new folder"
    if part == "params":
      raise UserError(f"{where} holds another model (it {what}); train with the model config "
                      f"it was made with, {new_dir}")
    if part == "opt_state":
      raise UserError(f"{where} holds optimizer state of another optimizer or optimizer "
                      f"settings (it {what}); resume with the optimizer settings it was saved "
                      f"with (run_info.json's 'optimizer' records them), {new_dir}")
    raise UserError(f"{where} holds a train state of another layout (it {what}); resume with "
                    f"the flanjax version and config it was made with, {new_dir}")

  def restore_latest(self, abstract_state):
    """(state, data position, step) of the newest checkpoint that restores, or None.

    Per step, newest first: files present and metadata readable (else the
    step is damaged); its tree and shapes those of `abstract_state` (else a
    UserError: another model or optimizer, and nothing is moved); then the
    restore. A restore that fails is classified by reading the step's files
    back (find_damage): damaged -> moved aside to `<step>.unreadable` with a
    note and the next older step is tried; whole -> the failure is this
    run's, not the checkpoint's: out of memory is a UserError, anything else
    is raised as it is, and nothing is moved.
    """
    failures = []
    for step in reversed(self.all_steps()):
      damage = self.files_damage(step)
      if damage is None:
        try:
          meta = self.manager.item_metadata(step)["state"]
          if meta is None:
            raise ValueError("no metadata for the train state")
        except Exception as e:  # pylint: disable=broad-except
          damage = self._classify(step, e, "its metadata does not read")
        else:
          self.check_fits(step, abstract_state, meta)  # UserError: nothing is moved
          try:
            state, position = self.restore(step, abstract_state)
          except Exception as e:  # pylint: disable=broad-except
            damage = self._classify(step, e, "it does not restore")
      if damage is not None:
        failures.append(f"step {step}: {damage}")
        self._set_aside(step, damage)
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

  def _classify(self, step: int, error: Exception, what: str) -> str:
    """The damage that explains `error` (a failed read of `step`), or raises.

    Returns a description when the step's files are shown damaged. Otherwise
    nothing is moved and this raises: out of memory as a UserError; any other
    error as it was, after a note that the checkpoint's files are whole.
    """
    where = f"checkpoint step {step} in {self.directory}"
    if _is_out_of_memory(error):
      raise UserError(f"{where}: {what}, out of memory ({_first_line(error)}); the checkpoint "
                      "was left as it is: free memory (other jobs on the devices or host), or "
                      "shard the state over more devices (--gin.train.mesh_shape), then run "
                      "again") from error
    try:
      damage = self.find_damage(step)
    except Exception as e:  # pylint: disable=broad-except
      # The files could not be checked (no permission, ...): never move on a guess.
      print(f"note: {where}: {what} ({_first_line(error)}), and its files could not be "
            f"checked ({_first_line(e)}); nothing was moved", flush=True)
      raise error
    if damage is None:
      print(f"note: {where}: {what} ({_first_line(error)}), yet its files read back whole; "
            "nothing was moved", flush=True)
      raise error
    return damage

  def files_damage(self, step: int) -> str | None:
    """What is missing or unparsable among a step's small files (no array is read); None if whole.

    Raises on a read error that is not damage (no permission, ...).
    """
    d = os.path.join(self.directory, str(step))
    try:
      meta = _json_file(os.path.join(d, "state", "_METADATA"))
      if not isinstance(meta, dict) or "tree_metadata" not in meta:
        return "state/_METADATA holds no tree metadata"
      data = _json_file(os.path.join(d, "data", "metadata"))
      if not isinstance(data, dict) or "position" not in data:
        return "data/metadata holds no data position"
    except _Damaged as e:
      return str(e)
    if meta.get("use_ocdbt", True) and not os.path.isfile(
        os.path.join(d, "state", "manifest.ocdbt")):
      return "state/manifest.ocdbt is missing"
    return None

  def find_damage(self, step: int) -> str | None:
    """Reads every file of checkpoint `step` back; a description of the damage, or None.

    Damage: a metadata file missing or not parsing, an array or chunk
    missing, a file cut short, data that does not decode. An error that says
    nothing about the files (no permission, out of memory) is raised instead.
    Reads one array at a time into host memory.
    """
    damage = self.files_damage(step)
    if damage is not None:
      return damage
    state_dir = os.path.join(self.directory, str(step), "state")
    meta = _json_file(os.path.join(state_dir, "_METADATA"))
    try:
      return _arrays_damage(state_dir, meta)
    except _Damaged as e:
      return str(e)

  def _set_aside(self, step: int, damage: str):
    src = os.path.join(self.directory, str(step))
    dst = f"{src}.unreadable"
    if jax.process_index() == 0 and os.path.isdir(src):
      if os.path.exists(dst):
        dst = f"{dst}.{int(time.time())}"
      os.replace(src, dst)
    print(f"note: checkpoint step {step} in {self.directory} does not restore, it is damaged "
          f"({damage}); moved to {os.path.basename(dst)}", flush=True)
    self.manager.reload()

  def check_free_space(self, state, saves_left: int, best: bool = False) -> None:
    """Fails before training when the disk cannot hold the checkpoints this run will write.

    Peak use is keep + 1 checkpoints (the oldest goes once a new one is
    complete); those already on disk count as written. Sizes are the state's
    bytes plus orbax's metadata, or the newest existing checkpoint's if larger.
    best: the run keeps a best checkpoint too (two while one replaces the other).
    """
    per = state_bytes(state) + _OVERHEAD_BYTES
    existing = self.all_steps()
    if existing:
      per = max(per, _du(os.path.join(self.directory, str(existing[-1]))))
    new = max(min(self.keep + 1, len(existing) + max(saves_left, 1)) - len(existing), 1)
    if best:
      new += 2 - (self.read_best() is not None)
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


def _sync_hosts(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def state_bytes(state) -> int:
  """Bytes of a (global) train state: what one checkpoint holds."""
  return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(state)))


def _is_empty(x) -> bool:
  """An empty node: None (orbax's metadata), or an empty state such as optax's EmptyState()."""
  return x is None or (isinstance(x, (tuple, list, dict)) and len(x) == 0)


def _shapes(tree) -> dict:
  """Key path (as strings) -> shape, for a state, its abstract form or orbax's metadata.

  Empty nodes count too, as EMPTY: their number and place are part of the
  tree orbax restores onto (adafactor with weight decay has one more).
  """
  def name(k):
    return str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
  return {tuple(name(k) for k in path): EMPTY if _is_empty(leaf) else
          tuple(getattr(leaf, "shape", ()))
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_empty)[0]}


EMPTY = "empty"


def tree_difference(have: dict, want: dict):
  """(part, words) for the first leaf where two _shapes() maps differ, or None.

  part: the top-level key ('params', 'opt_state', ...); params come first.
  words: what the first map (a checkpoint) has against the second (this run).
  """
  order = lambda k: (k[0] != "params", k[0] != "opt_state", k)  # noqa: E731
  for part in sorted({k[0] for k in have} | {k[0] for k in want},
                     key=lambda p: order((p,))):
    h = {k: v for k, v in have.items() if k[0] == part}
    w = {k: v for k, v in want.items() if k[0] == part}
    if h == w:
      continue
    only_h = sorted(set(h) - set(w))
    only_w = sorted(set(w) - set(h))
    name = lambda k: "/".join(k)  # noqa: E731
    if only_h and only_w:
      more = len(only_h) + len(only_w) - 2
      return part, (f"has {name(only_h[0])}, this run has {name(only_w[0])}"
                    + (f"; {more} more paths differ" if more else ""))
    if only_h:
      return part, f"has {name(only_h[0])}, which this run lacks"
    if only_w:
      return part, f"has no {name(only_w[0])}"
    key = min((k for k in h if h[k] != w[k]), key=order)
    words = lambda v: "empty" if v == EMPTY else f"{v}"  # noqa: E731
    return part, f"has {name(key)} of shape {words(h[key])}, this run {words(w[key])}"
  return None


class _Damaged(Exception):
  """A checkpoint file is missing or does not parse."""


def _json_file(path: str):
  rel = os.path.join(*path.split(os.sep)[-2:])
  try:
    with open(path, "rb") as f:
      return json.loads(f.read())
  except FileNotFoundError:
    raise _Damaged(f"{rel} is missing") from None
  except IsADirectoryError:
    raise _Damaged(f"{rel} is a folder") from None
  except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
    raise _Damaged(f"{rel} does not parse ({e})") from None


# tensorstore's status codes that mean the stored bytes are missing or broken.
_DAMAGE_CODES = ("NOT_FOUND", "OUT_OF_RANGE", "DATA_LOSS")
_DECODE_WORDS = ("decompress", "compressed stream", "Error decoding", "Error reading",
                 "Error parsing", "corrupt", "checksum", "Truncated")


def _is_damage(e: Exception) -> bool:
  """Whether a tensorstore error reading stored data says the data is missing or broken."""
  text = str(e)
  code = text.split(":", 1)[0].strip()
  if code in _DAMAGE_CODES:
    return True
  return code in ("FAILED_PRECONDITION", "INVALID_ARGUMENT") and any(
      w.lower() in text.lower() for w in _DECODE_WORDS)


def _is_out_of_memory(e: BaseException) -> bool:
  text = str(e)
  return (isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in text
          or "out of memory" in text.lower())


_ARRAY_TYPES = ("jax.Array", "np.ndarray")


def _arrays_damage(state_dir: str, meta: dict) -> str | None:
  """Reads every array of an orbax state folder; the first damage found, or None."""
  file_kv = {"driver": "file", "path": state_dir.rstrip("/") + "/"}
  kv_spec = {"driver": "ocdbt", "base": file_kv} if meta.get("use_ocdbt", True) else file_kv
  zarr3 = bool(meta.get("use_zarr3", False))
  marker = "zarr.json" if zarr3 else ".zarray"

  def damage_or_raise(e: Exception, what: str) -> str:
    if isinstance(e, ValueError) and _is_damage(e):
      return f"{what}: {str(e).splitlines()[0][:300]}"
    raise e

  try:
    kv = ts.KvStore.open(kv_spec).result()
    keys = [k.decode() for k in kv.list().result()]
  except Exception as e:  # pylint: disable=broad-except
    return damage_or_raise(e, "state arrays do not list")
  on_disk = sorted({k.rsplit("/", 1)[0] for k in keys if k.endswith("/" + marker)})
  expected = set()
  for entry in meta.get("tree_metadata", {}).values():
    value = entry.get("value_metadata") or {}
    if value.get("value_type") in _ARRAY_TYPES and not value.get("skip_deserialize"):
      expected.add(".".join(str(k["key"]) for k in entry.get("key_metadata", ())))
  # Orbax names an array by its key path joined with dots; only when that naming
  # is seen on disk does an absent name mean a missing array.
  if expected & set(on_disk):
    missing = sorted(expected - set(on_disk))
    if missing:
      return (f"array {missing[0]} is missing" +
              (f" ({len(missing) - 1} more)" if len(missing) > 1 else ""))
  elif expected and not on_disk:
    return "no array is stored"
  for name in on_disk:
    spec = {"driver": "zarr3" if zarr3 else "zarr", "kvstore": {**kv_spec, "path": name + "/"}}
    if not zarr3:
      spec["fill_missing_data_reads"] = False  # a missing chunk is an error, not zeros
    try:
      ts.open(spec, open=True, read=True).result().read().result()
    except Exception as e:  # pylint: disable=broad-except
      return damage_or_raise(e, f"array {name} does not read")
  return None


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

"""Orbax checkpoints: train state plus the data pipeline's position."""

from __future__ import annotations

import logging
import os

import gin
import jax
import orbax.checkpoint as ocp


@gin.configurable
class Checkpointer:
  """Saves every `every_steps` steps (asynchronously), keeps the last `keep`.

  Orbax writes each step to a temporary folder and renames it when complete,
  so a kill during a save leaves the earlier checkpoints restorable, and
  `latest_step` only ever sees complete ones.
  """

  def __init__(self, directory: str, every_steps: int = 200, keep: int = 3,
               async_save: bool = True):
    self.directory = os.path.abspath(os.path.join(directory, "checkpoints"))
    self.every_steps = every_steps
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            save_interval_steps=1,  # we decide when; see should_save
            enable_async_checkpointing=async_save,
            create=True,
        ),
        item_names=("state", "data"),
    )

  def latest_step(self):
    return self.manager.latest_step()

  def should_save(self, step: int) -> bool:
    return self.every_steps > 0 and step % self.every_steps == 0

  def save(self, step: int, state, data_position: int, force: bool = False) -> bool:
    if step in self.manager.all_steps():
      return False
    saved = self.manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave({"position": int(data_position), "step": int(step)})),
        force=force)
    if saved:
      logging.info("Saving checkpoint at step %d -> %s", step, self.directory)
    return saved

  def restore(self, step: int, abstract_state):
    """Restores onto the shardings of `abstract_state` (any mesh)."""
    restored = self.manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=ocp.args.JsonRestore()))
    return restored["state"], int(restored["data"]["position"])

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_like(state, shardings):
  """ShapeDtypeStructs with shardings, the restore target for orbax."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)

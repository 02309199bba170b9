"""Runs 5 train steps on several meshes of simulated CPU devices; prints losses as JSON.

Started by test_sharding.py in a subprocess, because the device count is fixed
when JAX starts: XLA_FLAGS=--xla_force_host_platform_device_count=8 (or more: the
meshes take the first 8, so one process of 16 serves test_sharding's other cases too).
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import optax  # noqa: E402

from flanjax.data import pipeline, registry, vocab  # noqa: E402
from flanjax.models import t5  # noqa: E402
from flanjax.training import partitioning, trainer  # noqa: E402

SHAPES = [(1, 1, 1), (8, 1, 1), (2, 2, 2), (1, 1, 8)]


def main():
  assert jax.device_count() >= 8, jax.devices()
  eight = jax.devices()[:8]
  registry.register_builtin(vocab.builtin_vocabulary(vocab_size=1000))
  lengths = {"inputs": 96, "targets": 32}
  batches = list(pipeline.get_dataset(registry.BUILTIN_MIXTURE, lengths, "train", 8, seed=0)
                 .take(5).as_numpy_iterator())
  cfg = t5.T5Config(vocab_size=1024, d_model=32, d_kv=8, d_ff=64, num_heads=8,
                    num_encoder_layers=2, num_decoder_layers=2)
  model = t5.T5(cfg)
  results = {}
  for shape in SHAPES:
    devices = eight[:1] if shape == (1, 1, 1) else eight
    mesh = partitioning.make_mesh(shape, devices)
    rules = partitioning.logical_rules()
    tx = optax.adafactor(1e-2)
    state, shardings = trainer.create_sharded_state(model, tx, mesh, rules, 0,
                                                    t5.dummy_batch(1, 8, 8))
    step = trainer.jit_train_step(trainer.make_train_step(model, tx, lambda s: 1e-2),
                                  shardings, mesh)
    losses = []
    import flax.linen as nn
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      for b in batches:
        state, m = step(state, partitioning.global_batch(b, mesh))
        losses.append(float(m["loss"]))
    emb = state["params"]["token_embedding"]
    results[str(shape)] = {"losses": losses,
                           "embedding_shards": len(emb.sharding.device_set),
                           "embedding_spec": str(emb.sharding.spec)}
  json.dump(results, sys.stdout)
  return results


if __name__ == "__main__":
  main()

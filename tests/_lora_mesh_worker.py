"""LoRA training on meshes of 8 simulated CPU devices; prints per-mesh results as JSON.

Started by test_lora_training.py in a subprocess (the device count is fixed when JAX
starts: XLA_FLAGS=--xla_force_host_platform_device_count=8). The trainer's own
adapter path (Trainer.init_state, Trainer._compile) runs 3 Adam steps on each mesh.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from flanjax.data import pipeline, registry, vocab  # noqa: E402
from flanjax.models import kinds, lora, t5  # noqa: E402
from flanjax.training import adapters, loop  # noqa: E402

SHAPES = [(1, 1, 1), (8, 1, 1), (2, 2, 2), (1, 1, 8)]


def main():
  assert jax.device_count() == 8, jax.devices()
  registry.register_builtin(vocab.builtin_vocabulary(vocab_size=1000))
  lengths = {"inputs": 64, "targets": 16}
  batches = list(pipeline.get_dataset(registry.BUILTIN_MIXTURE, lengths, "train", 8, seed=0)
                 .take(3).as_numpy_iterator())
  cfg = t5.T5Config(vocab_size=1024, d_model=32, d_kv=8, d_ff=64, num_heads=8,
                    num_encoder_layers=1, num_decoder_layers=1, feed_forward="gated-gelu")
  model, kind = t5.T5(cfg), kinds.ENC_DEC
  base = jax.device_get(jax.jit(lambda r: model.init(r, **t5.dummy_batch(1, 8, 8)))(
      jax.random.PRNGKey(1)))["params"]
  base = jax.tree.map(np.asarray, __import__("flax").linen.unbox(base))
  config = lora.LoraConfig(rank=4, alpha=8.0, targets=["q", "k", "v", "o", "wi_0", "wi_1", "wo"])
  results = {}
  for shape in SHAPES:
    devices = jax.devices()[:1] if shape == (1, 1, 1) else jax.devices()
    from flanjax.training import partitioning  # pylint: disable=g-import-not-at-top
    part = loop.Partitioner(partitioning.make_mesh(shape, devices), partitioning.logical_rules())
    ad = adapters.LoraAdapters(config, cfg, lora.select(cfg, config.targets), base,
                           {"path": "-", "fingerprint": adapters.fingerprint(base)})
    tx = optax.adam(1e-2)
    trainer = loop.Trainer(model=model, kind=kind, partitioner=part,
                           optimizer=loop.Optimizer(tx, lambda s: 1e-2), checkpointer=None,
                           data=None, evaluator=None, run=None, vocab=None, mixture="",
                           adapters=ad)
    state = trainer.init_state()
    step, _ = trainer._compile()  # pylint: disable=protected-access
    losses = []
    with part.scope():
      for b in batches:
        state, m = step(state, partitioning.global_batch(b, part.mesh))
        losses.append(float(m["loss"]))
    got_base = jax.device_get(trainer.base)
    same = all(np.array_equal(np.asarray(x), y) for x, y in zip(
        jax.tree.leaves(got_base), jax.tree.leaves(base)))
    size = lambda t: int(sum(np.size(x) for x in jax.tree.leaves(t)))  # noqa: E731
    q = state["params"]["encoder_layer_0"]["attention"]["q"]
    results[str(shape)] = {
        "losses": losses, "base_unchanged": same, "adapter_size": size(state["params"]),
        "opt_size": size(state["opt_state"]), "base_size": size(base),
        "opt_leaf_shapes": sorted({tuple(np.shape(x)) for x in jax.tree.leaves(state["opt_state"])}),
        "adapter_leaf_shapes": sorted({tuple(np.shape(x)) for x in jax.tree.leaves(state["params"])}),
        "a_spec": str(tuple(q["a"].sharding.spec)), "b_spec": str(tuple(q["b"].sharding.spec))}
  json.dump(results, sys.stdout)


if __name__ == "__main__":
  main()

"""Train state, its shardings, and the pure train and eval steps (the loop: loop.py)."""

from __future__ import annotations

import logging
import signal
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from flanjax.models import dense, kinds
from flanjax.training import partitioning
from flanjax.training.losses import cross_entropy, output_cross_entropy


# ------------------------------------------------------------------ state

def init_state(model: nn.Module, tx: optax.GradientTransformation, rng, dummy: dict):
  """params, opt_state, step and rng; params keep their logical-axis boxes."""
  params_rng, state_rng = jax.random.split(rng)
  # Compiled whole even when called outside a jit (tests, notebooks): op by op, a model's
  # init compiles and runs each of its forward pass's operations on its own, several times
  # slower; inside the trainer's jit this is the same trace.
  params = jax.jit(model.init)(params_rng, **dummy)["params"]
  return {"params": params, "opt_state": tx.init(nn.unbox(params)),
          "step": jnp.zeros((), jnp.int32), "rng": state_rng}


def _key_names(path) -> tuple:
  return tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", None))) for k in path)


def state_shardings(abstract_state, mesh, rules):
  """Shardings of the whole state, derived from the params' logical names.

  Optimizer leaves take the sharding of the parameter they belong to; a
  factored leaf (Adafactor's row/column statistics) drops the reduced axis.
  """
  param_specs = nn.get_partition_spec(abstract_state["params"])
  param_shapes = nn.unbox(abstract_state["params"])
  flat_specs = {}
  for (path, spec), (_, shape) in zip(
      jax.tree_util.tree_flatten_with_path(param_specs,
                                           is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))[0],
      jax.tree_util.tree_flatten_with_path(param_shapes)[0]):
    flat_specs[_key_names(path)] = (spec, shape.shape)
  params_sh = partitioning.shardings_of(abstract_state["params"], mesh, rules)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def opt_leaf(path, leaf):
    names = _key_names(path)
    for n in range(len(names), 0, -1):
      hit = flat_specs.get(names[-n:])
      if hit is None:
        continue
      spec, shape = hit
      mesh_spec = nn.logical_to_mesh_axes(spec, rules)
      if tuple(leaf.shape) == tuple(shape):
        return jax.sharding.NamedSharding(mesh, mesh_spec)
      if len(leaf.shape) == len(shape) - 1:
        for drop in range(len(shape)):
          if tuple(shape[:drop] + shape[drop + 1:]) == tuple(leaf.shape):
            axes = tuple(mesh_spec) + (None,) * (len(shape) - len(mesh_spec))
            return jax.sharding.NamedSharding(
                mesh, jax.sharding.PartitionSpec(*(axes[:drop] + axes[drop + 1:])))
      return replicated
    return replicated

  opt_sh = jax.tree_util.tree_map_with_path(opt_leaf, abstract_state["opt_state"])
  return {"params": params_sh, "opt_state": opt_sh, "step": replicated, "rng": replicated}


def create_sharded_state(model: nn.Module, tx: optax.GradientTransformation, mesh, rules,
                         seed: int, dummy: dict, params=None):
  """Initialises the state directly into its shardings; returns (state, shardings).

  params: start from these (e.g. a Hugging Face checkpoint's) instead of a random
  init; the optimizer state and rng are what a random init would give.
  """
  init_fn = lambda rng: init_state(model, tx, rng, dummy)
  abstract = jax.eval_shape(init_fn, jax.random.PRNGKey(seed))
  shardings = state_shardings(abstract, mesh, rules)
  if params is not None:
    want = nn.unbox(abstract["params"])
    kinds.check_params_fit(want, params)
    # The model's tree structure (the loaded one may use other mapping types).
    have = kinds.flat_params(params)
    params = jax.tree.unflatten(jax.tree.structure(want), [
        np.asarray(have[k], w.dtype) for k, w in kinds.flat_params(want).items()])
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    if params is None:
      state = jax.jit(lambda rng: nn.unbox(init_fn(rng)),
                      out_shardings=shardings)(jax.random.PRNGKey(seed))
    else:
      def from_params(rng, p):
        _, state_rng = jax.random.split(rng)
        return {"params": p, "opt_state": tx.init(p), "step": jnp.zeros((), jnp.int32),
                "rng": state_rng}

      state = jax.jit(from_params, out_shardings=shardings)(jax.random.PRNGKey(seed), params)
  return state, shardings


def jit_train_step(step_fn, shardings, mesh):
  """The step compiled with explicit state and batch shardings; the state is donated."""
  return jax.jit(step_fn, in_shardings=(shardings, partitioning.batch_sharding(mesh)),
                 out_shardings=(shardings, None), donate_argnums=(0,))


# ------------------------------------------------------------------ step

def _loss_at_loss_positions(model: nn.Module, params, inputs: dict, batch: dict, chunk: int,
                            *, deterministic: bool = True, rngs=None, **loss_kw):
  """The model's last hidden states, then the output layer and the summed loss at the
  batch's loss positions only (losses.output_cross_entropy); shared by the train and
  eval steps so the tied-head layout is read in one place. Returns (loss, aux)."""
  hidden, head = model.apply({"params": params}, **inputs, deterministic=deterministic,
                             rngs=rngs or {}, return_hidden=True)
  return output_cross_entropy(hidden, head, batch["decoder_target_tokens"],
                              batch["decoder_loss_weights"],
                              transposed=model.config.tie_word_embeddings, chunk=chunk,
                              **loss_kw)


# "fused" (ships): the train step divides the summed loss by the batch's loss weight
# before differentiating, so the gradients need no pass of their own to be normalised,
# and takes the gradient norm by global_norm. "separate": the gradients divided after
# and optax.tree.norm (benchmarks.variants' choice/post_gradient=separate). Read when a
# step is traced.
POST_GRADIENT = "fused"


def global_norm(tree) -> jax.Array:
  """The L2 norm of all leaves together, as optax.tree.norm.

  On XLA:CPU each leaf's sum of squares is a dot of the leaf with itself over all its
  axes: XLA:CPU runs a large reduction as a windowed reduce then a reduce, and the dots
  took about half the time of optax's norm for the benchmark decoder's 6.9M parameters
  (benchmarks/README.md). Elsewhere optax's reduction. The dot contracts every axis
  without reshaping, so a sharded leaf needs no gather, only a sum of partial sums.
  """
  if not dense.cpu_formulation():
    return optax.tree.norm(tree)
  total = jnp.float32(0.0)
  for x in jax.tree.leaves(tree):
    axes = tuple(range(x.ndim))
    total = total + jax.lax.dot_general(x, x, ((axes, axes), ((), ())),
                                        preferred_element_type=jnp.float32)
  return jnp.sqrt(total)


def apply_gradients(tx: optax.GradientTransformation, grads, params, opt_state, loss, denom):
  """The train step after differentiating: (params, opt_state, grad_norm, ok).

  grads: already divided by denom under POST_GRADIENT "fused" (the step divides the
  loss), the summed loss's gradients under "separate" (divided here). A step whose loss
  or gradient norm is not finite is not applied (ok False).
  """
  if POST_GRADIENT not in ("fused", "separate"):
    raise ValueError(f"trainer.POST_GRADIENT={POST_GRADIENT!r} is not one of fused, separate")
  if POST_GRADIENT == "fused":
    grad_norm = global_norm(grads)
  else:
    grads = jax.tree.map(lambda g: g / denom, grads)
    grad_norm = optax.tree.norm(grads)
  ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  new_params, opt_state = _update_if(ok, tx, grads, params, opt_state)
  return new_params, opt_state, grad_norm, ok


# How a step with a non-finite loss or gradient leaves the state as it was: "auto"
# (a conditional on XLA:CPU, a select elsewhere; _update_if says why), "cond" or
# "select". Read when a step is traced (benchmarks.variants undoes the choice).
UPDATE_SKIP = "auto"


def _update_if(ok, tx: optax.GradientTransformation, grads, params, opt_state):
  """(params, opt_state) after tx's update where `ok`, else the same as given.

  On XLA:CPU a conditional skips the update: XLA:CPU did not fuse a select over every
  parameter and moment into the optimizer's update, and that select cost the
  benchmark's T5 step 3.5% and its decoder step 0.6%
  (benchmarks/results/variants_update_skip_*.json). Elsewhere the select, which GPUs
  and TPUs fuse into the update: a GPU's conditional copies its predicate to the host,
  which would stall the step's dispatch.
  """

  def update(operand):
    p, o = operand
    updates, new_o = tx.update(grads, o, p)
    new = (optax.apply_updates(p, updates), new_o)
    # The branches must agree on dtypes; key-typed leaves cannot be cast, so only cast
    # what the optimizer changed.
    return jax.tree.map(lambda n, old: n if n.dtype == old.dtype else n.astype(old.dtype),
                        new, operand)

  if UPDATE_SKIP not in ("auto", "cond", "select"):
    raise ValueError(f"trainer.UPDATE_SKIP={UPDATE_SKIP!r} is not one of auto, cond, select")
  if UPDATE_SKIP == "cond" or (UPDATE_SKIP == "auto" and dense.cpu_formulation()):
    return jax.lax.cond(ok, update, lambda operand: operand, (params, opt_state))
  new = update((params, opt_state))
  return jax.tree.map(lambda n, old: jnp.where(ok, n, old), new, (params, opt_state))


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, lr_fn: Callable,
                    *, microbatches: int = 1, z_loss: float = 0.0,
                    label_smoothing: float = 0.0,
                    loss_normalizing_factor: float | None = None,
                    dropout: bool = False, model_inputs: Callable | None = None,
                    output_chunk: int = 128):
  """A pure (state, batch) -> (state, metrics) function.

  model_inputs: batch -> the model's keyword arguments; by default the model
  kind's (`kinds.ModelKind.model_inputs`).
  output_chunk: > 0 applies the output layer inside the loss, at loss positions
  only, that many positions of each row at a time (losses.output_cross_entropy:
  no logits for a prompt's or padding's positions, none [batch, length, vocab]
  at once); 0 computes the logits at every position and then the loss.

  Gradients of the summed loss are accumulated over microbatches and divided
  once by the batch's total loss weight, so k microbatches give exactly the
  step of one batch k times larger. A step whose loss or gradient is not
  finite is not applied (metrics["applied"] = 0).
  """
  model_inputs = model_inputs or kinds.for_module(model).model_inputs

  def summed_loss(params, mb, rng, denom):
    rngs = {"dropout": rng} if dropout else {}
    if output_chunk > 0:
      total, aux = _loss_at_loss_positions(
          model, params, model_inputs(mb), mb, output_chunk, deterministic=not dropout,
          rngs=rngs, z_loss=z_loss, label_smoothing=label_smoothing)
    else:
      logits = model.apply({"params": params}, **model_inputs(mb),
                           deterministic=not dropout, rngs=rngs)
      _, aux = cross_entropy(logits, mb["decoder_target_tokens"], mb["decoder_loss_weights"],
                             z_loss=z_loss, label_smoothing=label_smoothing, normalize_by=1.0)
      total = aux["loss_sum"] + aux["z_loss_sum"]
    # Divided here, the gradient comes out normalised: the division scales the loss's
    # cotangent once instead of every gradient afterwards (a pass over all of them).
    return total / denom, aux

  grad_fn = jax.value_and_grad(summed_loss, has_aux=True)

  def step(state, batch):
    params = state["params"]
    rng = jax.random.fold_in(state["rng"], state["step"])
    # The loss weights' sum is the losses' weight_sum, known before the forward pass.
    denom = (jnp.sum(batch["decoder_loss_weights"].astype(jnp.float32))
             if loss_normalizing_factor is None else jnp.float32(loss_normalizing_factor))
    denom = jnp.maximum(denom, 1e-8)
    in_loss = denom if POST_GRADIENT == "fused" else jnp.float32(1.0)
    if microbatches > 1:
      split = jax.tree.map(
          lambda x: x.reshape((microbatches, x.shape[0] // microbatches) + x.shape[1:]), batch)

      def body(carry, xs):
        mb, i = xs
        (_, aux), g = grad_fn(params, mb, jax.random.fold_in(rng, i), in_loss)
        acc_g, acc_aux = carry
        return (jax.tree.map(jnp.add, acc_g, g), jax.tree.map(jnp.add, acc_aux, aux)), None

      zero_g = jax.tree.map(jnp.zeros_like, params)
      zero_aux = {"loss_sum": 0.0, "z_loss_sum": 0.0, "weight_sum": 0.0}
      zero_aux = jax.tree.map(jnp.float32, zero_aux)
      (grads, aux), _ = jax.lax.scan(body, (zero_g, zero_aux),
                                     (split, jnp.arange(microbatches)))
    else:
      (_, aux), grads = grad_fn(params, batch, rng, in_loss)
    loss = (aux["loss_sum"] + aux["z_loss_sum"]) / denom
    new_params, opt_state, grad_norm, ok = apply_gradients(
        tx, grads, params, state["opt_state"], loss, denom)
    new_state = {"params": new_params, "opt_state": opt_state,
                 "step": state["step"] + 1, "rng": state["rng"]}
    metrics = {"loss": loss, "cross_entropy": aux["loss_sum"] / denom,
               "z_loss": aux["z_loss_sum"] / denom, "grad_norm": grad_norm,
               "learning_rate": lr_fn(state["step"]), "loss_weight": aux["weight_sum"],
               "applied": ok.astype(jnp.float32)}
    return new_state, metrics

  return step


def make_eval_step(model: nn.Module, model_inputs: Callable | None = None,
                   token_accuracy: bool = False, output_chunk: int = 128):
  """(params, batch) -> (summed loss, summed loss weight), for either model kind.

  token_accuracy: also the summed weight of the target tokens the model's argmax
  predicts (teacher-forced), as a third value. Positions without weight count
  nothing, whatever their logits (an all-padding row included).
  output_chunk: > 0 makes logits only at loss positions, that many per row at a time
  (losses.output_cross_entropy, as the train step): no [batch, length, vocab] array, so
  a validation batch fits wherever a training batch does; 0: logits everywhere.
  """
  model_inputs = model_inputs or kinds.for_module(model).model_inputs

  def step(params, batch):
    targets, weights = batch["decoder_target_tokens"], batch["decoder_loss_weights"]
    if output_chunk > 0:
      _, aux = _loss_at_loss_positions(model, params, model_inputs(batch), batch,
                                       output_chunk, accuracy=token_accuracy)
      out = (aux["loss_sum"], aux["weight_sum"])
      return out + (aux["correct_sum"],) if token_accuracy else out
    logits = model.apply({"params": params}, **model_inputs(batch))
    if not token_accuracy:
      _, aux = cross_entropy(logits, targets, weights, normalize_by=1.0)
      return aux["loss_sum"], aux["weight_sum"]
    logits, weights = logits.astype(jnp.float32), weights.astype(jnp.float32)
    token_loss = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(
        logits, targets[..., None], axis=-1)[..., 0]
    counted = weights > 0
    correct = jnp.argmax(logits, axis=-1) == targets
    return (jnp.sum(jnp.where(counted, token_loss * weights, 0.0)), jnp.sum(weights),
            jnp.sum(jnp.where(counted & correct, weights, 0.0)))

  return step


# ------------------------------------------------------------------ preemption

class StopSignal:
  """Turns SIGTERM (a preempted VM) into a flag the loop checks between steps."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint and stopping")
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

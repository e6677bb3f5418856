"""The pure train step of V-MoE with router-consistency learning.

One jitted step (docs/architecture.md):
  1. two augmented views of every image and their patch correspondences,
     on device (augment.batched_paired_views), views of an image adjacent;
     with mixup, both views of image i mixed with the same partner in its
     device's shard (augment.mixup; maps stay image i's);
  2. the model on all 2B views; clean router logits leave each MoE layer
     through the 'intermediates' collection;
  3. loss = xent(both views) + auxiliary (importance + load)
            + consistency weight * mean_layers L(router(view1), router(view2))
     over matched patches (Kada et al., MIRU 2023; L = JSD by default, see
     losses.CONSISTENCY_LOSSES);
  4. optax update, and the NaN policy (resilience.apply_nan_policy).

With `microsteps` M > 1 (config.microsteps; vmoe's trainer.py
`accumulate_gradients_and_metrics`), the views are rendered one micro-batch
at a time (microbatched_views: the same views), mixup still pairs images
over the whole device shard, and steps 2-3 run on M micro-batches in a
`lax.scan` that sums weighted gradients and metrics (accumulate_microsteps):
each micro-batch is the m-th contiguous 1/M of every device's shard, so
routing groups stay inside it.

Random streams come from streams.py: each step folds its number into the
run's 'train' key, so a resumed run repeats what an uninterrupted one did.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec

from vmoe_jsd import (
  augment,
  losses,
  models,
  resilience,
  sharding,
  streams,
  summaries,
)
from vmoe_jsd.config_errors import check_range, reject

Array = jax.Array


@flax.struct.dataclass
class TrainState:
  step: Array
  params: Any
  opt_state: Any


@dataclasses.dataclass(frozen=True)
class StepSpec:
  """What the train step computes, beyond the model and the optimizer.

  Attributes:
    loss: classification loss, a name in losses.CLASSIFICATION_LOSSES.
    num_classes: classes (mixup's soft targets).
    moe_layers: the MoE blocks (their auxiliary losses are added).
    consistency: how the consistency term is computed.
    consistency_weight: its weight (0: logged, not trained on).
    consistency_layers: the MoE blocks it averages over (empty: none).
    num_prefix_tokens: tokens before the patches (1 with a class token).
    mixup_concentration: Beta(a, a) of mixup (0: no mixup).
    nan_policy: a name in resilience.NAN_POLICIES.
    microsteps: micro-batches per optimizer step (1: the whole batch at
      once); see accumulate_microsteps.
    summaries: the norm summaries and router statistics to compute.
  """

  loss: str
  num_classes: int
  moe_layers: tuple[int, ...]
  consistency: losses.ConsistencyOptions
  consistency_weight: float
  consistency_layers: tuple[int, ...]
  num_prefix_tokens: int
  mixup_concentration: float = 0.0
  nan_policy: str = 'stop'
  microsteps: int = 1
  summaries: summaries.SummarySpec = summaries.SummarySpec()


def consistency_loss(
  intermediates,
  maps: Array,
  *,
  layers,
  prefix: int,
  options: losses.ConsistencyOptions | None = None,
) -> tuple[Array, dict[str, Array]]:
  """Mean over `layers` of the router-consistency loss between the views.

  Args:
    intermediates: the model's sown 'intermediates' on (2B, ...) views with
      the two views of each image adjacent.
    maps: (B, 2, P) patch correspondences.
    layers: MoE blocks to include.
    prefix: tokens before the patches (1 with a class token).
    options: losses.ConsistencyOptions (default: JSD); `include_cls` needs
      prefix >= 1 (token 0 is the class token).

  Returns:
    (mean loss, {'consistency/encoderblock_i': ..., 'matched_pairs': ...}):
    the per-layer values of the configured loss (not always a JSD).
  """
  options = options or losses.ConsistencyOptions()
  num_images = maps.shape[0]
  per_layer = {}
  pairs = 0
  by_layer = models.router_logits_by_layer(intermediates, layers)
  for block, logits in by_layer.items():
    patches = models.paired_patches(logits, num_images, prefix)
    cls = (None, None)
    if options.include_cls:
      per_view = logits.reshape(num_images, 2, -1, logits.shape[-1])[:, :, 0]
      cls = (per_view[:, 0], per_view[:, 1])
    pair = (patches[:, 0], patches[:, 1], maps[:, 0], maps[:, 1])
    value, pairs = losses.router_consistency(
      *pair, options=options, cls_v1=cls[0], cls_v2=cls[1]
    )
    per_layer[f'consistency/encoderblock_{block}'] = value
  mean = sum(per_layer.values()) / len(per_layer)
  return mean, {**per_layer, 'matched_pairs': pairs}


def make_train_step(
  spec: StepSpec,
  model,
  tx: optax.GradientTransformation,
  schedule: optax.Schedule,
  settings: augment.ViewSettings,
  train_key: Array,
) -> Callable:
  """The pure train step: (state, images, labels, orig_sizes) ->
  (state, metrics). `model`: the training model (not deterministic);
  `schedule`: tx's learning rate (logged); `train_key`:
  streams.stream(seed, 'train').
  """
  grad_fn = make_grad_fn(spec, model, settings, train_key)

  def train_step(state: TrainState, images, labels, orig_sizes=None):
    grads, metrics = grad_fn(
      state.params, state.step, images, labels, orig_sizes
    )
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics['grad_norm'] = optax.tree.norm(grads)
    metrics['learning_rate'] = schedule(state.step)
    if spec.summaries.norms:
      trees = {'params': params, 'grads': grads, 'updates': updates}
      metrics.update(summaries.tree_norms(trees, spec.summaries.norm_groups))
    new_state = TrainState(state.step + 1, params, opt_state)
    new_state = resilience.apply_nan_policy(
      spec.nan_policy, state, new_state, metrics
    )
    return new_state, metrics

  return train_step


def make_grad_fn(
  spec: StepSpec, model, settings: augment.ViewSettings, train_key: Array
) -> Callable:
  """Steps 1-3 of the module docstring: (params, step, images, labels,
  orig_sizes) -> (gradients, metrics) of the step's total loss, from one
  batch or from spec.microsteps micro-batches (same arguments as
  make_train_step)."""
  objective = functools.partial(
    _objective, spec, model, losses.get_classification_loss(spec.loss)
  )

  def grad_fn(params, step, images, labels, orig_sizes=None):
    aug_key, dropout_key, gating_key, mixup_key = streams.train_step_keys(
      train_key, step
    )
    # Crops sampled in original-image pixels when the host sends the sizes.
    if spec.microsteps == 1:
      views, maps = augment.batched_paired_views(
        aug_key, images, settings, orig_sizes
      )
    else:  # The same views, augmented one micro-batch at a time.
      views, maps = microbatched_views(
        aug_key, images, settings, orig_sizes, spec.microsteps
      )
    targets = labels
    if spec.mixup_concentration > 0:  # Both views of image i, one partner.
      views, maps, targets, _ = augment.mixup(
        mixup_key,
        views,
        maps,
        labels,
        concentration=spec.mixup_concentration,
        num_classes=spec.num_classes,
        num_groups=jax.device_count(),  # One per device shard of the batch.
      )
    rngs = {'dropout': dropout_key, 'gating': gating_key}
    if spec.microsteps == 1:
      views = views.reshape(2 * images.shape[0], *views.shape[2:])
      return jax.grad(objective, has_aux=True)(
        params, views, maps, targets, labels, rngs
      )
    return accumulate_microsteps(
      objective, spec, params, (views, maps, targets, labels), rngs
    )

  return grad_fn


def _objective(
  spec: StepSpec, model, loss_fn, params, views, maps, targets, labels, rngs
):
  """(total loss, metrics) of (2B, S, S, C) views, the two of an image
  adjacent, with maps (B, 2, P), targets (B,) or (B, classes)."""
  inputs = augment.to_model_range(views)
  (logits, metrics), state_vars = model.apply(
    {'params': params}, inputs, rngs=rngs, mutable=['intermediates']
  )
  xent = jnp.mean(loss_fn(logits, jnp.repeat(targets, 2, axis=0)))
  total, out = _total_loss(
    spec, xent, logits, metrics, state_vars, maps, labels
  )
  if spec.summaries.router and spec.moe_layers:
    out.update(
      summaries.router_statistics(state_vars['intermediates'], spec.moe_layers)
    )
  return total, out


# Micro-steps: one optimizer step from M micro-batches.
def check_microsteps(
  microsteps, batch_size: int, num_devices: int, tokens: int, group_size
) -> int:
  """config.microsteps, when each micro-batch holds a whole number of
  images and of routing groups (`group_size` tokens; None: a dense model)
  on every device; `tokens`: of one view; `batch_size`: a multiple of the
  devices (checked before).
  """
  check_range('microsteps', microsteps, 1, integer=True)
  per_device = batch_size // num_devices
  if per_device % microsteps:
    valid = (
      f'must divide the {per_device} images per device (dataset.train.'
      f'batch_size={batch_size} / {num_devices} devices)'
    )
    reject('microsteps', microsteps, valid)
  micro = 2 * (per_device // microsteps) * tokens
  if group_size and micro % group_size:
    valid = (
      f'each micro-batch must hold whole routing groups: 2 views x '
      f'{per_device // microsteps} images x {tokens} tokens = {micro} per '
      f'device is not a multiple of model.encoder.moe.group_size={group_size}'
    )
    reject('microsteps', microsteps, valid)
  return microsteps


MICROSTEP_SCOPE = 'microsteps'


def split_microbatches(x: Array, num_micro: int, num_shards: int) -> Array:
  """(B, ...) -> (M, B / M, ...): micro-batch m is the m-th contiguous 1/M
  of each of the `num_shards` device shards of the batch axis.

  (vmoe strides instead, taking every M-th example: contiguous slices keep
  the routing groups of the whole batch, so M micro-batches route exactly
  as one batch.)
  """
  per_micro = x.shape[0] // num_shards // num_micro
  x = x.reshape(num_shards, num_micro, per_micro, *x.shape[1:])
  x = jnp.swapaxes(x, 0, 1).reshape(
    num_micro, num_shards * per_micro, *x.shape[3:]
  )
  return sharding.constrain(x, PartitionSpec(None, sharding.BATCH_AXES))


def merge_microbatches(x: Array, num_shards: int) -> Array:
  """The inverse of split_microbatches: (M, B / M, ...) -> (B, ...)."""
  num_micro, per_micro = x.shape[0], x.shape[1] // num_shards
  x = x.reshape(num_micro, num_shards, per_micro, *x.shape[2:])
  x = jnp.swapaxes(x, 0, 1).reshape(
    num_micro * num_shards * per_micro, *x.shape[3:]
  )
  return sharding.constrain(x, PartitionSpec(sharding.BATCH_AXES))


def microbatched_views(
  key, images, settings: augment.ViewSettings, orig_sizes, num_micro: int
):
  """augment.batched_paired_views, computed one micro-batch at a time.

  The same per-image keys (one jax.random.split of `key` over the batch),
  so the same views and maps; only the augmentation's temporaries shrink
  (RandAugment at ImageNet size: about 11 GiB for 512 images on XLA:CPU,
  docs/scaling_and_performance.md). The views of the whole batch are kept
  for mixup, whose partners cross micro-batches.

  Returns:
    views (B, 2, S, S, C), maps (B, 2, P).
  """
  num_shards = jax.device_count()
  split = lambda x: split_microbatches(x, num_micro, num_shards)
  keys = jax.random.split(key, images.shape[0])
  if orig_sizes is None:
    orig_sizes = jnp.tile(jnp.int32(images.shape[1:3]), (images.shape[0], 1))
    chunk_fn = lambda k, im, _: augment.paired_views(k, im, settings)
  else:
    chunk_fn = lambda k, im, o: augment.paired_views(k, im, settings, o)

  def body(carry, chunk):
    return carry, jax.vmap(chunk_fn)(*chunk)

  chunks = (split(keys), split(images), split(orig_sizes))
  _, (views, maps) = jax.lax.scan(body, None, chunks)
  return tuple(merge_microbatches(x, num_shards) for x in (views, maps))


def accumulate_microsteps(objective, spec: StepSpec, params, batch, rngs):
  """Gradients and metrics of the whole batch from spec.microsteps parts.

  Each micro-batch's loss is weighted so that the M weighted losses sum to
  the whole batch's loss, and so do their gradients (linearity):
  - means over examples, views and routing groups (xent, accuracy, the
    auxiliary losses, dropped tokens, router statistics): weight 1/M, exact
    because every micro-batch holds the same number of views and whole
    groups (check_microsteps);
  - consistency losses that are a mean over matched pairs: weight n_m / N,
    n_m the pairs of micro-batch m and N those of the batch (known from the
    maps before the forward pass), so that n_m/N * sum_m/n_m = sum_m/N;
  - batch-level consistency losses (cross_correlation) get the same weight
    but are computed per micro-batch: NOT the whole batch's value.
  'matched_pairs' is summed. Router noise and expert dropout of micro-batch
  m fold m into the step's keys (fresh draws, as vmoe's microsteps), so
  they differ from M = 1's draws.

  `objective`: (params, views (2b, ...), maps, targets, labels, rngs) ->
  (loss, metrics) of one micro-batch; `batch`: (views (B, 2, ...), maps
  (B, 2, P), targets, labels); `rngs`: the step's {'dropout', 'gating'}
  keys. Returns (grads, metrics) of the whole batch.
  """
  num_micro = spec.microsteps
  maps = batch[1]
  micro_batches = jax.tree_util.tree_map(
    lambda x: split_microbatches(x, num_micro, jax.device_count()), batch
  )
  num_pairs = losses.num_matched_pairs(
    maps[:, 0], maps[:, 1], spec.consistency.include_cls
  )
  num_pairs = jnp.maximum(num_pairs, 1).astype(jnp.float32)

  def micro_grad(micro, index):
    views, maps, targets, labels = micro
    views = views.reshape(2 * views.shape[0], *views.shape[2:])
    micro_rngs = {k: jax.random.fold_in(key, index) for k, key in rngs.items()}

    def weighted(p):
      _, out = objective(p, views, maps, targets, labels, micro_rngs)
      return _weigh_microbatch(spec, out, num_micro, num_pairs)

    return jax.grad(weighted, has_aux=True)(params)

  def body(acc, inputs):
    index, micro = inputs
    return jax.tree_util.tree_map(jnp.add, acc, micro_grad(micro, index)), None

  first = jax.tree_util.tree_map(lambda x: x[0], micro_batches)
  zeros = jax.tree_util.tree_map(
    lambda s: jnp.zeros(s.shape, s.dtype),
    jax.eval_shape(micro_grad, first, jnp.int32(0)),
  )
  indices = jnp.arange(num_micro, dtype=jnp.int32)
  # The scope names the loop's ops in the HLO: inspect_step counts the
  # collectives inside it num_micro times per step.
  with jax.named_scope(MICROSTEP_SCOPE):
    acc, _ = jax.lax.scan(body, zeros, (indices, micro_batches))
  return acc


def _weigh_microbatch(spec: StepSpec, out, num_micro: int, num_pairs):
  """(weighted loss, weighted metrics) of one micro-batch (see
  accumulate_microsteps)."""
  scale = 1.0 / num_micro
  pair_share = None
  if 'matched_pairs' in out:
    pair_share = out['matched_pairs'].astype(jnp.float32) / num_pairs
  weighted = {}
  for key, value in out.items():
    if key == 'matched_pairs':
      weighted[key] = value
    elif key.split('/')[0] in ('consistency', 'jsd'):  # Per pair.
      weighted[key] = jnp.asarray(value, jnp.float32) * pair_share
    else:
      weighted[key] = jnp.asarray(value, jnp.float32) * scale
  total = weighted['xent'] + weighted['auxiliary_loss']
  if spec.consistency_layers and spec.consistency_weight > 0:
    total = total + spec.consistency_weight * weighted['consistency']
  weighted['total_loss'] = total
  return total, weighted


def _total_loss(
  spec: StepSpec, xent, logits, metrics, state_vars, maps, labels
):
  """xent + auxiliary + weight * consistency, and every term as a metric."""
  aux = jnp.mean(metrics['auxiliary_loss']) if spec.moe_layers else 0.0
  out = {'xent': xent, 'auxiliary_loss': aux}
  total = xent + aux
  if spec.consistency_layers:
    jsd, jsd_metrics = consistency_loss(
      state_vars['intermediates'],
      maps,
      layers=spec.consistency_layers,
      prefix=spec.num_prefix_tokens,
      options=spec.consistency,
    )
    if spec.consistency_weight > 0:
      total = total + spec.consistency_weight * jsd
    else:  # Logged, not trained on.
      jsd = jax.lax.stop_gradient(jsd)
      jsd_metrics = jax.lax.stop_gradient(jsd_metrics)
    out.update(jsd_metrics, consistency=jsd)
  for name, m in metrics.items():
    if isinstance(m, Mapping):
      dropped = m.get('dropped_fraction', m.get('dropped_tokens'))
      if dropped is not None:
        out[f'dropped/{name}'] = jnp.mean(dropped)
  out['train_accuracy'] = jnp.mean(
    jnp.argmax(logits, -1) == jnp.repeat(labels, 2)
  )
  out['total_loss'] = total
  return total, out

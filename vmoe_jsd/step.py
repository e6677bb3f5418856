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

Random streams come from streams.py: each step folds its number into the
run's 'train' key, so a resumed run repeats what an uninterrupted one did.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from vmoe_jsd import augment, losses, models, resilience, streams

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
    (mean loss, {'jsd/encoderblock_i': ..., 'matched_pairs': ...}); the
    per-layer keys keep the name 'jsd/' whatever the loss.
  """
  options = options or losses.ConsistencyOptions()
  num_images = maps.shape[0]
  per_layer = {}
  pairs = 0
  for block, logits in models.router_logits_by_layer(
    intermediates, layers
  ).items():
    patches = models.paired_patches(logits, num_images, prefix)
    cls = None
    if options.include_cls:
      cls = logits.reshape(num_images, 2, -1, logits.shape[-1])[:, :, 0]
    value, pairs = losses.router_consistency(
      patches[:, 0],
      patches[:, 1],
      maps[:, 0],
      maps[:, 1],
      options=options,
      cls_v1=None if cls is None else cls[:, 0],
      cls_v2=None if cls is None else cls[:, 1],
    )
    per_layer[f'jsd/encoderblock_{block}'] = value
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
  (state, metrics).

  Args:
    spec: the losses and policies.
    model: the training model (not deterministic).
    tx: the optimizer.
    schedule: its learning-rate schedule (logged).
    settings: the augmentation.
    train_key: streams.stream(seed, 'train').
  """
  loss_fn = losses.get_classification_loss(spec.loss)

  def train_step(state: TrainState, images: Array, labels: Array,
                 orig_sizes: Array | None = None):  # fmt: skip
    aug_key, dropout_key, gating_key, mixup_key = streams.train_step_keys(
      train_key, state.step
    )
    # Crops sampled in original-image pixels when the host sends the sizes.
    views, maps = augment.batched_paired_views(
      aug_key, images, settings, orig_sizes
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
    views = views.reshape(2 * images.shape[0], *views.shape[2:])
    rngs = {'dropout': dropout_key, 'gating': gating_key}

    def objective(params):
      (logits, metrics), state_vars = model.apply(
        {'params': params}, augment.to_model_range(views), rngs=rngs,
        mutable=['intermediates'],
      )  # fmt: skip
      xent = jnp.mean(loss_fn(logits, jnp.repeat(targets, 2, axis=0)))
      return _total_loss(spec, xent, logits, metrics, state_vars, maps, labels)

    grads, metrics = jax.grad(objective, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics['grad_norm'] = optax.tree.norm(grads)
    metrics['learning_rate'] = schedule(state.step)
    new_state = TrainState(state.step + 1, params, opt_state)
    new_state = resilience.apply_nan_policy(
      spec.nan_policy, state, new_state, metrics
    )
    return new_state, metrics

  return train_step


def _total_loss(spec: StepSpec, xent, logits, metrics, state_vars, maps,
                labels):  # fmt: skip
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

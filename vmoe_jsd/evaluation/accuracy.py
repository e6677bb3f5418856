"""The standard evaluation: accuracy and routing consistency across views.

Routing consistency (per MoE layer), on two augmented views of each
evaluation image made with a fixed key, over patch tokens (the class token
has no spatial correspondence and is left out):
  - agreement: fraction of matched patch pairs (both directions, view 1 ->
    view 2 and view 2 -> view 1) whose top-1 experts are equal;
  - chance: sum_e load_e^2, the agreement two independent tokens with the
    observed top-1 load would reach (1/E balanced, 1 collapsed);
  - kappa = (agreement - chance) / (1 - chance) (Cohen's kappa with equal
    marginals): 0 at chance, 1 perfect. Agreement alone rises when the router
    collapses onto few experts; kappa does not;
  - jsd: mean Jensen-Shannon divergence of the clean router softmax of
    matched pairs (nats, at most ln 2);
  - confidence: mean largest router probability; entropy: mean router
    entropy (nats) and its fraction of the maximum, ln E;
  - load: fraction of patch tokens whose top-1 is each expert;
  - dropped: fraction of token choices over capacity (top-K; expert choice:
    fraction of tokens no expert took; Soft MoE: 0), from the router on the
    deterministic accuracy view with the evaluation capacity factor.

The per-batch function returns sums, so batches (and processes) add up
exactly; `finalize_routing` turns the sums into the figures above.

Padding never counts (core.py), including in the load and the dropped
fraction (each routing group's dropped fraction is weighted by its real
tokens, so all-padding groups weigh nothing). One effect of padding
remains where capacity binds: padded
tokens that share a routing group with real ones compete with them for
expert slots (no drop is possible when capacity >= group size, e.g. the
default's evaluation capacity factor 4 with K=2 of E=4).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from vmoe_jsd import augment, losses, models
from vmoe_jsd.config_errors import check_range, to_dict
from vmoe_jsd.evaluation import core
from vmoe_jsd.models.spec import ModelSpec

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class EvalSpec:
  """config.evaluate (its model_overrides live in the ModelSpec, its
  stability block in stability.StabilitySpec).

  Attributes:
    every_steps: evaluate every N training steps (0: only at the end).
    limit: at most this many test images (None: the whole split).
    routing_map_images: test images in the routing-map figure written to
      TensorBoard at each evaluation (0: none).
  """

  every_steps: int = 0
  limit: int | None = None
  routing_map_images: int = 0

  @classmethod
  def from_config(cls, cfg) -> EvalSpec:
    cfg = to_dict(cfg)
    every = cfg.get('every_steps') or 0
    check_range('evaluate.every_steps', every, 0, integer=True)
    check_range(
      'evaluate.limit', cfg.get('limit'), 1, integer=True, optional=True
    )
    images = int(cfg.get('routing_map_images', 0) or 0)
    return cls(every, cfg.get('limit'), images)


def routing_sums(logits: Array, maps: Array, mask: Array) -> dict[str, Array]:
  """Sums behind the routing-consistency figures, for one batch.

  Args:
    logits: (B, 2, P, E) clean router logits of the patch tokens of the two
      views of each image.
    maps: (B, 2, P) int32 patch correspondences (maps[:, 0]: view 1 -> view
      2, maps[:, 1]: view 2 -> view 1), -1 for no match.
    mask: (B,) bool, False for padding examples.

  Returns:
    A dict of scalar / (E,) sums: pairs, agree, jsd, tokens, load (E,),
    confidence, entropy.
  """
  num_experts = logits.shape[-1]
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
  probs = jnp.exp(log_probs)
  top1 = jnp.argmax(logits, axis=-1)  # (B, 2, P)
  valid = (maps >= 0) & mask[:, None, None]  # (B, 2, P)
  # Partner of each patch in the other view: view 1's partners come from
  # view 2 and vice versa.
  other_top1 = top1[:, ::-1]
  other_log_probs = log_probs[:, ::-1]
  partner_top1 = jnp.take_along_axis(other_top1, jnp.maximum(maps, 0), axis=2)
  partner_log_probs = jnp.take_along_axis(
    other_log_probs, jnp.maximum(maps, 0)[..., None], axis=2
  )
  jsd = losses.jensen_shannon(log_probs, partner_log_probs)
  token_mask = jnp.broadcast_to(mask[:, None, None], top1.shape)
  entropy = -jnp.sum(probs * log_probs, axis=-1)
  return {
    'pairs': jnp.sum(valid),
    'agree': jnp.sum(valid & (top1 == partner_top1)),
    'jsd': jnp.sum(jnp.where(valid, jsd, 0.0)),
    'tokens': jnp.sum(token_mask),
    'load': jnp.sum(
      jax.nn.one_hot(top1, num_experts) * token_mask[..., None],
      axis=(0, 1, 2),
    ),
    'confidence': jnp.sum(jnp.where(token_mask, jnp.max(probs, -1), 0.0)),
    'entropy': jnp.sum(jnp.where(token_mask, entropy, 0.0)),
  }


def finalize_routing(sums: dict[str, np.ndarray]) -> dict[str, object]:
  """Routing figures from accumulated `routing_sums` (host numpy)."""
  pairs = float(sums['pairs'])
  tokens = float(sums['tokens'])
  load = np.asarray(sums['load'], np.float64) / max(tokens, 1.0)
  num_experts = load.shape[0]
  agreement = float(sums['agree']) / pairs if pairs else float('nan')
  chance = float(np.sum(load**2))
  kappa = (
    (agreement - chance) / (1.0 - chance) if chance < 1.0 else float('nan')
  )
  entropy = float(sums['entropy']) / max(tokens, 1.0)
  return {
    'agreement': agreement,
    'chance': chance,
    'kappa': kappa,
    'jsd': float(sums['jsd']) / pairs if pairs else float('nan'),
    'confidence': float(sums['confidence']) / max(tokens, 1.0),
    'entropy': entropy,
    'entropy_fraction': entropy / math.log(num_experts)
    if num_experts > 1
    else 0.0,
    'load': [float(x) for x in load],
    'pairs': int(pairs),
  }


def format_routing_table(routing: dict[str, dict]) -> str:
  """A fixed-width text table of the routing figures, one row per layer."""
  header = (
    f'{"layer":<16}{"agree":>7}{"chance":>8}{"kappa":>7}{"jsd":>8}'
    f'{"conf":>6}{"H/Hmax":>7}{"dropped":>8}  load'
  )
  rows = [header]
  for name, r in routing.items():
    load = ' '.join(f'{x:.2f}' for x in r['load'])
    rows.append(
      f'{name:<16}{r["agreement"]:>7.3f}{r["chance"]:>8.3f}'
      f'{r["kappa"]:>7.3f}{r["jsd"]:>8.4f}{r["confidence"]:>6.2f}'
      f'{r["entropy_fraction"]:>7.2f}{r.get("dropped", float("nan")):>8.3f}'
      f'  [{load}]'
    )
  return '\n'.join(rows)


def make_eval_step(eval_model, model: ModelSpec, settings, views_key):
  """(params, images, labels, mask, index) -> sums for evaluation.

  Args:
    eval_model: the deterministic evaluation model.
    model: its spec (MoE layers, class-token prefix).
    settings: augment.ViewSettings.
    views_key: streams.stream(seed, 'eval_views').

  `index` (B,) int32 is each example's position in the split (any value for
  padding); it keys the example's two random views.
  """
  layers, prefix = model.moe_layers, model.num_prefix_tokens

  def eval_step(params, images, labels, mask, index):
    center = jax.vmap(lambda im: augment.center_view(im, settings))(images)
    logits, metrics = eval_model.apply(
      {'params': params}, augment.to_model_range(center)
    )
    correct = (jnp.argmax(logits, -1) == labels) & mask
    sums = {'correct': jnp.sum(correct), 'count': jnp.sum(mask)}
    for block in layers:
      sums.update(_dropped_sums(metrics[f'encoderblock_{block}'], mask, block))
    if layers:
      views, maps = core.evaluation_views(
        views_key, images, index, mask, settings
      )
      by_layer = core.router_logits_of_views(eval_model, params, views, layers)
      for block, lg in by_layer.items():
        patches = models.paired_patches(lg, images.shape[0], prefix)
        for k, v in routing_sums(patches, maps, mask).items():
          sums[f'routing/encoderblock_{block}/{k}'] = v
    return sums

  return eval_step


def _dropped_sums(metrics, mask, block) -> dict[str, Array]:
  """Top-K: choices over capacity; expert choice: tokens no expert took;
  Soft MoE drops nothing. Per group, weighted by its real tokens."""
  dropped = metrics.get('dropped_fraction', metrics.get('dropped_tokens'))
  if dropped is None:
    return {
      f'dropped/encoderblock_{block}': jnp.float32(0.0),
      f'dropped_weight/encoderblock_{block}': jnp.float32(1.0),
    }
  real = core.group_real_tokens(mask, dropped.shape[0])
  return {
    f'dropped/encoderblock_{block}': jnp.sum(dropped * real),
    f'dropped_weight/encoderblock_{block}': jnp.sum(real),
  }


def run_evaluation(
  eval_step_fn, params, dataset, batch_size: int, limit, layers, put_batch
):
  """Accuracy and routing figures over a test split.

  Args:
    eval_step_fn: the jitted `make_eval_step` function.
    params: the parameters.
    dataset: the test split (a StoppableSplit stops it between batches).
    batch_size: its global batch size.
    limit: at most this many images (None: all).
    layers: the MoE blocks (ModelSpec.moe_layers).
    put_batch: sharding.make_put_batch(mesh).
  """
  fields = ('image', 'label', 'mask', 'index')
  totals = core.sum_over_batches(
    lambda _, b: eval_step_fn(params, *put_batch(*(b[f] for f in fields))),
    core.eval_batches(dataset, batch_size, limit),
  )
  result = {
    'accuracy': float(totals['correct'] / max(totals['count'], 1)),
    'num_examples': int(totals['count']),
  }
  routing_figs = {}
  for block in layers:
    prefix = f'routing/encoderblock_{block}/'
    layer_sums = {
      k[len(prefix) :]: v for k, v in totals.items() if k.startswith(prefix)
    }
    if not layer_sums:
      continue
    figs = finalize_routing(layer_sums)
    dropped = totals.get(f'dropped/encoderblock_{block}', 0.0)
    weight = totals.get(f'dropped_weight/encoderblock_{block}', 0.0)
    figs['dropped'] = float(dropped / weight) if weight else 0.0
    routing_figs[f'encoderblock_{block}'] = figs
  result['routing'] = routing_figs
  return result


def routing_scalars(result) -> dict[str, float]:
  out = {'accuracy': result['accuracy']}
  for layer, figs in result['routing'].items():
    for k, v in figs.items():
      if isinstance(v, list):
        for e, x in enumerate(v):
          out[f'routing/{layer}/load_{e}'] = x
      else:
        out[f'routing/{layer}/{k}'] = v
  return out


def build(ctx):
  """The registry's run: accuracy and routing figures of the test split."""
  spec = ctx.spec
  step = jax.jit(
    make_eval_step(ctx.eval_model, spec.model, spec.views, ctx.views_key)
  )

  def run(params, split, should_stop):
    del should_stop  # split raises on a stop.
    return run_evaluation(
      step,
      params,
      split,
      ctx.batch_size,
      spec.evaluate.limit,
      spec.model.moe_layers,
      ctx.put_batch,
    )

  return run


def table(result) -> str:
  """The routing table of a result ('' without MoE layers)."""
  return format_routing_table(result['routing']) if result['routing'] else ''

"""Evaluation: accuracy and routing consistency across views.

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

Padding (the last batch, and on many hosts whole batches, see
data/eval_padding.py) never counts: every sum is masked, including the load
and the dropped fraction (each routing group's dropped fraction is weighted
by its real tokens, so all-padding groups weigh nothing). The two views of
an example are drawn with a key folded from its position in the split, so
the figures do not depend on the batch size, the padding or the number of
processes. One effect of padding remains where capacity binds: padded
tokens that share a routing group with real ones compete with them for
expert slots (no drop is possible when capacity >= group size, e.g. the
default's evaluation capacity factor 4 with K=2 of E=4).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from vmoe_jsd import augment, losses, models, streams
from vmoe_jsd.config_errors import check_range, to_dict
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
    check_range('evaluate.limit', cfg.get('limit'), 1, integer=True,
                optional=True)  # fmt: skip
    images = int(cfg.get('routing_map_images', 0) or 0)
    return cls(every, cfg.get('limit'), images)


def eval_batches(dataset, batch_size: int, limit: int | None = None):
  """This process's evaluation batches (padded alike on every process)."""
  return dataset.eval_batches(
    batch_size,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    limit=limit,
  )


class StoppableSplit:
  """A test split whose `eval_batches` end early once should_stop() says so.

  Asked between batches (never before the first nor after the last: a
  request then is seen at the train step's own check, the evaluation
  complete). After a stop, `stopped` is True and every later `eval_batches`
  is empty: the figures of an evaluation over it are of the batches before
  the stop, for the caller to discard. On several processes should_stop
  must give the same answer on all (PreemptionGuard.should_stop does);
  their batch counts are equal (padded alike).

  Attributes:
    dataset: the split.
    stopped: whether should_stop ended an iteration.
  """

  def __init__(self, dataset, should_stop: Callable[[], bool]):
    self.dataset, self.should_stop, self.stopped = dataset, should_stop, False

  def eval_batches(self, *args, **kwargs) -> Iterator[dict]:
    for i, batch in enumerate(self.dataset.eval_batches(*args, **kwargs)):
      if self.stopped or (i and self.should_stop()):
        self.stopped = True
        return
      yield batch

  def __len__(self) -> int:
    return len(self.dataset)

  def __getattr__(self, name):
    return getattr(self.dataset, name)


class EvaluationStopped(Exception):
  """A stop request ended an evaluation between two batches."""


class RaisingSplit(StoppableSplit):
  """A StoppableSplit that raises EvaluationStopped where it would end
  early: for evaluations that read the split several times or on their own
  terms (few-shot, the robustness suites), whose partial figures the caller
  could not tell from complete ones. The same batch on every process."""

  def eval_batches(self, *args, **kwargs) -> Iterator[dict]:
    yield from super().eval_batches(*args, **kwargs)
    if self.stopped:
      raise EvaluationStopped


def sum_over_batches(
  step_fn: Callable[[np.int32, Mapping], Mapping[str, Array]],
  batches: Iterable[Mapping],
) -> dict[str, np.ndarray]:
  """Sums, in float64 on the host, the per-batch sums of `step_fn`.

  Args:
    step_fn: (batch index, host batch) -> {name: device sum}; it puts the
      batch on the devices itself.
    batches: host batches.

  Returns:
    {name: float64 total}.
  """
  totals: dict[str, np.ndarray] = {}
  for i, batch in enumerate(batches):
    sums = jax.device_get(step_fn(np.int32(i), batch))
    for k, v in sums.items():
      totals[k] = totals.get(k, 0) + np.asarray(v, np.float64)
  return totals


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


def group_real_tokens(mask: Array, num_groups: int) -> Array:
  """Real (unpadded) tokens of each routing group, (G,) float32.

  The model splits the batch's B * T tokens, in order, into G groups of
  S = B * T / G tokens (vit_moe.MlpMoeBlock): example b holds the flat
  positions [b * T, (b + 1) * T).

  Args:
    mask: (B,) bool, False for padding examples.
    num_groups: G; B * T must be a multiple of it.

  Returns:
    (G,) float32 w_g = (real tokens of group g) * G / T: proportional to the
    count, with a factor that is the same for every group and batch, so
    weighted means are exact. (Scaled by G / T, example b covers [b * G,
    (b + 1) * G) and group g covers [g * B, (g + 1) * B).)
  """
  # Repeat each example G times instead of T: the flat layout then has the
  # same proportions, and G rows of B entries are the groups.
  scaled = jnp.repeat(mask.astype(jnp.float32), num_groups)  # (B * G,)
  return jnp.sum(scaled.reshape(num_groups, -1), axis=1)


def router_logits(eval_model, params, views, layers) -> dict:
  """{block: (G, S, E) clean router logits} of (N, S, S, C) views in [0, 1]."""
  _, state = eval_model.apply(
    {'params': params}, augment.to_model_range(views), mutable=['intermediates']
  )
  return models.router_logits_by_layer(state['intermediates'], layers)


def apply_with_router_logits(eval_model, params, inputs, layers):
  """(logits (N, classes), {block: (G, S, E) router logits}) of model inputs
  (N, S, S, C) in [-1, 1], from one forward pass (robustness, attacks)."""
  (logits, _), state = eval_model.apply(
    {'params': params}, inputs, mutable=['intermediates']
  )
  return logits, models.router_logits_by_layer(state['intermediates'], layers)


def router_logits_of_views(eval_model, params, views, layers) -> dict:
  """Router logits per MoE layer for paired views.

  Args:
    eval_model: the deterministic model.
    params: its parameters.
    views: (n, 2, H, W, C) views in [0, 1] (augment.paired_views).
    layers: the MoE block indices to read.

  Returns:
    {block: logits} for the 2n images in view-major-within-image order
    (image 0 view 1, image 0 view 2, image 1 view 1, ...).
  """
  flat = views.reshape(-1, *views.shape[2:])
  return router_logits(eval_model, params, flat, layers)


def evaluation_views(views_key, images, index, mask, settings):
  """The two random views of each example, keyed by its position in the
  split (padding: position 0), and their patch maps."""
  keys = streams.example_keys(views_key, jnp.where(mask, index, 0))
  return jax.vmap(lambda k, im: augment.paired_views(k, im, settings))(
    keys, images
  )


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
      views, maps = evaluation_views(views_key, images, index, mask, settings)
      by_layer = router_logits_of_views(eval_model, params, views, layers)
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
  real = group_real_tokens(mask, dropped.shape[0])
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
  totals = sum_over_batches(
    lambda _, b: eval_step_fn(params, *put_batch(*(b[f] for f in fields))),
    eval_batches(dataset, batch_size, limit),
  )
  result = {'accuracy': float(totals['correct'] / max(totals['count'], 1)),
            'num_examples': int(totals['count'])}  # fmt: skip
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

r"""Adversarial attacks on the evaluation model: PGD and a routing attack.

**PGD** (Madry et al., "Towards Deep Learning Models Resistant to Adversarial
Attacks", ICLR 2018), L-infinity, on the classification loss, as vmoe's
`projects/adversarial_attacks` runs it for Puigcerver et al., "On the
Adversarial Robustness of Mixture of Experts", NeurIPS 2022: from the clean
input x_0 (model range [-1, 1], vmoe's `value_range(-1, 1)`),

  x_{t+1} = Proj(x_t + alpha * sign(grad_x L(f(x_t), y))),   t < T,
  Proj(x) = clip(clip(x, x_0 - eps, x_0 + eps), -1, 1),

with vmoe's defaults T = 40 steps, eps = 1 / 127.5 (one grey level of 8-bit
images on the [-1, 1] scale) and alpha = eps / T, no random start. With those
steps the iterate never leaves the ball, so the projection only matters for
other step sizes or a random start. vmoe does not clip to the pixel range;
`clip=False` reproduces that. L is the run's classification loss
(losses.CLASSIFICATION_LOSSES), summed over the batch (the sign of each
pixel's gradient does not depend on the batch reduction).

**Routing attack.** The same budget and steps, ascending the routers'
divergence from their clean outputs instead of the loss:

  R(x) = sum_layers sum_tokens D(softmax(r_l(x_0)) || softmax(r_l(x)))

with D the KL divergence (or the Jensen-Shannon divergence, losses.py) of
the router softmax over every token, class token included. R and its
gradient are zero at x_0, so this attack starts from a point drawn uniformly
in the eps-ball (one key per example, folded from its position in the
split).

**What is reported** (docs/robustness.md gives the schema): adversarial
accuracy, loss and prediction changes, and per MoE layer vmoe's
routing_changes (1 - mean IoU of the selected-expert sets before and after,
a token with both sets empty counting IoU 0, as vmoe's
`sum_intersection_over_union`), the top-1 flip rate and the router KL.
The selected sets are recomputed from the sown router logits with the
evaluation router's K, capacity and priority (`selected_experts`, the rule
of moe.make_top_k_dispatcher); for expert-choice and Soft MoE routers
routing_changes is left out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from vmoe_jsd import augment, losses, models, streams
from vmoe_jsd.config_errors import (
  check_choice,
  check_keys,
  check_limit,
  check_range,
  check_subset,
  to_dict,
)
from vmoe_jsd.evaluation import core, serving
from vmoe_jsd.models import moe as moe_lib
from vmoe_jsd.models.spec import DEFAULT_ROUTER, ModelSpec

Array = jax.Array

ATTACKS = ('pgd', 'routing')
DIVERGENCES = ('kl', 'jsd')
# The stream of the routing attack's random start: fold_in(key(seed), 5),
# after corruptions.CORRUPTION_STREAM (may move into streams.STREAMS).
ATTACK_STREAM = 5
PIXEL_RANGE = (-1.0, 1.0)


def attack_key(seed: int) -> Array:
  return jax.random.fold_in(jax.random.key(seed), ATTACK_STREAM)


# ----------------------------------------------------------------------------
# The attack itself: pure functions of arrays.
# ----------------------------------------------------------------------------
def project(x: Array, x0: Array, epsilon: float, bounds=PIXEL_RANGE) -> Array:
  """Nearest point of the L-inf ball of radius epsilon about x0 (inside
  `bounds` (lo, hi) too, or unbounded when None)."""
  x = jnp.clip(x, x0 - epsilon, x0 + epsilon)
  return x if bounds is None else jnp.clip(x, *bounds)


def pgd(
  objective: Callable[[Array], Array],
  x0: Array,
  *,
  epsilon: float,
  num_steps: int,
  step_size: float,
  bounds=PIXEL_RANGE,
  start: Array | None = None,
) -> Array:
  """Signed-gradient ascent of `objective` in the L-inf ball about x0.

  Args:
    objective: x -> scalar to maximise.
    x0: the clean inputs.
    epsilon: the ball's radius.
    num_steps: T.
    step_size: alpha.
    bounds: (lo, hi) of valid inputs, or None.
    start: the first iterate (projected), or None for x0.

  Returns:
    x_T.
  """
  grad_fn = jax.grad(objective)

  def update(_, x):
    return project(x + step_size * jnp.sign(grad_fn(x)), x0, epsilon, bounds)

  x = x0 if start is None else project(start, x0, epsilon, bounds)
  return jax.lax.fori_loop(0, num_steps, update, x)


def intersection_over_union(a: Array, b: Array) -> Array:
  """IoU of two sets given as (..., E) bool; 0 where both are empty."""
  inter = jnp.sum(a & b, axis=-1)
  union = jnp.sum(a | b, axis=-1)
  return jnp.where(union > 0, inter / jnp.maximum(union, 1), 0.0)


def selected_experts(
  logits: Array, num_selected_experts: int, capacity: int, batch_priority: bool
) -> Array:
  """(G, S, E) bool: the experts each token is dispatched to (top-K of the
  router softmax, minus the choices over `capacity`), as in
  moe.make_top_k_dispatcher."""
  gates = jax.nn.softmax(logits.astype(jnp.float32)).astype(logits.dtype)
  _, expert, slot = jax.vmap(
    lambda g: moe_lib.top_experts_per_item(
      g, num_selected_experts, batch_priority
    )
  )(gates)
  chosen = jax.nn.one_hot(expert, logits.shape[-1], dtype=jnp.bool_)
  return jnp.any(chosen & (slot < capacity)[..., None], axis=-2)


def kl_divergence(log_p: Array, log_q: Array) -> Array:
  """KL(p || q) over the last axis, from log-probabilities (nats)."""
  return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


DIVERGENCE_FNS = {'kl': kl_divergence, 'jsd': losses.jensen_shannon}


# ----------------------------------------------------------------------------
# Per-batch sums.
# ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RoutingRule:
  """How the evaluation model dispatches (for the selected-expert sets).

  Attributes:
    num_selected_experts: K (None: not a top-K router, no routing_changes).
    capacity: C per group.
    batch_priority: BPR order.
    num_prefix_tokens: 1 with a class token.
  """

  num_selected_experts: int | None
  capacity: int
  batch_priority: bool
  num_prefix_tokens: int

  @classmethod
  def of(cls, model: ModelSpec, capacity: int) -> RoutingRule:
    router = model.eval_config['encoder'].get('moe', {}).get('router') or {}
    top_k = router.get('name', DEFAULT_ROUTER) == DEFAULT_ROUTER
    dispatcher = router.get('dispatcher') or {}
    return cls(
      int(router.get('num_selected_experts', 1)) if top_k else None,
      capacity,
      bool(dispatcher.get('batch_priority', False)),
      model.num_prefix_tokens,
    )


def outcome_sums(
  name: str,
  clean: tuple[Array, Mapping[str, Array]],
  attacked: tuple[Array, Mapping[str, Array]],
  labels: Array,
  mask: Array,
  loss_fn: Callable,
  rule: RoutingRule,
) -> dict[str, Array]:
  """Sums of one attack's figures (module docstring) for one batch.

  Args:
    name: the attack ('pgd', 'routing').
    clean: (logits (B, classes), {layer: (G, S, E) router logits}) at x0.
    attacked: the same at the attacked inputs.
    labels: (B,).
    mask: (B,) bool.
    loss_fn: (logits, labels) -> (B,) loss.
    rule: the routing rule.
  """
  logits0, routers0 = clean
  logits, routers = attacked
  batch = logits.shape[0]
  pred0, pred = jnp.argmax(logits0, -1), jnp.argmax(logits, -1)
  out = {
    f'{name}/correct': jnp.sum((pred == labels) & mask),
    f'{name}/loss': jnp.sum(jnp.where(mask, loss_fn(logits, labels), 0.0)),
    f'{name}/changed': jnp.sum((pred != pred0) & mask),
  }
  for layer, lg in routers.items():
    lg0 = models.per_image_patches(routers0[layer], batch, 0)  # (B, T, E)
    lg1 = models.per_image_patches(lg, batch, 0)
    kl = kl_divergence(
      jax.nn.log_softmax(lg0.astype(jnp.float32)),
      jax.nn.log_softmax(lg1.astype(jnp.float32)),
    )
    out[f'{name}/{layer}/kl'] = jnp.sum(jnp.where(mask[:, None], kl, 0.0))
    out[f'{name}/{layer}/tokens'] = jnp.sum(mask) * lg0.shape[1]
    prefix = rule.num_prefix_tokens
    flips = jnp.argmax(lg0[:, prefix:], -1) != jnp.argmax(lg1[:, prefix:], -1)
    out[f'{name}/{layer}/flips'] = jnp.sum(flips & mask[:, None])
    out[f'{name}/{layer}/pairs'] = jnp.sum(mask) * flips.shape[1]
    if rule.num_selected_experts is not None:
      sets = [
        models.per_image_patches(
          selected_experts(
            r, rule.num_selected_experts, rule.capacity, rule.batch_priority
          ),
          batch,
          0,
        )
        for r in (routers0[layer], lg)
      ]
      iou = jnp.mean(intersection_over_union(*sets), axis=1)  # (B,)
      out[f'{name}/{layer}/iou'] = jnp.sum(jnp.where(mask, iou, 0.0))
  return out


def routing_objective(routers0, routers, mask, divergence: str) -> Array:
  """R(x): summed divergence of the router softmax from the clean one."""
  div = DIVERGENCE_FNS[divergence]
  total = 0.0
  for layer, lg in routers.items():
    batch = mask.shape[0]
    p0 = jax.lax.stop_gradient(
      jax.nn.log_softmax(
        models.per_image_patches(routers0[layer], batch, 0).astype(jnp.float32)
      )
    )
    p = jax.nn.log_softmax(
      models.per_image_patches(lg, batch, 0).astype(jnp.float32)
    )
    total = total + jnp.sum(jnp.where(mask[:, None], div(p0, p), 0.0))
  return total


def make_attack_step(
  eval_model, model: ModelSpec, settings, spec, loss_name, key, capacity: int
):
  """(params, images, labels, mask, index) -> sums of every attack.

  Args:
    eval_model: the deterministic evaluation model.
    model: its spec.
    settings: augment.ViewSettings (the deterministic view).
    spec: AttackSpec.
    loss_name: the classification loss to ascend.
    key: `attack_key(seed)`; each example folds its position in.
    capacity: C per group of the evaluation model.
  """
  layers = model.moe_layers
  loss_fn = losses.get_classification_loss(loss_name)
  rule = RoutingRule.of(model, capacity)
  bounds = PIXEL_RANGE if spec.clip else None
  budget = dict(
    epsilon=spec.epsilon,
    num_steps=spec.num_steps,
    step_size=spec.step_size,
    bounds=bounds,
  )

  def step(params, images, labels, mask, index):
    def forward(x):
      logits, routers = core.apply_with_router_logits(
        eval_model, params, x, layers
      )
      return logits, {f'encoderblock_{b}': v for b, v in routers.items()}

    center = jax.vmap(lambda im: augment.center_view(im, settings))(images)
    x0 = augment.to_model_range(center)

    def total_loss(logits):
      return jnp.sum(jnp.where(mask, loss_fn(logits, labels), 0.0))

    clean = forward(x0)
    correct = (jnp.argmax(clean[0], -1) == labels) & mask
    sums = {
      'count': jnp.sum(mask),
      'clean/correct': jnp.sum(correct),
      'clean/loss': total_loss(clean[0]),
    }
    if 'pgd' in spec.attacks:
      start = None
      if spec.random_start:
        start = _random_start(key, index, mask, x0, spec.epsilon)
      x = pgd(lambda z: total_loss(forward(z)[0]), x0, start=start, **budget)
      sums.update(
        outcome_sums('pgd', clean, forward(x), labels, mask, loss_fn, rule)
      )
    if 'routing' in spec.attacks and layers:
      start = _random_start(
        jax.random.fold_in(key, 1), index, mask, x0, spec.epsilon
      )
      x = pgd(
        lambda z: routing_objective(
          clean[1], forward(z)[1], mask, spec.divergence
        ),
        x0,
        start=start,
        **budget,
      )
      sums.update(
        outcome_sums('routing', clean, forward(x), labels, mask, loss_fn, rule)
      )
    return sums

  return step


def _random_start(key, index, mask, x0, epsilon):
  keys = streams.example_keys(key, jnp.where(mask, index, 0))
  noise = jax.vmap(
    lambda k: jax.random.uniform(k, x0.shape[1:], minval=-1.0, maxval=1.0)
  )(keys)
  return x0 + epsilon * noise


# ----------------------------------------------------------------------------
# Over the test set.
# ----------------------------------------------------------------------------
def summarize_attacks(totals: Mapping[str, Any], spec) -> dict:
  """The suite's JSON (docs/robustness.md) from the summed sums."""
  count = float(totals['count'])
  clean_acc = core.ratio(totals['clean/correct'], count)
  out: dict[str, Any] = {
    'num_examples': int(count),
    'settings': spec.settings(),
    'clean': {
      'accuracy': clean_acc,
      'loss': core.ratio(totals['clean/loss'], count),
    },
  }
  for name in spec.attacks:
    if f'{name}/correct' not in totals:
      continue
    acc = core.ratio(totals[f'{name}/correct'], count)
    layers = sorted(
      k.split('/')[1]
      for k in totals
      if k.startswith(f'{name}/') and k.endswith('/flips')
    )
    res = {
      'accuracy': acc,
      'accuracy_drop': None if acc is None else clean_acc - acc,
      'loss': core.ratio(totals[f'{name}/loss'], count),
      'prediction_changes': core.ratio(totals[f'{name}/changed'], count),
      'flip_rate': {
        layer: core.ratio(
          totals[f'{name}/{layer}/flips'], totals[f'{name}/{layer}/pairs']
        )
        for layer in layers
      },
      'router_kl': {
        layer: core.ratio(
          totals[f'{name}/{layer}/kl'], totals[f'{name}/{layer}/tokens']
        )
        for layer in layers
      },
    }
    if all(f'{name}/{layer}/iou' in totals for layer in layers):
      res['routing_changes'] = {
        layer: 1.0 - core.ratio(totals[f'{name}/{layer}/iou'], count)
        if count
        else None
        for layer in layers
      }
    out[name] = res
  return out


def run_attacks(step_fn, params, dataset, batch_size, spec, put_batch) -> dict:
  """Every attack of `spec` over the first `spec.limit` test images."""
  fields = ('image', 'label', 'mask', 'index')
  totals = core.sum_over_batches(
    lambda _, b: step_fn(params, *put_batch(*(b[f] for f in fields))),
    core.eval_batches(dataset, batch_size, spec.limit),
  )
  return summarize_attacks(totals, spec)


@dataclasses.dataclass(frozen=True)
class AttackSpec:
  """config.evaluate.robustness.attack.

  Attributes:
    attacks: a subset of ATTACKS.
    limit: at most this many test images (None: all; never more than
      config.evaluate.limit).
    epsilon: L-inf radius on the model's [-1, 1] pixel scale (vmoe: 1/127.5).
    num_steps: steps T (vmoe: 40).
    step_size: alpha (the config's None: epsilon / num_steps, vmoe's).
    clip: keep inputs in [-1, 1] (vmoe does not).
    random_start: PGD starts uniformly in the ball (vmoe: no); the routing
      attack always does.
    divergence: the routing attack's D, one of DIVERGENCES.
  """

  attacks: tuple[str, ...] = ATTACKS
  limit: int | None = 1200
  epsilon: float = 1 / 127.5
  num_steps: int = 40
  step_size: float = 1 / 127.5 / 40
  clip: bool = True
  random_start: bool = False
  divergence: str = 'kl'

  @classmethod
  def from_config(cls, cfg, eval_limit=None) -> AttackSpec:
    cfg = to_dict(cfg)
    key = 'evaluate.robustness.attack'
    check_keys(key, cfg, [f.name for f in dataclasses.fields(cls)])
    chosen = check_subset(
      f'{key}.attacks', cfg.get('attacks', ATTACKS), ATTACKS
    )
    limit = check_limit(f'{key}.limit', cfg.get('limit', 1200), eval_limit)
    eps = cfg.get('epsilon', 1 / 127.5)
    check_range(f'{key}.epsilon', eps, 0, low_open=True)
    steps = cfg.get('num_steps', 40)
    check_range(f'{key}.num_steps', steps, 1, integer=True)
    step_size = cfg.get('step_size')
    check_range(f'{key}.step_size', step_size, 0, low_open=True, optional=True)
    divergence = cfg.get('divergence', 'kl')
    check_choice(f'{key}.divergence', divergence, list(DIVERGENCES))
    return cls(
      attacks=chosen,
      limit=limit,
      epsilon=float(eps),
      num_steps=steps,
      step_size=float(eps / steps if step_size is None else step_size),
      clip=bool(cfg.get('clip', True)),
      random_start=bool(cfg.get('random_start', False)),
      divergence=divergence,
    )

  def settings(self) -> dict[str, Any]:
    """The settings as written to the JSON."""
    out = dataclasses.asdict(self)
    out['attacks'] = list(self.attacks)
    out['pixel_range'] = list(PIXEL_RANGE)
    return out


def format_attacks(result: Mapping) -> str:
  """The attacks' accuracy table, then their routing per layer, each under
  a header; the first line gives the images behind every figure."""
  n = result['num_examples']
  rows = [
    f'{n} test images; clean accuracy on them '
    f'{core.dash(result["clean"]["accuracy"], ".4f")}',
    f'{"attack":<8}{"accuracy":>9}{"drop":>9}{"pred changes":>14}',
  ]
  routing = [
    f'{"attack":<8}{"layer":<16}{"routing changes":>16}{"flips":>7}'
    f'{"router kl":>10}'
  ]
  for name in ATTACKS:
    r = result.get(name)
    if r is None:
      continue
    rows.append(
      f'{name:<8}{core.dash(r["accuracy"], ".4f"):>9}'
      f'{core.dash(r["accuracy_drop"], ".4f"):>9}'
      f'{core.dash(r["prediction_changes"]):>14}'
    )
    routing += [
      f'{name:<8}{layer:<16}'
      f'{core.dash(r.get("routing_changes", {}).get(layer)):>16}'
      f'{core.dash(r["flip_rate"][layer]):>7}'
      f'{core.dash(r["router_kl"][layer], ".4f"):>10}'
      for layer in r['flip_rate']
    ]
  return '\n'.join(rows + (routing if len(routing) > 1 else []))


def build(ctx):
  """The registry's run: PGD and the routing attack."""
  spec, model = ctx.spec, ctx.spec.model
  capacity = serving.group_capacity(model) if model.moe_layers else 1
  key = attack_key(spec.seed)
  return ctx.batched(
    make_attack_step,
    run_attacks,
    spec.robustness.attack,
    spec.step.loss,
    key,
    capacity,
  )

r"""The serving suite ('cheap'): what accuracy and routing keep when the
trained model is served more cheaply.

The trained model served at K=1 and at
lower capacity factors, each variant the evaluation model with its router's
`num_selected_experts` and `dispatcher.capacity_factor` replaced, on the
deterministic view: accuracy, `dropped` (the share of the K * S token-expert
assignments of a group that did not fit in the capacity, as core.py
reports it), `dropped_tokens` (tokens that lost every choice), the capacity C
of a group (moe.compute_capacity) and the expert FLOPs relative to the
default evaluation, two ways: `expert_flops` = C / C_default (the experts
run on E x C buffer slots per group whether the slots are filled or not, so
this is what the dispatchers here compute) and `expert_flops_assigned` =
K (1 - dropped) / (K_default (1 - dropped_default)) (what a dropless,
exactly sized implementation would compute).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from vmoe_jsd import augment
from vmoe_jsd.config_errors import reject
from vmoe_jsd.evaluation import core
from vmoe_jsd.models import moe as moe_lib
from vmoe_jsd.models.spec import DEFAULT_ROUTER, ModelSpec, deep_update

DEFAULT_CAPACITY_FACTORS = (0.5, 0.75, 1.0, 1.25)
DEFAULT_EXTRA_K = (1,)


def _router(eval_config: Mapping) -> Mapping:
  return eval_config['encoder']['moe'].get('router') or {}


def serving_point(model: ModelSpec) -> tuple[int, float | None, int | None]:
  """(K, capacity_factor, capacity) of the evaluation model's router."""
  router = _router(model.eval_config)
  dispatcher = router.get('dispatcher') or {}
  k = int(router.get('num_selected_experts', 1))
  return k, dispatcher.get('capacity_factor'), dispatcher.get('capacity')


def variant_spec(model: ModelSpec, k: int, capacity_factor: float) -> ModelSpec:
  """The model spec whose evaluation model routes to K experts with this
  capacity factor (a fixed `capacity`, if set, is replaced)."""
  router = {
    'num_selected_experts': k,
    'dispatcher': {'capacity_factor': capacity_factor},
  }
  override = {'encoder': {'moe': {'router': router}}}
  cfg = deep_update(model.eval_config, override)
  cfg['encoder']['moe']['router']['dispatcher'].pop('capacity', None)
  return dataclasses.replace(model, eval_config=cfg)


def group_capacity(model: ModelSpec) -> int:
  """C, the buffer slots per expert and group of the evaluation model."""
  moe = model.eval_config['encoder']['moe']
  k, cf, capacity = serving_point(model)
  if capacity is not None:
    return int(capacity)
  dispatcher = _router(model.eval_config).get('dispatcher') or {}
  return moe_lib.compute_capacity(
    moe['group_size'] * k,
    moe['num_experts'],
    cf,
    dispatcher.get('capacity_ceil_or_round', 'ceil'),
    dispatcher.get('capacity_multiple_of', 4),
  )


def serving_variants(model: ModelSpec, capacity_factors, extra_k):
  """[(name, K, capacity_factor)]: the default first, then every K in
  (default, *extra_k) x capacity factor in (default, *capacity_factors)."""
  k0, cf0, _ = serving_point(model)
  ks = [k0] + [k for k in extra_k if k != k0]
  cfs = [cf0] + [c for c in capacity_factors if c != cf0]
  out = []
  for k in ks:
    for cf in cfs:
      name = 'default' if (k, cf) == (k0, cf0) else f'k{k}_cf{cf:g}'
      out.append((name, k, cf))
  return out


def make_serving_step(eval_model, model: ModelSpec, settings):
  """(params, images, labels, mask) -> accuracy and dropped sums per layer."""
  layers = model.moe_layers

  def step(params, images, labels, mask):
    center = jax.vmap(lambda im: augment.center_view(im, settings))(images)
    logits, metrics = eval_model.apply(
      {'params': params}, augment.to_model_range(center)
    )
    sums = {
      'correct': jnp.sum((jnp.argmax(logits, -1) == labels) & mask),
      'count': jnp.sum(mask),
    }
    for b in layers:
      m = metrics[f'encoderblock_{b}']
      real = core.group_real_tokens(mask, m['dropped_fraction'].shape[0])
      sums[f'encoderblock_{b}/dropped'] = jnp.sum(m['dropped_fraction'] * real)
      sums[f'encoderblock_{b}/dropped_tokens'] = jnp.sum(
        m['dropped_tokens'] * real
      )
      sums[f'encoderblock_{b}/weight'] = jnp.sum(real)
    return sums

  return step


def check_serving(model: ModelSpec) -> None:
  """The cheap suite needs the top-K router (K and capacity factor)."""
  if not model.moe_layers:
    reject(
      'model.encoder.moe.layers',
      model.moe_layers,
      "the 'cheap' suite varies K and capacity: needs MoE layers",
    )
  name = _router(model.eval_config).get('name', DEFAULT_ROUTER)
  if name != DEFAULT_ROUTER:
    reject(
      'model.encoder.moe.router.name',
      name,
      f"the 'cheap' suite varies K and capacity: needs {DEFAULT_ROUTER}",
    )


def run_cheap(model, settings, params, dataset, batch_size, spec, put_batch):
  """The cheaper-inference table (module docstring), one jitted evaluation
  per variant over the first `spec.limit` test images."""
  rows = []
  for name, k, cf in serving_variants(
    model, spec.capacity_factors, spec.extra_k
  ):
    variant = variant_spec(model, k, cf)
    step = jax.jit(make_serving_step(variant.build_eval(), variant, settings))
    totals = core.sum_over_batches(
      lambda _, b, step=step: step(
        params, *put_batch(b['image'], b['label'], b['mask'])
      ),
      core.eval_batches(dataset, batch_size, spec.limit),
    )
    rows.append(
      _serving_row(
        name, k, cf, group_capacity(variant), totals, model.moe_layers
      )
    )
  return _relative_rows(rows)


def _serving_row(name, k, cf, capacity, totals, layers) -> dict:
  row = {
    'name': name,
    'num_selected_experts': k,
    'capacity_factor': cf,
    'capacity': capacity,
    'accuracy': core.ratio(totals['correct'], totals['count']),
    'num_examples': int(totals['count']),
  }
  for key in ('dropped', 'dropped_tokens'):
    row[key] = {
      f'encoderblock_{b}': core.ratio(
        totals[f'encoderblock_{b}/{key}'], totals[f'encoderblock_{b}/weight']
      )
      for b in layers
    }
  return row


def _relative_rows(rows: list[dict]) -> dict:
  """Adds accuracy_drop and the two expert-FLOP ratios against row 0."""
  base = rows[0]

  def assigned(row):
    kept = [1.0 - d for d in row['dropped'].values()]
    return row['num_selected_experts'] * (float(np.mean(kept)) if kept else 1.0)

  for row in rows:
    row['accuracy_drop'] = base['accuracy'] - row['accuracy']
    row['expert_flops'] = row['capacity'] / base['capacity']
    row['expert_flops_assigned'] = assigned(row) / assigned(base)
  return {
    'default': {
      k: base[k]
      for k in ('num_selected_experts', 'capacity_factor', 'capacity')
    },
    'rows': rows,
  }


def format_cheap(result: Mapping) -> str:
  """One row per serving variant under a header naming every column; the
  first line gives the images behind every figure."""
  first = result['rows'][0]
  layers = ' '.join(b[-7:] for b in first['dropped'])
  rows = [
    f'{first["num_examples"]} test images; acc: accuracy on them, drop: '
    'against the default row; flops / assign: the expert FLOPs of the '
    'capacity / of the assigned tokens, relative to the default',
    f'{"variant":<12}{"K":>3}{"cf":>6}{"C":>6}{"acc":>8}{"drop":>8}'
    f'{"flops":>7}{"assign":>7}  dropped {layers}',
  ]
  for r in result['rows']:
    dropped = ' '.join(core.dash(d).rjust(7) for d in r['dropped'].values())
    rows.append(
      f'{r["name"]:<12}{r["num_selected_experts"]:>3}'
      f'{r["capacity_factor"]:>6g}{r["capacity"]:>6}'
      f'{core.dash(r["accuracy"], ".4f"):>8}'
      f'{core.dash(r["accuracy_drop"], ".4f"):>8}'
      f'{r["expert_flops"]:>7.3f}{r["expert_flops_assigned"]:>7.3f}  '
      f'{"":<8}{dropped}'
    )
  return '\n'.join(rows)


def build(ctx):
  """The registry's run: the cheaper-inference table."""
  spec = ctx.spec
  check_serving(spec.model)

  def run(params, split, should_stop):
    del should_stop  # split raises on a stop.
    return run_cheap(
      spec.model,
      spec.views,
      params,
      split,
      ctx.batch_size,
      spec.robustness,
      ctx.put_batch,
    )

  return run

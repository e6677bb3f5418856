r"""Corruption robustness and cheaper routing: what accuracy and routing keep.

**Corruption suite.** Common corruptions after Hendrycks and Dietterich,
"Benchmarking Neural Network Robustness to Common Corruptions and
Perturbations", ICLR 2019 (ImageNet-C; its CIFAR-10-C variant for 32-px
images, `make_cifar_c.py` of github.com/hendrycks/robustness), with the
geometric ones of their ImageNet-P and of MNIST-C (Mu and Gilmer, 2019), and
an occluding square after Cutout (DeVries and Taylor, arXiv:1708.04552). Every
corruption is applied to the deterministic evaluation view (the whole image
resized to S x S, pixels in [0, 1], `augment.center_view`); the geometric ones
re-render that view from the source image. The table, one row per family
(severities 1..n from left to right):

  family          severities                 unit, after
  --------------  -------------------------  ----------------------------------
  gaussian_noise  .04 .06 .08 .09 .10        std of N(0, s^2) added per pixel,
                                             clipped to [0, 1] (CIFAR-10-C)
  gaussian_blur   .4 .6 .7 .8 1.0            sigma in view pixels; truncated
                                             at 4 sigma, edge pixels repeated
                                             (CIFAR-10-C, skimage's gaussian)
  contrast        .75 .5 .4 .3 .15           (x - mean) * c + mean, mean per
                                             image and channel (CIFAR-10-C)
  brightness      .05 .1 .15 .2 .3           HSV value + c, clipped to 1;
                                             hue and saturation kept, so grey
                                             images get min(x + c, 1)
                                             (CIFAR-10-C)
  rotation        5 10 15 20 30              degrees about the view centre,
                                             sign drawn per image (ImageNet-P
                                             rotate, MNIST-C rotate)
  shift           1 2 3 4                    pixels on both axes, each sign
                                             drawn per image (ImageNet-P
                                             translate, MNIST-C translate)
  occlusion       .2 .3 .4 .5                side of a mid-grey (0.5) square
                                             as a fraction of S, placed
                                             uniformly per image (Cutout)

Pixels that a rotation or shift brings in from outside the image take
`settings.fill_value`. Random draws (noise, signs, positions) come from one
key per test example, folded from its position in the split and then from
the corruption's index, so the figures do not depend on the batch size or
padding and repeat exactly.

Per family and severity the suite reports the accuracy and, per MoE layer,
the top-1 flip rate of the patch tokens against the clean view:

  flips = #{compared patches whose top-1 expert differs} / #{compared}

Which patches are compared (`maps`): photometric corruptions and occlusion
keep the grid, so patch i is compared with patch i. A shift is compared with
exact, analytic correspondence (`augment.patch_index_map`, as
`stability.py` does): shifted patch i with the clean patch holding the image
point at its centre; patches whose centre leaves the image are not counted.
A rotation has no exact patch correspondence; it uses the same centre rule
and counts a pair only when the rotated patch's centre lands within 3/7 of
a patch side (on both axes, `ROTATION_TOLERANCE`) of its partner's centre:
no worse aligned than the worst pair the shift family compares (a 3-pixel
offset on both axes at p = 7). At the larger angles patches far from the
centre drop out (the `pairs` count of every cell says how many are left).

Summaries: `mean_accuracy`, the mean over families of the mean over a
family's severities (ImageNet-C's averaging), and `accuracy_drop` = clean
accuracy - mean_accuracy; `mean_flip_rate` per layer, averaged the same way.

**Cheaper inference (suite 'cheap').** The trained model served at K=1 and at
lower capacity factors, each variant the evaluation model with its router's
`num_selected_experts` and `dispatcher.capacity_factor` replaced, on the
deterministic view: accuracy, `dropped` (the share of the K * S token-expert
assignments of a group that did not fit in the capacity, as evaluate.py
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
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vmoe_jsd import attacks, augment, evaluate, models, stability, streams
from vmoe_jsd.config_errors import check_range, fail, to_dict
from vmoe_jsd.models import moe as moe_lib
from vmoe_jsd.models.spec import DEFAULT_ROUTER, ModelSpec, deep_update

Array = jax.Array

SUITES = ('corruptions', 'attacks', 'cheap')
# The stream of the corruption draws: jax.random.fold_in(key(seed), 4), the
# next number after streams.STREAMS (it may move there as 'corruptions': 4
# without changing a number).
CORRUPTION_STREAM = 4
ROTATION_TOLERANCE = 3 / 7  # of the patch size, per axis
OCCLUSION_FILL = 0.5
DEFAULT_CAPACITY_FACTORS = (0.5, 0.75, 1.0, 1.25)
DEFAULT_EXTRA_K = (1,)


# ----------------------------------------------------------------------------
# The corruptions: one function per family, on one image.
# (source (H, W, C), clean view (S, S, C), key, severity, settings)
#   -> (corrupted view (S, S, C) in [0, 1], patch map (P,) int32)
# ----------------------------------------------------------------------------
def _identity_map(settings) -> Array:
  return jnp.arange(
    (settings.size // settings.patch_size) ** 2, dtype=jnp.int32
  )


def gaussian_noise(source, clean, key, std, settings):
  del source
  noisy = clean + std * jax.random.normal(key, clean.shape)
  return jnp.clip(noisy, 0.0, 1.0), _identity_map(settings)


def gaussian_kernel(sigma: float) -> np.ndarray:
  """Normalised 1-D Gaussian, radius int(4 sigma + 0.5) (scipy's truncate=4)."""
  radius = int(4.0 * sigma + 0.5)
  t = np.arange(-radius, radius + 1, dtype=np.float64)
  k = np.exp(-0.5 * (t / sigma) ** 2)
  return (k / k.sum()).astype(np.float32)


def gaussian_blur(source, clean, key, sigma, settings):
  del source, key
  kernel = gaussian_kernel(sigma)
  radius, size = len(kernel) // 2, clean.shape[0]
  padded = jnp.pad(clean, ((radius, radius), (radius, radius), (0, 0)),
                   mode='edge')  # fmt: skip
  rows = sum(w * padded[i : i + size] for i, w in enumerate(kernel))
  out = sum(w * rows[:, j : j + size] for j, w in enumerate(kernel))
  return jnp.clip(out, 0.0, 1.0), _identity_map(settings)


def contrast(source, clean, key, factor, settings):
  del source, key
  mean = jnp.mean(clean, axis=(0, 1), keepdims=True)
  out = (clean - mean) * factor + mean
  return jnp.clip(out, 0.0, 1.0), _identity_map(settings)


def brightness(source, clean, key, delta, settings):
  """HSV value + delta: value = max over channels; hue and saturation are
  kept, which scales every channel by the new value / the old value."""
  del source, key
  value = jnp.max(clean, axis=-1, keepdims=True)
  new_value = jnp.minimum(value + delta, 1.0)
  safe = jnp.where(value > 0, value, 1.0)
  out = jnp.where(value > 0, clean * new_value / safe, new_value)
  return jnp.clip(out, 0.0, 1.0), _identity_map(settings)


def occlusion(source, clean, key, fraction, settings):
  del source
  size = clean.shape[0]
  side = max(1, int(round(fraction * size)))
  y0, x0 = jax.random.randint(key, (2,), 0, size - side + 1)
  yy = jnp.arange(size)[:, None]
  xx = jnp.arange(size)[None, :]
  inside = (yy >= y0) & (yy < y0 + side) & (xx >= x0) & (xx < x0 + side)
  out = jnp.where(inside[..., None], OCCLUSION_FILL, clean)
  return out, _identity_map(settings)


def _base_affine(source, size):
  src_h, src_w = source.shape[:2]
  return augment.scaling(src_h / size, src_w / size)


def _signs(key, n):
  return jnp.where(jax.random.bernoulli(key, 0.5, (n,)), 1.0, -1.0)


def shift(source, clean, key, pixels, settings):
  del clean
  size, patch = settings.size, settings.patch_size
  base = _base_affine(source, size)
  dy, dx = pixels * _signs(key, 2)
  affine = base @ augment.translation(dy, dx)
  view = augment.render_view(source, affine, size, settings.fill_value)
  index = augment.patch_index_map(affine, base, size, patch,
                                  tuple(source.shape[:2]))  # fmt: skip
  return view, index


def rotation_map(affine, base, size, patch, source_hw, tolerance):
  """Centre-rule partners (patch_index_map) of a rotated view, kept only
  where the rotated patch's centre lands within tolerance * patch of its
  partner's centre on both axes; -1 elsewhere."""
  index = augment.patch_index_map(affine, base, size, patch, source_hw)
  grid = size // patch
  centres = (jnp.arange(grid, dtype=jnp.float32) + 0.5) * patch
  a_y, a_x = jnp.meshgrid(centres, centres, indexing='ij')
  src_y, src_x = augment.apply_affine(affine, a_y.ravel(), a_x.ravel())
  b_y, b_x = augment.apply_affine(augment.invert_affine(base), src_y, src_x)
  row, col = jnp.divmod(jnp.maximum(index, 0), grid)
  near = (jnp.abs(b_y - (row + 0.5) * patch) <= tolerance * patch) & (
    jnp.abs(b_x - (col + 0.5) * patch) <= tolerance * patch
  )
  return jnp.where(near, index, -1).astype(jnp.int32)


def rotation(source, clean, key, degrees, settings):
  del clean
  size, patch = settings.size, settings.patch_size
  base = _base_affine(source, size)
  angle = _signs(key, 1)[0] * math.radians(degrees)
  affine = base @ augment.rotation(angle, (size / 2, size / 2))
  view = augment.render_view(source, affine, size, settings.fill_value)
  index = rotation_map(affine, base, size, patch, tuple(source.shape[:2]),
                       ROTATION_TOLERANCE)  # fmt: skip
  return view, index


@dataclasses.dataclass(frozen=True)
class Family:
  """One row of the module docstring's table.

  Attributes:
    fn: the per-image function (see the banner above).
    severities: its parameter at severities 1..n.
    unit: what the parameter means.
  """

  fn: Callable
  severities: tuple[float, ...]
  unit: str


FAMILIES = {
  'gaussian_noise': Family(gaussian_noise, (0.04, 0.06, 0.08, 0.09, 0.10),
                           'std, pixels in [0, 1]'),
  'gaussian_blur': Family(gaussian_blur, (0.4, 0.6, 0.7, 0.8, 1.0),
                          'sigma, view pixels'),
  'contrast': Family(contrast, (0.75, 0.5, 0.4, 0.3, 0.15),
                     'factor on deviations from the mean'),
  'brightness': Family(brightness, (0.05, 0.1, 0.15, 0.2, 0.3),
                       'added to the HSV value'),
  'rotation': Family(rotation, (5, 10, 15, 20, 30), 'degrees, random sign'),
  'shift': Family(shift, (1, 2, 3, 4), 'pixels per axis, random signs'),
  'occlusion': Family(occlusion, (0.2, 0.3, 0.4, 0.5),
                      'square side / view side'),
}  # fmt: skip


def corruption_list(families: Sequence[str]) -> list[tuple[str, float]]:
  """(family, severity) of every corruption, in suite order."""
  return [(f, s) for f in families for s in FAMILIES[f].severities]


def corrupt_batch(
  index, images, clean, keys, settings, corruptions: Sequence[tuple[str, Any]]
) -> tuple[Array, Array]:
  """Corruption number `index` (traced) of a batch.

  Args:
    index: int32 scalar, an index into `corruptions`.
    images: (B, H, W, C) source images.
    clean: (B, S, S, C) their evaluation views.
    keys: (B,) one key per example; the corruption index is folded in.
    settings: augment.ViewSettings.
    corruptions: `corruption_list(...)`.

  Returns:
    views (B, S, S, C), maps (B, P) int32 (-1: not compared).
  """
  keys = jax.vmap(lambda k: jax.random.fold_in(k, index))(keys)

  def branch(name, severity, images, clean, keys):
    fn = FAMILIES[name].fn
    return jax.vmap(lambda s, c, k: fn(s, c, k, severity, settings))(
      images, clean, keys
    )

  branches = [functools.partial(branch, n, s) for n, s in corruptions]
  return jax.lax.switch(index, branches, images, clean, keys)


# ----------------------------------------------------------------------------
# Per-batch sums and the suite.
# ----------------------------------------------------------------------------
def corruption_sums(
  apply_fn: Callable[[Array], tuple[Array, Mapping[str, Array]]],
  images: Array,
  labels: Array,
  mask: Array,
  keys: Array,
  settings,
  corruptions: Sequence[tuple[str, Any]],
) -> dict[str, Array]:
  """Sums behind the suite's figures, for one batch.

  Args:
    apply_fn: views (N, S, S, C) in [0, 1] -> (logits (N, classes), {layer:
      (N, P) top-1 expert of each patch}).
    images: (B, H, W, C) source images.
    labels: (B,) int labels.
    mask: (B,) bool, False for padding.
    keys: (B,) per-example keys.
    settings: augment.ViewSettings.
    corruptions: `corruption_list(...)`, N_c entries.

  Returns:
    {'count', 'clean/correct'} scalars and (N_c,) arrays 'correct',
    '<layer>/flips', '<layer>/pairs'.
  """
  clean = jax.vmap(lambda im: augment.center_view(im, settings))(images)
  logits, routes = apply_fn(clean)
  correct = (jnp.argmax(logits, -1) == labels) & mask
  out = {'count': jnp.sum(mask), 'clean/correct': jnp.sum(correct)}

  def one(index):
    views, maps = corrupt_batch(index, images, clean, keys, settings,
                                corruptions)  # fmt: skip
    lg, rt = apply_fn(views)
    sums = {'correct': jnp.sum((jnp.argmax(lg, -1) == labels) & mask)}
    for layer, top1 in rt.items():
      [(flips, pairs)] = stability.flip_sums(
        routes[layer], top1[None], maps[None], mask, 1
      )
      sums[f'{layer}/flips'] = flips
      sums[f'{layer}/pairs'] = pairs
    return sums

  out.update(jax.lax.map(one, jnp.arange(len(corruptions), dtype=jnp.int32)))
  return out


def top1_by_layer(router_logits, num_images: int, prefix: int) -> dict:
  """{'encoderblock_<b>': (N, P) top-1 expert of each patch token}."""
  return {
    f'encoderblock_{b}': jnp.argmax(
      models.per_image_patches(lg, num_images, prefix), axis=-1
    )
    for b, lg in router_logits.items()
  }


def make_corruption_step(eval_model, model: ModelSpec, settings, spec, key):
  """(params, images, labels, mask, index) -> `corruption_sums`.

  Args:
    eval_model: the deterministic evaluation model.
    model: its spec.
    settings: augment.ViewSettings.
    spec: RobustnessSpec (its corruption families).
    key: `corruption_key(seed)`; each example folds its position in.
  """
  layers, prefix = model.moe_layers, model.num_prefix_tokens
  corruptions = corruption_list(spec.corruptions)

  def step(params, images, labels, mask, index):
    def apply_fn(views):
      logits, by_layer = evaluate.apply_with_router_logits(
        eval_model, params, augment.to_model_range(views), layers
      )
      return logits, top1_by_layer(by_layer, views.shape[0], prefix)

    keys = streams.example_keys(key, jnp.where(mask, index, 0))
    return corruption_sums(apply_fn, images, labels, mask, keys, settings,
                           corruptions)  # fmt: skip

  return step


def corruption_key(seed: int) -> Array:
  return jax.random.fold_in(jax.random.key(seed), CORRUPTION_STREAM)


def _ratio(num, den):
  return float(num / den) if den else None


def summarize_corruptions(totals: Mapping[str, Any], families) -> dict:
  """The suite's JSON (see docs/robustness.md) from the summed sums."""
  count = float(totals['count'])
  clean = _ratio(totals['clean/correct'], count)
  layers = sorted({k.split('/')[0] for k in totals if k.endswith('/flips')})
  out: dict[str, Any] = {'num_examples': int(count), 'clean_accuracy': clean}
  table, start = {}, 0
  for name in families:
    family = FAMILIES[name]
    stop = start + len(family.severities)
    cells = slice(start, stop)
    table[name] = {
      'severities': list(family.severities),
      'unit': family.unit,
      'accuracy': [_ratio(c, count) for c in totals['correct'][cells]],
      'flip_rate': {
        layer: [_ratio(f, p) for f, p in zip(
          totals[f'{layer}/flips'][cells], totals[f'{layer}/pairs'][cells],
          strict=True)]
        for layer in layers
      },
      'pairs': {layer: [int(p) for p in totals[f'{layer}/pairs'][cells]]
                for layer in layers},
    }  # fmt: skip
    start = stop
  out['corruptions'] = table
  out['summary'] = _corruption_summary(table, clean, layers)
  return out


def _mean(values):
  values = [v for v in values if v is not None]
  return float(np.mean(values)) if values else None


def _corruption_summary(table, clean, layers) -> dict:
  family_acc = {n: _mean(t['accuracy']) for n, t in table.items()}
  mean_acc = _mean(family_acc.values())
  return {
    'mean_accuracy': mean_acc,
    'accuracy_drop': None if mean_acc is None else clean - mean_acc,
    'family_accuracy': family_acc,
    'mean_flip_rate': {
      layer: _mean(_mean(t['flip_rate'][layer]) for t in table.values())
      for layer in layers
    },
  }


def run_corruptions(step_fn, params, dataset, batch_size, spec, put_batch):
  """The corruption suite over the first `spec.limit` test images."""
  fields = ('image', 'label', 'mask', 'index')
  totals = evaluate.sum_over_batches(
    lambda _, b: step_fn(params, *put_batch(*(b[f] for f in fields))),
    evaluate.eval_batches(dataset, batch_size, spec.limit),
  )
  return summarize_corruptions(totals, spec.corruptions)


# ----------------------------------------------------------------------------
# Cheaper inference: K and capacity factor of the evaluation model.
# ----------------------------------------------------------------------------
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
  router = {'num_selected_experts': k,
            'dispatcher': {'capacity_factor': capacity_factor}}  # fmt: skip
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
    moe['group_size'] * k, moe['num_experts'], cf,
    dispatcher.get('capacity_ceil_or_round', 'ceil'),
    dispatcher.get('capacity_multiple_of', 4),
  )  # fmt: skip


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
    sums = {'correct': jnp.sum((jnp.argmax(logits, -1) == labels) & mask),
            'count': jnp.sum(mask)}  # fmt: skip
    for b in layers:
      m = metrics[f'encoderblock_{b}']
      real = evaluate.group_real_tokens(mask, m['dropped_fraction'].shape[0])
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
    fail('model.encoder.moe.layers', model.moe_layers,
         "the 'cheap' suite varies K and capacity: needs MoE "
         'layers')  # fmt: skip
  name = _router(model.eval_config).get('name', DEFAULT_ROUTER)
  if name != DEFAULT_ROUTER:
    fail('model.encoder.moe.router.name', name,
         f"the 'cheap' suite varies K and capacity: needs "
         f'{DEFAULT_ROUTER}')  # fmt: skip


def run_cheap(model, settings, params, dataset, batch_size, spec, put_batch):
  """The cheaper-inference table (module docstring), one jitted evaluation
  per variant over the first `spec.limit` test images."""
  rows = []
  for name, k, cf in serving_variants(model, spec.capacity_factors,
                                      spec.extra_k):  # fmt: skip
    variant = variant_spec(model, k, cf)
    step = jax.jit(make_serving_step(variant.build_eval(), variant, settings))
    totals = evaluate.sum_over_batches(
      lambda _, b, step=step: step(
        params, *put_batch(b['image'], b['label'], b['mask'])
      ),
      evaluate.eval_batches(dataset, batch_size, spec.limit),
    )
    rows.append(_serving_row(name, k, cf, group_capacity(variant), totals,
                             model.moe_layers))  # fmt: skip
  return _relative_rows(rows)


def _serving_row(name, k, cf, capacity, totals, layers) -> dict:
  row = {'name': name, 'num_selected_experts': k, 'capacity_factor': cf,
         'capacity': capacity,
         'accuracy': _ratio(totals['correct'], totals['count']),
         'num_examples': int(totals['count'])}  # fmt: skip
  for key in ('dropped', 'dropped_tokens'):
    row[key] = {
      f'encoderblock_{b}': _ratio(totals[f'encoderblock_{b}/{key}'],
                                  totals[f'encoderblock_{b}/weight'])
      for b in layers
    }  # fmt: skip
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
  return {'default': {k: base[k] for k in ('num_selected_experts',
                                           'capacity_factor', 'capacity')},
          'rows': rows}  # fmt: skip


# ----------------------------------------------------------------------------
# config.evaluate.robustness
# ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RobustnessSpec:
  """config.evaluate.robustness.

  Attributes:
    enabled: run `suites` at every training evaluation (eval_main runs the
      suites its --suite flag names whatever this says).
    suites: a subset of SUITES.
    limit: test images of the corruption and cheap suites (None: all; never
      more than config.evaluate.limit).
    corruptions: the families of the corruption suite (keys of FAMILIES).
    capacity_factors: the cheap suite's capacity factors besides the default.
    extra_k: the cheap suite's K values besides the default.
    attack: attacks.AttackSpec (config.evaluate.robustness.attack).
  """

  enabled: bool = False
  suites: tuple[str, ...] = SUITES
  limit: int | None = 2000
  corruptions: tuple[str, ...] = tuple(FAMILIES)
  capacity_factors: tuple[float, ...] = DEFAULT_CAPACITY_FACTORS
  extra_k: tuple[int, ...] = DEFAULT_EXTRA_K
  attack: attacks.AttackSpec = attacks.AttackSpec()

  @classmethod
  def from_config(cls, cfg, eval_limit=None, num_experts=0) -> RobustnessSpec:
    cfg = to_dict(cfg)
    key = 'evaluate.robustness'
    unknown = sorted(set(cfg) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
      fail(key, unknown, f'keys in {[f.name for f in dataclasses.fields(cls)]}')
    suites = tuple(cfg.get('suites', SUITES))
    if [s for s in suites if s not in SUITES]:
      fail(f'{key}.suites', suites, f'a subset of {list(SUITES)}')
    families = tuple(cfg.get('corruptions', tuple(FAMILIES)))
    if not families or [f for f in families if f not in FAMILIES]:
      fail(f'{key}.corruptions', families,
           f'a non-empty subset of {list(FAMILIES)}')  # fmt: skip
    cfs = cfg.get('capacity_factors', DEFAULT_CAPACITY_FACTORS)
    cfs = tuple(float(c) for c in cfs)
    for c in cfs:
      check_range(f'{key}.capacity_factors', c, 0, low_open=True)
    ks = tuple(cfg.get('extra_k', DEFAULT_EXTRA_K))
    for k in ks:
      check_range(f'{key}.extra_k', k, 1, num_experts or None, integer=True)
    return cls(
      enabled=bool(cfg.get('enabled', False)),
      suites=suites,
      limit=_limit(f'{key}.limit', cfg.get('limit', 2000), eval_limit),
      corruptions=families,
      capacity_factors=cfs,
      extra_k=ks,
      attack=attacks.AttackSpec.from_config(cfg.get('attack'), eval_limit),
    )


def _limit(key, limit, eval_limit):
  check_range(key, limit, 1, integer=True, optional=True)
  if eval_limit is not None:  # Never more images than the evaluation.
    limit = eval_limit if limit is None else min(limit, eval_limit)
  return limit


def make_evaluator(spec: RobustnessSpec, model: ModelSpec, settings, seed: int,
                   loss_name: str, put_batch, suites=None):  # fmt: skip
  """A function (params, dataset, batch_size) -> {suite: result}, its steps
  jitted once (the training evaluations call it again and again).

  Args:
    spec: the resolved block.
    model: the model spec.
    settings: augment.ViewSettings.
    seed: the run's seed (the corruption draws, the routing attack's start).
    loss_name: the classification loss PGD ascends (losses.py registry).
    put_batch: sharding.make_put_batch(mesh).
    suites: the suites to run (None: spec.suites).
  """
  suites = tuple(spec.suites if suites is None else suites)
  if 'cheap' in suites:
    check_serving(model)
  eval_model = model.build_eval()
  corr = jax.jit(make_corruption_step(eval_model, model, settings, spec,
                                      corruption_key(seed)))  # fmt: skip
  attack = jax.jit(attacks.make_attack_step(
    eval_model, model, settings, spec.attack, loss_name,
    attacks.attack_key(seed), group_capacity(model) if model.moe_layers
    else 1))  # fmt: skip

  def evaluate_fn(params, dataset, batch_size) -> dict[str, Any]:
    out = {}
    for suite in suites:
      if suite == 'corruptions':
        out[suite] = run_corruptions(corr, params, dataset, batch_size, spec,
                                     put_batch)  # fmt: skip
      elif suite == 'attacks':
        out[suite] = attacks.run_attacks(attack, params, dataset, batch_size,
                                         spec.attack, put_batch)  # fmt: skip
      else:
        out[suite] = run_cheap(model, settings, params, dataset, batch_size,
                               spec, put_batch)  # fmt: skip
    return out

  return evaluate_fn


# ----------------------------------------------------------------------------
# Console tables.
# ----------------------------------------------------------------------------
def _fmt(value, spec='.3f') -> str:
  return '-' if value is None else format(value, spec)


def format_corruptions(result: Mapping) -> str:
  """Accuracy and flip rates per family and severity, then the summary."""
  rows = []
  for name, t in result['corruptions'].items():
    rows.append(f'{name:<16}accuracy  ' + ' '.join(
      _fmt(a) for a in t['accuracy']))  # fmt: skip
    for layer, rates in t['flip_rate'].items():
      rows.append(f'{"":<16}{layer[-7:]:<10}'
                  + ' '.join(_fmt(r) for r in rates))  # fmt: skip
  s = result['summary']
  rows.append(
    f'clean accuracy {_fmt(result["clean_accuracy"], ".4f")}, mean '
    f'corruption accuracy {_fmt(s["mean_accuracy"], ".4f")} (drop '
    f'{_fmt(s["accuracy_drop"], ".4f")}); mean flip rate '
    + ', '.join(f'{k} {_fmt(v)}' for k, v in s['mean_flip_rate'].items())
  )
  return '\n'.join(rows)


def format_attacks(result: Mapping) -> str:
  rows = [f'clean accuracy {_fmt(result["clean"]["accuracy"], ".4f")} '
          f'({result["num_examples"]} images)']  # fmt: skip
  for name in attacks.ATTACKS:
    r = result.get(name)
    if r is None:
      continue
    per_layer = '; '.join(
      f'{layer}: routing_changes '
      f'{_fmt(r.get("routing_changes", {}).get(layer))} flips '
      f'{_fmt(r["flip_rate"][layer])} kl {_fmt(r["router_kl"][layer], ".4f")}'
      for layer in r['flip_rate']
    )
    rows.append(f'{name:<8} accuracy {_fmt(r["accuracy"], ".4f")} (drop '
                f'{_fmt(r["accuracy_drop"], ".4f")}), prediction changes '
                f'{_fmt(r["prediction_changes"])}; {per_layer}')  # fmt: skip
  return '\n'.join(rows)


def format_cheap(result: Mapping) -> str:
  rows = [f'{"variant":<12}{"K":>3}{"cf":>6}{"C":>6}{"acc":>8}{"drop":>8}'
          f'{"flops":>7}{"assign":>7}  dropped per layer']  # fmt: skip
  for r in result['rows']:
    dropped = ' '.join(_fmt(d) for d in r['dropped'].values())
    rows.append(
      f'{r["name"]:<12}{r["num_selected_experts"]:>3}'
      f'{r["capacity_factor"]:>6g}{r["capacity"]:>6}'
      f'{_fmt(r["accuracy"], ".4f"):>8}{_fmt(r["accuracy_drop"], ".4f"):>8}'
      f'{r["expert_flops"]:>7.3f}{r["expert_flops_assigned"]:>7.3f}  '
      f'{dropped}'
    )
  return '\n'.join(rows)


def format_suite(suite: str, result: Mapping) -> str:
  """The console table of one suite's result."""
  fn = {'corruptions': format_corruptions, 'attacks': format_attacks,
        'cheap': format_cheap}[suite]  # fmt: skip
  return f'[{suite}]\n' + fn(result)

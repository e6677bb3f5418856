r"""The corruption suite: what accuracy and routing keep under corruptions.

Common corruptions after Hendrycks and Dietterich,
"Benchmarking Neural Network Robustness to Common Corruptions and
Perturbations", ICLR 2019 (ImageNet-C; its CIFAR-10-C variant for 32-px
images, `make_cifar_c.py` of github.com/hendrycks/robustness), with the
geometric ones of their ImageNet-P and of MNIST-C (Mu and Gilmer, 2019), and
an occluding square after Cutout (DeVries and Taylor, arXiv:1708.04552). Every
corruption is applied to the deterministic evaluation view (the whole image
resized to S x S, pixels in [0, 1], `augment.center_view`); the geometric ones
re-render that view from the source image. `FAMILIES` holds the severities
of each family and its unit (docs/robustness.md tabulates them).

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

from vmoe_jsd import augment, models, streams
from vmoe_jsd.evaluation import core, stability
from vmoe_jsd.models.spec import ModelSpec

Array = jax.Array

# The stream of the corruption draws: jax.random.fold_in(key(seed), 4), the
# next number after streams.STREAMS (it may move there as 'corruptions': 4
# without changing a number).
CORRUPTION_STREAM = 4
ROTATION_TOLERANCE = 3 / 7  # of the patch size, per axis
OCCLUSION_FILL = 0.5


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
  padded = jnp.pad(
    clean, ((radius, radius), (radius, radius), (0, 0)), mode='edge'
  )
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
  index = augment.patch_index_map(
    affine, base, size, patch, tuple(source.shape[:2])
  )
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
  index = rotation_map(
    affine, base, size, patch, tuple(source.shape[:2]), ROTATION_TOLERANCE
  )
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
  'gaussian_noise': Family(
    gaussian_noise, (0.04, 0.06, 0.08, 0.09, 0.10), 'std, pixels in [0, 1]'
  ),
  'gaussian_blur': Family(
    gaussian_blur, (0.4, 0.6, 0.7, 0.8, 1.0), 'sigma, view pixels'
  ),
  'contrast': Family(
    contrast, (0.75, 0.5, 0.4, 0.3, 0.15), 'factor on deviations from the mean'
  ),
  'brightness': Family(
    brightness, (0.05, 0.1, 0.15, 0.2, 0.3), 'added to the HSV value'
  ),
  'rotation': Family(rotation, (5, 10, 15, 20, 30), 'degrees, random sign'),
  'shift': Family(shift, (1, 2, 3, 4), 'pixels per axis, random signs'),
  'occlusion': Family(
    occlusion, (0.2, 0.3, 0.4, 0.5), 'square side / view side'
  ),
}


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
    views, maps = corrupt_batch(
      index, images, clean, keys, settings, corruptions
    )
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
      logits, by_layer = core.apply_with_router_logits(
        eval_model, params, augment.to_model_range(views), layers
      )
      return logits, top1_by_layer(by_layer, views.shape[0], prefix)

    keys = streams.example_keys(key, jnp.where(mask, index, 0))
    return corruption_sums(
      apply_fn, images, labels, mask, keys, settings, corruptions
    )

  return step


def corruption_key(seed: int) -> Array:
  return jax.random.fold_in(jax.random.key(seed), CORRUPTION_STREAM)


def summarize_corruptions(totals: Mapping[str, Any], families) -> dict:
  """The suite's JSON (see docs/robustness.md) from the summed sums."""
  count = float(totals['count'])
  clean = core.ratio(totals['clean/correct'], count)
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
      'accuracy': [core.ratio(c, count) for c in totals['correct'][cells]],
      'flip_rate': {
        layer: [
          core.ratio(f, p)
          for f, p in zip(
            totals[f'{layer}/flips'][cells],
            totals[f'{layer}/pairs'][cells],
            strict=True,
          )
        ]
        for layer in layers
      },
      'pairs': {
        layer: [int(p) for p in totals[f'{layer}/pairs'][cells]]
        for layer in layers
      },
    }
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
  totals = core.sum_over_batches(
    lambda _, b: step_fn(params, *put_batch(*(b[f] for f in fields))),
    core.eval_batches(dataset, batch_size, spec.limit),
  )
  return summarize_corruptions(totals, spec.corruptions)


def format_corruptions(result: Mapping) -> str:
  """Accuracy and flip rates per family and severity, under a header
  naming the severities, then the summary with its image count."""
  width = max([len(t['accuracy']) for t in result['corruptions'].values()])
  rows = [
    f'{result["num_examples"]} test images; one column per severity'
    ' (the parameter row gives its value, docs/robustness.md its unit)',
    f'{"family":<16}{"row":<14}'
    + ' '.join(f'sev {i + 1}'.rjust(6) for i in range(width)),
  ]
  for name, t in result['corruptions'].items():
    rows.append(
      f'{name:<16}{"parameter":<14}'
      + ' '.join(f'{s:>6g}' for s in t['severities'])
    )
    rows.append(
      f'{"":<16}{"accuracy":<14}'
      + ' '.join(core.dash(a).rjust(6) for a in t['accuracy'])
    )
    for layer, rates in t['flip_rate'].items():
      rows.append(
        f'{"":<16}{"flips " + layer[-7:]:<14}'
        + ' '.join(core.dash(r).rjust(6) for r in rates)
      )
  s = result['summary']
  rows.append(
    f'on these {result["num_examples"]} images: clean accuracy '
    f'{core.dash(result["clean_accuracy"], ".4f")}, mean '
    f'corruption accuracy {core.dash(s["mean_accuracy"], ".4f")} (drop '
    f'{core.dash(s["accuracy_drop"], ".4f")}); mean flip rate '
    + ', '.join(f'{k} {core.dash(v)}' for k, v in s['mean_flip_rate'].items())
  )
  return '\n'.join(rows)


def build(ctx):
  """The registry's run: the corruption suite."""
  key = corruption_key(ctx.spec.seed)
  return ctx.batched(
    make_corruption_step, run_corruptions, ctx.spec.robustness, key
  )

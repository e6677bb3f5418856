"""Routing stability: how often a patch's top-1 expert flips under small input
changes.

Sparse MoE routing is discontinuous: a patch whose two best router logits are
close can be sent to another expert by a change of the input far smaller than
any augmentation (the motivation of router-consistency learning, Kada et al.,
MIRU 2023). This module measures, per MoE layer, the flip rate

  flips(perturbation) = #{matched patches whose top-1 expert differs between
                          the clean view and the perturbed view}
                        / #{matched patches}

on the deterministic evaluation view (the whole image resized to S x S,
`augment.center_view`), for:

  * Gaussian pixel noise: clean view + N(0, sigma^2) per pixel (pixels in
    [0, 1]), clipped to [0, 1]; the patch grid is unchanged, so patch i is
    compared with patch i.
  * Shifts by d pixels: the view whose affine is `center @ translation(d, 0)`
    (content moves up by d) and `center @ translation(0, d)` (left by d); the
    flip rate averages the two. Correspondence is exact and analytic, from
    `augment.patch_index_map` (the rule the training loss uses): shifted
    patch i is compared with the clean patch that contains the image point
    at the centre of shifted patch i. For d < p / 2 that is the patch with
    the same index; for larger d it moves to the neighbour. A patch whose
    centre leaves the image (or the clean view) has no partner and is not
    counted. Pixels shifted in from outside the image take
    `settings.fill_value`.

Evaluation uses a fixed noise key per batch, so figures repeat exactly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from vmoe_jsd import augment, models, streams
from vmoe_jsd.config_errors import to_dict
from vmoe_jsd.evaluation import core
from vmoe_jsd.models.spec import ModelSpec

Array = jax.Array

DEFAULT_NOISE_STDS = (0.02, 0.05, 0.1)
DEFAULT_SHIFTS = (1, 2)


def perturbation_names(
  noise_stds: Sequence[float], shifts: Sequence[int]
) -> list[str]:
  """Names of the perturbations, in the order `perturbed_views` makes them."""
  return [f'noise_{s:g}' for s in noise_stds] + [f'shift_{d}' for d in shifts]


def _base_affine(source_hw, size: int) -> Array:
  src_h, src_w = source_hw
  return augment.scaling(src_h / size, src_w / size)


def perturbed_views(
  key: Array,
  images: Array,
  settings: augment.ViewSettings,
  noise_stds: Sequence[float] = DEFAULT_NOISE_STDS,
  shifts: Sequence[int] = DEFAULT_SHIFTS,
) -> tuple[Array, Array, Array]:
  """The clean evaluation view and its perturbed copies.

  Args:
    key: PRNG key of the noise.
    images: (B, H, W, C) uint8 or float in [0, 1].
    settings: the augmentation settings (size, patch size, fill value).
    noise_stds: Gaussian noise standard deviations (pixels in [0, 1]).
    shifts: shifts in pixels; each gives two views (down and right).

  Returns:
    clean: (B, S, S, C) the clean view.
    perturbed: (V, B, S, S, C), V = len(noise_stds) + 2 len(shifts): the
      noisy views, then for each shift d the views shifted by (d, 0) and
      (0, d).
    maps: (V, B, P) int32: for patch i of a perturbed view, the index of the
      clean view's patch it is compared with, -1 for none.
  """
  size, patch = settings.size, settings.patch_size
  source_hw = tuple(images.shape[1:3])
  base = _base_affine(source_hw, size)
  num_patches = (size // patch) ** 2
  batch = images.shape[0]

  def render(affine):
    return jax.vmap(
      lambda im: augment.render_view(im, affine, size, settings.fill_value)
    )(images)

  clean = render(base)
  views, maps = [], []
  if noise_stds:
    noise = jax.random.normal(key, (len(noise_stds),) + clean.shape)
    identity = jnp.broadcast_to(
      jnp.arange(num_patches, dtype=jnp.int32), (batch, num_patches)
    )
    for k, std in enumerate(noise_stds):
      views.append(jnp.clip(clean + std * noise[k], 0.0, 1.0))
      maps.append(identity)
  for d in shifts:
    for dy, dx in ((d, 0), (0, d)):
      affine = base @ augment.translation(dy, dx)
      views.append(render(affine))
      index = augment.patch_index_map(affine, base, size, patch, source_hw)
      maps.append(jnp.broadcast_to(index, (batch, num_patches)))
  return clean, jnp.stack(views), jnp.stack(maps)


def flip_sums(
  top1_clean: Array,
  top1_perturbed: Array,
  maps: Array,
  mask: Array,
  num_noise: int,
) -> list[tuple[Array, Array]]:
  """(flips, pairs) per perturbation for one layer and one batch.

  Args:
    top1_clean: (B, P) top-1 expert of each patch of the clean view.
    top1_perturbed: (V, B, P) the same for the perturbed views.
    maps: (V, B, P) from `perturbed_views`.
    mask: (B,) bool, False for padding examples.
    num_noise: how many of the V views are noise levels (they come first);
      the rest are shifts, two views (down, right) each.

  Returns:
    [(number of flips, number of compared patches)] in the order of
    `perturbation_names`; a shift adds up both of its directions.
  """
  partner = jax.vmap(
    lambda m: jnp.take_along_axis(top1_clean, jnp.maximum(m, 0), axis=1)
  )(maps)
  valid = (maps >= 0) & mask[None, :, None]
  flips = jnp.sum(valid & (partner != top1_perturbed), axis=(1, 2))
  pairs = jnp.sum(valid, axis=(1, 2))
  out = [(flips[k], pairs[k]) for k in range(num_noise)]
  for v in range(num_noise, maps.shape[0], 2):
    out.append((flips[v] + flips[v + 1], pairs[v] + pairs[v + 1]))
  return out


def stability_sums(
  route_fn: Callable[[Array], Mapping[Any, Array]],
  key: Array,
  images: Array,
  mask: Array,
  settings: augment.ViewSettings,
  noise_stds: Sequence[float] = DEFAULT_NOISE_STDS,
  shifts: Sequence[int] = DEFAULT_SHIFTS,
) -> dict[str, Array]:
  """Flip and pair counts per layer and perturbation, for one batch.

  Args:
    route_fn: views (N, S, S, C) in [0, 1] -> {layer name: (N, P) top-1
      expert of each patch}.
    key: PRNG key of the noise.
    images: (B, H, W, C).
    mask: (B,) bool.
    settings: augmentation settings.
    noise_stds: noise levels.
    shifts: shifts in pixels.

  Returns:
    {'<layer>/<perturbation>/flips': n, '<layer>/<perturbation>/pairs': n}.
  """
  clean, perturbed, maps = perturbed_views(
    key, images, settings, noise_stds, shifts
  )
  num_views, batch = perturbed.shape[:2]
  all_views = jnp.concatenate(
    [clean, perturbed.reshape((-1,) + clean.shape[1:])]
  )
  routes = route_fn(all_views)
  out = {}
  for layer, top1 in routes.items():
    top1_clean = top1[:batch]
    top1_pert = top1[batch:].reshape(num_views, batch, -1)
    sums = flip_sums(top1_clean, top1_pert, maps, mask, len(noise_stds))
    names = perturbation_names(noise_stds, shifts)
    for name, (flips, pairs) in zip(names, sums, strict=True):
      out[f'{layer}/{name}/flips'] = flips
      out[f'{layer}/{name}/pairs'] = pairs
  return out


@dataclasses.dataclass(frozen=True)
class StabilitySpec:
  """config.evaluate.stability.

  Attributes:
    enabled: measure flip rates at each evaluation.
    noise_std: Gaussian noise levels (pixels in [0, 1]).
    shifts: shifts in whole pixels.
    limit: at most this many test images (None: the whole split); never
      more than config.evaluate.limit.
  """

  enabled: bool = True
  noise_std: tuple[float, ...] = DEFAULT_NOISE_STDS
  shifts: tuple[int, ...] = DEFAULT_SHIFTS
  limit: int | None = 2000

  @classmethod
  def from_config(cls, cfg, eval_limit: int | None = None) -> StabilitySpec:
    cfg = to_dict(cfg)
    noise = tuple(float(s) for s in cfg.get('noise_std', DEFAULT_NOISE_STDS))
    shifts = tuple(int(d) for d in cfg.get('shifts', DEFAULT_SHIFTS))
    if any(not s > 0 for s in noise):
      raise ValueError(
        f'config.evaluate.stability.noise_std={noise!r}: every level must be '
        '> 0'
      )
    if any(d < 1 for d in shifts):
      raise ValueError(
        f'config.evaluate.stability.shifts={shifts!r}: shifts are whole '
        'pixels >= 1'
      )
    limit = cfg.get('limit', 2000)
    if eval_limit is not None:  # Never more images than the evaluation.
      limit = eval_limit if limit is None else min(limit, eval_limit)
    if limit is not None and limit < 1:
      raise ValueError(
        f'config.evaluate.stability.limit={limit!r} must be >= 1 (or None '
        'for the whole test split)'
      )
    return cls(bool(cfg.get('enabled', True)), noise, shifts, limit)


def make_stability_step(
  eval_model, model: ModelSpec, settings, spec: StabilitySpec, noise_key
):
  """(params, images, mask, batch_index) -> flip sums, with the eval model.

  Args:
    eval_model: the deterministic evaluation model.
    model: its spec (MoE layers, class-token prefix).
    settings: augment.ViewSettings (view size, patch size, fill value).
    spec: the perturbations.
    noise_key: streams.stream(seed, 'stability_noise'); each batch folds its
      index in.
  """
  layers, prefix = model.moe_layers, model.num_prefix_tokens

  def step(params, images, mask, batch_index):
    def route_fn(views):
      by_layer = core.router_logits(eval_model, params, views, layers)
      return {
        f'encoderblock_{b}': jnp.argmax(
          models.per_image_patches(lg, views.shape[0], prefix), axis=-1
        )
        for b, lg in by_layer.items()
      }

    key = jax.random.fold_in(noise_key, batch_index)
    sums = stability_sums(
      route_fn, key, images, mask, settings, spec.noise_std, spec.shifts
    )
    # Counted on device: the global number of images (all processes).
    sums['num_examples'] = jnp.sum(mask)
    return sums

  return step


def run_stability(
  step_fn, params, dataset, batch_size: int, spec: StabilitySpec, put_batch
) -> dict:
  """Flip rates {layer: {perturbation: rate}} over the first `limit` images.

  Returns:
    {'flip_rate': {layer: {name: rate}}, 'num_examples': n, 'noise_std':
    [...], 'shifts': [...]}, or {} when disabled.
  """
  if not spec.enabled:
    return {}
  totals = core.sum_over_batches(
    lambda i, b: step_fn(params, *put_batch(b['image'], b['mask']), i),
    core.eval_batches(dataset, batch_size, spec.limit),
  )
  rates: dict[str, dict[str, float]] = {}
  for k, flips in totals.items():
    if not k.endswith('/flips'):
      continue
    layer, name, _ = k.split('/')
    pairs = totals[f'{layer}/{name}/pairs']
    rates.setdefault(layer, {})[name] = (
      float(flips / pairs) if pairs else float('nan')
    )
  return {
    'flip_rate': rates,
    'num_examples': int(totals.get('num_examples', 0)),
    'noise_std': list(spec.noise_std),
    'shifts': list(spec.shifts),
  }


def stability_scalars(stability: Mapping) -> dict[str, float]:
  """TensorBoard scalars 'stability/<layer>/<perturbation>'."""
  return {
    f'stability/{layer}/{name}': rate
    for layer, by_name in stability.get('flip_rate', {}).items()
    for name, rate in by_name.items()
  }


def format_stability_table(stability: Mapping) -> str:
  """Fixed-width text table: one row per layer, one column per perturbation."""
  rates = stability.get('flip_rate', {})
  if not rates:
    return ''
  names = list(next(iter(rates.values())))
  rows = [f'{"top-1 flip rate":<16}' + ''.join(f'{n:>12}' for n in names)]
  for layer, by_name in rates.items():
    rows.append(f'{layer:<16}' + ''.join(f'{by_name[n]:>12.3f}' for n in names))
  return '\n'.join(rows)


def build(ctx):
  """The registry's run: flip rates (an empty dict when disabled)."""
  noise_key = streams.stream(ctx.spec.seed, 'stability_noise')
  return ctx.batched(
    make_stability_step, run_stability, ctx.spec.stability, noise_key
  )

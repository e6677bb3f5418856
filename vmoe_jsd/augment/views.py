"""Two augmented views of one image with their patch maps; the evaluation view.

The views feed a V-MoE (Riquelme et al., "Scaling Vision with Sparse Mixture
of Experts", NeurIPS 2021) trained with router consistency (`paired_views`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vmoe_jsd.augment import colour, geometry, rendering
from vmoe_jsd.augment.settings import ViewSettings

Array = jax.Array


def paired_views(
  key: Array,
  image: Array,
  settings: ViewSettings,
  orig_size: Array | None = None,
) -> tuple[Array, Array]:
  """Two augmented views of one image and their patch correspondences.

  This is the input of the router-consistency loss (Kada et al., MIRU 2023):
  for patch i of view 1, `maps[0, i]` is the patch of view 2 that shows the
  same image point (the centre of patch i), or -1 if view 2 does not show it
  or it lies outside the source image or in fill (RandAugment's geometric
  ops and Cutout) of either view; `maps[1]` is the same from view 2 to view
  1. The maps are computed from the affines, not from pixels, and are not
  inverse permutations of each other in general (crops differ in scale).

  Random streams: `key` splits into (geometry, photometric) keys, and
  `paired_geometry(jax.random.split(key)[0], ...)` reproduces the geometry.
  Each view gets its own numbers from each stream, so the two views are
  independent and identically distributed. RandAugment's colour ops have no
  random numbers of their own (the op choice is part of the geometry draw),
  so photometric=False keeps the very same geometry and maps.

  With RandAugment and photometric ops on, the views are quantised to
  multiples of 1 / 255 (the reference works on uint8 images).

  Jit with `jax.jit(paired_views, static_argnames='settings')`; for a batch
  use `batched_paired_views`.

  Args:
    key: a PRNG key (typed `jax.random.key` or raw uint32 `PRNGKey`).
    image: (H, W, C) uint8 in [0, 255] or float in [0, 1]; C is 1 or 3.
    settings: the augmentation settings (size S, patch size p, ...).
    orig_size: None when `image` is the source; else (2,) (height, width) of
      the original image that was resized, aspect ratio not kept, into the
      canvas `image`: crops are sampled in original pixels (area and aspect
      ratio as the settings say, in the original) and rendered from the
      canvas.

  Returns:
    views: (2, S, S, C) float32 in [0, 1] (for a fill_value in [0, 1]).
    maps: (2, P) int32, P = (S // p) ** 2, patches numbered row-major.
  """
  canvas_hw = tuple(jnp.shape(image)[:2])
  key_geometry, key_photometric = jax.random.split(key)
  source_hw, canvas = canvas_hw, None
  if orig_size is not None:
    orig = jnp.asarray(orig_size, jnp.float32)
    source_hw, canvas = (orig[0], orig[1]), canvas_hw
  pair = geometry.paired_geometry(key_geometry, source_hw, settings, canvas)
  views = _render_pair(image, pair, settings)
  if colour.has_jitter(settings):
    u = jax.random.uniform(key_photometric, (2, 2))  # One row per view.
    jitter = lambda u, v: colour.jitter_from_uniforms(u, v, settings)
    views = jax.vmap(jitter)(u, views)
  return views, _paired_maps(pair, settings, canvas_hw)


def _render_pair(
  image: Array, pair: geometry.ViewGeometry, settings: ViewSettings
) -> Array:
  """(2, S, S, C) views of `pair`, with RandAugment's fill and colours."""
  size, fill = settings.size, settings.fill_value
  if settings.randaugment is None:
    render = lambda a: rendering.render_view(image, a, size, fill)
    return jax.vmap(render)(pair.affine)
  render = lambda g: rendering.render_geometry(image, g, settings)
  views, stages = jax.vmap(render)(pair)
  if settings.photometric:
    paint = lambda v, s, o: colour.randaugment_photometric(v, s, o, settings)
    return jax.vmap(paint)(views, stages, pair.ops)
  return jnp.where(stages[..., None] >= 0, fill, views)


def _paired_maps(
  pair: geometry.ViewGeometry, settings: ViewSettings, canvas_hw: tuple
) -> Array:
  """(2, P) maps from view 1 to view 2 and back (see `paired_views`)."""
  size, patch_size = settings.size, settings.patch_size

  def one_map(a, b):
    layers = (a, b) if settings.randaugment is not None else (None, None)
    return rendering.patch_index_map(
      a.affine, b.affine, size, patch_size, canvas_hw, *layers
    )

  swapped = jax.tree.map(lambda x: x[::-1], pair)
  return jax.vmap(one_map)(pair, swapped)


def batched_paired_views(
  key: Array,
  images: Array,
  settings: ViewSettings,
  orig_sizes: Array | None = None,
) -> tuple[Array, Array]:
  """`paired_views` over a batch, one key per image from jax.random.split.

  `images` is (B, H, W, C); `orig_sizes` None or (B, 2), one `orig_size` per
  image. Returns views (B, 2, S, S, C) float32 and maps (B, 2, P) int32.
  """
  keys = jax.random.split(key, images.shape[0])
  one = lambda k, im, o: paired_views(k, im, settings, o)
  return jax.vmap(one)(keys, images, orig_sizes)  # orig_sizes may be None.


def center_view(image: Array, settings: ViewSettings) -> Array:
  """The deterministic evaluation view: the whole image resized to S x S.

  Same sampling as the training views (bilinear at pixel centres, so no
  antialiasing when shrinking); the aspect ratio is not kept. No jitter.
  Of `settings`, only size and fill_value are used. Returns (S, S, C) float32.
  """
  src_h, src_w = jnp.shape(image)[:2]
  size = settings.size
  affine = geometry.scaling(src_h / size, src_w / size)
  return rendering.render_view(image, affine, size, settings.fill_value)


def to_model_range(views: Array) -> Array:
  """[0, 1] pixels -> [-1, 1], vmoe's `value_range(-1, 1)`."""
  return views * 2.0 - 1.0

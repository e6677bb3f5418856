"""Rendering a view from its geometry, and the patch maps between views.

A view is rendered once, bilinearly, from the source with its full affine
(geometry.py); `fill_stages` says which pixels RandAugment's geometric ops
and Cutout replaced by fill; `patch_index_map` says which patch of one view
shows the centre of each patch of the other, from the affines alone.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vmoe_jsd.augment.geometry import (
  FILL_INSIDE,
  FILL_OUTSIDE,
  ViewGeometry,
  apply_affine,
  invert_affine,
)
from vmoe_jsd.augment.settings import ViewSettings

Array = jax.Array


def _inside(y: Array, x: Array, height, width) -> Array:
  """Whether points (y, x) lie in [0, height) x [0, width)."""
  return (y >= 0) & (y < height) & (x >= 0) & (x < width)


def _to_unit_float(image: Array) -> Array:
  """uint8 [0, 255] -> float32 [0, 1]; floats are taken as they are."""
  image = jnp.asarray(image)
  if image.ndim != 3:
    raise ValueError(f'image must have shape (H, W, C), got {image.shape}.')
  if image.dtype == jnp.uint8:
    return image.astype(jnp.float32) / 255.0
  if not jnp.issubdtype(image.dtype, jnp.floating):
    raise ValueError(f'image dtype {image.dtype} is neither uint8 nor float.')
  return image.astype(jnp.float32)


def render_view(
  image: Array, affine: Array, size: int, fill_value: float = 0.0
) -> Array:
  """Renders the view of `image` that `affine` describes.

  Each view pixel samples the source at its centre's mapped position with
  bilinear interpolation. Points within half a pixel of the source border take
  the border pixels' values (no blending with the fill); points outside
  [0, H) x [0, W) take `fill_value`, exactly where `patch_index_map` (given
  `source_hw`) says -1. Minification is not antialiased.

  Args:
    image: (H, W, C) uint8 in [0, 255] or float in [0, 1].
    affine: (3, 3) matrix from view to source coordinates.
    size: view side S.
    fill_value: value of pixels that show no source content.

  Returns:
    (S, S, C) float32; in [0, 1] for images in range and fill in [0, 1]. Float
    images are not clipped, so other values pass through.
  """
  image = _to_unit_float(image)
  view_y, view_x = _pixel_centres(size)
  src_y, src_x = apply_affine(affine, view_y, view_x)
  inside = _inside(src_y, src_x, *image.shape[:2])
  # map_coordinates puts pixel centres at integer coordinates.
  coords = [src_y - 0.5, src_x - 0.5]

  def sample(channel):
    return jax.scipy.ndimage.map_coordinates(
      channel, coords, order=1, mode='nearest'
    )

  view = jax.vmap(sample, in_axes=2, out_axes=2)(image)
  fill = jnp.asarray(fill_value, jnp.float32)
  return jnp.where(inside[..., None], view, fill)


def _layer_fills(geometry: ViewGeometry, y: Array, x: Array) -> Array:
  """(L, *y.shape) bool: whether RandAugment layer k filled view point (y, x).

  `geometry` is one view's (no leading view axis); y and x have one shape.
  """

  def one(check, box, mode):
    inside = _inside(*apply_affine(check, y, x), box[0], box[1])
    fill_inside = (mode == FILL_INSIDE) & inside
    return jnp.where(mode == FILL_OUTSIDE, ~inside, fill_inside)

  return jax.vmap(one)(geometry.checks, geometry.boxes, geometry.modes)


def fill_stages(
  geometry: ViewGeometry, source_hw: tuple[int, int], y: Array, x: Array
) -> Array:
  """Which step of the augmentation last replaced view point (y, x) by fill.

  `geometry` is one view's (no leading view axis), `source_hw` the (H, W) of
  the rendered source (canvas); y and x have one shape.

  Returns:
    int32 of y's shape: -1 where the point shows image content, 0 where it
    maps outside the source (and no layer filled it later), k in [1, N] where
    RandAugment layer k (1-based) was the last to fill it.
  """
  inside = _inside(*apply_affine(geometry.affine, y, x), *source_hw)
  stage = jnp.where(inside, -1, 0).astype(jnp.int32)
  fills = _layer_fills(geometry, y, x)
  for k in range(fills.shape[0]):
    stage = jnp.where(fills[k], k + 1, stage)
  return stage


def _pixel_centres(size: int) -> tuple[Array, Array]:
  centres = jnp.arange(size, dtype=jnp.float32) + 0.5
  return jnp.meshgrid(centres, centres, indexing='ij')


def patch_index_map(
  affine_a: Array,
  affine_b: Array,
  size: int,
  patch_size: int,
  source_hw: tuple[int, int] | None = None,
  layers_a: ViewGeometry | None = None,
  layers_b: ViewGeometry | None = None,
) -> Array:
  """For each patch of view a, the patch of view b showing its centre.

  The centre of patch i of view a maps to the source with `affine_a` and into
  view b with inv(`affine_b`); the answer is the row-major index of the patch
  of view b that contains that point. Analytic: no pixels are looked at.

  Args:
    affine_a: (3, 3) view-a-to-source matrix.
    affine_b: (3, 3) view-b-to-source matrix.
    size: view side S (both views).
    patch_size: patch size p.
    source_hw: (H, W) of the source. When given, centres that map outside
      [0, H) x [0, W) (they show fill, not image content) get -1 too.
    layers_a: view a's geometry (its RandAugment checks are used; its affine
      is ignored), or None: centres that a RandAugment layer of view a filled
      get -1.
    layers_b: the same for view b: points that view b shows as fill get -1.

  Returns:
    (P,) int32, P = (S // p) ** 2: a patch index of view b, or -1 where the
    point lies outside view b's [0, S) x [0, S) (or outside the source, or in
    fill of either view).
  """
  grid = size // patch_size
  centres = (jnp.arange(grid, dtype=jnp.float32) + 0.5) * patch_size
  a_y, a_x = jnp.meshgrid(centres, centres, indexing='ij')
  a_y, a_x = a_y.ravel(), a_x.ravel()
  src_y, src_x = apply_affine(affine_a, a_y, a_x)
  b_y, b_x = apply_affine(invert_affine(affine_b), src_y, src_x)
  valid = _inside(b_y, b_x, size, size)
  if source_hw is not None:
    valid &= _inside(src_y, src_x, *source_hw)
  if layers_a is not None:
    valid &= ~jnp.any(_layer_fills(layers_a, a_y, a_x), axis=0)
  if layers_b is not None:
    valid &= ~jnp.any(_layer_fills(layers_b, b_y, b_x), axis=0)
  row = jnp.floor(b_y / patch_size).astype(jnp.int32)
  col = jnp.floor(b_x / patch_size).astype(jnp.int32)
  return jnp.where(valid, row * grid + col, -1).astype(jnp.int32)


def render_geometry(
  image: Array, geometry: ViewGeometry, settings: ViewSettings
) -> tuple[Array, Array]:
  """Renders one view of `geometry` from `image` (the canvas).

  Returns:
    view: (S, S, C) float32 rendered with the full affine; pixels outside
      the source hold the fill value, pixels that RandAugment filled still
      hold content (see `fill_stages`).
    stage: (S, S) int32 fill stages of the pixel centres.
  """
  size = settings.size
  view = render_view(image, geometry.affine, size, settings.fill_value)
  view_y, view_x = _pixel_centres(size)
  stage = fill_stages(geometry, jnp.shape(image)[:2], view_y, view_x)
  return view, stage

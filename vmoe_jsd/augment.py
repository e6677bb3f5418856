"""Paired augmented views and their patch correspondences, in pure JAX.

Router-consistency learning (Kada et al., MIRU 2023) shows a V-MoE (Riquelme
et al., "Scaling Vision with Sparse Mixture of Experts", NeurIPS 2021) two
augmented views of one image and penalises the Jensen-Shannon divergence
between the router outputs of patches that show the same image point. This
module makes the two views and says which patch of one view shows the centre of
each patch of the other. Everything is a plain function of arrays: jit- and
vmap-able, deterministic given a PRNG key, no host callbacks.

Coordinate convention (used by every function here):
  * Points are (y, x) = (row, column), continuous, in homogeneous form
    (y, x, 1). Pixel (r, c) covers [r, r + 1) x [c, c + 1); its centre is
    (r + 0.5, c + 0.5). An image of shape (H, W, C) covers [0, H) x [0, W).
  * A view's geometry is one 3x3 affine matrix that maps continuous VIEW
    coordinates to continuous SOURCE image coordinates: source = A @ view.
    Matrices compose with `@`; the rightmost one acts first on view points.
  * Patches of a view of side S with patch size p are numbered row-major,
    index = row * (S // p) + col, the order of a ViT's patch embedding
    (a stride-p convolution) flattened.

Geometry: an Inception-style random resized crop (Szegedy et al., "Going
Deeper with Convolutions", CVPR 2015, as implemented by torchvision's
RandomResizedCrop, but with continuous boxes), then an optional horizontal
flip, rotation and translation. Colour: additive brightness and multiplicative
contrast jitter.

Typical use:

  settings = ViewSettings(size=224, patch_size=16)
  views, maps = paired_views(key, image, settings)  # (2, S, S, C), (2, P)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# Candidate (area, ratio) pairs drawn at once for a random resized crop; the
# first that fits is used (torchvision draws up to 10, one after the other).
_NUM_CROP_TRIALS = 10
# Relative slack when testing whether a candidate crop fits in the source, so
# that a crop of exactly the source's size (scale 1, ratio W/H) is not rejected
# for float rounding; a candidate that passes is clipped to the source.
_FIT_RTOL = 1e-5
# Uniform numbers per view: crop (area, ratio) trials, crop position (y, x),
# flip, rotation, translation (y, x).
_NUM_GEOMETRY_UNIFORMS = 2 * _NUM_CROP_TRIALS + 6


# ------------------------------------------------------------------- settings


def _is_int(value: Any) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
  return isinstance(value, (int, float, np.integer, np.floating)) and (
    not isinstance(value, bool)
  )


def _as_pair(name: str, value: Any) -> tuple[float, float]:
  """Returns `value` as a pair of floats or raises a ValueError naming it."""
  if (
    isinstance(value, (str, bytes))
    or not hasattr(value, '__len__')
    or len(value) != 2
    or not all(_is_real(v) for v in value)
  ):
    raise ValueError(f'{name}={value!r} must be a pair of numbers (min, max).')
  return float(value[0]), float(value[1])


@dataclasses.dataclass(frozen=True)
class ViewSettings:
  """How to make one augmented view; hashable, so a static jit argument.

  Attributes:
    size: side S of the square output view, in pixels.
    patch_size: ViT patch size p; S must be a multiple of p.
    crop_scale: (min, max) area of the crop as a fraction of the source area,
      sampled uniformly (Szegedy et al., 2015). 0 < min <= max <= 1.
    crop_ratio: (min, max) aspect ratio width / height of the crop, sampled
      log-uniformly. 0 < min <= max.
    flip: flip the view horizontally with probability 0.5.
    rotate_degrees: rotate by an angle uniform in [-d, d] degrees about the
      view centre; 0 <= d <= 180. May show points outside the source (filled).
    translate: shift by a fraction of S uniform in [-t, t] on each axis;
      0 <= t <= 1. May show points outside the source (filled).
    fill_value: value of view pixels whose centre falls outside the source.
    brightness: add a delta uniform in [-b, b] (images in [0, 1]); 0 <= b <= 1.
    contrast: scale deviations from the view's mean by a factor uniform in
      [1 - c, 1 + c]; 0 <= c <= 1.
    photometric: False switches brightness and contrast jitter off.
  """

  size: int
  patch_size: int
  crop_scale: tuple[float, float] = (0.35, 1.0)
  crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
  flip: bool = True
  rotate_degrees: float = 0.0
  translate: float = 0.0
  fill_value: float = 0.0
  brightness: float = 0.0
  contrast: float = 0.0
  photometric: bool = True

  def __post_init__(self):
    for name in ('size', 'patch_size'):
      value = getattr(self, name)
      if not _is_int(value) or value <= 0:
        raise ValueError(f'{name}={value!r} must be a positive integer.')
    if self.size % self.patch_size:
      raise ValueError(
        f'size={self.size} must be a multiple of patch_size={self.patch_size}.'
      )
    # Lists (e.g. from a config) become tuples so the settings stay hashable.
    scale = _as_pair('crop_scale', self.crop_scale)
    if not 0 < scale[0] <= scale[1] <= 1:
      raise ValueError(
        f'crop_scale={self.crop_scale!r} must satisfy 0 < min <= max <= 1.'
      )
    ratio = _as_pair('crop_ratio', self.crop_ratio)
    if not 0 < ratio[0] <= ratio[1] or not math.isfinite(ratio[1]):
      raise ValueError(
        f'crop_ratio={self.crop_ratio!r} must satisfy 0 < min <= max < inf.'
      )
    object.__setattr__(self, 'crop_scale', scale)
    object.__setattr__(self, 'crop_ratio', ratio)
    for name in ('flip', 'photometric'):
      value = getattr(self, name)
      if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f'{name}={value!r} must be a bool.')
      object.__setattr__(self, name, bool(value))
    limits = {
      'rotate_degrees': 180.0,
      'translate': 1.0,
      'brightness': 1.0,
      'contrast': 1.0,
    }
    for name, upper in limits.items():
      value = getattr(self, name)
      if not _is_real(value) or not 0 <= value <= upper:
        raise ValueError(f'{name}={value!r} must be a number in [0, {upper}].')
      object.__setattr__(self, name, float(value))
    if not _is_real(self.fill_value) or not math.isfinite(self.fill_value):
      raise ValueError(
        f'fill_value={self.fill_value!r} must be a finite number.'
      )
    object.__setattr__(self, 'fill_value', float(self.fill_value))

  @property
  def grid_size(self) -> int:
    """Patches per side of a view, S // p."""
    return self.size // self.patch_size

  @property
  def num_patches(self) -> int:
    """Patches per view, P = (S // p) ** 2."""
    return self.grid_size**2

  @classmethod
  def from_config(
    cls, cfg: Mapping[str, Any] | None, *, size: int, patch_size: int
  ) -> ViewSettings:
    """Builds settings from a dict or ml_collections.ConfigDict.

    Args:
      cfg: maps field names (all but `size` and `patch_size`) to values; lists
        are accepted for the pairs. Missing keys keep their defaults. None
        means all defaults.
      size: side S of the views.
      patch_size: ViT patch size p.

    Returns:
      The validated settings.

    Raises:
      ValueError: for an unknown key (the message lists the valid ones) or an
        invalid value (the message names the key and the value).
    """
    if cfg is None:
      cfg = {}
    if hasattr(cfg, 'to_dict'):
      cfg = cfg.to_dict()
    valid = sorted(
      f.name
      for f in dataclasses.fields(cls)
      if f.name not in ('size', 'patch_size')
    )
    unknown = sorted(set(cfg) - set(valid))
    if unknown:
      raise ValueError(
        f'Unknown augmentation keys {unknown}; valid keys are {valid}.'
      )
    return cls(size=size, patch_size=patch_size, **dict(cfg))


# ------------------------------------------------------------------- matrices


def _matrix(rows: list[list[Any]]) -> Array:
  """Stacks a nested list of scalars (Python or traced) into float32."""
  return jnp.stack(
    [jnp.stack([jnp.asarray(v, jnp.float32) for v in row]) for row in rows]
  )


def translation(ty: Any, tx: Any) -> Array:
  """Returns the (3, 3) matrix mapping (y, x) to (y + ty, x + tx)."""
  return _matrix([[1, 0, ty], [0, 1, tx], [0, 0, 1]])


def scaling(sy: Any, sx: Any) -> Array:
  """Returns the (3, 3) matrix mapping (y, x) to (sy * y, sx * x)."""
  return _matrix([[sy, 0, 0], [0, sx, 0], [0, 0, 1]])


def rotation(radians: Any, center: tuple[Any, Any] = (0.0, 0.0)) -> Array:
  """Returns the (3, 3) matrix rotating points about `center` = (cy, cx).

  With y pointing down the screen, a positive angle turns points
  counter-clockwise as displayed.

  Args:
    radians: the angle.
    center: (cy, cx), the fixed point.

  Returns:
    The (3, 3) float32 matrix.
  """
  cos, sin = jnp.cos(radians), jnp.sin(radians)
  turn = _matrix([[cos, -sin, 0], [sin, cos, 0], [0, 0, 1]])
  cy, cx = center
  return translation(cy, cx) @ turn @ translation(-cy, -cx)


def hflip(width: Any) -> Array:
  """Returns the (3, 3) matrix mirroring x in [0, width): x -> width - x.

  Pixel column c maps onto column width - 1 - c.
  """
  return _matrix([[1, 0, 0], [0, -1, width], [0, 0, 1]])


def invert_affine(affine: Array) -> Array:
  """Inverts a (3, 3) affine matrix (last row (0, 0, 1)) in closed form."""
  linear, shift = affine[:2, :2], affine[:2, 2]
  a, b, c, d = linear[0, 0], linear[0, 1], linear[1, 0], linear[1, 1]
  inv_linear = jnp.stack([jnp.stack([d, -b]), jnp.stack([-c, a])]) / (
    a * d - b * c
  )
  inv_shift = -inv_linear @ shift
  top = jnp.concatenate([inv_linear, inv_shift[:, None]], axis=1)
  return jnp.concatenate([top, jnp.array([[0, 0, 1]], top.dtype)], axis=0)


def apply_affine(affine: Array, y: Array, x: Array) -> tuple[Array, Array]:
  """Maps points (y, x) of any matching shapes through a (3, 3) affine."""
  new_y = affine[0, 0] * y + affine[0, 1] * x + affine[0, 2]
  new_x = affine[1, 0] * y + affine[1, 1] * x + affine[1, 2]
  return new_y, new_x


# ------------------------------------------------------------------- geometry


def _uniform(u: Array, low: float, high: float) -> Array:
  """Maps u ~ U[0, 1) onto U[low, high)."""
  return low + (high - low) * u


def _sample_crop_box(
  u: Array,
  source_hw: tuple[Any, Any],
  scale: tuple[float, float],
  ratio: tuple[float, float],
) -> tuple[Array, Array, Array, Array]:
  """Samples a continuous random resized crop box (y0, x0, h, w).

  Follows torchvision's RandomResizedCrop.get_params, vectorised: draws
  _NUM_CROP_TRIALS (area, ratio) pairs, keeps the first that fits inside the
  source, else falls back to the largest central crop whose ratio is clipped
  into `ratio`. The position is uniform among the valid ones.

  Args:
    u: (2 * _NUM_CROP_TRIALS + 2,) uniform [0, 1) numbers.
    source_hw: (H, W) of the source.
    scale: (min, max) area fraction.
    ratio: (min, max) width / height.

  Returns:
    Top, left, height and width of the box, float32 scalars.
  """
  src_h, src_w = (jnp.asarray(v, jnp.float32) for v in source_hw)
  u_area, u_ratio = jnp.split(u[: 2 * _NUM_CROP_TRIALS], 2)
  u_y, u_x = u[2 * _NUM_CROP_TRIALS], u[2 * _NUM_CROP_TRIALS + 1]
  area = _uniform(u_area, *scale) * src_h * src_w
  aspect = jnp.exp(_uniform(u_ratio, math.log(ratio[0]), math.log(ratio[1])))
  widths = jnp.sqrt(area * aspect)
  heights = jnp.sqrt(area / aspect)
  fits = (widths <= src_w * (1 + _FIT_RTOL)) & (
    heights <= src_h * (1 + _FIT_RTOL)
  )
  first = jnp.argmax(fits)
  # Fallback: the whole source when its ratio is in range, else the largest
  # crop of the extreme allowed ratio, centred.
  src_ratio = src_w / src_h
  fallback_w = jnp.where(src_ratio > ratio[1], src_h * ratio[1], src_w)
  fallback_h = jnp.where(src_ratio < ratio[0], src_w / ratio[0], src_h)
  found = fits.any()
  h = jnp.minimum(jnp.where(found, heights[first], fallback_h), src_h)
  w = jnp.minimum(jnp.where(found, widths[first], fallback_w), src_w)
  u_y = jnp.where(found, u_y, 0.5)
  u_x = jnp.where(found, u_x, 0.5)
  return u_y * (src_h - h), u_x * (src_w - w), h, w


def _geometry_from_uniforms(
  u: Array, source_hw: tuple[Any, Any], settings: ViewSettings
) -> Array:
  """The affine of one view from (_NUM_GEOMETRY_UNIFORMS,) U[0, 1) numbers."""
  size = settings.size
  num_crop = 2 * _NUM_CROP_TRIALS + 2
  u_flip, u_rotate, u_shift = u[num_crop], u[num_crop + 1], u[num_crop + 2 :]
  y0, x0, h, w = _sample_crop_box(
    u[:num_crop], source_hw, settings.crop_scale, settings.crop_ratio
  )
  affine = translation(y0, x0) @ scaling(h / size, w / size)
  if settings.flip:
    affine = affine @ jnp.where(u_flip < 0.5, hflip(size), jnp.eye(3))
  if settings.rotate_degrees:
    degrees = _uniform(
      u_rotate, -settings.rotate_degrees, settings.rotate_degrees
    )
    center = (size / 2, size / 2)
    affine = affine @ rotation(jnp.deg2rad(degrees), center)
  if settings.translate:
    shift = size * _uniform(u_shift, -settings.translate, settings.translate)
    affine = affine @ translation(shift[0], shift[1])
  return affine


def sample_view_geometry(
  key: Array, source_hw: tuple[Any, Any], settings: ViewSettings
) -> Array:
  """Samples the affine of one augmented view.

  The view point v maps to the source as crop @ flip @ rotate @ translate @ v:
  translation and rotation (about the view centre) act in view coordinates,
  then the optional flip, then the crop box scales [0, S)^2 onto the box.
  All random numbers come from one draw of fixed length, so a key gives the
  same crop whichever optional ops are on.

  Args:
    key: a PRNG key (typed or raw uint32).
    source_hw: (H, W) of the source image: Python numbers or scalar arrays
      (traced sizes work too).
    settings: the augmentation settings.

  Returns:
    (3, 3) float32 matrix mapping view coordinates to source coordinates.
  """
  u = jax.random.uniform(key, (_NUM_GEOMETRY_UNIFORMS,))
  return _geometry_from_uniforms(u, source_hw, settings)


def paired_affines(
  key: Array, source_hw: tuple[Any, Any], settings: ViewSettings
) -> Array:
  """Samples the affines of two views independently.

  Both views' numbers come from one draw, one row each, rather than from
  split keys: each threefry draw adds about 0.1-0.2 s of XLA:CPU compile time
  to every program that uses it.

  Args:
    key: a PRNG key (typed or raw uint32).
    source_hw: (H, W) of the source image.
    settings: the augmentation settings.

  Returns:
    (2, 3, 3) float32, view-to-source matrices of views 1 and 2.
  """
  u = jax.random.uniform(key, (2, _NUM_GEOMETRY_UNIFORMS))
  return jax.vmap(lambda u: _geometry_from_uniforms(u, source_hw, settings))(u)


# ------------------------------------------------------------------ rendering


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
  src_h, src_w = image.shape[:2]
  centres = jnp.arange(size, dtype=jnp.float32) + 0.5
  view_y, view_x = jnp.meshgrid(centres, centres, indexing='ij')
  src_y, src_x = apply_affine(affine, view_y, view_x)
  inside = (src_y >= 0) & (src_y < src_h) & (src_x >= 0) & (src_x < src_w)
  # map_coordinates puts pixel centres at integer coordinates.
  coords = [src_y - 0.5, src_x - 0.5]

  def sample(channel):
    return jax.scipy.ndimage.map_coordinates(
      channel, coords, order=1, mode='nearest'
    )

  view = jax.vmap(sample, in_axes=2, out_axes=2)(image)
  fill = jnp.asarray(fill_value, jnp.float32)
  return jnp.where(inside[..., None], view, fill)


def _has_jitter(settings: ViewSettings) -> bool:
  return settings.photometric and bool(settings.brightness or settings.contrast)


def _jitter_from_uniforms(
  u: Array, view: Array, settings: ViewSettings
) -> Array:
  """Contrast then brightness jitter from two U[0, 1) numbers."""
  b, c = settings.brightness, settings.contrast
  # Contrast first: its mean is then taken of the rendered view itself, which
  # XLA:CPU fuses well; a mean of the brightened view made a batch of jittered
  # views 3x slower to produce.
  if c:
    mean = view.mean()
    view = jnp.clip(mean + _uniform(u[1], 1 - c, 1 + c) * (view - mean), 0, 1)
  if b:
    view = jnp.clip(view + _uniform(u[0], -b, b), 0.0, 1.0)
  return view


def photometric(key: Array, view: Array, settings: ViewSettings) -> Array:
  """Contrast then brightness jitter, each clipped to [0, 1].

  Contrast maps x to mean + f * (x - mean), f ~ U[1 - c, 1 + c], with the
  mean over the whole view (all pixels and channels, fill included), as
  torchvision's ColorJitter does for grey images; brightness then adds
  delta ~ U[-b, b].

  Args:
    key: a PRNG key.
    view: (S, S, C) float in [0, 1].
    settings: the augmentation settings.

  Returns:
    The jittered view, or `view` itself when jitter is off or zero.
  """
  if not _has_jitter(settings):
    return view
  return _jitter_from_uniforms(jax.random.uniform(key, (2,)), view, settings)


# ------------------------------------------------------------ correspondences


def patch_index_map(
  affine_a: Array,
  affine_b: Array,
  size: int,
  patch_size: int,
  source_hw: tuple[int, int] | None = None,
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

  Returns:
    (P,) int32, P = (S // p) ** 2: a patch index of view b, or -1 where the
    point lies outside view b's [0, S) x [0, S) (or outside the source).
  """
  grid = size // patch_size
  centres = (jnp.arange(grid, dtype=jnp.float32) + 0.5) * patch_size
  a_y, a_x = jnp.meshgrid(centres, centres, indexing='ij')
  src_y, src_x = apply_affine(affine_a, a_y.ravel(), a_x.ravel())
  b_y, b_x = apply_affine(invert_affine(affine_b), src_y, src_x)
  valid = (b_y >= 0) & (b_y < size) & (b_x >= 0) & (b_x < size)
  if source_hw is not None:
    src_h, src_w = source_hw
    valid &= (src_y >= 0) & (src_y < src_h) & (src_x >= 0) & (src_x < src_w)
  row = jnp.floor(b_y / patch_size).astype(jnp.int32)
  col = jnp.floor(b_x / patch_size).astype(jnp.int32)
  return jnp.where(valid, row * grid + col, -1).astype(jnp.int32)


# ----------------------------------------------------------------- public API


def paired_views(
  key: Array, image: Array, settings: ViewSettings
) -> tuple[Array, Array]:
  """Two augmented views of one image and their patch correspondences.

  This is the input of the router-consistency loss (Kada et al., MIRU 2023):
  for patch i of view 1, `maps[0, i]` is the patch of view 2 that shows the
  same image point (the centre of patch i), or -1 if view 2 does not show it
  or it lies outside the source image; `maps[1]` is the same from view 2 to
  view 1. The maps are computed from the affines, not from pixels, and are not
  inverse permutations of each other in general (crops differ in scale).

  Random streams: `key` splits into (geometry, photometric) keys, and
  `paired_affines(jax.random.split(key)[0], ...)` reproduces the geometry.
  Each view gets its own numbers from each stream, so the two views are
  independent and identically distributed.

  Jit with `jax.jit(paired_views, static_argnames='settings')`; for a batch
  use `batched_paired_views`.

  Args:
    key: a PRNG key (typed `jax.random.key` or raw uint32 `PRNGKey`).
    image: (H, W, C) uint8 in [0, 255] or float in [0, 1]; C is 1 or 3.
    settings: the augmentation settings (size S, patch size p, ...).

  Returns:
    views: (2, S, S, C) float32 in [0, 1] (for a fill_value in [0, 1]).
    maps: (2, P) int32, P = (S // p) ** 2, patches numbered row-major.
  """
  source_hw = tuple(jnp.shape(image)[:2])
  key_geometry, key_photometric = jax.random.split(key)
  affines = paired_affines(key_geometry, source_hw, settings)  # (2, 3, 3)

  views = jax.vmap(
    lambda a: render_view(image, a, settings.size, settings.fill_value)
  )(affines)
  if _has_jitter(settings):
    u = jax.random.uniform(key_photometric, (2, 2))  # One row per view.
    views = jax.vmap(lambda u, v: _jitter_from_uniforms(u, v, settings))(
      u, views
    )

  def one_map(affine_a, affine_b):
    return patch_index_map(
      affine_a, affine_b, settings.size, settings.patch_size, source_hw
    )

  maps = jax.vmap(one_map)(affines, affines[::-1])
  return views, maps


def batched_paired_views(
  key: Array, images: Array, settings: ViewSettings
) -> tuple[Array, Array]:
  """`paired_views` over a batch, one key per image from jax.random.split.

  Args:
    key: a PRNG key.
    images: (B, H, W, C) uint8 or float in [0, 1].
    settings: the augmentation settings.

  Returns:
    views: (B, 2, S, S, C) float32; maps: (B, 2, P) int32.
  """
  keys = jax.random.split(key, images.shape[0])
  return jax.vmap(lambda k, im: paired_views(k, im, settings))(keys, images)


def center_view(image: Array, settings: ViewSettings) -> Array:
  """The deterministic evaluation view: the whole image resized to S x S.

  Same sampling as the training views (bilinear at pixel centres, so no
  antialiasing when shrinking); the aspect ratio is not kept. No jitter.

  Args:
    image: (H, W, C) uint8 or float in [0, 1].
    settings: the augmentation settings (only size and fill_value are used).

  Returns:
    (S, S, C) float32.
  """
  src_h, src_w = jnp.shape(image)[:2]
  size = settings.size
  affine = scaling(src_h / size, src_w / size)
  return render_view(image, affine, size, settings.fill_value)


def to_model_range(views: Array) -> Array:
  """[0, 1] pixels -> [-1, 1], vmoe's `value_range(-1, 1)`."""
  return views * 2.0 - 1.0

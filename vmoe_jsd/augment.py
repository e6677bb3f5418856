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
RandomResizedCrop, but with continuous boxes), sampled in the pixels of the
original image even when a stretched canvas of it is rendered (`orig_size`),
then an optional horizontal flip, rotation and translation, then optionally
RandAugment (Cubuk et al., CVPR-W 2020, arXiv:1909.13719) with the op list and
magnitude scaling vmoe trains with (`RANDAUGMENT_OPS`): its geometric ops
compose into the view's affine and its Cutout is an occlusion (both tracked,
so the maps stay exact and fill maps to -1), its colour ops act on pixel
values only. Colour: RandAugment's colour ops, additive brightness and
multiplicative contrast jitter. `mixup` (Zhang et al., ICLR 2018) mixes the
views of a batch as vmoe does, keeping each image's maps.

Typical use:

  settings = ViewSettings(size=224, patch_size=16)
  views, maps = paired_views(key, image, settings)  # (2, S, S, C), (2, P)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from vmoe_jsd import sharding

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

# RandAugment (Cubuk et al., "RandAugment: Practical automated data
# augmentation with a reduced search space", CVPR-W 2020, arXiv:1909.13719)
# as vmoe runs it: vmoe/data/pp_ops.py `randaug(num_layers, magnitude)` calls
# `distort_image_with_randaugment` of the TPU EfficientNet code, of which
# big_vision/pp/autoaugment.py is a copy. Its 16 ops in its order (the op id
# is the index); each layer picks one uniformly and always applies it.
RANDAUGMENT_OPS = (
  'AutoContrast', 'Equalize', 'Invert', 'Rotate',  # ids 0-3
  'Posterize', 'Solarize', 'Color', 'Contrast',  # 4-7
  'Brightness', 'Sharpness', 'ShearX', 'ShearY',  # 8-11
  'TranslateX', 'TranslateY', 'Cutout', 'SolarizeAdd',  # 12-15
)  # fmt: skip
# Composed into the view's affine (maps stay exact).
RANDAUGMENT_GEOMETRIC = (
  'Rotate', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY'
)  # fmt: skip
# An occlusion: part of the view shows fill instead of content. Handled with
# the geometry (its square moves with later geometric ops; patch centres in
# it show no image point, so their maps say -1), kept when photometric=False.
RANDAUGMENT_OCCLUSION = ('Cutout',)
# Colour ops: pixel values only, maps untouched; off when photometric=False.
RANDAUGMENT_PHOTOMETRIC = tuple(
  op
  for op in RANDAUGMENT_OPS
  if op not in RANDAUGMENT_GEOMETRIC + RANDAUGMENT_OCCLUSION
)
_OP_ID = {name: i for i, name in enumerate(RANDAUGMENT_OPS)}
# The reference's _MAX_LEVEL: every op scales magnitude / 10.
_RANDAUGMENT_LEVEL = 10.0
_MAX_RANDAUGMENT_LAYERS = 8
_MAX_RANDAUGMENT_MAGNITUDE = 20.0
# The reference's translate_const and cutout_const are pixels of the 224-px
# images vmoe augments; here they are that fraction of the view side S.
_REFERENCE_SIZE = 224
_TRANSLATE_PIXELS = 100
_CUTOUT_PIXELS = 40
# Uniform numbers per view and layer: op, sign, cutout centre (y, x).
_NUM_RANDAUGMENT_UNIFORMS = 4
# Check modes of a RandAugment layer (see `ViewGeometry`).
_NEVER, _FILL_OUTSIDE, _FILL_INSIDE = 0, 1, 2


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


def _check_randaugment(value: Any) -> tuple[int, float] | None:
  """Validates `ViewSettings.randaugment`; returns it as (int, float)."""
  if value is None:
    return None
  if (
    isinstance(value, (str, bytes))
    or not hasattr(value, '__len__')
    or len(value) != 2
    or not _is_int(value[0])
    or not _is_real(value[1])
    or not 1 <= value[0] <= _MAX_RANDAUGMENT_LAYERS
    or not 0 <= value[1] <= _MAX_RANDAUGMENT_MAGNITUDE
  ):
    raise ValueError(
      f'randaugment={value!r} must be None (off) or a pair (num_layers, '
      f'magnitude) with num_layers an integer in '
      f'[1, {_MAX_RANDAUGMENT_LAYERS}] and magnitude a number in '
      f'[0, {_MAX_RANDAUGMENT_MAGNITUDE}], e.g. (2, 10).'
    )
  return int(value[0]), float(value[1])


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
    photometric: False switches every photometric op off (brightness and
      contrast jitter, RandAugment's colour ops), keeping the geometry.
    randaugment: (num_layers N, magnitude M) of RandAugment (Cubuk et al.,
      2020) applied after the crop and flip, or None (off). N is an integer
      in [1, 8]; M a number in [0, 20] (vmoe's configs use 0 to 20; the ops
      scale M / 10). See `RANDAUGMENT_OPS` and `_randaugment_layers`.
    second_crop_scale: (min, max) crop area of view 2, or None (the same
      as `crop_scale`: the two views are identically distributed). Pairwise
      Router Consistency's (Kada et al., IEEE OJSP 2025) 384-px fine-tuning
      draws view 1 from 5-70% and view 2 from 60-100% of the image (its
      `decode_jpeg_and_ssl_augment`), so that the views overlap a lot.
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
  randaugment: tuple[int, float] | None = None
  second_crop_scale: tuple[float, float] | None = None

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
    if self.second_crop_scale is not None:
      second = _as_pair('second_crop_scale', self.second_crop_scale)
      if not 0 < second[0] <= second[1] <= 1:
        raise ValueError(
          f'second_crop_scale={self.second_crop_scale!r} must be None or '
          'satisfy 0 < min <= max <= 1.'
        )
      object.__setattr__(self, 'second_crop_scale', second)
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
    object.__setattr__(
      self, 'randaugment', _check_randaugment(self.randaugment)
    )

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


class ViewGeometry(NamedTuple):
  """Where a view's pixels come from, and which of them show fill.

  A view point p shows the source point `affine @ p`, unless it lies outside
  the source or some RandAugment layer k replaced it by fill. Layer k's check
  maps p into that layer's frame, q = checks[k] @ p, and compares q with the
  box [0, boxes[k, 0]) x [0, boxes[k, 1]): mode _FILL_OUTSIDE (geometric ops:
  the point came from outside the view they transformed) fills when q is
  outside, _FILL_INSIDE (Cutout: its square) when q is inside, _NEVER (colour
  ops) never. Without RandAugment the layer axis has length 0.

  Attributes:
    affine: (3, 3) view-to-source (canvas) matrix.
    checks: (L, 3, 3) view-to-layer-frame matrices.
    boxes: (L, 2) box sizes (height, width) of the checks.
    modes: (L,) int32 check modes.
    ops: (L,) int32 RandAugment op ids (indices into RANDAUGMENT_OPS).
  """

  affine: Array
  checks: Array
  boxes: Array
  modes: Array
  ops: Array


def _randaugment_layers(
  u: Array, settings: ViewSettings
) -> tuple[Array, Array, Array, Array, Array]:
  """The geometry of N RandAugment layers from (N, 4) U[0, 1) numbers.

  Magnitude scaling of the reference (M = magnitude, level = M / 10): Rotate
  by 30 * level degrees, ShearX/Y by 0.3 * level, TranslateX/Y by
  100 * level pixels of a 224-px view (that fraction of S here), each with a
  random sign (probability 1/2); Cutout fills a square of side
  2 * int(40 * level) px of 224 centred on a uniform pixel. The reference
  resamples the view after each op (nearest neighbour) and fills what came
  from outside it; here the ops compose into one affine (rendered once,
  bilinear, from the source) and the checks say what each op filled.

  Conventions of the reference in (y, x) view coordinates, pixel centres at
  +0.5: rotation about the view centre; ShearX maps output (y, x) to input
  (y, x + s * (y - 0.5)), ShearY to (y + s * (x - 0.5), x) (its transform
  works on pixel indices); TranslateX by t shows input x + t at x.

  Args:
    u: (N, _NUM_RANDAUGMENT_UNIFORMS) numbers: op, sign, cutout centre y, x.
    settings: the augmentation settings (size S, randaugment (N, M)).

  Returns:
    (R, checks, boxes, modes, ops): R (3, 3) = T_1 @ ... @ T_N maps the final
    view onto the view before RandAugment; the rest as in `ViewGeometry`.
  """
  size = float(settings.size)
  _, magnitude = settings.randaugment
  level = magnitude / _RANDAUGMENT_LEVEL
  scale = size / _REFERENCE_SIZE
  pad = int(_CUTOUT_PIXELS * level) * scale
  num_ops = len(RANDAUGMENT_OPS)
  ops = jnp.minimum(jnp.floor(u[:, 0] * num_ops), num_ops - 1).astype(jnp.int32)
  signs = jnp.where(u[:, 1] >= 0.5, 1.0, -1.0)
  eye = jnp.eye(3, dtype=jnp.float32)
  transforms = _layer_transforms(ops, signs, eye, size, level, scale)
  full, checks, boxes, modes = _layer_checks(u, ops, transforms, eye, size, pad)
  return full, checks, boxes, modes, ops


def _layer_transforms(
  ops: Array, signs: Array, eye: Array, size: float, level: float, scale: float
) -> list[Array]:
  """T_k of each layer: its geometric op's matrix, the identity for others."""
  shear = 0.3 * level
  shift = _TRANSLATE_PIXELS * level * scale
  half = translation(0.5, 0.5), translation(-0.5, -0.5)
  transforms = []
  for k in range(ops.shape[0]):
    op, sign = ops[k], signs[k]
    s = sign * shear
    candidates = {
      'Rotate': rotation(jnp.deg2rad(sign * 30.0 * level), (size / 2,) * 2),
      'ShearX': half[0] @ _matrix([[1, 0, 0], [s, 1, 0], [0, 0, 1]]) @ half[1],
      'ShearY': half[0] @ _matrix([[1, s, 0], [0, 1, 0], [0, 0, 1]]) @ half[1],
      'TranslateX': translation(0.0, sign * shift),
      'TranslateY': translation(sign * shift, 0.0),
    }
    transform = eye
    for name, matrix in candidates.items():
      transform = jnp.where(op == _OP_ID[name], matrix, transform)
    transforms.append(transform)
  return transforms


def _layer_checks(
  u: Array, ops: Array, transforms: list, eye: Array, size: float, pad: float
) -> tuple[Array, Array, Array, Array]:
  """(R, checks, boxes, modes) of the layers; see `_randaugment_layers`."""
  num_layers = len(transforms)
  # suffix[k] = T_{k+1} @ ... @ T_N maps the final view into the frame just
  # after layer k (0-based: after transforms[k]).
  suffix = [eye] * num_layers
  for k in range(num_layers - 2, -1, -1):
    suffix[k] = transforms[k + 1] @ suffix[k + 1]
  checks, boxes, modes = [], [], []
  is_geometric = jnp.isin(
    ops, jnp.array([_OP_ID[n] for n in RANDAUGMENT_GEOMETRIC])
  )

  def box(side):
    return jnp.full((2,), side, jnp.float32)

  for k in range(num_layers):
    cy = jnp.floor(u[k, 2] * size)
    cx = jnp.floor(u[k, 3] * size)
    cutout = translation(pad - cy, pad - cx) @ suffix[k]
    geometric = transforms[k] @ suffix[k]
    is_cutout = (ops[k] == _OP_ID['Cutout']) & (pad > 0)
    checks.append(jnp.where(is_cutout, cutout, geometric))
    boxes.append(jnp.where(is_cutout, box(2 * pad), box(size)))
    other = jnp.where(is_geometric[k], _FILL_OUTSIDE, _NEVER)
    modes.append(jnp.where(is_cutout, _FILL_INSIDE, other))
  full = transforms[0] @ suffix[0]
  stacked = jnp.stack(checks), jnp.stack(boxes), jnp.stack(modes)
  return full, stacked[0], stacked[1], stacked[2].astype(jnp.int32)


def _no_layers(affine: Array) -> ViewGeometry:
  return ViewGeometry(
    affine,
    jnp.zeros((0, 3, 3), jnp.float32),
    jnp.zeros((0, 2), jnp.float32),
    jnp.zeros((0,), jnp.int32),
    jnp.zeros((0,), jnp.int32),
  )


def _canvas_scaling(source_hw, canvas_hw) -> Array:
  """Original-image to canvas coordinates, for a resized (stretched) image."""
  src_h, src_w = (jnp.asarray(v, jnp.float32) for v in source_hw)
  return scaling(canvas_hw[0] / src_h, canvas_hw[1] / src_w)


def paired_geometry(
  key: Array,
  source_hw: tuple[Any, Any],
  settings: ViewSettings,
  canvas_hw: tuple[int, int] | None = None,
) -> ViewGeometry:
  """Samples the geometry of two views independently.

  Both views' numbers come from one draw, one row each, rather than from
  split keys: each threefry draw adds about 0.1-0.2 s of XLA:CPU compile time
  to every program that uses it. RandAugment draws its numbers from
  `jax.random.fold_in(key, 1)`, so the crop and flip do not depend on it.

  The crop is sampled in the coordinates of the source, `source_hw`, so its
  area fraction and aspect ratio hold in source pixels. When the image that
  is rendered is a canvas of another size (the source resized to
  `canvas_hw` without keeping its aspect ratio), the scaling from source to
  canvas is composed into each affine: the affines map views to the canvas.

  Args:
    key: a PRNG key (typed or raw uint32).
    source_hw: (H, W) of the source (original) image: numbers or scalar
      arrays (traced sizes work too).
    settings: the augmentation settings.
    canvas_hw: (H, W) of the rendered canvas, or None when the source is
      rendered itself.

  Returns:
    A ViewGeometry whose fields have a leading axis of 2 (the two views).
  """
  u = jax.random.uniform(key, (2, _NUM_GEOMETRY_UNIFORMS))
  if settings.second_crop_scale is None:
    affines = jax.vmap(
      lambda u: _geometry_from_uniforms(u, source_hw, settings)
    )(u)
  else:  # View 2 crops from its own area range; same numbers otherwise.
    second = dataclasses.replace(
      settings, crop_scale=settings.second_crop_scale
    )
    affines = jnp.stack([
      _geometry_from_uniforms(u[0], source_hw, settings),
      _geometry_from_uniforms(u[1], source_hw, second),
    ])  # fmt: skip
  if canvas_hw is not None:
    affines = _canvas_scaling(source_hw, canvas_hw) @ affines
  if settings.randaugment is None:
    return jax.vmap(_no_layers)(affines)
  num_layers = settings.randaugment[0]
  u_layers = jax.random.uniform(
    jax.random.fold_in(key, 1), (2, num_layers, _NUM_RANDAUGMENT_UNIFORMS)
  )
  full, checks, boxes, modes, ops = jax.vmap(
    lambda u: _randaugment_layers(u, settings)
  )(u_layers)
  return ViewGeometry(affines @ full, checks, boxes, modes, ops)


def paired_affines(
  key: Array, source_hw: tuple[Any, Any], settings: ViewSettings
) -> Array:
  """The affines of `paired_geometry` (the source rendered itself).

  Args:
    key: a PRNG key (typed or raw uint32).
    source_hw: (H, W) of the source image.
    settings: the augmentation settings.

  Returns:
    (2, 3, 3) float32, view-to-source matrices of views 1 and 2.
  """
  return paired_geometry(key, source_hw, settings).affine


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
  view_y, view_x = _pixel_centres(size)
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


def _layer_fills(geometry: ViewGeometry, y: Array, x: Array) -> Array:
  """(L, *y.shape) bool: whether RandAugment layer k filled view point (y, x).

  Args:
    geometry: one view's geometry (no leading view axis).
    y: view rows, any shape.
    x: view columns, same shape.

  Returns:
    For each layer, True where its check says fill.
  """

  def one(check, box, mode):
    q_y, q_x = apply_affine(check, y, x)
    inside = (q_y >= 0) & (q_y < box[0]) & (q_x >= 0) & (q_x < box[1])
    return jnp.where(
      mode == _FILL_OUTSIDE, ~inside, (mode == _FILL_INSIDE) & inside
    )

  return jax.vmap(one)(geometry.checks, geometry.boxes, geometry.modes)


def fill_stages(
  geometry: ViewGeometry, source_hw: tuple[int, int], y: Array, x: Array
) -> Array:
  """Which step of the augmentation last replaced view point (y, x) by fill.

  Args:
    geometry: one view's geometry (no leading view axis).
    source_hw: (H, W) of the rendered source (canvas).
    y: view rows, any shape.
    x: view columns, same shape.

  Returns:
    int32 of y's shape: -1 where the point shows image content, 0 where it
    maps outside the source (and no layer filled it later), k in [1, N] where
    RandAugment layer k (1-based) was the last to fill it.
  """
  src_y, src_x = apply_affine(geometry.affine, y, x)
  src_h, src_w = source_hw
  inside = (src_y >= 0) & (src_y < src_h) & (src_x >= 0) & (src_x < src_w)
  stage = jnp.where(inside, -1, 0).astype(jnp.int32)
  fills = _layer_fills(geometry, y, x)
  for k in range(fills.shape[0]):
    stage = jnp.where(fills[k], k + 1, stage)
  return stage


def _pixel_centres(size: int) -> tuple[Array, Array]:
  centres = jnp.arange(size, dtype=jnp.float32) + 0.5
  return jnp.meshgrid(centres, centres, indexing='ij')


# ----------------------------------------------------- RandAugment colour ops
#
# On views quantised to the integers 0..255 (float32, exact), as the
# reference works on uint8; float -> uint8 casts truncate, as TensorFlow's.


def _to_uint8_range(x: Array) -> Array:
  """Truncates into 0..255 like the reference's clip then uint8 cast."""
  return jnp.floor(jnp.clip(x, 0.0, 255.0))


def _blend(degenerate: Array, image: Array, factor: float) -> Array:
  """PIL-style enhance: degenerate + factor * (image - degenerate)."""
  if factor == 0.0:
    return degenerate
  if factor == 1.0:
    return image
  return _to_uint8_range(degenerate + factor * (image - degenerate))


def _grey(x: Array) -> Array:
  """(S, S, 1) grey level as tf.image.rgb_to_grayscale gives it for uint8.

  Luma weights (0.2989, 0.5870, 0.1140) on x / 255, back to uint8 by
  truncating value * 255.5 (TensorFlow's float -> uint8 conversion). A
  one-channel image is its own grey level.
  """
  if x.shape[-1] == 1:
    return x
  weights = jnp.array([0.2989, 0.5870, 0.1140], jnp.float32)
  grey = jnp.sum((x / 255.0) * weights, axis=-1, keepdims=True)
  return jnp.floor(grey * 255.5)


def _apply_lut(lut: Array, x: Array) -> Array:
  """Per-channel lookup: out[..., c] = lut[c, x[..., c]] for 0..255 values."""
  channels = jnp.arange(x.shape[-1])
  return lut.T[x.astype(jnp.int32), channels]


def _autocontrast_lut(x: Array) -> Array:
  """(C, 256) AutoContrast: each channel's [min, max] stretched to [0, 255]."""
  lo = jnp.min(x, axis=(0, 1))[:, None]
  hi = jnp.max(x, axis=(0, 1))[:, None]
  values = jnp.arange(256, dtype=jnp.float32)[None]
  scale = 255.0 / jnp.where(hi > lo, hi - lo, 1.0)
  stretched = _to_uint8_range(values * scale - lo * scale)
  return jnp.where(hi > lo, stretched, values)


def _equalize_lut(x: Array) -> Array:
  """(C, 256) Equalize, PIL's ImageOps.equalize per channel."""

  def one(channel):
    values = channel.astype(jnp.int32).ravel()
    hist = jnp.zeros((256,), jnp.int32).at[values].add(1)
    # Number of pixels minus the count of the brightest value present.
    step = (values.size - hist[jnp.max(values)]) // 255
    lut = (jnp.cumsum(hist) + step // 2) // jnp.maximum(step, 1)
    lut = jnp.concatenate([jnp.zeros((1,), jnp.int32), lut[:-1]])
    identity = jnp.arange(256, dtype=jnp.float32)
    return jnp.where(step == 0, identity, jnp.clip(lut, 0, 255))

  return jax.vmap(one, in_axes=2)(x).astype(jnp.float32)


def _autocontrast(x: Array) -> Array:
  return _apply_lut(_autocontrast_lut(x), x)


def _equalize(x: Array) -> Array:
  return _apply_lut(_equalize_lut(x), x)


def _sharpen(x: Array, factor: float) -> Array:
  """Blend with PIL's SMOOTH filter (3x3, centre 5, others 1, / 13).

  The filtered image keeps the original values on its one-pixel border.
  """
  # 3x3 box sum, separable (integer sums: exact in float32), plus 4 centres.
  rows = x[:-2] + x[1:-1] + x[2:]
  total = rows[:, :-2] + rows[:, 1:-1] + rows[:, 2:] + 4.0 * x[1:-1, 1:-1]
  smooth = _to_uint8_range(total / 13.0)
  smooth = x.at[1:-1, 1:-1].set(smooth)
  return _blend(smooth, x, factor)


# Colour ops that act on each value alone (their tables depend on no pixel).
_POINTWISE_OPS = (
  'Invert', 'Posterize', 'Solarize', 'SolarizeAdd', 'Contrast', 'Brightness'
)  # fmt: skip


def _photometric_ops(magnitude: float, size: int) -> dict[str, Any]:
  """Name -> function of a 0..255 view, at the reference's magnitude scaling.

  level = magnitude / 10: Posterize keeps int(4 * level) bits, Solarize
  inverts values >= int(256 * level) (none at level 1: the reference's
  threshold is then 256), SolarizeAdd adds int(110 * level) to values below
  128; Color, Contrast, Brightness and Sharpness blend with factor
  1.8 * level + 0.1 (no random sign). Contrast blends towards a constant
  grey of int(min(S * S / 256, 255)), not towards the mean grey level as
  PIL does: the reference takes the sum of a 256-bin histogram (the pixel
  count) divided by 256 as its "mean"; kept, as this is what vmoe trained
  with (196 for 224-px views).
  """
  level = magnitude / _RANDAUGMENT_LEVEL
  factor = 1.8 * level + 0.1
  shift = 8 - int(4 * level)
  threshold = int(256 * level)
  addition = int(110 * level)
  contrast_grey = float(int(min(size * size / 256.0, 255.0)))
  return {
    'AutoContrast': _autocontrast,
    'Equalize': _equalize,
    'Invert': lambda x: 255.0 - x,
    'Posterize': lambda x: jnp.floor(x / 2.0**shift) * 2.0**shift,
    'Solarize': lambda x: jnp.where(x < threshold, x, 255.0 - x),
    'SolarizeAdd': lambda x: jnp.where(
      x < 128, jnp.clip(x + addition, 0.0, 255.0), x
    ),
    'Color': lambda x: _blend(jnp.broadcast_to(_grey(x), x.shape), x, factor),
    'Contrast': lambda x: _blend(jnp.full_like(x, contrast_grey), x, factor),
    'Brightness': lambda x: _blend(jnp.zeros_like(x), x, factor),
    'Sharpness': lambda x: _sharpen(x, factor),
  }


def randaugment_photometric(
  view: Array, stage: Array, ops: Array, settings: ViewSettings
) -> Array:
  """Applies a rendered view's RandAugment layers in order, on pixel values.

  Colour ops act on the whole view (fill included). A geometric or Cutout
  layer k sets the pixels it filled (`stage == k`) to the fill value, so a
  fill made before a colour op goes through that op, as in the reference.
  Difference from the reference: a colour op before a geometric one sees
  the pixels in their final places (its statistics, such as AutoContrast's
  min and max, cover the final view's content rather than the pre-op view).

  Args:
    view: (S, S, C) float in [0, 1], rendered with the full affine; pixels
      with `stage == 0` already hold the fill value.
    stage: (S, S) int32 from `fill_stages` at the pixel centres.
    ops: (N,) int32 op ids.
    settings: the augmentation settings (photometric must be True).

  Returns:
    (S, S, C) float32 in [0, 1], multiples of 1 / 255.
  """
  functions = _photometric_ops(settings.randaugment[1], settings.size)
  fill = jnp.clip(jnp.round(settings.fill_value * 255.0), 0.0, 255.0)
  x = jnp.clip(jnp.round(view * 255.0), 0.0, 255.0)
  values = jnp.arange(256, dtype=jnp.float32)
  channels = x.shape[-1]
  # Every op but Color and Sharpness maps each channel's 256 values through
  # a table: the layer's table is chosen first, then applied in one lookup
  # (under vmap, a per-view choice computes every branch; tables are cheap).
  tables = {name: functions[name](values) for name in _POINTWISE_OPS}
  for k in range(ops.shape[0]):
    op = ops[k]
    lut = jnp.broadcast_to(values, (channels, 256))
    for name, table in tables.items():
      lut = jnp.where(op == _OP_ID[name], table[None], lut)
    lut = jnp.where(op == _OP_ID['AutoContrast'], _autocontrast_lut(x), lut)
    lut = jnp.where(op == _OP_ID['Equalize'], _equalize_lut(x), lut)
    out = _apply_lut(lut, x)
    for name in ('Color', 'Sharpness'):
      out = jnp.where(op == _OP_ID[name], functions[name](x), out)
    x = jnp.where((stage == k + 1)[..., None], fill, out)
  return x / 255.0


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
  valid = (b_y >= 0) & (b_y < size) & (b_x >= 0) & (b_x < size)
  if source_hw is not None:
    src_h, src_w = source_hw
    valid &= (src_y >= 0) & (src_y < src_h) & (src_x >= 0) & (src_x < src_w)
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
  """Renders one view of `geometry` and says which pixels show fill.

  Args:
    image: (H, W, C) uint8 or float in [0, 1] (the canvas).
    geometry: one view's geometry.
    settings: the augmentation settings.

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


# ----------------------------------------------------------------- public API


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
  if orig_size is None:
    geometry = paired_geometry(key_geometry, canvas_hw, settings)
  else:
    orig = jnp.asarray(orig_size, jnp.float32)
    geometry = paired_geometry(
      key_geometry, (orig[0], orig[1]), settings, canvas_hw
    )
  views = _render_pair(image, geometry, settings)
  if _has_jitter(settings):
    u = jax.random.uniform(key_photometric, (2, 2))  # One row per view.
    views = jax.vmap(lambda u, v: _jitter_from_uniforms(u, v, settings))(
      u, views
    )
  return views, _paired_maps(geometry, settings, canvas_hw)


def _render_pair(
  image: Array, geometry: ViewGeometry, settings: ViewSettings
) -> Array:
  """(2, S, S, C) views of `geometry`, with RandAugment's fill and colours."""
  if settings.randaugment is None:
    return jax.vmap(
      lambda a: render_view(image, a, settings.size, settings.fill_value)
    )(geometry.affine)
  views, stages = jax.vmap(lambda g: render_geometry(image, g, settings))(
    geometry
  )
  if settings.photometric:
    return jax.vmap(lambda v, s, o: randaugment_photometric(v, s, o, settings))(
      views, stages, geometry.ops
    )
  return jnp.where(stages[..., None] >= 0, settings.fill_value, views)


def _paired_maps(
  geometry: ViewGeometry, settings: ViewSettings, canvas_hw: tuple[int, int]
) -> Array:
  """(2, P) maps from view 1 to view 2 and back (see `paired_views`)."""
  layers = settings.randaugment is not None

  def one_map(a, b):
    return patch_index_map(
      a.affine, b.affine, settings.size, settings.patch_size, canvas_hw,
      a if layers else None, b if layers else None,
    )  # fmt: skip

  swapped = jax.tree.map(lambda x: x[::-1], geometry)
  return jax.vmap(one_map)(geometry, swapped)


def batched_paired_views(
  key: Array,
  images: Array,
  settings: ViewSettings,
  orig_sizes: Array | None = None,
) -> tuple[Array, Array]:
  """`paired_views` over a batch, one key per image from jax.random.split.

  Args:
    key: a PRNG key.
    images: (B, H, W, C) uint8 or float in [0, 1].
    settings: the augmentation settings.
    orig_sizes: None, or (B, 2) (height, width) of each original image that
      was resized into its (H, W) canvas (see `paired_views`).

  Returns:
    views: (B, 2, S, S, C) float32; maps: (B, 2, P) int32.
  """
  keys = jax.random.split(key, images.shape[0])
  if orig_sizes is None:
    return jax.vmap(lambda k, im: paired_views(k, im, settings))(keys, images)
  return jax.vmap(lambda k, im, o: paired_views(k, im, settings, o))(
    keys, images, orig_sizes
  )


def mixup(
  key: Array,
  views: Array,
  maps: Array,
  labels: Array,
  *,
  concentration: float,
  num_classes: int,
  num_groups: int = 1,
) -> tuple[Array, Array, Array, Array]:
  """Mixup of paired views (Zhang et al., ICLR 2018), as vmoe's "light1".

  vmoe (vmoe/train/trainer.py `mixup`, granularity 'device', size 2) draws
  one weight pair from Dirichlet(concentration, concentration) per device,
  sorts it so the larger weight lambda >= 1/2 comes first, and mixes every
  example i of the device's shard with the next one, i + 1 (cyclically,
  `jnp.roll` inside the shard): x_i' = lambda x_i + (1 - lambda) x_{i+1}, and
  the same for the one-hot labels.

  With two views, the rule here (what the consistency loss sees): both views
  of image i are mixed with the views of the same partner j = i + 1 with the
  same lambda, view 1 with view 1 and view 2 with view 2. The sorting makes
  image i the dominant one in both (lambda >= 1/2 always), so the patch
  correspondences are image i's: `maps` come back unchanged. A point of
  image i shown by patch a of view 1 and patch b of view 2 is shown, with
  weight lambda, by both mixed patches; the overlay of image j (weight
  1 - lambda <= 1/2) follows j's own correspondences, which are ignored (at
  lambda = 1/2 exactly, image i is still the one followed).

  Groups: the batch axis is cut into `num_groups` contiguous blocks of equal
  size (pass the number of devices the batch is split over: each block is
  then one device's shard, as `jax.device_put` with a batch-sharded
  NamedSharding lays it out); partners and lambdas never cross a block, so
  no data moves between devices (the roll is inside each shard). Under an
  active (data, expert) mesh the weights are drawn replicated.

  Args:
    key: a PRNG key.
    views: (B, 2, S, S, C) the two views of each image.
    maps: (B, 2, P) their patch correspondences.
    labels: (B,) integer class ids or (B, num_classes) targets.
    concentration: Dirichlet concentration, > 0 (vmoe's light1: 0.2).
    num_classes: number of classes of the integer labels.
    num_groups: number of blocks (devices); must divide B.

  Returns:
    views: (B, 2, S, S, C) mixed views.
    maps: (B, 2, P) unchanged (image i's).
    targets: (B, num_classes) float32 soft labels.
    lam: (num_groups,) float32 weight of each block's own images, >= 1/2.

  Raises:
    ValueError: for concentration <= 0 or num_groups not dividing B.
  """
  _check_mixup(concentration, num_groups, views.shape[0])
  if jnp.issubdtype(labels.dtype, jnp.integer):
    targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  else:
    targets = labels.astype(jnp.float32)
  weights = jax.random.dirichlet(
    key, jnp.full((2,), concentration, jnp.float32), (num_groups,)
  )
  # Drawn whole on every device: left to propagation, the draw is split over
  # the devices and its rejection loop all-reduces a stop flag per round.
  weights = sharding.constrain(weights, jax.sharding.PartitionSpec())
  lam = jnp.max(weights, axis=-1)  # vmoe sorts: the larger weight first.
  return _mix(views, lam), maps, _mix(targets, lam), lam


def _check_mixup(concentration: Any, num_groups: Any, batch: int) -> None:
  if not _is_real(concentration) or not 0 < concentration < math.inf:
    raise ValueError(
      f'mixup concentration={concentration!r} must be a number > 0 (0 means '
      'no mixup: do not call mixup then).'
    )
  if not _is_int(num_groups) or num_groups < 1 or batch % num_groups:
    raise ValueError(
      f'num_groups={num_groups!r} must be a positive integer dividing the '
      f'batch size {batch}.'
    )


def _mix(x: Array, lam: Array) -> Array:
  """Mixes each of len(lam) blocks of x's rows with the next row (cyclic)."""
  num_groups = lam.shape[0]
  grouped = x.reshape(num_groups, x.shape[0] // num_groups, *x.shape[1:])
  partner = jnp.roll(grouped, -1, axis=1)
  weight = lam.reshape((num_groups,) + (1,) * (grouped.ndim - 1))
  mixed = weight * grouped + (1 - weight) * partner
  return mixed.reshape(x.shape).astype(x.dtype)


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

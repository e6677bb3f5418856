"""Affine geometry of a view: matrices, random crops, RandAugment's layers.

Coordinate convention (used by every module of the package):
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
original image even when a stretched canvas of it is rendered, then an
optional horizontal flip, rotation and translation, then optionally
RandAugment's geometric ops and Cutout (settings.py), tracked as checks of
which view points show fill (`ViewGeometry`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from vmoe_jsd.augment.settings import (
  OP_ID,
  RANDAUGMENT_GEOMETRIC,
  RANDAUGMENT_LEVEL,
  RANDAUGMENT_OPS,
  ViewSettings,
)

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
# The reference's translate_const and cutout_const are pixels of the 224-px
# images vmoe augments; here they are that fraction of the view side S.
_REFERENCE_SIZE = 224
_TRANSLATE_PIXELS = 100
_CUTOUT_PIXELS = 40
# Uniform numbers per view and layer: op, sign, cutout centre (y, x).
_NUM_RANDAUGMENT_UNIFORMS = 4
# Check modes of a RandAugment layer (see `ViewGeometry`).
NEVER, FILL_OUTSIDE, FILL_INSIDE = 0, 1, 2


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
  """The (3, 3) matrix rotating points by `radians` about (cy, cx) = `center`.

  With y pointing down the screen, a positive angle turns points
  counter-clockwise as displayed.
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


def uniform(u: Array, low: float, high: float) -> Array:
  """Maps u ~ U[0, 1) onto U[low, high)."""
  return low + (high - low) * u


def _sample_crop_box(
  u: Array,
  source_hw: tuple[Any, Any],
  scale: tuple[float, float],
  ratio: tuple[float, float],
) -> tuple[Array, Array, Array, Array]:
  """Samples a continuous random resized crop box (y0, x0, h, w).

  Follows torchvision's RandomResizedCrop.get_params, vectorised: from
  u, (2 * _NUM_CROP_TRIALS + 2,) U[0, 1) numbers, draws _NUM_CROP_TRIALS
  (area fraction in `scale`, width / height in `ratio`) pairs, keeps the
  first that fits inside the source, else falls back to the largest central
  crop whose ratio is clipped into `ratio`. The position is uniform among
  the valid ones. Returns float32 scalars: top, left, height, width.
  """
  src_h, src_w = (jnp.asarray(v, jnp.float32) for v in source_hw)
  u_area, u_ratio = jnp.split(u[: 2 * _NUM_CROP_TRIALS], 2)
  u_y, u_x = u[2 * _NUM_CROP_TRIALS], u[2 * _NUM_CROP_TRIALS + 1]
  area = uniform(u_area, *scale) * src_h * src_w
  aspect = jnp.exp(uniform(u_ratio, math.log(ratio[0]), math.log(ratio[1])))
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
    max_degrees = settings.rotate_degrees
    degrees = uniform(u_rotate, -max_degrees, max_degrees)
    affine = affine @ rotation(jnp.deg2rad(degrees), (size / 2, size / 2))
  if settings.translate:
    shift = size * uniform(u_shift, -settings.translate, settings.translate)
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
  same crop whichever optional ops are on. `source_hw`, (H, W) of the
  source, may hold Python numbers or (traced) scalar arrays.

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
  box [0, boxes[k, 0]) x [0, boxes[k, 1]): mode FILL_OUTSIDE (geometric ops:
  the point came from outside the view they transformed) fills when q is
  outside, FILL_INSIDE (Cutout: its square) when q is inside, NEVER (colour
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

  A row of `u` holds the numbers of a layer: op, sign, cutout centre y, x.
  Returns (R, checks, boxes, modes, ops): R (3, 3) = T_1 @ ... @ T_N maps the
  final view onto the view before RandAugment; the rest as in `ViewGeometry`.
  """
  size = float(settings.size)
  _, magnitude = settings.randaugment
  level = magnitude / RANDAUGMENT_LEVEL
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
      transform = jnp.where(op == OP_ID[name], matrix, transform)
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
    ops, jnp.array([OP_ID[n] for n in RANDAUGMENT_GEOMETRIC])
  )
  box = lambda side: jnp.full((2,), side, jnp.float32)
  for k in range(num_layers):
    cy = jnp.floor(u[k, 2] * size)
    cx = jnp.floor(u[k, 3] * size)
    cutout = translation(pad - cy, pad - cx) @ suffix[k]
    geometric = transforms[k] @ suffix[k]
    is_cutout = (ops[k] == OP_ID['Cutout']) & (pad > 0)
    checks.append(jnp.where(is_cutout, cutout, geometric))
    boxes.append(jnp.where(is_cutout, box(2 * pad), box(size)))
    other = jnp.where(is_geometric[k], FILL_OUTSIDE, NEVER)
    modes.append(jnp.where(is_cutout, FILL_INSIDE, other))
  full = transforms[0] @ suffix[0]
  stacked = jnp.stack(checks), jnp.stack(boxes), jnp.stack(modes)
  return full, stacked[0], stacked[1], stacked[2].astype(jnp.int32)


def _no_layers(affine: Array) -> ViewGeometry:
  checks = jnp.zeros((0, 3, 3), jnp.float32)
  boxes = jnp.zeros((0, 2), jnp.float32)
  ids = jnp.zeros((0,), jnp.int32)
  return ViewGeometry(affine, checks, boxes, ids, ids)


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
  `canvas_hw` is None when the source is rendered itself; `source_hw` may
  hold (traced) scalar arrays.

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
    first = _geometry_from_uniforms(u[0], source_hw, settings)
    last = _geometry_from_uniforms(u[1], source_hw, second)
    affines = jnp.stack([first, last])
  if canvas_hw is not None:  # Then original-image to canvas coordinates.
    src_h, src_w = (jnp.asarray(v, jnp.float32) for v in source_hw)
    affines = scaling(canvas_hw[0] / src_h, canvas_hw[1] / src_w) @ affines
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
  """(2, 3, 3) view-to-source affines of `paired_geometry`'s two views."""
  return paired_geometry(key, source_hw, settings).affine

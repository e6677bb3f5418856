"""Tests for vmoe_jsd.augment: geometry, rendering, correspondences, jitter.

The patch correspondences are checked against a brute-force reference that
looks only at pixels: a source image whose pixels hold their own coordinates
is rendered into both views, and each patch centre of view a is located in
view b from the rendered coordinates alone.
"""

import dataclasses
import functools
import math
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import PIL.Image
import PIL.ImageOps
import pytest

from vmoe_jsd import augment, sharding
from vmoe_jsd.augment.colour import _photometric_ops
from vmoe_jsd.augment.geometry import FILL_OUTSIDE, NEVER, _randaugment_layers

FILL = -1000.0

# One compiled program per (settings, image shape), shared by the tests.
_paired_views = jax.jit(augment.paired_views, static_argnames='settings')
_batched_paired_views = jax.jit(
  augment.batched_paired_views, static_argnames='settings'
)


def _coordinate_image(height, width):
  """(H, W, 2) float32: channel 0 is the row centre, 1 the column centre."""
  rows = np.arange(height) + 0.5
  cols = np.arange(width) + 0.5
  grid_y, grid_x = np.meshgrid(rows, cols, indexing='ij')
  return np.stack([grid_y, grid_x], axis=-1).astype(np.float32)


def _random_image(shape, seed=0):
  return np.random.RandomState(seed).randint(0, 256, shape).astype(np.uint8)


# ---------------------------------------------------------------- settings


def test_settings_are_hashable_and_have_the_documented_defaults():
  settings = augment.ViewSettings(size=24, patch_size=4)
  assert settings.crop_scale == (0.35, 1.0)
  assert settings.crop_ratio == (3 / 4, 4 / 3)
  assert settings.flip and settings.photometric
  assert settings.rotate_degrees == settings.translate == 0.0
  assert settings.brightness == settings.contrast == settings.fill_value == 0.0
  assert (settings.grid_size, settings.num_patches) == (6, 36)
  assert hash(settings) == hash(augment.ViewSettings(size=24, patch_size=4))


def test_from_config_accepts_lists_and_config_dicts():
  cfg = {
    'crop_scale': [0.5, 1.0],
    'crop_ratio': [1, 2],
    'brightness': 0.1,
    'randaugment': [2, 10],
  }
  from_dict = augment.ViewSettings.from_config(cfg, size=16, patch_size=4)
  from_config_dict = augment.ViewSettings.from_config(
    ml_collections.ConfigDict(cfg), size=16, patch_size=4
  )
  expected = augment.ViewSettings(
    size=16,
    patch_size=4,
    crop_scale=(0.5, 1.0),
    crop_ratio=(1.0, 2.0),
    brightness=0.1,
    randaugment=(2, 10.0),
  )
  assert from_dict == from_config_dict == expected
  assert from_dict.randaugment == (2, 10.0)
  hash(from_dict)
  assert augment.ViewSettings.from_config(
    None, size=16, patch_size=4
  ) == augment.ViewSettings(size=16, patch_size=4)


@pytest.mark.parametrize(
  'kwargs, fragments',
  [
    (dict(size=24, patch_size=5), ['size=24', 'patch_size=5']),
    (dict(size=0), ['size=0']),
    (dict(crop_scale=(0.0, 1.0)), ['crop_scale', '(0.0, 1.0)']),
    (dict(crop_scale=(0.5, 1.5)), ['crop_scale', '1.5']),
    (dict(crop_scale=(0.9, 0.5)), ['crop_scale', '(0.9, 0.5)']),
    (dict(crop_scale=(0.5,)), ['crop_scale', '(0.5,)']),
    (dict(crop_ratio=(0.0, 1.0)), ['crop_ratio', '(0.0, 1.0)']),
    (dict(crop_ratio=(2.0, 1.0)), ['crop_ratio', '(2.0, 1.0)']),
    (dict(brightness=-0.25), ['brightness', '-0.25']),
    (dict(contrast=-0.5), ['contrast', '-0.5']),
    (dict(contrast=1.5), ['contrast', '1.5']),
    (dict(rotate_degrees=-5), ['rotate_degrees', '-5']),
    (dict(translate=-0.1), ['translate', '-0.1']),
    (dict(flip='yes'), ['flip', 'yes']),
    (dict(fill_value=float('nan')), ['fill_value', 'nan']),
    (dict(randaugment=(0, 10)), ['randaugment', '(0, 10)']),
    (dict(randaugment=(2, 25)), ['randaugment', '(2, 25)']),
    (dict(randaugment=(2.5, 10)), ['randaugment', '(2.5, 10)']),
    (dict(randaugment=(2,)), ['randaugment', '(2,)']),
    (dict(randaugment='2,10'), ['randaugment', "'2,10'"]),
  ],
)
def test_bad_settings_raise_naming_the_value(kwargs, fragments):
  kwargs = dict(dict(size=24, patch_size=4), **kwargs)
  with pytest.raises(ValueError) as error:
    augment.ViewSettings(**kwargs)
  for fragment in fragments:
    assert fragment in str(error.value)
  config = {k: v for k, v in kwargs.items() if k not in ('size', 'patch_size')}
  with pytest.raises(ValueError) as error:
    augment.ViewSettings.from_config(
      config, size=kwargs['size'], patch_size=kwargs['patch_size']
    )
  for fragment in fragments:
    assert fragment in str(error.value)


def test_from_config_rejects_unknown_keys_listing_valid_ones():
  with pytest.raises(ValueError, match=re.escape("['crop_scal']")) as error:
    augment.ViewSettings.from_config(
      {'crop_scal': (0.3, 1.0)}, size=16, patch_size=4
    )
  assert "'crop_scale'" in str(error.value)
  assert "'size'" not in str(error.value)


# ---------------------------------------------------------------- matrices


def _apply(affine, y, x):
  return np.asarray(affine, np.float64) @ np.array([y, x, 1.0])


@jax.jit
def _example_matrices():
  # One program instead of many eagerly compiled small ops.
  composed = (
    augment.translation(1.0, 2.0)
    @ augment.rotation(0.3, (4.0, 5.0))
    @ augment.scaling(1.5, -0.7)
  )
  return dict(
    translation=augment.translation(2.0, -3.0),
    scaling=augment.scaling(2.0, 0.5),
    hflip=augment.hflip(10),
    quarter=augment.rotation(np.pi / 2, center=(2.0, 3.0)),
    composed=composed,
    inverse=augment.invert_affine(composed),
  )


def test_matrix_helpers_move_points_as_documented():
  matrices = _example_matrices()
  assert all(m.dtype == jnp.float32 for m in matrices.values())
  np.testing.assert_allclose(
    _apply(matrices['translation'], 1.0, 1.0), [3, -2, 1]
  )
  np.testing.assert_allclose(_apply(matrices['scaling'], 3.0, 4.0), [6, 2, 1])
  # Column c of a width-10 image maps onto column 9 - c (centres 0.5, 9.5).
  np.testing.assert_allclose(_apply(matrices['hflip'], 5.0, 0.5), [5, 9.5, 1])
  # A quarter turn about (2, 3): one step right of the centre becomes one
  # step up (counter-clockwise on screen, y pointing down).
  quarter = matrices['quarter']
  np.testing.assert_allclose(_apply(quarter, 2.0, 4.0), [1, 3, 1], atol=1e-6)
  np.testing.assert_allclose(_apply(quarter, 2.0, 3.0), [2, 3, 1], atol=1e-6)
  np.testing.assert_allclose(
    matrices['inverse'],
    np.linalg.inv(np.asarray(matrices['composed'], np.float64)),
    rtol=1e-5,
    atol=1e-5,
  )


# ---------------------------------------------- brute-force correspondences


def _in_linear_region(values, source_hw, eps=1e-3):
  """Rendered coordinates that bilinear sampling reproduces exactly.

  Within half a pixel of the source border the renderer clamps to the border
  pixels, and outside it writes FILL; both are excluded.
  """
  height, width = source_hw
  y, x = values[..., 0], values[..., 1]
  return (
    (y > 0.5 + eps)
    & (y < height - 0.5 - eps)
    & (x > 0.5 + eps)
    & (x < width - 0.5 - eps)
  )


def _patch_centre_source_point(view, row, col, patch_size, source_hw):
  """Reads the source point at a patch centre of a rendered coordinate view.

  Returns:
    'fill' if the centre shows no source content (odd p: the centre is a pixel
    centre), the (2,) point where the field is linear there, else None.
  """
  half = patch_size // 2
  if patch_size % 2:
    pixels = [(row * patch_size + half, col * patch_size + half)]
  else:  # The centre is the corner shared by four pixels: average them.
    pixels = [
      (row * patch_size + half - 1 + dy, col * patch_size + half - 1 + dx)
      for dy in (0, 1)
      for dx in (0, 1)
    ]
  values = np.stack([view[r, c] for r, c in pixels]).astype(np.float64)
  if patch_size % 2 and np.all(values == FILL):
    return 'fill'
  if np.all(_in_linear_region(values, source_hw)):
    return values.mean(axis=0)
  return None


def _locate_in_view(point, view, patch_size, source_hw, tol=1e-2):
  """Brute force: which patch of a rendered coordinate view shows `point`?

  Finds the pixel whose rendered source coordinate is nearest, then refines
  to a continuous position with finite differences of the neighbouring
  pixels (exact, as the rendered field is linear there).

  Returns:
    The patch index, -1 if the point is clearly outside the view, or None
    when it lies within `tol` pixels of a patch or view boundary.
  """
  size = view.shape[0]
  grid = size // patch_size
  view = view.astype(np.float64)
  linear = _in_linear_region(view, source_hw)
  if not linear.any():
    return None
  distances = np.where(linear, np.sum((view - point) ** 2, axis=-1), np.inf)
  r, c = np.unravel_index(np.argmin(distances), distances.shape)

  def difference(dr, dc):
    for sign in (1, -1):
      rr, cc = r + sign * dr, c + sign * dc
      if 0 <= rr < size and 0 <= cc < size and linear[rr, cc]:
        return sign * (view[rr, cc] - view[r, c])
    return None

  d_row, d_col = difference(1, 0), difference(0, 1)
  if d_row is None or d_col is None:
    return None
  jacobian = np.stack([d_row, d_col], axis=1)  # d(source) / d(view)
  position = np.array([r + 0.5, c + 0.5]) + np.linalg.solve(
    jacobian, point - view[r, c]
  )
  if np.any(position < -tol) or np.any(position >= size + tol):
    return -1
  offsets = np.mod(position, patch_size)
  if (
    np.any(position < tol)
    or np.any(position > size - tol)
    or np.any(offsets < tol)
    or np.any(offsets > patch_size - tol)
  ):
    return None
  row, col = (position // patch_size).astype(int)
  return int(row * grid + col)


_SOURCE_HW = (40, 28)  # Non-square, so a transposed axis would show.
_PATCH_SIZES = (3, 4)  # Patch centres on pixel centres / on pixel corners.


def _brute_force_settings(patch_size):
  return augment.ViewSettings(
    size=24,
    patch_size=patch_size,
    fill_value=FILL,
    rotate_degrees=30.0,
    translate=0.2,
    # Jitter amounts are set but switched off: views are geometric renders.
    brightness=0.5,
    contrast=0.5,
    photometric=False,
  )


@functools.partial(jax.jit, static_argnames='settings')
def _render_pairs(keys, image, settings):
  """Coordinate renders of many view pairs and their maps for each p."""
  source_hw = image.shape[:2]
  size = settings.size

  def one(key):
    affines = augment.paired_affines(key, source_hw, settings)
    views = jax.vmap(
      lambda a: augment.render_view(image, a, size, settings.fill_value)
    )(affines)
    maps = {
      p: jnp.stack(
        [
          augment.patch_index_map(
            affines[i], affines[1 - i], size, p, source_hw
          )
          for i in range(2)
        ]
      )
      for p in _PATCH_SIZES
    }
    # Key 1: each view against itself with 1-pixel patches, -1 exactly where
    # the pixel centre is outside the source.
    maps[1] = jax.vmap(
      lambda a: augment.patch_index_map(a, a, size, 1, source_hw)
    )(affines)
    return views, maps

  return jax.vmap(one)(keys)


@functools.cache
def _geometric_pairs():
  """paired_views' keys, the renders of their geometry and the maps per p."""
  keys = jax.random.split(jax.random.key(0), 32)
  # paired_views(key) draws its geometry from the first half of split(key).
  geometry_keys = jax.vmap(jax.random.split)(keys)[:, 0]
  image = jnp.asarray(_coordinate_image(*_SOURCE_HW))
  # The geometry does not depend on the patch size.
  views, maps = _render_pairs(geometry_keys, image, _brute_force_settings(4))
  return keys, image, np.asarray(views), jax.device_get(maps)


def _check_maps_by_brute_force(views, maps, patch_size, source_hw, locate):
  """Asserts every patch map entry equals the brute-force pixel search.

  For each patch of each view, its centre is mapped to a source point
  (`_patch_centre_source_point`) and looked up in the other view with
  `locate`. Returns counts of the cases: 'patch' (matched), 'outside_view'
  (-1: the point is not in the other view), 'fill' (-1: the centre shows
  no content) and 'skipped' (too close to a boundary to decide).
  """
  grid = 24 // patch_size
  counts = dict(patch=0, outside_view=0, fill=0, skipped=0)
  for views_k, maps_k in zip(views, maps, strict=True):
    for a in range(2):
      for index in range(grid * grid):
        row, col = divmod(index, grid)
        point = _patch_centre_source_point(
          views_k[a], row, col, patch_size, source_hw
        )
        if isinstance(point, str):  # 'fill': the centre shows no content.
          assert maps_k[a, index] == -1
          counts['fill'] += 1
          continue
        expected = None
        if point is not None:
          expected = locate(point, views_k[1 - a], patch_size, source_hw)
        if expected is None:
          counts['skipped'] += 1
          continue
        assert maps_k[a, index] == expected, (a, index, point)
        counts['patch' if expected >= 0 else 'outside_view'] += 1
  return counts


@pytest.mark.parametrize('patch_size', _PATCH_SIZES)
def test_patch_index_map_matches_brute_force_pixel_search(patch_size):
  source_hw = _SOURCE_HW
  _, _, views, all_maps = _geometric_pairs()
  maps = all_maps[patch_size]
  counts = _check_maps_by_brute_force(
    views, maps, patch_size, source_hw, _locate_in_view
  )
  total = sum(counts.values())
  assert counts['patch'] > 0.3 * total, counts
  assert counts['skipped'] < 0.35 * total, counts
  assert counts['outside_view'] > 20, counts
  if patch_size % 2:
    assert counts['fill'] > 20, counts


def test_fill_and_outside_source_agree_between_render_and_map():
  _, _, views, maps = _geometric_pairs()
  size = views.shape[2]
  self_maps = maps[1].reshape(views.shape[:4])  # (N, 2, S, S)
  is_fill = np.all(views == FILL, axis=-1)
  np.testing.assert_array_equal(self_maps == -1, is_fill)
  assert 0.02 < is_fill.mean() < 0.5  # Rotations and shifts do leave fill.
  pixel_ids = np.arange(size * size).reshape(size, size)
  np.testing.assert_array_equal(
    self_maps[~is_fill], np.broadcast_to(pixel_ids, is_fill.shape)[~is_fill]
  )


def test_photometric_off_views_are_the_geometric_renders():
  keys, image, views, maps = _geometric_pairs()
  settings = _brute_force_settings(4)
  maps = maps[4]
  for k in range(2):
    paired, paired_maps = _paired_views(keys[k], image, settings)
    # Fill (-1000) and coordinates (> 1) pass: nothing was jittered or clipped.
    # (Not bit-exact: the two programs may round the affines differently.)
    np.testing.assert_allclose(paired, views[k], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(paired_maps, maps[k])


# ---------------------------------------------------- identity and flipping


def _unit(image):
  return np.asarray(image, np.float32) / np.float32(255)


def _identity_settings(source_hw, size, patch_size, **kwargs):
  ratio = source_hw[1] / source_hw[0]
  defaults = dict(
    crop_scale=(1.0, 1.0), crop_ratio=(ratio, ratio), photometric=False
  )
  return augment.ViewSettings(
    size=size, patch_size=patch_size, **dict(defaults, flip=False, **kwargs)
  )


def test_identity_settings_resample_a_non_square_source():
  # Coordinates scaled into [0.25, 0.75], so brightness jitter never clips.
  to_unit = np.array([1 / 80, 1 / 56], np.float32)
  image = _coordinate_image(40, 28) * to_unit + 0.25
  settings = _identity_settings(
    (40, 28), 20, 4, brightness=0.2, photometric=True
  )
  views, maps = _paired_views(jax.random.key(4), image, settings)
  # View pixel (r, c) shows source point ((r + .5) * 40/20, (c + .5) * 28/20).
  expected = _coordinate_image(20, 20) * np.array([2.0, 1.4], np.float32)
  expected = expected * to_unit + 0.25
  deltas = np.asarray(views) - expected
  # Each view is the resampled image plus its own brightness delta.
  np.testing.assert_allclose(
    deltas, np.broadcast_to(deltas[:, :1, :1, :1], deltas.shape), atol=1e-6
  )
  assert abs(deltas[0, 0, 0, 0] - deltas[1, 0, 0, 0]) > 1e-3
  np.testing.assert_array_equal(maps, np.tile(np.arange(25), (2, 1)))


def test_center_view_is_the_whole_image_resized():
  center_view = jax.jit(augment.center_view, static_argnames='settings')
  settings = augment.ViewSettings(size=20, patch_size=4, brightness=0.5)
  expected = _coordinate_image(20, 20) * np.array([2.0, 1.4], np.float32)
  np.testing.assert_allclose(
    center_view(_coordinate_image(40, 28), settings), expected, atol=1e-4
  )
  # uint8 input: the image / 255, up to the rounding of the division (XLA may
  # multiply by the reciprocal instead).
  image = _random_image((20, 20, 1))
  np.testing.assert_allclose(
    center_view(image, settings), _unit(image), rtol=0, atol=1e-7
  )


def _mirrored(grid):
  rows, cols = np.divmod(np.arange(grid * grid), grid)
  return rows * grid + (grid - 1 - cols)


def test_hflip_of_one_view_mirrors_the_map():
  grid, patch_size = 6, 4
  size = grid * patch_size
  identity = np.eye(3, dtype=np.float32)
  # x -> S - x, written out rather than taken from augment.hflip.
  flipped = np.array([[1, 0, 0], [0, -1, size], [0, 0, 1]], np.float32)
  index_map = jax.jit(augment.patch_index_map, static_argnums=(2, 3, 4))
  for a, b in [(identity, flipped), (flipped, identity)]:
    np.testing.assert_array_equal(
      index_map(a, b, size, patch_size, (size, size)), _mirrored(grid)
    )


def test_identity_crops_with_random_flips_give_the_image_or_its_mirror():
  # Crop = whole image, S = source size: an unflipped view is exactly the
  # image, a flipped one exactly its mirror; maps are the identity or mirrored.
  image = _unit(_random_image((24, 24, 1), seed=1))
  settings = dataclasses.replace(
    _identity_settings((24, 24), 24, 4, brightness=0.5), flip=True
  )
  images = np.broadcast_to(image, (16, *image.shape))
  views, maps = _batched_paired_views(jax.random.key(5), images, settings)
  seen = set()
  for views_k, maps_k in zip(np.asarray(views), np.asarray(maps), strict=True):
    flips = []
    for view in views_k:
      is_mirror = np.array_equal(view, image[:, ::-1])
      assert is_mirror or np.array_equal(view, image)
      flips.append(is_mirror)
    expected = _mirrored(6) if flips[0] != flips[1] else np.arange(36)
    np.testing.assert_array_equal(maps_k, np.tile(expected, (2, 1)))
    seen.add(tuple(flips))
  assert seen == {(False, False), (False, True), (True, False), (True, True)}


# ------------------------------------------------------ crop distribution


@jax.jit
def _default_crops(keys, source_hw):
  settings = augment.ViewSettings(size=16, patch_size=4)
  return jax.vmap(
    lambda k: augment.sample_view_geometry(k, source_hw, settings)
  )(keys)


@pytest.mark.parametrize(
  'source_hw, largest_area',
  [
    ((32, 32), 1.0),
    # Too tall for ratio 3/4: at most 28 x 37.33 of 28 x 40.
    ((40, 28), 14 / 15),
    # Height-bound: no crop of ratio <= 4/3 covers more than 4/9 of it.
    ((20, 60), 4 / 9),
  ],
)
def test_crops_respect_scale_ratio_and_source_bounds(source_hw, largest_area):
  keys = jax.random.split(jax.random.key(6), 512)
  # The source size may be traced: one program serves every shape here.
  affines = np.asarray(
    _default_crops(keys, jnp.asarray(source_hw, jnp.float32)), np.float64
  )
  height, width = source_hw
  np.testing.assert_array_equal(affines[:, 0, 1], 0)
  np.testing.assert_array_equal(affines[:, 1, 0], 0)
  np.testing.assert_array_equal(affines[:, 2], np.tile([0, 0, 1], (512, 1)))
  crop_h = affines[:, 0, 0] * 16
  crop_w = np.abs(affines[:, 1, 1]) * 16
  area = np.abs(np.linalg.det(affines[:, :2, :2])) * 16**2 / (height * width)
  assert np.all(area >= 0.35 - 1e-5)
  assert np.all(area <= largest_area + 1e-5)
  assert area.min() < 0.37 and area.max() > largest_area - 0.05
  ratio = crop_w / crop_h
  assert np.all(ratio >= 3 / 4 - 1e-5) and np.all(ratio <= 4 / 3 + 1e-5)
  assert ratio.max() > 4 / 3 - 0.05
  assert ratio.min() < 3 / 4 + 0.05 or largest_area < 1 / 2
  corners = np.array([[0, 0, 1], [0, 16, 1], [16, 0, 1], [16, 16, 1]], float)
  mapped = np.einsum('nij,kj->nki', affines, corners)
  assert np.all(mapped[..., 0] >= -1e-4)
  assert np.all(mapped[..., 0] <= height + 1e-4)
  assert np.all(mapped[..., 1] >= -1e-4)
  assert np.all(mapped[..., 1] <= width + 1e-4)
  flipped = np.mean(affines[:, 1, 1] < 0)
  assert 0.4 < flipped < 0.6


def test_crop_falls_back_to_the_largest_central_crop():
  # No crop of ratio <= 4/3 and area >= 0.35 fits in a 10x100 strip: every
  # crop must be the central 10 x 13.33 box, as in torchvision.
  keys = jax.random.split(jax.random.key(6), 512)
  affines = np.asarray(_default_crops(keys, jnp.array([10.0, 100.0])))
  np.testing.assert_allclose(affines[:, 0, 0] * 16, 10, rtol=1e-5)
  np.testing.assert_allclose(np.abs(affines[:, 1, 1]) * 16, 40 / 3, rtol=1e-5)
  centres = affines @ np.array([8.0, 8.0, 1.0])  # The view centre.
  np.testing.assert_allclose(centres[:, :2], np.tile([5, 50], (512, 1)))


# ------------------------------------------- determinism, jit, vmap, shapes


SETTINGS = augment.ViewSettings(
  size=16,
  patch_size=4,
  rotate_degrees=10.0,
  translate=0.1,
  brightness=0.2,
  contrast=0.2,
)


def test_same_key_same_views_different_key_different_views():
  image = _unit(_random_image((20, 18, 3)))
  key = jax.random.PRNGKey(7)  # A raw uint32 key.
  views, maps = _paired_views(key, image, SETTINGS)
  again, again_maps = _paired_views(key, image, SETTINGS)
  np.testing.assert_array_equal(views, again)
  np.testing.assert_array_equal(maps, again_maps)
  other, _ = _paired_views(jax.random.PRNGKey(8), image, SETTINGS)
  assert not np.allclose(views, other)
  assert not np.allclose(views[0], views[1])


def test_batched_views_match_single_views_with_right_shapes():
  images = _unit(_random_image((3, 20, 18, 3), seed=3))
  key = jax.random.key(9)  # A typed key.
  views, maps = _batched_paired_views(key, images, SETTINGS)
  assert views.shape == (3, 2, 16, 16, 3)
  assert views.dtype == jnp.float32
  assert maps.shape == (3, 2, 16)
  assert maps.dtype == jnp.int32
  assert float(views.min()) >= 0 and float(views.max()) <= 1
  assert np.all((maps >= -1) & (maps < 16))
  for i, k in enumerate(jax.random.split(key, 3)):
    # Raw uint32 keys give the same streams as typed threefry keys.
    raw = jax.random.key_data(k)
    single_views, single_maps = _paired_views(raw, images[i], SETTINGS)
    np.testing.assert_allclose(views[i], single_views, atol=1e-5)
    np.testing.assert_array_equal(maps[i], single_maps)


# ------------------------------------------------------------- photometric


@functools.partial(jax.jit, static_argnames='settings')
def _photometric_many(keys, view, settings):
  return jax.vmap(lambda k: augment.photometric(k, view, settings))(keys)


def test_photometric_brightness_and_contrast_follow_their_formulas():
  base = augment.ViewSettings(size=8, patch_size=4)
  keys = jax.random.split(jax.random.key(12), 16)
  # Mid-grey values: no clipping, so out = mean + f * (view - mean) + delta.
  view = np.random.RandomState(3).uniform(0.4, 0.6, (8, 8, 3))
  view = view.astype(np.float32)
  # No jitter: the view itself comes back, not even clipped.
  for settings in [
    base,
    dataclasses.replace(base, brightness=0.5, photometric=False),
  ]:
    assert augment.photometric(keys[0], view, settings) is view
  settings = dataclasses.replace(base, brightness=0.3, contrast=0.5)
  jittered = np.asarray(_photometric_many(keys, view, settings), np.float64)
  centred = (view - view.mean()).ravel().astype(np.float64)
  design = np.stack([np.ones_like(centred), centred], axis=1)
  deltas, factors = [], []
  for out in jittered:
    target = out.ravel() - view.mean()
    (delta, factor), *_ = np.linalg.lstsq(design, target, rcond=None)
    np.testing.assert_allclose(design @ [delta, factor], target, atol=1e-6)
    deltas.append(delta)
    factors.append(factor)
  assert np.all(np.abs(deltas) <= 0.3) and np.ptp(deltas) > 0.1
  assert np.all(np.abs(np.subtract(factors, 1)) <= 0.5)
  assert np.ptp(factors) > 0.1
  # Full-range values get clipped back into [0, 1].
  view = np.random.RandomState(4).uniform(0, 1, (8, 8, 3)).astype(np.float32)
  jittered = _photometric_many(keys, view, settings)
  assert float(jittered.min()) == 0 and float(jittered.max()) == 1


# ------------------------------------------------------------- RandAugment

RA_SOURCE_HW = (40, 28)


def _randaugment_settings(patch_size, **kwargs):
  defaults = dict(
    size=24,
    patch_size=patch_size,
    fill_value=FILL,
    randaugment=(3, 10),
    # Colour ops are drawn but switched off: views are geometric renders.
    photometric=False,
  )
  return augment.ViewSettings(**dict(defaults, **kwargs))


@functools.partial(jax.jit, static_argnames='settings')
def _geometry_many(keys, settings, orig_sizes):
  """paired_views' geometry for each key (first half of split(key))."""

  def one(key, orig):
    geometry_key = jax.random.split(key)[0]
    return augment.paired_geometry(
      geometry_key, (orig[0], orig[1]), settings, RA_SOURCE_HW
    )

  return jax.vmap(one)(keys, orig_sizes)


@functools.cache
def _randaugment_pairs(patch_size):
  """Coordinate renders of 32 view pairs with 3 random RandAugment layers.

  Half the pairs treat the canvas as the image itself, half as a 40 x 28
  canvas of a 300 x 500 original (crops sampled in original pixels).
  """
  keys = jax.random.split(jax.random.key(20), 32)
  orig = np.array([[40, 28]] * 16 + [[300, 500]] * 16, np.float32)
  settings = _randaugment_settings(patch_size)
  image = jnp.asarray(_coordinate_image(*RA_SOURCE_HW))
  views, maps = _batched_many(keys, image, settings, orig)
  geometry = _geometry_many(keys, settings, orig)
  return keys, np.asarray(views), np.asarray(maps), jax.device_get(geometry)


@functools.partial(jax.jit, static_argnames='settings')
def _batched_many(keys, image, settings, orig_sizes):
  return jax.vmap(
    lambda k, o: augment.paired_views(k, image, settings, orig_size=o)
  )(keys, orig_sizes)


def _hidden_in_view(position, view):
  """Whether a continuous view position shows fill: True, False, or None.

  None when its pixel's 3 x 3 neighbourhood mixes fill and content (the fill
  edge passes close by, so pixel centres cannot tell).
  """
  size = view.shape[0]
  r, c = np.floor(position).astype(int)
  rows = slice(max(r - 1, 0), min(r + 2, size))
  cols = slice(max(c - 1, 0), min(c + 2, size))
  is_fill = np.all(view[rows, cols] == FILL, axis=-1)
  if is_fill.all():
    return True
  if not is_fill.any():
    return False
  return None


def _locate_with_fill(point, view, patch_size, source_hw, tol=1e-2):
  """`_locate_in_view`, but -1 when view b shows fill at the point."""
  size = view.shape[0]
  expected = _locate_in_view(point, view, patch_size, source_hw, tol)
  if expected is None or expected < 0:
    return expected
  # Recover the continuous position as _locate_in_view does.
  values = view.astype(np.float64)
  linear = _in_linear_region(values, source_hw)
  distances = np.where(linear, np.sum((values - point) ** 2, axis=-1), np.inf)
  r, c = np.unravel_index(np.argmin(distances), distances.shape)

  def difference(dr, dc):
    for sign in (1, -1):
      rr, cc = r + sign * dr, c + sign * dc
      if 0 <= rr < size and 0 <= cc < size and linear[rr, cc]:
        return sign * (values[rr, cc] - values[r, c])
    return None

  jacobian = np.stack([difference(1, 0), difference(0, 1)], axis=1)
  position = np.array([r + 0.5, c + 0.5]) + np.linalg.solve(
    jacobian, point - values[r, c]
  )
  hidden = _hidden_in_view(position, view)
  if hidden is None:
    return None
  return -1 if hidden else expected


@pytest.mark.parametrize('patch_size', _PATCH_SIZES)
def test_randaugment_maps_match_brute_force_pixel_search(patch_size):
  """Crop, flip and random geometric RandAugment ops (and Cutout) composed."""
  source_hw = RA_SOURCE_HW
  _, views, maps, geometry = _randaugment_pairs(patch_size)
  counts = _check_maps_by_brute_force(
    views, maps, patch_size, source_hw, _locate_with_fill
  )
  total = sum(counts.values())
  assert counts['patch'] > 0.2 * total, counts
  # Even p: centres on pixel corners, often beside a fill edge.
  assert counts['skipped'] < 0.4 * total, counts
  assert counts['outside_view'] > 20, counts
  if patch_size % 2:
    assert counts['fill'] > 20, counts
  # Every geometric op and Cutout was drawn, in both halves (canvas = image,
  # and canvas of a non-square original).
  ops = np.asarray(geometry.ops)  # (32, 2, 3)
  for half in (ops[:16], ops[16:]):
    for name in augment.RANDAUGMENT_GEOMETRIC + ('Cutout',):
      assert np.any(half == augment.RANDAUGMENT_OPS.index(name)), name


def test_randaugment_fill_and_self_maps_agree():
  """Each view's 1-px self map is -1 exactly on the pixels that show fill."""
  keys, views, _, geometry = _randaugment_pairs(4)

  @jax.jit
  def self_maps(geometry):
    def one(g):
      return augment.patch_index_map(
        g.affine, g.affine, 24, 1, RA_SOURCE_HW, g, g
      )

    return jax.vmap(jax.vmap(one))(geometry)

  maps = np.asarray(self_maps(geometry)).reshape(views.shape[:4])
  is_fill = np.all(views == FILL, axis=-1)
  np.testing.assert_array_equal(maps == -1, is_fill)
  assert 0.05 < is_fill.mean() < 0.6
  pixel_ids = np.arange(24 * 24).reshape(24, 24)
  np.testing.assert_array_equal(
    maps[~is_fill], np.broadcast_to(pixel_ids, is_fill.shape)[~is_fill]
  )


def test_crops_hold_in_original_pixels_of_a_stretched_canvas():
  # Originals 300 x 500 (wider than any allowed crop ratio allows at scale 1)
  # stretched into a 40 x 28 canvas: area and ratio must hold in original
  # pixels, not in canvas pixels.
  keys = jax.random.split(jax.random.key(21), 256)
  settings = augment.ViewSettings(
    size=24, patch_size=4, crop_scale=(0.05, 1.0), flip=False
  )
  orig = np.tile(np.array([[300.0, 500.0]], np.float32), (256, 1))
  geometry = jax.device_get(_geometry_many(keys, settings, orig))
  affines = np.asarray(geometry.affine, np.float64).reshape(-1, 3, 3)
  to_orig = np.diag([300 / 40, 500 / 28, 1.0])
  in_orig = to_orig @ affines
  crop_h = in_orig[:, 0, 0] * 24
  crop_w = in_orig[:, 1, 1] * 24
  area = crop_h * crop_w / (300 * 500)
  ratio = crop_w / crop_h
  assert np.all(area >= 0.05 - 1e-5) and np.all(area <= 1 + 1e-5)
  assert area.min() < 0.07 and area.max() > 0.7
  assert np.all(ratio >= 3 / 4 - 1e-5) and np.all(ratio <= 4 / 3 + 1e-5)
  # Inside the original, hence inside the canvas.
  corners = np.array([[0, 0, 1], [24, 24, 1]], float)
  mapped = np.einsum('nij,kj->nki', in_orig, corners)
  assert np.all(mapped[..., 0] >= -1e-3) and np.all(mapped[..., 0] <= 300.01)
  assert np.all(mapped[..., 1] >= -1e-3) and np.all(mapped[..., 1] <= 500.01)
  # The canvas-to-original composition is what paired_views renders: the
  # canvas-pixel ratio would differ (canvas pixels are 7.5 x 17.9 original).
  canvas_ratio = affines[:, 1, 1] / affines[:, 0, 0]
  assert canvas_ratio.max() < 0.8


def test_photometric_off_keeps_geometry_and_maps_of_randaugment():
  settings = _randaugment_settings(4, fill_value=0.5, photometric=True)
  image = _random_image((40, 28, 3), seed=5)
  keys = jax.random.split(jax.random.key(22), 8)
  on = jax.vmap(lambda k: augment.paired_views(k, image, settings))
  off_settings = dataclasses.replace(settings, photometric=False)
  off = jax.vmap(lambda k: augment.paired_views(k, image, off_settings))
  views_on, maps_on = jax.jit(on)(keys)
  views_off, maps_off = jax.jit(off)(keys)
  np.testing.assert_array_equal(maps_on, maps_off)
  # On: uint8-valued (the reference works on uint8); the two differ.
  scaled = np.asarray(views_on, np.float64) * 255
  np.testing.assert_allclose(scaled, np.round(scaled), atol=1e-3)
  assert not np.allclose(views_on, views_off, atol=2 / 255)


def test_randaugment_views_draw_their_ops_independently():
  settings = _randaugment_settings(4)
  keys = jax.random.split(jax.random.key(23), 256)
  orig = np.tile(np.array([[40.0, 28.0]], np.float32), (256, 1))
  ops = np.asarray(_geometry_many(keys, settings, orig).ops)  # (256, 2, 3)
  same = np.mean(np.all(ops[:, 0] == ops[:, 1], axis=-1))
  assert same < 0.02  # (1/16)^3 if independent.
  counts = np.bincount(ops.ravel(), minlength=16)
  # Uniform over the 16 ops: 1536 draws, 96 expected each.
  assert counts.min() > 55 and counts.max() < 140, counts


def _one_layer(name, sign=1.0, centre=(0.5, 0.5)):
  """(1, 4) uniforms that make a RandAugment layer pick `name`."""
  op = (augment.RANDAUGMENT_OPS.index(name) + 0.5) / 16
  return np.array([[op, 0.75 if sign > 0 else 0.25, *centre]], np.float32)


def _layers(u, settings):
  return jax.device_get(
    jax.jit(_randaugment_layers, static_argnums=1)(u, settings)
  )


@pytest.mark.parametrize('sign', [1.0, -1.0])
def test_randaugment_geometric_ops_follow_the_reference_scaling(sign):
  # M = 10 (level 1) on 24-px views: 30 degrees, shear 0.3, shift 100/224 S.
  settings = augment.ViewSettings(size=24, patch_size=4, randaugment=(1, 10))
  shift = sign * 100 / 224 * 24
  angle = np.deg2rad(sign * 30)
  cos, sin = np.cos(angle), np.sin(angle)
  # Rotation about the view centre (12, 12), out-to-in, written out.
  about = np.array([[1, 0, 12], [0, 1, 12], [0, 0, 1]])
  back = np.array([[1, 0, -12], [0, 1, -12], [0, 0, 1]])
  turn = np.array([[cos, -sin, 0], [sin, cos, 0], [0, 0, 1]])
  s = sign * 0.3
  expected = {
    'Rotate': about @ turn @ back,
    # Output (y, x) shows input (y, x + s (y - 1/2)): shear about row 0's
    # pixel centres, as the reference's transform on pixel indices.
    'ShearX': np.array([[1, 0, 0], [s, 1, -s / 2], [0, 0, 1]]),
    'ShearY': np.array([[1, s, -s / 2], [0, 1, 0], [0, 0, 1]]),
    'TranslateX': np.array([[1, 0, 0], [0, 1, shift], [0, 0, 1]]),
    'TranslateY': np.array([[1, 0, shift], [0, 1, 0], [0, 0, 1]]),
  }
  for name, matrix in expected.items():
    full, checks, boxes, modes, ops = _layers(_one_layer(name, sign), settings)
    np.testing.assert_allclose(full, matrix, atol=1e-5, err_msg=name)
    # Fill where the input point lies outside the 24 x 24 view.
    np.testing.assert_allclose(checks[0], matrix, atol=1e-5, err_msg=name)
    np.testing.assert_array_equal(boxes[0], [24, 24])
    assert modes[0] == FILL_OUTSIDE and ops[0] == (
      augment.RANDAUGMENT_OPS.index(name)
    )
  for name in augment.RANDAUGMENT_PHOTOMETRIC:
    full, _, _, modes, _ = _layers(_one_layer(name, sign), settings)
    np.testing.assert_array_equal(full, np.eye(3))
    assert modes[0] == NEVER


def test_two_layers_compose_and_the_first_layer_checks_its_own_frame():
  # TranslateX then Rotate: the output point p shows input T1 @ T2 @ p; the
  # first layer fills where T1 @ T2 @ p leaves the view, the second where
  # T2 @ p does.
  settings = augment.ViewSettings(size=24, patch_size=4, randaugment=(2, 10))
  u = np.concatenate([_one_layer('TranslateX'), _one_layer('Rotate')])
  settings_1 = augment.ViewSettings(size=24, patch_size=4, randaugment=(1, 10))
  translate = _layers(_one_layer('TranslateX'), settings_1)[0]
  rotate = _layers(_one_layer('Rotate'), settings_1)[0]
  full, checks, _, _, _ = _layers(u, settings)
  np.testing.assert_allclose(full, translate @ rotate, atol=1e-5)
  np.testing.assert_allclose(checks[0], translate @ rotate, atol=1e-5)
  np.testing.assert_allclose(checks[1], rotate, atol=1e-5)


def test_cutout_fills_an_80_px_square_of_a_224_view():
  # Reference at M = 10: a (2 * 40)-px square centred on a uniform pixel
  # (here 0.3 * 224 -> 67, 0.9 * 224 -> 201), clipped at the view border.
  settings = augment.ViewSettings(
    size=224, patch_size=16, randaugment=(1, 10), flip=False
  )
  u = _one_layer('Cutout', centre=(0.3, 0.9))
  full, checks, boxes, modes, ops = jax.jit(
    _randaugment_layers, static_argnums=1
  )(u, settings)
  geometry = augment.ViewGeometry(jnp.eye(3), checks, boxes, modes, ops)
  image = np.zeros((224, 224, 3), np.uint8)
  _, stage = jax.jit(augment.render_geometry, static_argnums=2)(
    image, geometry, settings
  )
  expected = np.full((224, 224), -1)
  expected[67 - 40 : 67 + 40, 201 - 40 :] = 1
  np.testing.assert_array_equal(stage, expected)
  np.testing.assert_array_equal(full, np.eye(3))


# Colour ops against references: PIL where its op is the reference's, else
# the reference's formula in float64, truncated as its uint8 casts do.


def _colour_image(shape=(24, 24, 3), seed=6):
  image = _random_image(shape, seed)
  image[0, 0] = 3  # Keep some headroom from 0 and 255 for AutoContrast.
  image[1, 1] = 250
  return image


def _run_op(name, image, magnitude=10.0, size=24):
  function = _photometric_ops(magnitude, size)[name]
  return np.asarray(jax.jit(function)(jnp.asarray(image, jnp.float32)))


def _assert_truncation(got, value):
  """got == floor(clip(value, 0, 255)), where value is not a float tie.

  Within 1e-4 of an integer, float32 and float64 may land either side; there
  either integer passes.
  """
  value = np.clip(value, 0, 255)
  near = np.abs(value - np.round(value)) < 1e-4
  np.testing.assert_array_equal(got[~near], np.floor(value[~near]))
  assert np.all(np.abs(got[near] - np.round(value[near])) <= 1)


@pytest.mark.parametrize(
  'name, magnitude, pil_op',
  [
    ('Invert', 10, lambda im: PIL.ImageOps.invert(im)),
    ('Posterize', 10, lambda im: PIL.ImageOps.posterize(im, 4)),
    ('Posterize', 5, lambda im: PIL.ImageOps.posterize(im, 2)),
    ('Solarize', 5, lambda im: PIL.ImageOps.solarize(im, 128)),
    # The reference's threshold at M = 10 is 256: nothing is inverted.
    ('Solarize', 10, lambda im: im),
    ('Equalize', 10, lambda im: PIL.ImageOps.equalize(im)),
  ],
)
def test_colour_ops_match_pil(name, magnitude, pil_op):
  image = _colour_image()
  expected = np.asarray(pil_op(PIL.Image.fromarray(image)), np.float32)
  np.testing.assert_array_equal(_run_op(name, image, magnitude), expected)


def test_equalize_leaves_a_flat_channel_alone_and_works_on_grey():
  image = _colour_image((24, 24, 1))
  expected = np.asarray(
    PIL.ImageOps.equalize(PIL.Image.fromarray(image[..., 0]))
  )
  np.testing.assert_array_equal(_run_op('Equalize', image)[..., 0], expected)
  flat = np.full((24, 24, 3), 77, np.uint8)
  np.testing.assert_array_equal(_run_op('Equalize', flat), flat)


def test_autocontrast_matches_pil():
  # Each channel stretched from [3, 250] to [0, 255]; PIL computes in float64
  # and the reference in float32: they agree except at float ties.
  image = _colour_image()
  image[..., 2] //= 2  # Another range in the last channel.
  image[2, 2, 2] = 200
  got = _run_op('AutoContrast', image)
  expected = np.asarray(PIL.ImageOps.autocontrast(PIL.Image.fromarray(image)))
  assert np.mean(got == expected) > 0.99
  assert np.max(np.abs(got - expected)) <= 1
  assert got[..., 2].min() == 0 and got[..., 2].max() == 255
  flat = np.full((24, 24, 3), 77, np.uint8)
  np.testing.assert_array_equal(_run_op('AutoContrast', flat), flat)


def test_blend_ops_follow_the_reference_formula():
  image = _colour_image().astype(np.float64)
  factor = 1.9  # 1.8 * (10 / 10) + 0.1
  _assert_truncation(_run_op('Brightness', image), factor * image)
  # Contrast blends towards int(S * S / 256): 2 for 24 px, 196 for 224 px.
  for size, grey in [(24, 2), (224, 196)]:
    _assert_truncation(
      _run_op('Contrast', image, size=size), grey + factor * (image - grey)
    )
  luma = image @ np.array([0.2989, 0.5870, 0.1140]) / 255
  grey = np.floor(luma * 255.5)[..., None]
  _assert_truncation(_run_op('Color', image), grey + factor * (image - grey))
  # One channel: Color has nothing to desaturate.
  np.testing.assert_array_equal(
    _run_op('Color', image[..., :1]), image[..., :1]
  )
  # Magnitude 5: factor 1.0 returns the image itself.
  np.testing.assert_array_equal(_run_op('Brightness', image, 5), image)
  added = np.where(image < 128, np.minimum(image + 110, 255), image)
  np.testing.assert_array_equal(_run_op('SolarizeAdd', image), added)


def test_sharpness_blends_with_the_smooth_filter_inside_the_border():
  image = _colour_image().astype(np.float64)
  kernel = np.ones((3, 3))
  kernel[1, 1] = 5
  smooth = image.copy()
  for r in range(1, 23):
    for c in range(1, 23):
      window = image[r - 1 : r + 2, c - 1 : c + 2]
      total = np.sum(window * kernel[..., None], axis=(0, 1))
      smooth[r, c] = np.floor(total / 13)
  got = _run_op('Sharpness', image)
  _assert_truncation(got, smooth + 1.9 * (image - smooth))
  # The border keeps its values (blend of the image with itself).
  np.testing.assert_array_equal(got[0], image[0])


def test_fill_goes_through_the_colour_ops_that_follow_it():
  # Layers Rotate, Invert, TranslateX: a pixel that Rotate filled (stage 1)
  # is inverted afterwards (255 - 128); one that TranslateX filled (stage 3)
  # keeps the fill; content is inverted.
  settings = augment.ViewSettings(
    size=4, patch_size=2, randaugment=(3, 10), fill_value=128 / 255
  )
  ops = np.array(
    [
      augment.RANDAUGMENT_OPS.index(n)
      for n in ('Rotate', 'Invert', 'TranslateX')
    ]
  )
  stage = np.full((4, 4), -1, np.int32)
  stage[0, 0], stage[0, 1] = 1, 3
  view = np.full((4, 4, 3), 100 / 255, np.float32)
  out = jax.jit(augment.randaugment_photometric, static_argnums=3)(
    view, stage, ops, settings
  )
  expected = np.full((4, 4, 3), 155.0)
  expected[0, 0], expected[0, 1] = 127, 128
  np.testing.assert_allclose(np.asarray(out) * 255, expected, atol=1e-4)


# ------------------------------------------------------------------- mixup


def _mixup_inputs(batch=4, size=2, patches=4):
  # views[i, v] holds 10 * i + v everywhere; maps[i] are image i's own.
  values = 10.0 * np.arange(batch)[:, None] + np.arange(2)[None]
  views = np.broadcast_to(
    values[:, :, None, None, None], (batch, 2, size, size, 1)
  ).astype(np.float32)
  maps = np.arange(batch * 2 * patches, dtype=np.int32).reshape(
    batch, 2, patches
  )
  return views, maps, np.arange(batch, dtype=np.int32)


_mixup = jax.jit(
  augment.mixup, static_argnames=('concentration', 'num_classes', 'num_groups')
)


@pytest.mark.parametrize(
  'batch, num_groups, partners',
  [(4, 2, [1, 0, 3, 2]), (3, 1, [1, 2, 0]), (6, 3, [1, 0, 3, 2, 5, 4])],
)
def test_mixup_pairs_within_groups_and_keeps_the_dominant_images_maps(
  batch, num_groups, partners
):
  views, maps, labels = _mixup_inputs(batch)
  mixed, out_maps, targets, lam = _mixup(
    jax.random.key(30),
    views,
    maps,
    labels,
    concentration=0.2,
    num_classes=batch,
    num_groups=num_groups,
  )
  lam = np.asarray(lam, np.float64)
  assert lam.shape == (num_groups,)
  assert np.all(lam >= 0.5) and np.all(lam <= 1)
  # Image i, both views: lam_g * own view + (1 - lam_g) * partner's SAME view.
  group = np.arange(batch) // (batch // num_groups)
  weight = lam[group]
  for i, j in enumerate(partners):
    for v in range(2):
      expected = weight[i] * (10 * i + v) + (1 - weight[i]) * (10 * j + v)
      np.testing.assert_allclose(mixed[i, v], expected, rtol=1e-5)
    target = np.zeros(batch)
    target[i] += weight[i]
    target[j] += 1 - weight[i]
    np.testing.assert_allclose(targets[i], target, rtol=1e-5, atol=1e-7)
  # The consistency loss compares the views of image i through i's maps.
  np.testing.assert_array_equal(out_maps, maps)


def test_mixup_weights_follow_the_sorted_dirichlet():
  # lam = max(B, 1 - B), B ~ Beta(0.2, 0.2): E[lam] by numerical integration.
  views, maps, labels = _mixup_inputs(8)
  lams = np.concatenate(
    [
      np.asarray(
        _mixup(
          jax.random.key(100 + k),
          views,
          maps,
          labels,
          concentration=0.2,
          num_classes=8,
          num_groups=8,
        )[3]
      )
      for k in range(64)
    ]
  )
  x = np.linspace(0.5, 1, 200_001)[1:-1]
  log_density = (
    math.lgamma(0.4) - 2 * math.lgamma(0.2) - 0.8 * np.log(x * (1 - x))
  )
  density = 2 * np.exp(log_density)  # Folded onto [1/2, 1].
  mean = np.sum(x * density) / np.sum(density)
  # 512 draws; the std of lam is about 0.15.
  assert abs(lams.mean() - mean) < 4 * 0.15 / np.sqrt(512), (lams.mean(), mean)
  assert np.mean(lams > 0.99) > 0.2  # Mostly nearly unmixed, at 0.2.


def test_mixup_rejects_bad_arguments():
  views, maps, labels = _mixup_inputs(4)
  with pytest.raises(ValueError, match='concentration=0'):
    augment.mixup(
      jax.random.key(0),
      views,
      maps,
      labels,
      concentration=0,
      num_classes=4,
    )
  with pytest.raises(ValueError, match='num_groups=3 .* batch size 4'):
    augment.mixup(
      jax.random.key(0),
      views,
      maps,
      labels,
      concentration=0.2,
      num_classes=4,
      num_groups=3,
    )


def test_mixup_moves_no_data_between_devices():
  """The compiled program of a batch-sharded mixup has no collective."""
  mesh = sharding.make_mesh(2)  # 8 devices: data 4 x expert 2.
  batch_sharding = sharding.batch_sharding(mesh)
  num_devices = jax.device_count()
  views = jax.ShapeDtypeStruct(
    (2 * num_devices, 2, 8, 8, 3), jnp.float32, sharding=batch_sharding
  )
  maps = jax.ShapeDtypeStruct(
    (2 * num_devices, 2, 4), jnp.int32, sharding=batch_sharding
  )
  labels = jax.ShapeDtypeStruct(
    (2 * num_devices,), jnp.int32, sharding=batch_sharding
  )
  key = jax.random.key(0)

  def f(key, views, maps, labels):
    return augment.mixup(
      key,
      views,
      maps,
      labels,
      concentration=0.2,
      num_classes=5,
      num_groups=num_devices,
    )

  with jax.set_mesh(mesh):  # As the train step runs.
    compiled = (
      jax.jit(
        f,
        out_shardings=(batch_sharding, batch_sharding, batch_sharding, None),
      )
      .lower(key, views, maps, labels)
      .compile()
    )
  hlo = compiled.as_text()
  assert 'num_partitions=8' in hlo
  for op in (
    'collective-permute',
    'all-gather',
    'all-to-all',
    'all-reduce',
    'reduce-scatter',
  ):
    assert op not in hlo, op
  # Control: a roll over the whole batch does cross devices.
  crossing = (
    jax.jit(
      lambda v: jnp.roll(v, -1, axis=0),
      out_shardings=batch_sharding,
    )
    .lower(views)
    .compile()
    .as_text()
  )
  assert 'collective-permute' in crossing or 'all-gather' in crossing


@pytest.mark.parametrize('magnitude', [10, 5])
def test_randaugment_photometric_applies_the_drawn_op(magnitude):
  # The fused path (one table lookup per layer) gives each op's own result.
  settings = augment.ViewSettings(
    size=24, patch_size=4, randaugment=(1, magnitude)
  )
  image = _colour_image().astype(np.float32)
  functions = _photometric_ops(magnitude, 24)
  stage = np.full((24, 24), -1, np.int32)
  fused = jax.jit(
    jax.vmap(augment.randaugment_photometric, in_axes=(None, None, 0, None)),
    static_argnums=3,
  )
  ops = np.arange(16, dtype=np.int32)[:, None]
  out = np.asarray(fused(image / 255, stage, ops, settings)) * 255
  for op, name in enumerate(augment.RANDAUGMENT_OPS):
    expected = image
    if name in functions:
      expected = jax.jit(functions[name])(image)
    np.testing.assert_allclose(out[op], expected, atol=1e-3, err_msg=name)

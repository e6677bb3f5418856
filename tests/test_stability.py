"""Flip rates of a router that routes by a pixel threshold, against brute
force (numpy shifts) and the normal distribution (noise)."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vmoe_jsd import augment
from vmoe_jsd.evaluation import stability

S, P = 28, 7
GRID = S // P
SETTINGS = augment.ViewSettings(size=S, patch_size=P)


def patch_means(views):
  n = views.shape[0]
  x = views.reshape(n, GRID, P, GRID, P, -1)
  return x.mean(axis=(2, 4, 5)).reshape(n, GRID * GRID)


def threshold_router(views):
  """Expert 1 when the patch's mean pixel is above 0.5, else expert 0."""
  return {'layer': (patch_means(views) > 0.5).astype(jnp.int32)}


def shifted_numpy(image, dy, dx, fill=0.0):
  """View pixel (y, x) shows source pixel (y + dy, x + dx), fill outside."""
  out = np.full_like(image, fill)
  out[: S - dy, : S - dx] = image[dy:, dx:]
  return out


@pytest.mark.parametrize('d', [1, 2, 3])
def test_shift_below_half_a_patch_maps_each_patch_to_itself(d):
  _, _, maps = stability.perturbed_views(
    jax.random.key(0), jnp.zeros((2, S, S, 1)), SETTINGS, (), (d,)
  )
  np.testing.assert_array_equal(
    maps, np.broadcast_to(np.arange(16), (2, 2, 16))
  )


def test_shift_of_four_pixels_maps_to_the_next_patch_or_none():
  _, _, maps = stability.perturbed_views(
    jax.random.key(0), jnp.zeros((1, S, S, 1)), SETTINGS, (), (4,)
  )
  rows, cols = np.divmod(np.arange(16), GRID)
  down = np.where(rows < GRID - 1, np.arange(16) + GRID, -1)
  right = np.where(cols < GRID - 1, np.arange(16) + 1, -1)
  np.testing.assert_array_equal(maps[0, 0], down)
  np.testing.assert_array_equal(maps[1, 0], right)


def test_shift_flip_rates_match_brute_force():
  rng = np.random.default_rng(0)
  images = np.zeros((6, S, S, 1), np.float32)
  images[0, :, :11] = 1.0  # A vertical edge inside patch column 1.
  images[1:] = rng.uniform(size=(5, S, S, 1)) ** rng.uniform(
    0.5, 2.0, size=(5, 1, 1, 1)
  )
  mask = np.ones(6, bool)
  mask[-1] = False  # Padding: not counted.
  sums = stability.stability_sums(
    threshold_router, jax.random.key(1), jnp.asarray(images),
    jnp.asarray(mask), SETTINGS, noise_stds=(), shifts=(1, 2),
  )  # fmt: skip
  for d in (1, 2):
    flips = pairs = 0
    for image in images[:5]:
      clean = patch_means(image[None]) > 0.5
      for dy, dx in ((d, 0), (0, d)):
        moved = patch_means(shifted_numpy(image, dy, dx)[None]) > 0.5
        flips += int(np.sum(moved != clean))
        pairs += 16
    assert int(sums[f'layer/shift_{d}/pairs']) == pairs
    assert int(sums[f'layer/shift_{d}/flips']) == flips
  # By hand, image 0 alone: shifting right by 1 or 2 moves the edge out of
  # column 1's majority (4/7 -> 3/7, 2/7 ones): 4 flips; shifting down
  # brings fill into the bottom row: column 1's bottom patch 28/49 ->
  # 24/49 (d=1), 20/49 (d=2): 1 flip.
  one = stability.stability_sums(
    threshold_router, jax.random.key(1), jnp.asarray(images[:1]),
    jnp.ones(1, bool), SETTINGS, noise_stds=(), shifts=(1, 2),
  )  # fmt: skip
  assert int(one['layer/shift_1/flips']) == 5
  assert int(one['layer/shift_2/flips']) == 5


def test_noise_flip_rates_match_the_normal_distribution():
  delta = 0.005
  images = jnp.full((64, S, S, 1), 0.5 + delta)
  stds = (0.02, 0.05, 0.1)
  sums = stability.stability_sums(
    threshold_router, jax.random.key(2), images, jnp.ones(64, bool),
    SETTINGS, noise_stds=stds, shifts=(),
  )  # fmt: skip
  for std in stds:
    # The mean of 49 pixels' noise is N(0, std^2 / 49): a flip when it is
    # below -delta.
    expected = 0.5 * math.erfc(delta * P / std / math.sqrt(2))
    pairs = int(sums[f'layer/noise_{std:g}/pairs'])
    rate = int(sums[f'layer/noise_{std:g}/flips']) / pairs
    assert pairs == 64 * 16
    tol = 4 * math.sqrt(expected * (1 - expected) / pairs)
    assert rate == pytest.approx(expected, abs=tol)


def _stability_spec(cfg):
  return stability.StabilitySpec.from_config(
    cfg.evaluate.get('stability'), cfg.evaluate.get('limit')
  )


def test_bad_stability_options_are_rejected():
  cfg = ml_collections.ConfigDict(
    {'evaluate': {'stability': {'noise_std': (0.0,), 'shifts': (1,)}}}
  )
  with pytest.raises(ValueError, match=r'noise_std=\(0.0,\)'):
    _stability_spec(cfg)
  cfg.evaluate.stability = {'shifts': (0,)}
  with pytest.raises(ValueError, match=r'shifts=\(0,\)'):
    _stability_spec(cfg)

"""The corruption suite against independent references (scipy's Gaussian
filter, colorsys's HSV, numpy shifts and rotations of patch centres, a
brute-force loop over a threshold router), its summary by hand, and the
cheaper-inference arithmetic."""

import colorsys
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage

from vmoe_jsd import augment
from vmoe_jsd.config_errors import ConfigError
from vmoe_jsd.evaluation import corruptions, robustness, serving
from vmoe_jsd.models.spec import ModelSpec

S, P = 28, 7
GRID = S // P
SETTINGS = augment.ViewSettings(size=S, patch_size=P)
KEY = jax.random.key(0)


def _images(n=3, channels=3, seed=0):
  rng = np.random.default_rng(seed)
  return rng.uniform(size=(n, S, S, channels)).astype(np.float32)


@pytest.mark.parametrize(
  'sigma', corruptions.FAMILIES['gaussian_blur'].severities
)
def test_blur_matches_scipy_gaussian_filter(sigma):
  image = _images(1)[0]
  view, _ = corruptions.gaussian_blur(image, jnp.asarray(image), KEY, sigma,
                                     SETTINGS)  # fmt: skip
  # skimage's gaussian (CIFAR-10-C): scipy's filter, mode 'nearest',
  # truncate 4, on the two spatial axes.
  want = scipy.ndimage.gaussian_filter(
    image.astype(np.float64), sigma=(sigma, sigma, 0), mode='nearest',
    truncate=4.0,
  )  # fmt: skip
  np.testing.assert_allclose(view, want, atol=2e-6)


def test_contrast_and_brightness_match_numpy_and_colorsys():
  image = _images(1, seed=1)[0]
  image[0, 0] = 0.0  # A black pixel: HSV value 0.
  for c in corruptions.FAMILIES['contrast'].severities:
    view, _ = corruptions.contrast(image, jnp.asarray(image), KEY, c, SETTINGS)
    mean = image.astype(np.float64).mean(axis=(0, 1))
    want = np.clip((image - mean) * c + mean, 0, 1)
    np.testing.assert_allclose(view, want, atol=1e-6)
  for c in corruptions.FAMILIES['brightness'].severities:
    view, _ = corruptions.brightness(image, jnp.asarray(image), KEY, c,
                                    SETTINGS)  # fmt: skip
    want = np.empty_like(image, dtype=np.float64)
    for y in range(S):
      for x in range(S):
        h, s, v = colorsys.rgb_to_hsv(*image[y, x].astype(np.float64))
        want[y, x] = colorsys.hsv_to_rgb(h, s, min(v + c, 1.0))
    np.testing.assert_allclose(view, want, atol=1e-5)
  grey = _images(1, channels=1, seed=2)[0]
  view, _ = corruptions.brightness(grey, jnp.asarray(grey), KEY, 0.3, SETTINGS)
  np.testing.assert_allclose(view, np.minimum(grey + 0.3, 1.0), atol=1e-6)


def test_noise_has_the_severity_std_and_occlusion_covers_a_square():
  flat = jnp.full((S, S, 1), 0.5)
  for std in corruptions.FAMILIES['gaussian_noise'].severities:
    view, _ = corruptions.gaussian_noise(flat, flat, KEY, std, SETTINGS)
    delta = np.asarray(view) - 0.5
    # 784 draws: the sample std within 4 standard errors.
    assert abs(delta.std() - std) < 4 * std / math.sqrt(2 * S * S)
    assert abs(delta.mean()) < 4 * std / S
  black = jnp.zeros((S, S, 1))
  for f in corruptions.FAMILIES['occlusion'].severities:
    for seed in range(5):
      view, _ = corruptions.occlusion(black, black, jax.random.key(seed), f,
                                     SETTINGS)  # fmt: skip
      ys, xs = np.nonzero(np.asarray(view)[..., 0] == 0.5)
      side = round(f * S)
      assert len(ys) == side * side
      assert ys.max() - ys.min() + 1 == side == xs.max() - xs.min() + 1


def _numpy_shift(image, dy, dx, fill=0.0):
  """View pixel (y, x) shows source pixel (y + dy, x + dx)."""
  out = np.full_like(image, fill)
  ys, xs = np.arange(S), np.arange(S)
  sy, sx = ys + dy, xs + dx
  ok_y, ok_x = (sy >= 0) & (sy < S), (sx >= 0) & (sx < S)
  out[np.ix_(ok_y, ok_x)] = image[np.ix_(sy[ok_y], sx[ok_x])]
  return out


def _centre_partners(transform):
  """Brute force: the clean patch holding each moved patch's centre."""
  out = []
  for i in range(GRID * GRID):
    r, c = divmod(i, GRID)
    y, x = transform((r + 0.5) * P, (c + 0.5) * P)
    inside = 0 <= y < S and 0 <= x < S
    out.append(int(y // P) * GRID + int(x // P) if inside else -1)
  return np.array(out), transform


@pytest.mark.parametrize('d', corruptions.FAMILIES['shift'].severities)
def test_shift_views_and_maps_match_numpy(d):
  image = _images(1, channels=1, seed=3)[0]
  seen = set()
  for seed in range(12):
    view, index = corruptions.shift(image, None, jax.random.key(seed), d,
                                   SETTINGS)  # fmt: skip
    matches = [
      (dy, dx) for dy in (-d, d) for dx in (-d, d)
      if np.allclose(view, _numpy_shift(image, dy, dx), atol=1e-6)
    ]  # fmt: skip
    assert len(matches) == 1
    dy, dx = matches[0]
    seen.add((dy, dx))
    want, _ = _centre_partners(lambda y, x, dy=dy, dx=dx: (y + dy, x + dx))
    np.testing.assert_array_equal(index, want)
  assert len(seen) >= 3  # The signs are drawn per key.


@pytest.mark.parametrize('degrees', corruptions.FAMILIES['rotation'].severities)
def test_rotation_maps_keep_only_near_patches(degrees):
  source_hw = (S, S)
  centre = S / 2
  for sign in (1, -1):
    theta = sign * math.radians(degrees)
    affine = augment.rotation(theta, (centre, centre))

    def rotate(y, x, theta=theta):
      dy, dx = y - centre, x - centre
      return (centre + math.cos(theta) * dy - math.sin(theta) * dx,
              centre + math.sin(theta) * dy + math.cos(theta) * dx)  # fmt: skip

    partners, _ = _centre_partners(rotate)
    want = []
    for i, j in enumerate(partners):
      r, c = divmod(i, GRID)
      y, x = rotate((r + 0.5) * P, (c + 0.5) * P)
      jr, jc = divmod(j, GRID)
      # Within 3 pixels (of 7) of the partner's centre on both axes.
      near = (abs(y - (jr + 0.5) * P) <= 3 + 1e-6
              and abs(x - (jc + 0.5) * P) <= 3 + 1e-6)  # fmt: skip
      want.append(j if j >= 0 and near else -1)
    got = corruptions.rotation_map(
      affine, augment.scaling(1, 1), S, P, source_hw,
      corruptions.ROTATION_TOLERANCE,
    )  # fmt: skip
    np.testing.assert_array_equal(got, want)
  if degrees <= 10:  # Corner centres move 14.8 * 0.17 = 2.6 px or less.
    np.testing.assert_array_equal(got, np.arange(16))
  if degrees == 30:  # Corner centres move 7.7 px: some pairs drop out.
    assert 0 < np.sum(np.asarray(got) >= 0) < 16


def _patch_means(views):
  n = views.shape[0]
  x = views.reshape(n, GRID, P, GRID, P, -1)
  return x.mean(axis=(2, 4, 5)).reshape(n, GRID * GRID)


def _apply(views):
  """Expert 1 where a patch is brighter than 0.5; class 1 when the image
  mean is above 0.5."""
  means = _patch_means(views)
  logits = jnp.stack([0.5 - means.mean(-1), means.mean(-1) - 0.5], -1)
  return logits, {'layer': (means > 0.5).astype(jnp.int32)}


def test_corruption_sums_match_a_brute_force_loop():
  rng = np.random.default_rng(5)
  images = (rng.uniform(size=(6, S, S, 1)) ** rng.uniform(
    0.3, 3.0, size=(6, 1, 1, 1))).astype(np.float32)  # fmt: skip
  labels = np.array([0, 1, 1, 0, 1, 0])
  mask = np.array([True] * 5 + [False])  # The last is padding.
  cells = corruptions.corruption_list(('contrast', 'brightness'))
  keys = jax.random.split(KEY, 6)
  sums = corruptions.corruption_sums(
    _apply, jnp.asarray(images), jnp.asarray(labels), jnp.asarray(mask),
    keys, SETTINGS, cells,
  )  # fmt: skip

  def decide(x):
    m = _patch_means(np.asarray(x, np.float64))
    return (m.mean(-1) > 0.5).astype(int), m > 0.5

  clean_pred, clean_top1 = decide(images)
  assert int(sums['count']) == 5
  assert int(sums['clean/correct']) == np.sum((clean_pred == labels)[:5])
  for k, (family, c) in enumerate(cells):
    x = images.astype(np.float64)
    if family == 'contrast':
      mean = x.mean(axis=(1, 2), keepdims=True)
      x = np.clip((x - mean) * c + mean, 0, 1)
    else:
      x = np.minimum(x + c, 1.0)
    pred, top1 = decide(x)
    assert int(sums['correct'][k]) == np.sum((pred == labels)[:5])
    assert int(sums['layer/flips'][k]) == np.sum((top1 != clean_top1)[:5])
    assert int(sums['layer/pairs'][k]) == 5 * 16


def test_corruptions_depend_on_the_example_not_the_batch():
  images = jnp.asarray(_images(4, channels=1, seed=6))
  clean = jax.vmap(lambda im: augment.center_view(im, SETTINGS))(images)
  cells = corruptions.corruption_list(('gaussian_noise', 'shift'))
  root = corruptions.corruption_key(0)
  keys = jax.vmap(lambda i: jax.random.fold_in(root, i))(jnp.arange(4))

  def run(idx, sel):
    return corruptions.corrupt_batch(
      jnp.int32(idx), images[sel], clean[sel], keys[sel], SETTINGS,
      cells,
    )  # fmt: skip

  for idx in (0, 5):
    whole, _ = run(idx, slice(None))
    part, _ = run(idx, slice(2, 4))
    np.testing.assert_array_equal(whole[2:], part)
  noise_0, _ = run(0, slice(None))
  noise_1, _ = run(1, slice(None))
  assert not np.allclose(noise_0 - clean, (noise_1 - clean) * 0.06 / 0.04)


def test_summary_by_hand():
  totals = {
    'count': 10.0, 'clean/correct': 9.0,
    # gaussian_noise (5 severities) then shift (4).
    'correct': np.array([9, 8, 8, 7, 6, 5, 5, 4, 2], np.float64),
    'encoderblock_1/flips': np.array([1, 2, 3, 4, 5, 0, 2, 4, 6], float),
    'encoderblock_1/pairs': np.array([10] * 5 + [0, 10, 10, 10], float),
  }  # fmt: skip
  families = ('gaussian_noise', 'shift')
  result = corruptions.summarize_corruptions(totals, families)
  noise, shifted = 0.76, 0.4  # Means of 9,8,8,7,6 / 10 and 5,5,4,2 / 10.
  s = result['summary']
  assert s['family_accuracy'] == pytest.approx(
    {'gaussian_noise': noise, 'shift': shifted})  # fmt: skip
  assert s['mean_accuracy'] == pytest.approx((noise + shifted) / 2)
  assert s['accuracy_drop'] == pytest.approx(0.9 - (noise + shifted) / 2)
  # No pairs: no rate (null in the JSON), left out of the means.
  assert (
    result['corruptions']['shift']['flip_rate']['encoderblock_1'][0] is None
  )
  assert s['mean_flip_rate']['encoderblock_1'] == pytest.approx(
    (0.3 + 0.4) / 2)  # fmt: skip


def _default_model():
  model = {
    'num_classes': 10, 'patch_size': (7, 7), 'hidden_size': 8,
    'classifier': 'token',
    'encoder': {'num_layers': 2, 'mlp_dim': 8, 'num_heads': 2,
                'moe': {'layers': (1,), 'num_experts': 4,
                        'group_size': 8 * 17,
                        'router': {'num_selected_experts': 2,
                                   'dispatcher': {'name': 'indices',
                                                  'capacity_factor': 1.25}}}},
  }  # fmt: skip
  overrides = {'encoder': {'moe': {'router': {'dispatcher': {
    'capacity_factor': 4.0}}}}}  # fmt: skip
  return ModelSpec.from_config(model, overrides)


def test_serving_variants_and_capacities_by_hand():
  model = _default_model()
  variants = serving.serving_variants(model, (0.5, 1.0), (1,))
  assert variants == [
    ('default', 2, 4.0), ('k2_cf0.5', 2, 0.5), ('k2_cf1', 2, 1.0),
    ('k1_cf4', 1, 4.0), ('k1_cf0.5', 1, 0.5), ('k1_cf1', 1, 1.0),
  ]  # fmt: skip
  # C = ceil(K * S * cf / E) rounded up to a multiple of 4, S = 136, E = 4.
  want = {(2, 4.0): 272, (2, 0.5): 36, (2, 1.0): 68, (1, 4.0): 136,
          (1, 0.5): 20, (1, 1.0): 36}  # fmt: skip
  for (k, cf), c in want.items():
    assert serving.group_capacity(serving.variant_spec(model, k, cf)) == c
  rows = [
    {'name': 'default', 'num_selected_experts': 2, 'capacity_factor': 4.0,
     'capacity': 272, 'accuracy': 0.9, 'dropped': {'b': 0.0}},
    {'name': 'k1_cf0.5', 'num_selected_experts': 1, 'capacity_factor': 0.5,
     'capacity': 20, 'accuracy': 0.8, 'dropped': {'b': 0.25}},
  ]  # fmt: skip
  out = serving._relative_rows(rows)
  assert out['rows'][1]['expert_flops'] == pytest.approx(20 / 272)
  assert out['rows'][1]['expert_flops_assigned'] == pytest.approx(0.75 / 2)
  assert out['rows'][1]['accuracy_drop'] == pytest.approx(0.1)


def test_bad_robustness_options_fail_in_one_line():
  key = 'evaluate.robustness'
  for cfg, match in (
    ({'suites': ('corruptions', 'speed')}, f'{key}.suites='),
    ({'corruptions': ('fog',)}, f"{key}.corruptions=\\('fog',\\)"),
    ({'corruptions': ()}, f'{key}.corruptions=\\(\\)'),
    ({'capacity_factors': (0.0,)}, f'{key}.capacity_factors=0.0'),
    ({'extra_k': (5,)}, f'{key}.extra_k=5'),
    ({'limit': 0}, f'{key}.limit=0'),
    ({'enable': True}, f"{key}=\\['enable'\\]"),
    ({'attack': {'epsilon': -1.0}}, f'{key}.attack.epsilon=-1.0'),
  ):
    with pytest.raises(ConfigError, match=match) as info:
      robustness.RobustnessSpec.from_config(cfg, None, num_experts=4)
    assert '\n' not in str(info.value)
  spec = robustness.RobustnessSpec.from_config({'limit': 5000}, 300)
  assert spec.limit == 300 and spec.attack.limit == 300 and not spec.enabled


def test_corruption_table_names_severities_and_counts_images():
  result = {
    'num_examples': 2000,
    'clean_accuracy': 0.875,
    'corruptions': {
      'shift': {
        'severities': [1, 2, 3, 4],
        'accuracy': [0.8, 0.7, None, 0.5],
        'flip_rate': {'encoderblock_1': [0.1, 0.2, 0.3, 0.4]},
      },
      'contrast': {
        'severities': [0.75, 0.5, 0.4, 0.3, 0.15],
        'accuracy': [0.85, 0.8, 0.75, 0.7, 0.6],
        'flip_rate': {'encoderblock_1': [0.01, 0.02, 0.03, 0.04, 0.05]},
      },
    },
    'summary': {
      'mean_accuracy': 0.7,
      'accuracy_drop': 0.175,
      'mean_flip_rate': {'encoderblock_1': 0.1},
    },
  }
  lines = corruptions.format_corruptions(result).splitlines()
  assert lines[0].startswith('2000 test images; one column per severity')
  assert lines[1].split() == [
    'family', 'row', *(w for i in range(1, 6) for w in ('sev', str(i)))
  ]  # fmt: skip
  assert lines[2].split() == ['shift', 'parameter', '1', '2', '3', '4']
  assert lines[3].split() == ['accuracy', '0.800', '0.700', '-', '0.500']
  assert lines[4].split() == ['flips', 'block_1', '0.100', '0.200', '0.300',
                              '0.400']  # fmt: skip
  assert lines[5].split()[:3] == ['contrast', 'parameter', '0.75']
  # Each cell sits under its severity's header.
  header = lines[1]
  for row in lines[2:8]:
    cells = row[30:].split()
    ends = [header.index(f'sev {i + 1}') + 5 for i in range(len(cells))]
    assert [row[: e].rstrip()[-len(c) :] for c, e in zip(cells, ends,
            strict=True)] == cells  # fmt: skip
  assert lines[-1] == (
    'on these 2000 images: clean accuracy 0.8750, mean corruption accuracy '
    '0.7000 (drop 0.1750); mean flip rate encoderblock_1 0.100'
  )


def test_cheap_table_names_every_column_and_counts_images():
  row = {
    'name': 'default',
    'num_selected_experts': 2,
    'capacity_factor': 1.0,
    'capacity': 8,
    'accuracy': 0.8775,
    'accuracy_drop': 0.0,
    'expert_flops': 1.0,
    'expert_flops_assigned': 1.0,
    'num_examples': 512,
    'dropped': {'encoderblock_1': 0.01, 'encoderblock_3': None},
  }
  lines = serving.format_cheap({'rows': [row]}).splitlines()
  assert lines[0].startswith('512 test images; ')
  assert lines[1].split() == [
    'variant', 'K', 'cf', 'C', 'acc', 'drop', 'flops', 'assign', 'dropped',
    'block_1', 'block_3',
  ]  # fmt: skip
  assert lines[2].split() == [
    'default', '2', '1', '8', '0.8775', '0.0000', '1.000', '1.000', '0.010',
    '-',
  ]  # fmt: skip
  # The dropped cells end under their layer's name.
  for layer in ('block_1', 'block_3'):
    end = lines[1].index(layer) + len(layer)
    assert lines[2][end - 1] != ' ' and lines[2][end : end + 1] in ('', ' ')

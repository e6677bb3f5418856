"""The analysis figures read at a glance: expert colours that stay apart
(CIELAB distances computed here from the colour definitions), a key for
the routing map's crosses, and a colour scale fitted to the data."""

import itertools
import os

import numpy as np
import pytest

from vmoe_jsd.evaluation import figures

MAX_EXPERTS = len(figures.EXPERT_COLOURS)  # beyond: tab20, not checked


def _lab(rgb):
  """sRGB in [0, 1] -> CIELAB (D65), from the standards' definitions."""
  c = np.asarray(rgb, np.float64)
  linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
  m = np.array(
    [
      [0.4124, 0.3576, 0.1805],
      [0.2126, 0.7152, 0.0722],
      [0.0193, 0.1192, 0.9505],
    ]
  )
  xyz = m @ linear / np.array([0.95047, 1.0, 1.08883])
  d = 6 / 29
  f = np.where(xyz > d**3, np.cbrt(xyz), xyz / (3 * d * d) + 4 / 29)
  return np.array([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])


def _rgb(hex_colour):
  return np.array([int(hex_colour[i : i + 2], 16) / 255 for i in (1, 3, 5)])


def _painted(expert, background):
  """The colour a patch of `expert` shows over a grey `background` (Agg
  blends in sRGB: alpha * colour + (1 - alpha) * background)."""
  a = figures.EXPERT_ALPHA
  return _lab(a * _rgb(figures.expert_colour(expert)) + (1 - a) * background)


def test_lab_reference_values():
  assert _lab([1, 1, 1]) == pytest.approx([100, 0, 0], abs=0.05)
  assert _lab([1, 0, 0]) == pytest.approx([53.24, 80.09, 67.20], abs=0.1)


# A black pixel of a view is drawn at VIEW_FLOOR grey, a white one at 1.
@pytest.mark.parametrize(
  'backgrounds',
  [('dark', 'dark'), ('light', 'light'), ('dark', 'light')],
)
def test_expert_colours_stay_apart_on_dark_and_light_patches(backgrounds):
  grey = {'dark': figures.VIEW_FLOOR, 'light': 1.0}
  g1, g2 = (grey[b] for b in backgrounds)
  assert MAX_EXPERTS >= 8  # the largest expert count of configs/
  distances = {
    (i, j): float(np.linalg.norm(_painted(i, g1) - _painted(j, g2)))
    for i, j in itertools.permutations(range(MAX_EXPERTS), 2)
  }
  worst = min(distances, key=distances.get)
  # 40 CIELAB units: far beyond a just-noticeable difference (about 2.3);
  # the former blend (alpha 0.55, Okabe-Ito) gave 10.6 for experts 0 and 4.
  assert distances[worst] >= 40, (worst, distances[worst])


def test_a_black_view_pixel_is_drawn_at_the_floor_grey(tmp_path):
  plt = figures._pyplot()
  fig, ax = plt.subplots(figsize=(1, 1), dpi=50)
  fig.subplots_adjust(0, 0, 1, 1)
  data = np.zeros((2, 4), np.int64)
  figures._draw_view(ax, np.zeros((8, 8, 1)), -np.ones(4), data, 0, 4, 1)
  for p in list(ax.patches):
    p.remove()
  ax.set_title('')
  pixels = figures.figure_to_array(fig)
  assert pixels[25, 25] == pytest.approx(255 * figures.VIEW_FLOOR, abs=2)


def test_routing_map_figure_has_a_key_for_the_crosses(tmp_path):
  views = np.zeros((1, 2, 8, 8, 1), np.float32)
  views[0, :, 4:] = 1.0  # a light half and a dark half
  maps = np.array([[[0, 1, 2, -1], [0, 1, 2, 2]]])
  top1 = {
    1: np.array([[[0, 1, 2, 3], [0, 1, 3, 3]]]),
    3: np.array([[[4, 5, 6, 7], [4, 5, 6, 6]]]),
  }
  fig = figures.plot_routing_maps(
    np.zeros((1, 8, 8, 1), np.uint8),
    {'views': views, 'maps': maps, 'top1': top1},
    patch_size=4,
    num_experts=8,
  )
  labels = [t.get_text() for t in fig.legends[0].get_texts()]
  assert labels[:8] == [f'expert {e}' for e in range(8)]
  assert figures.CROSS_KEY in labels
  assert 'chose another top-1 expert' in figures.CROSS_KEY
  texts = [t.get_text() for t in fig.texts]
  assert (
    figures.CROSS_NOTE in texts
    and 'crosses of view 1 and view 2 differ' in (figures.CROSS_NOTE)
  )
  out = os.environ.get('FIGURE_OUT') or str(tmp_path)
  figures.save_figure(fig, os.path.join(out, 'routing_maps_test.png'))
  assert os.path.getsize(os.path.join(out, 'routing_maps_test.png')) > 0


def test_expert_by_class_colour_scale_is_fitted_to_the_data():
  counts = {
    1: np.array([[56.0, 44.0], [30.0, 70.0]]),  # shares 0.56 0.44 / 0.3 0.7
    3: np.array([[10.0, 10.0], [0.0, 0.0]]),  # 0.5 0.5 / 0 0 (no tokens)
  }
  fig = figures.plot_expert_by_class(counts, ['a', 'b'])
  limits = {ax.images[0].get_clim() for ax in fig.axes if ax.images}
  assert limits == {(0.0, 0.7)}
  bar = [ax for ax in fig.axes if not ax.images]
  assert len(bar) == 1 and 'share' in bar[0].get_ylabel()
  assert '0.00 to 0.70' in bar[0].get_ylabel()
  figures._pyplot().close(fig)


def test_expert_by_class_scale_of_a_flat_table_is_not_empty():
  lo, hi = figures.share_limits([np.full((2, 2), 0.5)])
  assert lo == 0.5 and hi > lo

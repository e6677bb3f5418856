"""analyze: a trained smoke checkpoint -> every file; the figures' content
against the data they draw."""

import json
import os
import sys

import numpy as np
import pytest

from vmoe_jsd import analyze, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _smoke(**overrides):
  sys.path.insert(0, os.path.join(ROOT, 'tests'))
  import smoke_config  # noqa: PLC0415

  return smoke_config.with_overrides(smoke_config.get_config(), **overrides)


@pytest.mark.slow  # About 40 s alone (compiling train, eval and analyze).
def test_analyze_writes_every_file_from_a_trained_checkpoint(tmp_path):
  config = _smoke(**{
    'consistency.loss': 'hard_target',
    'evaluate.stability.enabled': True,
    'evaluate.routing_map_images': 2,
  })  # fmt: skip
  workdir = str(tmp_path / 'run')
  result = train.train_and_evaluate(config, workdir)
  # Training's evaluation carries the flip rates of every layer.
  rates = result['stability']['flip_rate']['encoderblock_1']
  assert sorted(rates) == ['noise_0.02', 'noise_0.05', 'noise_0.1',
                           'shift_1', 'shift_2']  # fmt: skip
  assert all(0.0 <= r <= 1.0 for r in rates.values())
  # ... and a routing-map image in TensorBoard.
  from tensorboard.backend.event_processing import (  # noqa: PLC0415
    plugin_event_accumulator as pea,
  )

  acc = pea.EventAccumulator(workdir)
  acc.Reload()
  assert 'routing_maps' in acc.Tags()['tensors']
  out = str(tmp_path / 'analysis')
  summary = analyze.analyze(config, workdir, out, num_images=3)
  for name in ('routing_maps.png', 'expert_by_class.png', 'load_dropped.png',
               'flip_rates.png', 'results.json', 'summary.md'):  # fmt: skip
    path = os.path.join(out, name)
    assert os.path.getsize(path) > 0, name
  with open(os.path.join(out, 'results.json')) as f:
    saved = json.load(f)
  # The same checkpoint evaluates to the accuracy training reported.
  assert saved['accuracy'] == pytest.approx(result['accuracy'])
  for key in ('agreement', 'kappa', 'jsd', 'entropy_fraction', 'dropped'):
    assert saved['routing']['encoderblock_1'][key] == pytest.approx(
      result['routing']['encoderblock_1'][key]
    )
  assert saved['stability'] == result['stability']
  assert saved['step'] == config.num_train_steps
  share = np.asarray(saved['expert_by_class']['encoderblock_1'])
  np.testing.assert_allclose(share.sum(1)[share.sum(1) > 0], 1.0, rtol=1e-6)
  md = open(os.path.join(out, 'summary.md')).read()
  assert 'random resized crop of 0.5-1 of the area' in md
  assert 'encoderblock_1' in md and summary['files']


def test_routing_map_marks_exactly_the_disagreeing_matched_patches():
  # Two 8x8 views, patch 4: 4 patches each. View 1 routes (0, 1, 2, 3),
  # view 2 routes (0, 1, 3, 3). Maps: view 1's patch i -> view 2's patch i,
  # but patch 3 has no match; view 2's (0, 1, 2, 3) -> view 1's (0, 1, 2, 2).
  views = np.zeros((1, 2, 8, 8, 1), np.float32)
  maps = np.array([[[0, 1, 2, -1], [0, 1, 2, 2]]])
  top1 = {1: np.array([[[0, 1, 2, 3], [0, 1, 3, 3]]])}
  data = {'views': views, 'maps': maps, 'top1': top1}
  fig = analyze.plot_routing_maps(
    np.zeros((1, 8, 8, 1), np.uint8), data, patch_size=4, num_experts=4
  )
  axes = fig.axes
  # Crosses: two line segments per disagreeing matched patch.
  # View 1: patch 2 (2 vs 3) disagrees; patch 3 unmatched. View 2: patch 2
  # (3 vs 2) and patch 3 (3 vs view 1's patch 2, expert 2) disagree.
  assert len(axes[1].lines) == 2
  assert len(axes[2].lines) == 4
  assert '2/3 matched agree' in axes[1].get_title()
  assert '2/4 matched agree' in axes[2].get_title()
  labels = [t.get_text() for t in fig.legends[0].get_texts()]
  assert labels[:4] == ['expert 0', 'expert 1', 'expert 2', 'expert 3']
  pixels = analyze.figure_to_array(fig)
  assert pixels.ndim == 3 and pixels.shape[-1] == 3 and pixels.dtype == np.uint8

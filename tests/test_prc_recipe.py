"""Pairwise Router Consistency's recipe (configs/imagenet_prc*.py).

The configs must say what PRC's released configs say (m82kada/PRC at
61d3359, `prc_ilsvrc2012_full` and `prc_ilsvrc2012_ft`); the numbers below
are read off those files by hand, not from our code. View 2's own crop area
range (PRC's fine-tuning) is checked on the sampled affines.
"""

import importlib.util
import json
import os

import commands
import jax
import numpy as np
import pytest

from vmoe_jsd import augment, config_lib

ROOT = commands.ROOT
IMAGENET_TRAIN_99 = 1_268_355  # tfds imagenet2012 'train[:99%]'


def _load(name, arg=None):
  path = os.path.join(ROOT, 'configs', f'{name}.py')
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def _check_prc_consistency(spec):
  opts = spec.step.consistency
  assert opts.loss == 'cross_correlation'
  # PRC: matrix_top1_diagonal 5e-3 and matrix_top1_offdiagonal 5e-2.
  weight = spec.step.consistency_weight
  assert weight * opts.diagonal_weight == pytest.approx(5e-3)
  assert weight * opts.offdiagonal_weight == pytest.approx(5e-2)
  assert opts.include_cls and opts.stop_gradient == 'none'


def test_pretraining_config_is_prcs_recipe():
  config = _load('imagenet_prc')
  spec = config_lib.resolve(config, num_devices=8)
  _check_prc_consistency(spec)
  # similarity_loss_layer=[6, 8] counts from 1: our blocks 5 and 7, which
  # are the MoE blocks of V-MoE-S/32 'last 2'.
  assert tuple(spec.step.consistency_layers) == (5, 7)
  assert tuple(spec.model.moe_layers) == (5, 7)
  router = config.model.encoder.moe.router
  assert router.importance_loss_weight == 0 and router.load_loss_weight == 0
  assert router.num_selected_experts == 2
  assert config.dataset.train.batch_size * 2 == 1024  # PRC's views/step
  lr = config.optimizer.learning_rate
  assert lr.peak_value == pytest.approx(3e-3 / 2 / 2)
  assert lr.end_value == pytest.approx(1e-5 / 2)
  assert lr.warmup_steps == 10_000
  assert config.augment.crop_scale == (0.05, 1.0)
  assert config.augment.randaugment == (2, 10)
  assert config.mixup.concentration == 0
  steps = -(-300 * IMAGENET_TRAIN_99 // 512)
  assert spec.num_train_steps(IMAGENET_TRAIN_99) == steps == 743_177


def test_finetuning_config_is_prcs_recipe():
  config = _load('imagenet_prc_ft384')
  config.initialization.path = '/ckpt'
  spec = config_lib.resolve(config, num_devices=8)
  _check_prc_consistency(spec)
  assert spec.num_steps == 5000
  assert config.dataset.train.batch_size == 512
  assert config.optimizer.name == 'sgd'
  lr = config.optimizer.learning_rate
  assert lr.schedule == 'warmup_cosine_decay'
  assert lr.peak_value == pytest.approx(4.5e-3)
  assert lr.end_value == pytest.approx(1.5e-5)
  assert config.optimizer.gradient_clip.global_norm == 10.0
  dispatcher = config.model.encoder.moe.router.dispatcher
  assert dispatcher.capacity_factor == 1.5
  assert spec.views.crop_scale == (0.05, 0.7)
  assert spec.views.second_crop_scale == (0.6, 1.0)


def _crop_areas(settings, num_keys=300, hw=(200.0, 200.0)):
  keys = jax.random.split(jax.random.key(0), num_keys)
  affines = jax.vmap(lambda k: augment.paired_affines(k, hw, settings))(keys)
  # View pixels -> source pixels: |det| of the linear part is the crop's
  # area over the view's, S^2.
  det = np.abs(np.linalg.det(np.asarray(affines)[..., :2, :2]))
  return det * settings.size**2 / (hw[0] * hw[1])


def test_second_crop_scale_gives_view_2_its_own_area_range():
  settings = augment.ViewSettings(
    size=32, patch_size=8, crop_scale=(0.05, 0.3), second_crop_scale=(0.6, 1.0)
  )
  areas = _crop_areas(settings)
  assert areas.shape == (300, 2)
  np.testing.assert_array_less(areas[:, 0], 0.3 + 1e-4)
  np.testing.assert_array_less(0.05 - 1e-4, areas[:, 0])
  np.testing.assert_array_less(0.6 - 1e-4, areas[:, 1])
  np.testing.assert_array_less(areas[:, 1], 1.0 + 1e-4)
  # Both ranges are covered, not one end of them.
  assert areas[:, 0].max() - areas[:, 0].min() > 0.2
  assert areas[:, 1].max() - areas[:, 1].min() > 0.3


@pytest.mark.slow
def test_second_crop_scale_equal_to_crop_scale_changes_nothing():
  base = augment.ViewSettings(size=32, patch_size=8, randaugment=(2, 10))
  same = augment.ViewSettings(
    size=32, patch_size=8, randaugment=(2, 10), second_crop_scale=(0.35, 1.0)
  )
  np.testing.assert_array_equal(_crop_areas(base, 20), _crop_areas(same, 20))


@pytest.mark.parametrize('bad', [(0.0, 0.5), (0.7, 0.6), (0.5, 1.5)])
def test_bad_second_crop_scale_is_named(bad):
  with pytest.raises(ValueError, match='second_crop_scale'):
    augment.ViewSettings(size=32, patch_size=8, second_crop_scale=bad)


@pytest.mark.slow
@pytest.mark.parametrize('name', ['imagenet_prc', 'imagenet_prc_ft384'])
def test_runlocal_trains_with_prcs_loss_and_no_auxiliary_losses(name, tmp_path):
  data_dir = str(tmp_path / 'tfds')
  workdir = str(tmp_path / 'run')
  config = os.path.join(ROOT, 'configs', f'{name}.py')
  proc = commands.run(
    commands.module(
      'vmoe_jsd.main',
      f'--config={config}:runlocal',
      f'--workdir={workdir}',
      f'--config.dataset.train.data_dir={data_dir}',
      f'--config.dataset.test.data_dir={data_dir}',
    )
  )
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  with open(os.path.join(workdir, 'train_history.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  assert len(rows) == 4
  for row in rows:
    assert row['auxiliary_loss'] == 0.0
    # Barlow-Twins loss of E=8 routers: a JSD could not exceed log 2.
    assert row['consistency'] > np.log(2)
    assert row['matched_pairs'] > 0

"""Every config in configs/ builds and validates; the upcycling one runs."""

import glob
import importlib.util
import json
import os
import sys

import commands
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from flax.traverse_util import flatten_dict as flax_flatten
from ml_collections import config_flags

from vmoe_jsd import config_lib, sharding, train
from vmoe_jsd.config_errors import to_dict
from vmoe_jsd.models import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, 'configs', '*.py')))


def load(path, arg=None):
  spec = importlib.util.spec_from_file_location('cfg', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.mark.parametrize('path', CONFIGS, ids=os.path.basename)
def test_config_validates(path, tmp_path):
  config = load(path)
  with config.unlocked():
    if config.initialization.source:
      config.initialization.path = str(tmp_path)  # exists
    for split in config.dataset:  # file checks need the data; not here
      if config.dataset[split].name == 'fashion_mnist':
        config.dataset[split].name = 'synthetic'
        config.dataset[split].num_classes = config.model.num_classes
  devices = config.num_expert_partitions
  spec = config_lib.validate(config, num_devices=devices)
  # The model builds (abstractly) at the config's size.
  model = spec.model.build(deterministic=True)
  images = spec.model.min_images_per_batch(config.augment.size)
  shapes = jax.eval_shape(
    model.init, jax.random.key(0),
    jnp.zeros((images, config.augment.size, config.augment.size, 3)),
  )  # fmt: skip
  assert 'Encoder' in shapes['params']
  local = load(path, 'runlocal')
  with local.unlocked():
    if local.initialization.source:
      local.initialization.path = str(tmp_path)
    for split in local.dataset:
      if local.dataset[split].name == 'fashion_mnist':
        local.dataset[split].name = 'synthetic'
        local.dataset[split].num_classes = local.model.num_classes
  config_lib.validate(local, num_devices=1)


@pytest.mark.processes
def test_upcycling_config_runs_from_a_dense_vit_npz(tmp_path):
  """configs/upcycle_vit_b16_i1k.py:runlocal, from a ViT .npz in
  vision_transformer's naming written here by hand."""
  path = os.path.join(ROOT, 'configs', 'upcycle_vit_b16_i1k.py')
  config = load(path, 'runlocal')
  dense_cfg = to_dict(config.model)
  dense_cfg['encoder'] = {k: v for k, v in dense_cfg['encoder'].items()
                          if k != 'moe'}  # fmt: skip
  dense = build_model(dense_cfg, deterministic=True)
  params = jax.jit(dense.init)(jax.random.key(5), jnp.zeros((1, 32, 32, 3)))
  flat = sharding.flatten_names(params['params'])
  rename = {'Encoder/': 'Transformer/', 'SelfAttention':
            'MultiHeadDotProductAttention_1', 'LayerNorm_1': 'LayerNorm_2',
            '/Mlp/': '/MlpBlock_3/'}  # fmt: skip
  vit = {}
  for name, value in flat.items():
    for ours, theirs in rename.items():
      name = name.replace(ours, theirs)
    vit[name] = np.asarray(value)
  npz = str(tmp_path / 'vit.npz')
  np.savez(npz, **vit)
  workdir = str(tmp_path / 'run')
  proc = commands.run(
    commands.module(
      'vmoe_jsd.main',
      f'--config={path}:runlocal',
      f'--workdir={workdir}',
      f'--config.initialization.path={npz}',
    )
  )
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  assert 'upcycled' in proc.stdout
  with open(os.path.join(workdir, 'results.json')) as f:
    assert json.load(f)['step'] == 4


TFDS_CONFIGS = [p for p in CONFIGS if load(p).dataset.train.name == 'tfds']


@pytest.mark.parametrize('path', TFDS_CONFIGS, ids=os.path.basename)
def test_tfds_configs_runlocal_on_the_tfds_path_and_take_flags(
  path, monkeypatch
):
  """:runlocal keeps the tfds dataset (mini copy), not synthetic arrays;
  data_dir and friends (None by default) are settable from the command
  line."""
  full, local = load(path), load(path, 'runlocal')
  for split in ('train', 'test'):
    assert local.dataset[split].name == 'tfds'
    assert local.dataset[split].mini
    assert local.dataset[split].tfds_name == full.dataset[split].tfds_name
    assert local.dataset[split].split == full.dataset[split].split
  values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'cfg', flag_values=values)
  argv = [
    'prog', f'--config={path}', '--config.dataset.train.data_dir=/data/x',
    '--config.dataset.test.data_dir=/data/y',
    '--config.dataset.train.num_workers=12',
    '--config.initialization.path=/ckpt',
  ]  # fmt: skip
  monkeypatch.setattr(sys, 'argv', argv)  # config_flags reads sys.argv
  values(argv)
  config = values.config
  assert config.dataset.train.data_dir == '/data/x'
  assert config.dataset.test.data_dir == '/data/y'
  assert config.dataset.train.num_workers == 12


class _Hyper:
  """vmoe's sweep API, enough for get_hyper: lists of {key: value}."""

  @staticmethod
  def sweep(key, values):
    return [{key: v} for v in values]

  @staticmethod
  def product(sweeps):
    out = [{}]
    for sweep in sweeps:
      out = [{**a, **b} for a in out for b in sweep]
    return out


def test_imagenet_sweep_is_weight_0_vs_default_times_3_seeds():
  spec = importlib.util.spec_from_file_location(
    'imagenet_cfg', os.path.join(ROOT, 'configs', 'imagenet.py')
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  points = module.get_hyper(_Hyper())
  default = module.get_config().consistency.weight
  assert sorted(
    (p['config.consistency.weight'], p['config.seed']) for p in points
  ) == [(w, s) for w in (0.0, default) for s in (0, 1, 2)]


def _flat(config):
  return {'.'.join(k): v for k, v in flax_flatten(to_dict(config)).items()}


def test_dense_imagenet_is_the_imagenet_recipe_without_moe():
  """configs/imagenet_dense.py differs from configs/imagenet.py only in
  what a model without MoE layers cannot use; resolution gives no MoE
  layers, no consistency layers, no flip rates; a consistency weight fails
  in one line."""
  moe = load(os.path.join(ROOT, 'configs', 'imagenet.py'))
  dense = load(os.path.join(ROOT, 'configs', 'imagenet_dense.py'))
  a, b = _flat(moe), _flat(dense)
  changed = {k for k in a.keys() | b.keys() if a.get(k, '-') != b.get(k, '-')}
  assert {k.split('.moe.')[0] for k in changed} == {
    'model.encoder', 'consistency.weight', 'num_expert_partitions',
    'evaluate.model_overrides.encoder',
  }  # fmt: skip
  assert b['consistency.weight'] == 0.0 and b['num_expert_partitions'] == 1
  spec = config_lib.resolve(dense, 8)
  assert spec.model.moe_layers == () and spec.step.consistency_layers == ()
  assert not spec.stability.enabled
  with dense.unlocked():
    dense.consistency.weight = 0.1
  with pytest.raises(config_lib.ConfigError) as err:
    config_lib.resolve(dense, 8)
  assert str(err.value) == (
    'config.consistency.weight=0.1 is invalid: needs MoE layers and '
    'model.encoder.moe.layers is empty (a dense model): set it to 0'
  )


@pytest.mark.slow  # About 130 s under load (30 s of CPU; mini data first).
def test_dense_imagenet_runlocal_trains_and_evaluates(tmp_path):
  config = load(os.path.join(ROOT, 'configs', 'imagenet_dense.py'), 'runlocal')
  config.dataset.train.data_dir = str(tmp_path / 'tfds')
  config.dataset.test.data_dir = str(tmp_path / 'tfds')
  result = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert result['step'] == 4 and result['routing'] == {}
  assert 'stability' not in result and result['consistency_weight'] == 0.0

"""Bad configs fail before any work, naming the key, value and valid ones."""

import importlib.util
import os
import sys

import pytest

from vmoe_jsd import config_lib, data

sys.path.insert(0, os.path.dirname(__file__))
import commands
import smoke_config  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def smoke(**overrides):
  return smoke_config.with_overrides(smoke_config.get_config(), **overrides)


def test_smoke_and_default_configs_are_valid():
  config_lib.validate(smoke(), num_devices=8)
  path = os.path.join(ROOT, 'configs', 'default.py')
  module_spec = importlib.util.spec_from_file_location('default', path)
  default = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(default)
  config = default.get_config()
  with config.unlocked():
    # Validation checks that the data exists; point it at fake files.
    for split in ('train', 'test'):
      config.dataset[split].name = 'synthetic'
      config.dataset[split].num_classes = 10
  config_lib.validate(config, num_devices=1)


@pytest.mark.parametrize(
  'overrides,message',
  [
    (
      {'model.encoder.moe.router.name': 'TopK'},
      "router.name='TopK' is unknown; choose one of ['NoisyTopExpertsPerItem",
    ),
    (
      {'model.encoder.moe.router.num_selected_experts': 5},
      'num_selected_experts=5 is invalid: K must be in [1, num_experts=4]',
    ),
    (
      {'model.encoder.moe.group_size': 30},
      'group_size=30 is invalid: must divide the tokens per device',
    ),
    ({'dataset.train.batch_size': 12}, 'dataset.train.batch_size=12'),
    ({'loss.name': 'hinge'}, "loss.name='hinge' is invalid: one of"),
    ({'consistency.loss': 'kl'}, "consistency.loss='kl' is invalid"),
    ({'consistency.temperature': 0.0}, 'consistency.temperature=0.0'),
    ({'consistency.layers': (0,)}, 'consistency.layers=(0,)'),
    (
      {'consistency.stop_gradient': 'both'},
      "consistency.stop_gradient='both' is unknown; choose one of ['none'",
    ),
    ({'consistency.entropy_cap': 2.0}, 'consistency.entropy_cap=2.0'),
    (
      {
        'consistency.include_cls': True,
        'model.classifier': 'gap',
        'model.encoder.moe.group_size': 32,
      },
      'consistency.include_cls=True is invalid: needs a class token',
    ),
    ({'model.encoder.moe.layers': (5,)}, 'moe.layers=(5,)'),
    ({'augment.crop_scale': (0.0, 1.0)}, 'crop_scale=(0.0, 1.0)'),
    ({'augment.randaugment': (2, 30)}, 'randaugment=(2, 30)'),
    ({'mixup.concentration': -0.2}, 'mixup.concentration=-0.2 is invalid'),
    ({'mixup.alpha': 0.2}, "config.mixup=['alpha'] is invalid: keys in"),
    # Smoke: 8 images on 8 devices, one per shard: nobody to mix with.
    ({'mixup.concentration': 0.2}, 'holds 1 image(s) of dataset.train'),
    ({'optimizer.name': 'lamb'}, "optimizer.name='lamb'"),
    ({'num_expert_partitions': 3}, 'num_expert_partitions=3'),
    ({'model.classifier': 'pool'}, "classifier='pool'"),
    ({'dataset.train.name': 'imagenet'}, "dataset.train.name='imagenet'"),
    (
      {'model.encoder.moe.router.dispatcher.capacity_factor': None},
      'set exactly one of capacity and capacity_factor',
    ),
    # Issue 16: values accepted before, though wrong. K S cf / E with K=2,
    # S=34 tokens, E=4: cf=1e-9 gives 1.7e-8 tokens of capacity (the
    # rounding then gave 4 slots); the least cf is E / (K S) = 4/68.
    (
      {'model.encoder.moe.router.dispatcher.capacity_factor': 1e-9},
      'capacity_factor=1e-09 is invalid: gives each expert K S cf / E = '
      '68 x 1e-09 / 4 = 1.7e-08 token(s) of capacity per routing group '
      'before rounding; it must be >= 1, i.e. capacity_factor >= 0.05882',
    ),
    (
      {'model.encoder.moe.router': {'name': 'NoisyTopItemsPerExpertRouter',
                                    'dispatcher': {'capacity_factor': 0.1}}},
      'capacity_factor=0.1 is invalid: gives each expert S cf / E = 34 x 0.1'
      ' / 4 = 0.85 token(s)',
    ),
    (
      {'model.encoder.moe.router': {'name': 'SoftRouter',
                                    'capacity_factor': 0.05}},
      'router (training).capacity_factor=0.05 is invalid',
    ),
    (
      {'model.encoder.moe.layers': (1, 1)},
      'moe.layers=(1, 1) is invalid: distinct integer block indices, e.g. '
      '(1, 3); repeated: [1]',
    ),
    ({'model.encoder.moe.layers': (1.5,)}, 'moe.layers=(1.5,) is invalid'),
    ({'model.encoder.moe.layers': (-1,)}, 'moe.layers=(-1,) is invalid'),
    (
      {'optimizer.learning_rate.peak_value': 1e-300},
      'peak_value=1e-300 is invalid: a float32 learning rate must be in '
      '[1.175e-38, 3.403e+38]',
    ),
    ({'optimizer.learning_rate.end_value': 1e-40}, 'end_value=1e-40'),
    ({'augment.size': 0}, 'config.augment.size=0 is invalid: must be an'),
    ({'augment.size': -16}, 'config.augment.size=-16 is invalid'),
  ],
)  # fmt: skip
def test_bad_config_is_rejected_with_the_key_and_value(overrides, message):
  with pytest.raises(ValueError) as e:
    config_lib.validate(smoke(**overrides), num_devices=8)
  assert message in str(e.value)


def test_capacity_alone_replaces_the_capacity_factor():
  """--config...dispatcher.capacity=N is enough (a float cannot be set back
  to None from the command line): it wins, in training and evaluation."""
  spec = config_lib.validate(
    smoke(**{'model.encoder.moe.router.dispatcher.capacity': 8}), 8
  )
  for cfg in (spec.model.config, spec.model.eval_config):
    dispatcher = cfg['encoder']['moe']['router']['dispatcher']
    assert dispatcher['capacity'] == 8 and 'capacity_factor' not in dispatcher
  # Unset (a placeholder's None): the factors as before, 1.25 and 4.0.
  spec = config_lib.validate(
    smoke(**{'model.encoder.moe.router.dispatcher.capacity': None}), 8
  )
  models = (spec.model.config, spec.model.eval_config)
  factors = [m['encoder']['moe']['router']['dispatcher'] for m in models]
  assert factors == [{'name': 'indices', 'capacity_factor': 1.25},
                     {'name': 'indices', 'capacity_factor': 4.0}]  # fmt: skip


def test_the_least_capacity_factor_is_accepted():
  """The rule's boundary, by hand: K S cf / E = 2 x 34 x cf / 4 >= 1."""
  ok = smoke(**{'model.encoder.moe.router.dispatcher.capacity_factor': 4 / 68})
  config_lib.validate(ok, num_devices=8)
  low = smoke(**{'model.encoder.moe.router.dispatcher.capacity_factor': 0.058})
  with pytest.raises(ValueError, match='= 0.986 token'):
    config_lib.validate(low, num_devices=8)


def test_num_classes_is_checked_against_the_data():
  """Every dataset kind that knows its classes: a head of 5 on 10-class
  data fails before any work (it trained silently), in one line."""
  with pytest.raises(ValueError) as e:
    config_lib.validate(smoke(**{'model.num_classes': 5}), num_devices=8)
  assert str(e.value) == (
    'config.model.num_classes=5 is invalid: dataset.train (synthetic) has 4 '
    'classes; set model.num_classes=4'
  )
  ten = smoke(**{'dataset.train.num_classes': 10,
                 'dataset.test.num_classes': 10})  # fmt: skip
  with pytest.raises(ValueError, match='num_classes=4 is invalid: dataset'):
    config_lib.validate(ten, num_devices=8)
  with ten.unlocked():
    ten.model.num_classes = 10
  config_lib.validate(ten, num_devices=8)


def test_num_classes_of_fashion_mnist_and_tfds(tmp_path):
  """Fashion-MNIST: 10 classes without reading its files; tfds: the
  builder's info (imagenet2012's code-defined 1000 classes, nothing
  prepared; data_dir empty)."""
  fashion = data.SplitSpec.from_config(
    'train', {'name': 'fashion_mnist', 'split': 'train', 'batch_size': 8}, 16
  )
  assert fashion.num_classes() == 10
  block = {'name': 'tfds', 'tfds_name': 'imagenet2012', 'split': 'train',
           'batch_size': 8, 'image_size': 24, 'data_dir': str(tmp_path),
           'mini': True}  # fmt: skip
  assert data.SplitSpec.from_config('train', block, 16).num_classes() == 1000
  config = _tfds_smoke(data_dir=str(tmp_path), mini=True)
  with pytest.raises(ValueError, match='has 1000 classes; set model.num'):
    config_lib.validate(config, num_devices=8)


def test_misspelt_model_key_lists_valid_keys():
  config = smoke()
  with config.unlocked():
    config.model.encoder.moe.router.num_selected_expert = 2
  with pytest.raises(ValueError, match="unknown keys \\['num_selected_expert'"):
    config_lib.validate(config, num_devices=8)


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path):
  config = smoke()
  with config.unlocked():
    config.dataset.train = dict(
      name='fashion_mnist', split='train', batch_size=8, data_dir=str(tmp_path)
    )
  with pytest.raises(FileNotFoundError) as e:
    config_lib.validate(config, num_devices=8)
  assert 'apt-get install -y dataset-fashion-mnist' in str(e.value)
  assert str(tmp_path) in str(e.value)


@pytest.mark.processes  # main's exit before compiling.
def test_main_rejects_bad_config_before_compiling(tmp_path):
  proc = commands.run(
    commands.module(
      'vmoe_jsd.main',
      f'--config={commands.SMOKE}',
      f'--workdir={tmp_path}',
      '--config.model.encoder.moe.group_size=7',
    ),
    timeout=120,
  )
  assert proc.returncode != 0
  assert 'group_size=7 is invalid' in proc.stderr
  assert not os.path.exists(os.path.join(tmp_path, 'checkpoints'))


def test_initialization_block_is_checked(tmp_path):
  with pytest.raises(ValueError, match="initialization.source='hub'"):
    config_lib.validate(
      smoke(**{'initialization.source': 'hub', 'initialization.path': 'x'}),
      num_devices=8,
    )
  with pytest.raises(FileNotFoundError, match='nowhere.npz'):
    config_lib.validate(
      smoke(**{'initialization.source': 'vit_npz',
               'initialization.path': str(tmp_path / 'nowhere.npz')}),
      num_devices=8,
    )  # fmt: skip


def test_expert_choice_capacity_is_checked_for_training_and_evaluation():
  router = {'name': 'NoisyTopItemsPerExpertRouter',
            'dispatcher': {'capacity_factor': 1.0}}  # fmt: skip
  config = smoke(**{'model.encoder.moe.router': router})
  # The evaluation override (capacity factor 4) needs 36 slots of a group
  # of 34 tokens: rejected up front, not after training.
  with pytest.raises(ValueError, match='capacity 36 exceeds the group size 34'):
    config_lib.validate(config, num_devices=8)
  with config.unlocked():
    config.evaluate.model_overrides = {}
  config_lib.validate(config, num_devices=8)
  soft = smoke(**{'model.encoder.moe.router': {'name': 'SoftRouter'}})
  config_lib.validate(soft, num_devices=8)  # Soft MoE has no dispatcher.


def _tfds_smoke(**block):
  config = smoke()
  with config.unlocked():
    config.dataset.train = dict(name='tfds', tfds_name='imagenet2012',
                                split='train', batch_size=8, image_size=24,
                                resize_size=None, **block)  # fmt: skip
  return config


@pytest.mark.parametrize(
  'block,message',
  [
    ({'image_size': 12}, 'dataset.train.image_size=12 is invalid: the '
     'training canvas must be >= augment.size=16'),
    ({'image_size': 0}, 'dataset.train.image_size=0 is invalid: a positive'),
    ({'tfds_name': ''}, "dataset.train.tfds_name='' is invalid"),
    ({'resize_size': 20}, 'dataset.train.resize_size=20 is invalid: None or '
     '>= image_size=24'),
  ],
)  # fmt: skip
def test_bad_tfds_block_is_rejected(block, message):
  config = _tfds_smoke()
  with config.unlocked():
    config.dataset.train.update(block)
  with pytest.raises(ValueError) as e:
    config_lib.validate(config, num_devices=8)
  assert message in str(e.value)


def test_folder_block_is_checked_before_any_work(tmp_path):
  config = smoke()
  with config.unlocked():
    config.dataset.train = dict(name='folder', data_dir=str(tmp_path),
                                split='train', batch_size=8)  # fmt: skip
  with pytest.raises(FileNotFoundError, match=r"split='train' has no folder"):
    config_lib.validate(config, num_devices=8)
  (tmp_path / 'train' / 'cat').mkdir(parents=True)
  with pytest.raises(ValueError, match='is empty'):
    config_lib.validate(config, num_devices=8)


def test_fewshot_batches_must_fill_whole_routing_groups():
  """Few-shot features go through the evaluation model: each device's
  images must fill whole routing groups, or the model fails mid-run."""
  config = smoke()
  unit = config_lib.resolve(config, 8).model.min_images_per_batch(
    config.augment.size, evaluation=True
  )
  block = dict(name='synthetic', split='train', num_examples=64)
  with config.unlocked():
    config.fewshot.datasets = {'s': {
      'train': dict(block, batch_size=8 * unit),
      'test': dict(block, split='test', batch_size=8 * unit + 8),
    }}  # fmt: skip
  with pytest.raises(ValueError) as e:
    config_lib.validate(config, num_devices=8)
  assert str(e.value).startswith(
    f'config.fewshot.datasets.s.test.batch_size={8 * unit + 8} is invalid: '
    f'must be a multiple of {8 * unit}'
  )
  with config.unlocked():
    config.fewshot.datasets.s.test.batch_size = 16 * unit
  assert config_lib.validate(config, num_devices=8).fewshot.enabled

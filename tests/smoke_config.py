"""A tiny V-MoE on synthetic data: seconds per run, for end-to-end tests."""

import ml_collections

from vmoe_jsd import config_common
from vmoe_jsd.data import arrays


def get_config(arg=None):
  del arg
  config = config_common.base_config()
  config.num_train_steps = 6
  config.dataset = ml_collections.ConfigDict()
  config.dataset.train = dict(
    name='synthetic',
    split='train',
    batch_size=8,
    num_examples=64,
    image_size=16,
  )
  config.dataset.test = dict(
    name='synthetic',
    split='test',
    batch_size=16,
    num_examples=32,
    image_size=16,
  )
  config.augment = dict(
    size=16, crop_scale=(0.5, 1.0), brightness=0.1, contrast=0.1
  )
  config.model = dict(
    num_classes=4,
    patch_size=(4, 4),
    hidden_size=16,
    classifier='token',
    dtype='float32',
    encoder=dict(
      num_layers=2,
      mlp_dim=32,
      num_heads=2,
      remat='none',
      moe=dict(
        layers=(1,),
        num_experts=4,
        group_size=2 * 17,
        router=dict(
          num_selected_experts=2,
          noise_std=1.0,
          importance_loss_weight=0.005,
          load_loss_weight=0.005,
          dispatcher=dict(name='indices', capacity_factor=1.25),
        ),
      ),
    ),
  )
  config.optimizer = dict(
    name='adamw',
    weight_decay=0.01,
    gradient_clip=dict(global_norm=1.0),
    learning_rate=dict(
      schedule='warmup_cosine_decay',
      peak_value=1e-3,
      end_value=1e-5,
      warmup_steps=2,
    ),
  )
  config.consistency.weight = 0.5
  config.save_checkpoint.every_steps = 2
  config.report_progress.every_steps = 1
  config.evaluate.every_steps = 0
  # Flip rates and routing maps compile two more programs; tests that need
  # them (test_analyze.py) switch them on.
  config.evaluate.stability.enabled = False
  config.evaluate.routing_map_images = 0
  return ml_collections.ConfigDict(config)


def with_overrides(config, **overrides):
  """config with dotted keys replaced: with_overrides(c, **{'a.b': 1})."""
  with config.unlocked():
    for key, value in overrides.items():
      node = config
      *parents, leaf = key.split('.')
      for p in parents:
        node = node[p]
      node[leaf] = value
  return config


# Evaluations every 2 steps and a checkpoint every 4 (steps 2 and 3 saved
# only by a stop): the run that the stopped, crashed and resumed runs of
# the tests end as (conftest's `reference`).
REFERENCE = {'evaluate.every_steps': 2, 'save_checkpoint.every_steps': 4}


def crash_before_step(step: int):
  """An ArrayDataset.train_batches that raises KeyboardInterrupt when a
  fresh run (start_step 0) asks for the batch of `step`: a crash after
  step - 1 steps, for monkeypatching."""
  original = arrays.ArrayDataset.train_batches

  def crashing(self, *args, **kwargs):
    for i, batch in enumerate(original(self, *args, **kwargs)):
      if kwargs.get('start_step', 0) == 0 and i == step - 1:
        raise KeyboardInterrupt(f'simulated crash at step {step}')
      yield batch

  return crashing

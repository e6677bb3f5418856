"""Building blocks shared by the files in configs/ (they import from here)."""

from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  """Checkpointing, reporting, evaluation and consistency defaults."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.num_train_steps = 0
  config.train_epochs = 0
  # Size of the 'expert' mesh axis: experts are split over this many devices.
  config.num_expert_partitions = 1
  config.params_axis_resources = [('Moe/Mlp/.*', ('expert',))]
  config.save_checkpoint = ml_collections.ConfigDict(
    {'every_steps': 500, 'keep_last': 2}
  )
  config.report_progress = ml_collections.ConfigDict({'every_steps': 50})
  config.evaluate = ml_collections.ConfigDict(
    {
      'every_steps': 0,
      'limit': None,
      # vmoe evaluates with a larger capacity than it trains with.
      'model_overrides': {
        'encoder': {'moe': {'router': {'dispatcher': {'capacity_factor': 4.0}}}}
      },
    }
  )
  # Start from pretrained weights instead of random ones (ignored when the
  # workdir already holds a checkpoint to resume): source 'vit_npz' (sparse
  # upcycling of a dense ViT), 'vmoe' (vmoe-format checkpoint) or 'orbax'.
  config.initialization = ml_collections.ConfigDict(
    {
      'source': None,
      'path': None,
      'upcycle': True,
      'keep_head': False,
      'strict': True,
    }
  )
  config.loss = ml_collections.ConfigDict({'name': 'softmax_xent'})
  config.consistency = ml_collections.ConfigDict(
    {
      'loss': 'jsd',
      'weight': 0.0,
      'temperature': 1.0,
      'layers': None,  # None: every MoE layer.
    }
  )
  return config


def shrink_for_local_run(config: ml_collections.ConfigDict) -> None:
  """Cuts a config down to a CPU smoke run (`get_config('runlocal')`)."""
  config.num_train_steps = 20
  config.train_epochs = 0
  config.dataset.train.batch_size = 16
  config.dataset.test.batch_size = 64
  config.evaluate.limit = 256
  config.evaluate.every_steps = 0
  config.report_progress.every_steps = 5
  config.save_checkpoint.every_steps = 10

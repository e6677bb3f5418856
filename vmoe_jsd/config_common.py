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


def tfds_split(
  tfds_name: str,
  split: str,
  batch_size: int,
  image_size: int,
  resize_size: int | None = None,
  shuffle_buffer: int = 250_000,
) -> dict:
  """A config.dataset.<split> block for a tfds dataset (tf.data pipeline)."""
  return dict(
    name='tfds',
    tfds_name=tfds_name,
    split=split,
    batch_size=batch_size,
    image_size=image_size,
    resize_size=resize_size,
    shuffle_buffer=shuffle_buffer,
    data_dir=None,
  )


def shrink_to_synthetic(config: ml_collections.ConfigDict, **model) -> None:
  """`:runlocal` for ImageNet-size configs: tiny model, synthetic data."""
  config.num_train_steps = 4
  config.train_epochs = 0
  size = 32
  config.augment.size = size
  config.dataset.train = dict(name='synthetic', split='train', batch_size=8,
                              num_examples=64, image_size=size, channels=3,
                              num_classes=config.model.num_classes)  # fmt: skip
  config.dataset.test = dict(name='synthetic', split='test', batch_size=8,
                             num_examples=16, image_size=size, channels=3,
                             num_classes=config.model.num_classes)  # fmt: skip
  config.model.variant = None
  config.model.hidden_size = model.get('hidden_size', 32)
  config.model.patch_size = (8, 8)
  config.model.representation_size = None
  config.model.encoder.num_layers = model.get('num_layers', 2)
  config.model.encoder.mlp_dim = model.get('mlp_dim', 64)
  config.model.encoder.num_heads = 2
  # A placement string: the full configs use one (ConfigDict keeps types).
  config.model.encoder.moe.layers = model.get('layers', 'last 1')
  config.model.encoder.moe.group_size = 2 * ((size // 8) ** 2 + 1)
  config.save_checkpoint.every_steps = 2
  config.report_progress.every_steps = 1

r"""Transfer: fine-tunes configs/imagenet.py's V-MoE-S/32 on CIFAR-100.

  python -m vmoe_jsd.main --config=configs/transfer_cifar100.py \
      --workdir=DIR --config.initialization.path=PRETRAIN_WORKDIR \
      [--config.dataset.train.data_dir=TFDS_DIR \
       --config.dataset.test.data_dir=TFDS_DIR]

configs/transfer_cifar10.py's recipe, itself, on tfds `cifar100` (50k 32x32
training images, 100 classes; prepare it with `tfds build cifar100
--file_format=array_record`): 1000 steps of 1024 images, SGD lr 0.0015,
224 px, consistency 0.1.

NOT MEASURED here (no accelerator): vmoe fine-tunes CIFAR-10 in about 10
min on a TPU v3-8; there is no S/32 number of vmoe's to compare with.

`:runlocal`: a tiny model from scratch for 4 steps on an offline mini
`cifar100` (the tfds path, no checkpoint needed).
"""

from vmoe_jsd import config_common


def get_config(arg=None):
  # The CIFAR-10 config itself, so that the two cannot drift apart.
  config = config_common.sibling_config(__file__, 'transfer_cifar10')
  config = config.get_config(arg)
  for split in config.dataset.values():
    split.tfds_name = 'cifar100'
  config.model.num_classes = 100
  return config


def get_hyper(hyper):
  """Consistency weight 0 vs 0.1, three fine-tuning seeds each."""
  return config_common.weight_seed_sweep(hyper)

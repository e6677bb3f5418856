r"""Transfer: fine-tunes configs/imagenet.py's V-MoE-S/32 on CIFAR-10.

  python -m vmoe_jsd.main --config=configs/transfer_cifar10.py \
      --workdir=DIR --config.initialization.path=PRETRAIN_WORKDIR \
      [--config.dataset.train.data_dir=TFDS_DIR \
       --config.dataset.test.data_dir=TFDS_DIR]

tfds `cifar10` (50k 32x32 training images; prepare it with
`tfds build cifar10 --file_format=array_record`). vmoe's
`vmoe_b16_imagenet21k_randaug_strong_ft_cifar10` recipe applied to our
ImageNet-1k S/32 (config_common.finetune_config): 1000 steps of 1024
images, SGD momentum 0.9, lr 0.0015 (warm-up 100 steps, cosine decay),
clip 10, a fresh head, capacity factor 1.5, inception crop + flip at 224
px (the pre-training grid, 7x7 patches), whole-image resize for
evaluation, consistency 0.1.

NOT MEASURED here (no accelerator): vmoe fine-tunes CIFAR-10 in about 10
min on a TPU v3-8 (its B/16 reaches 98.7%); there is no S/32 number of
vmoe's to compare with.

`:runlocal`: a tiny model from scratch for 4 steps on an offline mini
`cifar10` (the tfds path, no checkpoint needed).
"""

from vmoe_jsd import config_common


def get_config(arg=None):
  config = config_common.finetune_config(
    tfds_name='cifar10',
    train_split='train[:98%]',
    test_split='test',
    num_classes=10,
    image_size=224,
    batch_size=1024,
    num_steps=1000,
    peak_lr=0.0015,
    warmup_steps=100,
    canvas=320,
  )
  return config_common.apply_config_arg(
    config, arg, config_common.finetune_runlocal
  )


def get_hyper(hyper):
  """Consistency weight 0 vs 0.1, three fine-tuning seeds each."""
  return config_common.weight_seed_sweep(hyper)

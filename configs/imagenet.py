r"""V-MoE-S/32 (E=8, K=2, last 2) on ImageNet-1k with router consistency.

  python -m vmoe_jsd.main --config=configs/imagenet.py --workdir=DIR \
      [--config.dataset.train.data_dir=TFDS_DIR \
       --config.dataset.test.data_dir=TFDS_DIR]

vmoe's `vmoe_s32_last2_ilsvrc2012_randaug_light1` recipe (Riquelme et al.,
"Scaling Vision with Sparse Mixture of Experts", NeurIPS 2021; vmoe's "S"
has 8 blocks, hidden 512, MLP 2048, 8 heads): MoE on blocks 5 and 7, E=8,
K=2, groups of 8 images, capacity factor 1.05 (4.0 for evaluation), expert
dropout 0.2, sigmoid cross-entropy, Adam lr 3e-3 (10k warm-up steps, linear
decay to 1e-5), weight decay 0.1 on kernels, gradient clip 1.0, 300 epochs
of train[:99%], inception crops of area 5-100% of the whole image at 224,
flip, RandAugment(2, 10), mixup 0.2. Plus the JSD between the routers of
matched patches of two views of every image (Kada et al., MIRU 2023),
weight 0.1. A batch is 4096 images x 2 views = vmoe's 8192 views per step,
so 300 epochs = 92,898 steps.

Data: tfds `imagenet2012` prepared as ArrayRecord (`tfds build imagenet2012
--file_format=array_record --manual_dir=...` with the ILSVRC2012 archives).
The host resizes each whole image into a 320x320 canvas and sends its
original size; crops are sampled on device in original-image pixels.

Expected hardware and time: vmoe trains this model in 5h50m on a TPU v3-32
(about 18k images/s); with two views per image each step does about twice
the work, so expect about 12 h on a TPU v3-32 (or about 2.3k images/s per
host of 4) -- an estimate, NOT MEASURED here (no accelerator in this
sandbox). Accuracy to compare with: vmoe's 76.8% ILSVRC2012 validation top-1
(mean of 3 seeds); `--config.consistency.weight=0` is the same recipe
without the consistency loss (see get_hyper for the sweep).

`:runlocal` is a CPU smoke run of the same code path: a tiny model for 4
steps on an offline mini `imagenet2012` (same tfds name, features and
splits, ~100 generated JPEGs) prepared on first use in data_dir.
"""

import ml_collections

from vmoe_jsd import config_common

NUM_CLASSES = 1000
BATCH_SIZE = 4096  # images; x 2 views = 8192 views, vmoe's batch of views.
CANVAS = 320  # host canvas side (benchmarks/README.md: canvas size)


def get_config(arg=None):
  config = config_common.base_config()
  config.train_epochs = 300
  config.num_train_steps = 0
  config.dataset = ml_collections.ConfigDict()
  config.dataset.train = config_common.tfds_split(
    'imagenet2012', 'train[:99%]', BATCH_SIZE, image_size=CANVAS
  )
  config.dataset.test = config_common.tfds_split(
    'imagenet2012', 'validation', BATCH_SIZE, image_size=224, resize_size=256
  )
  # vmoe: decode_jpeg_and_inception_crop(224)|flip_lr|randaug(2, 10).
  config.augment = dict(
    size=224,
    crop_scale=(0.05, 1.0),
    crop_ratio=(3 / 4, 4 / 3),
    flip=True,
    randaugment=(2, 10),
    fill_value=128 / 255,  # vmoe's randaug fills with grey 128.
  )
  config.mixup = dict(concentration=0.2)
  config.loss.name = 'sigmoid_xent'
  # V-MoE-S/32: 8 blocks, E=8, K=2 on the last 2 odd blocks, groups of 8
  # images, capacity factor 1.05 (4.0 at evaluation), expert dropout 0.2.
  model = config_common.vmoe_s32_model(
    NUM_CLASSES, 224, capacity_factor=1.05, representation_size=512
  )
  model['head_bias_init'] = -6.9077552789821368  # -log(1000), as vmoe
  config.model = model
  config.optimizer = config_common.warmup_optimizer(
    'adam', 'warmup_linear_decay', 3e-3, 10_000, clip=1.0, kernel_decay=0.1
  )
  config_common.full_size_run(config, report=100, evaluate=5000)
  return config_common.apply_config_arg(config, arg)


def get_hyper(hyper):
  """Consistency weight 0 (vmoe's recipe) vs 0.1, three seeds each.

  `hyper` has vmoe's sweep API: `sweep(key, values)` lists one-key
  assignments, `product(sweeps)` their Cartesian product.
  """
  return config_common.weight_seed_sweep(hyper)

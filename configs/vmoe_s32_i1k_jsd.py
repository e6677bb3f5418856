r"""V-MoE-S/32 (E=8, K=2, last 2) on ImageNet-1k with router consistency.

  python -m vmoe_jsd.main --config=configs/vmoe_s32_i1k_jsd.py \
      --workdir=gs_or_local_dir [--config.consistency.weight=0.0]

The backbone, MoE layout, optimizer and schedule of vmoe's
vmoe_s32_last2_ilsvrc2012_randaug_light1 config (vmoe's "S" has 8 blocks),
with two views per image and the JSD between matched patches' routers
(Kada et al., MIRU 2023). Multi-host: launch/tpu_vm.sh, launch/slurm_gpu.sh.

NOT MEASURED here (no TPU/GPU in this project's sandbox): no accuracy or
time is claimed. Differences from vmoe's recipe that will cost accuracy
until they are added: no RandAugment and no mixup yet (vmoe's 76.8%
validation top-1 uses RandAugment(2, 10) and mixup 0.2). Each step costs two
forward/backward passes per image; the batch counts images.

`:runlocal` shrinks it to a tiny model on synthetic data (smoke run).
"""

import ml_collections

from vmoe_jsd import config_common

NUM_CLASSES = 1000
BATCH_SIZE = 4096  # images; x 2 views = 8192 views, vmoe's batch of views.
TOKENS = (224 // 32) ** 2 + 1


def get_config(arg=None):
  config = config_common.base_config()
  config.train_epochs = 300
  config.num_train_steps = 0
  config.dataset = ml_collections.ConfigDict()
  config.dataset.train = config_common.tfds_split(
    'imagenet2012', 'train[:99%]', BATCH_SIZE, image_size=256
  )
  config.dataset.test = config_common.tfds_split(
    'imagenet2012', 'validation', BATCH_SIZE, image_size=224, resize_size=256
  )
  # Inception crops of the central 256 square, at 224, as vmoe's
  # decode_jpeg_and_inception_crop(224)|flip_lr.
  config.augment = dict(size=224, crop_scale=(0.08, 1.0), flip=True)
  config.loss.name = 'sigmoid_xent'
  config.model = dict(
    variant='S/32',
    num_classes=NUM_CLASSES,
    classifier='token',
    representation_size=512,
    head_bias_init=-6.9077552789821368,  # -log(1000), as vmoe
    encoder=dict(
      dropout_rate=0.0,
      attention_dropout_rate=0.0,
      moe=dict(
        layers='last 2',
        num_experts=8,
        group_size=8 * TOKENS,
        dropout_rate=0.2,
        split_rngs=False,
        router=dict(
          num_selected_experts=2,
          noise_std=1.0,
          importance_loss_weight=0.005,
          load_loss_weight=0.005,
          dispatcher=dict(name='indices', capacity_factor=1.05,
                          batch_priority=False, bfloat16=True),
        ),
      ),
    ),
  )  # fmt: skip
  config.optimizer = dict(
    name='adam', b1=0.9, b2=0.999,
    weight_decay=[('.*/kernel$', 0.1)],
    gradient_clip=dict(global_norm=1.0),
    learning_rate=dict(schedule='warmup_linear_decay', peak_value=3e-3,
                       end_value=1e-5, warmup_steps=10_000),
  )  # fmt: skip
  config.num_expert_partitions = 8
  config.consistency.weight = 0.1
  config.save_checkpoint.every_steps = 1000
  config.report_progress.every_steps = 100
  config.evaluate.every_steps = 5000
  config = ml_collections.ConfigDict(config)
  if arg == 'runlocal':
    config.num_expert_partitions = 1
    config_common.shrink_to_synthetic(config)
  elif arg:
    raise ValueError(f"config argument {arg!r} is unknown; use 'runlocal'")
  return config

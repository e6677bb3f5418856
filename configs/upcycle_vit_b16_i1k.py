r"""Sparse upcycling: V-MoE-B/16 (E=8, K=2, every 2) from a dense ViT-B/16.

  python -m vmoe_jsd.main --config=configs/upcycle_vit_b16_i1k.py \
      --config.initialization.path=/path/to/ViT-B_16.npz --workdir=DIR

Komatsuzaki et al., "Sparse Upcycling", ICLR 2023 (arXiv:2212.05055): every
expert of every MoE block starts as a copy of the dense checkpoint's MLP of
that block, routers start fresh, the position embeddings are resized to the
new grid. Any google-research/vision_transformer or big_vision ViT `.npz`
(e.g. ImageNet-21k ViT-B/16) works; the head is re-initialised for
ImageNet-1k. Fine-tunes on ImageNet-1k at 224 with router consistency.

NOT MEASURED here (no accelerator in this sandbox); hyper-parameters follow
vmoe's ViT-B/16 ImageNet-21k -> ILSVRC2012 fine-tuning scale but are a
starting point, not a tuned recipe. `:runlocal` runs it on an offline mini
imagenet2012 (the tfds path) with a tiny model (pass a matching tiny ViT
.npz, as the tests do).
"""

import ml_collections
from ml_collections.config_dict import placeholder

from vmoe_jsd import config_common

NUM_CLASSES = 1000
BATCH_SIZE = 512
TOKENS = (224 // 16) ** 2 + 1


def get_config(arg=None):
  config = config_common.base_config()
  config.num_train_steps = 20_000
  config.dataset = ml_collections.ConfigDict()
  config.dataset.train = config_common.tfds_split(
    'imagenet2012', 'train[:99%]', BATCH_SIZE, image_size=320
  )
  config.dataset.test = config_common.tfds_split(
    'imagenet2012', 'validation', BATCH_SIZE, image_size=224, resize_size=256
  )
  config.augment = dict(size=224, crop_scale=(0.08, 1.0), flip=True)
  config.initialization.source = 'vit_npz'
  config.initialization.path = ''  # set on the command line
  config.initialization.upcycle = True
  config.initialization.keep_head = False
  config.loss.name = 'softmax_xent'
  config.model = dict(
    variant='B/16',
    dtype='float32',  # or 'bfloat16': docs/scaling_and_performance.md
    num_classes=NUM_CLASSES,
    classifier='token',
    representation_size=placeholder(int),
    encoder=dict(
      remat='none',  # 'full', 'dots_saveable', ...
      dropout_rate=0.0,
      moe=dict(
        layers='every 2',
        num_experts=8,
        group_size=4 * TOKENS,
        router=config_common.vmoe_router(1.25, bfloat16=True),
      ),
    ),
  )
  config.optimizer = dict(
    name='sgd',
    momentum=0.9,
    gradient_clip=dict(global_norm=1.0),
    learning_rate=dict(
      schedule='warmup_cosine_decay',
      peak_value=0.03,
      end_value=1e-5,
      warmup_steps=500,
    ),
  )
  config_common.full_size_run(config, report=100, evaluate=2000)
  return config_common.apply_config_arg(config, arg, _runlocal)


def _runlocal(config):
  config_common.shrink_to_mini_tfds(config, num_layers=4, layers='every 2')

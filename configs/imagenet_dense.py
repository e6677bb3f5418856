r"""Dense ViT-S/32 on ImageNet-1k: configs/imagenet.py's recipe, no MoE layer.

  python -m vmoe_jsd.main --config=configs/imagenet_dense.py --workdir=DIR \
      [--config.dataset.train.data_dir=TFDS_DIR \
       --config.dataset.test.data_dir=TFDS_DIR]

The baseline vmoe's users asked for (google-research/vmoe#5): the same 8-block
"S/32" backbone (hidden 512, MLP 2048, 8 heads; vmoe's "S" is not the 12-block
ViT-S of Steiner et al. 2021 / AugReg, so AugReg's numbers do not compare),
with every block's MLP dense. Everything else is configs/imagenet.py's:
sigmoid cross-entropy, Adam lr 3e-3 (10k warm-up steps, linear decay to
1e-5), weight decay 0.1 on kernels, gradient clip 1.0, 300 epochs of
train[:99%] in batches of 4096 images x 2 views, inception crops of 5-100% at
224, flip, RandAugment(2, 10), mixup 0.2, pre-logits 512, head bias
-log(1000). What a dense model cannot have is off: no router, no auxiliary
loss, consistency weight 0 (config resolution fails in one line if it is set
> 0: there are no routers to match), no routing figures or flip rates, no
evaluation capacity override, and no expert axis (num_expert_partitions=1:
the mesh is all data-parallel).

Two views per image are kept so that the data, augmentation and number of
views seen are exactly the MoE run's (the views are two samples of the same
augmentation; with one view per image a dense run would see half the views).

Published numbers for this model and recipe: NOT PUBLISHED. vmoe's README
and its config give only the MoE model's (76.8% ILSVRC2012 validation top-1,
mean of 3 seeds; 5h50m on a TPU v3-32); the authors did not train the
matching dense ViT-S/32 on ImageNet-1k (vmoe#5, 2024-09-23: they compared
with published dense models trained on ImageNet-21k, V-MoE paper Figure 38).
The V-MoE paper's dense ViT-S/32 baselines are pre-trained on JFT-300M, a
different recipe. NOT MEASURED here either (no accelerator).

`:runlocal` is a CPU smoke run of the same code path: a tiny dense model for
4 steps on an offline mini `imagenet2012` prepared on first use in data_dir.
"""

from vmoe_jsd import config_common


def get_config(arg=None):
  # The MoE config itself, so that the baseline cannot drift from it.
  config = config_common.sibling_config(__file__, 'imagenet').get_config()
  del config.model.encoder['moe']
  config.evaluate.model_overrides = {}  # vmoe's eval capacity: MoE only.
  config.num_expert_partitions = 1
  config.consistency.weight = 0.0
  return config_common.apply_config_arg(config, arg)


def get_hyper(hyper):
  """Three seeds (the consistency weight has nothing to act on)."""
  return hyper.sweep('config.seed', [0, 1, 2])

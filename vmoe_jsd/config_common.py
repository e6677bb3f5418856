"""Building blocks shared by the files in configs/ (they import from here).

Optional fields are typed placeholders (`config_dict.placeholder(str)` etc.:
None until set) rather than plain None, so that every key can be set on the
command line (`--config.dataset.train.data_dir=/data`,
`--config.consistency.layers=(1,)`); ml_collections cannot override a field
whose type is NoneType.
"""

from __future__ import annotations

import importlib.util
import os
import types

import ml_collections
from ml_collections import config_dict

from vmoe_jsd import summaries


def base_config() -> ml_collections.ConfigDict:
  """Checkpointing, reporting, evaluation and consistency defaults."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.num_train_steps = 0
  config.train_epochs = 0
  # Size of the 'expert' mesh axis: experts are split over this many devices.
  config.num_expert_partitions = 1
  config.params_axis_resources = [('Moe/Mlp/.*', ('expert',))]
  # asynchronous: files are written by a background thread while training
  # goes on (the step loop only waits for the device-to-host copy).
  config.save_checkpoint = ml_collections.ConfigDict(
    {'every_steps': 500, 'keep_last': 2, 'asynchronous': True}
  )
  # Non-finite loss: 'stop' (raise, naming the step and the terms) or 'skip'
  # (the update is not applied; counted, logged; training goes on). Jobs
  # that are requeued automatically should use 'skip': data and random
  # streams are functions of the step, so a NaN under 'stop' comes back at
  # the same step after every restart.
  config.nan_policy = 'stop'
  # Gradient accumulation: one optimizer step from this many micro-batches
  # of each device's shard (step.accumulate_microsteps; exact for means over
  # examples, routing groups and matched pairs, per micro-batch for the
  # batch-level cross_correlation loss).
  config.microsteps = 1
  # In-step summaries, written at every progress report (summaries.py):
  # norms of params/grads/updates, global and per (name, regex) group, and
  # per-MoE-layer router statistics (logit norm, z-loss, top-1 probability).
  config.summaries = ml_collections.ConfigDict(
    {
      'norms': False,
      'router': False,
      # A tuple of (name, regex) (ml_collections cannot override lists
      # from the command line).
      'norm_groups': summaries.DEFAULT_NORM_GROUPS,
    }
  )
  config.report_progress = ml_collections.ConfigDict({'every_steps': 50})
  # jax.profiler trace of steps first_step .. first_step + num_steps - 1
  # (the numbers of the progress lines) into workdir/plugins/profile/ for
  # TensorBoard's profile plugin, on the main process (profiling.py).
  # num_steps 0: off.
  config.profile = ml_collections.ConfigDict({'first_step': 10, 'num_steps': 0})
  config.evaluate = ml_collections.ConfigDict(
    {
      'every_steps': 0,
      'limit': config_dict.placeholder(int),
      # vmoe evaluates with a larger capacity than it trains with.
      'model_overrides': {
        'encoder': {'moe': {'router': {'dispatcher': {'capacity_factor': 4.0}}}}
      },
      # Top-1 flip rates under pixel noise and shifts (stability.py), on the
      # first `limit` test images, at every evaluation.
      'stability': {
        'enabled': True,
        'noise_std': (0.02, 0.05, 0.1),
        'shifts': (1, 2),
        'limit': 2000,
      },
      # Routing-map figure (analyze.py) written to TensorBoard at every
      # evaluation, for this many test images (0: none).
      'routing_map_images': 4,
      # Corruptions, attacks, cheaper inference (evaluation/corruptions.py,
      # attacks.py, serving.py; docs/robustness.md); off during training
      # (minutes per evaluation),
      # `python -m vmoe_jsd.eval_main --suite=...` runs them on a checkpoint.
      'robustness': {
        'enabled': False,
        'suites': ('corruptions', 'attacks', 'cheap'),
        'limit': 2000,  # corruption and cheap suites
        'corruptions': (
          'gaussian_noise',
          'gaussian_blur',
          'contrast',
          'brightness',
          'rotation',
          'shift',
          'occlusion',
        ),
        'capacity_factors': (0.5, 0.75, 1.0, 1.25),
        'extra_k': (1,),
        # PGD as vmoe's projects/adversarial_attacks (eps on [-1, 1] pixels;
        # step_size None: epsilon / num_steps), and the routing attack.
        'attack': {
          'attacks': ('pgd', 'routing'),
          'limit': 1200,  # 3 whole test batches of configs/default.py
          'epsilon': 1 / 127.5,
          'num_steps': 40,
          'step_size': config_dict.placeholder(float),
          'clip': True,
          'random_start': False,
          'divergence': 'kl',
        },
      },
    }
  )
  # Start from pretrained weights instead of random ones (ignored when the
  # workdir already holds a checkpoint to resume): source 'vit_npz' (sparse
  # upcycling of a dense ViT), 'vmoe' (vmoe-format checkpoint) or 'orbax'.
  config.initialization = ml_collections.ConfigDict(
    {
      'source': config_dict.placeholder(str),
      'path': config_dict.placeholder(str),
      'upcycle': True,
      'keep_head': False,
      'strict': True,
    }
  )
  # vmoe's mixup on the views (augment.mixup); concentration 0 is off.
  config.mixup = ml_collections.ConfigDict({'concentration': 0.0})
  config.loss = ml_collections.ConfigDict({'name': 'softmax_xent'})
  # Few-shot linear evaluation of frozen pre-logits (evaluation/fewshot.py):
  # off until datasets = {name: {'train': <dataset block>, 'test': ...}}.
  config.fewshot = ml_collections.ConfigDict(
    {
      'every_steps': 0,  # 0: only after training.
      'datasets': {},
      'shots': (1, 5, 10, 25),
      'seeds': (0, 1, 2),
      'l2_reg': 2.0**10,
      'limit': config_dict.placeholder(int),  # test images; None: all.
    }
  )
  config.consistency = ml_collections.ConfigDict(
    {
      'loss': 'jsd',
      'weight': 0.0,
      'temperature': 1.0,
      'layers': config_dict.placeholder(tuple),  # None: every MoE layer.
      # Options of losses.ConsistencyOptions (see its docstring).
      'stop_gradient': 'none',  # 'none' | 'view1' | 'view2'
      'include_cls': False,
      'diagonal_weight': 1.0,  # cross_correlation
      'offdiagonal_weight': 10.0,  # cross_correlation
      'margin': 1.0,  # margin
      'entropy_cap': 0.5,  # jsd_entropy
      'entropy_weight': 1.0,  # jsd_entropy
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


def full_size_run(config, *, report: int, evaluate: int) -> None:
  """What every accelerator-sized recipe here shares: 8 expert partitions,
  consistency weight 0.1, a checkpoint every 1000 steps."""
  config.num_expert_partitions = 8
  config.consistency.weight = 0.1
  config.save_checkpoint.every_steps = 1000
  config.report_progress.every_steps = report
  config.evaluate.every_steps = evaluate


def tfds_split(
  tfds_name: str,
  split: str,
  batch_size: int,
  image_size: int,
  resize_size: int | None = None,
) -> dict:
  """A config.dataset.<split> block for a tfds dataset (index pipeline).

  `image_size`: training: the canvas side the whole image is resized to;
  evaluation: the side of the evaluated image. `resize_size`: evaluation:
  shorter side before the central crop (None: the whole image resized to
  image_size, as vmoe's `resize(N)`). data_dir, resize_size and num_workers
  are placeholders that can be set from the command line.
  """
  return dict(
    name='tfds',
    tfds_name=tfds_name,
    split=split,
    batch_size=batch_size,
    image_size=image_size,
    resize_size=(
      config_dict.placeholder(int) if resize_size is None else resize_size
    ),
    data_dir=config_dict.placeholder(str),
    # Decoding threads per process (None: one per core, at most 16).
    num_workers=config_dict.placeholder(int),
    # True: prepare an offline mini copy in data_dir if it is empty.
    mini=False,
  )


def shrink_to_mini_tfds(config: ml_collections.ConfigDict, **model) -> None:
  """`:runlocal` for tfds configs: tiny model, offline mini tfds dataset.

  The dataset keeps its tfds name and splits and goes through the real
  tfds path (tfds.data_source over ArrayRecord); `mini=True` writes a small
  copy with the real builder's features into data_dir (default: a folder
  in the temp dir) the first time (data/mini.py). One expert partition.
  """
  config.num_expert_partitions = 1
  config.num_train_steps = 4
  config.train_epochs = 0
  size = 32
  config.augment.size = size
  for name in config.dataset:
    block = config.dataset[name]
    block.mini = True
    # 16 images: whole routing groups and two images per device (mixup
    # pairs images within a device's shard) on up to 8 devices.
    block.batch_size = 16
    if name == 'train':
      block.image_size = size * 3 // 2  # canvas, ~ 320 / 224 of the view
    else:
      block.image_size = size
      if block.resize_size is not None:
        block.resize_size = size * 8 // 7  # 256 / 224 of the view
  config.evaluate.limit = 16
  config.model.variant = config_dict.placeholder(str)
  config.model.hidden_size = model.get('hidden_size', 32)
  config.model.patch_size = (8, 8)
  config.model.representation_size = config_dict.placeholder(int)
  config.model.encoder.num_layers = model.get('num_layers', 2)
  config.model.encoder.mlp_dim = model.get('mlp_dim', 64)
  config.model.encoder.num_heads = 2
  if 'moe' in config.model.encoder:  # Not in a dense model.
    # A placement string: the full configs use one (ConfigDict keeps types).
    config.model.encoder.moe.layers = model.get('layers', 'last 1')
    config.model.encoder.moe.group_size = 2 * ((size // 8) ** 2 + 1)
  config.save_checkpoint.every_steps = 2
  config.report_progress.every_steps = 1


def vmoe_s32_model(
  num_classes: int,
  image_size: int,
  capacity_factor: float,
  representation_size: int | None = None,
) -> dict:
  """vmoe's V-MoE-S/32 (8 blocks), E=8, K=2, MoE on the last 2 odd blocks:
  the config.model dict. `image_size` (the views' side) sets the routing
  group: 8 images; capacity_factor: vmoe's 1.05 from scratch, 1.5
  fine-tuning; representation_size: 512 from scratch, None fine-tuning.
  """
  tokens = (image_size // 32) ** 2 + 1
  return dict(
    variant='S/32',
    dtype='float32',  # or 'bfloat16': docs/scaling_and_performance.md
    num_classes=num_classes,
    classifier='token',
    representation_size=config_dict.placeholder(int)
    if representation_size is None
    else representation_size,
    encoder=dict(
      remat='none',  # 'full', 'dots_saveable', ...
      dropout_rate=0.0,
      attention_dropout_rate=0.0,
      position_emb=dict(name='learned'),  # or 'sincos2d', 'none'
      moe=dict(
        layers='last 2',
        num_experts=8,
        group_size=8 * tokens,
        dropout_rate=0.2,
        split_rngs=False,
        router=dict(
          name='NoisyTopExpertsPerItemRouter',  # models/routing.ROUTERS
          **vmoe_router(
            capacity_factor,
            capacity=config_dict.placeholder(int),
            bfloat16=True,
          ),
        ),
      ),
    ),
  )


def vmoe_router(capacity_factor: float, **dispatcher) -> dict:
  """vmoe's router block: top-2 experts per token, noise std 1 / E,
  importance and load losses 0.005, 'indices' dispatch in token order
  (no Batch Prioritized Routing); `dispatcher`: its other keys (capacity:
  slots per expert and group, which replaces capacity_factor when set)."""
  return dict(
    num_selected_experts=2,
    noise_std=1.0,
    importance_loss_weight=0.005,
    load_loss_weight=0.005,
    dispatcher=dict(
      name='indices',
      capacity_factor=capacity_factor,
      batch_priority=False,
      **dispatcher,
    ),
  )


def finetune_config(
  *,
  tfds_name: str,
  train_split: str,
  test_split: str,
  num_classes: int,
  image_size: int,
  batch_size: int,
  num_steps: int,
  peak_lr: float,
  warmup_steps: int,
  canvas: int,
) -> ml_collections.ConfigDict:
  """Fine-tuning of an ImageNet V-MoE-S/32 checkpoint, vmoe's `_ft_` recipe.

  vmoe's `vmoe_*_ft_ilsvrc2012` / `_ft_cifar10` configs: SGD with momentum
  0.9, warm-up + cosine decay to 1e-5, gradient clip 10, softmax
  cross-entropy, capacity factor 1.5, no pre-logits, a fresh head, the
  position embedding resized to the new grid; training on inception crops
  (5-100% of the whole image) + flip, evaluation on the whole image resized
  (`resize(image_size)`). Two views per image and consistency 0.1, as in
  pre-training. The checkpoint (`initialization.path`: a workdir of
  configs/imagenet.py) is set on the command line. `canvas`: the host
  canvas side for training; `warmup_steps`: linear warm-up.
  """
  config = base_config()
  config.num_train_steps = num_steps
  config.dataset = ml_collections.ConfigDict()
  config.dataset.train = tfds_split(
    tfds_name, train_split, batch_size, image_size=canvas
  )
  config.dataset.test = tfds_split(
    tfds_name, test_split, batch_size, image_size=image_size
  )
  config.augment = dict(
    size=image_size,
    crop_scale=(0.05, 1.0),
    crop_ratio=(3 / 4, 4 / 3),
    flip=True,
  )
  config.loss.name = 'softmax_xent'
  config.model = vmoe_s32_model(num_classes, image_size, 1.5)
  config.optimizer = warmup_optimizer(
    'sgd', 'warmup_cosine_decay', peak_lr, warmup_steps, clip=10.0, momentum=0.9
  )
  config.initialization.source = 'orbax'
  full_size_run(config, report=50, evaluate=max(num_steps // 10, 1))
  return config


def warmup_optimizer(
  name, schedule, peak_value, warmup_steps, *, clip, kernel_decay=0.0, **hyper
) -> dict:
  """A config.optimizer block (optimizer.py).

  `name` with its `hyper` keys (adam, adamw: b1 0.9, b2 0.999 and a
  decoupled weight decay of `kernel_decay` on the kernels, as a tuple of
  (regex, value) rules: ml_collections cannot override lists from the
  command line), gradients clipped to global norm `clip`, `schedule` after
  a linear warm-up down to 1e-5; frozen_pattern (regexes over '/'-joined
  names: no update) and lr_multipliers ((regex, multiplier) pairs, the
  first match wins) off.
  """
  if name.startswith('adam'):
    decay = (('.*/kernel$', kernel_decay),)
    hyper = dict(b1=0.9, b2=0.999, weight_decay=decay, **hyper)
  return dict(
    name=name,
    **hyper,
    gradient_clip=dict(global_norm=clip),
    frozen_pattern=(),
    lr_multipliers=(),
    learning_rate=dict(
      schedule=schedule,
      peak_value=peak_value,
      end_value=1e-5,
      warmup_steps=warmup_steps,
    ),
  )


def finetune_runlocal(config: ml_collections.ConfigDict) -> None:
  """`:runlocal` of a fine-tuning config: from scratch, mini tfds data."""
  config.initialization.source = None
  config.evaluate.every_steps = 0
  shrink_to_mini_tfds(config)


def weight_seed_sweep(hyper, weights=(0.0, 0.1), seeds=(0, 1, 2)):
  """Consistency weight x seed, weight-major: the sweep most configs here
  define (`hyper`: vmoe_jsd.sweep.Hyper, the API get_hyper receives)."""
  return hyper.product(
    [
      hyper.sweep('config.consistency.weight', list(weights)),
      hyper.sweep('config.seed', list(seeds)),
    ]
  )


def apply_config_arg(
  config, arg, runlocal=shrink_to_mini_tfds
) -> ml_collections.ConfigDict:
  """The `get_config(arg)` convention of every config here: `config` as a
  ConfigDict, shrunk in place by `runlocal(config)` when arg == 'runlocal'
  (None: full size); any other arg raises ValueError naming it.
  """
  config = ml_collections.ConfigDict(config)
  if arg == 'runlocal':
    runlocal(config)
  elif arg:
    raise ValueError(f"config argument {arg!r} is unknown; use 'runlocal'")
  return config


def sibling_config(this_file: str, name: str) -> types.ModuleType:
  """The module of configs/<name>.py beside `this_file` (configs/ is not a
  package), so that a config derived from another one cannot drift from
  it: `sibling_config(__file__, 'imagenet').get_config()`."""
  path = os.path.join(os.path.dirname(os.path.abspath(this_file)), f'{name}.py')
  spec = importlib.util.spec_from_file_location(f'configs_{name}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module

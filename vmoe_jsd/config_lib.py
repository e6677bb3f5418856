"""Config validation and the arithmetic derived from a config.

`validate(config, num_devices)` runs before any dataset is read or anything
is compiled, and raises ValueError naming the key, the bad value and what
would be valid. Configs describe; the registries here and in the modules
(routers, losses, datasets, schedules) decide.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from typing import Any

import ml_collections

from vmoe_jsd import augment, losses, models
from vmoe_jsd.data import DATASETS
from vmoe_jsd.models import routing

CONSISTENCY_LOSSES = tuple(losses.CONSISTENCY_LOSSES)
OPTIMIZERS = ('adam', 'adamw', 'sgd')
SCHEDULES = (
  'constant',
  'warmup_cosine_decay',
  'warmup_linear_decay',
  'warmup_rsqrt_decay',
)
CLASSIFIERS = ('0', 'gap', 'map', 'token')


def to_dict(cfg) -> dict[str, Any]:
  if cfg is None:
    return {}
  if isinstance(cfg, ml_collections.ConfigDict):
    return cfg.to_dict()
  return dict(cfg)


class ConfigError(ValueError):
  """A config value that cannot work: names the key, value and valid ones."""


def _fail(key: str, value: Any, valid: str):
  raise ConfigError(f'config.{key}={value!r} is invalid: {valid}')


def _check_range(
  key: str,
  value: Any,
  low: float | None = None,
  high: float | None = None,
  *,
  low_open: bool = False,
  high_open: bool = False,
  integer: bool = False,
  optional: bool = False,
) -> None:
  """Fails unless `value` is a finite number in the given interval.

  Args:
    key: dotted config key (for the message).
    value: the value.
    low: lower bound (None: unbounded).
    high: upper bound (None: unbounded).
    low_open: exclude `low` itself.
    high_open: exclude `high` itself.
    integer: require an int.
    optional: allow None.
  """
  if value is None and optional:
    return
  lo = '(' if low_open else '['
  hi = ')' if high_open else ']'
  if low is not None and high is not None:
    valid = f'in {lo}{low}, {high}{hi}'
  elif low is not None:
    valid = f'{">" if low_open else ">="} {low}'
  elif high is not None:
    valid = f'{"<" if high_open else "<="} {high}'
  else:
    valid = 'any value'
  kind = 'an integer' if integer else 'a number'
  valid = f'must be {kind} {valid}' + (' (or None)' if optional else '')
  is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
  if not is_number or (integer and not isinstance(value, int)):
    _fail(key, value, valid)
  ok = math.isfinite(value)
  if low is not None:
    ok = ok and (value > low if low_open else value >= low)
  if high is not None:
    ok = ok and (value < high if high_open else value <= high)
  if not ok:
    _fail(key, value, valid)


def _check_ranges(config, model: Mapping) -> None:
  """Numbers of the generic, model, consistency and optimizer blocks."""
  _check_range('seed', config.get('seed', 0), integer=True)
  steps = config.get('num_train_steps') or 0
  epochs = config.get('train_epochs') or 0
  _check_range('num_train_steps', steps, 0, integer=True)
  _check_range('train_epochs', epochs, 0)
  if not steps and not epochs:
    _fail('num_train_steps', steps, 'set it or train_epochs to > 0')
  _check_range(
    'num_expert_partitions',
    config.get('num_expert_partitions', 1),
    1,
    integer=True,
  )
  ckpt = config.get('save_checkpoint') or {}
  _check_range(
    'save_checkpoint.every_steps', ckpt.get('every_steps', 0), 0, integer=True
  )
  _check_range(
    'save_checkpoint.keep_last', ckpt.get('keep_last', 2), 1, integer=True
  )
  report = config.get('report_progress') or {}
  _check_range(
    'report_progress.every_steps', report.get('every_steps', 1), 1, integer=True
  )
  ev = config.get('evaluate') or {}
  _check_range('evaluate.every_steps', ev.get('every_steps') or 0, 0,
               integer=True)  # fmt: skip
  _check_range('evaluate.limit', ev.get('limit'), 1, integer=True,
               optional=True)  # fmt: skip

  # Model sizes and rates.
  _check_range('model.num_classes', model.get('num_classes'), 1, integer=True)
  _check_range('model.hidden_size', model.get('hidden_size'), 1, integer=True)
  _check_range('model.representation_size', model.get('representation_size'),
               1, integer=True, optional=True)  # fmt: skip
  encoder = model.get('encoder') or {}
  _check_range(
    'model.encoder.mlp_dim', encoder.get('mlp_dim'), 1, integer=True,
    optional=True,
  )  # fmt: skip
  for rate in ('dropout_rate', 'attention_dropout_rate'):
    _check_range(f'model.encoder.{rate}', encoder.get(rate), 0, 1,
                 high_open=True, optional=True)  # fmt: skip
  moe = encoder.get('moe') or {}
  _check_range('model.encoder.moe.dropout_rate', moe.get('dropout_rate'), 0,
               1, high_open=True, optional=True)  # fmt: skip
  _check_range('model.encoder.moe.group_size', moe.get('group_size'), 1,
               integer=True, optional=True)  # fmt: skip
  router = moe.get('router') or {}
  _check_range('model.encoder.moe.router.noise_std', router.get('noise_std'),
               0, optional=True)  # fmt: skip
  for name in ('importance_loss_weight', 'load_loss_weight',
               'gshard_loss_weight', 'z_loss_weight'):  # fmt: skip
    _check_range(f'model.encoder.moe.router.{name}', router.get(name), 0,
                 optional=True)  # fmt: skip
  dispatcher = router.get('dispatcher') or {}
  key = 'model.encoder.moe.router.dispatcher'
  _check_range(f'{key}.capacity_factor', dispatcher.get('capacity_factor'), 0,
               low_open=True, optional=True)  # fmt: skip
  _check_range(f'{key}.capacity', dispatcher.get('capacity'), 1, integer=True,
               optional=True)  # fmt: skip

  # Consistency.
  cons = config.consistency
  _check_range('consistency.weight', cons.get('weight'), 0)
  _check_range('consistency.temperature', cons.get('temperature', 1.0), 0,
               low_open=True)  # fmt: skip

  # Optimizer.
  opt = config.optimizer
  lr = opt.get('learning_rate') or {}
  key = 'optimizer.learning_rate'
  _check_range(f'{key}.peak_value', lr.get('peak_value'), 0, low_open=True)
  _check_range(f'{key}.end_value', lr.get('end_value'), 0, optional=True)
  _check_range(f'{key}.warmup_steps', lr.get('warmup_steps'), 0, integer=True,
               optional=True)  # fmt: skip
  for name in ('b1', 'b2', 'momentum'):
    _check_range(f'optimizer.{name}', opt.get(name), 0, 1, high_open=True,
                 optional=True)  # fmt: skip
  _check_range('optimizer.eps', opt.get('eps'), 0, low_open=True,
               optional=True)  # fmt: skip
  decay = opt.get('weight_decay')
  if isinstance(decay, (int, float)) or decay is None:
    _check_range('optimizer.weight_decay', decay, 0, optional=True)
  else:
    for rule in decay:
      if len(rule) != 2:
        _fail('optimizer.weight_decay', decay,
              'a number or a list of (regex, value) pairs')  # fmt: skip
      _check_range(f'optimizer.weight_decay[{rule[0]!r}]', rule[1], 0)
  clip = (opt.get('gradient_clip') or {}).get('global_norm')
  _check_range('optimizer.gradient_clip.global_norm', clip, 0, low_open=True,
               optional=True)  # fmt: skip


def deep_update(base: Mapping, overrides: Mapping | None) -> dict:
  """Recursively merged copy of `base` with `overrides` (dicts merge)."""
  out = dict(base)
  for key, value in to_dict(overrides).items():
    if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
      out[key] = deep_update(out[key], value)
    else:
      out[key] = value
  return out


def eval_model_config(config) -> dict:
  """config.model with config.evaluate.model_overrides applied."""
  overrides = config.get('evaluate', {}).get('model_overrides')
  return deep_update(to_dict(config.model), overrides)


def tokens_per_image(model_cfg: Mapping, image_size: int) -> int:
  patch = models.resolve_model_config(model_cfg)['patch_size']
  grid = (image_size // patch[0]) * (image_size // patch[1])
  return grid + (1 if model_cfg.get('classifier', 'token') == 'token' else 0)


def min_images_per_batch(model_cfg: Mapping, image_size: int) -> int:
  """Fewest images whose tokens split into whole routing groups."""
  if not moe_layers(model_cfg):
    return 1
  tokens = tokens_per_image(model_cfg, image_size)
  group = models.resolve_model_config(model_cfg)['encoder']['moe']['group_size']
  return group // math.gcd(group, tokens)


def patch_size(model_cfg: Mapping) -> int:
  """The (square) patch size of config.model, variant included."""
  return models.resolve_model_config(model_cfg)['patch_size'][0]


# Keys of config.augment that augment.py implements in a separate change
# (helper "augment"); accepted, and ignored while ViewSettings lacks them.
PENDING_AUGMENT_KEYS = ('randaugment',)


def _augment_fields(config) -> dict[str, Any]:
  """config.augment without 'size' (and without pending keys, see above)."""
  fields = {f.name for f in dataclasses.fields(augment.ViewSettings)}
  return {
    k: v
    for k, v in to_dict(config.augment).items()
    if k != 'size' and (k in fields or k not in PENDING_AUGMENT_KEYS)
  }


def view_settings(config) -> augment.ViewSettings:
  """Augmentation settings from config.augment (size = view side)."""
  return augment.ViewSettings.from_config(
    _augment_fields(config),
    size=config.augment.size,
    patch_size=patch_size(config.model),
  )


MIXUP_KEYS = ('concentration',)


def mixup_concentration(config) -> float:
  """config.mixup.concentration, 0.0 (no mixup) when absent or None."""
  mixup = to_dict(config.get('mixup'))
  return float(mixup.get('concentration') or 0.0)


def num_prefix_tokens(model_cfg: Mapping) -> int:
  return 1 if model_cfg.get('classifier', 'token') == 'token' else 0


def moe_layers(model_cfg: Mapping) -> tuple[int, ...]:
  model_cfg = models.resolve_model_config(model_cfg)
  moe = model_cfg.get('encoder', {}).get('moe') or {}
  return tuple(moe.get('layers', ()))


def consistency_layers(config) -> tuple[int, ...]:
  layers = config.consistency.get('layers')
  return moe_layers(config.model) if layers is None else tuple(layers)


def num_train_steps(config, num_train_examples: int | None) -> int:
  """config.num_train_steps, or train_epochs * N / batch_size (rounded up)."""
  if config.get('num_train_steps'):
    return int(config.num_train_steps)
  epochs = config.get('train_epochs')
  if not epochs or num_train_examples is None:
    raise ValueError(
      'Set config.num_train_steps or config.train_epochs (> 0); got '
      f'num_train_steps={config.get("num_train_steps")!r}, '
      f'train_epochs={epochs!r}'
    )
  batch = config.dataset.train.batch_size
  return int(math.ceil(epochs * num_train_examples / batch))


def _check_dispatcher(
  where: str, router: Mapping, group_size, num_experts: int
) -> None:
  """Dispatcher settings of a top-K or expert-choice router."""
  from vmoe_jsd.models import moe  # noqa: PLC0415

  name = router.get('name', 'NoisyTopExpertsPerItemRouter')
  if name == 'SoftRouter':  # Soft MoE has slots, not a dispatcher.
    return
  key = f'model.encoder.moe.router.dispatcher ({where})'
  dispatcher = router.get('dispatcher') or {}
  valid_names = (
    ('einsum',) if name == 'NoisyTopItemsPerExpertRouter'
    else ('einsum', 'indices')
  )  # fmt: skip
  if dispatcher.get('name', 'einsum') not in valid_names:
    _fail(f'{key}.name', dispatcher.get('name'), f'one of {list(valid_names)}')
  if (dispatcher.get('capacity') is None) == (
    dispatcher.get('capacity_factor') is None
  ):
    _fail(key, dispatcher, 'set exactly one of capacity and capacity_factor')
  if name == 'NoisyTopItemsPerExpertRouter' and group_size:
    capacity = dispatcher.get('capacity') or moe.compute_capacity(
      group_size,
      num_experts,
      dispatcher['capacity_factor'],
      dispatcher.get('capacity_ceil_or_round', 'ceil'),
      dispatcher.get('capacity_multiple_of', 4),
    )
    if capacity > group_size:
      _fail(
        key,
        dispatcher,
        f'expert-choice capacity {capacity} exceeds the group size '
        f'{group_size}: lower capacity or capacity_factor',
      )


def validate(config, num_devices: int) -> None:
  """Raises ValueError if the config cannot work on `num_devices` devices."""
  model = models.resolve_model_config(config.model)
  models.check_model_config(model)
  _check_ranges(config, model)
  encoder = model.get('encoder') or {}
  moe = encoder.get('moe') or {}
  router = dict(moe.get('router') or {})
  image_size = config.augment.size
  patch = tuple(model.get('patch_size', ()))

  # Model shape.
  if model.get('name', 'VisionTransformerMoe') != 'VisionTransformerMoe':
    _fail('model.name', model.get('name'), "choose 'VisionTransformerMoe'")
  if len(patch) != 2 or any(p <= 0 for p in patch):
    _fail('model.patch_size', model.get('patch_size'), 'use (p, p), p > 0')
  if patch[0] != patch[1]:
    _fail('model.patch_size', patch, 'square patches only (views are square)')
  if image_size % patch[0]:
    _fail(
      'augment.size',
      image_size,
      f'must be a multiple of model.patch_size={patch[0]}',
    )
  if model.get('classifier', 'token') not in CLASSIFIERS:
    _fail('model.classifier', model.get('classifier'), f'one of {CLASSIFIERS}')
  pos = (encoder.get('position_emb') or {}).get('name', 'learned')
  if pos not in ('learned', 'sincos2d', 'none'):
    _fail(
      'model.encoder.position_emb.name',
      pos,
      "one of ['learned', 'none', 'sincos2d']",
    )
  num_layers = encoder.get('num_layers', 0)
  if encoder.get('num_heads', 0) <= 0 or model['hidden_size'] % encoder.get(
    'num_heads', 1
  ):
    _fail(
      'model.encoder.num_heads',
      encoder.get('num_heads'),
      f'must be > 0 and divide hidden_size={model["hidden_size"]}',
    )

  # MoE.
  layers = tuple(moe.get('layers', ()))
  if num_layers <= 0:
    _fail('model.encoder.num_layers', num_layers, 'must be >= 1')
  bad = [x for x in layers if not 0 <= x < num_layers]
  if bad:
    _fail(
      'model.encoder.moe.layers',
      layers,
      f'block indices in [0, num_layers={num_layers})',
    )
  num_experts = moe.get('num_experts', 0)
  if layers:
    router_name = router.get('name', 'NoisyTopExpertsPerItemRouter')
    if router_name not in routing.ROUTERS:
      _fail(
        'model.encoder.moe.router.name',
        router_name,
        f'one of {sorted(routing.ROUTERS)}',
      )
    if num_experts < 1:
      _fail('model.encoder.moe.num_experts', num_experts, 'must be >= 1')
    k = router.get('num_selected_experts', 1)
    if router_name == 'NoisyTopExpertsPerItemRouter' and not (
      1 <= k <= num_experts
    ):
      _fail(
        'model.encoder.moe.router.num_selected_experts',
        k,
        f'K must be in [1, num_experts={num_experts}]',
      )
    num_parts = config.get('num_expert_partitions', 1)
    if num_experts % num_parts:
      _fail(
        'num_expert_partitions',
        num_parts,
        f'must divide model.encoder.moe.num_experts={num_experts}',
      )
    if num_devices % num_parts:
      _fail(
        'num_expert_partitions',
        num_parts,
        f'must divide the number of devices ({num_devices})',
      )
    _check_dispatcher('training', router, moe.get('group_size'), num_experts)
    eval_moe = models.resolve_model_config(eval_model_config(config))[
      'encoder'
    ]['moe']
    _check_dispatcher(
      'with evaluate.model_overrides',
      eval_moe.get('router') or {},
      eval_moe.get('group_size'),
      num_experts,
    )

  # Batches and groups. Two views per training image.
  tokens = tokens_per_image(model, image_size)
  group_size = moe.get('group_size')
  checks = [('dataset.train.batch_size', config.dataset.train.batch_size, 2)]
  if 'test' in config.dataset:
    checks.append(
      ('dataset.test.batch_size', config.dataset.test.batch_size, 1)
    )
  for key, batch, views in checks:
    if batch <= 0 or batch % num_devices:
      _fail(
        key,
        batch,
        f'must be a positive multiple of the device count ({num_devices})',
      )
    if layers:
      per_device = batch * views // num_devices * tokens
      if not group_size or per_device % group_size:
        _fail(
          'model.encoder.moe.group_size',
          group_size,
          f'must divide the tokens per device of {key}={batch} ({views} '
          f'view(s) x {batch // num_devices} images x {tokens} tokens = '
          f'{per_device}); e.g. a multiple of {tokens} tokens per image that'
          f' divides it',
        )

  # Losses.
  if config.loss.name not in losses.CLASSIFICATION_LOSSES:
    _fail(
      'loss.name',
      config.loss.name,
      f'one of {sorted(losses.CLASSIFICATION_LOSSES)}',
    )
  cons = config.consistency
  if cons.loss not in CONSISTENCY_LOSSES:
    _fail('consistency.loss', cons.loss, f'one of {list(CONSISTENCY_LOSSES)}')
  losses.ConsistencyOptions.from_config(cons)  # Raises naming the bad key.
  from vmoe_jsd import stability  # noqa: PLC0415 (it imports this module)

  stability.stability_options(config)
  if cons.get('include_cls') and not num_prefix_tokens(config.model):
    _fail(
      'consistency.include_cls',
      cons.include_cls,
      'needs a class token (model.classifier="token")',
    )
  if not cons.weight >= 0:
    _fail('consistency.weight', cons.weight, 'must be >= 0')
  if not cons.get('temperature', 1.0) > 0:
    _fail('consistency.temperature', cons.temperature, 'must be > 0')
  if cons.get('layers') is not None:
    bad = [x for x in cons.layers if x not in layers]
    if bad:
      _fail(
        'consistency.layers',
        tuple(cons.layers),
        f'a subset of the MoE blocks {layers} (or None for all)',
      )
  if cons.weight > 0 and not layers:
    _fail('consistency.weight', cons.weight, 'needs MoE layers (set to 0)')

  # Augmentation (raises with the key and the value).
  augment.ViewSettings.from_config(
    _augment_fields(config),
    size=image_size,
    patch_size=patch[0],
  )

  # Mixup (vmoe's, on the views; pairs within each device's shard).
  mixup = to_dict(config.get('mixup'))
  unknown = sorted(set(mixup) - set(MIXUP_KEYS))
  if unknown:
    _fail('mixup', unknown, f'keys in {list(MIXUP_KEYS)}')
  concentration = mixup.get('concentration') or 0.0
  if (
    isinstance(concentration, bool)
    or not isinstance(concentration, (int, float))
    or not 0 <= concentration < math.inf
  ):
    _fail(
      'mixup.concentration',
      concentration,
      'a number >= 0 (0: no mixup; vmoe light1: 0.2)',
    )
  per_device = config.dataset.train.batch_size // num_devices
  if concentration > 0 and per_device < 2:
    _fail(
      'mixup.concentration',
      concentration,
      "mixup pairs images within each device's shard, which holds "
      f'{per_device} image(s) of dataset.train.batch_size='
      f'{config.dataset.train.batch_size} on {num_devices} devices: needs at '
      f'least 2 (or set 0)',
    )

  # Optimizer.
  opt = config.optimizer
  if opt.name not in OPTIMIZERS:
    _fail('optimizer.name', opt.name, f'one of {list(OPTIMIZERS)}')
  schedule = opt.learning_rate.get('schedule', 'constant')
  if schedule not in SCHEDULES:
    _fail('optimizer.learning_rate.schedule', schedule, f'one of {SCHEDULES}')

  # Failure policy and checkpoints.
  nan_policy = config.get('nan_policy', 'stop')
  if nan_policy not in ('stop', 'skip'):
    _fail('nan_policy', nan_policy, "one of ['skip', 'stop']")
  save = to_dict(config.get('save_checkpoint')) or {}
  if (
    not isinstance(save.get('every_steps', 0), int)
    or save.get('every_steps', 0) < 0
  ):
    _fail(
      'save_checkpoint.every_steps',
      save.get('every_steps'),
      'an integer >= 0 (0: only at the end)',
    )
  if (
    not isinstance(save.get('keep_last', 2), int)
    or save.get('keep_last', 2) < 1
  ):
    _fail('save_checkpoint.keep_last', save.get('keep_last'), 'an integer >= 1')
  if not isinstance(save.get('asynchronous', True), bool):
    _fail(
      'save_checkpoint.asynchronous', save.get('asynchronous'), 'True or False'
    )

  # Few-shot evaluation.
  from vmoe_jsd import fewshot  # noqa: PLC0415

  fewshot.check_config(config, tuple(DATASETS))

  # Initialization.
  init = to_dict(config.get('initialization'))
  if init.get('source') is not None:
    from vmoe_jsd import initialization  # noqa: PLC0415

    unknown = sorted(set(init) - set(initialization.CONFIG_KEYS))
    if unknown:
      _fail('initialization', unknown, f'keys in {initialization.CONFIG_KEYS}')
    if init['source'] not in initialization.SOURCES:
      _fail(
        'initialization.source',
        init['source'],
        f'one of {list(initialization.SOURCES)} or None',
      )
    path = init.get('path') or ''
    if not path:
      _fail('initialization.path', path, 'a local or gs:// path')
    from vmoe_jsd import paths  # noqa: PLC0415

    exists = paths.exists(path) or (
      init['source'] == 'vmoe' and paths.exists(path + '.index')
    )
    if not exists:
      raise FileNotFoundError(
        f'config.initialization.path={path!r} does not exist'
        + (" (nor as a vmoe prefix: no '.index')" if init['source'] == 'vmoe'
           else '')
      )  # fmt: skip

  # Data: names and files, before anything is built.
  for split in config.dataset:
    cfg = config.dataset[split]
    if cfg.name not in DATASETS:
      _fail(f'dataset.{split}.name', cfg.name, f'one of {sorted(DATASETS)}')
    if cfg.name == 'fashion_mnist':
      from vmoe_jsd.data import fashion_mnist  # noqa: PLC0415

      base = cfg.split.partition('[')[0]
      if base not in fashion_mnist.FILES:
        _fail(
          f'dataset.{split}.split',
          cfg.split,
          f'one of {sorted(fashion_mnist.FILES)}',
        )
      data_dir = cfg.get('data_dir') or fashion_mnist.DEFAULT_DIR
      missing = [
        f
        for f in fashion_mnist.FILES[base]
        if not os.path.exists(os.path.join(data_dir, f))
      ]
      if missing:
        raise FileNotFoundError(
          f'config.dataset.{split}: Fashion-MNIST files {missing} are not in '
          f'{data_dir!r}. {fashion_mnist.HOW_TO_GET}'
        )
    _check_dataset(split, config.dataset[split], image_size)


def _check_dataset(split: str, cfg, image_size: int):
  """Keys of a 'tfds' or 'folder' config.dataset.<split> block."""
  if cfg.name not in ('tfds', 'folder'):
    return
  key = f'dataset.{split}'
  size = cfg.get('image_size')
  if cfg.name == 'tfds' and not cfg.get('tfds_name'):
    _fail(f'{key}.tfds_name', cfg.get('tfds_name'), 'a tfds dataset name')
  if size is not None and (not isinstance(size, int) or size <= 0):
    _fail(f'{key}.image_size', size, 'a positive int (pixels) or None')
  if split == 'train' and size is not None and size < image_size:
    _fail(
      f'{key}.image_size',
      size,
      f'the training canvas must be >= augment.size={image_size}',
    )
  resize = cfg.get('resize_size')
  if resize is not None and (size is None or resize < size):
    _fail(f'{key}.resize_size', resize, f'None or >= image_size={size}')
  if cfg.name == 'folder':
    from vmoe_jsd.data import folder  # noqa: PLC0415

    # Evaluation pads its last batch; training needs one full batch.
    folder.check(cfg, cfg.batch_size if split == 'train' else 1)

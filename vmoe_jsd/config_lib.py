"""The one resolution step: a raw config in, frozen typed specs out.

`resolve(config, num_devices)` reads the ConfigDict once, before any dataset
is read or anything is compiled, and returns a `RunSpec` of small frozen
specs, each built and checked by the `from_config` of the module that uses
it (the table of fields: docs/architecture.md#the-specs). `_check_across`
holds the checks that span blocks; `check_inputs` the start-up checks that
touch files; `validate` is both. A bad value raises ValueError (ConfigError)
naming the key, the value and what would be valid. Only this module, the
command-line code and the run files read the ConfigDict.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from vmoe_jsd import (
  augment,
  checkpoints,
  data,
  initialization,
  losses,
  optimizer,
  paths,
  profiling,
  resilience,
  sharding,
  step,
  summaries,
)
from vmoe_jsd.config_errors import (
  ConfigError,
  check_choice,
  check_keys,
  check_range,
  reject,
  to_dict,
)
from vmoe_jsd.evaluation import accuracy, fewshot, robustness, stability
from vmoe_jsd.models.spec import ModelSpec

__all__ = ['ConfigError', 'RunSpec', 'check_inputs', 'resolve', 'validate']

MIXUP_KEYS = ('concentration',)
# Keys of config.augment accepted and ignored while ViewSettings lacks them.
PENDING_AUGMENT_KEYS = ('randaugment',)


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """Everything a run needs from its config, checked and resolved.

  `config` is the raw config as a plain dict (config.json, hparams),
  `initialization` config.initialization ({} when off), `params_rules` the
  regex -> mesh-axes sharding rules, `num_steps` 0 when set by
  `train_epochs`; the specs: docs/architecture.md#the-specs.
  """

  config: Mapping[str, Any]
  num_devices: int
  seed: int
  num_steps: int
  train_epochs: float
  num_expert_partitions: int
  params_rules: tuple
  report_every: int
  initialization: Mapping[str, Any]
  model: ModelSpec
  datasets: Mapping[str, data.SplitSpec]
  views: augment.ViewSettings
  step: step.StepSpec
  optimizer: optimizer.OptimizerSpec
  checkpoint: checkpoints.CheckpointSpec
  evaluate: accuracy.EvalSpec
  stability: stability.StabilitySpec
  fewshot: fewshot.FewshotSpec
  profile: profiling.ProfileSpec = profiling.ProfileSpec()
  robustness: robustness.RobustnessSpec | None = None

  @property
  def train_data(self) -> data.SplitSpec:
    return self.datasets['train']

  @property
  def test_data(self) -> data.SplitSpec:
    return self.datasets['test']

  def num_train_steps(self, num_train_examples: int | None) -> int:
    """num_train_steps, or train_epochs * N / batch_size (rounded up)."""
    if self.num_steps:
      return self.num_steps
    if not self.train_epochs or num_train_examples is None:
      raise ValueError(
        'Set config.num_train_steps or config.train_epochs (> 0); got '
        f'num_train_steps={self.num_steps!r}, '
        f'train_epochs={self.train_epochs!r}'
      )
    batch = self.train_data.batch_size
    return int(math.ceil(self.train_epochs * num_train_examples / batch))


def validate(config, num_devices: int) -> RunSpec:
  """`resolve`, then `check_inputs`: raises before any work if the config
  cannot work on `num_devices` devices."""
  spec = resolve(config, num_devices)
  check_inputs(spec)
  return spec


def resolve(config, num_devices: int) -> RunSpec:
  """The RunSpec of `config` on `num_devices` devices (no file is read)."""
  evaluate = to_dict(config.get('evaluate'))
  model = ModelSpec.from_config(config.model, evaluate.get('model_overrides'))
  _check_run_numbers(config)
  ckpt = checkpoints.CheckpointSpec.from_config(config.get('save_checkpoint'))
  ev = accuracy.EvalSpec.from_config(evaluate)
  cons = to_dict(config.consistency)
  check_range('consistency.weight', cons.get('weight'), 0)
  temperature = cons.get('temperature', 1.0)
  check_range('consistency.temperature', temperature, 0, low_open=True)
  opt = optimizer.OptimizerSpec.from_config(config.optimizer)
  size = config.augment.size
  check_range('augment.size', size, 1, integer=True)
  if size % model.patch_size:
    valid = f'must be a multiple of model.patch_size={model.patch_size}'
    reject('augment.size', size, valid)
  datasets = {
    split: data.SplitSpec.from_config(split, config.dataset[split], size)
    for split in config.dataset
  }
  _check_across(config, model, datasets, num_devices)
  step_spec = _step_spec(config, model, num_devices)
  stab = stability.StabilitySpec.from_config(
    evaluate.get('stability'), ev.limit
  )
  if not model.moe_layers:
    stab = dataclasses.replace(stab, enabled=False)
  views = augment.ViewSettings.from_config(
    _augment_fields(config), size=size, patch_size=model.patch_size
  )
  fs = fewshot.FewshotSpec.from_config(
    config.get('fewshot'), data.DATASETS, size
  )
  _check_fewshot_batches(fs, model, size, num_devices)
  init = to_dict(config.get('initialization'))
  if init.get('source') is not None:
    initialization.check_config(init)
  return RunSpec(
    config=to_dict(config),
    num_devices=num_devices,
    seed=config.get('seed', 0),
    num_steps=config.get('num_train_steps') or 0,
    train_epochs=config.get('train_epochs') or 0,
    num_expert_partitions=config.get('num_expert_partitions', 1),
    params_rules=tuple(
      config.get('params_axis_resources') or sharding.DEFAULT_RULES
    ),
    report_every=(config.get('report_progress') or {}).get('every_steps', 1),
    initialization=init if init.get('source') is not None else {},
    model=model,
    datasets=datasets,
    views=views,
    step=step_spec,
    optimizer=opt,
    checkpoint=ckpt,
    evaluate=ev,
    stability=stab,
    fewshot=fs,
    profile=profiling.ProfileSpec.from_config(
      config.get('profile'), config.get('num_train_steps') or None
    ),
    robustness=robustness.RobustnessSpec.from_config(
      evaluate.get('robustness'), ev.limit, model.num_experts
    ),
  )


def check_inputs(spec: RunSpec) -> None:
  """Start-up checks that touch files: the initial checkpoint and the data.

  Raises:
    FileNotFoundError: naming the missing path (and how to get the data).
    ValueError: an image folder too small for a batch, or unusable;
      model.num_classes unlike the data's number of classes.
  """
  init = spec.initialization
  if init:
    path = init['path']
    exists = paths.exists(path) or (
      init['source'] == 'vmoe' and paths.exists(path + '.index')
    )
    if not exists:
      vmoe = " (nor as a vmoe prefix: no '.index')"
      raise FileNotFoundError(
        f'config.initialization.path={path!r} does not exist'
        + (vmoe if init['source'] == 'vmoe' else '')
      )
  for split, split_spec in spec.datasets.items():
    split_spec.check_files(split)
  _check_num_classes(spec.model.num_classes, spec.datasets)


def _check_num_classes(num_classes: int, datasets) -> None:
  """model.num_classes against each split's classes, where the dataset kind
  knows them (a head with fewer outputs than classes would one-hot labels
  past its end to zeros; one with more trains outputs no label reaches)."""
  for split in sorted(datasets, key=lambda s: s != 'train'):  # train first
    split_spec = datasets[split]
    found = split_spec.num_classes()
    if found is not None and found != num_classes:
      reject(
        'model.num_classes',
        num_classes,
        f'dataset.{split} ({split_spec.name}) has {found} classes; set '
        f'model.num_classes={found}',
      )


def _check_run_numbers(config) -> None:
  """The generic numbers: seed, schedule length, partitions, reporting."""
  check_range('seed', config.get('seed', 0), integer=True)
  steps = config.get('num_train_steps') or 0
  epochs = config.get('train_epochs') or 0
  check_range('num_train_steps', steps, 0, integer=True)
  check_range('train_epochs', epochs, 0)
  if not steps and not epochs:
    reject('num_train_steps', steps, 'set it or train_epochs to > 0')
  partitions = config.get('num_expert_partitions', 1)
  check_range('num_expert_partitions', partitions, 1, integer=True)
  report = (config.get('report_progress') or {}).get('every_steps', 1)
  check_range('report_progress.every_steps', report, 1, integer=True)


def _check_across(config, model: ModelSpec, datasets, num_devices) -> None:
  """Checks that span blocks: partitions vs experts and devices, batches vs
  devices, routing groups vs the tokens on each device."""
  layers = model.moe_layers
  if layers:
    num_parts = config.get('num_expert_partitions', 1)
    if model.num_experts % num_parts:
      valid = f'must divide model.encoder.moe.num_experts={model.num_experts}'
      reject('num_expert_partitions', num_parts, valid)
    if num_devices % num_parts:
      valid = f'must divide the number of devices ({num_devices})'
      reject('num_expert_partitions', num_parts, valid)
  tokens = model.tokens_per_image(config.augment.size)
  group_size = model.config['encoder'].get('moe', {}).get('group_size')
  # Two views per training image, one per test image.
  checks = [('train', 2)] + ([('test', 1)] if 'test' in datasets else [])
  for split, views in checks:
    key, batch = f'dataset.{split}.batch_size', datasets[split].batch_size
    if batch <= 0 or batch % num_devices:
      valid = f'must be a positive multiple of the device count ({num_devices})'
      reject(key, batch, valid)
    per_device = batch * views // num_devices * tokens
    if layers and (not group_size or per_device % group_size):
      reject(
        'model.encoder.moe.group_size',
        group_size,
        f'must divide the tokens per device of {key}={batch} ({views} '
        f'view(s) x {batch // num_devices} images x {tokens} tokens = '
        f'{per_device}); e.g. a multiple of {tokens} tokens per image that'
        f' divides it',
      )


def _check_fewshot_batches(fs, model: ModelSpec, size, num_devices) -> None:
  """Few-shot batches go through the evaluation model on every device: each
  device's images must fill whole routing groups (unit: the fewest images
  that do)."""
  unit = model.min_images_per_batch(size, evaluation=True) * num_devices
  for d in fs.datasets:
    for split, block in (('train', d.train), ('test', d.test)):
      if block.batch_size % unit:
        reject(
          f'fewshot.datasets.{d.name}.{split}.batch_size',
          block.batch_size,
          f'must be a multiple of {unit}: {num_devices} device(s) x the '
          f'{unit // num_devices} image(s) that fill whole routing groups '
          'of the evaluation model',
        )


def _step_spec(config, model: ModelSpec, num_devices: int) -> step.StepSpec:
  """Losses, consistency (its layers vs the MoE layers), mixup, NaN policy."""
  loss_names = sorted(losses.CLASSIFICATION_LOSSES)
  check_choice('loss.name', config.loss.name, loss_names)
  cons = config.consistency
  check_choice('consistency.loss', cons.loss, list(losses.CONSISTENCY_LOSSES))
  options = losses.ConsistencyOptions.from_config(cons)
  layers = model.moe_layers
  if options.include_cls and not model.num_prefix_tokens:
    valid = 'needs a class token (model.classifier="token")'
    reject('consistency.include_cls', cons.include_cls, valid)
  cons_layers = cons.get('layers')
  if cons_layers is not None and [x for x in cons_layers if x not in layers]:
    valid = f'a subset of the MoE blocks {layers} (or None for all)'
    reject('consistency.layers', tuple(cons_layers), valid)
  if cons.weight > 0 and not layers:  # A dense model: no routers to match.
    reject(
      'consistency.weight',
      cons.weight,
      'needs MoE layers and model.encoder.moe.layers is empty (a dense '
      'model): set it to 0',
    )
  nan_policy = config.get('nan_policy', 'stop')
  check_choice('nan_policy', nan_policy, sorted(resilience.NAN_POLICIES))
  return step.StepSpec(
    loss=config.loss.name,
    num_classes=model.num_classes,
    moe_layers=layers,
    consistency=options,
    consistency_weight=float(cons.weight),
    consistency_layers=layers if cons_layers is None else tuple(cons_layers),
    num_prefix_tokens=model.num_prefix_tokens,
    mixup_concentration=_mixup_concentration(config, num_devices),
    nan_policy=nan_policy,
    microsteps=_microsteps(config, model, num_devices),
    summaries=summaries.SummarySpec.from_config(config.get('summaries')),
  )


def _microsteps(config, model: ModelSpec, num_devices: int) -> int:
  """config.microsteps against the per-device batch and routing groups."""
  moe = model.config['encoder'].get('moe', {}) if model.moe_layers else {}
  return step.check_microsteps(
    config.get('microsteps', 1),
    config.dataset.train.batch_size,
    num_devices,
    model.tokens_per_image(config.augment.size),
    moe.get('group_size'),
  )


def _augment_fields(config) -> dict[str, Any]:
  """config.augment without 'size' (and without pending keys, see above)."""
  fields = {f.name for f in dataclasses.fields(augment.ViewSettings)}
  return {
    k: v
    for k, v in to_dict(config.augment).items()
    if k != 'size' and (k in fields or k not in PENDING_AUGMENT_KEYS)
  }


def _mixup_concentration(config, num_devices: int) -> float:
  """config.mixup (vmoe's, on the views; pairs within each device's shard)."""
  mixup = to_dict(config.get('mixup'))
  check_keys('mixup', mixup, MIXUP_KEYS)
  concentration = mixup.get('concentration') or 0.0
  if (
    isinstance(concentration, bool)
    or not isinstance(concentration, (int, float))
    or not 0 <= concentration < math.inf
  ):
    valid = 'a number >= 0 (0: no mixup; vmoe light1: 0.2)'
    reject('mixup.concentration', concentration, valid)
  batch = config.dataset.train.batch_size
  per_device = batch // num_devices
  if concentration > 0 and per_device < 2:
    reject(
      'mixup.concentration',
      concentration,
      "mixup pairs images within each device's shard, which holds "
      f'{per_device} image(s) of dataset.train.batch_size={batch} on '
      f'{num_devices} devices: needs at least 2 (or set 0)',
    )
  return float(concentration)

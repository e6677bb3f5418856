"""The optimizer and its learning-rate schedule, from config.optimizer.

Global-norm clipping, then Adam (Kingma & Ba, 2015) or SGD with momentum,
then decoupled weight decay (AdamW, Loshchilov & Hutter, ICLR 2019) on the
parameters whose '/'-joined names match weight_decay's regexes, all scaled
by the schedule: a linear warmup, then cosine, linear or inverse-square-root
decay (or a constant rate).

Two per-parameter options, both by regex on the '/'-joined parameter names
(`re.search`, as vmoe's `frozen_pattern` and regex rules; note that
weight_decay's rules use `re.fullmatch`):
- `frozen_pattern` (vmoe's name): a regex or tuple of regexes; a parameter
  any of them matches gets zero updates and no optimizer state (an
  optax.partition of 'frozen' -> set_to_zero and 'trainable' -> the chain
  above, so gradient clipping sees the trainable gradients only).
- `lr_multipliers`: ((regex, m), ...); the first rule that matches a
  parameter scales its whole step by m, after the learning rate: the step
  is m * lr(t) * (direction + wd * param), as if that parameter's learning
  rate were m * lr(t). Its decoupled weight decay (Loshchilov & Hutter,
  ICLR 2019, which scales the decay by the schedule) is so multiplied by m
  as well. Frozen wins over a multiplier. Unlike vmoe's `gradient_scale`
  (gradients scaled before clipping and Adam, to which a scale is
  invisible but for epsilon), this is a learning rate for every optimizer.
A pattern that matches no parameter fails when the optimizer state is
first built (`tx.init` on the abstract parameters, in train.build_training).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import optax

from vmoe_jsd import sharding
from vmoe_jsd.config_errors import check_choice, check_range, reject, to_dict

OPTIMIZERS = ('adam', 'adamw', 'sgd')
SCHEDULES = (
  'constant',
  'warmup_cosine_decay',
  'warmup_linear_decay',
  'warmup_rsqrt_decay',
)
# The two groups of optax.partition when frozen_pattern is set.
TRAINABLE, FROZEN = 'trainable', 'frozen'


@dataclasses.dataclass(frozen=True)
class ScheduleSpec:
  """config.optimizer.learning_rate.

  Attributes:
    schedule: a name in SCHEDULES.
    peak_value: the rate after warmup (> 0).
    end_value: the rate at the last step (decaying schedules).
    warmup_steps: steps of the linear warmup from 0.
  """

  peak_value: float
  schedule: str = 'constant'
  end_value: float = 0.0
  warmup_steps: int = 0

  @classmethod
  def from_config(cls, cfg: Mapping) -> ScheduleSpec:
    cfg = to_dict(cfg)
    key = 'optimizer.learning_rate'
    check_range(f'{key}.peak_value', cfg.get('peak_value'), 0, low_open=True)
    check_range(f'{key}.end_value', cfg.get('end_value'), 0, optional=True)
    _check_float32_rate(f'{key}.peak_value', cfg['peak_value'])
    if cfg.get('end_value'):
      _check_float32_rate(f'{key}.end_value', cfg['end_value'])
    warmup = cfg.get('warmup_steps')
    check_range(f'{key}.warmup_steps', warmup, 0, integer=True, optional=True)
    return cls(**{k: v for k, v in cfg.items() if v is not None})


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
  """config.optimizer.

  Attributes:
    name: a name in OPTIMIZERS ('adam' and 'adamw' differ only by the
      weight decay they are given).
    learning_rate: the schedule.
    b1, b2, eps: Adam's moments and epsilon.
    momentum: SGD's.
    weight_decay: ((regex, value), ...) over '/'-joined parameter names; a
      single number in the config decays kernels only.
    clip_global_norm: clip gradients to this global norm (None: no clip).
    frozen_pattern: regexes of the parameters that get no update.
    lr_multipliers: ((regex, multiplier), ...), first match wins; the
      parameters no rule matches keep multiplier 1.
  """

  name: str
  learning_rate: ScheduleSpec
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  momentum: float = 0.9
  weight_decay: tuple[tuple[str, float], ...] = ()
  clip_global_norm: float | None = None
  frozen_pattern: tuple[str, ...] = ()
  lr_multipliers: tuple[tuple[str, float], ...] = ()

  @classmethod
  def from_config(cls, cfg: Mapping) -> OptimizerSpec:
    """Checks config.optimizer (ranges first, then names)."""
    cfg = to_dict(cfg)
    lr = ScheduleSpec.from_config(cfg.get('learning_rate') or {})
    for name in ('b1', 'b2', 'momentum'):
      check_range(
        f'optimizer.{name}', cfg.get(name), 0, 1, high_open=True, optional=True
      )
    eps = cfg.get('eps')
    check_range('optimizer.eps', eps, 0, low_open=True, optional=True)
    decay = _decay_rules(cfg.get('weight_decay'))
    clip = (cfg.get('gradient_clip') or {}).get('global_norm')
    key = 'optimizer.gradient_clip.global_norm'
    check_range(key, clip, 0, low_open=True, optional=True)
    check_choice('optimizer.name', cfg.get('name'), list(OPTIMIZERS))
    check_choice('optimizer.learning_rate.schedule', lr.schedule, SCHEDULES)
    given = {
      k: cfg[k]
      for k in ('b1', 'b2', 'eps', 'momentum')
      if cfg.get(k) is not None
    }
    return cls(
      name=cfg['name'],
      learning_rate=lr,
      weight_decay=decay,
      clip_global_norm=clip or None,
      frozen_pattern=_frozen_patterns(cfg.get('frozen_pattern')),
      lr_multipliers=_multiplier_rules(cfg.get('lr_multipliers')),
      **given,
    )


def _compiled(key: str, pattern) -> re.Pattern:
  if not isinstance(pattern, str) or not pattern:
    reject(key, pattern, 'a non-empty regex string')
  try:
    return re.compile(pattern)
  except re.error as err:
    reject(key, pattern, f'not a valid regex ({err})')


def _frozen_patterns(patterns) -> tuple[str, ...]:
  """frozen_pattern as a tuple of checked regexes (None / '' / (): none)."""
  if not patterns:
    return ()
  if isinstance(patterns, str):
    patterns = (patterns,)
  if not isinstance(patterns, (list, tuple)):
    reject(
      'optimizer.frozen_pattern', patterns, 'a regex or a tuple of regexes'
    )
  for p in patterns:
    _compiled('optimizer.frozen_pattern', p)
  return tuple(patterns)


def _multiplier_rules(rules) -> tuple[tuple[str, float], ...]:
  """lr_multipliers as checked (regex, multiplier > 0) pairs."""
  valid = 'a list of (regex, multiplier > 0) pairs (0: use frozen_pattern)'
  if not rules:
    return ()
  if not isinstance(rules, (list, tuple)):
    reject('optimizer.lr_multipliers', rules, valid)
  for rule in rules:
    if not isinstance(rule, (list, tuple)) or len(rule) != 2:
      reject('optimizer.lr_multipliers', rules, valid)
    _compiled('optimizer.lr_multipliers', rule[0])
    check_range(
      f'optimizer.lr_multipliers[{rule[0]!r}]', rule[1], 0, low_open=True
    )
  return tuple((str(p), float(m)) for p, m in rules)


def _check_float32_rate(key: str, value: float) -> None:
  """A rate the float32 step arithmetic can hold: at least the smallest
  normal float32 (about 1.18e-38; below it the schedule's value is
  subnormal or rounds to 0, so nothing trains, with exit 0) and at most the
  largest (about 3.4e38, beyond it inf)."""
  info = jnp.finfo(jnp.float32)
  tiny, huge = float(info.tiny), float(info.max)
  if not tiny <= value <= huge:
    valid = (
      f'a float32 learning rate must be in [{tiny:.4g}, {huge:.4g}] (below: '
      'subnormal or 0 in float32, nothing trains; above: inf)'
    )
    reject(key, value, valid)


def _decay_rules(decay) -> tuple[tuple[str, float], ...]:
  """weight_decay as (regex, value) rules; a number decays kernels only."""
  if isinstance(decay, (int, float)) or decay is None:
    check_range('optimizer.weight_decay', decay, 0, optional=True)
    # A single number decays kernels only (not biases, norms, embeddings).
    return (('.*/kernel$', float(decay)),) if decay else ()
  for rule in decay:
    if len(rule) != 2:
      valid = 'a number or a list of (regex, value) pairs'
      reject('optimizer.weight_decay', decay, valid)
    check_range(f'optimizer.weight_decay[{rule[0]!r}]', rule[1], 0)
  return tuple((str(p), float(v)) for p, v in decay)


def make_schedule(spec: ScheduleSpec, num_steps: int) -> optax.Schedule:
  """The learning-rate schedule over `num_steps` steps."""
  name, peak, end = spec.schedule, spec.peak_value, spec.end_value
  warmup = int(spec.warmup_steps)
  if name == 'constant':
    return optax.constant_schedule(peak)
  warm = optax.linear_schedule(0.0, peak, max(warmup, 1))
  decay_steps = max(num_steps - warmup, 1)
  if name == 'warmup_cosine_decay':
    decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=end / peak)
  elif name == 'warmup_linear_decay':
    decay = optax.linear_schedule(peak, end, decay_steps)
  elif name == 'warmup_rsqrt_decay':
    decay = lambda s: peak * jnp.sqrt(max(warmup, 1) / (s + max(warmup, 1)))
  else:
    raise ValueError(
      f'optimizer.learning_rate.schedule={name!r} is unknown; choose one of '
      f'{SCHEDULES}'
    )
  return optax.join_schedules([warm, decay], [warmup])


def make_optimizer(spec: OptimizerSpec, num_steps: int):
  """(optax transformation, schedule) of `spec` over `num_steps` steps."""
  schedule = make_schedule(spec.learning_rate, num_steps)
  parts = []
  if spec.clip_global_norm:
    parts.append(optax.clip_by_global_norm(spec.clip_global_norm))
  if spec.name in ('adam', 'adamw'):
    parts.append(optax.scale_by_adam(b1=spec.b1, b2=spec.b2, eps=spec.eps))
  elif spec.name == 'sgd':
    parts.append(optax.trace(decay=spec.momentum))
  else:
    raise ValueError(
      f'optimizer.name={spec.name!r} is unknown; choose one of '
      f'{list(OPTIMIZERS)}'
    )
  for pattern, value in spec.weight_decay:
    mask = functools.partial(_name_mask, re.compile(pattern))
    parts.append(optax.add_decayed_weights(value, mask=mask))
  parts.append(optax.scale_by_learning_rate(schedule))
  if spec.lr_multipliers:  # After the rate: m * lr * (direction + decay).
    parts.append(scale_by_multipliers(spec.lr_multipliers))
  tx = optax.chain(*parts)
  if spec.frozen_pattern:
    # Frozen leaves leave the chain: no moments, no share of the clip norm.
    tx = optax.partition(
      {TRAINABLE: tx, FROZEN: optax.set_to_zero()},
      functools.partial(_freeze_labels, spec.frozen_pattern),
    )
  if spec.frozen_pattern or spec.lr_multipliers:
    tx = _checked_at_init(tx, spec)
  return tx, schedule


def _name_mask(regex, params):
  return jax.tree_util.tree_map_with_path(
    lambda path, _: bool(regex.fullmatch(sharding.path_name(path))), params
  )


def _matches_any(patterns, name: str) -> bool:
  return any(re.search(p, name) for p in patterns)


def _freeze_labels(patterns, params):
  return jax.tree_util.tree_map_with_path(
    lambda path, _: (
      FROZEN if _matches_any(patterns, sharding.path_name(path)) else TRAINABLE
    ),
    params,
  )


def multiplier_of(rules, name: str) -> float:
  """The multiplier of the first rule whose regex matches `name` (or 1)."""
  for pattern, multiplier in rules:
    if re.search(pattern, name):
      return multiplier
  return 1.0


def scale_by_multipliers(rules) -> optax.GradientTransformation:
  """Scales each update by its parameter's multiplier (stateless)."""

  def update(updates, state, params=None):
    del params

    def one(path, u):
      m = multiplier_of(rules, sharding.path_name(path))
      return u if m == 1.0 else u * jnp.asarray(m, u.dtype)

    return jax.tree_util.tree_map_with_path(one, updates), state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def check_patterns(spec: OptimizerSpec, params) -> None:
  """Fails (ConfigError) on a frozen_pattern or lr_multipliers regex that
  decides no parameter of `params` (a tree of arrays or shapes)."""
  names = [
    sharding.path_name(p)
    for p, _ in jax.tree_util.tree_leaves_with_path(params)
  ]
  missing = f'matches no parameter; parameter names look like {names[:3]}'
  frozen = spec.frozen_pattern
  for pattern in frozen:
    if not any(re.search(pattern, n) for n in names):
      reject('optimizer.frozen_pattern', pattern, missing)
  if frozen and all(_matches_any(frozen, n) for n in names):
    valid = 'freezes every parameter; nothing would train'
    reject('optimizer.frozen_pattern', frozen, valid)
  for i, (pattern, _) in enumerate(spec.lr_multipliers):
    matched = [n for n in names if re.search(pattern, n)]
    earlier = [p for p, _ in spec.lr_multipliers[:i]]
    if not matched:
      reject('optimizer.lr_multipliers', pattern, missing)
    if all(_matches_any(earlier, n) for n in matched):
      valid = (
        f'every parameter it matches is taken by an earlier rule {earlier}'
      )
      reject(
        'optimizer.lr_multipliers', pattern, f'{valid} (the first match wins)'
      )


def _checked_at_init(tx, spec: OptimizerSpec) -> optax.GradientTransformation:
  """`tx` whose init first checks the patterns against the parameters."""

  def init(params):
    check_patterns(spec, params)
    return tx.init(params)

  return optax.GradientTransformation(init, tx.update)

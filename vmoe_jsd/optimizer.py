"""The optimizer and its learning-rate schedule, from config.optimizer.

Global-norm clipping, then Adam (Kingma & Ba, 2015) or SGD with momentum,
then decoupled weight decay (AdamW, Loshchilov & Hutter, ICLR 2019) on the
parameters whose '/'-joined names match weight_decay's regexes, all scaled
by the schedule: a linear warmup, then cosine, linear or inverse-square-root
decay (or a constant rate).
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
from vmoe_jsd.config_errors import check_range, fail, to_dict

OPTIMIZERS = ('adam', 'adamw', 'sgd')
SCHEDULES = (
  'constant',
  'warmup_cosine_decay',
  'warmup_linear_decay',
  'warmup_rsqrt_decay',
)


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
    check_range(f'{key}.warmup_steps', cfg.get('warmup_steps'), 0,
                integer=True, optional=True)  # fmt: skip
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
  """

  name: str
  learning_rate: ScheduleSpec
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  momentum: float = 0.9
  weight_decay: tuple[tuple[str, float], ...] = ()
  clip_global_norm: float | None = None

  @classmethod
  def from_config(cls, cfg: Mapping) -> OptimizerSpec:
    """Checks config.optimizer (ranges first, then names)."""
    cfg = to_dict(cfg)
    lr = ScheduleSpec.from_config(cfg.get('learning_rate') or {})
    for name in ('b1', 'b2', 'momentum'):
      check_range(f'optimizer.{name}', cfg.get(name), 0, 1, high_open=True,
                  optional=True)  # fmt: skip
    check_range('optimizer.eps', cfg.get('eps'), 0, low_open=True,
                optional=True)  # fmt: skip
    decay = _decay_rules(cfg.get('weight_decay'))
    clip = (cfg.get('gradient_clip') or {}).get('global_norm')
    check_range('optimizer.gradient_clip.global_norm', clip, 0,
                low_open=True, optional=True)  # fmt: skip
    if cfg.get('name') not in OPTIMIZERS:
      fail('optimizer.name', cfg.get('name'), f'one of {list(OPTIMIZERS)}')
    if lr.schedule not in SCHEDULES:
      fail('optimizer.learning_rate.schedule', lr.schedule,
           f'one of {SCHEDULES}')  # fmt: skip
    given = {k: cfg[k] for k in ('b1', 'b2', 'eps', 'momentum')
             if cfg.get(k) is not None}  # fmt: skip
    return cls(name=cfg['name'], learning_rate=lr, weight_decay=decay,
               clip_global_norm=clip or None, **given)  # fmt: skip


def _decay_rules(decay) -> tuple[tuple[str, float], ...]:
  """weight_decay as (regex, value) rules; a number decays kernels only."""
  if isinstance(decay, (int, float)) or decay is None:
    check_range('optimizer.weight_decay', decay, 0, optional=True)
    # A single number decays kernels only (not biases, norms, embeddings).
    return (('.*/kernel$', float(decay)),) if decay else ()
  for rule in decay:
    if len(rule) != 2:
      fail('optimizer.weight_decay', decay,
           'a number or a list of (regex, value) pairs')  # fmt: skip
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
  return optax.chain(*parts), schedule


def _name_mask(regex, params):
  return jax.tree_util.tree_map_with_path(
    lambda path, _: bool(
      regex.fullmatch('/'.join(sharding.key_name(k) for k in path))
    ),
    params,
  )

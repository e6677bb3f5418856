"""The error type and number checks shared by every config spec.

A spec's `from_config` (in the module that uses the spec) raises
`ConfigError` naming the dotted key, the bad value and what would be valid,
so that a bad config fails in one line before any work starts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any


class ConfigError(ValueError):
  """A config value that cannot work: names the key, value and valid ones."""


def reject(key: str, value: Any, valid: str):
  """Raises ConfigError: `config.key=value is invalid: valid`."""
  raise ConfigError(f'config.{key}={value!r} is invalid: {valid}')


def check_choice(key: str, value: Any, choices) -> None:
  """Fails unless `value` is one of `choices` (listed as given)."""
  if value not in choices:
    reject(key, value, f'one of {choices}')


def check_subset(key: str, values, valid) -> tuple:
  """`values` as a tuple; fails unless each is one of `valid`."""
  values = tuple(values)
  if any(v not in valid for v in values):
    reject(key, values, f'a subset of {list(valid)}')
  return values


def check_keys(key: str, block: Mapping, valid) -> None:
  """Fails on keys of config.<key> (`block`) that are not in `valid`."""
  unknown = sorted(set(block) - set(valid))
  if unknown:
    reject(key, unknown, f'keys in {list(valid)}')


def lookup(registry: Mapping, key: str, name: Any, choices=None) -> Any:
  """registry[name], or ValueError `key=name is unknown; choose one of
  choices` (default: the sorted names)."""
  if name not in registry:
    choices = sorted(registry) if choices is None else choices
    raise ValueError(f'{key}={name!r} is unknown; choose one of {choices}')
  return registry[name]


def check_range(
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
    reject(key, value, valid)
  ok = math.isfinite(value)
  if low is not None:
    ok = ok and (value > low if low_open else value >= low)
  if high is not None:
    ok = ok and (value < high if high_open else value <= high)
  if not ok:
    reject(key, value, valid)


def check_limit(key: str, limit, eval_limit):
  """A limit of test images (>= 1, or None for all), never above
  config.evaluate.limit (`eval_limit`, None: no cap)."""
  check_range(key, limit, 1, integer=True, optional=True)
  if eval_limit is not None:
    limit = eval_limit if limit is None else min(limit, eval_limit)
  return limit


def to_dict(cfg) -> dict[str, Any]:
  """A plain dict of a ConfigDict, a mapping or None ({})."""
  if cfg is None:
    return {}
  if hasattr(cfg, 'to_dict'):
    return cfg.to_dict()
  return dict(cfg)


def flatten(
  tree, prefix: str = '', *, stringify: bool = False
) -> dict[str, Any]:
  """{'a.b.c': value} of nested dicts or ConfigDicts (empty ones vanish).

  Args:
    tree: a dict, a ConfigDict or anything with `items()`.
    prefix: put before every key.
    stringify: values other than numbers, strings and booleans become
      strings (TensorBoard's hparams).
  """
  out = {}
  for key, value in tree.items():
    if callable(getattr(value, 'keys', None)):
      out.update(flatten(value, f'{prefix}{key}.', stringify=stringify))
    elif stringify and not isinstance(value, (int, float, str, bool)):
      out[f'{prefix}{key}'] = str(value)
    else:
      out[f'{prefix}{key}'] = value
  return out

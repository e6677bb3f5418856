"""config.evaluate.robustness: which robustness suites run, and on what.

The suites are registered in registry.py; each lives in its own module:
corruptions.py (common corruptions, after ImageNet-C), attacks.py (PGD and
the routing attack) and serving.py (the 'cheap' suite: K=1 and lower
capacity factors). docs/robustness.md gives their schema and cost.
"""

from __future__ import annotations

import dataclasses

from vmoe_jsd.config_errors import (
  check_keys,
  check_limit,
  check_range,
  check_subset,
  reject,
  to_dict,
)
from vmoe_jsd.evaluation import attacks
from vmoe_jsd.evaluation.corruptions import FAMILIES
from vmoe_jsd.evaluation.serving import (
  DEFAULT_CAPACITY_FACTORS,
  DEFAULT_EXTRA_K,
)

SUITES = ('corruptions', 'attacks', 'cheap')


@dataclasses.dataclass(frozen=True)
class RobustnessSpec:
  """config.evaluate.robustness.

  Attributes:
    enabled: run `suites` at every training evaluation (eval_main runs the
      suites its --suite flag names whatever this says).
    suites: a subset of SUITES.
    limit: test images of the corruption and cheap suites (None: all; never
      more than config.evaluate.limit).
    corruptions: the families of the corruption suite (keys of FAMILIES).
    capacity_factors: the cheap suite's capacity factors besides the default.
    extra_k: the cheap suite's K values besides the default.
    attack: attacks.AttackSpec (config.evaluate.robustness.attack).
  """

  enabled: bool = False
  suites: tuple[str, ...] = SUITES
  limit: int | None = 2000
  corruptions: tuple[str, ...] = tuple(FAMILIES)
  capacity_factors: tuple[float, ...] = DEFAULT_CAPACITY_FACTORS
  extra_k: tuple[int, ...] = DEFAULT_EXTRA_K
  attack: attacks.AttackSpec = attacks.AttackSpec()

  @classmethod
  def from_config(cls, cfg, eval_limit=None, num_experts=0) -> RobustnessSpec:
    cfg = to_dict(cfg)
    key = 'evaluate.robustness'
    check_keys(key, cfg, [f.name for f in dataclasses.fields(cls)])
    suites = check_subset(f'{key}.suites', cfg.get('suites', SUITES), SUITES)
    families = tuple(cfg.get('corruptions', tuple(FAMILIES)))
    if not families or [f for f in families if f not in FAMILIES]:
      reject(
        f'{key}.corruptions',
        families,
        f'a non-empty subset of {list(FAMILIES)}',
      )
    cfs = cfg.get('capacity_factors', DEFAULT_CAPACITY_FACTORS)
    cfs = tuple(float(c) for c in cfs)
    for c in cfs:
      check_range(f'{key}.capacity_factors', c, 0, low_open=True)
    ks = tuple(cfg.get('extra_k', DEFAULT_EXTRA_K))
    for k in ks:
      check_range(f'{key}.extra_k', k, 1, num_experts or None, integer=True)
    return cls(
      enabled=bool(cfg.get('enabled', False)),
      suites=suites,
      limit=check_limit(f'{key}.limit', cfg.get('limit', 2000), eval_limit),
      corruptions=families,
      capacity_factors=cfs,
      extra_k=ks,
      attack=attacks.AttackSpec.from_config(cfg.get('attack'), eval_limit),
    )

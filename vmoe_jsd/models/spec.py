"""ModelSpec: config.model checked and resolved once, and what follows from it.

The training model is config.model with its variant and MoE placement made
explicit (`resolve_model_config`); the evaluation model is the same with
config.evaluate.model_overrides merged in (e.g. a larger capacity factor,
vmoe's evaluation convention). Every number derived from the model (MoE
layers, tokens per image, the class-token prefix, routing-group arithmetic)
is a property here, computed in one place.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from vmoe_jsd.config_errors import check_choice, check_range, reject, to_dict
from vmoe_jsd.models import (
  build_model,
  check_model_config,
  resolve_model_config,
  routing,
)
from vmoe_jsd.models import moe as moe_lib

CLASSIFIERS = ('0', 'gap', 'map', 'token')
DEFAULT_ROUTER = 'NoisyTopExpertsPerItemRouter'
EXPERT_CHOICE = 'NoisyTopItemsPerExpertRouter'
MOE = 'model.encoder.moe'  # The dotted key of the MoE block.


def deep_update(base: Mapping, overrides: Mapping | None) -> dict:
  """Recursively merged copy of `base` with `overrides` (dicts merge)."""
  out = dict(base)
  for key, value in to_dict(overrides).items():
    if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
      out[key] = deep_update(out[key], value)
    else:
      out[key] = value
  return out


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """The training and evaluation model configs, resolved and checked.

  Attributes:
    config: config.model with variant and MoE placement explicit.
    eval_config: the same with config.evaluate.model_overrides applied.
  """

  config: Mapping[str, Any]
  eval_config: Mapping[str, Any]

  @classmethod
  def from_config(cls, model, overrides=None) -> ModelSpec:
    """Checks config.model (and its evaluation overrides); raises naming
    the bad key."""
    _check_layer_list(model)
    cfg = _prefer_capacity(resolve_model_config(model))
    check_model_config(cfg)
    _check_ranges(cfg)
    _check_shape(cfg)
    eval_cfg = _prefer_capacity(
      resolve_model_config(deep_update(to_dict(model), overrides))
    )
    _check_moe(cfg, eval_cfg)
    return cls(config=cfg, eval_config=eval_cfg)

  def _moe(self, evaluation: bool = False) -> Mapping[str, Any]:
    cfg = self.eval_config if evaluation else self.config
    return cfg.get('encoder', {}).get('moe') or {}

  @property
  def moe_layers(self) -> tuple[int, ...]:
    return tuple(self._moe().get('layers', ()))

  @property
  def num_experts(self) -> int:
    return int(self._moe().get('num_experts', 0))

  @property
  def num_classes(self) -> int:
    return int(self.config['num_classes'])

  @property
  def patch_size(self) -> int:
    """The (square) patch side."""
    return self.config['patch_size'][0]

  @property
  def num_prefix_tokens(self) -> int:
    """Tokens before the patches: 1 with a class token, else 0."""
    return 1 if self.config.get('classifier', 'token') == 'token' else 0

  def tokens_per_image(self, image_size: int) -> int:
    patch = self.config['patch_size']
    grid = (image_size // patch[0]) * (image_size // patch[1])
    return grid + self.num_prefix_tokens

  def min_images_per_batch(
    self, image_size: int, *, evaluation: bool = False
  ) -> int:
    """Fewest images whose tokens split into whole routing groups."""
    if not self.moe_layers:
      return 1
    tokens = self.tokens_per_image(image_size)
    group = self._moe(evaluation)['group_size']
    return group // math.gcd(group, tokens)

  def build(self, *, deterministic: bool = False):
    """The training model (deterministic: no dropout, no router noise)."""
    return build_model(self.config, deterministic=deterministic)

  def build_eval(self, num_classes: int | None = None):
    """The deterministic evaluation model; num_classes=0 drops the head."""
    cfg = dict(self.eval_config)
    if num_classes is not None:
      cfg['num_classes'] = num_classes
    return build_model(cfg, deterministic=True)


def _prefer_capacity(model: dict) -> dict:
  """A dispatcher's `capacity`, when set, replaces its `capacity_factor`.

  The configs set capacity_factor and leave capacity a placeholder (None);
  ml_collections cannot set a float back to None from the command line, so
  `--config.model.encoder.moe.router.dispatcher.capacity=N` alone must be
  enough to fix the capacity. It holds for the evaluation model too: a
  capacity_factor from evaluate.model_overrides (4.0 by default) yields to
  a capacity set on the model. An unset capacity is dropped.
  """
  router = ((model.get('encoder') or {}).get('moe') or {}).get('router')
  if not isinstance(router, Mapping) or 'dispatcher' not in router:
    return model
  dispatcher = dict(router['dispatcher'] or {})
  if dispatcher.get('capacity') is None:
    dispatcher.pop('capacity', None)
  else:
    dispatcher.pop('capacity_factor', None)
  model['encoder']['moe']['router'] = {**router, 'dispatcher': dispatcher}
  return model


def _check_layer_list(model) -> None:
  """model.encoder.moe.layers, when a list: distinct integer block indices
  (a repeated block would be counted twice by every per-layer sum)."""
  moe = to_dict(to_dict(model).get('encoder')).get('moe') or {}
  layers = moe.get('layers', ())
  if layers is None or isinstance(layers, str):
    return  # None: no MoE; a placement string is parsed by moe_placement.
  valid = 'distinct integer block indices, e.g. (1, 3)'
  if not isinstance(layers, (list, tuple)) or any(
    isinstance(x, bool) or not isinstance(x, int) for x in layers
  ):
    reject(f'{MOE}.layers', layers, valid)
  repeated = sorted({x for x in layers if list(layers).count(x) > 1})
  if repeated:
    reject(f'{MOE}.layers', tuple(layers), f'{valid}; repeated: {repeated}')


def _check_ranges(model: Mapping) -> None:
  """Sizes and rates of config.model."""
  _check(model, 'num_classes', 1, integer=True)
  _check(model, 'hidden_size', 1, integer=True)
  _check(model, 'representation_size', 1, integer=True, optional=True)
  _check(model, 'encoder.mlp_dim', 1, integer=True, optional=True)
  for rate in ('dropout_rate', 'attention_dropout_rate', 'moe.dropout_rate'):
    _check(model, f'encoder.{rate}', 0, 1, high_open=True, optional=True)
  _check(model, 'encoder.moe.group_size', 1, integer=True, optional=True)
  for name in (
    'noise_std',
    'importance_loss_weight',
    'load_loss_weight',
    'gshard_loss_weight',
    'z_loss_weight',
  ):
    _check(model, f'encoder.moe.router.{name}', 0, optional=True)
  key = 'encoder.moe.router.dispatcher'
  _check(model, f'{key}.capacity_factor', 0, low_open=True, optional=True)
  _check(model, f'{key}.capacity', 1, integer=True, optional=True)


def _check(model: Mapping, key: str, *bounds, **options) -> None:
  """check_range of model.<key> (a dotted path; a missing block is None)."""
  value = model
  for part in key.split('.'):
    value = (value or {}).get(part)
  check_range(f'model.{key}', value, *bounds, **options)


def _check_shape(model: Mapping) -> None:
  """Name, patches, classifier, position embedding, heads, blocks."""
  encoder = model.get('encoder') or {}
  patch = tuple(model.get('patch_size', ()))
  if model.get('name', 'VisionTransformerMoe') != 'VisionTransformerMoe':
    reject('model.name', model.get('name'), "choose 'VisionTransformerMoe'")
  if len(patch) != 2 or any(p <= 0 for p in patch):
    reject('model.patch_size', model.get('patch_size'), 'use (p, p), p > 0')
  if patch[0] != patch[1]:
    reject('model.patch_size', patch, 'square patches only (views are square)')
  check_choice(
    'model.classifier', model.get('classifier', 'token'), CLASSIFIERS
  )
  pos = (encoder.get('position_emb') or {}).get('name', 'learned')
  positions = ['learned', 'none', 'sincos2d']
  check_choice('model.encoder.position_emb.name', pos, positions)
  heads = encoder.get('num_heads', 0)
  if heads <= 0 or model['hidden_size'] % encoder.get('num_heads', 1):
    valid = f'must be > 0 and divide hidden_size={model["hidden_size"]}'
    reject('model.encoder.num_heads', encoder.get('num_heads'), valid)


def _check_moe(model: Mapping, eval_model: Mapping) -> None:
  """MoE placement, router, K and the dispatchers (training and eval)."""
  encoder = model.get('encoder') or {}
  moe = encoder.get('moe') or {}
  router = dict(moe.get('router') or {})
  num_layers = encoder.get('num_layers', 0)
  layers = tuple(moe.get('layers', ()))
  if num_layers <= 0:
    reject('model.encoder.num_layers', num_layers, 'must be >= 1')
  if [x for x in layers if not 0 <= x < num_layers]:
    valid = f'block indices in [0, num_layers={num_layers})'
    reject(f'{MOE}.layers', layers, valid)
  if not layers:
    return
  num_experts = moe.get('num_experts', 0)
  router_name = router.get('name', DEFAULT_ROUTER)
  check_choice(f'{MOE}.router.name', router_name, sorted(routing.ROUTERS))
  if num_experts < 1:
    reject(f'{MOE}.num_experts', num_experts, 'must be >= 1')
  k = router.get('num_selected_experts', 1)
  if router_name == DEFAULT_ROUTER and not 1 <= k <= num_experts:
    valid = f'K must be in [1, num_experts={num_experts}]'
    reject(f'{MOE}.router.num_selected_experts', k, valid)
  check_dispatcher('training', router, moe.get('group_size'), num_experts)
  eval_moe = eval_model['encoder']['moe']
  check_dispatcher(
    'with evaluate.model_overrides',
    eval_moe.get('router') or {},
    eval_moe.get('group_size'),
    num_experts,
  )


def check_dispatcher(
  where: str, router: Mapping, group_size, num_experts: int
) -> None:
  """Dispatcher settings of a top-K or expert-choice router."""
  name = router.get('name', DEFAULT_ROUTER)
  if name == 'SoftRouter':  # Soft MoE has slots, not a dispatcher.
    if router.get('num_slots') is None and group_size:
      _check_capacity_factor(
        f'{MOE}.router ({where})',
        router.get('capacity_factor', 1.0),
        group_size,
        num_experts,
        'S cf / E',
      )
    return
  key = f'{MOE}.router.dispatcher ({where})'
  dispatcher = router.get('dispatcher') or {}
  valid = ['einsum'] if name == EXPERT_CHOICE else ['einsum', 'indices']
  check_choice(f'{key}.name', dispatcher.get('name', 'einsum'), valid)
  if (dispatcher.get('capacity') is None) == (
    dispatcher.get('capacity_factor') is None
  ):
    reject(key, dispatcher, 'set exactly one of capacity and capacity_factor')
  if dispatcher.get('capacity') is None and group_size:
    k = 1 if name == EXPERT_CHOICE else router.get('num_selected_experts', 1)
    _check_capacity_factor(
      key,
      dispatcher['capacity_factor'],
      k * group_size,
      num_experts,
      'S cf / E' if k == 1 else 'K S cf / E',
    )
  if name != EXPERT_CHOICE or not group_size:
    return
  capacity = dispatcher.get('capacity') or moe_lib.compute_capacity(
    group_size,
    num_experts,
    dispatcher['capacity_factor'],
    dispatcher.get('capacity_ceil_or_round', 'ceil'),
    dispatcher.get('capacity_multiple_of', 4),
  )
  if capacity > group_size:
    reject(
      key,
      dispatcher,
      f'expert-choice capacity {capacity} exceeds the group size '
      f'{group_size}: lower capacity or capacity_factor',
    )


def _check_capacity_factor(
  key: str, factor, num_tokens: int, num_experts: int, formula: str
) -> None:
  """A capacity factor must give each expert at least one token of capacity
  before rounding (C = num_tokens * cf / E >= 1, num_tokens = K S for top-K
  routing, S for expert choice and Soft MoE's slots; vmoe's
  `compute_capacity`). Below that the rounding (ceil to 1, then up to a
  multiple of 4; or round to 0) sets the capacity and the factor means
  nothing: cf=1e-9 trained with 4 slots per expert."""
  if not isinstance(factor, (int, float)) or isinstance(factor, bool):
    return  # _check_ranges reports non-numbers.
  exact = num_tokens * factor / num_experts
  if exact < 1:
    reject(
      f'{key}.capacity_factor',
      factor,
      f'gives each expert {formula} = {num_tokens} x {factor} / '
      f'{num_experts} = {exact:.3g} token(s) of capacity per routing group'
      f' before rounding; it must be >= 1, i.e. capacity_factor >= '
      f'{num_experts / num_tokens:.4g} (or set capacity)',
    )

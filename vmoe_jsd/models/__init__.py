"""Models: V-MoE (vit_moe.py), routers (routing.py), dispatch (moe.py).

`build_model(model_config, deterministic=...)` builds a model from the
`config.model` block, which follows vmoe's layout (num_classes, patch_size,
hidden_size, classifier, representation_size, encoder={num_layers, mlp_dim,
num_heads, dropout_rate, attention_dropout_rate, position_emb, moe={layers,
num_experts, group_size, router={...}}}), plus two conveniences decoded by
`resolve_model_config`:

  variant='S/32': backbone size and patch size (keys given explicitly win);
  encoder.moe.layers='every 2' | 'last 2' | (1, 3, ...): MoE placement.

Precision and memory (vit_moe.py's docstring has the policy):
  dtype='float32' | 'bfloat16': computation dtype of the encoder blocks
    (parameters and optimizer state stay float32);
  encoder.remat: one of vit_moe.REMAT_POLICIES ('none', 'full', 'dots_saveable',
    'dots_with_no_batch_dims_saveable'): rematerialisation of each block.

`from_vmoe_config(vmoe_model_config, deterministic=...)` takes a model config
exactly as google-research/vmoe passes it to its `VisionTransformerMoe`.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import inspect
import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from vmoe_jsd.config_errors import lookup, to_dict
from vmoe_jsd.models import moe, routing
from vmoe_jsd.models.vit_moe import (
  EncoderMoe,
  MlpMoeBlock,
  VisionTransformerMoe,
  check_remat,
)

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, None: None}
MODELS = {'VisionTransformerMoe': VisionTransformerMoe}

# name: (hidden_size, num_layers, mlp_dim, num_heads). S, B, L, H are vmoe's
# backbones (V-MoE paper, Table 8). NOTE: vmoe's "S" has 8 blocks, not the 12
# of the ViT-S in Steiner et al. / DeiT; Ti is big_vision's (12 blocks).
VARIANTS = {
  'Ti': (192, 12, 768, 3),
  'S': (512, 8, 2048, 8),
  'B': (768, 12, 3072, 12),
  'L': (1024, 24, 4096, 16),
  'H': (1280, 32, 5120, 16),
}
_VARIANT_RE = re.compile(r'^(Ti|S|B|L|H)/(\d+)$')
_PLACEMENT_RE = re.compile(r'^(every|last)\s+(\d+)$', re.IGNORECASE)


def moe_placement(spec, num_layers: int) -> tuple[int, ...]:
  """MoE block indices from a placement spec.

  Args:
    spec: a sequence of 0-based block indices; 'every N' (blocks N-1, 2N-1,
      ...); or 'last N': the last N of the odd blocks (1, 3, 5, ...), as
      vmoe's "Last N" (ViT-S with 8 blocks, 'last 2' -> (5, 7)).
    num_layers: blocks in the encoder.

  Returns:
    Sorted tuple of block indices.
  """
  if spec is None:
    return ()
  if isinstance(spec, str):
    m = _PLACEMENT_RE.match(spec.strip())
    if not m or int(m.group(2)) < 1:
      raise ValueError(
        f"model.encoder.moe.layers={spec!r} is invalid; use 'every N', "
        "'last N' (N >= 1) or a list of block indices"
      )
    n = int(m.group(2))
    if m.group(1).lower() == 'every':
      return tuple(range(n - 1, num_layers, n))
    odd = tuple(range(1, num_layers, 2))
    if n > len(odd):
      raise ValueError(
        f'model.encoder.moe.layers={spec!r}: only {len(odd)} odd blocks in '
        f'{num_layers}'
      )
    return odd[-n:]
  return tuple(sorted(int(x) for x in spec))


def resolve_model_config(model_config) -> dict[str, Any]:
  """config.model with the variant and MoE placement made explicit."""
  cfg = copy.deepcopy(to_dict(model_config))
  encoder = dict(cfg.get('encoder') or {})
  variant = cfg.pop('variant', None)
  if variant:
    m = _VARIANT_RE.match(str(variant))
    if not m:
      raise ValueError(
        f'model.variant={variant!r} is invalid; use NAME/PATCH with NAME in '
        f'{list(VARIANTS)}, e.g. "S/32"'
      )
    hidden, layers, mlp, heads = VARIANTS[m.group(1)]
    patch = int(m.group(2))
    cfg.setdefault('hidden_size', hidden)
    cfg.setdefault('patch_size', (patch, patch))
    encoder.setdefault('num_layers', layers)
    encoder.setdefault('mlp_dim', mlp)
    encoder.setdefault('num_heads', heads)
  if encoder.get('moe'):
    moe = dict(encoder['moe'])
    moe['layers'] = moe_placement(
      moe.get('layers', ()), encoder.get('num_layers', 0)
    )
    encoder['moe'] = moe
  cfg['encoder'] = encoder
  if 'patch_size' in cfg:
    patch = cfg['patch_size']
    cfg['patch_size'] = (
      (patch, patch) if isinstance(patch, int) else tuple(patch)
    )
  return cfg


_INTERNAL = {'parent', 'name', 'deterministic', 'dtype'}
# make_top_k_dispatcher's options, and vmoe's sharding hint (ignored).
DISPATCHER_KEYS = set(
  inspect.signature(moe.make_top_k_dispatcher).parameters
) - {'gates', 'num_selected_experts'} | {'partition_spec'}


def _fields(cls, extra=(), internal=_INTERNAL) -> set[str]:
  return {f.name for f in dataclasses.fields(cls)} - internal | set(extra)


def _check_keys(given: Mapping, valid: set[str], where: str) -> None:
  unknown = sorted(set(given) - valid)
  if unknown:
    raise ValueError(
      f'{where} has unknown keys {unknown}; valid keys: {sorted(valid)}'
    )


def check_model_config(cfg: Mapping[str, Any]) -> None:
  """Raises ValueError naming any misspelt or unsupported model key/value."""
  _check_keys(cfg, _fields(VisionTransformerMoe, ('name', 'dtype')), 'model')
  check_dtype(cfg.get('dtype'))
  encoder = cfg.get('encoder') or {}
  _check_keys(
    encoder,
    _fields(EncoderMoe) - {'patch_grid', 'num_prefix_tokens'},
    'model.encoder',
  )
  check_remat(encoder.get('remat', 'none'))
  moe = encoder.get('moe') or {}
  if not moe:
    return
  _check_keys(
    moe,
    _fields(MlpMoeBlock, ('layers',)) - {'router'} | {'router'},
    'model.encoder.moe',
  )
  router = dict(moe.get('router') or {})
  router_cls = routing.get_router_cls(
    router.get('name', 'NoisyTopExpertsPerItemRouter')
  )
  _check_keys(
    router,
    _fields(router_cls, ('name', 'deterministic', 'dtype'), {'parent'})
    - {'num_experts'},
    'model.encoder.moe.router',
  )
  if isinstance(router.get('dispatcher'), Mapping):
    _check_keys(
      router['dispatcher'],
      DISPATCHER_KEYS,
      'model.encoder.moe.router.dispatcher',
    )


def check_dtype(dtype) -> None:
  """Raises ValueError unless `dtype` is a key of DTYPES."""
  lookup(DTYPES, 'model.dtype', dtype, f'{list(DTYPES)[:2]} or None (float32)')


def build_model(
  model_config: Mapping[str, Any], *, deterministic: bool
) -> VisionTransformerMoe:
  """VisionTransformerMoe from a config.model dict (or ConfigDict)."""
  cfg = resolve_model_config(model_config)
  check_model_config(cfg)
  name = cfg.pop('name', 'VisionTransformerMoe')
  model_cls = lookup(MODELS, 'model.name', name)
  dtype = DTYPES[cfg.pop('dtype', None)]
  return model_cls(deterministic=deterministic, dtype=dtype, **cfg)


def from_vmoe_config(
  model_config: Mapping[str, Any], *, deterministic: bool
) -> VisionTransformerMoe:
  """Our model from a google-research/vmoe model config.

  `model_config` is what vmoe passes to its `VisionTransformerMoe` (as in
  its configs' `config.model`, or the parity fixture's config.json without
  image_size/eval_capacity_factors). `apply({'params': p}, images)` returns
  (logits, metrics) as vmoe's does, with vmoe's parameter tree.

  Every option of vmoe's model is mapped: classifier ('token', 'gap', 'map',
  '0'), representation_size, head_bias_init, head_kernel_zero_init,
  encoder.{num_layers, mlp_dim, num_heads, dropout_rate,
  attention_dropout_rate, attention_qk_norm, position_emb}, moe.{layers,
  num_experts, group_size, dropout_rate, split_rngs, router}, routers by name
  (vmoe's dotted paths are reduced to the class name: 'NoisyTopExperts-
  PerItemRouter', 'NoisyTopItemsPerExpertRouter', soft_moe's 'SoftRouter')
  with all their arguments, and the dispatcher's (name, capacity,
  capacity_factor, batch_priority, capacity_ceil_or_round,
  capacity_multiple_of, bfloat16). `partition_spec` and `einsum_precision`
  are sharding/precision hints that this package decides itself (on CPU and
  in float32 the result is the same).

  Args:
    model_config: vmoe model config (dict or ConfigDict).
    deterministic: evaluation mode (no router noise, no dropout).

  Returns:
    A VisionTransformerMoe.
  """
  cfg = copy.deepcopy(to_dict(model_config))
  name = cfg.pop('name', 'VisionTransformerMoe')
  if name not in (
    'VisionTransformerMoe',
    'vmoe.nn.vit_moe.VisionTransformerMoe',
  ):
    raise ValueError(
      f'vmoe model name {name!r} is not supported; only '
      "'VisionTransformerMoe' (vmoe.nn.vit_moe) is"
    )
  if 'encoder_cls' in cfg:
    raise ValueError(
      'vmoe model key encoder_cls (a Python class) is not supported; only '
      "vmoe's EncoderMoe"
    )
  encoder = cfg.get('encoder') or {}
  if 'dtype' in encoder:
    # vmoe applies its dtype in the encoder; ours is the model's dtype,
    # which the patch embedding and head do not use either.
    cfg['dtype'] = _dtype_name(encoder.pop('dtype'))
  moe = encoder.get('moe') or {}
  router = moe.get('router') or {}
  if 'name' in router:
    name, kwargs = parse_call(router['name'])
    # As vmoe: keys given in the router config win over the call's.
    router.update({k: v for k, v in kwargs.items() if k not in router})
    router['name'] = name
  return build_model(cfg, deterministic=deterministic)


def _dtype_name(dtype) -> str | None:
  if dtype is None:
    return None
  name = jnp.dtype(dtype).name
  if name not in DTYPES:
    raise ValueError(f'dtype {dtype!r} is not supported; use float32/bfloat16')
  return name


def parse_call(spec: str) -> tuple[str, dict[str, Any]]:
  """'pkg.Name(a=1, b=(2, 3))' -> ('Name', {'a': 1, 'b': (2, 3)}).

  vmoe names routers by (dotted) class name, optionally written as a call
  with literal keyword arguments; the module path is dropped.
  """
  try:
    node = ast.parse(str(spec).strip(), mode='eval').body
  except SyntaxError:
    raise ValueError(f'router name {spec!r} is not a name or a call') from None
  kwargs = {}
  if isinstance(node, ast.Call):
    if node.args:
      raise ValueError(
        f'router {spec!r}: only keyword arguments are supported in the call'
      )
    try:
      kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
    except ValueError:
      raise ValueError(
        f'router {spec!r}: arguments must be Python literals'
      ) from None
    node = node.func
  parts = []
  while isinstance(node, ast.Attribute):
    parts.append(node.attr)
    node = node.value
  if not isinstance(node, ast.Name):
    raise ValueError(f'router name {spec!r} is not a name or a call')
  return (parts[0] if parts else node.id), kwargs


def router_logits_by_layer(intermediates, layers) -> dict[int, Any]:
  """{block: (G, S, E) clean router logits} from the sown intermediates."""
  encoder = intermediates['Encoder']
  out = {}
  for block in layers:
    moe = encoder[f'encoderblock_{block}']['Moe']
    out[block] = moe['Router'][routing.ROUTER_LOGITS][0]
  return out


def per_image_patches(logits, num_images: int, prefix: int):
  """(G, S, E) router logits -> (num_images, P, E) of the patch tokens."""
  per_image = logits.reshape(num_images, -1, logits.shape[-1])
  return per_image[:, prefix:]


def paired_patches(logits, num_images: int, prefix: int):
  """(G, S, E) router logits of 2n views (the two views of each image
  adjacent) -> (n, 2, P, E) of the patch tokens."""
  patches = per_image_patches(logits, 2 * num_images, prefix)
  return patches.reshape(num_images, 2, patches.shape[1], -1)

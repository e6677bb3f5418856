"""Models: V-MoE (vit_moe.py), routers (routing.py), dispatch (moe.py).

`build_model(model_config, deterministic=...)` builds a model from the
`config.model` block (vmoe's layout: num_classes, patch_size, hidden_size,
classifier, representation_size, encoder={num_layers, mlp_dim, num_heads,
dropout_rate, attention_dropout_rate, moe={layers, num_experts, group_size,
router={...}}}).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from vmoe_jsd.models.vit_moe import VisionTransformerMoe

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, None: None}


def build_model(
  model_config: Mapping[str, Any], *, deterministic: bool
) -> VisionTransformerMoe:
  """VisionTransformerMoe from a config.model dict (or ConfigDict)."""
  cfg = dict(model_config.to_dict() if hasattr(model_config, 'to_dict')
             else model_config)  # fmt: skip
  name = cfg.pop('name', 'VisionTransformerMoe')
  if name != 'VisionTransformerMoe':
    raise ValueError(
      f"model.name={name!r} is unknown; choose one of ['VisionTransformerMoe']"
    )
  dtype = cfg.pop('dtype', None)
  if dtype not in DTYPES:
    raise ValueError(
      f'model.dtype={dtype!r} is unknown; choose one of '
      f'{[k for k in DTYPES if k]} or None'
    )
  cfg['patch_size'] = tuple(cfg['patch_size'])
  return VisionTransformerMoe(
    deterministic=deterministic, dtype=DTYPES[dtype], **cfg
  )

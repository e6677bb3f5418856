"""ModelSpec: the numbers derived from config.model, by hand."""

import pytest

from vmoe_jsd.config_errors import ConfigError
from vmoe_jsd.models.spec import ModelSpec, deep_update

MODEL = {
  'num_classes': 10, 'patch_size': (7, 7), 'hidden_size': 32,
  'classifier': 'token',
  'encoder': {
    'num_layers': 4, 'mlp_dim': 64, 'num_heads': 2,
    'moe': {
      'layers': 'every 2', 'num_experts': 4, 'group_size': 6 * 17,
      'router': {'num_selected_experts': 2,
                 'dispatcher': {'name': 'indices', 'capacity_factor': 1.25}},
    },
  },
}  # fmt: skip


def test_derived_numbers_by_hand():
  overrides = {'encoder': {'moe': {'group_size': 4 * 17}}}
  spec = ModelSpec.from_config(MODEL, overrides)
  assert spec.moe_layers == (1, 3)  # 'every 2' of 4 blocks.
  assert spec.num_experts == 4 and spec.num_classes == 10
  assert spec.patch_size == 7 and spec.num_prefix_tokens == 1
  assert spec.tokens_per_image(28) == 16 + 1
  # Groups of 6 images (102 tokens of 17) train; of 4 images evaluate.
  assert spec.min_images_per_batch(28) == 6
  assert spec.min_images_per_batch(28, evaluation=True) == 4
  # Without a class token an image has 16 tokens: a group of 48 is 3 images.
  moe = {'encoder': {'moe': {'group_size': 48}}}
  gap = deep_update(MODEL, {'classifier': 'gap', **moe})
  assert ModelSpec.from_config(gap).num_prefix_tokens == 0
  assert ModelSpec.from_config(gap).min_images_per_batch(28) == 3
  # The overrides reach the evaluation config only.
  dispatcher = spec.eval_config['encoder']['moe']['router']['dispatcher']
  assert dispatcher == {'name': 'indices', 'capacity_factor': 1.25}
  assert spec.eval_config['encoder']['moe']['group_size'] == 68
  assert spec.config['encoder']['moe']['group_size'] == 102


def test_a_bad_override_is_named_with_where_it_applies():
  overrides = {'encoder': {'moe': {'router': {'dispatcher': {
    'name': 'bogus'}}}}}  # fmt: skip
  with pytest.raises(ConfigError, match='with evaluate.model_overrides'):
    ModelSpec.from_config(MODEL, overrides)

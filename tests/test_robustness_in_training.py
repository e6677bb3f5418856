"""evaluate.robustness.enabled runs the suites at training evaluations."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import smoke_config  # noqa: E402

from vmoe_jsd import train  # noqa: E402


@pytest.mark.filterwarnings('ignore')
def test_enabled_robustness_is_in_the_results(tmp_path):
  config = smoke_config.get_config()
  with config.unlocked():
    config.num_train_steps = 2
    config.save_checkpoint.every_steps = 0
    rob = config.evaluate.robustness
    rob.enabled = True
    rob.suites = ('cheap',)
    rob.capacity_factors = (1.0,)
  result = train.train_and_evaluate(config, str(tmp_path))
  rows = {r['name']: r for r in result['robustness']['cheap']['rows']}
  # The default row is the evaluation model on the same images: its accuracy
  # is the standard evaluation's, reached through another code path.
  assert rows['default']['accuracy'] == pytest.approx(result['accuracy'])
  assert rows['default']['num_examples'] == result['num_examples']
  assert {r['num_selected_experts'] for r in rows.values()} == {1, 2}

"""evaluate.robustness.enabled runs the suites at training evaluations."""

import pytest


@pytest.mark.filterwarnings('ignore')
def test_enabled_robustness_is_in_the_results(trained):
  # The uninterrupted run of test_preemption's stop inside robustness.
  result = trained(
    **{
      'num_train_steps': 2,
      'save_checkpoint.every_steps': 0,
      'evaluate.robustness.enabled': True,
      'evaluate.robustness.suites': ('cheap',),
      'evaluate.robustness.capacity_factors': (1.0,),
    }
  ).result
  rows = {r['name']: r for r in result['robustness']['cheap']['rows']}
  # The default row is the evaluation model on the same images: its accuracy
  # is the standard evaluation's, reached through another code path.
  assert rows['default']['accuracy'] == pytest.approx(result['accuracy'])
  assert rows['default']['num_examples'] == result['num_examples']
  assert {r['num_selected_experts'] for r in rows.values()} == {1, 2}

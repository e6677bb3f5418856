"""Multi-host evaluation: equal steps per process, padding never counts.

Processes are simulated by calling a dataset's eval_batches once per
process_index; a real run feeds the same per-process batches to
jax.make_array_from_process_local_data.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from smoke_config import get_config, with_overrides

from vmoe_jsd import config_lib, data, streams
from vmoe_jsd.data import eval_padding
from vmoe_jsd.evaluation import accuracy, core


def _per_process(ds, batch_size, process_count, limit=None):
  return [
    list(
      ds.eval_batches(
        batch_size,
        process_index=i,
        process_count=process_count,
        limit=limit,
      )
    )
    for i in range(process_count)
  ]


def _check_equal_steps_and_union(per_process, local, expected_index):
  steps = {len(batches) for batches in per_process}
  assert len(steps) == 1, f'processes run different step counts: {steps}'
  real = []
  for batches in per_process:
    for b in batches:
      assert len(b['mask']) == len(b['index']) == len(b['label']) == local
      assert np.all(b['index'][~b['mask']] == -1)
      real.extend(b['index'][b['mask']].tolist())
  # Every example of the split exactly once, nothing else.
  assert sorted(real) == list(expected_index)
  return steps.pop()


@pytest.mark.parametrize(
  'process_count, limit', [(1, None), (2, None), (3, None), (3, 20), (2, 7)]
)
def test_array_eval_batches_equal_steps_and_whole_split_once(
  process_count, limit
):
  ds = data.get_dataset({'name': 'synthetic', 'split': 'test',
                         'num_examples': 25, 'image_size': 8})  # fmt: skip
  batch = 12
  per_process = _per_process(ds, batch, process_count, limit)
  total = 25 if limit is None else limit
  steps = _check_equal_steps_and_union(
    per_process, batch // process_count, range(total)
  )
  assert steps == math.ceil(total / batch)
  for batches in per_process:  # Labels belong to their indices.
    for b in batches:
      np.testing.assert_array_equal(
        b['label'][b['mask']], ds.labels[b['index'][b['mask']]]
      )


def test_step_count_errors_name_the_problem():
  with pytest.raises(ValueError, match='multiple of the process count 3'):
    eval_padding.num_eval_steps(10, 8, 3)
  with pytest.raises(ValueError, match='limit=-1'):
    eval_padding.eval_total(10, -1)


def test_tfds_eval_batches_equal_steps_on_every_process(tmp_path):
  pytest.importorskip('tensorflow')
  # test_tfds_data skips itself without tensorflow: not at the top, where
  # it would skip every test of this file.
  from test_tfds_data import RampImages  # noqa: PLC0415 - needs tensorflow

  RampImages(
    data_dir=str(tmp_path), file_format='array_record'
  ).download_and_prepare()
  cfg = {'name': 'tfds', 'tfds_name': 'ramp_images', 'split': 'test',
         'image_size': 16, 'data_dir': str(tmp_path)}  # fmt: skip
  ds = data.get_dataset(cfg)
  assert len(ds) == 5
  (whole,) = _per_process(ds, 8, 1)
  labels = whole[0]['label'][whole[0]['mask']]
  images = whole[0]['image'][whole[0]['mask']]
  # 5 examples on 2 or 3 processes: even shards would hold 3 and 2 (or 2, 2
  # and 1) examples, and one local example per step would give processes
  # different step counts.
  for process_count, batch in [(2, 2), (3, 3), (2, 8), (3, 12)]:
    per_process = _per_process(ds, batch, process_count)
    steps = _check_equal_steps_and_union(
      per_process, batch // process_count, range(5)
    )
    assert steps == math.ceil(5 / batch)
    for batches in per_process:
      for b in batches:
        idx = b['index'][b['mask']]
        np.testing.assert_array_equal(b['label'][b['mask']], labels[idx])
        np.testing.assert_array_equal(b['image'][b['mask']], images[idx])
  per_process = _per_process(ds, 4, 2, limit=3)
  _check_equal_steps_and_union(per_process, 2, range(3))


def test_group_real_tokens_matches_brute_force():
  rng = np.random.default_rng(0)
  batch, tokens = 6, 5
  for groups in (1, 2, 3, 5, 10, 15, 30):
    mask = rng.random(batch) < 0.5
    flat = np.repeat(mask, tokens).reshape(groups, -1).sum(1)
    got = core.group_real_tokens(jnp.asarray(mask), groups)
    np.testing.assert_allclose(got, flat * groups / tokens, rtol=1e-6)


@pytest.mark.slow
def test_padding_changes_no_figure():
  # 24 examples: batches of 16 (8 padded) against batches of 8 (none).
  # A small evaluation capacity makes the routers drop choices, so the
  # dropped fractions are tested too.
  config = with_overrides(
    get_config(),
    **{
      'model.head_kernel_zero_init': False,
      'evaluate.limit': 24,
      'evaluate.model_overrides': {
        'encoder': {'moe': {'router': {'dispatcher': {'capacity_factor': 0.5}}}}
      },
    },
  )
  spec = config_lib.validate(config, jax.device_count())
  ds = spec.test_data.load()
  model = spec.model.build_eval()
  params = model.init(jax.random.key(0), jnp.zeros((2, 16, 16, 1)))['params']
  step = jax.jit(
    accuracy.make_eval_step(
      model, spec.model, spec.views, streams.stream(spec.seed, 'eval_views')
    )
  )
  results = {}
  for batch in (16, 8):
    results[batch] = accuracy.run_evaluation(
      step,
      params,
      ds,
      batch,
      spec.evaluate.limit,
      spec.model.moe_layers,
      lambda *a: tuple(map(jnp.asarray, a)),
    )
  padded, unpadded = results[16], results[8]
  assert padded['num_examples'] == unpadded['num_examples'] == 24
  assert padded['accuracy'] == unpadded['accuracy']
  figs_p = padded['routing']['encoderblock_1']
  figs_u = unpadded['routing']['encoderblock_1']
  assert figs_u['dropped'] > 0 and figs_u['pairs'] > 0
  assert figs_p.keys() == figs_u.keys()
  for name, value in figs_u.items():
    np.testing.assert_allclose(
      figs_p[name], value, rtol=1e-5, atol=1e-7, err_msg=name
    )

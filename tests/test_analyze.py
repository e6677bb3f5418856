"""analyze: a trained smoke checkpoint -> every file; the figures' content
against the data they draw; the routing maps are the evaluation's own views;
an image folder that sets no image_size is read at the augmentation size."""

import json
import os

import commands
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import smoke_config
from PIL import Image

from vmoe_jsd import analyze, checkpoints, cli, config_lib, streams, train
from vmoe_jsd.evaluation import accuracy, core, experts, figures

SMOKE = commands.SMOKE


def _smoke(**overrides):
  return smoke_config.with_overrides(smoke_config.get_config(), **overrides)


@pytest.mark.slow  # About 40 s alone (compiling train, eval and analyze).
def test_analyze_writes_every_file_from_a_trained_checkpoint(tmp_path):
  config = _smoke(
    **{
      'consistency.loss': 'hard_target',
      'evaluate.stability.enabled': True,
      'evaluate.routing_map_images': 2,
    }
  )
  workdir = str(tmp_path / 'run')
  result = train.train_and_evaluate(config, workdir)
  # Training's evaluation carries the flip rates of every layer.
  rates = result['stability']['flip_rate']['encoderblock_1']
  assert sorted(rates) == [
    'noise_0.02',
    'noise_0.05',
    'noise_0.1',
    'shift_1',
    'shift_2',
  ]
  assert all(0.0 <= r <= 1.0 for r in rates.values())
  # ... and a routing-map image in TensorBoard.
  from tensorboard.backend.event_processing import (  # noqa: PLC0415 - slow
    plugin_event_accumulator as pea,
  )

  acc = pea.EventAccumulator(workdir)
  acc.Reload()
  assert 'routing_maps' in acc.Tags()['tensors']
  out = str(tmp_path / 'analysis')
  summary = analyze.analyze(config, workdir, out, num_images=3)
  for name in (
    'routing_maps.png',
    'expert_by_class.png',
    'load_dropped.png',
    'flip_rates.png',
    'results.json',
    'summary.md',
  ):
    path = os.path.join(out, name)
    assert os.path.getsize(path) > 0, name
  with open(os.path.join(out, 'results.json')) as f:
    saved = json.load(f)
  # The same checkpoint evaluates to the accuracy training reported.
  assert saved['accuracy'] == pytest.approx(result['accuracy'])
  for key in ('agreement', 'kappa', 'jsd', 'entropy_fraction', 'dropped'):
    assert saved['routing']['encoderblock_1'][key] == pytest.approx(
      result['routing']['encoderblock_1'][key]
    )
  assert saved['stability'] == result['stability']
  assert saved['step'] == config.num_train_steps
  share = np.asarray(saved['expert_by_class']['encoderblock_1'])
  np.testing.assert_allclose(share.sum(1)[share.sum(1) > 0], 1.0, rtol=1e-6)
  md = open(os.path.join(out, 'summary.md')).read()
  assert 'random resized crop of 0.5-1 of the area' in md
  assert 'encoderblock_1' in md and summary['files']


def test_routing_map_marks_exactly_the_disagreeing_matched_patches():
  # Two 8x8 views, patch 4: 4 patches each. View 1 routes (0, 1, 2, 3),
  # view 2 routes (0, 1, 3, 3). Maps: view 1's patch i -> view 2's patch i,
  # but patch 3 has no match; view 2's (0, 1, 2, 3) -> view 1's (0, 1, 2, 2).
  views = np.zeros((1, 2, 8, 8, 1), np.float32)
  maps = np.array([[[0, 1, 2, -1], [0, 1, 2, 2]]])
  top1 = {1: np.array([[[0, 1, 2, 3], [0, 1, 3, 3]]])}
  data = {'views': views, 'maps': maps, 'top1': top1}
  fig = figures.plot_routing_maps(
    np.zeros((1, 8, 8, 1), np.uint8), data, patch_size=4, num_experts=4
  )
  axes = fig.axes
  # Crosses: two line segments per disagreeing matched patch.
  # View 1: patch 2 (2 vs 3) disagrees; patch 3 unmatched. View 2: patch 2
  # (3 vs 2) and patch 3 (3 vs view 1's patch 2, expert 2) disagree.
  assert len(axes[1].lines) == 2
  assert len(axes[2].lines) == 4
  assert '2/3 matched agree' in axes[1].get_title()
  assert '2/4 matched agree' in axes[2].get_title()
  labels = [t.get_text() for t in fig.legends[0].get_texts()]
  assert labels[:4] == ['expert 0', 'expert 1', 'expert 2', 'expert 3']
  pixels = figures.figure_to_array(fig)
  assert pixels.ndim == 3 and pixels.shape[-1] == 3 and pixels.dtype == np.uint8


# ----------------------------------------------------------------------------
# The routing maps are the evaluation's views; folders at the default size.
# ----------------------------------------------------------------------------
def _init_params(spec, channels):
  """Fresh parameters of the evaluation model (routing is not uniform)."""
  size = spec.views.size
  shape = (
    spec.model.min_images_per_batch(size, evaluation=True),
    size,
    size,
    channels,
  )
  model = spec.model.build_eval()
  return model.init(jax.random.key(1), jnp.zeros(shape))['params']


def _save_params(workdir, params, step):
  """A checkpoint of `params` at `step`, as training writes one."""
  ckpt = checkpoints.Checkpointer(workdir, 1, asynchronous=False)
  ckpt.maybe_save(step, {'params': params}, force=True)
  ckpt.close()


def _map_agreement(maps, top1):
  """(agreeing, matched) patch pairs, counted from routing-map data."""
  agree = pairs = 0
  for i in range(maps.shape[0]):
    for v in range(2):
      for k, m in enumerate(maps[i, v]):
        if m >= 0:
          pairs += 1
          agree += int(top1[i, v, k] == top1[i, 1 - v, m])
  return agree, pairs


@pytest.mark.slow
def test_routing_map_views_are_the_evaluation_views():
  """Test images 4..7: the map's views are the evaluation's views of those
  positions, and the agreement the map shows is the evaluation's."""
  spec = config_lib.resolve(_smoke(), jax.device_count())
  eval_model = spec.model.build_eval()
  params = _init_params(spec, 1)
  views_key = streams.stream(spec.seed, 'eval_views')
  test_ds = spec.test_data.load()
  batches = iter(test_ds.eval_batches(4))
  next(batches)
  batch = next(batches)
  np.testing.assert_array_equal(batch['index'], [4, 5, 6, 7])
  fn = jax.jit(
    figures.make_routing_map_fn(eval_model, spec.model, spec.views, views_key)
  )
  out = figures.routing_map_data(fn, params, batch, 4)
  images, index, mask = (
    jnp.asarray(batch[k]) for k in ('image', 'index', 'mask')
  )
  views, maps = core.evaluation_views(
    views_key, images, index, mask, spec.views
  )
  # Compiled with the model, not alone: equal up to float rounding.
  np.testing.assert_allclose(out['views'], views, atol=1e-5)
  np.testing.assert_array_equal(out['maps'], maps)
  # Keyed by position: the same images at positions 0..3 look different.
  other, _ = core.evaluation_views(
    views_key, images, index - 4, mask, spec.views
  )
  assert np.abs(out['views'] - np.asarray(other)).max() > 0.1
  step = jax.jit(
    accuracy.make_eval_step(eval_model, spec.model, spec.views, views_key)
  )
  sums = step(params, images, jnp.asarray(batch['label']), mask, index)
  agree, pairs = _map_agreement(out['maps'], out['top1'][1])
  assert 0 < agree < pairs
  assert (agree, pairs) == (
    int(sums['routing/encoderblock_1/agree']),
    int(sums['routing/encoderblock_1/pairs']),
  )


def _image_folder(root):
  """{train,test}/c{0..3}: two RGB PNGs per class, of several sizes."""
  rng = np.random.default_rng(0)
  for split in ('train', 'test'):
    for c in range(4):
      for i, (h, w) in enumerate(((20, 28), (12, 12))):
        path = os.path.join(root, split, f'c{c}', f'{i}.png')
        os.makedirs(os.path.dirname(path), exist_ok=True)
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path)
  return str(root)


@pytest.fixture(scope='module')
def folder_analysis(tmp_path_factory):
  """analyze on a checkpoint of a config whose folder blocks set no
  image_size; returns (summary, what plot_routing_maps was given)."""
  tmp = tmp_path_factory.mktemp('folder_analysis')
  root = _image_folder(tmp / 'images')
  config = _smoke(
    **{
      'dataset.train': {
        'name': 'folder',
        'data_dir': root,
        'split': 'train',
        'batch_size': 8,
      },
      'dataset.test': {
        'name': 'folder',
        'data_dir': root,
        'split': 'test',
        'batch_size': 16,
      },
    }
  )
  spec = config_lib.validate(config, jax.device_count())
  workdir = str(tmp / 'run')
  _save_params(workdir, _init_params(spec, 3), step=3)
  drawn = {}
  draw = figures.plot_routing_maps

  def capture(images, data, *args, **kwargs):
    drawn.update(images=images, data=data)
    return draw(
      images[:1],
      {
        'views': data['views'][:1],
        'maps': data['maps'][:1],
        'top1': {b: t[:1] for b, t in data['top1'].items()},
      },
      *args,
      **kwargs,
    )

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(figures, 'plot_routing_maps', capture)
    summary = analyze.analyze(config, workdir, str(tmp / 'out'), num_images=8)
  return summary, drawn


@pytest.mark.slow
def test_analyze_reads_a_folder_test_split_at_the_augmentation_size(
  folder_analysis,
):
  summary, drawn = folder_analysis
  assert summary['num_examples'] == 8 and summary['step'] == 3
  # The test images are read at augment.size (16), as training reads them.
  assert drawn['images'].shape == (8, 16, 16, 3)
  assert drawn['data']['views'].shape == (8, 2, 16, 16, 3)
  assert 'routing_maps.png' in summary['files']


@pytest.mark.slow
def test_routing_maps_of_the_whole_test_split_agree_as_the_evaluation(
  folder_analysis,
):
  """Maps of every test image: the agreement they show is the one
  run_evaluation reports."""
  summary, drawn = folder_analysis
  data = drawn['data']
  agree, pairs = _map_agreement(data['maps'], data['top1'][1])
  routing = summary['routing']['encoderblock_1']
  assert pairs == routing['pairs']
  assert agree / pairs == pytest.approx(routing['agreement'], abs=1e-12)


# ----------------------------------------------------------------------------
# The error rule: one line, exit status 2.
# ----------------------------------------------------------------------------
def test_analyze_errors_are_one_line_with_status_2(tmp_path):
  """The command as a process (the default run's real process of analyze),
  on a workdir without checkpoints: it gets as far as loading."""
  empty = tmp_path / 'empty'
  os.makedirs(empty)
  proc = commands.run(
    commands.module(
      'vmoe_jsd.analyze', f'--config={commands.SMOKE}', f'--workdir={empty}'
    )
  )
  assert proc.returncode == 2, proc.stderr[-3000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1, proc.stderr[-3000:]
  assert lines[0].startswith(f'vmoe_jsd.analyze: error: --workdir={empty}: ')
  assert not os.path.exists(empty / 'analysis')


@pytest.mark.parametrize(
  'case',
  ['bad_value', 'unknown_key', 'no_moe', 'missing_workdir'],
)
def test_analyze_checks_its_flags_in_one_line(tmp_path, case):
  """What analyze.main checks before it loads anything, in its order (its
  one-line exit is the test above's)."""
  empty = tmp_path / 'empty'
  os.makedirs(empty)
  overrides, workdir, message = {
    'bad_value': (
      ['--config.model.hidden_size=0'],
      empty,
      'config.model.hidden_size=0 is invalid',
    ),
    'unknown_key': (
      ['--config.consistency.wieght=1'],
      empty,
      "config has no key 'consistency.wieght'",
    ),
    'no_moe': (
      ['--config.model.encoder.moe.layers=()', '--config.consistency.weight=0'],
      empty,
      'analyze needs a model with MoE layers',
    ),
    'missing_workdir': (
      [],
      f'{tmp_path}/nope',
      f'--workdir={tmp_path}/nope does not exist',
    ),
  }[case]
  with pytest.raises(cli.CliError) as e:
    config = cli.load_config(['analyze', f'--config={SMOKE}', *overrides])
    analyze.check_workdir(cli.check_config(config, 1), str(workdir))
  assert message in str(e.value) and '\n' not in str(e.value)
  assert not os.path.exists(empty / 'analysis')


def test_analyze_of_a_workdir_without_checkpoint_raises_one_line(tmp_path):
  with pytest.raises(analyze.CheckpointError) as e:
    analyze.analyze(_smoke(), str(tmp_path), str(tmp_path / 'out'))
  assert str(e.value).startswith(f'--workdir={tmp_path}: ')
  assert '\n' not in str(e.value)


def test_expert_by_class_table_gives_each_class_its_shares():
  counts = {1: np.array([[3.0, 1.0], [0.0, 0.0]]), 3: np.array([[0.0, 2.0]])}
  assert experts.table(counts).splitlines() == [
    'encoderblock_1: top-1 share per class (rows)',
    '  0.75 0.25',
    '  0.00 0.00',  # A class with no tokens: no division by zero.
    'encoderblock_3: top-1 share per class (rows)',
    '  0.00 1.00',
  ]

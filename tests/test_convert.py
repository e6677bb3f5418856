"""Tests for convert: orbax <-> vmoe round trips, the fixture, the CLI."""

import json
import os

import commands
import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vmoe_jsd import checkpoints, convert, initialization
from vmoe_jsd.models import from_vmoe_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE_DIR = os.path.join(REPO, 'tests', 'data', 'vmoe_parity')


@flax.struct.dataclass
class _TrainState:
  """The layout of train.TrainState: what our checkpoints hold."""

  step: jax.Array
  params: dict
  opt_state: optax.OptState


def _params(seed: int) -> dict:
  rng = np.random.default_rng(seed)
  shapes = {
    'Encoder/encoderblock_0/Moe/Mlp/Dense_0/kernel': (4, 8, 12),
    'Encoder/encoderblock_0/Moe/Router/dense/kernel': (8, 4),
    'Encoder/posembed_input/pos_embedding': (1, 5, 8),
    'cls': (1, 1, 8),
    'head/bias': (3,),
  }
  flat = {
    n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()
  }
  flat['head/bias'] = flat['head/bias'].astype(jnp.bfloat16)
  return checkpoints.unflatten_tree(flat)


def _write_workdir(workdir: str) -> dict[int, dict]:
  """Two steps of a train state; returns the params of each."""
  saver = checkpoints.Checkpointer(workdir, every_steps=1, keep_last=3)
  saved = {}
  tx = optax.adam(1e-3)
  for step in (3, 5):
    params = jax.tree_util.tree_map(jnp.asarray, _params(step))
    state = _TrainState(jnp.int32(step), params, tx.init(params))
    assert saver.maybe_save(step, state)
    saved[step] = params
  saver.close()
  return saved


def _assert_bitwise_trees(a, b) -> None:
  flat_a, flat_b = checkpoints.flatten_tree(a), checkpoints.flatten_tree(b)
  assert sorted(flat_a) == sorted(flat_b)
  for name, x in flat_a.items():
    x, y = np.asarray(x), np.asarray(flat_b[name])
    assert (x.dtype, x.shape) == (y.dtype, y.shape), name
    assert x.tobytes() == y.tobytes(), name


def test_orbax_vmoe_orbax_round_trip_is_bitwise(tmp_path):
  workdir = str(tmp_path / 'workdir')
  saved = _write_workdir(workdir)

  # orbax -> vmoe through the command line, once: the entry point works.
  prefix = str(tmp_path / 'vmoe' / 'ckpt')
  result = commands.run(
    commands.module(
      'vmoe_jsd.convert',
      f'--input={workdir}',
      f'--output={prefix}',
      '--num_shards=2',
    ),
    timeout=120,
  )
  assert result.returncode == 0, result.stderr
  assert 'orbax -> vmoe (step 5): wrote 5 arrays, 467 parameters, 3 files' in (
    result.stdout
  )
  assert prefix + '.data-00001-of-00002' in result.stdout
  _assert_bitwise_trees(checkpoints.read_vmoe_checkpoint(prefix), saved[5])

  # vmoe -> orbax, then every way of naming an orbax checkpoint.
  out = str(tmp_path / 'orbax')
  summary = convert.convert(prefix + '.index', out)
  assert summary['direction'] == 'vmoe -> orbax'
  assert (summary['num_arrays'], summary['num_params']) == (5, 467)
  assert os.path.join(out, 'state', '_METADATA') in summary['files']
  for path in (out, os.path.join(out, 'state')):
    params, info = checkpoints.read_orbax_params(path)
    _assert_bitwise_trees(params, saved[5])
    assert info['step'] is None
  for path, step in (
    (workdir, 5),
    (os.path.join(workdir, 'checkpoints'), 5),
    (os.path.join(workdir, 'checkpoints', '3'), 3),
  ):
    params, info = checkpoints.read_orbax_params(path)
    _assert_bitwise_trees(params, saved[step])
    assert info['step'] == step


def test_converted_checkpoint_initialises_a_model(tmp_path):
  workdir = str(tmp_path / 'workdir')
  saved = _write_workdir(workdir)
  prefix = str(tmp_path / 'ckpt')
  convert.convert(workdir, prefix)
  out = str(tmp_path / 'orbax')
  convert.convert(prefix, out)
  target = jax.tree_util.tree_map(np.zeros_like, _params(0))
  params, report = initialization.load_initial_params(
    {'source': 'orbax', 'path': out, 'keep_head': True}, target
  )
  _assert_bitwise_trees(params, saved[5])
  assert report['fresh'] == [] and report['source'] == 'orbax'


def test_fixture_to_orbax_initialises_the_fixture_model(tmp_path):
  with open(os.path.join(FIXTURE_DIR, 'config.json')) as f:
    config = json.load(f)
  image_size = config.pop('image_size')
  # Set as vmoe does; it only decides the buffers, not the params.
  capacity_factor = config.pop('eval_capacity_factors')[0]
  config['encoder']['moe']['router']['dispatcher']['capacity_factor'] = (
    capacity_factor
  )
  model = from_vmoe_config(config, deterministic=True)
  target = jax.eval_shape(
    lambda: model.init(
      {'params': jax.random.key(0)},
      jnp.zeros((2, image_size, image_size, 3)),
    )['params']
  )
  out = str(tmp_path / 'orbax')
  summary = convert.convert(os.path.join(FIXTURE_DIR, 'checkpoint'), out)
  params, report = initialization.load_initial_params(
    {'source': 'orbax', 'path': out, 'keep_head': True}, target
  )
  assert report['fresh'] == [] and report['resized'] == []
  with np.load(os.path.join(FIXTURE_DIR, 'params.npz')) as npz:
    want = checkpoints.unflatten_tree({n: npz[n] for n in npz.files})
  _assert_bitwise_trees(params, want)
  assert summary['num_arrays'] == len(checkpoints.flatten_tree(want))


def test_errors(tmp_path, capsys):
  missing = str(tmp_path / 'missing')
  with pytest.raises(FileNotFoundError, match='missing'):
    convert.convert(missing, str(tmp_path / 'out'))
  assert convert.main([f'--input={missing}', '--output=x']) == 2
  assert 'Input not found' in capsys.readouterr().err

  (tmp_path / 'empty').mkdir()
  with pytest.raises(ValueError, match='Cannot recognise the format'):
    convert.convert(str(tmp_path / 'empty'), str(tmp_path / 'out'))

  prefix = str(tmp_path / 'ckpt')
  checkpoints.write_vmoe_checkpoint(prefix, _params(0))
  with pytest.raises(ValueError, match='applies to vmoe outputs'):
    convert.convert(prefix, str(tmp_path / 'out'), num_shards=2)
  with pytest.raises(ValueError, match='exists; not overwriting'):
    convert.convert(prefix, str(tmp_path / 'empty'))

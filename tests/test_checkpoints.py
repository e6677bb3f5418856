"""Checkpoints: asynchronous saves, and resuming past damaged checkpoints.

The damage cases are those a preempted or crashed writer, or a bad disk,
leave behind: a truncated file, a deleted file, a half-written step folder.
Each must be reported (step and error), left in place, and skipped in favour
of the previous good checkpoint; with no good one the run must stop rather
than start from scratch.
"""

import os
import pathlib
import shutil
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import smoke_config
from orbax.checkpoint._src.path import atomicity

from vmoe_jsd import checkpoints, train


def _state(step):
  return {
    'params': {'w': jnp.arange(300.0).reshape(10, 30) + step},
    'count': jnp.int32(step),
  }


def _abstract():
  return jax.eval_shape(lambda: _state(0))


def _save_steps(workdir, steps, asynchronous=True):
  ckpt = checkpoints.Checkpointer(
    workdir, every_steps=1, keep_last=5, asynchronous=asynchronous
  )
  for step in steps:
    assert ckpt.maybe_save(step, _state(step))
  ckpt.close()


def _truncate(folder):
  # Cut every array data file (OCDBT's d/ folders) to half its size.
  data = [
    p
    for p in pathlib.Path(folder, 'state').rglob('*')
    if p.is_file() and p.parent.name == 'd'
  ]
  assert data
  for path in data:
    with open(path, 'r+b') as f:
      f.truncate(path.stat().st_size // 2)
  return data[0]


def _delete_metadata(folder):
  path = pathlib.Path(folder, 'state', '_METADATA')
  path.unlink()
  return path


def _half_written(folder):
  # What a writer killed mid-way on a store without atomic renames leaves:
  # the step folder with part of its files.
  for path in pathlib.Path(folder, 'state').rglob('*'):
    if path.is_file() and path.name != '_METADATA':
      path.unlink()
  return folder


@pytest.mark.parametrize('damage', [_truncate, _delete_metadata, _half_written])
def test_damaged_latest_is_reported_kept_and_skipped(tmp_path, damage):
  workdir = str(tmp_path)
  _save_steps(workdir, [2, 4])
  step4 = os.path.join(workdir, 'checkpoints', '4')
  damage(step4)
  before = sorted(str(p) for p in pathlib.Path(step4).rglob('*'))

  messages = []
  ckpt = checkpoints.Checkpointer(workdir, every_steps=1, log=messages.append)
  state, step = ckpt.restore_latest(_abstract())
  assert step == 2
  np.testing.assert_array_equal(state['params']['w'], _state(2)['params']['w'])
  assert int(state['count']) == 2
  (message,) = messages
  assert 'step 4' in message and 'Trying step 2' in message
  assert set(ckpt.damaged) == {4}
  # Left in place, untouched.
  assert before and (
    sorted(str(p) for p in pathlib.Path(step4).rglob('*')) == before
  )

  # Reaching step 4 again: the damaged folder is set aside, not overwritten.
  assert ckpt.maybe_save(4, _state(4))
  ckpt.close()
  names = sorted(os.listdir(os.path.join(workdir, 'checkpoints')))
  assert names == ['2', '4', '4.damaged']
  again = checkpoints.Checkpointer(workdir, every_steps=1)
  state, step = again.restore_latest(_abstract())
  assert step == 4 and int(state['count']) == 4
  again.close()


def test_no_readable_checkpoint_stops_with_message(tmp_path):
  workdir = str(tmp_path)
  _save_steps(workdir, [2, 4])
  _truncate(os.path.join(workdir, 'checkpoints', '4'))
  _delete_metadata(os.path.join(workdir, 'checkpoints', '2'))
  ckpt = checkpoints.Checkpointer(workdir, every_steps=1, log=lambda m: None)
  with pytest.raises(checkpoints.NoUsableCheckpointError) as info:
    ckpt.restore_latest(_abstract())
  text = str(info.value)
  assert 'step 4:' in text and 'step 2:' in text
  assert 'Not starting from scratch' in text
  # Nothing was deleted.
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['2', '4']


def test_empty_workdir_restores_nothing(tmp_path):
  ckpt = checkpoints.Checkpointer(str(tmp_path), every_steps=1)
  assert ckpt.restore_latest(_abstract()) == (None, None)


@pytest.mark.parametrize('asynchronous', [True, False])
def test_saves_restore_exactly(tmp_path, asynchronous):
  _save_steps(str(tmp_path), [1, 2, 3], asynchronous=asynchronous)
  ckpt = checkpoints.Checkpointer(str(tmp_path), every_steps=1, keep_last=5)
  assert ckpt.all_steps() == [1, 2, 3]
  for step in (1, 2, 3):
    state = ckpt.restore(step, _abstract())
    np.testing.assert_array_equal(
      state['params']['w'], np.arange(300.0).reshape(10, 30) + step
    )


def test_async_save_does_not_block_on_writing(tmp_path, monkeypatch):
  """`maybe_save` returns before the files are written; `wait` finishes."""
  release = threading.Event()
  original = atomicity.AtomicRenameTemporaryPath.finalize

  async def slow_finalize(self, *args, **kwargs):
    release.wait(timeout=60)  # Blocks orbax's background thread only.
    return await original(self, *args, **kwargs)

  monkeypatch.setattr(
    atomicity.AtomicRenameTemporaryPath, 'finalize', slow_finalize
  )
  ckpt = checkpoints.Checkpointer(str(tmp_path), every_steps=1)
  assert ckpt.maybe_save(1, _state(1))
  # The save has returned, but the step is not committed yet.
  assert not os.path.isdir(os.path.join(str(tmp_path), 'checkpoints', '1'))
  release.set()
  ckpt.wait()
  assert os.path.isdir(os.path.join(str(tmp_path), 'checkpoints', '1'))
  ckpt.close()


@pytest.mark.slow
def test_training_resumes_from_previous_checkpoint_past_truncated_one(
  tmp_path, reference
):
  """End to end: the last checkpoint of a finished run (conftest's
  `reference`: checkpoints 4 and 6) is truncated; the next run reports it,
  resumes from the one before and redoes the steps."""
  config = smoke_config.with_overrides(
    smoke_config.get_config(), **smoke_config.REFERENCE
  )
  workdir = str(shutil.copytree(reference.workdir, tmp_path / 'run'))
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['4', '6']
  _truncate(os.path.join(workdir, 'checkpoints', '6'))
  with open(os.path.join(workdir, 'train_history.jsonl')) as f:
    first = [line for line in f if line.strip()]
  # A finished workdir is left alone unless asked to evaluate again.
  result = train.train_and_evaluate(config, workdir, reevaluate=True)
  assert result['step'] == 6
  names = sorted(os.listdir(os.path.join(workdir, 'checkpoints')))
  assert names == ['4', '6', '6.damaged']
  with open(os.path.join(workdir, 'train_history.jsonl')) as f:
    lines = [line for line in f if line.strip()]
  # Steps 5 and 6 were trained again after resuming from 4; their first
  # rows were dropped on resume, so no step appears twice.
  assert len(lines) == len(first)


@pytest.mark.parametrize('damage', [_truncate, _delete_metadata, _half_written])
def test_reading_params_for_evaluation_skips_a_damaged_latest(tmp_path, damage):
  """eval_main/convert/initialization read params through read_orbax_params:
  from a workdir it falls back to the newest readable step, says why, and
  leaves the damaged one in place; an explicit damaged step is an error."""
  workdir = str(tmp_path)
  _save_steps(workdir, [2, 4])
  step4 = os.path.join(workdir, 'checkpoints', '4')
  damage(step4)
  before = sorted(str(p) for p in pathlib.Path(step4).rglob('*'))
  for path in (workdir, os.path.join(workdir, 'checkpoints')):
    params, info = checkpoints.read_orbax_params(path)
    assert info['step'] == 2 and set(info['skipped']) == {4}
    np.testing.assert_array_equal(params['w'], _state(2)['params']['w'])
  assert sorted(str(p) for p in pathlib.Path(step4).rglob('*')) == before
  if damage is _truncate:  # Named explicitly: an error, not step 2.
    with pytest.raises(Exception):  # noqa: B017, PT011 - orbax's own.
      checkpoints.read_orbax_params(step4)
  _truncate(os.path.join(workdir, 'checkpoints', '2'))
  with pytest.raises(ValueError, match='None of the checkpoints') as info:
    checkpoints.read_orbax_params(workdir)
  assert 'step 2:' in str(info.value) and 'step 4:' in str(info.value)

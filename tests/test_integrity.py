"""Checkpoint integrity: checksums, finiteness, and the NaN policy's update.

orbax and tensorstore keep no checksum of the data: a flipped bit inside a
data file used to restore silently. Every case here must be detected and
handled like any other damaged step: one line naming the step (and the
array), the files left in place, the previous step restored. The checksum
of every array is compared with an independent one, `google_crc32c` of the
whole array's bytes, whatever the sharding.
"""

import json
import os
import pathlib
import sys
import types

import google_crc32c
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from vmoe_jsd import checkpoints, resilience, run_files
from vmoe_jsd import step as step_lib

RNG = np.random.default_rng(0)
# Random float32 data does not compress: almost every byte of the data file
# is an array byte, so a flip anywhere changes an element (or the framing).
KERNEL = RNG.normal(size=(64, 96)).astype(np.float32)


def _state(step):
  return {
    'params': {'w': jnp.asarray(KERNEL) + step, 'b': jnp.zeros(7) + step},
    'opt_state': {'mu': jnp.asarray(KERNEL[:8]) * step},
    'count': jnp.int32(step),
  }


def _abstract():
  return jax.eval_shape(lambda: _state(0))


def _save(workdir, steps):
  ckpt = checkpoints.Checkpointer(workdir, every_steps=1, keep_last=5)
  for step in steps:
    assert ckpt.maybe_save(step, _state(step))
  ckpt.close()


def _data_file(workdir, step):
  """The largest array data file of `step` (OCDBT's d/ folders)."""
  files = [
    p
    for p in pathlib.Path(workdir, 'checkpoints', str(step), 'state').rglob('*')
    if p.is_file() and p.parent.name == 'd'
  ]
  return max(files, key=lambda p: p.stat().st_size)


def _restore(workdir):
  messages = []
  ckpt = checkpoints.Checkpointer(workdir, every_steps=1, log=messages.append)
  state, step = ckpt.restore_latest(_abstract())
  ckpt.close()
  return state, step, messages


def _assert_fell_back_to_2(workdir, state, step, messages):
  assert step == 2
  np.testing.assert_array_equal(state['params']['w'], KERNEL + 2)
  (message,) = messages
  assert '\n' not in message
  assert message.startswith('WARNING: checkpoint at step 4')
  assert 'Trying step 2' in message
  names = sorted(os.listdir(os.path.join(workdir, 'checkpoints')))
  assert names == ['2', '4']  # Left in place.


# ----------------------------------------------------------------------------
# The checksum against an independent one.
# ----------------------------------------------------------------------------
def test_crc32c_combine_matches_crc_of_concatenation():
  data = RNG.integers(0, 256, 10_000, dtype=np.uint8).tobytes()
  for cut in (0, 1, 7, 4096, 9_999, 10_000):
    a, b = data[:cut], data[cut:]
    got = checkpoints.crc32c_combine(
      google_crc32c.value(a), google_crc32c.value(b), len(b)
    )
    assert got == google_crc32c.value(data)


def test_crc32c_combine_of_pieces_of_512_mib_and_more():
  """Shifting a CRC by 2^(k+1) bytes is shifting it twice by 2^k, for
  pieces up to 2^46 bytes (with the test above, by induction, the right
  shift for every length). zlib's table of x^(2^k) wraps after 32 entries,
  which holds for its polynomial only: for CRC-32C's, x^(2^31) = x, and the
  wrap gave wrong sums for pieces of 2^29 bytes (512 MiB) or more."""
  crc = 0x12345678

  def shift(c, n):
    return checkpoints.crc32c_combine(c, 0, n)

  for k in range(46):
    assert shift(shift(crc, 2**k), 2**k) == shift(crc, 2 ** (k + 1)), k


@pytest.mark.parametrize(
  'spec',
  [(), ('x',), (None, 'y'), ('x', 'y'), (('x', 'y'),), ('y', None, 'x')],
)
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16, jnp.int32])
def test_checksum_of_sharded_array_is_crc32c_of_its_bytes(spec, dtype):
  auto = (jax.sharding.AxisType.Auto,) * 2
  mesh = jax.make_mesh((2, 4), ('x', 'y'), axis_types=auto)
  shape = (8, 12, 4) if len(spec) == 3 else (8, 12)
  value = RNG.normal(size=shape).astype(dtype)
  x = jax.device_put(value, NamedSharding(mesh, PartitionSpec(*spec)))
  checksums, non_finite = checkpoints.integrity_summary({'a': x})
  assert checksums == {'a': f'{google_crc32c.value(value.tobytes()):08x}'}
  assert non_finite == []


def test_saved_record_holds_crc32c_of_every_array(tmp_path):
  _save(str(tmp_path), [3])
  record = run_files.read_json(
    tmp_path / 'checkpoints' / '3' / checkpoints.INTEGRITY_ITEM / 'metadata'
  )
  state = _state(3)
  want = {
    'params/w': state['params']['w'],
    'params/b': state['params']['b'],
    'opt_state/mu': state['opt_state']['mu'],
    'count': state['count'],
  }
  assert record['checksums'] == {
    k: f'{google_crc32c.value(np.asarray(v).tobytes()):08x}'
    for k, v in want.items()
  }


def test_restore_onto_another_sharding_checks_the_same_checksums(tmp_path):
  """Saved sharded over rows, restored sharded over columns: verified (the
  checksum is of the whole array, whatever the sharding)."""
  mesh = jax.make_mesh((8,), ('x',), axis_types=(jax.sharding.AxisType.Auto,))
  rows = NamedSharding(mesh, PartitionSpec('x'))
  cols = NamedSharding(mesh, PartitionSpec(None, 'x'))
  ckpt = checkpoints.Checkpointer(str(tmp_path), every_steps=1)
  ckpt.maybe_save(1, {'w': jax.device_put(KERNEL, rows)})
  ckpt.close()
  messages = []
  ckpt = checkpoints.Checkpointer(str(tmp_path), 1, log=messages.append)
  target = {
    'w': jax.ShapeDtypeStruct(KERNEL.shape, KERNEL.dtype, sharding=cols)
  }
  state, step = ckpt.restore_latest(target)
  ckpt.close()
  assert step == 1 and messages == []
  assert state['w'].sharding == cols
  np.testing.assert_array_equal(state['w'], KERNEL)


def test_checksum_detects_every_single_bit_flip_of_an_array():
  value = RNG.normal(size=(3, 5)).astype(np.float32)
  (base,) = checkpoints.integrity_summary([jnp.asarray(value)])[0].values()
  words = value.view(np.uint32).reshape(-1)
  for i in range(words.size):
    for bit in range(32):
      flipped = words.copy()
      flipped[i] ^= np.uint32(1 << bit)
      x = jnp.asarray(flipped.view(np.float32).reshape(value.shape))
      (crc,) = checkpoints.integrity_summary([x])[0].values()
      assert crc != base, (i, bit)


# ----------------------------------------------------------------------------
# Damaged data on disk.
# ----------------------------------------------------------------------------
def _flip_one_bit(workdir, step, fraction):
  """Saves steps 2 and 4, then flips one bit of `step`'s data file."""
  _save(workdir, [2, 4])
  path = _data_file(workdir, step)
  data = bytearray(path.read_bytes())
  offset = int(len(data) * fraction)
  data[offset] ^= 1 << (offset % 8)
  path.write_bytes(bytes(data))


@pytest.mark.parametrize('fraction', [0.1, 0.3, 0.5, 0.7, 0.85])
def test_one_flipped_bit_in_a_data_file_falls_back(tmp_path, fraction):
  workdir = str(tmp_path)
  _flip_one_bit(workdir, 4, fraction)
  _assert_fell_back_to_2(workdir, *_restore(workdir))


def test_4kib_of_random_bytes_in_a_data_file_falls_back(tmp_path):
  workdir = str(tmp_path)
  _save(workdir, [2, 4])
  path = _data_file(workdir, 4)
  data = bytearray(path.read_bytes())
  assert len(data) > 3 * 4096
  data[4096:8192] = RNG.integers(0, 256, 4096, dtype=np.uint8).tobytes()
  path.write_bytes(bytes(data))
  _assert_fell_back_to_2(workdir, *_restore(workdir))


def test_mismatch_names_the_step_and_the_array(tmp_path, monkeypatch):
  """Data that reads without error but differs: the line names the array."""
  workdir = str(tmp_path)
  _save(workdir, [2, 4])
  original = checkpoints.Checkpointer._read

  def read_changed(self, step, abstract_state):
    state, record = original(self, step, abstract_state)
    if step == 4:
      w = np.array(state['params']['w'])
      w[5, 7] = np.nextafter(w[5, 7], np.float32(np.inf))  # One ulp.
      state['params']['w'] = jnp.asarray(w)
    return state, record

  monkeypatch.setattr(checkpoints.Checkpointer, '_read', read_changed)
  state, step, messages = _restore(workdir)
  _assert_fell_back_to_2(workdir, state, step, messages)
  assert 'checksum mismatch in params/w:' in messages[0]


def _read_params(path):
  params, info = checkpoints.read_orbax_params(path)
  return params, info['step'], info['skipped']


def test_params_read_for_initialization_are_verified(tmp_path):
  """read_orbax_params (initialization from our checkpoints, convert)
  checks the params it reads against the step's saved checksums: a wrong
  one is a damaged step, skipped for a workdir and an error for the step."""
  workdir = str(tmp_path)
  _save(workdir, [2, 4])
  params, step, skipped = _read_params(workdir)  # Intact: the newest.
  assert step == 4 and not skipped
  np.testing.assert_array_equal(params['w'], KERNEL + 4)
  meta = pathlib.Path(workdir, 'checkpoints', '4', 'integrity', 'metadata')
  record = json.loads(meta.read_text())
  saved = record['checksums']['params/w']
  record['checksums']['params/w'] = f'{int(saved, 16) ^ 1:08x}'
  meta.write_text(json.dumps(record))
  params, step, skipped = _read_params(workdir)
  assert step == 2 and 'checksum mismatch in params/w' in skipped[4]
  np.testing.assert_array_equal(params['w'], KERNEL + 2)
  with pytest.raises(checkpoints.IntegrityError, match='params/w'):
    _read_params(os.path.join(workdir, 'checkpoints', '4'))


@pytest.mark.parametrize('fraction', [0.1, 0.3, 0.5, 0.7, 0.85])
def test_params_read_from_a_flipped_bit_are_never_wrong(tmp_path, fraction):
  """A flipped bit where the params lie makes the step unreadable; one in
  bytes that a params-only read skips (the optimizer state, framing it
  does not use) leaves them exactly as saved. Never wrong params."""
  workdir = str(tmp_path)
  _flip_one_bit(workdir, 4, fraction)
  params, step, skipped = _read_params(workdir)
  assert step in (2, 4)
  assert (4 in skipped) == (step == 2)
  np.testing.assert_array_equal(params['w'], KERNEL + step)
  np.testing.assert_array_equal(params['b'], np.zeros(7) + step)


def test_state_saved_with_nan_is_rejected(tmp_path):
  workdir = str(tmp_path)
  _save(workdir, [2])
  bad = _state(4)
  bad['opt_state']['mu'] = bad['opt_state']['mu'].at[1, 2].set(jnp.nan)
  ckpt = checkpoints.Checkpointer(workdir, every_steps=1)
  with pytest.raises(FloatingPointError, match='step 4: opt_state/mu holds'):
    ckpt.maybe_save(4, bad)  # Never saved by the Checkpointer ...
  # ... but written by other code, with checksums that match it.
  record = checkpoints.integrity_record(checkpoints.integrity_summary(bad)[0])
  ckpt._manager.save(
    4,
    args=ocp.args.Composite(
      state=ocp.args.StandardSave(bad), integrity=ocp.args.JsonSave(record)
    ),
  )
  ckpt.close()
  state, step, messages = _restore(workdir)
  _assert_fell_back_to_2(workdir, state, step, messages)
  assert 'opt_state/mu holds NaN or Inf' in messages[0]


def test_old_checkpoint_without_checksums_restores_with_a_note(tmp_path):
  ckpt = checkpoints.Checkpointer(str(tmp_path), every_steps=1)
  ckpt._manager.save(
    5, args=ocp.args.Composite(state=ocp.args.StandardSave(_state(5)))
  )
  ckpt.close()
  state, step, messages = _restore(str(tmp_path))
  assert step == 5
  np.testing.assert_array_equal(state['params']['w'], KERNEL + 5)
  (note,) = messages
  assert note.startswith('Note: the checkpoint at step 5 has no checksums')


def test_both_damaged_stop_with_one_line(tmp_path):
  workdir = str(tmp_path)
  _save(workdir, [2, 4])
  for path in pathlib.Path(workdir, 'checkpoints').rglob('*'):
    if path.is_file() and path.parent.name == 'd':  # Every data file.
      path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
  messages = []
  ckpt = checkpoints.Checkpointer(workdir, every_steps=1, log=messages.append)
  with pytest.raises(checkpoints.NoUsableCheckpointError) as info:
    ckpt.restore_latest(_abstract())
  ckpt.close()
  text = str(info.value)
  assert '\n' not in text and 'step 4:' in text and 'step 2:' in text
  assert len(messages) == 2 and not any('\n' in m for m in messages)


def test_closed_event_loop_errors_of_orbax_are_dropped(tmp_path, monkeypatch):
  """After a failed read, tensorstore's late callbacks find orbax's loop
  closed: hundreds of 'Event loop is closed' tracebacks (as many as the
  pending reads, so their number varies). A Checkpointer drops those, and
  only those."""
  seen = []
  monkeypatch.setattr(sys, 'unraisablehook', seen.append)
  checkpoints.Checkpointer(str(tmp_path), every_steps=1).close()

  def unraisable(error, obj=None):
    return types.SimpleNamespace(exc_value=error, object=obj)

  closed = unraisable(RuntimeError('Event loop is closed'))
  orbax_read = types.SimpleNamespace(  # An unawaited read of orbax's.
    cr_code=types.SimpleNamespace(
      co_filename=os.path.join(os.sep, 'x', 'orbax', 'serialization.py')
    )
  )
  ours = types.SimpleNamespace(cr_code=_state.__code__)
  dropped = [closed, closed, unraisable(ValueError('read'), orbax_read)]
  kept = [
    unraisable(RuntimeError('something else')),
    unraisable(ValueError('read'), ours),
  ]
  for u in dropped + kept:
    sys.unraisablehook(u)
  assert seen == kept
  # A second Checkpointer does not wrap the hook again.
  hook = sys.unraisablehook
  checkpoints.Checkpointer(str(tmp_path), every_steps=1).close()
  assert sys.unraisablehook is hook


def test_checkpoints_path_that_is_a_file_is_a_clear_error(tmp_path):
  (tmp_path / 'checkpoints').write_text('not a folder')
  with pytest.raises(run_files.WorkdirError) as info:
    checkpoints.Checkpointer(str(tmp_path), every_steps=1)
  assert str(tmp_path / 'checkpoints') in str(info.value)
  assert 'not a folder' in str(info.value)


# ----------------------------------------------------------------------------
# nan_policy='skip': an update that makes the state non-finite is skipped.
# ----------------------------------------------------------------------------
def test_skip_keeps_the_last_finite_state_under_a_huge_learning_rate():
  """A linear model, Adam at a learning rate near float32's largest value.

  Step 1 moves every weight by -3e38 * sign(x): finite, and its loss is
  finite. Step 2's loss (3e35-ish) and gradients are finite too, but its
  update takes the weights to -6e38 = -inf: it must be skipped, and so
  must step 3, with the state bitwise that of step 1.
  """
  x = jnp.array([1e-3, -1e-3, 2e-3, 5e-4])
  tx = optax.adam(3e38)

  @jax.jit
  def train_step(state):
    loss, grads = jax.value_and_grad(lambda w: jnp.sum(w * x))(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {'total_loss': loss, 'grad_norm': optax.tree.norm(grads)}
    new = step_lib.TrainState(state.step + 1, params, opt_state)
    return resilience.apply_nan_policy('skip', state, new, metrics), metrics

  params = jnp.full(4, 0.5)
  state = step_lib.TrainState(jnp.int32(0), params, tx.init(params))
  history = []
  for _ in range(3):
    state, metrics = train_step(state)
    assert np.isfinite(float(metrics['total_loss']))
    assert np.isfinite(float(metrics['grad_norm']))
    history.append((float(metrics['skipped']), jax.device_get(state)))
  assert [skipped for skipped, _ in history] == [0.0, 1.0, 1.0]
  after_1 = history[0][1]
  g = np.asarray(x, np.float64)  # Adam's first step: m/(sqrt(v) + eps).
  want = 0.5 - 3e38 * g / (np.abs(g) + 1e-8)
  # float32 bias corrections (1 - 0.999 is 1.00005e-3 there): ~1e-5.
  np.testing.assert_allclose(after_1.params, want, rtol=1e-4)
  for _, later in history[1:]:
    jax.tree_util.tree_map(
      np.testing.assert_array_equal,
      (later.params, later.opt_state),
      (after_1.params, after_1.opt_state),
    )
    assert np.all(np.isfinite(later.params))
  assert int(state.step) == 3  # Counted as steps either way.


def test_update_check_is_off_under_stop():
  old = {'w': jnp.ones(2)}
  new = step_lib.TrainState(jnp.int32(1), {'w': jnp.full(2, jnp.inf)}, {})
  metrics = {'total_loss': jnp.float32(1), 'grad_norm': jnp.float32(1)}
  assert resilience.apply_nan_policy('stop', old, new, metrics) is new

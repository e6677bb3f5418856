"""Tests for vmoe_format: vmoe checkpoints, npz trees and tree checks."""

import os
import re
import shutil

import jax
import jax.numpy as jnp
import msgpack
import numpy as np
import pytest

from vmoe_jsd import checkpoints
from vmoe_jsd.checkpoints import vmoe_format, vmoe_msgpack

FIXTURE_DIR = os.path.join(os.path.dirname(__file__), 'data', 'vmoe_parity')
FIXTURE_PREFIX = os.path.join(FIXTURE_DIR, 'checkpoint')
FIXTURE_SHARD = FIXTURE_PREFIX + '.data-00000-of-00001'


def _npz_params() -> dict[str, np.ndarray]:
  with np.load(os.path.join(FIXTURE_DIR, 'params.npz')) as npz:
    return {name: npz[name] for name in npz.files}


def _assert_bitwise_equal(flat_a: dict, flat_b: dict) -> None:
  assert sorted(flat_a) == sorted(flat_b)
  for name in flat_a:
    a, b = np.asarray(flat_a[name]), np.asarray(flat_b[name])
    assert (a.dtype, a.shape) == (b.dtype, b.shape), name
    assert a.tobytes() == b.tobytes(), name


def _copy_fixture(tmp_path) -> str:
  for suffix in ('.index', '.data-00000-of-00001'):
    dst = str(tmp_path / ('checkpoint' + suffix))
    shutil.copyfile(FIXTURE_PREFIX + suffix, dst)
    os.chmod(dst, 0o644)
  return str(tmp_path / 'checkpoint')


def _decode(path: str):
  with open(path, 'rb') as f:
    return msgpack.unpackb(f.read(), ext_hook=vmoe_msgpack.ext_hook)


@pytest.mark.parametrize('suffix', ['', '.index'])
def test_read_fixture_is_bitwise_params_npz(suffix):
  tree = vmoe_format.read_vmoe_checkpoint(FIXTURE_PREFIX + suffix)
  assert isinstance(tree['Encoder'], dict)
  _assert_bitwise_equal(checkpoints.flatten_tree(tree), _npz_params())


def test_read_index_gives_shapes_for_match_tree():
  index = vmoe_format.read_vmoe_index(FIXTURE_PREFIX)
  assert (index['shard_count'], index['version']) == (1, '20220622')
  params = checkpoints.unflatten_tree(_npz_params())
  checkpoints.match_tree(params, index['index'])


@pytest.mark.parametrize('num_shards', [1, 3])
def test_write_then_read_is_bitwise(tmp_path, num_shards):
  params = checkpoints.unflatten_tree(_npz_params())
  prefix = str(tmp_path / 'sub' / 'ckpt')
  paths = vmoe_format.write_vmoe_checkpoint(prefix, params, num_shards)
  assert paths == [prefix + '.index'] + [
    f'{prefix}.data-{i:05d}-of-{num_shards:05d}' for i in range(num_shards)
  ]
  assert not [f for f in os.listdir(tmp_path / 'sub') if f.startswith('.tmp')]
  restored = vmoe_format.read_vmoe_checkpoint(prefix)
  _assert_bitwise_equal(checkpoints.flatten_tree(restored), _npz_params())
  # Whole arrays, spread so that every shard holds some.
  infos = checkpoints.flatten_tree(vmoe_format.read_vmoe_index(prefix)['index'])
  assert all(len(info.shards) == 1 for info in infos.values())
  assert {info.shards[0] for info in infos.values()} == set(range(num_shards))


def test_written_files_match_fixture(tmp_path):
  params = checkpoints.unflatten_tree(_npz_params())
  prefix = str(tmp_path / 'ckpt')
  vmoe_format.write_vmoe_checkpoint(prefix, params, num_shards=1)
  # Decoded first, for a readable diff; then the bytes, which match too.
  assert _decode(prefix + '.index') == _decode(FIXTURE_PREFIX + '.index')
  for suffix in ('.index', '.data-00000-of-00001'):
    with open(prefix + suffix, 'rb') as mine:
      with open(FIXTURE_PREFIX + suffix, 'rb') as theirs:
        assert mine.read() == theirs.read(), suffix


def test_truncated_shard_raises(tmp_path):
  prefix = _copy_fixture(tmp_path)
  shard = prefix + '.data-00000-of-00001'
  with open(shard, 'rb') as f:
    data = f.read()
  with open(shard, 'wb') as f:
    f.write(data[: len(data) // 2])
  with pytest.raises(ValueError, match='truncated or corrupt') as info:
    vmoe_format.read_vmoe_checkpoint(prefix)
  assert 'checkpoint.data-00000-of-00001' in str(info.value)


def test_missing_shard_raises(tmp_path):
  prefix = _copy_fixture(tmp_path)
  os.remove(prefix + '.data-00000-of-00001')
  with pytest.raises(FileNotFoundError, match='data-00000-of-00001'):
    vmoe_format.read_vmoe_checkpoint(prefix)


def test_missing_index_raises(tmp_path):
  with pytest.raises(FileNotFoundError, match=re.escape('nothing.index')):
    vmoe_format.read_vmoe_checkpoint(str(tmp_path / 'nothing'))


def _rewrite_shard(prefix: str, entries: dict) -> None:
  """Replaces shard 0 of 1 with a map of hand-made chunk entries."""
  content = {'__msgpack_array_chunk_a87ca2__': True, **entries}
  with open(prefix + '.data-00000-of-00001', 'wb') as f:
    f.write(msgpack.packb(content))


def _ndarray_ext(x: np.ndarray) -> msgpack.ExtType:
  return msgpack.ExtType(1, msgpack.packb((x.shape, x.dtype.name, x.tobytes())))


def _slice_nd_ext(*slices) -> msgpack.ExtType:
  return msgpack.ExtType(
    6, msgpack.packb(tuple(msgpack.packb(s) for s in slices))
  )


def test_slice_with_wrong_size_raises(tmp_path):
  prefix = str(tmp_path / 'ckpt')
  vmoe_format.write_vmoe_checkpoint(prefix, {'a': {'x': np.zeros(4, 'f4')}})
  short = _ndarray_ext(np.zeros(3, 'f4'))
  _rewrite_shard(prefix, {'0': [[[short], _slice_nd_ext((0, 4, None))]]})
  with pytest.raises(ValueError, match="corrupt.*holds 3 values.*'a/x'"):
    vmoe_format.read_vmoe_checkpoint(prefix)


def test_slice_with_bad_bytes_raises(tmp_path):
  prefix = str(tmp_path / 'ckpt')
  vmoe_format.write_vmoe_checkpoint(prefix, {'x': np.zeros(4, 'f4')})
  bad = msgpack.ExtType(1, msgpack.packb(((4,), 'float32', b'\0' * 15)))
  _rewrite_shard(prefix, {'0': [[[bad], _slice_nd_ext((0, 4, None))]]})
  with pytest.raises(ValueError, match="corrupt.*15 bytes.*'x'"):
    vmoe_format.read_vmoe_checkpoint(prefix)


def test_slices_not_covering_array_raise(tmp_path):
  prefix = str(tmp_path / 'ckpt')
  vmoe_format.write_vmoe_checkpoint(prefix, {'x': np.zeros(4, 'f4'), 'y': 1.0})
  _rewrite_shard(prefix, {})
  with pytest.raises(ValueError, match="corrupt.*lacks.*'x'") as info:
    vmoe_format.read_vmoe_checkpoint(prefix)
  assert 'ckpt.data-00000-of-00001' in str(info.value)


def test_odd_dtypes_and_structures_round_trip(tmp_path):
  tree = {
    'b': {'bf16': jnp.arange(6, dtype=jnp.bfloat16).reshape(2, 3)},
    'scalar': np.float32(2.5),
    'ints': np.arange(5, dtype=np.int8),
    'mask': np.array([True, False]),
    'empty': {},
    7: np.ones((2, 0, 3), np.float16),
  }
  prefix = str(tmp_path / 'ckpt.index')
  vmoe_format.write_vmoe_checkpoint(prefix, tree, num_shards=4)
  restored = vmoe_format.read_vmoe_checkpoint(prefix)
  assert restored['empty'] == {}
  flat = checkpoints.flatten_tree(tree)
  expected = {name: np.asarray(x) for name, x in flat.items()}
  _assert_bitwise_equal(checkpoints.flatten_tree(restored), expected)


def test_write_rejects_bad_input(tmp_path):
  with pytest.raises(ValueError, match='num_shards=0'):
    vmoe_format.write_vmoe_checkpoint(str(tmp_path / 'a'), {}, num_shards=0)
  with pytest.raises(ValueError, match="'x/y'"):
    vmoe_format.write_vmoe_checkpoint(
      str(tmp_path / 'b'), {'x': {'y': np.array(['s'], dtype=object)}}
    )


def test_match_tree_lists_all_differences():
  expected = {
    'a': {'kernel': jax.ShapeDtypeStruct((2, 3), jnp.float32)},
    'b': np.zeros((4,)),
    'c': np.zeros((1,)),
    'z': np.zeros(()),
  }
  loaded = {
    'a': {'kernel': np.zeros((3, 2))},
    'b': np.zeros((4,)),
    'd': np.zeros((1,)),
    'e': {'f': np.zeros(())},
  }
  with pytest.raises(ValueError) as info:
    checkpoints.match_tree(expected, loaded, what='vmoe checkpoint')
  message = str(info.value)
  assert 'missing from the vmoe checkpoint (2):\n    c\n    z' in message
  assert 'unexpected in the vmoe checkpoint (2):\n    d\n    e/f' in message
  assert 'shape mismatches (1):\n    a/kernel: expected (2, 3), got (3, 2)' in (
    message
  )
  checkpoints.match_tree(expected, expected)


def test_match_tree_shows_empty_sections():
  with pytest.raises(
    ValueError, match=r'shape mismatches \(0\):\n    \(none\)'
  ):
    checkpoints.match_tree({'a': np.zeros(1)}, {})


def test_npz_flatten_unflatten_round_trip(tmp_path):
  flat = {
    'Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel': np.ones((2, 3)),
    'Transformer/encoder_norm/bias': np.arange(3.0),
    'head/bias': np.zeros(2, np.float32),
  }
  path = str(tmp_path / 'vit.npz')
  np.savez(path, **flat)
  tree = checkpoints.read_npz_tree(path)
  assert sorted(tree) == ['Transformer', 'head']
  assert sorted(tree['Transformer']) == ['encoder_norm', 'encoderblock_0']
  _assert_bitwise_equal(checkpoints.flatten_tree(tree), flat)
  assert checkpoints.flatten_tree(checkpoints.unflatten_tree(flat)) == flat
  assert checkpoints.unflatten_tree({'a.b': 1}, sep='.') == {'a': {'b': 1}}


def test_unflatten_and_flatten_reject_ambiguous_names():
  with pytest.raises(ValueError, match="'a/b' nests under 'a'"):
    checkpoints.unflatten_tree({'a': 1, 'a/b': 2})
  with pytest.raises(ValueError, match='both a leaf and a subtree'):
    checkpoints.unflatten_tree({'a/b': 2, 'a': 1})
  with pytest.raises(ValueError, match='empty component'):
    checkpoints.unflatten_tree({'/a': 1})
  with pytest.raises(ValueError, match='separator'):
    checkpoints.flatten_tree({'a/b': 1})


def _covers_once(boxes, shape) -> bool:
  """Brute force: count how often each element is covered."""
  count = np.zeros(shape, np.int64)
  for box in boxes:
    count[tuple(slice(a, b) for a, b in box)] += 1
  return bool(np.all(count == 1))


def _guillotine(rng, box, depth):
  """A random exact tiling of `box` by recursive cuts (not always a grid)."""
  sizes = [b - a for a, b in box]
  if depth == 0 or not box or max(sizes) < 2 or rng.random() < 0.2:
    return [box]
  axis = int(rng.choice([i for i, n in enumerate(sizes) if n >= 2]))
  a, b = box[axis]
  cut = int(rng.integers(a + 1, b))
  left = box[:axis] + ((a, cut),) + box[axis + 1 :]
  right = box[:axis] + ((cut, b),) + box[axis + 1 :]
  return _guillotine(rng, left, depth - 1) + _guillotine(rng, right, depth - 1)


def _random_box(rng, shape):
  box = []
  for n in shape:
    a, b = sorted(int(x) for x in rng.integers(0, n + 1, 2))
    box.append((a, b))
  return tuple(box)


def _perturbed(rng, boxes, shape):
  """A tiling with one random change (most no longer tile; some still do,
  e.g. an empty box added)."""
  boxes = list(boxes)
  change = rng.integers(6)
  i = int(rng.integers(len(boxes)))
  if change == 0:
    boxes.pop(i)  # a hole
  elif change == 1:
    boxes.append(boxes[i])  # covered twice
  elif change == 2:
    boxes.append(_random_box(rng, shape))  # often overlaps
  elif change == 3 and shape:
    # Move one face of a box by one: overlap or gap.
    axis = int(rng.integers(len(shape)))
    box = list(boxes[i])
    a, b = box[axis]
    box[axis] = (
      (a, min(b + 1, shape[axis])) if rng.random() < 0.5 else (max(a - 1, 0), b)
    )
    boxes[i] = tuple(box)
  elif change == 4 and len(boxes) >= 2 and shape:
    # One box replaced by a copy of another: an overlap and a hole, of the
    # same total volume when both have the same size (a volume check alone
    # accepts those).
    j = (i + 1) % len(boxes)
    boxes[j] = boxes[i]
  else:
    boxes.append(tuple((a, a) for a, _ in boxes[i]))  # empty: still tiles
  rng.shuffle(boxes)
  return boxes


def test_tiling_check_matches_brute_force_on_random_cases():
  """vmoe_format.boxes_tile (signed corner counts, O(n 2^d)) gives the
  verdict of counting every element (and of the quadratic pairwise overlap
  test it replaced) on random exact tilings, perturbed tilings and random
  boxes of rank 0 to 3."""
  rng = np.random.default_rng(16)
  verdicts = {True: 0, False: 0}
  for case in range(1500):
    rank = int(rng.integers(0, 4))
    shape = tuple(
      int(n) for n in rng.integers(0 if case % 10 == 0 else 1, 7, rank)
    )
    tiling = _guillotine(rng, tuple((0, n) for n in shape), depth=6)
    kind = case % 3
    if kind == 0:
      boxes = tiling
    elif kind == 1:
      boxes = _perturbed(rng, tiling, shape)
    else:
      boxes = [_random_box(rng, shape) for _ in range(rng.integers(1, 6))]
    expected = _covers_once(boxes, shape)
    verdicts[expected] += 1
    assert vmoe_format.boxes_tile(boxes, shape) == expected, (shape, boxes)
  assert min(verdicts.values()) > 300  # both verdicts well exercised


def test_overlapping_slices_of_the_right_volume_are_corrupt(tmp_path):
  """Through the reader: two slices [0, 2) and [0, 2) of a 4-vector have
  the volume of the array (4) but overlap and leave [2, 4) uncovered."""
  prefix = str(tmp_path / 'ckpt')
  vmoe_format.write_vmoe_checkpoint(prefix, {'x': np.zeros(4, 'f4')})
  leaf = vmoe_format.read_vmoe_index(prefix)['index']['x']
  bad = leaf._replace(
    global_slices=[((0, 2, None),), ((0, 2, None),)], shards=[0, 0]
  )
  with pytest.raises(ValueError, match="slices do not tile the shape.*'x'"):
    vmoe_format._check_index_leaf('x', bad, 1, prefix + '.index')
  good = leaf._replace(
    global_slices=[((2, 4, None),), ((0, 2, None),)], shards=[0, 0]
  )
  vmoe_format._check_index_leaf('x', good, 1, prefix + '.index')

"""The named random streams keep the numbers every earlier run used."""

import jax
import numpy as np
import pytest

from vmoe_jsd import streams


def _data(key):
  return np.asarray(jax.random.key_data(key))


@pytest.mark.parametrize('name,number', [
  ('init', 0), ('train', 1), ('eval_views', 2), ('stability_noise', 3),
])  # fmt: skip
def test_stream_is_the_seed_key_folded_with_its_number(name, number):
  want = jax.random.fold_in(jax.random.key(7), number)
  np.testing.assert_array_equal(_data(streams.stream(7, name)), _data(want))


def test_train_step_keys_split_the_step_key_and_fold_mixup():
  root = streams.stream(0, 'train')
  step_key = jax.random.fold_in(root, 5)
  want = [*jax.random.split(step_key, 3), jax.random.fold_in(step_key, 1)]
  got = streams.train_step_keys(root, 5)
  for g, w in zip(got, want, strict=True):
    np.testing.assert_array_equal(_data(g), _data(w))


def test_example_keys_fold_each_position():
  root = streams.stream(0, 'eval_views')
  got = streams.example_keys(root, jax.numpy.array([0, 3, 9]))
  for i, k in zip([0, 3, 9], got, strict=True):
    np.testing.assert_array_equal(_data(k), _data(jax.random.fold_in(root, i)))


def test_unknown_stream_lists_the_names():
  with pytest.raises(ValueError, match="'eval_views', 'init'"):
    streams.stream(0, 'dropout')

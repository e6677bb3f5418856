"""Tree helpers shared by the checkpoint formats and the initialization.

Parameter trees are nested mappings; checkpoints name their arrays by
'/'-joined paths ('Encoder/encoder_norm/bias').
"""

from __future__ import annotations

import collections.abc
from typing import Any

import jax
import numpy as np

from vmoe_jsd import paths, sharding


def flatten_tree(tree: Any, sep: str = '/', *, strict: bool = True) -> dict:
  """{'Encoder/encoder_norm/bias': leaf} of nested mappings, depth first.

  Empty sub-mappings have no leaves and disappear. Keys are made str and
  joined by `sep`. `strict`: ValueError on a key that is empty or contains
  `sep` (its name would not unflatten back to the same tree); False keeps
  them, e.g. for a tree whose keys are already '/'-joined names.
  """
  flat = {}

  def visit(node: Any, path: tuple[str, ...]) -> None:
    if isinstance(node, collections.abc.Mapping):
      for key, value in node.items():
        key = str(key)
        if strict and (not key or sep in key):
          raise ValueError(
            f'Key {key!r} under {sep.join(path) or "the root"!r} is empty '
            f'or contains the separator {sep!r}.'
          )
        visit(value, path + (key,))
    else:
      flat[sep.join(path)] = node

  if not isinstance(tree, collections.abc.Mapping):
    raise ValueError(f'Expected a mapping, got {type(tree).__name__}.')
  visit(tree, ())
  return flat


def unflatten_tree(flat: collections.abc.Mapping, sep: str = '/') -> dict:
  """The nested dict of {'Encoder/encoder_norm/bias': leaf, ...}, keys in
  the order they first appear in `flat`.

  Raises:
    ValueError: if a name has an empty component, or is both a leaf and the
      prefix of another name.
  """
  tree = {}
  for name, value in flat.items():
    keys = name.split(sep)
    if not all(keys):
      raise ValueError(f'Name {name!r} has an empty component.')
    node = tree
    for depth, key in enumerate(keys[:-1]):
      child = node.setdefault(key, {})
      if not isinstance(child, dict):
        prefix = sep.join(keys[: depth + 1])
        raise ValueError(
          f'Name {name!r} nests under {prefix!r}, which is a leaf.'
        )
      node = child
    if keys[-1] in node:
      raise ValueError(f'Name {name!r} is both a leaf and a subtree.')
    node[keys[-1]] = value
  return tree


def read_npz_tree(path: str) -> dict:
  """An .npz file of '/'-joined names (params.npz-style exports, big_vision
  and vision_transformer ViTs) as a nested dict, keys sorted at every level.
  """
  with paths.resolve(path).open('rb') as f:
    with np.load(f, allow_pickle=False) as npz:
      flat = {name: npz[name] for name in sorted(npz.files)}
  return unflatten_tree(flat, sep='/')


def match_tree(expected: Any, loaded: Any, *, what: str = 'checkpoint') -> None:
  """Checks that two trees have the same names and shapes.

  Args:
    expected: Nested mapping whose leaves have a `.shape` (arrays,
      jax.ShapeDtypeStruct, ...), e.g. the parameters a model expects.
    loaded: Nested mapping of arrays, e.g. read from a checkpoint.
    what: What `loaded` is, used in the error message.

  Raises:
    ValueError: if they differ; the message lists, each sorted, the names
      missing from `loaded`, the unexpected names in `loaded`, and the shape
      mismatches.
  """
  flat_expected = flatten_tree(expected)
  flat_loaded = flatten_tree(loaded)
  missing = sorted(set(flat_expected) - set(flat_loaded))
  unexpected = sorted(set(flat_loaded) - set(flat_expected))
  mismatched = []
  for name in sorted(set(flat_expected) & set(flat_loaded)):
    want, got = shape_of(flat_expected[name]), shape_of(flat_loaded[name])
    if want != got:
      mismatched.append(f'{name}: expected {want}, got {got}')
  if missing or unexpected or mismatched:
    raise ValueError(
      f'The {what} does not match the expected tree:'
      + listing(f'missing from the {what}', missing)
      + listing(f'unexpected in the {what}', unexpected)
      + listing('shape mismatches', mismatched)
    )


def listing(title: str, lines: list[str]) -> str:
  """An indented section of an error message: title (count), one per line."""
  body = ''.join(f'\n    {line}' for line in lines) or '\n    (none)'
  return f'\n  {title} ({len(lines)}):{body}'


def shape_of(x: Any) -> tuple[int, ...]:
  """The shape of an array, a ShapeDtypeStruct or vmoe's IndexInfo."""
  # IndexInfo is a tuple, so np.shape would give its length: ask .shape first.
  shape = getattr(x, 'shape', None)
  return tuple(np.shape(x) if shape is None else shape)


def array_names(tree: Any) -> list[str]:
  """'/'-joined paths of the leaves of a jax pytree, in leaf order."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return [sharding.path_name(path) for path, _ in flat]

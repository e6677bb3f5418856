"""Filling a model's parameters from a checkpoint, by name.

The head (`head`, `pre_logits`) is copied only with keep_head=True and equal
shapes, and a position embedding whose grid differs is resized (posemb.py).
Everything else must match by name and shape, and anything unmatched is an
error that lists the names (strict=False keeps unmatched target parameters
fresh and skips unmatched checkpoint arrays, and reports both).
"""

from __future__ import annotations

import collections.abc
import re
from typing import Any

import numpy as np

from vmoe_jsd.checkpoints.tree import (
  flatten_tree,
  listing,
  match_tree,
  shape_of,
  unflatten_tree,
)
from vmoe_jsd.initialization.posemb import resize_target_posemb

REPORT_KEYS = ('loaded', 'upcycled', 'resized', 'fresh', 'unused')
POSEMB = 'Encoder/posembed_input/pos_embedding'
_HEAD_RE = re.compile(r'^(head|pre_logits)(/|$)')
EXPERT_RE = re.compile(
  r'^(Encoder/encoderblock_\d+)/Moe/(Mlp/Dense_[01]/(kernel|bias))$'
)


def is_head(name: str) -> bool:
  return bool(_HEAD_RE.match(name))


def dense_mlp_name(expert_name: str) -> str | None:
  """'.../encoderblock_1/Mlp/Dense_0/kernel' for an expert parameter name."""
  m = EXPERT_RE.match(expert_name)
  return f'{m.group(1)}/{m.group(2)}' if m else None


def _host_array(x: Any, dtype: Any) -> np.ndarray:
  return np.asarray(x).astype(dtype, copy=False)


def fill_target(
  target_flat: dict[str, Any],
  source_flat: dict[str, Any],
  *,
  what: str,
  keep_head: bool,
  strict: bool,
  origin: dict[str, str] | None = None,
  upcycle: bool = False,
  fresh_ok=lambda name: False,
  skippable=is_head,
) -> tuple[dict[str, Any], dict[str, Any]]:
  """(flat params, report): each target name (our name -> target leaf)
  filled from the checkpoint (our name -> array; `origin` gives its own
  names, for messages; None: the same names). `upcycle` fills MoE experts
  from the dense MLP of the same block; `fresh_ok` names may stay fresh,
  `skippable` checkpoint names unused; the rest as `vit_to_vmoe_params`."""
  origin = {n: n for n in source_flat} if origin is None else origin
  report = {key: [] for key in (*REPORT_KEYS, 'notes')}
  out, used, missing, mismatched = {}, set(), [], []
  for name, leaf in target_flat.items():
    if is_head(name):
      out[name] = _head_value(name, leaf, source_flat, keep_head, used, report)
      continue
    dense = dense_mlp_name(name) if upcycle else None
    if dense is not None and name not in source_flat and dense in source_flat:
      from_name = dense
    elif name in source_flat:
      from_name = name
    elif fresh_ok(name):
      out[name] = leaf
      report['fresh'].append(name)
      continue
    else:
      missing.append(name)
      continue
    used.add(from_name)
    value, problem = _converted(name, leaf, from_name, source_flat, report)
    if problem is None:
      out[name] = value
    else:
      mismatched.append(f'{name} (from {origin[from_name]}): {problem}')

  unused = [name for name in source_flat if name not in used]
  unexpected = sorted(origin[n] for n in unused if not skippable(n))
  if mismatched or (strict and (missing or unexpected)):
    _raise_misfit(what, missing, unexpected, mismatched, strict)
  for name in missing:
    out[name] = target_flat[name]
    report['fresh'].append(name)
    report['notes'].append(f'{name}: not in the checkpoint, kept fresh')
  report['unused'] = sorted(origin[n] for n in unused)
  # Keep the target's order.
  return {name: out[name] for name in target_flat}, report


def _head_value(name, leaf, source_flat, keep_head, used, report) -> Any:
  """A head parameter: the checkpoint's with keep_head and equal shapes."""
  src, shape = source_flat.get(name), shape_of(leaf)
  if keep_head and src is not None and shape_of(src) == shape:
    used.add(name)
    report['loaded'].append(name)
    return _host_array(src, leaf.dtype)
  report['fresh'].append(name)
  if keep_head and src is not None:
    report['notes'].append(
      f'{name}: kept fresh, the checkpoint has shape '
      f'{shape_of(src)} and the target {shape}'
    )
  return leaf


def _converted(name, leaf, from_name, source_flat, report) -> tuple[Any, Any]:
  """(value, None) of `name` from the checkpoint's `from_name`, or (None, why).

  The value is copied, broadcast to every expert (from_name is a dense MLP:
  upcycling) or resized (the position embedding).
  """
  src, shape, dtype = source_flat[from_name], shape_of(leaf), leaf.dtype
  if from_name != name:
    if shape_of(src) != shape[1:]:
      return None, f'expected {shape[1:]} per expert, got {shape_of(src)}'
    report['upcycled'].append(name)
    return np.array(np.broadcast_to(_host_array(src, dtype), shape)), None
  if shape_of(src) == shape:
    report['loaded'].append(name)
    return _host_array(src, dtype), None
  if name != POSEMB:
    return None, f'expected {shape}, got {shape_of(src)}'
  try:
    value, how = resize_target_posemb(src, leaf, source_flat)
  except ValueError as e:
    return None, str(e)
  report['resized'].append(name)
  report['notes'].append(f'{name}: {shape_of(src)} -> {shape}, {how}')
  return value, None


def _raise_misfit(what, missing, unexpected, mismatched, strict) -> None:
  hint = (
    '\nWith strict=False, missing parameters stay fresh and unexpected '
    'arrays are skipped; shape mismatches are always errors.'
    if strict and (missing or unexpected)
    else ''
  )
  raise ValueError(
    f'The {what} does not fit the target parameters:'
    + listing('missing from the checkpoint', sorted(missing))
    + listing('unexpected in the checkpoint', unexpected)
    + listing('shape mismatches', sorted(mismatched))
    + hint
  )


def copy_matching_params(
  tree: collections.abc.Mapping,
  target_params: collections.abc.Mapping,
  *,
  keep_head: bool = False,
  strict: bool = True,
  what: str = 'checkpoint',
) -> tuple[dict, dict]:
  """Fills the target from a checkpoint with the same parameter tree.

  For vmoe checkpoints and ours: names and shapes must match the target's
  exactly, except the head and the position embedding (module docstring).
  `tree` with a 'params' subtree and no 'Encoder' (a whole train state) is
  reduced to its params; the other arguments and the result are as for
  `vit_to_vmoe_params`. With `strict`, match_tree's ValueError lists every
  missing and unexpected name and shape mismatch.
  """
  if 'Encoder' not in tree and isinstance(
    tree.get('params'), collections.abc.Mapping
  ):
    tree = tree['params']
  source = flatten_tree(tree)
  target_flat = flatten_tree(target_params)
  if strict:

    def comparable(flat: dict, other: dict) -> dict:
      out = {n: v for n, v in flat.items() if not is_head(n)}
      if POSEMB in out and POSEMB in other:
        # Compared by presence only: a different grid is resized.
        out[POSEMB] = np.empty((0,))
      return unflatten_tree(out)

    match_tree(
      comparable(target_flat, source),
      comparable(source, target_flat),
      what=what,
    )
  flat_params, report = fill_target(
    target_flat, source, what=what, keep_head=keep_head, strict=strict
  )
  return unflatten_tree(flat_params), report

"""Initial parameters from pre-trained checkpoints: ViT, V-MoE and ours.

`load_initial_params(config.initialization, target_params)` fills the freshly
initialised parameters of the model about to be trained from one of:

  'vit_npz'  a dense ViT `.npz` of google-research/vision_transformer or
             google-research/big_vision (naming detected from the names),
             with sparse upcycling: every expert of every MoE block starts
             as a copy of that block's dense MLP and the router stays as
             initialised (Komatsuzaki et al., "Sparse Upcycling: Training
             Mixture-of-Experts from Dense Checkpoints", ICLR 2023,
             arXiv:2212.05055, Fig. 1). With all experts equal
             the MoE block computes (sum of the token's combine weights)
             times the dense MLP, so with K = E the upcycled model is the
             dense model.
  'vmoe'     a google-research/vmoe checkpoint (vmoe_format.py), same tree.
  'orbax'    the params of one of our orbax checkpoints (a workdir, its
             checkpoints/ folder for the latest step, or one step folder).

In all three the head (`head`, `pre_logits`) is copied only with
keep_head=True and equal shapes, and a position embedding whose grid differs
is resized by bilinear interpolation of the patch positions, as the ViT
fine-tuning recipe does (Dosovitskiy et al., "An Image is Worth 16x16
Words", ICLR 2021, arXiv:2010.11929, Sec. 3.2); corners stay aligned, as in
scipy.ndimage.zoom(order=1) that vision_transformer, big_vision and vmoe use.
Everything else must match by name and shape, and anything unmatched is an
error that lists the names (strict=False keeps unmatched target parameters
fresh and skips unmatched checkpoint arrays, and reports both).

The loaders return (params, report): params a nested dict of numpy arrays
in the target's dtypes (parameters kept fresh are the target's own leaves),
report a dict of name lists (see `format_report`).
"""

from __future__ import annotations

import collections.abc
import errno
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from vmoe_jsd import checkpoints, paths, sharding, vmoe_format
from vmoe_jsd.config_errors import fail

SOURCES = ('orbax', 'vit_npz', 'vmoe')
CONFIG_KEYS = ('keep_head', 'path', 'source', 'strict', 'upcycle')
REPORT_KEYS = ('loaded', 'upcycled', 'resized', 'fresh', 'unused')

POSEMB = 'Encoder/posembed_input/pos_embedding'
_HEAD_RE = re.compile(r'^(head|pre_logits)(/|$)')
_ROUTER_RE = re.compile(r'^Encoder/encoderblock_\d+/Moe/Router/')
_EXPERT_RE = re.compile(
  r'^(Encoder/encoderblock_\d+)/Moe/(Mlp/Dense_[01]/(kernel|bias))$'
)
_DENSE_MLP_RE = re.compile(r'^(Encoder/encoderblock_\d+)/Mlp/')

# ---------------------------------------------------------------------------
# ViT checkpoint names.
# ---------------------------------------------------------------------------

# Children of `Transformer/encoderblock_{i}`. vision_transformer's checkpoints
# were written by pre-linen flax, which numbered submodules across types
# (LayerNorm_0, MultiHeadDotProductAttention_1, LayerNorm_2, MlpBlock_3);
# big_vision's linen model numbers them per type.
_BLOCK_CHILDREN = {
  'vision_transformer': {
    'LayerNorm_0': 'LayerNorm_0',
    'MultiHeadDotProductAttention_1': 'SelfAttention',
    'LayerNorm_2': 'LayerNorm_1',
    'MlpBlock_3': 'Mlp',
  },
  'big_vision': {
    'LayerNorm_0': 'LayerNorm_0',
    'MultiHeadDotProductAttention_0': 'SelfAttention',
    'LayerNorm_1': 'LayerNorm_1',
    'MlpBlock_0': 'Mlp',
  },
}
# Everything outside the encoder blocks, by name prefix. The position
# embedding lives in three places: vision_transformer and very old
# big_vision under posembed_input, pre-2022 big_vision in the Transformer,
# big_vision since at the root (and without a class-token position).
_OUTSIDE_BLOCKS = {
  'embedding': 'embedding',
  'cls': 'cls',
  'Transformer/posembed_input/pos_embedding': POSEMB,
  'Transformer/pos_embedding': POSEMB,
  'pos_embedding': POSEMB,
  'Transformer/encoder_norm': 'Encoder/encoder_norm',
  'MAPHead_0/probe': 'MapHead/probe',
  'MAPHead_0/MultiHeadDotProductAttention_0': (
    'MapHead/MultiHeadDotProductAttention'
  ),
  'MAPHead_0/LayerNorm_0': 'MapHead/LayerNorm',
  'MAPHead_0/MlpBlock_0': 'MapHead/Mlp',
  'pre_logits': 'pre_logits',
  'head': 'head',
}
_BLOCK_RE = re.compile(r'^Transformer/encoderblock_(\d+)/([^/]+)(/.*)?$')
# big_vision with scan_layers=True stacks all blocks on a leading axis.
_SCANNED_RE = re.compile(r'^Transformer/encoderblock/(.+)$')
# Trees that some checkpoints wrap the model in (optimizer target, params of
# a big_vision train state, image tower of a two-tower model).
_WRAPPERS = ('', 'opt/target/', 'params/', 'params/img/')


def detect_vit_naming(names: collections.abc.Iterable[str]) -> str:
  """'vision_transformer' or 'big_vision', from a ViT's parameter names.

  Args:
    names: '/'-joined names, e.g. 'Transformer/encoderblock_0/MlpBlock_3/...'.

  Returns:
    The naming whose encoder-block children the names use.

  Raises:
    ValueError: if the names use both or neither.
  """
  found = set()
  for name in names:
    m = _BLOCK_RE.match(name)
    if not m:
      continue
    for naming, children in _BLOCK_CHILDREN.items():
      # LayerNorm_0 is in both namings and decides nothing.
      if m.group(2) in children and m.group(2) != 'LayerNorm_0':
        found.add(naming)
  if len(found) != 1:
    raise ValueError(
      'Cannot tell the ViT checkpoint naming: expected encoder blocks with '
      'either MultiHeadDotProductAttention_1/LayerNorm_2/MlpBlock_3 '
      '(vision_transformer) or MultiHeadDotProductAttention_0/LayerNorm_1/'
      f'MlpBlock_0 (big_vision); found {sorted(found) or "neither"}.'
    )
  return found.pop()


def _vit_name_to_ours(name: str, naming: str) -> str | None:
  """Our name for a ViT checkpoint name, or None if it has none."""
  m = _BLOCK_RE.match(name)
  if m:
    child = _BLOCK_CHILDREN[naming].get(m.group(2))
    if child is None:
      return None
    return f'Encoder/encoderblock_{m.group(1)}/{child}{m.group(3) or ""}'
  for prefix, ours in _OUTSIDE_BLOCKS.items():
    if name == prefix or name.startswith(prefix + '/'):
      return ours + name[len(prefix) :]
  return None


def _joined_names(tree: Any, prefix: str = '') -> dict[str, Any]:
  """Flattens nested mappings whose keys may themselves hold '/'."""
  out = {}
  for key, value in tree.items():
    name = f'{prefix}{key}'
    if isinstance(value, collections.abc.Mapping):
      out.update(_joined_names(value, name + '/'))
    else:
      out[name] = value
  return out


def _unwrap_vit(flat: dict[str, Any]) -> tuple[dict[str, Any], dict, str]:
  """Strips a wrapper prefix; returns (model arrays, others, prefix)."""
  for prefix in _WRAPPERS:
    if prefix + 'embedding/kernel' in flat:
      inside = {
        n[len(prefix) :]: v for n, v in flat.items() if n.startswith(prefix)
      }
      outside = {n: v for n, v in flat.items() if not n.startswith(prefix)}
      return inside, outside, prefix
  raise ValueError(
    'Not a ViT checkpoint: no embedding/kernel under any of '
    f'{[p or "the root" for p in _WRAPPERS]}; found names such as '
    f'{sorted(flat)[:5]}.'
  )


def _unscan(flat: dict[str, Any]) -> dict[str, Any]:
  """Splits big_vision's scanned blocks into encoderblock_{i}."""
  out = {}
  for name, value in flat.items():
    m = _SCANNED_RE.match(name)
    if not m:
      out[name] = value
      continue
    for block, block_value in enumerate(np.asarray(value)):
      out[f'Transformer/encoderblock_{block}/{m.group(1)}'] = block_value
  return out


def _fix_npz_dtype(x: Any) -> np.ndarray:
  """numpy writes bfloat16 arrays to .npz as 2-byte void; reads them back."""
  x = np.asarray(x)
  if x.dtype.kind == 'V' and x.dtype.itemsize == 2:
    import ml_dtypes  # noqa: PLC0415 - only for bfloat16 checkpoints.

    return x.view(ml_dtypes.bfloat16)
  return x


# ---------------------------------------------------------------------------
# Position embeddings.
# ---------------------------------------------------------------------------


def _split_tokens(num_tokens: int, what: str) -> tuple[int, int]:
  """(prefix tokens, grid side) of a square grid plus 0 or 1 class token."""
  for prefix in (0, 1):
    side = math.isqrt(max(num_tokens - prefix, 0))
    if side > 0 and side * side == num_tokens - prefix:
      return prefix, side
  raise ValueError(
    f'{what} has {num_tokens} positions, neither a square grid nor a square '
    'grid plus a class token; only square grids can be resized.'
  )


def _interpolation_weights(size_in: int, size_out: int) -> np.ndarray:
  """(size_out, size_in) matrix of 1-D linear interpolation, corners aligned."""
  if size_out == 1:
    positions = np.zeros(1)
  else:
    positions = np.arange(size_out) * ((size_in - 1) / (size_out - 1))
  low = np.clip(np.floor(positions).astype(int), 0, size_in - 1)
  high = np.minimum(low + 1, size_in - 1)
  frac = positions - low
  weights = np.zeros((size_out, size_in))
  weights[np.arange(size_out), low] += 1.0 - frac
  weights[np.arange(size_out), high] += frac
  return weights


def interpolate_grid(grid: np.ndarray, height: int, width: int) -> np.ndarray:
  """Bilinear resize of an (h, w, D) grid to (height, width, D).

  Output position (i, j) samples the input at (i (h-1)/(height-1),
  j (w-1)/(width-1)): the corner positions map onto each other, so a
  function linear in the position is reproduced exactly (up to rounding).
  This is what scipy.ndimage.zoom(grid, zoom, order=1) computes.

  Args:
    grid: (h, w, D) array.
    height: output rows.
    width: output columns.

  Returns:
    (height, width, D) float64 array.
  """
  grid = np.asarray(grid, np.float64)
  rows = _interpolation_weights(grid.shape[0], height)
  cols = _interpolation_weights(grid.shape[1], width)
  return np.einsum('ih,jw,hwd->ijd', rows, cols, grid)


def resize_pos_embedding(
  posemb: np.ndarray,
  target_shape: tuple[int, ...],
  class_position: np.ndarray | None = None,
  class_position_origin: str = 'given',
) -> tuple[np.ndarray, str]:
  """Resizes a (1, [1 +] h*h, D) position embedding to `target_shape`.

  Whether each side has a class-token position is read from its length
  (a square, or a square plus one). The patch positions are interpolated
  (`interpolate_grid`); the class-token position is copied when both have
  one, dropped when the target has none, and taken from `class_position`
  when only the target has one.

  Args:
    posemb: source embedding, (1, T, D).
    target_shape: (1, T', D) with the same D.
    class_position: (1, 1, D) value of the target's class-token position
      when the source has none (e.g. zeros, or the target's own value).
    class_position_origin: what class_position is, for the description.

  Returns:
    (resized embedding as float64, description of what was done).

  Raises:
    ValueError: on other ranks, a different D, a non-square grid, or a
      missing `class_position` that is needed.
  """
  posemb = np.asarray(posemb)
  target_shape = tuple(target_shape)
  if (
    posemb.ndim != 3
    or len(target_shape) != 3
    or posemb.shape[0] != 1
    or target_shape[0] != 1
    or posemb.shape[2] != target_shape[2]
  ):
    raise ValueError(
      f'Cannot resize a position embedding of shape {posemb.shape} to '
      f'{target_shape}: both must be (1, tokens, D) with the same D.'
    )
  prefix_in, side_in = _split_tokens(posemb.shape[1], 'The checkpoint')
  prefix_out, side_out = _split_tokens(target_shape[1], 'The target')
  grid = posemb[0, prefix_in:].reshape(side_in, side_in, -1)
  if side_in == side_out:
    new_grid = grid.astype(np.float64)
  else:
    new_grid = interpolate_grid(grid, side_out, side_out)
  new_grid = new_grid.reshape(1, side_out * side_out, -1)
  what = f'grid {side_in}x{side_in} -> {side_out}x{side_out}'
  if prefix_out == 0:
    if prefix_in:
      what += ', class-token position dropped'
    return new_grid, what
  if prefix_in:
    cls = posemb[:, :1].astype(np.float64)
    what += ', class-token position copied'
  elif class_position is None:
    raise ValueError(
      'The target position embedding has a class-token position and the '
      'checkpoint has none; pass class_position.'
    )
  else:
    cls = np.asarray(class_position, np.float64).reshape(1, 1, -1)
    what += f', class-token position {class_position_origin}'
  return np.concatenate([cls, new_grid], axis=1), what


# ---------------------------------------------------------------------------
# Filling the target.
# ---------------------------------------------------------------------------


def _is_head(name: str) -> bool:
  return bool(_HEAD_RE.match(name))


def _dense_mlp_name(expert_name: str) -> str | None:
  """'.../encoderblock_1/Mlp/Dense_0/kernel' for an expert parameter name."""
  m = _EXPERT_RE.match(expert_name)
  return f'{m.group(1)}/{m.group(2)}' if m else None


def _shape(x: Any) -> tuple[int, ...]:
  shape = getattr(x, 'shape', None)
  return tuple(np.shape(x) if shape is None else shape)


def _host_array(x: Any, dtype: Any) -> np.ndarray:
  return np.asarray(x).astype(dtype, copy=False)


def _fill_target(
  target_flat: dict[str, Any],
  source_flat: dict[str, Any],
  *,
  what: str,
  origin: dict[str, str],
  keep_head: bool,
  strict: bool,
  upcycle: bool,
  fresh_ok=lambda name: False,
  skippable=_is_head,
) -> tuple[dict[str, Any], dict[str, Any]]:
  """Fills each target name from the checkpoint (both flat, in our names).

  Args:
    target_flat: our name -> target leaf (array or ShapeDtypeStruct).
    source_flat: our name -> checkpoint array.
    what: the checkpoint, for messages.
    origin: our name -> the checkpoint's own name, for messages.
    keep_head: copy head/pre_logits when shapes match.
    strict: unmatched names are errors (else kept fresh / skipped).
    upcycle: fill MoE experts from the dense MLP of the same block.
    fresh_ok: target names that are expected to stay fresh.
    skippable: checkpoint names that may stay unused.

  Returns:
    (flat params, report).
  """
  report = {key: [] for key in REPORT_KEYS}
  report['notes'] = []
  out, used, missing, mismatched = {}, set(), [], []
  for name, leaf in target_flat.items():
    if _is_head(name):
      out[name] = _head_value(name, leaf, source_flat, keep_head, used, report)
      continue
    dense = _dense_mlp_name(name) if upcycle else None
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
  src, shape = source_flat.get(name), _shape(leaf)
  if keep_head and src is not None and _shape(src) == shape:
    used.add(name)
    report['loaded'].append(name)
    return _host_array(src, leaf.dtype)
  report['fresh'].append(name)
  if keep_head and src is not None:
    report['notes'].append(
      f'{name}: kept fresh, the checkpoint has shape '
      f'{_shape(src)} and the target {shape}'
    )
  return leaf


def _converted(name, leaf, from_name, source_flat, report) -> tuple[Any, Any]:
  """(value, None) of `name` from the checkpoint's `from_name`, or (None, why).

  The value is copied, broadcast to every expert (from_name is a dense MLP:
  upcycling) or resized (the position embedding).
  """
  src, shape, dtype = source_flat[from_name], _shape(leaf), leaf.dtype
  if from_name != name:
    if _shape(src) != shape[1:]:
      return None, f'expected {shape[1:]} per expert, got {_shape(src)}'
    report['upcycled'].append(name)
    return np.array(np.broadcast_to(_host_array(src, dtype), shape)), None
  if _shape(src) == shape:
    report['loaded'].append(name)
    return _host_array(src, dtype), None
  if name != POSEMB:
    return None, f'expected {shape}, got {_shape(src)}'
  try:
    value, how = _resize_target_posemb(src, leaf, source_flat)
  except ValueError as e:
    return None, str(e)
  report['resized'].append(name)
  report['notes'].append(f'{name}: {_shape(src)} -> {shape}, {how}')
  return value, None


def _resize_target_posemb(src, leaf, source_flat) -> tuple[np.ndarray, str]:
  """Resizes the checkpoint's position embedding onto the target's."""
  if 'cls' in source_flat:
    # big_vision adds position embeddings before it prepends the class
    # token, which so gets none: a zero position keeps the function.
    class_position = np.zeros((1, 1, _shape(src)[-1]))
    origin = 'zero, as the checkpoint adds none to its class token'
  elif hasattr(leaf, '__array__'):
    class_position = np.asarray(leaf)[:, :1]
    origin = 'kept fresh, the checkpoint has no class token'
  else:
    class_position = np.zeros((1, 1, _shape(src)[-1]))
    origin = 'zero, the checkpoint has no class token'
  resized, how = resize_pos_embedding(
    src, _shape(leaf), class_position, class_position_origin=origin
  )
  return resized.astype(leaf.dtype), how


def _raise_misfit(what, missing, unexpected, mismatched, strict) -> None:
  def section(title: str, lines: list[str]) -> str:
    body = ''.join(f'\n    {line}' for line in lines) or '\n    (none)'
    return f'\n  {title} ({len(lines)}):{body}'

  hint = (
    '\nWith strict=False, missing parameters stay fresh and unexpected '
    'arrays are skipped; shape mismatches are always errors.'
    if strict and (missing or unexpected)
    else ''
  )
  raise ValueError(
    f'The {what} does not fit the target parameters:'
    + section('missing from the checkpoint', sorted(missing))
    + section('unexpected in the checkpoint', unexpected)
    + section('shape mismatches', sorted(mismatched))
    + hint
  )


# ---------------------------------------------------------------------------
# Public API.
# ---------------------------------------------------------------------------


def vit_to_vmoe_params(
  vit_tree: collections.abc.Mapping,
  target_params: collections.abc.Mapping,
  *,
  upcycle: bool = True,
  keep_head: bool = False,
  strict: bool = True,
  what: str = 'ViT checkpoint',
) -> tuple[dict, dict]:
  """Maps a dense ViT checkpoint onto a V-MoE's parameters (upcycling).

  Names of google-research/vision_transformer and big_vision are recognised
  (plus big_vision's scanned blocks and the 'params/' and 'opt/target/'
  wrappers). Each MoE expert of the target is a copy of the dense MLP of
  its block (with upcycle=True; else the experts stay fresh and those MLPs
  unused); routers stay fresh. big_vision's root position embedding has no
  class-token position since big_vision adds it before prepending the class
  token; the target's class-token position is then zero, which keeps the
  function.

  Args:
    vit_tree: dict of arrays, nested (e.g. vmoe_format.read_npz_tree(path))
      or flat with '/'-joined names (e.g. dict(np.load(path))).
    target_params: the freshly initialised params of the model to train
      (arrays, or ShapeDtypeStructs if nothing needs to stay fresh).
    upcycle: copy the dense MLPs into the experts of MoE blocks.
    keep_head: copy head/pre_logits when their shapes match.
    strict: unmatched names are errors (else: reported, kept fresh/unused).
    what: how to name the checkpoint in messages.

  Returns:
    (params, report): params like target_params, as numpy arrays in the
    target's dtypes; report with the target names 'loaded', 'upcycled',
    'resized' and 'fresh', the checkpoint names left 'unused', 'notes' and
    the detected 'naming'.

  Raises:
    ValueError: listing the unmatched names (strict) and shape mismatches.
  """
  source, origin, naming, scanned = _vit_source(vit_tree, what)
  target_flat = vmoe_format.flatten_tree(target_params)
  moe_blocks = {m.group(1) for m in map(_EXPERT_RE.match, target_flat) if m}

  def fresh_ok(name: str) -> bool:
    return bool(_ROUTER_RE.match(name)) or (
      not upcycle and _dense_mlp_name(name) is not None
    )

  def skippable(name: str) -> bool:
    m = _DENSE_MLP_RE.match(name)
    return _is_head(name) or (
      not upcycle and m is not None and m.group(1) in moe_blocks
    )

  flat_params, report = _fill_target(
    target_flat, source, what=f'{what} ({naming} naming)', origin=origin,
    keep_head=keep_head, strict=strict, upcycle=upcycle, fresh_ok=fresh_ok,
    skippable=skippable,
  )  # fmt: skip
  report['naming'] = naming + (' (scanned blocks)' if scanned else '')
  if not upcycle and moe_blocks:
    report['notes'].append(
      'upcycle=False: experts kept fresh, the dense MLPs of '
      f'{sorted(moe_blocks)} unused'
    )
  return vmoe_format.unflatten_tree(flat_params), report


def _vit_source(vit_tree, what: str) -> tuple[dict, dict, str, bool]:
  """(our name -> array, our name -> ViT name, naming, scanned) of a ViT."""
  flat = {n: _fix_npz_dtype(v) for n, v in _joined_names(vit_tree).items()}
  inside, outside, wrapper = _unwrap_vit(flat)
  scanned = any(_SCANNED_RE.match(n) for n in inside)
  inside = _unscan(inside)
  naming = detect_vit_naming(inside)
  source, origin, unmapped = {}, {}, {}
  for name, value in inside.items():
    ours = _vit_name_to_ours(name, naming)
    if ours is None:
      unmapped[wrapper + name] = value
      continue
    if ours in source:
      raise ValueError(
        f'The {what} has two arrays for {ours!r}: '
        f'{origin[ours]!r} and {wrapper + name!r}.'
      )
    source[ours] = value
    origin[ours] = wrapper + name
  # Names without a counterpart keep their own name, which no target has.
  for name, value in {**outside, **unmapped}.items():
    source[name] = value
    origin[name] = name
  return source, origin, naming, scanned


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
  exactly, except head/pre_logits (copied only with keep_head and equal
  shapes) and the position embedding (resized when its grid differs).

  Args:
    tree: nested dict of arrays; a tree with a 'params' subtree and no
      'Encoder' (a whole train state) is reduced to its params.
    target_params: the freshly initialised params of the model to train.
    keep_head: copy head/pre_logits when their shapes match.
    strict: unmatched names are errors (else: reported, kept fresh/unused).
    what: how to name the checkpoint in messages.

  Returns:
    (params, report) as `vit_to_vmoe_params`.

  Raises:
    ValueError: from vmoe_format.match_tree, listing every missing and
      unexpected name and shape mismatch (strict), or the mismatches.
  """
  if 'Encoder' not in tree and isinstance(
    tree.get('params'), collections.abc.Mapping
  ):
    tree = tree['params']
  source = vmoe_format.flatten_tree(tree)
  target_flat = vmoe_format.flatten_tree(target_params)
  if strict:

    def comparable(flat: dict, other: dict) -> dict:
      out = {n: v for n, v in flat.items() if not _is_head(n)}
      if POSEMB in out and POSEMB in other:
        # Compared by presence only: a different grid is resized.
        out[POSEMB] = np.empty((0,))
      return vmoe_format.unflatten_tree(out)

    vmoe_format.match_tree(
      comparable(target_flat, source),
      comparable(source, target_flat),
      what=what,
    )
  flat_params, report = _fill_target(
    target_flat, source, what=what, origin={name: name for name in source},
    keep_head=keep_head, strict=strict, upcycle=False,
  )  # fmt: skip
  return vmoe_format.unflatten_tree(flat_params), report


def orbax_state_candidates(path: str) -> tuple[list, dict[int, str]]:
  """The orbax 'state' item folders `path` may mean, newest first.

  Args:
    path: a workdir (with checkpoints/) or a checkpoints/ folder: every
      step folder there with state/_METADATA, newest first; a step folder
      (with state/) or the state/ item folder itself: just that one.

  Returns:
    ([(folder of the 'state' item, step number or None), ...], incomplete):
    incomplete maps the steps of step folders without state/_METADATA
    (half-written, or not checkpoints) to why they were left out.

  Raises:
    FileNotFoundError: if `path` does not exist.
    ValueError: if no checkpoint is found there.
  """
  if not paths.exists(path):
    raise FileNotFoundError(
      errno.ENOENT, 'orbax checkpoint path does not exist', path
    )
  root = paths.resolve(path)

  def is_item(folder) -> bool:
    return (folder / '_METADATA').is_file()

  def step_of(folder) -> int | None:
    return int(folder.name) if folder.name.isdigit() else None

  if is_item(root):
    return [(str(root), step_of(root.parent))], {}
  if is_item(root / 'state'):
    return [(str(root / 'state'), step_of(root))], {}
  incomplete: dict[int, str] = {}
  for folder in (root, root / 'checkpoints'):
    if not folder.is_dir():
      continue
    steps = []
    for entry in folder.iterdir():
      if not (entry.name.isdigit() and entry.is_dir()):
        continue
      if is_item(entry / 'state'):
        steps.append(int(entry.name))
      else:
        incomplete[int(entry.name)] = (
          'no state/_METADATA (half-written, or not a checkpoint)'
        )
    if steps:
      return [
        (str(folder / str(step) / 'state'), step)
        for step in sorted(steps, reverse=True)
      ], incomplete
  raise ValueError(
    f'No orbax checkpoint found at {path!r}: expected a workdir with '
    'checkpoints/<step>/state/, a checkpoints/ folder, a step folder with '
    'state/, or a state/ folder with _METADATA.'
    + (f' Incomplete step folders: {sorted(incomplete)}.' if incomplete else '')
  )


def find_orbax_state_dir(path: str) -> str:
  """The newest orbax 'state' item folder under `path`.

  See `orbax_state_candidates` for `path` and the errors.
  """
  return orbax_state_candidates(path)[0][0]


class _NoParamsError(ValueError):
  """A readable checkpoint without params: not damage, so no fallback."""


def _read_state_params(directory: str) -> dict:
  handler = ocp.PyTreeCheckpointHandler()
  try:
    structure = handler.metadata(paths.resolve(directory)).tree
    if isinstance(structure.get('params'), collections.abc.Mapping):
      key = 'params'
    elif 'Encoder' in structure:
      key = None
    else:
      raise _NoParamsError(
        f'The orbax checkpoint {directory!r} has no params: its top-level '
        f'keys are {sorted(structure)}.'
      )
    meta = structure[key] if key else structure
    item = jax.tree_util.tree_map(lambda _: 0, meta)
    restore_args = jax.tree_util.tree_map(
      lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta
    )
    if key:
      item, restore_args = {key: item}, {key: restore_args}
    restored = handler.restore(
      paths.resolve(directory),
      args=ocp.args.PyTreeRestore(
        item=item, restore_args=restore_args, partial_restore=True
      ),
    )
  finally:
    handler.close()
  params = restored[key] if key else restored
  # The CRC-32C of every array saved with the step (checkpoints.py): a
  # damaged step is an unreadable one (an older one is tried for a workdir).
  record = checkpoints.read_integrity_record(paths.resolve(directory).parent)
  named = {key: params} if key else params  # Named as in the saved state.
  problem = checkpoints.integrity_problem(named, record, exchange=False)
  if problem:
    raise checkpoints.IntegrityError(
      f'orbax checkpoint {directory!r}: {problem}'
    )
  return vmoe_format.unflatten_tree(vmoe_format.flatten_tree(params))


def read_orbax_params(path: str) -> tuple[dict, dict[str, Any]]:
  """Reads only the params of one of our orbax checkpoints, as numpy.

  The optimizer state is not read: the restore is partial, driven by the
  checkpoint's own metadata, so it needs neither a target nor the mesh
  the checkpoint was saved from. Given a workdir or a checkpoints/ folder,
  it takes the newest checkpoint that can be read: a damaged one (a
  truncated or missing file, a half-written step) is logged, recorded in
  the returned 'skipped' and left in place, as training does on resume
  (checkpoints.Checkpointer.restore_latest). An explicit step or state/
  folder is read or fails, never replaced by another step.

  Args:
    path: see `orbax_state_candidates`.

  Returns:
    (params as a nested dict of numpy arrays, {'directory', 'step',
    'skipped': {step: why it could not be read}}).

  Raises:
    FileNotFoundError: if `path` does not exist.
    ValueError: if there is no checkpoint, none can be read (each step's
      error is named), or the one read has no params.
  """
  candidates, skipped = orbax_state_candidates(path)
  skipped = dict(skipped)
  if len(candidates) == 1 and not skipped:
    directory, step = candidates[0]
    return _read_state_params(directory), {
      'directory': directory, 'step': step, 'skipped': {},
    }  # fmt: skip
  for directory, step in candidates:
    try:
      params = _read_state_params(directory)
    except _NoParamsError:
      raise
    except Exception as e:  # noqa: BLE001 - any failure means unreadable.
      first = (str(e).strip().splitlines() or [''])[0][:300]
      skipped[step] = f'{type(e).__name__}: {first}'
      logging.warning(
        'Checkpoint at step %s under %s cannot be read (%s); left in '
        'place, trying an older one.', step, path, skipped[step],
      )  # fmt: skip
      continue
    return params, {'directory': directory, 'step': step, 'skipped': skipped}
  problems = '; '.join(f'step {s}: {skipped[s]}' for s in sorted(skipped))
  raise ValueError(
    f'None of the checkpoints under {path!r} can be read ({problems}).'
  )


def check_config(init: collections.abc.Mapping) -> None:
  """Pure checks of a config.initialization block whose source is set."""
  unknown = sorted(set(init) - set(CONFIG_KEYS))
  if unknown:
    fail('initialization', unknown, f'keys in {CONFIG_KEYS}')
  if init['source'] not in SOURCES:
    fail('initialization.source', init['source'],
         f'one of {list(SOURCES)} or None')  # fmt: skip
  if not init.get('path'):
    fail('initialization.path', init.get('path') or '',
         'a local or gs:// path')  # fmt: skip


def load_initial_params(
  init_config: Any, target_params: collections.abc.Mapping
) -> tuple[dict, dict]:
  """Initial params from the `config.initialization` block.

  Args:
    init_config: dict or ConfigDict with
      source: 'vit_npz' | 'vmoe' | 'orbax';
      path: the .npz file; the vmoe prefix (or its .index); the orbax
        workdir, checkpoints/ folder or step folder;
      upcycle (vit_npz only, default True): experts from the dense MLPs;
      keep_head (default False): copy head/pre_logits if shapes match;
      strict (default True): unmatched names are errors.
    target_params: the freshly initialised params of the model to train.

  Returns:
    (params, report): see `vit_to_vmoe_params`; report also has 'source'
    and 'path'.

  Raises:
    ValueError: on an unknown source or key, or a checkpoint that does not
      fit (listing the names).
    FileNotFoundError: if the checkpoint is not there.
  """
  cfg = init_config.to_dict() if hasattr(init_config, 'to_dict') else None
  cfg = dict(init_config if cfg is None else cfg)
  unknown = sorted(set(cfg) - set(CONFIG_KEYS))
  if unknown:
    raise ValueError(
      f'initialization has unknown keys {unknown}; valid keys: '
      f'{list(CONFIG_KEYS)}'
    )
  source = cfg.get('source')
  if source not in SOURCES:
    raise ValueError(
      f'initialization.source={source!r} is unknown; choose one of '
      f'{list(SOURCES)}'
    )
  path = cfg.get('path')
  if not path:
    raise ValueError(f'initialization.path={path!r} must name a checkpoint.')
  path = str(path)
  params, report = _READERS[source](
    path, cfg, target_params, keep_head=bool(cfg.get('keep_head', False)),
    strict=bool(cfg.get('strict', True)),
  )  # fmt: skip
  if source != 'vit_npz' and 'upcycle' in cfg:
    report['notes'].append(f'upcycle is ignored for source={source!r}')
  report['source'] = source
  report['path'] = path
  return params, report


def _load_vit_npz(path: str, cfg: dict, target_params, **kwargs):
  if not paths.isfile(path):
    raise FileNotFoundError(
      errno.ENOENT, 'ViT checkpoint (.npz) not found', path
    )
  return vit_to_vmoe_params(
    vmoe_format.read_npz_tree(path), target_params,
    upcycle=bool(cfg.get('upcycle', True)), what=f'ViT checkpoint {path!r}',
    **kwargs,
  )  # fmt: skip


def _load_vmoe(path: str, cfg: dict, target_params, **kwargs):
  prefix = path.removesuffix('.index')
  if not paths.isfile(prefix + '.index'):
    raise FileNotFoundError(
      errno.ENOENT, 'vmoe checkpoint index not found', prefix + '.index'
    )
  return copy_matching_params(
    vmoe_format.read_vmoe_checkpoint(prefix), target_params,
    what=f'vmoe checkpoint {prefix!r}', **kwargs,
  )  # fmt: skip


def _load_orbax(path: str, cfg: dict, target_params, **kwargs):
  tree, info = read_orbax_params(path)
  params, report = copy_matching_params(
    tree, target_params, what=f'orbax checkpoint {info["directory"]!r}',
    **kwargs,
  )  # fmt: skip
  report['step'] = info['step']
  report['skipped_checkpoints'] = info['skipped']
  return params, report


# source -> (path, cfg, target, keep_head=, strict=) -> (params, report).
_READERS = {'orbax': _load_orbax, 'vit_npz': _load_vit_npz, 'vmoe': _load_vmoe}


def load_eval_params(
  model_spec, image_size: int, channels: int, checkpoint: str, source: str,
  mesh, rules=sharding.DEFAULT_RULES,
) -> tuple[Any, dict[str, Any]]:  # fmt: skip
  """The evaluation model's parameters from a checkpoint, on `mesh`.

  Args:
    model_spec: models.spec.ModelSpec (its evaluation model gives the tree).
    image_size: the view side.
    channels: image channels.
    checkpoint: an orbax workdir, checkpoints/ or step folder, or a vmoe
      prefix.
    source: 'orbax' or 'vmoe'.
    mesh: the device mesh.
    rules: the parameter sharding rules.

  Returns:
    (params sharded by `rules`, the report of `load_initial_params`).
  """
  eval_model = model_spec.build_eval()
  num = model_spec.min_images_per_batch(image_size, evaluation=True)
  shape = (num, image_size, image_size, channels)
  abstract = jax.eval_shape(
    lambda: eval_model.init(jax.random.key(0), jnp.zeros(shape))['params']
  )
  params, report = load_initial_params(
    {'source': source, 'path': checkpoint, 'keep_head': True, 'strict': True},
    abstract,
  )
  with jax.set_mesh(mesh):
    params = jax.device_put(
      params, sharding.tree_shardings(params, mesh, rules)
    )
  return params, report


def format_report(report: dict[str, Any], *, verbose: bool = False) -> str:
  """A few readable lines: names per category, then the notes.

  Args:
    report: as returned by the loaders.
    verbose: also list the loaded names (else only their count).

  Returns:
    Multi-line text.
  """
  head = f'Initialised from {report.get("source", "a checkpoint")}'
  if report.get('path'):
    head += f' {report["path"]}'
  if report.get('naming'):
    head += f' ({report["naming"]} naming)'
  lines = [head + ':']
  for key in REPORT_KEYS:
    names = report.get(key, [])
    label = 'unused checkpoint arrays' if key == 'unused' else key
    listed = ', '.join(names) if verbose or key != 'loaded' else '...'
    lines.append(f'  {label} ({len(names)}): {listed if names else "-"}')
  lines.extend(f'  note: {note}' for note in report.get('notes', []))
  return '\n'.join(lines)

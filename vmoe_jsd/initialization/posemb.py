"""Resizing a position embedding to another grid of patches.

As the ViT fine-tuning recipe does (Dosovitskiy et al., "An Image is Worth
16x16 Words", ICLR 2021, arXiv:2010.11929, Sec. 3.2): bilinear
interpolation of the patch positions, corners aligned, as in
scipy.ndimage.zoom(order=1) that vision_transformer, big_vision and vmoe use.
"""

from __future__ import annotations

import math

import numpy as np

from vmoe_jsd.checkpoints.tree import shape_of


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
  This is what scipy.ndimage.zoom(grid, zoom, order=1) computes. Returns
  float64.
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
  ((1, 1, D): e.g. zeros, or the target's own value; described as
  `class_position_origin`) when only the target has one. `posemb` is
  (1, T, D) and `target_shape` (1, T', D).

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


def resize_target_posemb(src, leaf, source_flat) -> tuple[np.ndarray, str]:
  """Resizes the checkpoint's position embedding onto the target's."""
  class_position = np.zeros((1, 1, shape_of(src)[-1]))
  if 'cls' in source_flat:
    # big_vision adds position embeddings before it prepends the class
    # token, which so gets none: a zero position keeps the function.
    origin = 'zero, as the checkpoint adds none to its class token'
  elif hasattr(leaf, '__array__'):
    class_position = np.asarray(leaf)[:, :1]
    origin = 'kept fresh, the checkpoint has no class token'
  else:
    origin = 'zero, the checkpoint has no class token'
  resized, how = resize_pos_embedding(
    src, shape_of(leaf), class_position, class_position_origin=origin
  )
  return resized.astype(leaf.dtype), how

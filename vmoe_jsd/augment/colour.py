"""Photometric augmentation: RandAugment's colour ops and colour jitter.

RandAugment's colour ops (settings.py has the reference) act on views
quantised to the integers 0..255 (float32, exact), as the reference works on
uint8; float -> uint8 casts truncate, as TensorFlow's. The jitter is
multiplicative contrast then additive brightness. Neither touches the
geometry, so the patch maps do not depend on them.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from vmoe_jsd.augment.geometry import uniform
from vmoe_jsd.augment.settings import OP_ID, RANDAUGMENT_LEVEL, ViewSettings

Array = jax.Array


def _to_uint8_range(x: Array) -> Array:
  """Truncates into 0..255 like the reference's clip then uint8 cast."""
  return jnp.floor(jnp.clip(x, 0.0, 255.0))


def _blend(degenerate: Array, image: Array, factor: float) -> Array:
  """PIL-style enhance: degenerate + factor * (image - degenerate)."""
  if factor == 0.0:
    return degenerate
  if factor == 1.0:
    return image
  return _to_uint8_range(degenerate + factor * (image - degenerate))


def _grey(x: Array) -> Array:
  """(S, S, 1) grey level as tf.image.rgb_to_grayscale gives it for uint8.

  Luma weights (0.2989, 0.5870, 0.1140) on x / 255, back to uint8 by
  truncating value * 255.5 (TensorFlow's float -> uint8 conversion). A
  one-channel image is its own grey level.
  """
  if x.shape[-1] == 1:
    return x
  weights = jnp.array([0.2989, 0.5870, 0.1140], jnp.float32)
  grey = jnp.sum((x / 255.0) * weights, axis=-1, keepdims=True)
  return jnp.floor(grey * 255.5)


def _apply_lut(lut: Array, x: Array) -> Array:
  """Per-channel lookup: out[..., c] = lut[c, x[..., c]] for 0..255 values."""
  channels = jnp.arange(x.shape[-1])
  return lut.T[x.astype(jnp.int32), channels]


def _autocontrast_lut(x: Array) -> Array:
  """(C, 256) AutoContrast: each channel's [min, max] stretched to [0, 255]."""
  lo = jnp.min(x, axis=(0, 1))[:, None]
  hi = jnp.max(x, axis=(0, 1))[:, None]
  values = jnp.arange(256, dtype=jnp.float32)[None]
  scale = 255.0 / jnp.where(hi > lo, hi - lo, 1.0)
  stretched = _to_uint8_range(values * scale - lo * scale)
  return jnp.where(hi > lo, stretched, values)


def _equalize_lut(x: Array) -> Array:
  """(C, 256) Equalize, PIL's ImageOps.equalize per channel."""

  def one(channel):
    values = channel.astype(jnp.int32).ravel()
    hist = jnp.zeros((256,), jnp.int32).at[values].add(1)
    # Number of pixels minus the count of the brightest value present.
    step = (values.size - hist[jnp.max(values)]) // 255
    lut = (jnp.cumsum(hist) + step // 2) // jnp.maximum(step, 1)
    lut = jnp.concatenate([jnp.zeros((1,), jnp.int32), lut[:-1]])
    identity = jnp.arange(256, dtype=jnp.float32)
    return jnp.where(step == 0, identity, jnp.clip(lut, 0, 255))

  return jax.vmap(one, in_axes=2)(x).astype(jnp.float32)


def _sharpen(x: Array, factor: float) -> Array:
  """Blend with PIL's SMOOTH filter (3x3, centre 5, others 1, / 13).

  The filtered image keeps the original values on its one-pixel border.
  """
  # 3x3 box sum, separable (integer sums: exact in float32), plus 4 centres.
  rows = x[:-2] + x[1:-1] + x[2:]
  total = rows[:, :-2] + rows[:, 1:-1] + rows[:, 2:] + 4.0 * x[1:-1, 1:-1]
  smooth = _to_uint8_range(total / 13.0)
  smooth = x.at[1:-1, 1:-1].set(smooth)
  return _blend(smooth, x, factor)


# Colour ops that act on each value alone (their tables depend on no pixel).
_POINTWISE_OPS = (
  'Invert',
  'Posterize',
  'Solarize',
  'SolarizeAdd',
  'Contrast',
  'Brightness',
)


def _photometric_ops(magnitude: float, size: int) -> dict[str, Any]:
  """Name -> function of a 0..255 view, at the reference's magnitude scaling.

  level = magnitude / 10: Posterize keeps int(4 * level) bits, Solarize
  inverts values >= int(256 * level) (none at level 1: the reference's
  threshold is then 256), SolarizeAdd adds int(110 * level) to values below
  128; Color, Contrast, Brightness and Sharpness blend with factor
  1.8 * level + 0.1 (no random sign). Contrast blends towards a constant
  grey of int(min(S * S / 256, 255)), not towards the mean grey level as
  PIL does: the reference takes the sum of a 256-bin histogram (the pixel
  count) divided by 256 as its "mean"; kept, as this is what vmoe trained
  with (196 for 224-px views).
  """
  level = magnitude / RANDAUGMENT_LEVEL
  factor = 1.8 * level + 0.1
  shift = 8 - int(4 * level)
  threshold = int(256 * level)
  addition = int(110 * level)
  contrast_grey = float(int(min(size * size / 256.0, 255.0)))
  return {
    'AutoContrast': lambda x: _apply_lut(_autocontrast_lut(x), x),
    'Equalize': lambda x: _apply_lut(_equalize_lut(x), x),
    'Invert': lambda x: 255.0 - x,
    'Posterize': lambda x: jnp.floor(x / 2.0**shift) * 2.0**shift,
    'Solarize': lambda x: jnp.where(x < threshold, x, 255.0 - x),
    'SolarizeAdd': lambda x: jnp.where(
      x < 128, jnp.clip(x + addition, 0.0, 255.0), x
    ),
    'Color': lambda x: _blend(jnp.broadcast_to(_grey(x), x.shape), x, factor),
    'Contrast': lambda x: _blend(jnp.full_like(x, contrast_grey), x, factor),
    'Brightness': lambda x: _blend(jnp.zeros_like(x), x, factor),
    'Sharpness': lambda x: _sharpen(x, factor),
  }


def randaugment_photometric(
  view: Array, stage: Array, ops: Array, settings: ViewSettings
) -> Array:
  """Applies a rendered view's RandAugment layers in order, on pixel values.

  Colour ops act on the whole view (fill included). A geometric or Cutout
  layer k sets the pixels it filled (`stage == k`) to the fill value, so a
  fill made before a colour op goes through that op, as in the reference.
  Difference from the reference: a colour op before a geometric one sees
  the pixels in their final places (its statistics, such as AutoContrast's
  min and max, cover the final view's content rather than the pre-op view).

  Args:
    view: (S, S, C) float in [0, 1], rendered with the full affine; pixels
      with `stage == 0` already hold the fill value.
    stage: (S, S) int32 from `fill_stages` at the pixel centres.
    ops: (N,) int32 op ids.
    settings: the augmentation settings (photometric must be True).

  Returns:
    (S, S, C) float32 in [0, 1], multiples of 1 / 255.
  """
  functions = _photometric_ops(settings.randaugment[1], settings.size)
  fill = jnp.clip(jnp.round(settings.fill_value * 255.0), 0.0, 255.0)
  x = jnp.clip(jnp.round(view * 255.0), 0.0, 255.0)
  values = jnp.arange(256, dtype=jnp.float32)
  channels = x.shape[-1]
  # Every op but Color and Sharpness maps each channel's 256 values through
  # a table: the layer's table is chosen first, then applied in one lookup
  # (under vmap, a per-view choice computes every branch; tables are cheap).
  tables = {name: functions[name](values) for name in _POINTWISE_OPS}
  for k in range(ops.shape[0]):
    op = ops[k]
    lut = jnp.broadcast_to(values, (channels, 256))
    for name, table in tables.items():
      lut = jnp.where(op == OP_ID[name], table[None], lut)
    lut = jnp.where(op == OP_ID['AutoContrast'], _autocontrast_lut(x), lut)
    lut = jnp.where(op == OP_ID['Equalize'], _equalize_lut(x), lut)
    out = _apply_lut(lut, x)
    for name in ('Color', 'Sharpness'):
      out = jnp.where(op == OP_ID[name], functions[name](x), out)
    x = jnp.where((stage == k + 1)[..., None], fill, out)
  return x / 255.0


def has_jitter(settings: ViewSettings) -> bool:
  return settings.photometric and bool(settings.brightness or settings.contrast)


def jitter_from_uniforms(
  u: Array, view: Array, settings: ViewSettings
) -> Array:
  """Contrast then brightness jitter from two U[0, 1) numbers."""
  b, c = settings.brightness, settings.contrast
  # Contrast first: its mean is then taken of the rendered view itself, which
  # XLA:CPU fuses well; a mean of the brightened view made a batch of jittered
  # views 3x slower to produce.
  if c:
    mean = view.mean()
    view = jnp.clip(mean + uniform(u[1], 1 - c, 1 + c) * (view - mean), 0, 1)
  if b:
    view = jnp.clip(view + uniform(u[0], -b, b), 0.0, 1.0)
  return view


def photometric(key: Array, view: Array, settings: ViewSettings) -> Array:
  """Contrast then brightness jitter, each clipped to [0, 1].

  Contrast maps x to mean + f * (x - mean), f ~ U[1 - c, 1 + c], with the
  mean over the whole view (all pixels and channels, fill included), as
  torchvision's ColorJitter does for grey images; brightness then adds
  delta ~ U[-b, b]. `view` is (S, S, C) float in [0, 1]; it comes back
  itself when jitter is off or zero.
  """
  if not has_jitter(settings):
    return view
  return jitter_from_uniforms(jax.random.uniform(key, (2,)), view, settings)

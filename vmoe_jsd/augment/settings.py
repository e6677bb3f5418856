"""What a view is made of: `ViewSettings` and RandAugment's table of ops.

RandAugment (Cubuk et al., "RandAugment: Practical automated data
augmentation with a reduced search space", CVPR-W 2020, arXiv:1909.13719)
as vmoe runs it: vmoe/data/pp_ops.py `randaug(num_layers, magnitude)` calls
`distort_image_with_randaugment` of the TPU EfficientNet code, of which
big_vision/pp/autoaugment.py is a copy. Its geometric ops compose into the
view's affine and its Cutout is an occlusion (geometry.py: both tracked, so
the patch maps stay exact and fill maps to -1); its colour ops act on pixel
values only (colour.py).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

# The 16 ops in the reference's order (the op id is the index); each layer
# picks one uniformly and always applies it.
RANDAUGMENT_OPS = (
  'AutoContrast', 'Equalize', 'Invert', 'Rotate',  # ids 0-3
  'Posterize', 'Solarize', 'Color', 'Contrast',  # 4-7
  'Brightness', 'Sharpness', 'ShearX', 'ShearY',  # 8-11
  'TranslateX', 'TranslateY', 'Cutout', 'SolarizeAdd',  # 12-15
)  # fmt: skip
# Composed into the view's affine (maps stay exact).
RANDAUGMENT_GEOMETRIC = (
  'Rotate',
  'ShearX',
  'ShearY',
  'TranslateX',
  'TranslateY',
)
# An occlusion: part of the view shows fill instead of content. Handled with
# the geometry (its square moves with later geometric ops; patch centres in
# it show no image point, so their maps say -1), kept when photometric=False.
RANDAUGMENT_OCCLUSION = ('Cutout',)
# Colour ops: pixel values only, maps untouched; off when photometric=False.
RANDAUGMENT_PHOTOMETRIC = tuple(
  op
  for op in RANDAUGMENT_OPS
  if op not in RANDAUGMENT_GEOMETRIC + RANDAUGMENT_OCCLUSION
)
OP_ID = {name: i for i, name in enumerate(RANDAUGMENT_OPS)}
# The reference's _MAX_LEVEL: every op scales magnitude / 10.
RANDAUGMENT_LEVEL = 10.0
_MAX_RANDAUGMENT_LAYERS = 8
_MAX_RANDAUGMENT_MAGNITUDE = 20.0


def is_int(value: Any) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
  return is_int(value) or isinstance(value, (float, np.floating))


def _is_pair(value: Any) -> bool:
  return (
    not isinstance(value, (str, bytes))
    and hasattr(value, '__len__')
    and len(value) == 2
  )


def _as_pair(name: str, value: Any) -> tuple[float, float]:
  """Returns `value` as a pair of floats or raises a ValueError naming it."""
  if not _is_pair(value) or not all(is_real(v) for v in value):
    raise ValueError(f'{name}={value!r} must be a pair of numbers (min, max).')
  return float(value[0]), float(value[1])


def _as_area_range(name: str, value: Any) -> tuple[float, float]:
  """`value` as a pair (min, max) with 0 < min <= max <= 1."""
  pair = _as_pair(name, value)
  if not 0 < pair[0] <= pair[1] <= 1:
    raise ValueError(f'{name}={value!r} must satisfy 0 < min <= max <= 1.')
  return pair


def _check_randaugment(value: Any) -> tuple[int, float] | None:
  """Validates `ViewSettings.randaugment`; returns it as (int, float)."""
  if value is None:
    return None
  if (
    not _is_pair(value)
    or not is_int(value[0])
    or not is_real(value[1])
    or not 1 <= value[0] <= _MAX_RANDAUGMENT_LAYERS
    or not 0 <= value[1] <= _MAX_RANDAUGMENT_MAGNITUDE
  ):
    raise ValueError(
      f'randaugment={value!r} must be None (off) or a pair (num_layers, '
      f'magnitude) with num_layers an integer in '
      f'[1, {_MAX_RANDAUGMENT_LAYERS}] and magnitude a number in '
      f'[0, {_MAX_RANDAUGMENT_MAGNITUDE}], e.g. (2, 10).'
    )
  return int(value[0]), float(value[1])


@dataclasses.dataclass(frozen=True)
class ViewSettings:
  """How to make one augmented view; hashable, so a static jit argument.

  Attributes:
    size: side S of the square output view, in pixels.
    patch_size: ViT patch size p; S must be a multiple of p.
    crop_scale: (min, max) area of the crop as a fraction of the source area,
      sampled uniformly (Szegedy et al., 2015). 0 < min <= max <= 1.
    crop_ratio: (min, max) aspect ratio width / height of the crop, sampled
      log-uniformly. 0 < min <= max.
    flip: flip the view horizontally with probability 0.5.
    rotate_degrees: rotate by an angle uniform in [-d, d] degrees about the
      view centre; 0 <= d <= 180. May show points outside the source (filled).
    translate: shift by a fraction of S uniform in [-t, t] on each axis;
      0 <= t <= 1. May show points outside the source (filled).
    fill_value: value of view pixels whose centre falls outside the source.
    brightness: add a delta uniform in [-b, b] (images in [0, 1]); 0 <= b <= 1.
    contrast: scale deviations from the view's mean by a factor uniform in
      [1 - c, 1 + c]; 0 <= c <= 1.
    photometric: False switches every photometric op off (brightness and
      contrast jitter, RandAugment's colour ops), keeping the geometry.
    randaugment: (num_layers N, magnitude M) of RandAugment (Cubuk et al.,
      2020) applied after the crop and flip, or None (off). N is an integer
      in [1, 8]; M a number in [0, 20] (vmoe's configs use 0 to 20; the ops
      scale M / 10). See `RANDAUGMENT_OPS` and geometry.py's layers.
    second_crop_scale: (min, max) crop area of view 2, or None (the same
      as `crop_scale`: the two views are identically distributed). Pairwise
      Router Consistency's (Kada et al., IEEE OJSP 2025) 384-px fine-tuning
      draws view 1 from 5-70% and view 2 from 60-100% of the image (its
      `decode_jpeg_and_ssl_augment`), so that the views overlap a lot.
  """

  size: int
  patch_size: int
  crop_scale: tuple[float, float] = (0.35, 1.0)
  crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
  flip: bool = True
  rotate_degrees: float = 0.0
  translate: float = 0.0
  fill_value: float = 0.0
  brightness: float = 0.0
  contrast: float = 0.0
  photometric: bool = True
  randaugment: tuple[int, float] | None = None
  second_crop_scale: tuple[float, float] | None = None

  def __post_init__(self):
    for name in ('size', 'patch_size'):
      value = getattr(self, name)
      if not is_int(value) or value <= 0:
        raise ValueError(f'{name}={value!r} must be a positive integer.')
    if self.size % self.patch_size:
      raise ValueError(
        f'size={self.size} must be a multiple of patch_size={self.patch_size}.'
      )
    # Lists (e.g. from a config) become tuples so the settings stay hashable.
    checked = {'crop_scale': _as_area_range('crop_scale', self.crop_scale)}
    ratio = checked['crop_ratio'] = _as_pair('crop_ratio', self.crop_ratio)
    if not 0 < ratio[0] <= ratio[1] or not math.isfinite(ratio[1]):
      raise ValueError(
        f'crop_ratio={self.crop_ratio!r} must satisfy 0 < min <= max < inf.'
      )
    if self.second_crop_scale is not None:
      checked['second_crop_scale'] = _as_area_range(
        'second_crop_scale', self.second_crop_scale
      )
    for name in ('flip', 'photometric'):
      value = getattr(self, name)
      if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f'{name}={value!r} must be a bool.')
      checked[name] = bool(value)
    for name in ('rotate_degrees', 'translate', 'brightness', 'contrast'):
      value = getattr(self, name)
      upper = 180.0 if name == 'rotate_degrees' else 1.0
      if not is_real(value) or not 0 <= value <= upper:
        raise ValueError(f'{name}={value!r} must be a number in [0, {upper}].')
      checked[name] = float(value)
    if not is_real(self.fill_value) or not math.isfinite(self.fill_value):
      raise ValueError(
        f'fill_value={self.fill_value!r} must be a finite number.'
      )
    checked['fill_value'] = float(self.fill_value)
    checked['randaugment'] = _check_randaugment(self.randaugment)
    for name, value in checked.items():
      object.__setattr__(self, name, value)

  @property
  def grid_size(self) -> int:
    """Patches per side of a view, S // p."""
    return self.size // self.patch_size

  @property
  def num_patches(self) -> int:
    """Patches per view, P = (S // p) ** 2."""
    return self.grid_size**2

  @classmethod
  def from_config(
    cls, cfg: Mapping[str, Any] | None, *, size: int, patch_size: int
  ) -> ViewSettings:
    """Builds settings from a dict or ml_collections.ConfigDict.

    `cfg` maps field names (all but `size` and `patch_size`) to values; lists
    are accepted for the pairs, missing keys keep their defaults, and None
    means all defaults. Raises a ValueError for an unknown key (the message
    lists the valid ones) or an invalid value (it names key and value).
    """
    if cfg is None:
      cfg = {}
    if hasattr(cfg, 'to_dict'):
      cfg = cfg.to_dict()
    fields = {f.name for f in dataclasses.fields(cls)}
    valid = sorted(fields - {'size', 'patch_size'})
    unknown = sorted(set(cfg) - set(valid))
    if unknown:
      raise ValueError(
        f'Unknown augmentation keys {unknown}; valid keys are {valid}.'
      )
    return cls(size=size, patch_size=patch_size, **dict(cfg))

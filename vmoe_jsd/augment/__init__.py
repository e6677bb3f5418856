"""Paired augmented views and their patch correspondences, in pure JAX.

Everything is a plain function of arrays: jit- and vmap-able, deterministic
given a PRNG key, no host callbacks. One module per job, each importing only
those above it in this list:

  settings.py   ViewSettings; RandAugment's op table (Cubuk et al., 2020)
  geometry.py   affine matrices, random resized crops, RandAugment's layers
  rendering.py  rendering a view; patch maps between views
  colour.py     RandAugment's colour ops; brightness and contrast jitter
  mixing.py     mixup of paired views (Zhang et al., 2018)
  views.py      paired_views, batched_paired_views, center_view

Typical use:

  settings = ViewSettings(size=224, patch_size=16)
  views, maps = paired_views(key, image, settings)  # (2, S, S, C), (2, P)
"""

from vmoe_jsd.augment.colour import photometric, randaugment_photometric  # noqa: F401
from vmoe_jsd.augment.geometry import (  # noqa: F401 - re-exported
  ViewGeometry,
  apply_affine,
  hflip,
  invert_affine,
  paired_affines,
  paired_geometry,
  rotation,
  sample_view_geometry,
  scaling,
  translation,
)
from vmoe_jsd.augment.mixing import mixup  # noqa: F401
from vmoe_jsd.augment.rendering import (  # noqa: F401 - re-exported
  fill_stages,
  patch_index_map,
  render_geometry,
  render_view,
)
from vmoe_jsd.augment.settings import (  # noqa: F401 - re-exported
  RANDAUGMENT_GEOMETRIC,
  RANDAUGMENT_OCCLUSION,
  RANDAUGMENT_OPS,
  RANDAUGMENT_PHOTOMETRIC,
  ViewSettings,
)
from vmoe_jsd.augment.views import (  # noqa: F401 - re-exported
  batched_paired_views,
  center_view,
  paired_views,
  to_model_range,
)

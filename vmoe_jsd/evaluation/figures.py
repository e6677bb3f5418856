"""Figures of routing: the routing-map picture and the analysis plots.

* `plot_routing_maps`: for a few test images, the image and its two
  augmented views (the evaluation's own views: each image keyed by its
  position in the split, as core.evaluation_views) side by side, each
  patch coloured by its top-1 expert, per MoE layer; matched patches whose
  top-1 differs from their partner's are crossed out, patches with no
  partner in the other view are hatched (the picture of router consistency
  of Kada et al., MIRU 2023).
* `plot_expert_by_class`, `plot_load_dropped`, `plot_flip_rates`: the
  analysis command's other figures (analyze.py).
* `RoutingMapWriter`: the routing-map figure in TensorBoard at each
  evaluation (train.py).

matplotlib is imported when a figure is drawn: training without figures
needs none.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vmoe_jsd import models
from vmoe_jsd.data import fashion_mnist
from vmoe_jsd.evaluation import core
from vmoe_jsd.models.spec import ModelSpec

# Distinct colours for up to 8 experts, painted over the view at
# EXPERT_ALPHA with the view's black lifted to VIEW_FLOOR grey: chosen so
# that any two experts stay at least 40 CIELAB units apart on a dark patch,
# on a light one and across the two (tests/test_figures.py). More experts
# cycle through matplotlib's tab20 (not checked).
EXPERT_COLOURS = (
  '#0000FF',  # blue
  '#FF8000',  # orange
  '#00C000',  # green
  '#FF00FF',  # magenta
  '#33BBEE',  # sky blue
  '#B00000',  # dark red
  '#FFFF00',  # yellow
  '#000080',  # navy
)
EXPERT_ALPHA = 0.7
VIEW_FLOOR = 0.5  # grey level black pixels of a view are drawn at


CENTRED = {'ha': 'center', 'va': 'center'}  # matplotlib text alignment
# The cross on a matched patch whose top-1 differs from its match's: black
# with a white rim, to read on every expert colour.
CROSS = {'color': 'black', 'linewidth': 1.6}
CROSS_KEY = (
  "crossed: the patch's match in the other view\n(the patch showing its "
  'centre point)\nchose another top-1 expert'
)
# Why the two views' crosses differ (the matching is one-way, per view).
CROSS_NOTE = (
  "Each view's patches are matched into the other view separately; the "
  'crops differ in scale and place,\nso several patches can share one '
  'match and some have none: the crosses of view 1 and view 2 differ.'
)


def expert_colour(e: int) -> str:
  if e < len(EXPERT_COLOURS):
    return EXPERT_COLOURS[e]
  import matplotlib  # noqa: PLC0415 - lazy: training draws no figure

  return matplotlib.colors.to_hex(matplotlib.colormaps['tab20'](e % 20))


# ----------------------------------------------------------------------------
# Data for the routing maps.
# ----------------------------------------------------------------------------
def make_routing_map_fn(eval_model, model: ModelSpec, settings, views_key):
  """jit-able (params, images, index, mask) -> views, maps and top-1
  experts per layer.

  The views are the evaluation's own (core.evaluation_views: each image
  keyed by its position `index` in the split), so the picture shows the
  views behind the routing figures beside it.

  Returns:
    A function returning {'views': (B, 2, S, S, C) in [0, 1], 'maps':
    (B, 2, P), 'top1': {block: (B, 2, P)}}.
  """
  layers, prefix = model.moe_layers, model.num_prefix_tokens

  def fn(params, images, index, mask):
    views, maps = core.evaluation_views(
      views_key, images, index, mask, settings
    )
    by_layer = core.router_logits_of_views(eval_model, params, views, layers)
    top1 = {
      b: jnp.argmax(models.paired_patches(lg, images.shape[0], prefix), -1)
      for b, lg in by_layer.items()
    }
    return {'views': views, 'maps': maps, 'top1': top1}

  return fn


def first_images(test_ds, model: ModelSpec, image_size: int, num: int):
  """The first test batch holding `num` images in whole routing groups."""
  unit = model.min_images_per_batch(image_size, evaluation=True)
  return next(iter(test_ds.eval_batches(unit * math.ceil(num / unit))))


def routing_map_data(fn, params, batch, num: int) -> dict:
  """`make_routing_map_fn`'s output for the first `num` images of batch."""
  out = jax.device_get(
    fn(params, *(jnp.asarray(batch[k]) for k in ('image', 'index', 'mask')))
  )
  return {
    'views': out['views'][:num],
    'maps': out['maps'][:num],
    'top1': {b: v[:num] for b, v in out['top1'].items()},
  }


# ----------------------------------------------------------------------------
# Figures (matplotlib, imported lazily: training without figures needs none).
# ----------------------------------------------------------------------------
def _pyplot():
  import matplotlib  # noqa: PLC0415 - lazy: training draws no figure

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # noqa: PLC0415 - after use('Agg')

  return plt


def _grey(image: np.ndarray) -> np.ndarray:
  raw = np.asarray(image)
  image = raw.astype(np.float32)
  if raw.dtype == np.uint8:
    image = image / 255.0
  return image[..., 0] if image.shape[-1] == 1 else image


def plot_routing_maps(
  images: np.ndarray,
  data: dict,
  patch_size: int,
  num_experts: int,
  class_names: list[str] | None = None,
  labels: np.ndarray | None = None,
  title: str = '',
):
  """The routing-map figure; returns the matplotlib Figure.

  Args:
    images: (B, H, W, C) the source test images.
    data: output of the `make_routing_map_fn` function (host numpy).
    patch_size: p.
    num_experts: E (legend).
    class_names: optional names of the classes.
    labels: optional (B,) labels.
    title: figure title.
  """
  plt = _pyplot()
  views, maps, top1 = data['views'], data['maps'], data['top1']
  blocks = sorted(top1)
  n = images.shape[0]
  cols = 1 + 2 * len(blocks)
  height = 2.5 * n + 1.9
  fig, axes = plt.subplots(n, cols, figsize=(2.1 * cols, height), squeeze=False)
  fig.subplots_adjust(
    left=0.01,
    right=0.99,
    top=1 - 0.85 / height,
    bottom=1.25 / height,
    hspace=0.45,
    wspace=0.06,
  )
  for i in range(n):
    name = ''
    if labels is not None:
      name = (
        class_names[int(labels[i])] if class_names else f'class {labels[i]}'
      )
    ax = axes[i, 0]
    ax.imshow(_grey(images[i]), cmap='gray', vmin=0, vmax=1)
    ax.set_title(f'test image {i}: {name}\n(original)', fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    for j, block in enumerate(blocks):
      for v in range(2):
        _draw_view(
          axes[i, 1 + 2 * j + v],
          views[i, v],
          maps[i, v],
          top1[block][i],
          v,
          patch_size,
          block,
        )
  handles = _routing_map_legend(num_experts)
  fig.legend(
    handles=handles,
    loc='lower center',
    ncol=min(len(handles), 6),
    fontsize=8,
    frameon=False,
    bbox_to_anchor=(0.5, 0.35 / height),
  )
  fig.text(0.5, 0.05 / height, CROSS_NOTE, ha='center', fontsize=7.5)
  fig.suptitle(
    (title or 'Top-1 expert of each patch in two augmented views') + '\n'
    "views: random crops / flips of the image; a patch's match is the patch "
    'of the other view that shows its centre point',
    fontsize=10,
    y=1 - 0.08 / height,
  )
  return fig


def _draw_view(ax, view, partner_map, top1, v: int, patch_size: int, block):
  """One view of one image in one MoE block: its patches coloured by their
  top-1 expert, unmatched ones hatched, matched ones that disagree crossed
  out; the title counts the matched patches that agree.

  Args:
    ax: the axes.
    view: (S, S, C) the view in [0, 1].
    partner_map: (P,) its patches' partners in the other view (-1: none).
    top1: (2, P) the top-1 expert of each patch of both views.
    v: which view (0 or 1).
    patch_size: p.
    block: the MoE block (title).
  """
  from matplotlib import patheffects  # noqa: PLC0415 - lazy matplotlib
  from matplotlib.patches import Rectangle  # noqa: PLC0415 - lazy matplotlib

  rim = [patheffects.withStroke(linewidth=3.2, foreground='white')]
  size = view.shape[0]
  grid = size // patch_size
  # Black lifted to VIEW_FLOOR grey so that the expert colours stay apart.
  floor = VIEW_FLOOR / (VIEW_FLOOR - 1)  # the vmin that draws 0 at the floor
  ax.imshow(_grey(view), cmap='gray', vmin=floor, vmax=1)
  other = top1[1 - v]
  agree = pairs = 0
  for k in range(grid * grid):
    r, c = divmod(k, grid)
    x0, y0 = c * patch_size - 0.5, r * patch_size - 0.5
    e = int(top1[v, k])
    square = functools.partial(Rectangle, (x0, y0), patch_size, patch_size)
    ax.add_patch(
      square(facecolor=expert_colour(e), alpha=EXPERT_ALPHA, ec='white', lw=0.5)
    )
    m = int(partner_map[k])
    if m < 0:
      ax.add_patch(square(fill=False, hatch='////', ec='black', lw=0))
      continue
    pairs += 1
    if int(other[m]) == e:
      agree += 1
      continue
    for ys in ((y0 + 1, y0 + patch_size - 1), (y0 + patch_size - 1, y0 + 1)):
      ax.plot(
        [x0 + 1, x0 + patch_size - 1], list(ys), **CROSS, path_effects=rim
      )
  ax.set_xlim(-0.5, size - 0.5)
  ax.set_ylim(size - 0.5, -0.5)
  ax.set_xticks([])
  ax.set_yticks([])
  ax.set_title(
    f'block {block}, view {v + 1}\n{agree}/{pairs} matched agree', fontsize=9
  )


def _routing_map_legend(num_experts: int) -> list:
  """The legend's handles: one colour per expert, the cross, the hatch."""
  from matplotlib.lines import Line2D  # noqa: PLC0415 - lazy matplotlib
  from matplotlib.patches import Patch  # noqa: PLC0415 - lazy matplotlib

  handles = [
    Patch(facecolor=expert_colour(e), alpha=EXPERT_ALPHA, label=f'expert {e}')
    for e in range(num_experts)
  ]
  handles.append(
    Line2D(
      [],
      [],
      color=CROSS['color'],
      marker='x',
      linestyle='none',
      markersize=8,
      markeredgewidth=CROSS['linewidth'],
      label=CROSS_KEY,
    )
  )
  handles.append(
    Patch(
      facecolor='white',
      edgecolor='black',
      hatch='////',
      label='no matched patch in the other view',
    )
  )
  return handles


def save_figure(fig, path: str, dpi: int = 110) -> None:
  """Writes `fig` to `path` (local) and closes it."""
  plt = _pyplot()
  fig.savefig(path, dpi=dpi)
  plt.close(fig)


def figure_to_array(fig) -> np.ndarray:
  """(H, W, 3) uint8 pixels of a matplotlib figure (then closed)."""
  plt = _pyplot()
  fig.canvas.draw()
  pixels = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
  plt.close(fig)
  return pixels


def class_shares(counts) -> np.ndarray:
  """(classes, E) share of each class's tokens per expert (0 for none)."""
  c = np.asarray(counts, np.float64)
  return c / np.maximum(c.sum(1, keepdims=True), 1)


def share_limits(shares) -> tuple[float, float]:
  """The colour scale of the expert_by_class figure: the smallest and the
  largest share over every layer (one colour bar for all of them)."""
  lo = min(float(np.min(s)) for s in shares)
  hi = max(float(np.max(s)) for s in shares)
  return lo, max(hi, lo + 1e-6)  # a flat table: a non-empty scale


def plot_expert_by_class(counts: dict, class_names: list[str]):
  """Heatmaps: per layer, share of each class's tokens sent to each expert,
  on one colour scale fitted to the shares (share_limits)."""
  plt = _pyplot()
  blocks = sorted(counts)
  shares = {b: class_shares(counts[b]) for b in blocks}
  lo, hi = share_limits(shares.values())
  fig, axes = plt.subplots(
    1,
    len(blocks),
    figsize=(2.0 + 3.2 * len(blocks), 4.4),
    squeeze=False,
    layout='constrained',
  )
  for j, block in enumerate(blocks):
    share = shares[block]
    ax = axes[0, j]
    im = ax.imshow(share, cmap='viridis', vmin=lo, vmax=hi, aspect='auto')
    ax.set_xticks(range(share.shape[1]))
    ax.set_xticklabels([f'{e}' for e in range(share.shape[1])])
    ax.set_yticks(range(share.shape[0]))
    ax.set_yticklabels(class_names if j == 0 else [])
    ax.set_xlabel('top-1 expert')
    if j == 0:
      ax.set_ylabel('class (true label)')
    ax.set_title(f'block {block}')
    for r in range(share.shape[0]):
      for e in range(share.shape[1]):
        light = share[r, e] > (lo + hi) / 2  # viridis: yellow at the top
        colour = 'black' if light else 'white'
        ax.text(e, r, f'{share[r, e]:.2f}', **CENTRED, fontsize=7, color=colour)
  fig.colorbar(
    im,
    ax=axes[0].tolist(),
    label="share of the class's patch tokens whose top-1 is the expert\n"
    f"(each row sums to 1; scale {lo:.2f} to {hi:.2f}: the data's range)",
  )
  fig.suptitle('Which expert each class is routed to (clean test view)')
  return fig


def plot_load_dropped(routing: dict):
  """Bars: per layer, top-1 load per expert vs 1/E; dropped fraction."""
  plt = _pyplot()
  layers = list(routing)
  fig, axes = plt.subplots(
    1, len(layers), figsize=(0.6 + 3.2 * len(layers), 3.4), squeeze=False
  )
  for j, layer in enumerate(layers):
    r = routing[layer]
    load = np.asarray(r['load'])
    ax = axes[0, j]
    ax.bar(
      range(len(load)), load, color=[expert_colour(e) for e in range(len(load))]
    )
    for share, colour, style, label in (
      (1, 'black', '--', 'fair share 1/E'),
      (2, 'red', ':', '2 x fair share'),
    ):
      ax.axhline(share / len(load), color=colour, ls=style, lw=1, label=label)
    ax.set_xticks(range(len(load)))
    ax.set_xlabel('expert')
    ax.set_ylabel('fraction of patch tokens (top-1)')
    ax.set_ylim(0, max(0.6, float(load.max()) * 1.15))
    ax.set_title(
      f'{layer.replace("encoderblock_", "block ")}: dropped '
      f'{r.get("dropped", float("nan")):.3f}',
      fontsize=10,
    )
    if j == 0:
      ax.legend(fontsize=8, loc='upper right')
  fig.suptitle('Expert load (top-1) and dropped token choices, test set')
  fig.tight_layout()
  return fig


def plot_flip_rates(stab: dict):
  """Grouped bars: per layer, top-1 flip rate under each perturbation."""
  plt = _pyplot()
  rates = stab['flip_rate']
  layers = list(rates)
  names = list(next(iter(rates.values())))
  fig, ax = plt.subplots(figsize=(2.0 + 1.2 * len(names), 3.8))
  width = 0.8 / len(layers)
  for j, layer in enumerate(layers):
    x = np.arange(len(names)) + (j - (len(layers) - 1) / 2) * width
    values = [rates[layer][n] for n in names]
    ax.bar(x, values, width, label=layer.replace('encoderblock_', 'block '))
    for xi, v in zip(x, values, strict=True):
      ax.text(xi, v, f'{v:.3f}', ha='center', va='bottom', fontsize=7)
  labels = [
    n.replace('noise_', 'noise sd ').replace('shift_', 'shift ')
    + (' px' if n.startswith('shift') else '')
    for n in names
  ]
  ax.set_xticks(range(len(names)))
  ax.set_xticklabels(labels)
  ax.set_ylabel('fraction of patches whose\ntop-1 expert flips')
  ax.set_xlabel('perturbation of the clean test view')
  ax.set_title(
    f'Top-1 flips on {stab["num_examples"]} test images\n(noise sd on '
    'pixels in [0, 1]; shifts down and right, averaged)',
    fontsize=10,
  )
  ax.legend(fontsize=8)
  fig.tight_layout()
  return fig


# ----------------------------------------------------------------------------
# TensorBoard hook for train.py.
# ----------------------------------------------------------------------------
@dataclasses.dataclass
class RoutingMapWriter:
  """Writes the routing-map figure of a few fixed test images to TensorBoard
  at each evaluation (`write(writer, step, params)`)."""

  num: int
  batch: dict[str, np.ndarray]
  fn: Any  # jitted make_routing_map_fn
  patch_size: int
  num_experts: int
  class_names: list[str]

  @classmethod
  def build(cls, ctx, test_ds) -> RoutingMapWriter | None:
    """From the registry's Context (config.evaluate.routing_map_images);
    None without images to draw or without MoE layers."""
    spec = ctx.spec
    num, model, settings = (
      spec.evaluate.routing_map_images,
      spec.model,
      spec.views,
    )
    if not num or not model.moe_layers:
      return None
    batch = first_images(test_ds, model, settings.size, num)
    fn = jax.jit(
      make_routing_map_fn(ctx.eval_model, model, settings, ctx.views_key)
    )
    label_count = int(np.max(batch['label'])) + 1
    names = class_names_for(spec.test_data.name, label_count)
    return cls(
      num, dict(batch), fn, settings.patch_size, model.num_experts, names
    )

  def write(self, writer, step: int, params) -> None:
    n = self.num
    fig = plot_routing_maps(
      np.asarray(self.batch['image'])[:n],
      routing_map_data(self.fn, params, self.batch, n),
      self.patch_size,
      self.num_experts,
      self.class_names,
      np.asarray(self.batch['label'])[:n],
      title=f'Top-1 expert per patch, two views (step {step})',
    )
    writer.write_images(step, {'routing_maps': figure_to_array(fig)[None]})


def class_names_for(dataset_name: str, num_classes: int) -> list[str]:
  if dataset_name == 'fashion_mnist':
    return list(fashion_mnist.CLASS_NAMES)
  return [f'class {c}' for c in range(num_classes)]

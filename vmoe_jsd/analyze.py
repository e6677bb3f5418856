r"""Routing analysis of a trained checkpoint: figures, JSON and Markdown.

  python -m vmoe_jsd.analyze --config=configs/default.py \
      --workdir=runs/default [--out=runs/default/analysis] [--num_images=4]

Loads the latest checkpoint of --workdir and writes to --out:
  * routing_maps.png: for a few test images, the image and its two augmented
    views (the evaluation's views: fixed key) side by side, each patch
    coloured by its top-1 expert, per MoE layer; matched patches whose top-1
    differs from their partner's are crossed out, patches with no partner in
    the other view are hatched. This is the picture of router consistency of
    Kada et al. (MIRU 2023).
  * expert_by_class.png: per MoE layer, the share of each class's patch
    tokens whose top-1 is each expert (clean evaluation view).
  * load_dropped.png: per MoE layer, the top-1 load of each expert against
    the fair share 1/E, and the fraction of dropped token choices.
  * flip_rates.png: per MoE layer, the top-1 flip rate under pixel noise and
    1/2-pixel shifts (stability.py).
  * results.json (every number) and summary.md (tables, the augmentation
    the routing figures were measured under, the list of files).

The same routing-map figure goes to TensorBoard at each evaluation
(`write_routing_map`, called from train.py).
"""

from __future__ import annotations

import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from vmoe_jsd import augment, config_lib, evaluate, models

Array = jax.Array

# Distinct colours (Okabe-Ito, colour-blind safe) for up to 8 experts; more
# experts cycle through matplotlib's tab20.
EXPERT_COLOURS = (
  '#0072B2', '#E69F00', '#009E73', '#CC79A7',
  '#56B4E9', '#D55E00', '#F0E442', '#999999',
)  # fmt: skip


def expert_colour(e: int) -> str:
  if e < len(EXPERT_COLOURS):
    return EXPERT_COLOURS[e]
  import matplotlib  # noqa: PLC0415

  return matplotlib.colors.to_hex(matplotlib.colormaps['tab20'](e % 20))


def describe_augmentation(settings: augment.ViewSettings) -> str:
  """One sentence naming the augmentation of the evaluation's two views."""
  s = settings
  parts = [
    f'random resized crop of {s.crop_scale[0]:g}-{s.crop_scale[1]:g} of the '
    f'area, aspect ratio {s.crop_ratio[0]:.3g}-{s.crop_ratio[1]:.3g}, '
    f'resized to {s.size}x{s.size}'
  ]
  if s.flip:
    parts.append('horizontal flip with probability 0.5')
  if s.rotate_degrees:
    parts.append(f'rotation up to {s.rotate_degrees:g} degrees')
  if s.translate:
    parts.append(f'translation up to {s.translate:g} of the side')
  if s.randaugment:
    parts.append(f'RandAugment{tuple(s.randaugment)}')
  if s.photometric and s.brightness:
    parts.append(f'brightness +-{s.brightness:g}')
  if s.photometric and s.contrast:
    parts.append(f'contrast x(1 +- {s.contrast:g})')
  return (
    'two independent views per test image (' + '; '.join(parts) + '), drawn '
    'with a fixed key derived from config.seed, the same as the training '
    'augmentation; patch pairs matched by the image point at the patch '
    f'centre (patch {s.patch_size})'
  )


# ----------------------------------------------------------------------------
# Data for the figures.
# ----------------------------------------------------------------------------
def make_routing_map_fn(config, eval_model, settings):
  """jit-able (params, images) -> views, maps and top-1 experts per layer.

  The views are those the evaluation makes for its first batch (same key).

  Returns:
    A function returning {'views': (B, 2, S, S, C) in [0, 1], 'maps':
    (B, 2, P), 'top1': {block: (B, 2, P)}}.
  """
  layers = config_lib.moe_layers(config.model)
  prefix = config_lib.num_prefix_tokens(config.model)
  key = jax.random.fold_in(
    jax.random.fold_in(jax.random.key(config.seed), 2), 0
  )

  def fn(params, images):
    views, maps = augment.batched_paired_views(key, images, settings)
    n = images.shape[0]
    by_layer = evaluate.router_logits_of_views(
      eval_model, params, views, layers
    )
    top1 = {
      b: jnp.argmax(models.per_image_patches(lg, 2 * n, prefix), -1).reshape(
        n, 2, -1
      )
      for b, lg in by_layer.items()
    }
    return {'views': views, 'maps': maps, 'top1': top1}

  return fn


def make_class_counts_fn(config, eval_model, settings, num_classes: int):
  """jit-able (params, images, labels, mask) -> {block: (classes, E) counts}.

  Counts the patch tokens of the clean evaluation view of each class whose
  top-1 expert is each expert.
  """
  layers = config_lib.moe_layers(config.model)
  prefix = config_lib.num_prefix_tokens(config.model)

  def fn(params, images, labels, mask):
    center = jax.vmap(lambda im: augment.center_view(im, settings))(images)
    _, state = eval_model.apply(
      {'params': params},
      augment.to_model_range(center),
      mutable=['intermediates'],
    )
    by_layer = models.router_logits_by_layer(state['intermediates'], layers)
    cls = jax.nn.one_hot(labels, num_classes) * mask[:, None]  # (B, C)
    out = {}
    for b, lg in by_layer.items():
      patches = models.per_image_patches(lg, images.shape[0], prefix)
      experts = jax.nn.one_hot(jnp.argmax(patches, -1), lg.shape[-1])
      out[b] = jnp.einsum('bc,bpe->ce', cls, experts)
    return out

  return fn


# ----------------------------------------------------------------------------
# Figures (matplotlib, imported lazily: training without figures needs none).
# ----------------------------------------------------------------------------
def _pyplot():
  import matplotlib  # noqa: PLC0415

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # noqa: PLC0415

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
  from matplotlib.lines import Line2D  # noqa: PLC0415
  from matplotlib.patches import Patch, Rectangle  # noqa: PLC0415

  views, maps, top1 = data['views'], data['maps'], data['top1']
  blocks = sorted(top1)
  n = images.shape[0]
  size = views.shape[2]
  grid = size // patch_size
  cols = 1 + 2 * len(blocks)
  height = 2.5 * n + 1.2
  fig, axes = plt.subplots(n, cols, figsize=(2.1 * cols, height),
                           squeeze=False)  # fmt: skip
  fig.subplots_adjust(
    left=0.01, right=0.99, top=1 - 0.85 / height, bottom=0.55 / height,
    hspace=0.45, wspace=0.06,
  )  # fmt: skip
  for i in range(n):
    ax = axes[i, 0]
    ax.imshow(_grey(images[i]), cmap='gray', vmin=0, vmax=1)
    name = ''
    if labels is not None:
      name = (
        class_names[int(labels[i])] if class_names else f'class {labels[i]}'
      )
    ax.set_title(f'test image {i}: {name}\n(original)', fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    for j, block in enumerate(blocks):
      t = top1[block][i]  # (2, P)
      for v in range(2):
        ax = axes[i, 1 + 2 * j + v]
        # Black lifted to mid grey so that the expert colours stay visible.
        ax.imshow(_grey(views[i, v]), cmap='gray', vmin=-0.8, vmax=1)
        partner_map = maps[i, v]
        other = t[1 - v]
        agree = pairs = 0
        for k in range(grid * grid):
          r, c = divmod(k, grid)
          e = int(t[v, k])
          ax.add_patch(
            Rectangle(
              (c * patch_size - 0.5, r * patch_size - 0.5),
              patch_size, patch_size,
              facecolor=expert_colour(e), alpha=0.55, edgecolor='white',
              linewidth=0.5,
            )
          )  # fmt: skip
          m = int(partner_map[k])
          if m < 0:
            ax.add_patch(
              Rectangle(
                (c * patch_size - 0.5, r * patch_size - 0.5),
                patch_size, patch_size, fill=False, hatch='////',
                edgecolor='black', linewidth=0,
              )
            )  # fmt: skip
            continue
          pairs += 1
          if int(other[m]) == e:
            agree += 1
          else:
            x0, y0 = c * patch_size - 0.5, r * patch_size - 0.5
            ax.plot(
              [x0 + 1, x0 + patch_size - 1], [y0 + 1, y0 + patch_size - 1],
              color='red', linewidth=1.6,
            )  # fmt: skip
            ax.plot(
              [x0 + 1, x0 + patch_size - 1], [y0 + patch_size - 1, y0 + 1],
              color='red', linewidth=1.6,
            )  # fmt: skip
        ax.set_xlim(-0.5, size - 0.5)
        ax.set_ylim(size - 0.5, -0.5)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(
          f'block {block}, view {v + 1}\n{agree}/{pairs} matched agree',
          fontsize=9,
        )
  handles = [
    Patch(facecolor=expert_colour(e), alpha=0.6, label=f'expert {e}')
    for e in range(num_experts)
  ]
  handles.append(
    Line2D([], [], color='red', marker='x', linestyle='none',
           markersize=8, label='top-1 differs from matched patch')
  )  # fmt: skip
  handles.append(
    Patch(facecolor='white', edgecolor='black', hatch='////',
          label='no matched patch in the other view')
  )  # fmt: skip
  fig.legend(
    handles=handles, loc='lower center', ncol=min(len(handles), 6),
    fontsize=8, frameon=False, bbox_to_anchor=(0.5, 0.0),
  )  # fmt: skip
  fig.suptitle(
    (title or 'Top-1 expert of each patch in two augmented views') + '\n'
    "views: random crops / flips of the image; a patch's match is the patch "
    'of the other view that shows its centre point',
    fontsize=10, y=1 - 0.08 / height,
  )  # fmt: skip
  return fig


def figure_to_array(fig) -> np.ndarray:
  """(H, W, 3) uint8 pixels of a matplotlib figure (then closed)."""
  plt = _pyplot()
  fig.canvas.draw()
  pixels = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
  plt.close(fig)
  return pixels


def plot_expert_by_class(counts: dict, class_names: list[str]):
  """Heatmaps: per layer, share of each class's tokens sent to each expert."""
  plt = _pyplot()
  blocks = sorted(counts)
  fig, axes = plt.subplots(
    1, len(blocks), figsize=(2.0 + 3.2 * len(blocks), 4.4), squeeze=False,
    layout='constrained',
  )  # fmt: skip
  for j, block in enumerate(blocks):
    c = np.asarray(counts[block], np.float64)
    share = c / np.maximum(c.sum(1, keepdims=True), 1)
    ax = axes[0, j]
    im = ax.imshow(share, cmap='viridis', vmin=0, vmax=1, aspect='auto')
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
        colour = 'white' if share[r, e] < 0.6 else 'black'
        ax.text(e, r, f'{share[r, e]:.2f}', ha='center', va='center',
                fontsize=7, color=colour)  # fmt: skip
  fig.colorbar(im, ax=axes[0].tolist(), label="share of the class's patches")
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
    ax.bar(range(len(load)), load,
           color=[expert_colour(e) for e in range(len(load))])  # fmt: skip
    ax.axhline(1 / len(load), color='black', linestyle='--', linewidth=1,
               label='fair share 1/E')  # fmt: skip
    ax.axhline(2 / len(load), color='red', linestyle=':', linewidth=1,
               label='2 x fair share')  # fmt: skip
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
    n.replace('noise_', 'noise sd ').replace('shift_', 'shift ') + (
      ' px' if n.startswith('shift') else '')
    for n in names
  ]  # fmt: skip
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
class RoutingMapWriter:
  """Writes the routing-map figure of a few fixed test images to TensorBoard.

  Built once (first images of the test split, jitted routing function);
  `write(writer, step, params)` at each evaluation.
  """

  def __init__(self, config, eval_model, settings, test_ds):
    self.num = int(config.evaluate.get('routing_map_images', 0) or 0)
    self.layers = config_lib.moe_layers(config.model)
    if not self.num or not self.layers:
      self.num = 0
      return
    # Whole routing groups: load a multiple of the fewest images that fill
    # them, draw the first `num`.
    unit = config_lib.min_images_per_batch(
      config_lib.eval_model_config(config), settings.size
    )
    batch = next(iter(test_ds.eval_batches(unit * math.ceil(self.num / unit))))
    self.images = np.asarray(batch['image'])
    self.labels = np.asarray(batch['label'])
    self.fn = jax.jit(make_routing_map_fn(config, eval_model, settings))
    self.patch = settings.patch_size
    self.num_experts = models.resolve_model_config(config.model)['encoder'][
      'moe'
    ]['num_experts']
    self.class_names = class_names_for(config, self.labels.max() + 1)

  def write(self, writer, step: int, params) -> None:
    if not self.num:
      return
    data = jax.device_get(self.fn(params, jnp.asarray(self.images)))
    n = self.num
    data = {
      'views': data['views'][:n],
      'maps': data['maps'][:n],
      'top1': {b: v[:n] for b, v in data['top1'].items()},
    }
    fig = plot_routing_maps(
      self.images[:n], data, self.patch, self.num_experts, self.class_names,
      self.labels[:n], title=f'Top-1 expert per patch, two views (step {step})',
    )  # fmt: skip
    writer.write_images(step, {'routing_maps': figure_to_array(fig)[None]})


def class_names_for(config, num_classes: int) -> list[str]:
  if config.dataset.test.get('name') == 'fashion_mnist':
    from vmoe_jsd.data import fashion_mnist  # noqa: PLC0415

    return list(fashion_mnist.CLASS_NAMES)
  return [f'class {c}' for c in range(num_classes)]


# ----------------------------------------------------------------------------
# The command.
# ----------------------------------------------------------------------------
def analyze(config, workdir: str, out: str, num_images: int = 4) -> dict:
  """Loads the latest checkpoint of `workdir`; writes figures and summaries.

  Returns:
    The results dict written to out/results.json.
  """
  from vmoe_jsd import (  # noqa: PLC0415
    data,
    initialization,
    sharding,
    stability,
  )
  from vmoe_jsd.models import build_model  # noqa: PLC0415

  t0 = time.time()
  os.makedirs(out, exist_ok=True)
  config_lib.validate(config, jax.device_count())
  if not config_lib.moe_layers(config.model):
    raise ValueError(
      'analyze needs a model with MoE layers (model.encoder.moe)'
    )
  settings = config_lib.view_settings(config)
  eval_model = build_model(
    config_lib.eval_model_config(config), deterministic=True
  )
  test_ds = data.get_dataset(config.dataset.test)
  images_per_batch = config_lib.min_images_per_batch(
    config_lib.eval_model_config(config), settings.size
  )
  shape = (images_per_batch, settings.size, settings.size,
           test_ds.image_shape[-1])  # fmt: skip
  abstract = jax.eval_shape(
    lambda: eval_model.init(jax.random.key(0), jnp.zeros(shape))['params']
  )
  params, _ = initialization.load_initial_params(
    {'source': 'orbax', 'path': workdir, 'keep_head': True, 'strict': True},
    abstract,
  )
  mesh = sharding.make_mesh(config.get('num_expert_partitions', 1))
  put_batch = sharding.make_put_batch(mesh)
  num_classes = int(models.resolve_model_config(config.model)['num_classes'])
  class_names = class_names_for(config, num_classes)
  num_experts = int(
    models.resolve_model_config(config.model)['encoder']['moe']['num_experts']
  )
  with jax.set_mesh(mesh):
    params = jax.device_put(
      params,
      sharding.tree_shardings(
        params, mesh,
        config.get('params_axis_resources') or sharding.DEFAULT_RULES,
      ),
    )  # fmt: skip
    # Accuracy and the routing figures of the evaluation (full test split).
    eval_step = jax.jit(evaluate.make_eval_step(config, eval_model, settings))
    result = evaluate.run_evaluation(eval_step, params, test_ds, config,
                                     put_batch)  # fmt: skip
    # Stability.
    stab_step = jax.jit(
      stability.make_stability_step(config, eval_model, settings)
    )
    stab = stability.run_stability(stab_step, params, test_ds, config,
                                   put_batch)  # fmt: skip
    # Expert-by-class counts over the evaluated images.
    count_fn = jax.jit(
      make_class_counts_fn(config, eval_model, settings, num_classes)
    )
    counts: dict[int, np.ndarray] = {}
    for batch in test_ds.eval_batches(
      config.dataset.test.batch_size, limit=config.evaluate.get('limit')
    ):
      c = jax.device_get(
        count_fn(params, *put_batch(batch['image'], batch['label'],
                                    batch['mask']))
      )  # fmt: skip
      for b, v in c.items():
        counts[b] = counts.get(b, 0) + np.asarray(v, np.float64)
    # Routing maps of the first images (the evaluation's first views).
    first = next(iter(test_ds.eval_batches(images_per_batch * math.ceil(
      num_images / images_per_batch))))  # fmt: skip
    map_fn = jax.jit(make_routing_map_fn(config, eval_model, settings))
    maps_data = jax.device_get(map_fn(params, jnp.asarray(first['image'])))
  keep = slice(0, num_images)
  maps_data = {
    'views': maps_data['views'][keep],
    'maps': maps_data['maps'][keep],
    'top1': {b: v[keep] for b, v in maps_data['top1'].items()},
  }
  plt = _pyplot()
  files = {}

  def save(fig, name):
    path = os.path.join(out, name)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    files[name] = path

  step = _latest_step(workdir)
  save(
    plot_routing_maps(
      np.asarray(first['image'])[keep], maps_data, settings.patch_size,
      num_experts, class_names, np.asarray(first['label'])[keep],
      title=f'Top-1 expert per patch in two augmented views (step {step})',
    ),
    'routing_maps.png',
  )  # fmt: skip
  save(plot_expert_by_class(counts, class_names), 'expert_by_class.png')
  save(plot_load_dropped(result['routing']), 'load_dropped.png')
  if stab:
    save(plot_flip_rates(stab), 'flip_rates.png')
  summary = {
    'workdir': os.path.abspath(workdir),
    'step': step,
    'accuracy': result['accuracy'],
    'num_examples': result['num_examples'],
    'routing': result['routing'],
    'augmentation': describe_augmentation(settings),
    'stability': stab,
    'expert_by_class': {
      f'encoderblock_{b}': (c / np.maximum(c.sum(1, keepdims=True), 1)).tolist()
      for b, c in sorted(counts.items())
    },
    'class_names': class_names,
    'consistency': config_lib.to_dict(config.consistency),
    'files': sorted(files),
  }
  summary['seconds'] = time.time() - t0
  with open(os.path.join(out, 'results.json'), 'w') as f:
    json.dump(summary, f, indent=1)
  with open(os.path.join(out, 'summary.md'), 'w') as f:
    f.write(format_summary(summary))
  return summary


def _latest_step(workdir: str) -> int | None:
  ckpt = os.path.join(workdir, 'checkpoints')
  steps = [int(d) for d in os.listdir(ckpt) if d.isdigit()] if os.path.isdir(
    ckpt) else []  # fmt: skip
  return max(steps) if steps else None


def format_summary(s: dict) -> str:
  """summary.md from the results dict."""
  from vmoe_jsd import stability  # noqa: PLC0415

  lines = [
    f'# Routing analysis of `{s["workdir"]}` (step {s["step"]})',
    '',
    f'Test accuracy **{100 * s["accuracy"]:.2f}%** on {s["num_examples"]} '
    'images (clean, centred view).',
    '',
    f'Consistency loss: `{s["consistency"].get("loss")}`, weight '
    f'{s["consistency"].get("weight")}.',
    '',
    '## Routing across views',
    '',
    f'Measured under: {s["augmentation"]}.',
    '',
    '| layer | agree | chance | kappa | JSD | conf | H/Hmax | dropped | load |',
    '| --- | --- | --- | --- | --- | --- | --- | --- | --- |',
  ]
  for layer, r in s['routing'].items():
    load = ' '.join(f'{x:.2f}' for x in r['load'])
    lines.append(
      f'| {layer} | {r["agreement"]:.3f} | {r["chance"]:.3f} | '
      f'{r["kappa"]:.3f} | {r["jsd"]:.4f} | {r["confidence"]:.2f} | '
      f'{r["entropy_fraction"]:.2f} | {r.get("dropped", float("nan")):.3f} '
      f'| {load} |'
    )
  lines += [
    '',
    'agree: matched patch pairs with the same top-1 expert; chance: '
    'sum_e load_e^2; kappa = (agree - chance) / (1 - chance); conf: mean top '
    'router probability; H/Hmax: router entropy / ln E; load: top-1 share '
    'of each expert over the patch tokens of both views; dropped: token '
    'choices over capacity on the clean view.',
  ]
  if s.get('stability'):
    st = s['stability']
    lines += [
      '',
      '## Routing stability (top-1 flip rate)',
      '',
      f'On the first {st["num_examples"]} test images, clean centred view '
      f'vs Gaussian pixel noise (sd {", ".join(map(str, st["noise_std"]))} '
      'on pixels in [0, 1]) and shifts of '
      f'{", ".join(map(str, st["shifts"]))} pixels (down and right, '
      'averaged; exact patch correspondence, see stability.py).',
      '',
      '```',
      stability.format_stability_table(st),
      '```',
    ]
  lines += ['', '## Files', '']
  lines += [f'- `{name}`' for name in s['files']]
  lines += ['- `results.json`: every number above', '']
  return '\n'.join(lines)


def main(argv):
  del argv
  from absl import flags  # noqa: PLC0415

  flag_values = flags.FLAGS
  workdir = flag_values.workdir
  out = flag_values.out or os.path.join(workdir, 'analysis')
  summary = analyze(
    flag_values.config, workdir, out, num_images=flag_values.num_images
  )
  print(format_summary(summary))
  print(f'Wrote {out} in {summary["seconds"]:.1f}s')


if __name__ == '__main__':
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  from absl import app, flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file(
    'config', None, 'Config file of the run.', lock_config=True
  )
  flags.DEFINE_string('workdir', None, 'Training workdir (checkpoints/).')
  flags.DEFINE_string('out', None, 'Output folder (default WORKDIR/analysis).')
  flags.DEFINE_integer('num_images', 4, 'Test images in the routing maps.')
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main)

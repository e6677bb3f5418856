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

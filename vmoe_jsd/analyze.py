r"""Routing analysis of a trained checkpoint: figures, JSON and Markdown.

  python -m vmoe_jsd.analyze --config=configs/default.py \
      --workdir=runs/default [--out=runs/default/analysis] [--num_images=4]

Loads the newest readable checkpoint of --workdir (local or gs://) and
writes to --out (a local folder):
  * routing_maps.png: for a few test images, the image and its two augmented
    views (the evaluation's own: each image keyed by its position in the
    split) side by side, each patch coloured by its top-1 expert, per MoE
    layer; matched patches whose top-1 differs from their partner's are
    crossed out, patches with no partner in the other view are hatched. This
    is the picture of router consistency of Kada et al. (MIRU 2023).
  * expert_by_class.png: per MoE layer, the share of each class's patch
    tokens whose top-1 is each expert (clean evaluation view).
  * load_dropped.png: per MoE layer, the top-1 load of each expert against
    the fair share 1/E, and the fraction of dropped token choices.
  * flip_rates.png: per MoE layer, the top-1 flip rate under pixel noise and
    1/2-pixel shifts (stability.py).
  * results.json (every number) and summary.md (tables, the augmentation
    the routing figures were measured under, the list of files).

A bad config, a model without MoE layers, a --workdir that does not exist or
holds no readable checkpoint end the command with one line on stderr (exit
status 2), as for main and eval_main.

The figures are drawn by figures.py, whose routing-map figure also goes to
TensorBoard at each evaluation (figures.RoutingMapWriter, from train.py).
The config is resolved once (config_lib.validate); the measurements are
those of the evaluation, through the evaluation registry
(evaluation/registry.py: accuracy, stability, expert_by_class), on the
parameters that initialization.load_eval_params loads.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from vmoe_jsd import (
  augment,
  cli,
  config_lib,
  initialization,
  paths,
  resilience,
  sharding,
)
from vmoe_jsd.evaluation import figures, registry


class CheckpointError(RuntimeError):
  """The workdir has no checkpoint that analyze can read (one line)."""


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
@dataclasses.dataclass(frozen=True)
class Measurements:
  """What the figures and the summary are made of (host values).

  Attributes:
    step: the step of the checkpoint that was loaded (None: not known).
    result: accuracy.run_evaluation's accuracy and routing figures.
    stability: stability.run_stability's flip rates ({} when off).
    counts: {block: (classes, E) float64} top-1 counts per class.
    first: the first test images (figures.first_images).
    maps: figures.routing_map_data of the first `num_images` of them.
  """

  step: int | None
  result: dict[str, Any]
  stability: dict[str, Any]
  counts: dict[int, np.ndarray]
  first: dict[str, np.ndarray]
  maps: dict[str, Any]


def measure(
  spec: config_lib.RunSpec, workdir: str, num_images: int
) -> Measurements:
  """Loads the newest readable checkpoint of `workdir` (local or gs://) and
  measures the test split as the evaluation does (evaluation/registry.py)."""
  mesh = sharding.make_mesh(spec.num_expert_partitions)
  settings, model = spec.views, spec.model
  test_ds = spec.test_data.load()
  try:
    params, report = initialization.load_eval_params(
      model,
      settings.size,
      test_ds.image_shape[-1],
      workdir,
      'orbax',
      mesh,
      spec.params_rules,
    )
  except (FileNotFoundError, ValueError) as e:  # No (readable) checkpoint.
    raise CheckpointError(f'--workdir={workdir}: {cli.one_line(e)}') from None
  names = ('accuracy', 'stability', 'expert_by_class')
  evaluator = registry.Evaluator(spec, mesh, names)
  result, stab, counts = (evaluator(n, params, test_ds) for n in names)
  # Routing maps of the first images: the evaluation's own views, computed
  # as train.py's figure is (outside the mesh: a few images, whatever the
  # number of devices).
  ctx = evaluator.ctx
  first = figures.first_images(test_ds, model, settings.size, num_images)
  map_fn = jax.jit(
    figures.make_routing_map_fn(ctx.eval_model, model, settings, ctx.views_key)
  )
  maps = figures.routing_map_data(map_fn, params, first, num_images)
  return Measurements(
    report.get('step'), result, stab, counts, dict(first), maps
  )


# ----------------------------------------------------------------------------
# The command.
# ----------------------------------------------------------------------------
def analyze(config, workdir: str, out: str, num_images: int = 4) -> dict:
  """Loads the latest checkpoint of `workdir`; writes figures and summaries.

  Args:
    config: the run's config (resolved here, once).
    workdir: the training workdir, local or gs://.
    out: the local output folder.
    num_images: test images in the routing maps.

  Returns:
    The results dict written to out/results.json.

  Raises:
    cli.CliError: the config is invalid, has no MoE layer, or `workdir`
      does not exist.
    CheckpointError: `workdir` holds no readable checkpoint.
  """
  spec = cli.check_config(config, jax.device_count())
  check_workdir(spec, workdir)
  return analyze_spec(spec, workdir, out, num_images)


def check_workdir(spec: config_lib.RunSpec, workdir: str) -> None:
  """What analyze checks before it loads anything (raises cli.CliError)."""
  if not spec.model.moe_layers:
    raise cli.CliError(
      'analyze needs a model with MoE layers (model.encoder.moe.layers)'
    )
  if not paths.exists(workdir):
    raise cli.CliError(f'--workdir={workdir} does not exist')


def analyze_spec(
  spec: config_lib.RunSpec, workdir: str, out: str, num_images: int = 4
) -> dict:
  """`analyze` of an already resolved and checked config."""
  t0 = time.time()
  m = measure(spec, workdir, num_images)
  os.makedirs(out, exist_ok=True)  # Once there is something to write.
  class_names = figures.class_names_for(
    spec.test_data.name, spec.model.num_classes
  )
  files = write_figures(m, spec, out, class_names)
  remote = paths.is_remote(workdir)
  summary = {
    'workdir': workdir if remote else os.path.abspath(workdir),
    'step': m.step,
    'accuracy': m.result['accuracy'],
    'num_examples': m.result['num_examples'],
    'routing': m.result['routing'],
    'augmentation': describe_augmentation(spec.views),
    'stability': m.stability,
    'expert_by_class': {
      f'encoderblock_{b}': (c / np.maximum(c.sum(1, keepdims=True), 1)).tolist()
      for b, c in sorted(m.counts.items())
    },
    'class_names': class_names,
    'consistency': dict(spec.config['consistency']),
    'files': sorted(files),
  }
  summary['seconds'] = time.time() - t0
  paths.write_json(os.path.join(out, 'results.json'), summary)  # Strict JSON.
  with open(os.path.join(out, 'summary.md'), 'w') as f:
    f.write(format_summary(summary))
  return summary


def write_figures(
  m: Measurements, spec: config_lib.RunSpec, out: str, class_names
) -> dict[str, str]:
  """Draws the figures of `m` into `out`; returns {file name: path}."""
  num = len(m.maps['views'])
  figs = {
    'routing_maps.png': lambda: figures.plot_routing_maps(
      np.asarray(m.first['image'])[:num],
      m.maps,
      spec.views.patch_size,
      spec.model.num_experts,
      class_names,
      np.asarray(m.first['label'])[:num],
      title=f'Top-1 expert per patch in two augmented views (step {m.step})',
    ),
    'expert_by_class.png': lambda: figures.plot_expert_by_class(
      m.counts, class_names
    ),
    'load_dropped.png': lambda: figures.plot_load_dropped(m.result['routing']),
  }
  if m.stability:
    figs['flip_rates.png'] = lambda: figures.plot_flip_rates(m.stability)
  files = {}
  for name, draw in figs.items():
    files[name] = os.path.join(out, name)
    figures.save_figure(draw(), files[name])
  return files


def format_summary(s: dict) -> str:
  """summary.md from the results dict."""
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
      registry.table('stability', st),
      '```',
    ]
  lines += ['', '## Files', '']
  lines += [f'- `{name}`' for name in s['files']]
  lines += ['- `results.json`: every number above', '']
  return '\n'.join(lines)


def main(argv):
  if len(argv) > 1:
    cli.fail(f'unexpected arguments {argv[1:]}; flags start with --')
  resilience.exit_on_interrupt()  # Ctrl-C during a compile: no segfault.
  flag_values = flags.FLAGS
  workdir = flag_values.workdir
  try:
    spec = cli.check_config(flag_values.config, jax.device_count())
    check_workdir(spec, workdir)
  except cli.CliError as e:
    cli.fail(str(e))
  cli.quiet_console()  # Imports TensorFlow (slow): after the checks.
  out = flag_values.out or os.path.join(workdir, 'analysis')
  try:
    summary = analyze_spec(spec, workdir, out, flag_values.num_images)
  except CheckpointError as e:
    cli.fail(str(e))
  except Exception as e:
    failure = cli.failure_line(e)  # A damaged data file: one line.
    if failure is None:
      raise
    cli.fail(*failure)
  print(format_summary(summary))
  print(f'Wrote {out} in {summary["seconds"]:.1f}s')


if __name__ == '__main__':
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  config_flags.DEFINE_config_file(
    'config', None, 'Config file of the run.', lock_config=True
  )
  flags.DEFINE_string('workdir', None, 'Training workdir (checkpoints/).')
  flags.DEFINE_string('out', None, 'Output folder (default WORKDIR/analysis).')
  flags.DEFINE_integer('num_images', 4, 'Test images in the routing maps.')
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main, flags_parser=cli.parse_flags)

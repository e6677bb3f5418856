r"""Evaluates a checkpoint (ours or vmoe's) on a dataset split, no training.

  python -m vmoe_jsd.eval_main --config=configs/default.py \
      --checkpoint=runs/default [--split=test] [--output=eval.json]

Paths may be local or gs://... (see paths.py).
--checkpoint is one of our workdirs or checkpoints/ folders (its newest
readable checkpoint: a damaged newer one is reported, recorded in the JSON
and left in place), a step folder, or a vmoe-format checkpoint prefix (the
path without `.index`). The config gives the model (its evaluation overrides
apply: e.g. the evaluation capacity factor), the augmentation size and
config.dataset.test; --split overrides its split. Prints the accuracy and
the routing table (agreement, chance, kappa, JSD, confidence, entropy, load,
dropped), and the few-shot accuracies when config.fewshot names datasets,
and writes them as JSON.
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from vmoe_jsd import cli, paths

_CONFIG = config_flags.DEFINE_config_file(
  'config', None, 'Config file describing the model and data.',
  lock_config=True,
)  # fmt: skip
_CHECKPOINT = flags.DEFINE_string(
  'checkpoint', None, 'Our workdir/checkpoint folder or a vmoe prefix.'
)
_SPLIT = flags.DEFINE_string('split', None, 'Overrides dataset.test.split.')
_OUTPUT = flags.DEFINE_string(
  'output', None, 'JSON output path (default: eval_<split>.json beside an '
  'orbax checkpoint, or PREFIX.eval_<split>.json).',
)  # fmt: skip
flags.mark_flags_as_required(['config', 'checkpoint'])


def checkpoint_source(path: str) -> str:
  """'vmoe' for a vmoe prefix (PREFIX.index exists), else 'orbax'."""
  if path.endswith('.index') or paths.exists(path + '.index'):
    return 'vmoe'
  if not paths.exists(path):
    raise FileNotFoundError(
      f'--checkpoint={path!r} exists neither as a folder nor as a vmoe '
      'prefix (PREFIX.index)'
    )
  return 'orbax'


def evaluate_checkpoint(config, checkpoint: str, split: str | None = None):
  """Loads `checkpoint` into config.model and evaluates config.dataset.test.

  Returns:
    The result dict (accuracy, num_examples, routing per MoE layer).
  """
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from vmoe_jsd import (  # noqa: PLC0415
    config_lib,
    data,
    evaluate,
    fewshot,
    initialization,
    sharding,
  )
  from vmoe_jsd.models import build_model  # noqa: PLC0415

  if split:
    with config.unlocked():
      config.dataset.test.split = split
  config_lib.validate(config, jax.device_count())
  source = checkpoint_source(checkpoint)
  mesh = sharding.make_mesh(config.get('num_expert_partitions', 1))
  settings = config_lib.view_settings(config)
  test_ds = data.get_dataset(config.dataset.test, config.augment.size)
  eval_model = build_model(
    config_lib.eval_model_config(config), deterministic=True
  )
  images = config_lib.min_images_per_batch(config.model, settings.size)
  shape = (images, settings.size, settings.size, test_ds.image_shape[-1])
  abstract = jax.eval_shape(
    lambda: eval_model.init(jax.random.key(0), jnp.zeros(shape))['params']
  )
  params, report = initialization.load_initial_params(
    {'source': source, 'path': checkpoint, 'keep_head': True, 'strict': True},
    abstract,
  )
  with jax.set_mesh(mesh):
    params = jax.device_put(
      params, sharding.tree_shardings(params, mesh,
                                      config.get('params_axis_resources')
                                      or sharding.DEFAULT_RULES),
    )  # fmt: skip
    eval_step = jax.jit(evaluate.make_eval_step(config, eval_model, settings))
    put_batch = sharding.make_put_batch(mesh)
    result = evaluate.run_evaluation(
      eval_step, params, test_ds, config, put_batch
    )
    fewshot_eval = fewshot.make_evaluator(
      config, config_lib.eval_model_config(config), settings, put_batch
    )
    if fewshot_eval is not None:
      result['fewshot'] = fewshot_eval(params)
  result['checkpoint'] = checkpoint
  if report.get('step') is not None:
    result['step'] = report['step']
  if report.get('skipped_checkpoints'):
    # Newer checkpoints that could not be read (left in place).
    result['skipped_checkpoints'] = {
      str(k): v for k, v in report['skipped_checkpoints'].items()
    }
  result['split'] = config.dataset.test.split
  return result


def main(argv):
  if len(argv) > 1:
    cli.fail(f'unexpected arguments {argv[1:]}; flags start with --')
  import jax  # noqa: PLC0415

  config = _CONFIG.value
  if _SPLIT.value:
    with config.unlocked():
      config.dataset.test.split = _SPLIT.value
  try:
    cli.check_config(config, jax.device_count())
  except cli.CliError as e:
    cli.fail(str(e))
  cli.quiet_console()
  from vmoe_jsd import evaluate, fewshot  # noqa: PLC0415

  result = evaluate_checkpoint(config, _CHECKPOINT.value, _SPLIT.value)
  split = result['split'].replace('/', '_')
  output = _OUTPUT.value
  if output is None:
    ckpt = _CHECKPOINT.value.removesuffix('.index')
    output = (
      f'{ckpt}.eval_{split}.json'
      if checkpoint_source(_CHECKPOINT.value) == 'vmoe'
      else str(paths.join(ckpt, f'eval_{split}.json'))
    )
  for step, why in result.get('skipped_checkpoints', {}).items():
    print(
      f'WARNING: checkpoint step {step} cannot be read ({why}); left in '
      f'place. Evaluated step {result.get("step")} instead.'
    )
  print(
    f'{result["checkpoint"]}'
    + (f' (step {result["step"]})' if 'step' in result else '')
    + f' on {result["split"]}: accuracy '
    f'{result["accuracy"]:.4f} ({result["num_examples"]} images)'
  )
  if result['routing']:
    print(evaluate.format_routing_table(result['routing']))
  if result.get('fewshot'):
    print(fewshot.format_results(result['fewshot']))
  paths.write_json(output, result)
  print(f'Wrote {output}')


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)

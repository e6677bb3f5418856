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

import jax
from absl import app, flags
from ml_collections import config_flags

from vmoe_jsd import (
  cli,
  config_lib,
  evaluate,
  fewshot,
  initialization,
  paths,
  sharding,
  streams,
)

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

  Args:
    config: the run's config (not modified; resolved here, once).
    checkpoint: see the module docstring.
    split: overrides config.dataset.test.split.

  Returns:
    The result dict (accuracy, num_examples, routing per MoE layer).
  """
  if split:
    config = config.copy_and_resolve_references()
    with config.unlocked():
      config.dataset.test.split = split
  return evaluate_spec(config_lib.validate(config, jax.device_count()),
                       checkpoint)  # fmt: skip


def evaluate_spec(spec: config_lib.RunSpec, checkpoint: str) -> dict:
  """`evaluate_checkpoint` of an already resolved config."""
  source = checkpoint_source(checkpoint)
  mesh = sharding.make_mesh(spec.num_expert_partitions)
  put_batch = sharding.make_put_batch(mesh)
  settings, model = spec.views, spec.model
  test_ds = spec.test_data.load()
  params, report = initialization.load_eval_params(
    model, settings.size, test_ds.image_shape[-1], checkpoint, source, mesh,
    spec.params_rules,
  )  # fmt: skip
  eval_model = model.build_eval()
  views_key = streams.stream(spec.seed, 'eval_views')
  with jax.set_mesh(mesh):
    eval_step = jax.jit(
      evaluate.make_eval_step(eval_model, model, settings, views_key)
    )
    result = evaluate.run_evaluation(
      eval_step, params, test_ds, spec.test_data.batch_size,
      spec.evaluate.limit, model.moe_layers, put_batch,
    )  # fmt: skip
    fewshot_eval = fewshot.make_evaluator(
      spec.fewshot, model, settings, put_batch
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
  result['split'] = spec.test_data.split
  return result


def main(argv):
  if len(argv) > 1:
    cli.fail(f'unexpected arguments {argv[1:]}; flags start with --')
  config = _CONFIG.value
  if _SPLIT.value:
    with config.unlocked():
      config.dataset.test.split = _SPLIT.value
  try:
    spec = cli.check_config(config, jax.device_count())
  except cli.CliError as e:
    cli.fail(str(e))
  cli.quiet_console()
  result = evaluate_spec(spec, _CHECKPOINT.value)
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

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

--suite picks what runs (a comma list; default 'standard', the above):

  standard     accuracy and routing figures -> eval_<split>.json
  stability    top-1 flip rates (evaluation/stability.py) ->
               stability_<split>.json
  corruptions  the corruption suite (evaluation/corruptions.py) ->
               corruptions_<split>.json
  attacks      PGD and the routing attack (evaluation/attacks.py) ->
               attacks_<split>.json
  cheap        K=1 and lower capacity factors (evaluation/serving.py) ->
               cheap_<split>.json
  robustness   corruptions,attacks,cheap;  all: every suite (any evaluation
               added to evaluation/registry.py is a suite of its own)

Their settings are config.evaluate.robustness (its `enabled` only concerns
training); each file lies beside the checkpoint (in the workdir, next to
results.json, for a workdir) and is strict JSON (no NaN: missing numbers are
null); docs/robustness.md gives the schema and the cost of each suite.

  python -m vmoe_jsd.eval_main --config=configs/default.py \
      --checkpoint=runs/default --suite=robustness
"""

from __future__ import annotations

import jax
from absl import app, flags
from ml_collections import config_flags

from vmoe_jsd import (
  checkpoints,
  cli,
  config_lib,
  initialization,
  paths,
  resilience,
  sharding,
)
from vmoe_jsd.evaluation import registry, robustness, serving

_CONFIG = config_flags.DEFINE_config_file(
  'config',
  None,
  'Config file describing the model and data.',
  lock_config=True,
)
_CHECKPOINT = flags.DEFINE_string(
  'checkpoint', None, 'Our workdir/checkpoint folder or a vmoe prefix.'
)
_SPLIT = flags.DEFINE_string('split', None, 'Overrides dataset.test.split.')
_OUTPUT = flags.DEFINE_string(
  'output',
  None,
  'JSON output path (default: eval_<split>.json beside an '
  'orbax checkpoint, or PREFIX.eval_<split>.json).',
)
_SUITE = flags.DEFINE_string(
  'suite',
  'standard',
  'Comma list of suites: standard, stability, corruptions, attacks, '
  'cheap, robustness (the last three), all.',
)
flags.mark_flags_as_required(['config', 'checkpoint'])

# 'standard' is accuracy and routing with few-shot; expert_by_class is
# analyze's figure data. Every other registered evaluation is a suite.
SUITES = (
  'standard',
  *(
    name
    for name in registry.EVALUATIONS
    if name not in ('accuracy', 'fewshot', 'expert_by_class')
  ),
)
SCHEMA_VERSION = 1


def parse_suites(text: str) -> tuple[str, ...]:
  """'--suite' -> suites in SUITES order; ValueError (one line) if unknown."""
  aliases = {'robustness': robustness.SUITES, 'all': SUITES}
  names = [n.strip() for n in text.split(',') if n.strip()]
  chosen = set()
  for name in names:
    if name not in SUITES and name not in aliases:
      raise ValueError(
        f'--suite={text!r}: {name!r} is unknown; choose from '
        f'{[*SUITES, *aliases]} (comma-separated)'
      )
    chosen.update(aliases.get(name, (name,)))
  if not chosen:
    raise ValueError(f'--suite={text!r} names no suite; e.g. --suite=standard')
  return tuple(s for s in SUITES if s in chosen)


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
  return evaluate_spec(
    config_lib.validate(config, jax.device_count()), checkpoint
  )


def evaluate_spec(spec: config_lib.RunSpec, checkpoint: str) -> dict:
  """`evaluate_checkpoint` of an already resolved config."""
  return evaluate_suites(spec, checkpoint, ('standard',))['standard']


def evaluate_suites(
  spec: config_lib.RunSpec, checkpoint: str, suites: tuple[str, ...]
) -> dict[str, dict]:
  """Loads `checkpoint` once and runs `suites` (see the module docstring)
  through the evaluation registry.

  Args:
    spec: the resolved config (config.evaluate.robustness gives the
      robustness suites' settings).
    checkpoint: see the module docstring.
    suites: names in SUITES.

  Returns:
    {suite: result}; the robustness suites' results start with suite,
    schema_version, checkpoint, step and split (docs/robustness.md).
  """
  source = checkpoint_source(checkpoint)
  mesh = sharding.make_mesh(spec.num_expert_partitions)
  test_ds = spec.test_data.load()
  params, report = initialization.load_eval_params(
    spec.model,
    spec.views.size,
    test_ds.image_shape[-1],
    checkpoint,
    source,
    mesh,
    spec.params_rules,
  )
  header = {'checkpoint': checkpoint}
  if report.get('step') is not None:
    header['step'] = report['step']
  if report.get('skipped_checkpoints'):
    # Newer checkpoints that could not be read (left in place).
    header['skipped_checkpoints'] = {
      str(k): v for k, v in report['skipped_checkpoints'].items()
    }
  header['split'] = spec.test_data.split
  others = [s for s in suites if s != 'standard']
  standard = []
  if 'standard' in suites:  # Accuracy, routing figures and few-shot.
    standard = ['accuracy'] + (['fewshot'] if spec.fewshot.enabled else [])
  evaluator = registry.Evaluator(spec, mesh, standard + others)
  results = {}
  if standard:
    result = evaluator('accuracy', params, test_ds)
    if 'fewshot' in evaluator:
      result['fewshot'] = evaluator('fewshot', params, test_ds)
    results['standard'] = {**result, **header}
  for name in others:
    results[name] = {
      'suite': name,
      'schema_version': SCHEMA_VERSION,
      **header,
      **evaluator(name, params, test_ds),
    }
  return results


def output_path(checkpoint: str, stem: str, split: str) -> str:
  """<stem>_<split>.json beside an orbax checkpoint (in a workdir: next to
  results.json), or PREFIX.<stem>_<split>.json for a vmoe prefix."""
  split = split.replace('/', '_')
  if checkpoint_source(checkpoint) == 'vmoe':
    return f'{checkpoint.removesuffix(".index")}.{stem}_{split}.json'
  return str(paths.join(checkpoint, f'{stem}_{split}.json'))


def _print_standard(result: dict) -> None:
  print(
    f'{result["checkpoint"]}'
    + (f' (step {result["step"]})' if 'step' in result else '')
    + f' on {result["split"]}: accuracy '
    f'{result["accuracy"]:.4f} ({result["num_examples"]} images)'
  )
  if result['routing']:
    print(registry.table('accuracy', result))
  if result.get('fewshot'):
    print(registry.table('fewshot', result['fewshot']))


def _checked(config):
  """(RunSpec, suites) of the flags, or a one-line exit."""
  try:
    suites = parse_suites(_SUITE.value)
    if _OUTPUT.value and len(suites) > 1:
      raise ValueError(
        f'--output names one file but --suite={_SUITE.value!r} runs '
        f'{len(suites)} suites; drop --output (each suite has its own file)'
      )
    spec = cli.check_config(config, jax.device_count())
    _check_checkpoint(_CHECKPOINT.value)
    if 'cheap' in suites:
      serving.check_serving(spec.model)
  except (cli.CliError, ValueError) as e:
    cli.fail(cli.one_line(str(e)))
  return spec, suites


def _check_checkpoint(path: str) -> None:
  """CliError unless --checkpoint names a folder or a vmoe prefix."""
  vmoe = path if path.endswith('.index') else path + '.index'
  if paths.exists(vmoe):
    return
  if paths.isdir(path):
    try:  # Lists folders only: a damaged newest step is judged later.
      checkpoints.find_orbax_state_dir(path)
    except ValueError as e:
      raise cli.CliError(f'--checkpoint={path!r}: {e}') from None
    return
  if not paths.exists(path):
    raise cli.CliError(
      cli.missing_path_message(
        'checkpoint',
        path,
        'a workdir, its checkpoints/ folder, a step folder or a vmoe '
        'prefix (PREFIX.index)',
      )
    )
  raise cli.CliError(
    f'--checkpoint={path!r} is a file, not a folder; expected a workdir, '
    'its checkpoints/ folder, a step folder or a vmoe prefix (PREFIX.index)'
  )


def main(argv):
  if len(argv) > 1:
    cli.fail(f'unexpected arguments {argv[1:]}; flags start with --')
  resilience.exit_on_interrupt()  # Ctrl-C during a compile: no segfault.
  config = _CONFIG.value
  if _SPLIT.value:
    with config.unlocked():
      config.dataset.test.split = _SPLIT.value
  spec, suites = _checked(config)
  cli.quiet_console()
  try:
    results = evaluate_suites(spec, _CHECKPOINT.value, suites)
  except Exception as e:
    failure = cli.failure_line(e)
    if failure is None:
      raise
    cli.fail(*failure)
  first = next(iter(results.values()))
  for step, why in first.get('skipped_checkpoints', {}).items():
    print(
      f'WARNING: checkpoint step {step} cannot be read ({why}); left in '
      f'place. Evaluated step {first.get("step")} instead.'
    )
  for suite, result in results.items():
    stem = 'eval' if suite == 'standard' else suite
    output = _OUTPUT.value or output_path(
      _CHECKPOINT.value, stem, result['split']
    )
    if suite == 'standard':
      _print_standard(result)
      paths.write_json(output, result)
    else:
      print(registry.table(suite, result))
      paths.write_json(output, result)  # strict: NaN as null
    print(f'Wrote {output}')


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)

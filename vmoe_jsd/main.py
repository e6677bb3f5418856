"""Command line entry point.

  python -m vmoe_jsd.main --config=configs/default.py --workdir=/tmp/run

Config values can be overridden on the command line
(`--config.consistency.weight=0.1`; the config is locked, so a misspelt key
fails). Running again with the same --workdir resumes from its latest
checkpoint (docs/running.md: finished workdirs, --reevaluate, the workdir
lock, run_files.RESUMABLE_KEYS and --allow_config_change, the one-line
errors and their exit statuses). On TPU VM pods and GPU clusters pass
--distributed (docs/scaling_and_performance.md).
"""

from __future__ import annotations

import logging

import jax
from absl import app, flags
from ml_collections import config_flags

from vmoe_jsd import cli, resilience, run_files, train

_CONFIG = config_flags.DEFINE_config_file(
  'config', None, 'Path to an ml_collections config file.', lock_config=True
)
_WORKDIR = flags.DEFINE_string(
  'workdir', None, 'Directory for checkpoints, TensorBoard events, results.'
)
_REEVALUATE = flags.DEFINE_bool(
  'reevaluate',
  False,
  'On a finished workdir, evaluate the final checkpoint again and rewrite '
  'results.json (its training time is kept).',
)
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
  'allow_config_change',
  False,
  "Resume even though the config differs from the workdir's config.json "
  'in keys that may not change on resume (seed, model, data, optimizer, '
  '...); the changes are logged and kept in config_changes.jsonl.',
)
_DISTRIBUTED = flags.DEFINE_bool(
  'distributed', False, 'Call jax.distributed.initialize() (multi-host).'
)
_COORDINATOR = flags.DEFINE_string(
  'coordinator_address', None, 'host:port of process 0 (multi-host).'
)
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process.')
flags.mark_flags_as_required(['config', 'workdir'])


def _quiet_orbax(record: logging.LogRecord) -> bool:
  # orbax logs every step of every save at INFO; keep its warnings, but not
  # its copies of a full disk, which main reports in one line.
  return not cli.is_reported_later(record) and (
    record.levelno >= logging.WARNING or 'orbax' not in record.pathname
  )


def main(argv):
  if len(argv) > 1:
    cli.fail(f'unexpected arguments {argv[1:]}; flags start with --')
  logging.getLogger('absl').addFilter(_quiet_orbax)
  # Ctrl-C ends the process at once (a KeyboardInterrupt during an XLA
  # compilation crashes it); in training a first one stops with a checkpoint.
  resilience.exit_on_interrupt()
  cli.drop_repeated_errors()
  # Before any jax call (importing jax and vmoe_jsd makes none).
  if _DISTRIBUTED.value:
    jax.distributed.initialize(
      coordinator_address=_COORDINATOR.value,
      num_processes=_NUM_PROCESSES.value,
      process_id=_PROCESS_ID.value,
    )
  config = _CONFIG.value
  try:  # Before TensorFlow's slow import: a bad config, a workdir no folder.
    cli.check_config(config, jax.device_count())
    run_files.prepare_workdir(_WORKDIR.value)
  except (cli.CliError, run_files.WorkdirError) as e:
    cli.fail(str(e))
  cli.quiet_console()  # Imports TensorFlow (slow): after the config checks.
  if jax.process_index() == 0:
    for line in cli.describe_devices():
      print(line, flush=True)
  try:
    train.train_and_evaluate(
      config,
      _WORKDIR.value,
      reevaluate=_REEVALUATE.value,
      allow_config_change=_ALLOW_CONFIG_CHANGE.value,
    )
  except Exception as e:
    failure = cli.failure_line(e)
    if failure is None:
      raise
    cli.exit_now(*failure)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)

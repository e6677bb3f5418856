"""Command line entry point.

  python -m vmoe_jsd.main --config=configs/default.py --workdir=/tmp/run

Config values can be overridden on the command line
(`--config.consistency.weight=0.1`; the config is locked, so a misspelt key
fails). Running again with the same --workdir resumes from its latest
checkpoint. On TPU VM pods and GPU clusters pass --distributed so that
jax.distributed.initialize() connects the processes (it reads the
coordinator from the environment on Cloud TPU and SLURM, or from
--coordinator_address/--num_processes/--process_id).
"""

from __future__ import annotations

import logging
import os

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
  'config', None, 'Path to an ml_collections config file.', lock_config=True
)
_WORKDIR = flags.DEFINE_string(
  'workdir', None, 'Directory for checkpoints, TensorBoard events, results.'
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
  # orbax logs every step of every save at INFO; keep its warnings.
  return record.levelno >= logging.WARNING or 'orbax' not in record.pathname


def main(argv):
  del argv
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  logging.getLogger('absl').addFilter(_quiet_orbax)
  import jax  # noqa: PLC0415 - after flags, before any other jax use.

  if _DISTRIBUTED.value:
    jax.distributed.initialize(
      coordinator_address=_COORDINATOR.value,
      num_processes=_NUM_PROCESSES.value,
      process_id=_PROCESS_ID.value,
    )
  from vmoe_jsd import train  # noqa: PLC0415

  train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main)

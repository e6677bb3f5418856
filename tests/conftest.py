"""Test setup: 8 simulated CPU devices, a persistent compilation cache,
unoptimised CPU code generation and the number of pytest-xdist workers.

XLA_FLAGS must be set before jax initialises its backends, so this runs at
collection time, before any test module imports jax. The cache settings go
into the environment: every process a test starts (commands.py), and every
process those start (sweep's runs of main), compiles into the same cache.
"""

import collections
import contextlib
import io
import json
import os
import tempfile

os.environ['XLA_FLAGS'] = (
  os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
).strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
# Most of a tiny-model test is compilation; cache it across test processes.
os.environ['JAX_COMPILATION_CACHE_DIR'] = os.environ.setdefault(
  'VMOE_JSD_TEST_CACHE',
  os.path.join(tempfile.gettempdir(), 'vmoe_jsd_jax_cache'),
)
os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
# Tiny programs run in milliseconds; LLVM's optimisation of them took most
# of their compile time (a train step 7.3 s -> 2.9 s; the model tests, five
# files, 212 -> 150 s on 2 cores). The HLO passes (fusion, SPMD
# partitioning, collectives) still run: the smoke train step's compiled
# HLO text is byte-identical with and without it (4 expert partitions).
# JAX_DISABLE_MOST_OPTIMIZATIONS=0 in the environment turns it off.
os.environ.setdefault('JAX_DISABLE_MOST_OPTIMIZATIONS', '1')

import pytest  # noqa: E402
import smoke_config  # noqa: E402

from vmoe_jsd import train  # noqa: E402

# What a trained run left: its workdir, train_and_evaluate's result, the
# history row of every report and the figures of every finished test
# evaluation by step (time left out). What it printed is dropped.
Run = collections.namedtuple('Run', 'workdir result rows evaluations')


def _recorded_run(config, workdir):
  rows, evaluations = [], {}
  report, test = train.report, train.Evaluations.test

  def recorded_report(*args, **kwargs):
    rows.append(report(*args, **kwargs))
    return rows[-1]

  def recorded_test(self, params, step, *args, **kwargs):
    result = test(self, params, step, *args, **kwargs)
    if result is not None:
      evaluations[step] = {
        k: v for k, v in result.items() if k != 'eval_seconds'
      }
    return result

  with (
    pytest.MonkeyPatch.context() as patch,
    contextlib.redirect_stdout(io.StringIO()),
  ):
    patch.setattr(train, 'report', recorded_report)
    patch.setattr(train.Evaluations, 'test', recorded_test)
    result = train.train_and_evaluate(config, workdir)
  return Run(workdir, result, rows, evaluations)


def pytest_xdist_auto_num_workers(config):
  """`-n auto` (setup.cfg): a worker per core, at most 4 (each holds JAX,
  TensorFlow and 8 simulated devices, 1-2 GiB)."""
  del config
  return max(1, min(4, len(os.sched_getaffinity(0))))


@pytest.fixture(scope='session')
def trained(tmp_path_factory):
  """trained(**overrides): the smoke config with `overrides` (dotted keys,
  as smoke_config.with_overrides) trained in this process, once per
  session for every test that asks for the same config; a Run.

  Call it before patching anything the run uses. The workdir is shared:
  a test that writes into it works on a copy (shutil.copytree).
  """
  runs = {}

  def get(**overrides):
    config = smoke_config.with_overrides(smoke_config.get_config(), **overrides)
    key = json.dumps(config.to_dict(), sort_keys=True, default=str)
    if key not in runs:
      workdir = str(tmp_path_factory.mktemp('trained') / 'run')
      runs[key] = _recorded_run(config, workdir)
    return runs[key]

  return get


@pytest.fixture(scope='session')
def reference(trained):
  """The smoke config with smoke_config.REFERENCE, trained once."""
  return trained(**smoke_config.REFERENCE)

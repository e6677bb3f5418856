"""End-to-end: main trains, checkpoints, is killed, resumes exactly."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import smoke_config

from vmoe_jsd import (
  augment,
  checkpoints,
  config_lib,
  optimizer,
  step,
  streams,
  train,
)
from vmoe_jsd.data import arrays

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, 'tests', 'smoke_config.py')


def _load_smoke(**overrides):
  return smoke_config.with_overrides(smoke_config.get_config(), **overrides)


def _main(workdir, *flags, env_extra=None):
  env = dict(os.environ)
  env['XLA_FLAGS'] = ''  # one CPU device, as a user's default run
  # Share the tests' compilation cache: the resumed process then reuses the
  # programs the first one compiled.
  env['JAX_COMPILATION_CACHE_DIR'] = jax.config.jax_compilation_cache_dir
  env['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  env.update(env_extra or {})
  return subprocess.Popen(
    [sys.executable, '-m', 'vmoe_jsd.main', f'--config={SMOKE}',
     f'--workdir={workdir}', *flags],
    cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    text=True,
  )  # fmt: skip


def test_main_killed_after_checkpoint_resumes_and_finishes(tmp_path):
  workdir = str(tmp_path / 'run')
  steps = '--config.num_train_steps=24'
  proc = _main(workdir, steps, '--config.report_progress.every_steps=3')
  ckpt2 = os.path.join(workdir, 'checkpoints', '2')
  deadline = time.time() + 240
  while not os.path.isdir(ckpt2) and proc.poll() is None:
    assert time.time() < deadline, 'no checkpoint written in time'
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  first_output = proc.communicate()[0]
  assert proc.returncode == -signal.SIGKILL, first_output
  saved = sorted(
    int(d) for d in os.listdir(os.path.join(workdir, 'checkpoints'))
    if d.isdigit()
  )  # fmt: skip
  assert saved and saved[-1] >= 2 and saved[-1] < 24

  proc = _main(workdir, steps, '--config.report_progress.every_steps=1')
  output = proc.communicate(timeout=600)[0]
  assert proc.returncode == 0, output
  assert f'at step {saved[-1]}.' in output
  # The first progress line after resuming is the step after the checkpoint.
  assert f'[step {saved[-1] + 1}/24]' in output
  assert f'[step {saved[-1]}/24]' not in output
  assert 'test accuracy' in output and 'kappa' in output
  with open(os.path.join(workdir, 'results.json')) as f:
    result = json.load(f)
  assert result['step'] == 24
  assert set(result['routing']) == {'encoderblock_1'}
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', '24'))
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(workdir))


def test_resumed_run_equals_uninterrupted_run(tmp_path, monkeypatch):
  """A crash after the step-4 checkpoint, then a resume, gives the same
  parameters as never crashing: data order and random streams are functions
  of the step."""
  config = _load_smoke(**{'num_train_steps': 6})
  full = train.train_and_evaluate(config, str(tmp_path / 'full'))

  original = arrays.ArrayDataset.train_batches

  def crashing(self, *args, **kwargs):
    for i, batch in enumerate(original(self, *args, **kwargs)):
      if kwargs.get('start_step', 0) == 0 and i == 5:
        raise KeyboardInterrupt('simulated crash at step 6')
      yield batch

  monkeypatch.setattr(arrays.ArrayDataset, 'train_batches', crashing)
  workdir = str(tmp_path / 'crashed')
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(config, workdir)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['2', '4']
  resumed = train.train_and_evaluate(config, workdir)

  def final_params(wd):
    ckpt = checkpoints.Checkpointer(wd, every_steps=2)
    restored = ckpt._manager.restore(6)
    return restored['state']['params']

  jax.tree_util.tree_map(
    np.testing.assert_array_equal,
    final_params(str(tmp_path / 'full')),
    final_params(workdir),
  )
  assert resumed['accuracy'] == full['accuracy']


@pytest.mark.parametrize(
  'router',
  [
    {'name': 'NoisyTopItemsPerExpertRouter', 'noise_std': 1.0,
     'dispatcher': {'capacity_factor': 1.0}},
    {'name': 'SoftRouter', 'num_slots': 4},
  ],
  ids=['expert_choice', 'soft_moe'],
)  # fmt: skip
def test_other_routers_validate_train_and_evaluate(tmp_path, router):
  config = _load_smoke(num_train_steps=2)
  with config.unlocked():
    config.model.encoder.moe.router = router
    config.evaluate.model_overrides = {}  # cf 4 exceeds EC's group
    config.save_checkpoint.every_steps = 0
  result = train.train_and_evaluate(config, str(tmp_path))
  figs = result['routing']['encoderblock_1']
  assert result['step'] == 2 and 0 <= figs['agreement'] <= 1
  assert np.isfinite(figs['kappa']) and figs['pairs'] > 0
  # Expert choice drops the tokens no expert takes; Soft MoE drops none.
  if router['name'] == 'SoftRouter':
    assert figs['dropped'] == 0.0
  else:
    assert 0.0 <= figs['dropped'] < 1.0


def test_mixup_and_randaugment_in_the_train_step(monkeypatch):
  """The config-gated mixup block: called on the views with one group per
  device (partners never cross devices), soft targets, finite step."""
  calls = []
  real_mixup = augment.mixup

  def spy(key, views, maps, labels, **kwargs):
    out = real_mixup(key, views, maps, labels, **kwargs)
    calls.append((views.shape, maps.shape, labels.shape, out[2].shape, kwargs))
    return out

  monkeypatch.setattr(augment, 'mixup', spy)
  config = _load_smoke(num_train_steps=2)
  with config.unlocked():
    config.dataset.train.batch_size = 16  # 2 images per device shard.
    config.mixup.concentration = 0.2
    config.augment.randaugment = (2, 10)
    config.augment.fill_value = 128 / 255
  spec = config_lib.validate(config, jax.device_count())
  model = spec.model.build(deterministic=False)
  tx, schedule = optimizer.make_optimizer(spec.optimizer, 2)
  key = jax.random.key(0)
  params = model.init(
    {'params': key, 'dropout': key, 'gating': key},
    jnp.zeros((32, 16, 16, 3)),
  )['params']
  state = step.TrainState(jnp.int32(0), params, tx.init(params))
  train_step = jax.jit(
    step.make_train_step(
      spec.step, model, tx, schedule, spec.views,
      streams.stream(spec.seed, 'train'),
    )
  )  # fmt: skip
  images = np.random.RandomState(0).randint(0, 256, (16, 16, 16, 3))
  labels = np.arange(16, dtype=np.int32) % 4
  state, metrics = train_step(state, images.astype(np.uint8), labels)
  assert int(state.step) == 1
  assert all(np.all(np.isfinite(v)) for v in jax.device_get(metrics).values())
  assert len(calls) == 1
  views, maps, labels_shape, targets, kwargs = calls[0]
  assert views == (16, 2, 16, 16, 3) and maps == (16, 2, 16)
  assert labels_shape == (16,) and targets == (16, 4)
  assert kwargs == dict(
    concentration=0.2, num_classes=4, num_groups=jax.device_count()
  )

"""End-to-end: main trains, checkpoints, is killed and resumes; other
routers and the config-gated train-step blocks run."""

import json
import os
import signal
import time

import commands
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import smoke_config

from vmoe_jsd import (
  augment,
  config_lib,
  optimizer,
  step,
  streams,
  train,
)


def _load_smoke(**overrides):
  return smoke_config.with_overrides(smoke_config.get_config(), **overrides)


def _main(workdir, *flags):
  return commands.start(
    commands.module(
      'vmoe_jsd.main',
      f'--config={commands.SMOKE}',
      f'--workdir={workdir}',
      *flags,
    )
  )


@pytest.mark.processes
def test_main_trains_as_train_and_evaluate_does(tmp_path, reference):
  """The command (on 8 devices, as the tests' runs: their programs come
  from the compilation cache) prints the project's own lines and writes
  the checkpoints, events and results of the same run in process."""
  workdir = str(tmp_path / 'run')
  flags = [f'--config.{k}={v}' for k, v in smoke_config.REFERENCE.items()]
  proc = commands.run(
    commands.module(
      'vmoe_jsd.main',
      f'--config={commands.SMOKE}',
      f'--workdir={workdir}',
      *flags,
    ),
    num_devices=8,
  )
  # stderr may hold orbax's warning that a save waited for the one before
  # (over 1 s under load); stdout holds only the project's own lines.
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.strip().splitlines()
  own = ('JAX ', 'Model: ', '[step ', '[eval step ', 'layer ', 'encoderblock_')
  assert all(line.startswith(own) for line in lines), proc.stdout
  assert 'backend: cpu; 8 device(s)' in lines[0]
  assert '[step 6/6]' in proc.stdout and '[eval step 2]' in proc.stdout
  assert 'test accuracy' in proc.stdout and 'kappa' in proc.stdout
  with open(os.path.join(workdir, 'results.json')) as f:
    result = json.load(f)
  assert result['step'] == 6
  assert set(result['routing']) == {'encoderblock_1'}
  assert result['accuracy'] == reference.result['accuracy']
  assert result['routing'] == json.loads(
    json.dumps(reference.result['routing'])
  )
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['4', '6']
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(workdir))


@pytest.mark.processes  # Two processes, the first killed with SIGKILL.
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
    int(d)
    for d in os.listdir(os.path.join(workdir, 'checkpoints'))
    if d.isdigit()
  )
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


@pytest.mark.slow
@pytest.mark.parametrize(
  'router',
  [
    {
      'name': 'NoisyTopItemsPerExpertRouter',
      'noise_std': 1.0,
      'dispatcher': {'capacity_factor': 1.0},
    },
    {'name': 'SoftRouter', 'num_slots': 4},
  ],
  ids=['expert_choice', 'soft_moe'],
)
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


@pytest.mark.slow
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
      spec.step,
      model,
      tx,
      schedule,
      spec.views,
      streams.stream(spec.seed, 'train'),
    )
  )
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

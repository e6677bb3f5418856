"""The evaluation-only entry point on our checkpoints and on vmoe's."""

import json
import os
import pathlib
import shutil

import commands
import pytest

from vmoe_jsd import eval_main

FIXTURE = os.path.join(commands.ROOT, 'tests', 'data', 'vmoe_parity')
SMOKE = commands.SMOKE


def run(capsys, *args):
  """eval_main in this process; its output."""
  status = commands.in_process(eval_main, *args)
  out, err = capsys.readouterr()
  assert status == 0, out + err
  return out


@pytest.mark.slow
def test_eval_main_on_our_checkpoint_matches_training_eval(
  tmp_path, capsys, reference
):
  """The command as a process (on 8 devices, as the run it evaluates; the
  default run's real process of eval_main), then in process on a damaged
  copy."""
  workdir = shutil.copytree(reference.workdir, tmp_path / 'run')
  proc = commands.run(
    commands.module(
      'vmoe_jsd.eval_main', f'--config={SMOKE}', f'--checkpoint={workdir}'
    ),
    num_devices=8,
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert 'accuracy' in proc.stdout and 'kappa' in proc.stdout
  with open(os.path.join(workdir, 'eval_test.json')) as f:
    evaluated = json.load(f)
  with open(os.path.join(workdir, 'results.json')) as f:
    trained = json.load(f)
  # Same params, same data, same fixed routing key: same figures.
  assert evaluated['accuracy'] == trained['accuracy']
  assert evaluated['routing'] == trained['routing']
  assert evaluated['step'] == 6 and 'skipped_checkpoints' not in evaluated

  # A damaged latest checkpoint: step 4 is evaluated instead, with a warning
  # and a record in the JSON; the damaged files stay where they were.
  step6 = os.path.join(workdir, 'checkpoints', '6')
  data = sorted(
    p
    for p in pathlib.Path(step6, 'state').rglob('*')
    if p.is_file() and p.parent.name == 'd'
  )
  assert data
  for path in data:
    with open(path, 'r+b') as f:
      f.truncate(path.stat().st_size // 2)
  out = run(capsys, f'--config={SMOKE}', f'--checkpoint={workdir}')
  assert 'WARNING: checkpoint step 6 cannot be read' in out
  with open(os.path.join(workdir, 'eval_test.json')) as f:
    fallback = json.load(f)
  assert fallback['step'] == 4 and list(fallback['skipped_checkpoints']) == [
    '6'
  ]
  assert all(p.exists() for p in data)


def test_eval_main_on_vmoe_checkpoint(tmp_path, capsys):
  # Batches of 2 images (a routing group) per device, of this process's 8.
  config_file = tmp_path / 'fixture_config.py'
  config_file.write_text(
    f"""
import json
import ml_collections
from vmoe_jsd import config_common

def get_config():
  with open({os.path.join(FIXTURE, 'config.json')!r}) as f:
    fixture = json.load(f)
  config = config_common.base_config()
  config.num_train_steps = 1
  model = {{k: v for k, v in fixture.items()
           if k not in ('image_size', 'eval_capacity_factors')}}
  model['encoder']['moe']['router']['dispatcher']['capacity_factor'] = 1.0
  config.model = model
  config.augment = dict(size=32)
  config.dataset = ml_collections.ConfigDict()
  config.dataset.train = dict(name='synthetic', split='train', batch_size=8,
                              image_size=32, channels=3, num_classes=10)
  config.dataset.test = dict(name='synthetic', split='test', batch_size=16,
                             num_examples=40, image_size=32, channels=3,
                             num_classes=10)
  config.optimizer = dict(name='adam', learning_rate=dict(peak_value=1e-3))
  return ml_collections.ConfigDict(config)
"""
  )
  output = str(tmp_path / 'out.json')
  out = run(
    capsys,
    f'--config={config_file}',
    f'--checkpoint={os.path.join(FIXTURE, "checkpoint")}',
    f'--output={output}',
  )
  with open(output) as f:
    result = json.load(f)
  assert result['num_examples'] == 40
  assert set(result['routing']) == {'encoderblock_1', 'encoderblock_3'}
  assert 'encoderblock_3' in out


def _strict_load(path):
  def no_nan(name):
    raise AssertionError(f'{path} holds {name}: not strict JSON')

  with open(path) as f:
    return json.loads(f.read(), parse_constant=no_nan)


@pytest.mark.slow  # 6 min under load (77 s of CPU): four suites compile.
def test_eval_main_robustness_suites(tmp_path, capsys, trained):
  workdir = str(
    shutil.copytree(trained(num_train_steps=2).workdir, tmp_path / 'run')
  )
  out = run(
    capsys,
    f'--config={SMOKE}',
    f'--checkpoint={workdir}',
    '--suite=standard,robustness',
    '--config.evaluate.robustness.attack.num_steps=3',
    '--config.evaluate.robustness.capacity_factors=(0.5,)',
    '--config.evaluate.robustness.corruptions=("contrast","rotation")',
  )
  assert '[corruptions]' in out and '[attacks]' in out and '[cheap]' in out
  # Every suite's table says how many images its figures are on.
  assert '[corruptions]\n32 test images; one column per severity' in out
  assert 'on these 32 images: clean accuracy' in out and 'sev 5' in out
  standard = _strict_load(os.path.join(workdir, 'eval_test.json'))
  files = {
    s: _strict_load(os.path.join(workdir, f'{s}_test.json'))
    for s in ('corruptions', 'attacks', 'cheap')
  }
  for suite, result in files.items():
    assert result['suite'] == suite and result['schema_version'] == 1
    assert result['step'] == 2 and result['split'] == 'test'
    assert result['checkpoint'] == workdir
  # Three code paths evaluate the same clean view: same accuracy as the
  # standard evaluation (accuracy.make_eval_step).
  accuracy = standard['accuracy']
  corr = files['corruptions']
  assert corr['clean_accuracy'] == accuracy and corr['num_examples'] == 32
  assert list(corr['corruptions']) == ['contrast', 'rotation']
  rot = corr['corruptions']['rotation']
  assert rot['severities'] == [5, 10, 15, 20, 30]
  assert len(rot['flip_rate']['encoderblock_1']) == 5
  assert corr['summary']['accuracy_drop'] == pytest.approx(
    accuracy - corr['summary']['mean_accuracy']
  )
  att = files['attacks']
  assert att['clean']['accuracy'] == accuracy
  assert att['settings']['num_steps'] == 3
  for name in ('pgd', 'routing'):
    assert set(att[name]['routing_changes']) == {'encoderblock_1'}
    assert 0.0 <= att[name]['routing_changes']['encoderblock_1'] <= 1.0
  assert att['pgd']['loss'] > att['clean']['loss']  # Ascent on the loss.
  assert att['routing']['router_kl']['encoderblock_1'] > 0.0
  cheap = files['cheap']
  default = cheap['rows'][0]
  assert default['name'] == 'default' and default['accuracy'] == accuracy
  assert default['dropped']['encoderblock_1'] == pytest.approx(
    standard['routing']['encoderblock_1']['dropped'], abs=1e-7
  )
  # K=2 of E=4, groups of 34 tokens, capacity factor 4: C = 68.
  assert cheap['default'] == {
    'num_selected_experts': 2,
    'capacity_factor': 4.0,
    'capacity': 68,
  }
  names = [r['name'] for r in cheap['rows']]
  assert names == ['default', 'k2_cf0.5', 'k1_cf4', 'k1_cf0.5']
  # K=1: ceil(34 * 4 / 4) = 34, rounded up to a multiple of 4: 36.
  assert cheap['rows'][2]['capacity'] == 36
  assert cheap['rows'][2]['expert_flops'] == pytest.approx(36 / 68)


def test_eval_main_suite_errors_are_one_line(tmp_path, capsys):
  # Checked before anything is loaded (the checkpoint need not exist).
  for flag, message in (
    ('--suite=speed', "--suite='speed': 'speed' is unknown"),
    ('--suite=all', '--output names one file'),
    (
      '--config.evaluate.robustness.attack.divergence=l2',
      "config.evaluate.robustness.attack.divergence='l2' is invalid",
    ),
  ):
    status = commands.in_process(
      eval_main,
      f'--config={SMOKE}',
      f'--checkpoint={tmp_path}',
      flag,
      f'--output={tmp_path}/x.json',
    )
    stderr = capsys.readouterr().err
    assert status == 2 and message in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert stderr.startswith('vmoe_jsd.eval_main: error: '), stderr


def test_suites_are_the_registry_evaluations_outside_standard():
  """Every registered evaluation but accuracy and few-shot (the standard
  suite) and analyze's class counts is a suite, in the registry's order."""
  assert eval_main.SUITES == (
    'standard',
    'stability',
    'corruptions',
    'attacks',
    'cheap',
  )
  assert eval_main.parse_suites('cheap, stability') == ('stability', 'cheap')
  assert eval_main.parse_suites('robustness') == (
    'corruptions',
    'attacks',
    'cheap',
  )
  assert eval_main.parse_suites('all') == eval_main.SUITES
  with pytest.raises(ValueError, match="'expert_by_class' is unknown"):
    eval_main.parse_suites('expert_by_class')

"""The command line: every key overridable, one-line errors, quiet console."""

import glob
import importlib.util
import json
import os

import commands
import jax
import ml_collections
import pytest

from vmoe_jsd import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, 'tests', 'smoke_config.py')
CONFIGS = sorted(glob.glob(os.path.join(ROOT, 'configs', '*.py')))


def _load(path, arg=None):
  spec = importlib.util.spec_from_file_location('cfg', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def _none_typed(config, prefix=''):
  out = []
  for key in config.keys():
    value = config[key]
    if isinstance(value, ml_collections.ConfigDict):
      out += _none_typed(value, f'{prefix}{key}.')
    elif config.get_type(key) is type(None):
      out.append(prefix + key)
  return out


@pytest.mark.parametrize('arg', [None, 'runlocal'])
@pytest.mark.parametrize('path', CONFIGS + [SMOKE], ids=os.path.basename)
def test_no_config_field_is_typed_none(path, arg):
  """ml_collections cannot override a NoneType field from the command line;
  optional fields are typed placeholders instead."""
  assert _none_typed(_load(path, arg)) == []


def test_optional_fields_are_set_from_the_command_line():
  config = cli.load_config([
    'main', f'--config={os.path.join(ROOT, "configs", "default.py")}',
    '--config.dataset.train.data_dir=/data/fm',
    '--config.consistency.layers=(1,)',
    '--config.initialization.source=vmoe',
    '--config.initialization.path=/ckpt/prefix',
    '--config.evaluate.limit=5',
    '--config.model.representation_size=8',
    '--config.fewshot.limit=100',
  ])  # fmt: skip
  assert config.dataset.train.data_dir == '/data/fm'
  assert config.dataset.test.data_dir is None
  assert config.consistency.layers == (1,)
  assert config.initialization.path == '/ckpt/prefix'
  assert config.evaluate.limit == 5
  assert config.model.representation_size == 8
  assert config.fewshot.limit == 100
  assert config.to_dict()['consistency']['layers'] == (1,)


BROKEN = [
  ('optimizer.learning_rate.peak_value=-1e-3',
   'config.optimizer.learning_rate.peak_value=-0.001 is invalid: must be a '
   'number > 0'),
  ('optimizer.learning_rate.end_value=-1.0', 'end_value=-1.0 is invalid'),
  ('optimizer.learning_rate.warmup_steps=-5', 'warmup_steps=-5 is invalid'),
  ('model.encoder.mlp_dim=0', 'config.model.encoder.mlp_dim=0 is invalid: '
   'must be an integer >= 1'),
  ('optimizer.weight_decay=-0.1', 'optimizer.weight_decay=-0.1 is invalid'),
  ('optimizer.gradient_clip.global_norm=0', 'global_norm=0.0 is invalid'),
  ('optimizer.name=lamb', "optimizer.name='lamb' is invalid"),
  ('consistency.weight=-0.5', 'consistency.weight=-0.5 is invalid'),
  ('consistency.temperature=0', 'consistency.temperature=0.0 is invalid'),
  ('consistency.loss=kl', "consistency.loss='kl' is invalid"),
  ('consistency.layers=(0,)', 'consistency.layers=(0,) is invalid'),
  ('model.hidden_size=0', 'model.hidden_size=0 is invalid'),
  ('model.encoder.num_heads=3', 'num_heads=3 is invalid: must be > 0 and '
   'divide hidden_size=16'),
  ('model.encoder.moe.num_experts=0', 'num_experts=0 is invalid'),
  ('model.encoder.moe.layers=(5,)', 'moe.layers=(5,) is invalid'),
  ('model.encoder.moe.group_size=7', 'group_size=7 is invalid'),
  ('model.encoder.moe.router.num_selected_experts=5',
   'num_selected_experts=5 is invalid: K must be in [1, num_experts=4]'),
  ('model.encoder.moe.router.noise_std=-1.0', 'noise_std=-1.0 is invalid'),
  ('model.encoder.moe.router.importance_loss_weight=-0.1',
   'importance_loss_weight=-0.1 is invalid'),
  ('model.encoder.moe.router.dispatcher.capacity_factor=0',
   'capacity_factor=0.0 is invalid: must be a number > 0'),
  ('model.encoder.moe.router.dispatcher.name=foo', "name='foo' is invalid"),
  ('model.classifier=pool', "model.classifier='pool' is invalid"),
  ('dataset.train.batch_size=12', 'dataset.train.batch_size=12 is invalid'),
  ('dataset.train.name=imagenet', "dataset.train.name='imagenet' is invalid"),
  ('num_train_steps=-1', 'num_train_steps=-1 is invalid'),
  ('num_expert_partitions=3', 'num_expert_partitions=3 is invalid'),
  ('save_checkpoint.keep_last=0', 'keep_last=0 is invalid'),
  ('report_progress.every_steps=0', 'every_steps=0 is invalid'),
  ('evaluate.limit=0', 'evaluate.limit=0 is invalid'),
  ('augment.crop_scale=(0.0,1.0)', 'crop_scale=(0.0, 1.0)'),
  ('loss.name=hinge', "loss.name='hinge' is invalid"),
  ('fewshot.every_steps=-1', 'fewshot.every_steps=-1 is invalid'),
  # Rejected while parsing the command line.
  ('seed=1.5', "--config.seed=1.5: invalid literal for int()"),
  ('consistency.weight=abc', '--config.consistency.weight=abc'),
  ('sed=1', "config has no key 'sed' (--config.sed); did you mean seed?"),
  ('consistency.wieght=0.1', "config has no key 'consistency.wieght'"),
]  # fmt: skip


@pytest.mark.parametrize('override,message', BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_config_gives_one_line(override, message):
  """What main does with the command line, on 8 devices, in-process."""
  with pytest.raises(cli.CliError) as e:
    config = cli.load_config(['main', f'--config={SMOKE}',
                              f'--config.{override}'])  # fmt: skip
    cli.check_config(config, num_devices=8)
  text = str(e.value)
  assert '\n' not in text and 'Traceback' not in text
  assert message in text


def _main(*args, workdir):
  return commands.run(
    commands.module('vmoe_jsd.main', f'--workdir={workdir}', *args)
  )


@pytest.mark.parametrize(
  'args,message',
  [
    (['--config=configs/defualt.py'],
     "vmoe_jsd.main: error: config file 'configs/defualt.py' does not exist "
     '(did you mean configs/default.py?). Configs that exist: '
     'configs/default.py, '),
    ([f'--config={SMOKE}', '--config.optimizer.learning_rate.peak_value=-1'],
     'vmoe_jsd.main: error: config.optimizer.learning_rate.peak_value=-1.0 '
     'is invalid: must be a number > 0'),
    ([f'--config={SMOKE}', '--config.consistency.wieght=1'],
     "vmoe_jsd.main: error: config has no key 'consistency.wieght'"),
    ([f'--config={SMOKE}:x', '--config.seed=abc'],
     'vmoe_jsd.main: error: flag --config.seed=abc: invalid literal'),
  ],
)  # fmt: skip
@pytest.mark.processes  # main's exit status and stderr.
def test_real_command_line_errors_are_one_line(tmp_path, args, message):
  proc = _main(*args, workdir=str(tmp_path / 'run'))
  assert proc.returncode == 2, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1, proc.stderr
  assert lines[0].startswith(message)
  assert not os.path.exists(tmp_path / 'run')


@pytest.mark.processes  # Three runs of main: its console.
def test_console_is_quiet_and_a_finished_workdir_is_kept(tmp_path):
  """One run of the smoke config: only the project's own lines; files
  written; a second run keeps results.json; --reevaluate keeps the time."""
  workdir = str(tmp_path / 'run')
  first = _main(f'--config={SMOKE}', '--config.report_progress.every_steps=3',
                workdir=workdir)  # fmt: skip
  assert first.returncode == 0, first.stderr
  assert first.stderr == ''
  lines = first.stdout.strip().splitlines()
  own = ('JAX ', 'Model: ', '[step ', '[eval step ', 'layer ', 'encoderblock_')
  assert all(line.startswith(own) for line in lines), first.stdout
  assert sum(line.startswith('[step ') for line in lines) == 3  # 1, 3, 6
  files = set(os.listdir(workdir))
  assert {'config.json', 'train_history.jsonl', 'results.json'} <= files
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['report_progress']['every_steps'] == 3
  with open(os.path.join(workdir, 'train_history.jsonl')) as f:
    history = [json.loads(line) for line in f]
  assert [h['step'] for h in history] == [1, 3, 6]
  with open(os.path.join(workdir, 'results.json')) as f:
    before = f.read()

  again = _main(f'--config={SMOKE}', workdir=workdir)
  assert again.returncode == 0, again.stderr
  assert 'has finished (6 steps' in again.stdout
  assert '[step' not in again.stdout and '[eval' not in again.stdout
  with open(os.path.join(workdir, 'results.json')) as f:
    assert f.read() == before

  reeval = _main(f'--config={SMOKE}', '--reevaluate', workdir=workdir)
  assert reeval.returncode == 0, reeval.stderr
  assert '[eval step 6]' in reeval.stdout
  with open(os.path.join(workdir, 'results.json')) as f:
    after = json.load(f)
  old = json.loads(before)
  assert (
    after['train_seconds_excluding_compile']
    == (old['train_seconds_excluding_compile'])
  )
  assert after['train_seconds_excluding_compile'] > 0
  assert after['accuracy'] == old['accuracy']


def test_devices_line_and_idle_gpu_warning(monkeypatch):
  lines = cli.describe_devices()
  assert lines[0].startswith(f'JAX {jax.__version__} backend: cpu; 8 device')
  monkeypatch.setattr(cli, 'visible_gpus', lambda: ['/dev/nvidia0'])
  lines = cli.describe_devices()
  assert len(lines) == 2
  assert lines[1].startswith('WARNING: this machine has GPU device files')
  assert './setup.sh --accelerator=gpu' in lines[1]


@pytest.mark.parametrize(
  'arg,message',
  [
    ('--accelerator=fpga', "--accelerator='fpga' is invalid: use cpu, gpu or"),
    ('--gpu', "unknown option '--gpu'"),
  ],
)
def test_setup_rejects_bad_options_before_installing(arg, message):
  proc = commands.run(['bash', os.path.join(ROOT, 'setup.sh'), arg], timeout=30)
  assert proc.returncode == 2
  assert message in proc.stderr

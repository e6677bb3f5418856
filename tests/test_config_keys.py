"""Every config key README.md and docs/configuration.md document can be set
from the command line, through the parser `main` uses (cli.load_config:
ml_collections' config_flags), on the config it applies to (issue 16).

What counts as a documented key, read from the two files:
- `--config.KEY=VALUE` anywhere: KEY, overridden with VALUE as written;
- a backticked `config.KEY` (or `config.KEY=VALUE`), not a file name;
- in a code block, a line `config.KEY ...`; when KEY is a block and the
  line's comment is a comma-separated list of names (`config.augment  #
  size, crop_scale, ...`) or its value a `dict(name=..., ...)`, each name
  is a key of that block.
A key that names a block must exist and every leaf under it must be
settable. Every key is checked on configs/default.py; the keys of a
paragraph that mentions ImageNet or tfds also on configs/imagenet.py.

A leaf is overridden with the documented value, else with a value of its
type that differs from the default where the type allows (bool flipped,
numbers changed, placeholders given a value), and the parsed config must
hold that value.
"""

import ast
import os
import re

import jax
import numpy as np
import pytest
from ml_collections import ConfigDict

from vmoe_jsd import cli, config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ('README.md', os.path.join('docs', 'configuration.md'))
CONFIGS = {
  'default': os.path.join(ROOT, 'configs', 'default.py'),
  'imagenet': os.path.join(ROOT, 'configs', 'imagenet.py'),
}
# `config.json` is a file, `--config.key=value` the docs' "any key".
NOT_KEYS = re.compile(r'^(key|json)$')
FLAG = re.compile(r'--config\.([A-Za-z_][\w.]*)=([^\s`]*)')
TICKED = re.compile(r'`config\.([A-Za-z_][\w.]*?)(?:=([^`]*))?`')
CODE_LINE = re.compile(
  r'^\s*config\.([A-Za-z_][\w.]*)\s*(=\s*(.*?))?\s*(#.*)?$'
)
NAME_LIST = re.compile(r'^[A-Za-z_]\w*(\s*,\s*[A-Za-z_]\w*)+$')  # 2 or more


def _value(text):
  """A documented value as a command-line string (quotes dropped), or None
  when the doc leaves it open ('...', empty)."""
  text = (text or '').strip().rstrip(',').strip()
  if len(text) >= 2 and text[0] == text[-1] and text[0] in '\'"':
    text = text[1:-1]
  return None if text in ('', '...') else text


def _code_line_keys(line):
  m = CODE_LINE.match(line)
  if not m:
    return []
  key, value, comment = m.group(1), m.group(3), m.group(4)
  keys = [(key, None)]
  if comment and NAME_LIST.match(comment[1:].strip()):
    keys += [(f'{key}.{n.strip()}', None) for n in comment[1:].split(',')]
  if value and value.startswith('dict('):
    keys += [(f'{key}.{n}', None) for n in re.findall(r'(\w+)=', value)]
  return keys


def documented_keys():
  """[(key, documented value or None, doc, paragraph mentions ImageNet)]."""
  found = []
  for doc in DOCS:
    with open(os.path.join(ROOT, doc)) as f:
      text = f.read()
    for paragraph in re.split(r'\n\s*\n', text):
      imagenet = bool(re.search(r'imagenet|tfds', paragraph, re.IGNORECASE))
      keys = FLAG.findall(paragraph) + TICKED.findall(paragraph)
      for line in _logical_lines(paragraph):
        keys += _code_line_keys(line)
      found += [(key, _value(value), doc, imagenet) for key, value in keys
                if not NOT_KEYS.search(key)]  # fmt: skip
  return found


def _logical_lines(paragraph):
  """Its lines, a line with unclosed parentheses joined with the next."""
  lines, pending = [], ''
  for line in paragraph.splitlines():
    pending = f'{pending} {line.strip()}' if pending else line
    code = pending.split('#')[0]
    if code.count('(') <= code.count(')'):
      lines.append(pending)
      pending = ''
  return lines + ([pending] if pending else [])


def _leaves(config, prefix=''):
  out = []
  for name in config.keys():
    value = config[name]
    key = f'{prefix}{name}'
    if isinstance(value, ConfigDict):
      out += _leaves(value, key + '.')
    else:
      out.append((key, config.get_type(name), value))
  return out


def _node(config, key):
  node = config
  for part in key.split('.'):
    if not isinstance(node, ConfigDict) or part not in node:
      return None, False
    node = node[part]
  return node, True


def _probe(kind, value):
  """(command-line text, expected parsed value) of a value of `kind` that
  differs from `value` where the type allows."""
  if kind is bool:
    return str(not value), not value
  if kind is int:
    new = 7 if value is None else value + 1
    return str(new), new
  if kind is float:
    new = 0.375 if value is None else value / 2 + 0.125
    return repr(new), new
  if kind is str:
    return 'probe', 'probe'
  if kind is tuple:
    new = (1, 3) if value is None else tuple(value)
    return repr(new), new
  return repr(value), value


def _expected(kind, text):
  """What config_flags makes of a documented `text` for a field of `kind`."""
  if kind is str:
    return text
  if kind is bool:
    return text.lower() == 'true'
  return kind(ast.literal_eval(text))


def _overrides(config, key, doc_value):
  """{leaf key: (command-line text, expected value)} to test `key`, or a
  reason why it cannot be set."""
  node, exists = _node(config, key)
  if not exists:
    return f'{key}: no such key in the config'
  if isinstance(node, ConfigDict):
    leaves = [(f'{key}.{k}', t, v) for k, t, v in _leaves(node)]
  else:
    parent, leaf = _node(config, key.rpartition('.')[0])[0], key.split('.')[-1]
    kind = parent.get_type(leaf) if '.' in key else config.get_type(leaf)
    leaves = [(key, kind, node)]
  out = {}
  for leaf, kind, value in leaves:
    if doc_value is not None and leaf == key:
      out[leaf] = (doc_value, _expected(kind, doc_value))
    else:
      out[leaf] = _probe(kind, value)
  return out


def _load(path, overrides):
  argv = ['prog', f'--config={path}']
  argv += [f'--config.{k}={text}' for k, (text, _) in overrides.items()]
  return cli.load_config(argv)


def unsettable(config_name, keys):
  """The documented keys of `keys` that cannot be set on one config, each
  with its reason."""
  path = CONFIGS[config_name]
  config = cli.load_config(['prog', f'--config={path}'])
  problems, overrides = [], {}
  for key, doc_value in keys:
    found = _overrides(config, key, doc_value)
    if isinstance(found, str):
      problems.append(found)
    else:
      overrides.update(found)
  try:
    parsed = _load(path, overrides)
  except cli.CliError:  # Find which ones, one at a time.
    parsed = None
  for key, (text, expected) in overrides.items():
    try:
      got = _node(parsed or _load(path, {key: (text, expected)}), key)[0]
    except cli.CliError as e:
      problems.append(f'--config.{key}={text}: {e}')
      continue
    if got != expected:
      problems.append(f'--config.{key}={text} gave {got!r}, not {expected!r}')
  return problems


def test_the_docs_name_keys():
  """The parser finds the keys the docs show (so the tests below test
  something): flags, backticked keys, code-block lines and their lists."""
  keys = {k for k, *_ in documented_keys()}
  for key in (
    'consistency.weight',  # --config.consistency.weight=0.1
    'dataset.train.data_dir',
    'model.variant',  # `config.model.variant='S/32'`
    'model.encoder.moe.router.dispatcher.capacity_factor',  # code block
    'augment.rotate_degrees',  # config.augment  # size, ..., rotate_degrees
    'consistency.stop_gradient',  # config.consistency = dict(...)
    'fewshot.l2_reg',
  ):
    assert key in keys, key
  assert not {k for k in keys if NOT_KEYS.search(k)}
  assert 'consistency.wieght' not in keys  # the misspelt example


@pytest.mark.parametrize('config_name', sorted(CONFIGS))
def test_documented_keys_are_settable_from_the_command_line(config_name):
  keys = {
    (key, value)
    for key, value, _, imagenet in documented_keys()
    if config_name == 'default' or imagenet
  }
  assert keys
  problems = unsettable(config_name, sorted(keys, key=lambda kv: kv[0]))
  assert not problems, '\n'.join(problems)


def _without_new_keys(config):
  """configs/default.py as it was before the keys above were added."""
  with config.unlocked():
    model = config.model
    del model['variant']
    del model.encoder['position_emb']
    del model.encoder.moe.router['name']
    del model.encoder.moe.router.dispatcher['capacity']
    del config.augment['rotate_degrees']
    del config.augment['translate']
    config.optimizer.weight_decay = [('.*/kernel$', 0.05)]
  return config


def _small_default_specs():
  """RunSpecs of configs/default.py with and without the added keys, at 2
  blocks of width 16 (the keys do not touch the sizes)."""
  small = [f'--config={CONFIGS["default"]}', '--config.model.hidden_size=16',
           '--config.model.encoder.mlp_dim=32',
           '--config.model.encoder.num_layers=2',
           '--config.model.encoder.moe.layers=(1,)']  # fmt: skip
  new = config_lib.resolve(cli.load_config(['p', *small]), 1)
  old = config_lib.resolve(_without_new_keys(cli.load_config(['p', *small])), 1)
  return new, old


def test_the_added_keys_resolve_to_the_old_specs():
  """The keys added so that the docs' keys can be set (variant, router and
  position-embedding names, dispatcher capacity, rotate_degrees, translate,
  weight_decay as a tuple) resolve to the specs of the default run before
  them: the same augmentation and optimizer specs, and model configs that
  differ only by the router and position-embedding names the model used
  by default (the names its code falls back to: see the slow test below for
  the numbers)."""
  new, old = _small_default_specs()
  assert new.views == old.views and new.optimizer == old.optimizer
  for cfg_new, cfg_old in (
    (new.model.config, old.model.config),
    (new.model.eval_config, old.model.eval_config),
  ):
    encoder = dict(cfg_new['encoder'])
    assert encoder.pop('position_emb') == {'name': 'learned'}
    moe = dict(encoder['moe'])
    router = dict(moe['router'])
    assert router.pop('name') == 'NoisyTopExpertsPerItemRouter'
    encoder['moe'] = {**moe, 'router': router}
    assert {**cfg_new, 'encoder': encoder} == cfg_old


@pytest.mark.slow
def test_the_added_keys_change_no_number_of_the_default_run():
  """The same initial parameters and logits of the training and evaluation
  models with and without the added keys (75 s under load: 8 programs)."""
  new, old = _small_default_specs()
  images = jax.random.uniform(jax.random.key(1), (8, 28, 28, 1))
  outputs = []
  for spec in (new, old):
    model = spec.model.build(deterministic=True)
    params = jax.jit(model.init)(jax.random.key(0), images)
    evaluate = spec.model.build_eval()
    logits = [jax.jit(model.apply)(params, images)[0],
              jax.jit(evaluate.apply)(params, images)[0]]  # fmt: skip
    outputs.append((params, logits))
  (p_new, y_new), (p_old, y_old) = outputs
  assert jax.tree.structure(p_new) == jax.tree.structure(p_old)
  for a, b in zip(jax.tree.leaves(p_new), jax.tree.leaves(p_old), strict=True):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(y_new, y_old, strict=True):
    np.testing.assert_array_equal(a, b)

"""Initial parameters from pre-trained checkpoints: ViT, V-MoE and ours.

`load_initial_params(config.initialization, target_params)` fills the freshly
initialised parameters of the model about to be trained from a dense ViT
`.npz` with sparse upcycling (vit.py), a google-research/vmoe checkpoint or
one of our orbax checkpoints; the rules of the fill are in fill.py and the
user's view in docs/checkpoints_and_storage.md.
"""

from __future__ import annotations

import collections.abc
import errno
from typing import Any

import jax
import jax.numpy as jnp

from vmoe_jsd import checkpoints, paths, sharding
from vmoe_jsd.config_errors import ConfigError, to_dict
from vmoe_jsd.initialization.fill import REPORT_KEYS, copy_matching_params
from vmoe_jsd.initialization.posemb import (  # noqa: F401 - re-exported
  interpolate_grid,
  resize_pos_embedding,
)
from vmoe_jsd.initialization.vit import vit_to_vmoe_params

SOURCES = ('orbax', 'vit_npz', 'vmoe')
CONFIG_KEYS = ('keep_head', 'path', 'source', 'strict', 'upcycle')


def check_config(init: collections.abc.Mapping) -> None:
  """Raises ConfigError naming a bad key or value of config.initialization."""
  unknown = sorted(set(init) - set(CONFIG_KEYS))
  if unknown:
    raise ConfigError(
      f'config.initialization has unknown keys {unknown}; valid keys: '
      f'{list(CONFIG_KEYS)}'
    )
  source, path = init.get('source'), init.get('path')
  if source not in SOURCES:
    raise ConfigError(
      f'config.initialization.source={source!r} is unknown; choose one of '
      f'{list(SOURCES)}'
    )
  if not path:
    raise ConfigError(
      f'config.initialization.path={path!r} must name a checkpoint (a local '
      'or gs:// path).'
    )


def load_initial_params(
  init_config: Any, target_params: collections.abc.Mapping
) -> tuple[dict, dict]:
  """Initial params from the `config.initialization` block.

  Args:
    init_config: dict or ConfigDict with
      source: 'vit_npz' | 'vmoe' | 'orbax';
      path: the .npz file; the vmoe prefix (or its .index); the orbax
        workdir, checkpoints/ folder or step folder;
      upcycle (vit_npz only, default True): experts from the dense MLPs;
      keep_head (default False): copy head/pre_logits if shapes match;
      strict (default True): unmatched names are errors.
    target_params: the freshly initialised params of the model to train.

  Returns:
    (params, report): see `vit_to_vmoe_params`; report also has 'source'
    and 'path'.

  Raises:
    ValueError: an unknown source or key, or a checkpoint that does not fit.
    FileNotFoundError: if the checkpoint is not there.
  """
  cfg = to_dict(init_config)
  check_config(cfg)
  source, path = cfg['source'], str(cfg['path'])
  kwargs = dict(
    keep_head=bool(cfg.get('keep_head', False)),
    strict=bool(cfg.get('strict', True)),
  )
  if source == 'vit_npz':
    if not paths.isfile(path):
      raise FileNotFoundError(
        errno.ENOENT, 'ViT checkpoint (.npz) not found', path
      )
    params, report = vit_to_vmoe_params(
      checkpoints.read_npz_tree(path),
      target_params,
      upcycle=bool(cfg.get('upcycle', True)),
      what=f'ViT checkpoint {path!r}',
      **kwargs,
    )
  elif source == 'vmoe':
    prefix = path.removesuffix('.index')
    tree = checkpoints.read_vmoe_checkpoint(prefix)
    what = f'vmoe checkpoint {prefix!r}'
    params, report = copy_matching_params(
      tree, target_params, what=what, **kwargs
    )
  else:
    tree, info = checkpoints.read_orbax_params(path)
    what = f'orbax checkpoint {info["directory"]!r}'
    params, report = copy_matching_params(
      tree, target_params, what=what, **kwargs
    )
    report['step'] = info['step']
    report['skipped_checkpoints'] = info['skipped']
  if source != 'vit_npz' and 'upcycle' in cfg:
    report['notes'].append(f'upcycle is ignored for source={source!r}')
  report.update(source=source, path=path)
  return params, report


def load_eval_params(
  model_spec,
  image_size: int,
  channels: int,
  checkpoint: str,
  source: str,
  mesh,
  rules=sharding.DEFAULT_RULES,
) -> tuple[Any, dict[str, Any]]:
  """The evaluation model's parameters from a checkpoint, on `mesh`.

  `model_spec` (a models.spec.ModelSpec) gives the tree for views of
  `image_size` x `image_size` x `channels`; `checkpoint` is an orbax
  workdir, checkpoints/ or step folder (source 'orbax') or a vmoe prefix
  ('vmoe'). Returns (params sharded by `rules`, the report of
  `load_initial_params`).
  """
  eval_model = model_spec.build_eval()
  num = model_spec.min_images_per_batch(image_size, evaluation=True)
  shape = (num, image_size, image_size, channels)
  abstract = jax.eval_shape(
    lambda: eval_model.init(jax.random.key(0), jnp.zeros(shape))['params']
  )
  params, report = load_initial_params(
    {'source': source, 'path': checkpoint, 'keep_head': True, 'strict': True},
    abstract,
  )
  with jax.set_mesh(mesh):
    params = jax.device_put(
      params, sharding.tree_shardings(params, mesh, rules)
    )
  return params, report


def format_report(report: dict[str, Any], *, verbose: bool = False) -> str:
  """A few readable lines of a loader's report: names per category (the
  loaded ones only with `verbose`, else their count), then the notes."""
  head = f'Initialised from {report.get("source", "a checkpoint")}'
  if report.get('path'):
    head += f' {report["path"]}'
  if report.get('naming'):
    head += f' ({report["naming"]} naming)'
  lines = [head + ':']
  for key in REPORT_KEYS:
    names = report.get(key, [])
    label = 'unused checkpoint arrays' if key == 'unused' else key
    listed = ', '.join(names) if verbose or key != 'loaded' else '...'
    lines.append(f'  {label} ({len(names)}): {listed if names else "-"}')
  lines.extend(f'  note: {note}' for note in report.get('notes', []))
  return '\n'.join(lines)

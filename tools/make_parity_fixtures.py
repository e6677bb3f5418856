"""Writes the V-MoE parity fixtures of tests/data/vmoe_cases from vmoe itself.

Run on demand (NOT in CI; the fixtures it writes are committed), with
checkouts of google-research/vmoe and google-research/vision_transformer:

  python tools/make_parity_fixtures.py \
    --vmoe_dir=/path/to/vmoe --vit_dir=/path/to/vision_transformer \
    [--out=tests/data/vmoe_cases] [--cases=name,name]

It puts both checkouts on sys.path, builds small V-MoE models (Riquelme et
al. 2021, arXiv:2106.05974) across vmoe's option space with vmoe's own code
(`vmoe.nn.vit_moe.VisionTransformerMoe`), and for every case in CASES writes
`<out>/<case>/`:

  config.json   the model config exactly as vmoe takes it, plus 'train'
                (whether a train-mode record exists) and 'rng_seed'.
  checkpoint.*  the parameters, written by vmoe's own writer
                (`vmoe.checkpoints.partitioned.save_checkpoint`).
  io.npz        images (4, 16, 16, 3), labels (4,), and per mode
                (`eval_`: deterministic; `train_`: router noise and
                dropout from the keys of train_rngs(rng_seed)):
                logits, aux_loss (G,) (vmoe's metrics['auxiliary_loss']),
                loss (cross-entropy + mean auxiliary loss), for every MoE
                block i: router_logits_{i} (G, S, E) (clean logits, output of
                the router's 'dense'; for Soft MoE router_slot_logits_{i}
                (G, S, E, P), the clean token-slot logits, sown by a
                wrapper around SoftRouter.add_noise) and
                metric_{i}_{name} (vmoe's per-block router metrics), and
                grad/<param path> (gradients of loss wrt every parameter).

`<out>/manifest.json` records the vmoe and vision_transformer commits
(`git rev-parse HEAD` in each directory), the package versions and the
case list. The parameters are vmoe's initialisation plus N(0, 0.05^2)
noise (so that zero-initialised class tokens, biases and heads carry
information) with split_rngs=True (experts differ).

With --check_vmoe_parity=DIR (e.g. tests/data/vmoe_parity, the older fixture
made before this tool), it writes nothing: it restores DIR's checkpoint with
vmoe's reader, reruns vmoe's model on DIR's images at each of its capacity
factors and prints the largest difference from DIR/io.npz, exiting
non-zero when one exceeds 1e-5 of its array's largest value (float32
round-off differs across CPUs, so a fixture made elsewhere need not be
reproduced to the last bit).

vmoe's modules need only jax/flax (and TensorFlow's gfile for the checkpoint
writer); its trainer's extra dependencies (pandas) are not imported.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

NUM_IMAGES, IMAGE_SIZE, NUM_CLASSES = 4, 16, 5


def _model(
  classifier='token', router=None, *, representation_size=None, encoder=None
):
  """A tiny vmoe model config: 2 blocks, both MoE, 4 experts.

  Args:
    classifier: vmoe's classifier ('token', 'gap', 'map' or '0').
    router: the router kwargs (vmoe's encoder.moe.router).
    representation_size: width of the tanh pre-logits layer, or None.
    encoder: encoder keys that replace the defaults.

  Returns:
    The model config as vmoe's VisionTransformerMoe takes it.
  """
  tokens = (IMAGE_SIZE // 4) ** 2 + (classifier == 'token')
  cfg = {
    'num_classes': NUM_CLASSES,
    'patch_size': [4, 4],
    'hidden_size': 16,
    'classifier': classifier,
    'representation_size': representation_size,
    'head_kernel_zero_init': False,
    'encoder': {
      'num_layers': 2,
      'mlp_dim': 24,
      'num_heads': 2,
      'dropout_rate': 0.0,
      'attention_dropout_rate': 0.0,
      'moe': {
        'layers': [0, 1],
        'num_experts': 4,
        'group_size': 2 * tokens,  # 2 images per group, 2 groups.
        'split_rngs': True,
        'router': router,
      },
    },
  }
  cfg['encoder'].update(encoder or {})
  return cfg


def _top_k(k, cf, name='einsum', bpr=False, **kwargs):
  """NoisyTopExpertsPerItemRouter kwargs: K, capacity factor, dispatcher."""
  router = {
    'num_selected_experts': k,
    'noise_std': 1.0,
    'importance_loss_weight': 0.5,
    'load_loss_weight': 0.5,
    'dispatcher': {
      'name': name,
      'capacity_factor': cf,
      'batch_priority': bpr,
      'bfloat16': False,
    },
  }
  router['dispatcher'].update(kwargs.pop('dispatcher', {}))
  router.update(kwargs)
  return router


def _expert_choice(cf):
  """NoisyTopItemsPerExpertRouter kwargs with capacity factor `cf`."""
  return {
    'name': 'NoisyTopItemsPerExpertRouter',
    'noise_std': 1.0,
    'dispatcher': {'name': 'einsum', 'capacity_factor': cf, 'bfloat16': False},
  }


_SOFT = {
  'name': 'vmoe.projects.soft_moe.router.SoftRouter',
  'num_slots': 3,
  'noise_std': 0.1,
  'compute_similarity_metrics': False,
}


def _dense_around_moe():
  """3 blocks, MoE on block 1 only, K=3, sincos2d, qk-norm, dropout 0.1."""
  cfg = _model(
    'token',
    _top_k(3, 4.0),
    encoder={
      'num_layers': 3,
      'dropout_rate': 0.1,
      'attention_dropout_rate': 0.1,
      'attention_qk_norm': True,
      'position_emb': {'name': 'sincos2d'},
    },
  )
  cfg['encoder']['moe']['layers'] = [1]
  return cfg


# name: (vmoe model config, record train mode too).
CASES = {
  'top2_vanilla_einsum_cf4_token': (_model('token', _top_k(2, 4.0)), False),
  'top2_vanilla_einsum_cf05_token': (_model('token', _top_k(2, 0.5)), True),
  'top1_vanilla_indices_cf05_gap': (
    _model('gap', _top_k(1, 0.5, 'indices')),
    False,
  ),
  'top2_bpr_indices_cf05_map': (
    _model('map', _top_k(2, 0.5, 'indices', bpr=True), representation_size=8),
    True,
  ),
  'top1_bpr_einsum_cf05_zero': (_model('0', _top_k(1, 0.5, bpr=True)), False),
  'top2_bpr_einsum_cf4_gap_gshard': (
    _model('gap', _top_k(2, 4.0, bpr=True, gshard_loss_weight=0.3)),
    False,
  ),
  'top2_vanilla_einsum_bf16_cf05_token': (
    _model('token', _top_k(2, 0.5, dispatcher={'bfloat16': True})),
    False,
  ),
  'expert_choice_cf05_token': (_model('token', _expert_choice(0.5)), True),
  'expert_choice_cf4_gap': (_model('gap', _expert_choice(4.0)), False),
  'soft_moe_gap': (_model('gap', _SOFT), True),
  # Dense blocks around one MoE block, K=3, sincos2d, qk-norm and dropout
  # everywhere (attention, MLPs, experts): training mode draws 'dropout' too.
  'top3_dense_sincos_qknorm_dropout_token': (_dense_around_moe(), True),
}


def train_rngs(seed):
  """The keys of training mode.

  Args:
    seed: the case's rng_seed.

  Returns:
    {'gating': router-noise key, 'dropout': dropout key} (threefry).
  """
  return {
    'gating': jax.random.key(seed, impl='threefry2x32'),
    'dropout': jax.random.key(seed + 1000, impl='threefry2x32'),
  }


def _git_commit(path: str) -> str:
  """`git rev-parse HEAD` in `path`; exits naming it if that fails."""
  try:
    return subprocess.run(
      ['git', '-C', path, 'rev-parse', 'HEAD'],
      check=True,
      capture_output=True,
      text=True,
    ).stdout.strip()
  except (OSError, subprocess.CalledProcessError) as e:
    raise SystemExit(f'{path} is not a git checkout: {e}') from None


def _flatten(tree, prefix=''):
  """{'/'-joined path: numpy array} of a nested dict."""
  out = {}
  for k, v in tree.items():
    key = f'{prefix}/{k}' if prefix else str(k)
    if isinstance(v, dict):
      out.update(_flatten(v, key))
    else:
      out[key] = np.asarray(v)
  return out


def _record(model_cfg, params, images, labels, *, train, rng_seed):
  """Runs vmoe's model and its gradient for one mode.

  Args:
    model_cfg: vmoe model config.
    params: the parameters.
    images: (N, H, W, 3) float32 images.
    labels: (N,) int32 labels.
    train: training mode (noise, dropout) rather than deterministic.
    rng_seed: seed of train_rngs.

  Returns:
    {array name (see the module docstring): float32 numpy array}.
  """
  from vmoe.nn import vit_moe  # noqa: PLC0415 - from --vmoe_dir

  model = vit_moe.VisionTransformerMoe(deterministic=not train, **model_cfg)
  rngs = train_rngs(rng_seed) if train else {}

  def capture(mdl, method):
    return (
      method == '__call__'
      and isinstance(mdl, nn.Dense)
      and (mdl.name == 'dense')
    )

  def loss_fn(p):
    (logits, metrics), state = model.apply(
      {'params': p},
      images,
      rngs=rngs,
      capture_intermediates=capture,
      mutable=['intermediates'],
    )
    logp = jax.nn.log_softmax(logits)
    xent = -jnp.mean(jnp.take_along_axis(logp, labels[:, None], 1))
    loss = xent + jnp.mean(metrics['auxiliary_loss'])
    return loss, (logits, metrics, state['intermediates'])

  grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  (loss, (logits, metrics, inter)), grads = grad_fn(params)
  out = {
    'logits': logits,
    'loss': loss,
    'aux_loss': np.broadcast_to(metrics['auxiliary_loss'], (2,)),
  }
  for block in model_cfg['encoder']['moe']['layers']:
    name = f'encoderblock_{block}'
    router = inter['Encoder'][name]['Moe']['Router']
    if 'dense' in router:
      out[f'router_logits_{block}'] = router['dense']['__call__'][0]
    else:
      out[f'router_slot_logits_{block}'] = router['clean_logits'][0]
    for key, value in metrics[name].items():
      out[f'metric_{block}_{key}'] = value
  for key, value in _flatten(grads).items():
    out[f'grad/{key}'] = value
  return {k: np.asarray(v, np.float32) for k, v in out.items()}


def _patch_soft_router():
  """Makes vmoe's SoftRouter sow its clean logits (vmoe code unchanged)."""
  from vmoe.projects.soft_moe import router  # noqa: PLC0415 - from --vmoe_dir

  add_noise = router.SoftRouter.add_noise

  def add_noise_and_sow(self, logits):
    self.sow('intermediates', 'clean_logits', logits)
    return add_noise(self, logits)

  router.SoftRouter.add_noise = add_noise_and_sow


def make_case(name, model_cfg, train, out_dir, seed):
  """Writes one case's fixture folder `out_dir/name`.

  Args:
    name: case name.
    model_cfg: vmoe model config.
    train: also record training mode.
    out_dir: the folder of all cases.
    seed: seeds the images, labels, initialisation, noise and rngs.
  """
  from vmoe.checkpoints import partitioned  # noqa: PLC0415 - from --vmoe_dir
  from vmoe.nn import vit_moe  # noqa: PLC0415 - from --vmoe_dir

  rng = np.random.default_rng(seed)
  images = rng.uniform(-1, 1, (NUM_IMAGES, IMAGE_SIZE, IMAGE_SIZE, 3))
  images = images.astype(np.float32)
  labels = rng.integers(0, NUM_CLASSES, NUM_IMAGES).astype(np.int32)
  model = vit_moe.VisionTransformerMoe(deterministic=True, **model_cfg)
  params = jax.jit(model.init)(jax.random.key(seed), images)['params']
  noise = jax.tree.map(
    lambda p: rng.normal(0.0, 0.05, p.shape).astype(np.float32), params
  )
  params = jax.tree.map(lambda p, n: p + jnp.asarray(n), params, noise)

  record = {'images': images, 'labels': labels}
  modes = [('eval', False)] + ([('train', True)] if train else [])
  for mode, is_train in modes:
    result = _record(
      model_cfg, params, images, labels, train=is_train, rng_seed=seed
    )
    record.update({f'{mode}_{k}': v for k, v in result.items()})
  case_dir = os.path.join(out_dir, name)
  os.makedirs(case_dir, exist_ok=True)
  partitioned.save_checkpoint(
    os.path.join(case_dir, 'checkpoint'), params, num_shards=1
  ).get()
  np.savez_compressed(os.path.join(case_dir, 'io.npz'), **record)
  with open(os.path.join(case_dir, 'config.json'), 'w') as f:
    json.dump(
      {'model': model_cfg, 'train': train, 'rng_seed': seed},
      f,
      indent=1,
      allow_nan=False,
    )
    f.write('\n')


def check_vmoe_parity(fixture_dir):
  """Reruns vmoe on the older vmoe_parity fixture and prints the differences.

  Args:
    fixture_dir: folder with config.json, checkpoint.* and io.npz.

  Returns:
    The largest |vmoe - fixture| over the arrays, each relative to its
    array's largest absolute value.
  """
  from vmoe.checkpoints import partitioned  # noqa: PLC0415 - from --vmoe_dir
  from vmoe.nn import vit_moe  # noqa: PLC0415 - from --vmoe_dir

  with open(os.path.join(fixture_dir, 'config.json')) as f:
    config = json.load(f)
  io = np.load(os.path.join(fixture_dir, 'io.npz'))
  params = partitioned.restore_checkpoint(
    os.path.join(fixture_dir, 'checkpoint'), None
  )
  model_cfg = {
    k: v
    for k, v in config.items()
    if k not in ('image_size', 'eval_capacity_factors')
  }
  worst = 0.0
  for cf in config['eval_capacity_factors']:
    model_cfg['encoder']['moe']['router']['dispatcher']['capacity_factor'] = cf
    model = vit_moe.VisionTransformerMoe(deterministic=True, **model_cfg)
    apply = jax.jit(
      lambda p, x, model=model: model.apply(
        {'params': p},
        x,
        capture_intermediates=lambda m, n: (
          isinstance(m, nn.Dense) and m.name == 'dense'
        ),
        mutable=['intermediates'],
      )
    )
    (logits, metrics), state = apply(params, io['images'])
    got = {
      f'logits_cf{cf}': logits,
      f'aux_loss_cf{cf}': metrics['auxiliary_loss'],
    }
    encoder = state['intermediates']['Encoder']
    for block in model_cfg['encoder']['moe']['layers']:
      router = encoder[f'encoderblock_{block}']['Moe']['Router']
      logits = router['dense']['__call__'][0]
      got[f'router_logits_cf{cf}_encoderblock_{block}'] = logits.reshape(
        -1, logits.shape[-1]
      )
    for key, value in got.items():
      diff = float(np.abs(np.asarray(value) - io[key]).max())
      rel = diff / float(np.abs(io[key]).max())
      print(f'{key}: max |vmoe - fixture| = {diff:.3g} ({rel:.3g} of max)')
      worst = max(worst, rel)
  return worst


def main(argv=None):
  """Writes the cases and the manifest (or checks the older fixture).

  Args:
    argv: command-line arguments (default sys.argv[1:]).
  """
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--vmoe_dir', required=True)
  parser.add_argument('--vit_dir', required=True)
  parser.add_argument(
    '--out',
    default=os.path.join(
      os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
      'tests',
      'data',
      'vmoe_cases',
    ),
  )
  parser.add_argument('--cases', default='', help='comma-separated subset')
  parser.add_argument(
    '--check_vmoe_parity',
    default='',
    help='folder of the older vmoe_parity fixture to re-derive (no writes)',
  )
  args = parser.parse_args(argv)
  for flag, path, module in (
    ('--vmoe_dir', args.vmoe_dir, 'vmoe'),
    ('--vit_dir', args.vit_dir, 'vit_jax'),
  ):
    if not os.path.isdir(os.path.join(path, module)):
      raise SystemExit(f'{flag}={path!r} has no {module}/ package folder')
    sys.path.insert(0, os.path.abspath(path))
  if args.check_vmoe_parity:
    worst = check_vmoe_parity(args.check_vmoe_parity)
    if worst > 1e-5:
      raise SystemExit(f'vmoe does not reproduce the fixture: {worst:.3g}')
    print(f'vmoe reproduces the fixture to {worst:.3g} of each array max')
    return
  names = [n for n in args.cases.split(',') if n] or list(CASES)
  unknown = sorted(set(names) - set(CASES))
  if unknown:
    raise SystemExit(f'--cases: unknown {unknown}; valid: {sorted(CASES)}')

  _patch_soft_router()
  for i, name in enumerate(names):
    model_cfg, train = CASES[name]
    print(f'[{i + 1}/{len(names)}] {name}', flush=True)
    make_case(name, model_cfg, train, args.out, seed=list(CASES).index(name))
  manifest_path = os.path.join(args.out, 'manifest.json')
  manifest = {}
  if os.path.exists(manifest_path):
    with open(manifest_path) as f:
      manifest = json.load(f)
  manifest.update(
    vmoe_commit=_git_commit(args.vmoe_dir),
    vision_transformer_commit=_git_commit(args.vit_dir),
    versions={
      'python': platform.python_version(),
      'jax': jax.__version__,
      'flax': flax.__version__,
      'numpy': np.__version__,
    },
    platform=jax.default_backend(),
    command='python tools/make_parity_fixtures.py --vmoe_dir=... --vit_dir=...',
  )
  manifest['cases'] = sorted(set(manifest.get('cases', [])) | set(names))
  with open(manifest_path, 'w') as f:
    json.dump(manifest, f, indent=1, allow_nan=False)
    f.write('\n')


if __name__ == '__main__':
  main()

r"""Cost of the in-step summaries (and of micro-steps): interleaved timing.

  python benchmarks/summary_cost.py --config=configs/default.py \
      [--variants=off,norms,norms+router,microsteps2] [--rounds=15]
      [--steps=5]

Builds the train step exactly as training does (train.build_training) once
per variant: 'off' (the default run), 'norms' (config.summaries.norms),
'router' (config.summaries.router), 'norms+router', 'microstepsN'
(config.microsteps=N). One fixed batch of random images of the training
split's shape (nothing is read). Each round runs --steps steps of every
variant, in an order that alternates between rounds, so that load from
other processes falls on all of them alike; the table gives each
variant's median ms per step and the median over rounds of its time
divided by 'off''s in the same round, with the smallest and largest ratio,
and the ratios of XLA's cost analysis of the compiled steps (FLOPs and
bytes accessed), which load does not move.
"""

import copy
import os
import statistics
import sys
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

# Measure the code of this checkout, not whatever vmoe_jsd is installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from vmoe_jsd import cli, config_lib, sharding, train  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'config file')
_VARIANTS = flags.DEFINE_list(
  'variants', ['off', 'norms', 'norms+router'], 'variants to time'
)
_ROUNDS = flags.DEFINE_integer(
  'rounds', 15, 'interleaved rounds', lower_bound=1
)
_STEPS = flags.DEFINE_integer(
  'steps', 5, 'steps per variant per round', lower_bound=1
)


def _overrides(variant: str) -> dict:
  if variant.startswith('microsteps'):
    return {'microsteps': int(variant[len('microsteps') :])}
  if variant == 'off':
    return {}
  return {f'summaries.{part}': True for part in variant.split('+')}


def _build(config, variant: str):
  """(mesh, train step, state, batch arrays) of one variant."""
  with config.unlocked():
    for key, value in _overrides(variant).items():
      node = config
      *parents, leaf = key.split('.')
      for p in parents:
        node = node[p]
      node[leaf] = value
  spec = config_lib.resolve(config, jax.device_count())
  shape = spec.train_data.image_shape()
  mesh = sharding.make_mesh(spec.num_expert_partitions)
  setup = train.build_training(spec, mesh, 1000, shape)
  batch = spec.train_data.batch_size
  rng = np.random.RandomState(0)
  images = rng.randint(0, 256, (batch, *shape)).astype(np.uint8)
  labels = rng.randint(0, spec.model.num_classes, batch).astype(np.int32)
  sizes = np.tile(np.int32(shape[:2]), (batch, 1))
  with jax.set_mesh(mesh):
    state = jax.jit(setup.init_state, out_shardings=setup.state_shardings)(
      setup.init_key
    )
    arrays = sharding.make_put_batch(mesh)(images, labels, sizes)
    cost = setup.train_step.lower(state, *arrays).compile().cost_analysis()
    state, metrics = setup.train_step(state, *arrays)  # compiles
    jax.block_until_ready(metrics)
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return [mesh, setup.train_step, state, arrays, cost]


def _time(run, steps: int) -> float:
  mesh, train_step, state, arrays, _ = run
  with jax.set_mesh(mesh):
    t = time.perf_counter()
    for _ in range(steps):
      state, metrics = train_step(state, *arrays)
    jax.block_until_ready((state, metrics))
  run[2] = state
  return (time.perf_counter() - t) / steps


def main(_):
  variants = _VARIANTS.value
  base = _CONFIG.value
  runs = {}
  for v in variants:
    t = time.time()
    runs[v] = _build(copy.deepcopy(base), v)
    print(f'{v}: compiled in {time.time() - t:.1f}s', flush=True)
  times = {v: [] for v in variants}
  for r in range(_ROUNDS.value):
    order = variants if r % 2 == 0 else variants[::-1]
    for v in order:
      times[v].append(_time(runs[v], _STEPS.value))
  ref = variants[0]
  print(f'\n| variant | ms/step (median) | / {ref} (median) | min | max | '
        f'XLA FLOPs / {ref} | XLA bytes accessed / {ref} |')  # fmt: skip
  print('| --- | --- | --- | --- | --- | --- | --- |')
  cost_ref = runs[ref][4]
  for v in variants:
    ratios = [a / b for a, b in zip(times[v], times[ref], strict=True)]
    cost = runs[v][4]
    flops = cost.get('flops', 0) / max(cost_ref.get('flops', 0), 1)
    acc = 'bytes accessed'
    mem = cost.get(acc, 0) / max(cost_ref.get(acc, 0), 1)
    print(f'| {v} | {1e3 * statistics.median(times[v]):.1f} | '
          f'{statistics.median(ratios):.3f} | {min(ratios):.3f} | '
          f'{max(ratios):.3f} | {flops:.4f} | {mem:.4f} |')  # fmt: skip
  print(f'\n{_ROUNDS.value} rounds x {_STEPS.value} steps per variant, '
        f'{jax.device_count()} {jax.devices()[0].platform} device(s), '
        f'os.getloadavg() {os.getloadavg()[0]:.1f} at the end.')  # fmt: skip


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)

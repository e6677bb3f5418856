r"""Stall of the train loop per checkpoint save, synchronous vs asynchronous.

  python benchmarks/checkpoint_stall.py --config=configs/default.py \
      [--steps=60] [--every=10] [--workdir=/tmp/stall]

Runs the real jitted train step of the config (one fixed batch) and saves
the state with checkpoints.Checkpointer every `--every` steps, once with
`asynchronous=False` and once with `asynchronous=True`. Each iteration is
timed to the end of its step (block_until_ready), so the stall of a save is
the median time of an iteration with a save minus that of one without.
Also prints the time spent inside `maybe_save` itself and the state size.
"""

import shutil
import statistics
import tempfile
import time

import jax
from absl import app, flags
from bench_setup import train_setup
from ml_collections import config_flags

from vmoe_jsd import checkpoints, cli

_CONFIG = config_flags.DEFINE_config_file('config', None, 'config file')
_STEPS = flags.DEFINE_integer(
  'steps', 60, 'timed steps per mode', lower_bound=1
)
_EVERY = flags.DEFINE_integer(
  'every', 10, 'save every this many steps', lower_bound=1
)
_WORKDIR = flags.DEFINE_string('workdir', None, 'where to save (default tmp)')


def main(_):
  s = train_setup(_CONFIG.value)
  mesh, images, labels, state = s.mesh, s.images, s.labels, s.state
  with jax.set_mesh(mesh):
    step = jax.jit(s.step_fn, donate_argnums=(0,))
    state, _ = step(state, images, labels)  # Compile.
    jax.block_until_ready(state)
  size = sum(x.nbytes for x in jax.tree_util.tree_leaves(state))
  print(f'state: {size / 2**20:.2f} MiB; saving every {_EVERY.value} steps')
  root = _WORKDIR.value or tempfile.mkdtemp(prefix='stall_')
  for asynchronous in (False, True):
    ckpt = checkpoints.Checkpointer(
      f'{root}/{"async" if asynchronous else "sync"}',
      every_steps=_EVERY.value,
      keep_last=2,
      asynchronous=asynchronous,
    )
    plain, saving, inside = [], [], []
    with jax.set_mesh(mesh):
      for i in range(1, _STEPS.value + 1):
        t0 = time.perf_counter()
        state, _ = step(state, images, labels)
        if ckpt.is_due(i):
          t1 = time.perf_counter()
          ckpt.maybe_save(i, state)
          inside.append(time.perf_counter() - t1)
        jax.block_until_ready(state)
        (saving if ckpt.is_due(i) else plain).append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    ckpt.close()
    final_wait = time.perf_counter() - t0
    step_ms = statistics.median(plain) * 1e3
    stall_ms = statistics.median(saving) * 1e3 - step_ms
    print(
      f'{"async" if asynchronous else "sync ":5}: step {step_ms:7.1f} ms; '
      f'stall per save {stall_ms:7.1f} ms (median of {len(saving)}; max '
      f'{max(saving) * 1e3 - step_ms:.1f}); inside maybe_save median '
      f'{statistics.median(inside) * 1e3:.1f} ms; wait at close '
      f'{final_wait * 1e3:.1f} ms'
    )
  if not _WORKDIR.value:  # Our own scratch folder: leave nothing behind.
    shutil.rmtree(root)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)

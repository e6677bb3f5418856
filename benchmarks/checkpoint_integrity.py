r"""Cost of the checkpoint checksums, on the host (CRC-32C) and on device.

  python benchmarks/checkpoint_integrity.py --config=configs/default.py
  python benchmarks/checkpoint_integrity.py --config=configs/imagenet.py \
      --num_devices=8 [--repeats=3] [--orbax]

Builds the training state's abstract shapes and shardings exactly as
training does (train.build_training: params plus optimizer state, e.g.
V-MoE-S/32 with Adam's two moments for configs/imagenet.py; nothing is
compiled but what is timed), fills them with random numbers on the
state's shardings, and times, interleaved, the median of --repeats runs of:

- host CRC-32C, what checkpoints/integrity.py does on every save
  (`integrity_summary`: each process's shards on the host, CRC-32C of each
  contiguous piece, combined per array; with the finiteness check) and on
  every restore (`integrity_problem`: the same plus the comparison);
- the on-device alternative that was measured against it: a jitted
  position-weighted uint32 sum of each array's bits (two lanes of odd
  murmur3-fmix32 weights, so that any single flipped bit changes both
  sums; sharding-independent by construction) and a finiteness reduction,
  one program for the whole state (compile time reported apart);
- host CRC-32C of the same bytes in one call per array (no pieces, no
  finiteness), for scale: the raw speed of the CRC.
With --orbax, a synchronous orbax save and restore of the state through
checkpoints.Checkpointer (checksums included) for scale.

The load average is printed with the numbers: on a shared machine compare
ratios from one run, not absolute times across runs.
"""

import os
import shutil
import statistics
import sys
import tempfile
import time

import google_crc32c
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from jax import lax
from ml_collections import config_flags

# Measure the code of this checkout, not whatever vmoe_jsd is installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from vmoe_jsd import checkpoints, cli, config_lib, sharding, train  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'config file')
_NUM_DEVICES = flags.DEFINE_integer(
  'num_devices',
  1,
  'simulated CPU devices (the state is sharded over them)',
  lower_bound=1,
)
_REPEATS = flags.DEFINE_integer(
  'repeats', 3, 'timed runs of each method', lower_bound=1
)
_ORBAX = flags.DEFINE_bool('orbax', False, 'also time an orbax save/restore')


def random_state(config):
  """Random bits in the shapes, dtypes and shardings of the train state."""
  spec = config_lib.resolve(config, jax.device_count())
  mesh = sharding.make_mesh(spec.num_expert_partitions)
  setup = train.build_training(spec, mesh, 1000, spec.train_data.image_shape())
  leaves, treedef = jax.tree_util.tree_flatten(setup.abstract_state)

  def fill(key):
    out = []
    for i, a in enumerate(leaves):
      k = jax.random.fold_in(key, i)
      if jnp.issubdtype(a.dtype, jnp.inexact):  # Finite: orbax saves them.
        out.append(jax.random.normal(k, a.shape, a.dtype))
      else:
        out.append(jax.random.bits(k, a.shape, jnp.uint32).astype(a.dtype))
    return out

  shardings = jax.tree_util.tree_leaves(setup.state_shardings)
  arrays = jax.jit(fill, out_shardings=shardings)(jax.random.key(0))
  return jax.tree_util.tree_unflatten(treedef, jax.block_until_ready(arrays))


def _fmix32(h):
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def device_checksum(x):
  """(2,) uint32: sum_i u_i * (fmix32(i ^ c) | 1) mod 2^32, two lanes."""
  if x.dtype.itemsize == 4:
    words = lax.bitcast_convert_type(x, jnp.uint32)
  else:  # Zero-extended 1- or 2-byte words.
    unsigned = {1: jnp.uint8, 2: jnp.uint16}[x.dtype.itemsize]
    words = lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
  index = jnp.zeros(words.shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(words.ndim)):
    iota = lax.broadcasted_iota(jnp.uint32, words.shape, axis)
    index = index + iota * jnp.uint32(stride % 2**32)
    stride *= words.shape[axis]
  return jnp.stack(
    [
      jnp.sum(words * (_fmix32(index ^ jnp.uint32(c)) | 1), dtype=jnp.uint32)
      for c in (0, 0x9E3779B9)
    ]
  )


@jax.jit
def device_summary(leaves):
  sums = jnp.stack([device_checksum(x) for x in leaves])
  finite = jnp.stack(
    [
      jnp.all(jnp.isfinite(x))
      if jnp.issubdtype(x.dtype, jnp.inexact)
      else jnp.bool_(True)
      for x in leaves
    ]
  )
  return sums, finite


def crc_per_array(leaves):
  return [google_crc32c.value(np.ascontiguousarray(x)) for x in leaves]


def _median_seconds(fn, repeats):
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def main(_):
  jax.config.update('jax_num_cpu_devices', _NUM_DEVICES.value)
  state = random_state(_CONFIG.value)
  leaves = jax.tree_util.tree_leaves(state)
  mib = sum(x.nbytes for x in leaves) / 2**20
  print(
    f'state: {len(leaves)} arrays, {mib:.1f} MiB on '
    f'{jax.device_count()} device(s); load average '
    f'{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs'
  )
  t0 = time.perf_counter()
  compiled = device_summary.lower(leaves).compile()
  print(f'device sum: compile {time.perf_counter() - t0:.2f} s (once a run)')
  checksums, _ = checkpoints.integrity_summary(state)
  record = checkpoints.integrity_record(checksums)
  methods = {
    'host CRC-32C, per save (integrity_summary)': lambda: (
      checkpoints.integrity_summary(state)
    ),
    'host CRC-32C, per restore (integrity_problem)': lambda: (
      checkpoints.integrity_problem(state, record)
    ),
    'device weighted sum + finiteness': lambda: compiled(leaves),
    'host CRC-32C of each whole array only': lambda: crc_per_array(leaves),
  }
  times = {name: [] for name in methods}
  for _ in range(_REPEATS.value):  # Interleaved: load changes hit all alike.
    for name, fn in methods.items():
      times[name].append(_median_seconds(fn, 1))
  base = statistics.median(times['host CRC-32C, per save (integrity_summary)'])
  for name, ts in times.items():
    t = statistics.median(ts)
    print(
      f'{name:48s} {t * 1e3:9.1f} ms  {mib / 1024 / t:6.2f} GiB/s  '
      f'{t / base:5.2f}x'
    )
  if _ORBAX.value:
    time_orbax(state, mib)
  print(f'load average at the end {os.getloadavg()[0]:.1f}')


def time_orbax(state, mib):
  """A synchronous save and a restore through Checkpointer, for scale."""
  workdir = tempfile.mkdtemp(prefix='integrity_')
  ckpt = checkpoints.Checkpointer(workdir, 1, keep_last=1, asynchronous=False)
  t0 = time.perf_counter()
  ckpt.maybe_save(1, state)
  ckpt.wait()
  save = time.perf_counter() - t0
  abstract = jax.tree_util.tree_map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
    state,
  )
  t0 = time.perf_counter()
  jax.block_until_ready(ckpt.restore(1, abstract))
  restore = time.perf_counter() - t0
  ckpt.close()
  shutil.rmtree(workdir)  # Scratch: nothing left in the temp directory.
  print(
    f'orbax save (sync, with checksums) {save:7.2f} s; restore (checked) '
    f'{restore:7.2f} s for {mib:.0f} MiB'
  )


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)

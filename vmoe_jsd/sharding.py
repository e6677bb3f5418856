"""Device mesh, sharding rules and sharding constraints.

The mesh has two axes: 'data' and 'expert'. Batches (and routing groups) are
sharded over both; expert parameters are split over 'expert' and replicated
over 'data'; everything else is replicated. With E experts and N devices a
typical mesh is (N / num_expert_partitions, num_expert_partitions), e.g.
(2, 4) for 8 devices and E = 8 split in 4 partitions of 2 experts each.

Sharding rules are data: a list of (regex, partition spec) pairs matched
against '/'-joined parameter names (first match wins), as vmoe's
`params_axis_resources`: `[('Moe/Mlp/.*', ('expert',))]`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import flax.traverse_util
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

DATA_AXIS = 'data'
EXPERT_AXIS = 'expert'
BATCH_AXES = (DATA_AXIS, EXPERT_AXIS)

DEFAULT_RULES = (('Moe/Mlp/.*', (EXPERT_AXIS,)),)


def make_mesh(
  num_expert_partitions: int, devices: Sequence[jax.Device] | None = None
) -> Mesh:
  """Mesh (data, expert) over all (or the given) devices.

  Args:
    num_expert_partitions: size of the 'expert' axis; must divide the device
      count.
    devices: defaults to jax.devices() (all processes' devices).

  Returns:
    A Mesh with Auto axis types (classic GSPMD propagation).
  """
  devices = list(devices if devices is not None else jax.devices())
  num_devices = len(devices)
  if num_expert_partitions < 1 or num_devices % num_expert_partitions:
    raise ValueError(
      f'num_expert_partitions={num_expert_partitions} must be >= 1 and '
      f'divide the number of devices ({num_devices}); valid values: '
      f'{[d for d in range(1, num_devices + 1) if num_devices % d == 0]}'
    )
  shape = (num_devices // num_expert_partitions, num_expert_partitions)
  if len(devices) == len(jax.devices()):
    return jax.make_mesh(
      shape, (DATA_AXIS, EXPERT_AXIS), axis_types=(AxisType.Auto,) * 2
    )
  return Mesh(
    np.asarray(devices).reshape(shape),
    (DATA_AXIS, EXPERT_AXIS),
    axis_types=(AxisType.Auto,) * 2,
  )


def expert_parallel_mesh():
  """The active mesh when it has both 'data' and 'expert' axes, else None."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or not set(BATCH_AXES) <= set(mesh.axis_names):
    return None
  return mesh


def constrain(x: jax.Array, spec: PartitionSpec) -> jax.Array:
  """with_sharding_constraint under an active (data, expert) mesh, else x."""
  if expert_parallel_mesh() is None:
    return x
  return jax.lax.with_sharding_constraint(x, spec)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over every device."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def spec_for(name: str, ndim: int, rules: Sequence) -> PartitionSpec:
  """Partition spec of parameter `name` (with ndim dims) from the rules."""
  for pattern, spec in rules:
    if re.search(pattern, name):
      spec = tuple(spec) if isinstance(spec, (list, tuple)) else (spec,)
      if len(spec) > ndim:
        raise ValueError(
          f'sharding rule {pattern!r} -> {spec} has more axes than parameter '
          f'{name!r} ({ndim} dims)'
        )
      return PartitionSpec(*spec)
  return PartitionSpec()


def tree_shardings(tree, mesh: Mesh, rules: Sequence = DEFAULT_RULES):
  """NamedSharding for every leaf of a (nested dict) tree by its name.

  Leaves inside optimizer states are matched by the same names, since their
  paths end with the parameter's path.
  """

  def one(path, leaf):
    ndim = getattr(leaf, 'ndim', 0)
    return NamedSharding(mesh, spec_for(path_name(path), ndim, rules))

  return jax.tree_util.tree_map_with_path(one, tree)


def path_name(path) -> str:
  """The '/'-joined name of a pytree path ('Encoder/encoder_norm/bias')."""
  return '/'.join(key_name(k) for k in path)


def key_name(key) -> str:
  for attr in ('key', 'name', 'idx'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def flatten_names(tree) -> dict[str, object]:
  return {
    '/'.join(k): v for k, v in flax.traverse_util.flatten_dict(tree).items()
  }


def make_put_batch(mesh):
  """Host-local numpy arrays -> global arrays sharded over the batch."""
  spec = batch_sharding(mesh)

  def put(*arrays):
    return tuple(
      jax.make_array_from_process_local_data(spec, np.asarray(a))
      for a in arrays
    )

  return put

"""HLO collective parsing and the collectives of the compiled train step."""

import json
import os

import commands
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import smoke_config
from jax.sharding import PartitionSpec

from vmoe_jsd import hlo, inspect_step, sharding, train

S32 = os.path.join(commands.ROOT, 'configs', 'imagenet.py')  # V-MoE-S/32


# ----------------------------------------------------------------------------
# The parser, on hand-written HLO.
# ----------------------------------------------------------------------------
def test_explicit_replica_groups():
  assert hlo.parse_replica_groups('{{0,1},{2,3}}') == [[0, 1], [2, 3]]
  assert hlo.parse_replica_groups('{{0,4,8},{1,5,9}}') == [[0, 4, 8], [1, 5, 9]]
  # '{}' is one group of every device.
  assert hlo.parse_replica_groups('{}', num_devices=3) == [[0, 1, 2]]
  with pytest.raises(ValueError, match='num_devices'):
    hlo.parse_replica_groups('{}')


def test_iota_replica_groups():
  assert hlo.parse_replica_groups('[2,4]<=[8]') == [
    [0, 1, 2, 3],
    [4, 5, 6, 7],
  ]
  assert hlo.parse_replica_groups('[4,4]<=[4,4]T(1,0)') == [
    [0, 4, 8, 12],
    [1, 5, 9, 13],
    [2, 6, 10, 14],
    [3, 7, 11, 15],
  ]
  # iota(8) as (2,2,2) [a,b,c] = 4a + 2b + c, transposed to [c,b,a].
  assert hlo.parse_replica_groups('[2,4]<=[2,2,2]T(2,1,0)') == [
    [0, 4, 2, 6],
    [1, 5, 3, 7],
  ]
  with pytest.raises(ValueError, match='unparsed iota'):
    hlo.parse_replica_groups('[2,4]<=[8]T(')


def test_mesh_replica_groups():
  text = "mesh['axis_0'=4,'axis_1'=2] {'axis_0'}"
  assert hlo.parse_replica_groups(text) == [[0, 2, 4, 6], [1, 3, 5, 7]]
  text = "mesh['axis_0'=4,'axis_1'=2] {'axis_1'}"
  assert hlo.parse_replica_groups(text) == [[0, 1], [2, 3], [4, 5], [6, 7]]
  text = "mesh['axis_0'=2,'axis_1'=2] {'axis_0','axis_1'}"
  assert hlo.parse_replica_groups(text) == [[0, 1, 2, 3]]
  with pytest.raises(ValueError, match="'z'"):
    hlo.parse_replica_groups("mesh['a'=2] {'z'}")


def test_shape_bytes():
  assert hlo.shape_bytes('f32[2,3]{1,0}') == 24
  assert hlo.shape_bytes('(f32[2,3]{1,0}, bf16[4]{0}, s32[])') == 24 + 8 + 4
  assert hlo.shape_bytes('(pred[5], /*index=1*/u8[3])') == 8


HAND_HLO = """
ENTRY %main {
  %p0 = f32[8,4]{1,0} parameter(0)
  %all-to-all.3 = (f32[1,4]{1,0}, f32[1,4]{1,0}) all-to-all(%a, %b), \
channel_id=1, replica_groups={{0,1,2,3},{4,5,6,7}}, \
metadata={op_name="jit(f)/Moe/shard_map/all_to_all"}
  %all-reduce.1 = f32[16]{0} all-reduce(%c), channel_id=2, \
replica_groups=[4,2]<=[2,4]T(1,0), use_global_device_ids=true, to_apply=%add
  %all-gather = bf16[8,2]{1,0} all-gather(%d), channel_id=3, \
replica_groups=[1,8]<=[8], dimensions={0}
  %collective-permute.2 = f32[3]{0} collective-permute(%e), channel_id=4, \
source_target_pairs={{0,4},{4,0}}
  %all-gather-start = (f32[2]{0}, f32[4]{0}) all-gather-start(%f), \
channel_id=5, replica_groups={{0,1},{2,3},{4,5},{6,7}}, dimensions={0}
  %all-gather-done = f32[4]{0} all-gather-done(%all-gather-start)
  ROOT %add.9 = f32[8,4]{1,0} add(%p0, %p0)
}
"""


def test_parse_collectives_and_spanned_axes():
  assert len(HAND_HLO.splitlines()) == 11  # one line per instruction
  got = hlo.parse_collectives(HAND_HLO, num_devices=8)
  assert [(c.kind, c.bytes) for c in got] == [
    ('all-to-all', 32),
    ('all-reduce', 64),
    ('all-gather', 32),
    ('collective-permute', 12),
    ('all-gather', 16),
  ]
  assert got[0].op_name == 'jit(f)/Moe/shard_map/all_to_all'
  assert got[1].groups == ((0, 4), (1, 5), (2, 6), (3, 7))
  ids = np.arange(8).reshape(2, 4)
  names = ('data', 'expert')
  assert [hlo.spanned_axes(c.groups, ids, names) for c in got] == [
    ('expert',),
    ('data',),
    ('data', 'expert'),
    ('data',),
    ('expert',),
  ]
  assert hlo.spanned_axes([[3], [5]], ids, names) == ()
  with pytest.raises(ValueError, match='partition id 9'):
    hlo.spanned_axes([[0, 9]], ids, names)


# ----------------------------------------------------------------------------
# The parser, on programs XLA compiled (conftest: 8 CPU devices).
# ----------------------------------------------------------------------------
def test_axes_of_real_collectives():
  """psum over 'data' and all_to_all over 'expert' on a 2x4 mesh."""
  mesh = sharding.make_mesh(4)

  def body(x):
    y = jax.lax.psum(x, sharding.DATA_AXIS)
    return jax.lax.all_to_all(y, sharding.EXPERT_AXIS, 0, 0, tiled=True)

  f = jax.jit(
    jax.shard_map(
      body,
      mesh=mesh,
      in_specs=PartitionSpec(sharding.BATCH_AXES),
      out_specs=PartitionSpec(sharding.BATCH_AXES),
    )
  )
  x = jax.ShapeDtypeStruct((32, 3), jnp.float32)
  compiled = f.lower(x).compile()
  rows = inspect_step.collective_rows(compiled, mesh)
  kinds = {(r['kind'], r['axes']) for r in rows}
  assert kinds == {('all-reduce', ('data',)), ('all-to-all', ('expert',))}
  # Local block (32 / 8, 3) float32 on each device.
  assert {r['bytes'] for r in rows} == {4 * 3 * 4}
  text = inspect_step.report(compiled, mesh)
  assert 'all-to-all' in text and 'axes=expert' in text


def test_train_step_exchanges_over_expert_axis_only():
  """Smoke config on a 2 x 4 mesh: MoE all-to-alls inside expert groups,
  no collective-permute, no all-gather."""
  config = smoke_config.with_overrides(
    smoke_config.get_config(), num_expert_partitions=4
  )
  compiled = train.compile_train_step(config)
  mesh = sharding.make_mesh(4)
  rows = inspect_step.collective_rows(compiled, mesh)
  to_all = [r for r in rows if r['kind'] == 'all-to-all']
  # 2 exchanges forward + 2 backward for the one MoE layer.
  assert len(to_all) == 4, rows
  assert all(r['axes'] == ('expert',) for r in to_all), to_all
  kinds = {r['kind'] for r in rows}
  assert 'collective-permute' not in kinds and 'all-gather' not in kinds, rows
  assert inspect_step.memory_summary(compiled)['total_bytes'] > 0
  assert inspect_step.flops(compiled) > 0


# ----------------------------------------------------------------------------
# Acceptance: 16 simulated devices (a subprocess with its own XLA_FLAGS).
# ----------------------------------------------------------------------------
def _inspect(tmp_path, batch):
  out = tmp_path / f'inspect_{batch}.json'
  proc = commands.start(
    commands.module(
      'vmoe_jsd.inspect_step',
      f'--config={S32}:runlocal',
      '--num_devices=16',
      '--config.num_expert_partitions=4',
      '--config.model.encoder.moe.num_experts=8',
      f'--config.dataset.train.batch_size={batch}',
      '--config.dataset.test.batch_size=32',
      f'--json={out}',
    )
  )
  return proc, out


@pytest.mark.slow  # ~2 min on 2 cores: two 16-device compiles.
def test_s32_on_16_devices_moe_traffic_stays_in_expert_groups(tmp_path):
  jobs = [_inspect(tmp_path, batch) for batch in (64, 128)]
  results = []
  for proc, out in jobs:
    log = proc.communicate(timeout=900)[0]
    assert proc.returncode == 0, log[-3000:]
    assert "mesh: {'data': 4, 'expert': 4} over 16" in log
    with open(out) as f:
      results.append(json.load(f))
  small, large = results
  for res in results:
    rows = res['collectives']
    to_all = [r for r in rows if r['kind'] == 'all-to-all']
    assert to_all, 'no all-to-all: the MoE exchange was not expert-parallel'
    # Within one expert-axis group: devices that share their data coordinate.
    assert all(tuple(r['axes']) == ('expert',) for r in to_all), to_all
    moe_permutes = [
      r
      for r in rows
      if r['kind'] == 'collective-permute' and '/Moe/' in r['op_name']
    ]
    assert not moe_permutes, moe_permutes

  def total(res, keep):
    return sum(r['bytes'] for r in res['collectives'] if keep(r['kind']))

  other = lambda kind: kind != 'all-to-all'  # noqa: E731
  assert total(small, other) == total(large, other)
  is_a2a = lambda kind: kind == 'all-to-all'  # noqa: E731
  assert total(large, is_a2a) == 2 * total(small, is_a2a)

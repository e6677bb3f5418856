r"""Compile the train step of a config without running it, and report on it.

  python -m vmoe_jsd.inspect_step --config=configs/imagenet.py \
      [--num_devices=64] [--config.num_expert_partitions=8] [--json=out.json]

Prints the per-device memory (`Compiled.memory_analysis()`), the FLOPs
(`cost_analysis()`), and one line per collective of the compiled HLO: its
kind, the mesh axes its device groups span (vmoe_jsd.hlo) and its bytes per
device per run (xM: inside the loop of --config.microsteps=M, so run M times
per step), then totals per kind and axes per step. With --num_devices larger
than the number of real devices, that many CPU devices are simulated
(XLA_FLAGS=--xla_force_host_platform_device_count, set before jax starts).
Nothing is run and no data is read (vmoe_jsd.train.lower_train_step).
"""

from __future__ import annotations

import collections
import json
import os
import re

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from vmoe_jsd import cli, hlo, resilience, sharding, step, train

# Flags are defined only when this module runs as a program (see
# define_flags), so that importing it beside eval_main or main, which define
# their own --config, does not clash.
FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines --config, --num_devices and --json on absl's global flags."""
  config_flags.DEFINE_config_file(
    'config', None, 'Path to an ml_collections config file.', lock_config=True
  )
  flags.DEFINE_integer(
    'num_devices',
    None,
    'Devices of the mesh (default: all visible); simulated on CPU when there '
    'are fewer real ones.',
  )
  flags.DEFINE_string(
    'json', None, 'Also write the figures (collectives, memory, FLOPs) here.'
  )
  flags.mark_flags_as_required(['config'])


MIB = 2**20


def collective_rows(compiled, mesh, microsteps: int = 1) -> list[dict]:
  """One dict per collective of `compiled` (partitioned over `mesh`): kind,
  axes, bytes (per device and run), runs_per_step, op_name, name.

  The collectives inside the micro-step loop (op names under
  step.MICROSTEP_SCOPE) run config.microsteps times per step.
  """
  ids = np.arange(mesh.devices.size).reshape(mesh.devices.shape)
  in_loop = re.compile(rf'(^|/){step.MICROSTEP_SCOPE}/')
  return [
    {
      'kind': c.kind,
      'axes': hlo.spanned_axes(c.groups, ids, mesh.axis_names),
      'bytes': c.bytes,
      'runs_per_step': microsteps if in_loop.search(c.op_name) else 1,
      'op_name': c.op_name,
      'name': c.name,
    }
    for c in hlo.parse_collectives(compiled.as_text(), mesh.devices.size)
  ]


def memory_summary(compiled) -> dict[str, int]:
  """Per-device bytes from memory_analysis() (absent fields are skipped)."""
  mem = compiled.memory_analysis()
  out = {}
  for name in ('argument', 'output', 'alias', 'temp', 'generated_code'):
    value = getattr(mem, f'{name}_size_in_bytes', None)
    if value is not None:
      out[f'{name}_size_in_bytes'] = int(value)
  if {'argument_size_in_bytes', 'output_size_in_bytes'} <= set(out):
    out['total_bytes'] = (
      out['argument_size_in_bytes']
      + out['output_size_in_bytes']
      - out.get('alias_size_in_bytes', 0)
      + out.get('temp_size_in_bytes', 0)
    )
  return out


def flops(compiled) -> float | None:
  """FLOPs per device from cost_analysis(), or None if not reported."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  value = (cost or {}).get('flops')
  return None if value is None else float(value)


def _short_op(op_name: str) -> str:
  op = re.sub(r'^jit\([^)]*\)/', '', op_name)
  return op if len(op) <= 70 else '...' + op[-67:]


def report(compiled, mesh, microsteps: int = 1) -> str:
  """The text that the command prints (microsteps: see collective_rows)."""
  lines = [
    f'mesh: {dict(mesh.shape)} over {mesh.devices.size} '
    f'{mesh.devices.flat[0].platform} devices'
  ]
  mem = memory_summary(compiled)
  lines.append(
    'memory per device (MiB): '
    + ', '.join(
      f'{k.replace("_size_in_bytes", "").replace("_bytes", "")} {v / MIB:.2f}'
      for k, v in mem.items()
    )
  )
  f = flops(compiled)
  text = 'not reported' if f is None else f'{f:.4g}'
  if microsteps > 1 and f is not None:
    text += f" (XLA's cost analysis counts the {microsteps} micro-steps' loop"
    text += ' body once)'
  lines.append(f'FLOPs per device per step: {text}')
  rows = collective_rows(compiled, mesh, microsteps)
  lines.append(f'collectives: {len(rows)}')
  totals = collections.Counter()
  for r in rows:
    axes = ','.join(r['axes']) or '-'
    totals[(r['kind'], axes)] += r['bytes'] * r['runs_per_step']
    runs = f' x{r["runs_per_step"]}' if r['runs_per_step'] > 1 else ''
    lines.append(
      f'  {r["kind"]:<20} axes={axes:<12} {r["bytes"] / MIB:10.4f} MiB'
      f'{runs}  {_short_op(r["op_name"])}'
    )
  lines.append('totals per device per step:')
  for (kind, axes), total in sorted(totals.items()):
    lines.append(f'  {kind:<20} axes={axes:<12} {total / MIB:10.4f} MiB')
  return '\n'.join(lines)


def _select_devices(num_devices):
  if num_devices is None:
    return None
  if jax.device_count() >= num_devices:
    return jax.devices()[:num_devices]
  cpus = jax.devices('cpu')
  if len(cpus) < num_devices:
    raise ValueError(
      f'--num_devices={num_devices}: only {len(cpus)} CPU devices; jax was '
      'initialised before XLA_FLAGS could be set'
    )
  return cpus[:num_devices]


def main(argv):
  del argv
  resilience.exit_on_interrupt()  # Ctrl-C during a compile: no segfault.
  num_devices = FLAGS.num_devices
  # XLA reads XLA_FLAGS when its backends start (the first device query, in
  # _select_devices), not when jax is imported: importing is no jax use.
  if num_devices is not None:
    if num_devices < 1:
      cli.fail(
        f'--num_devices={num_devices} is invalid: must be an integer >= 1 '
        "(CPU devices to compile for; leave it out for the machine's)"
      )
    flag = '--xla_force_host_platform_device_count='
    old = re.sub(rf'{flag}\d+', '', os.environ.get('XLA_FLAGS', ''))
    os.environ['XLA_FLAGS'] = f'{old} {flag}{num_devices}'.strip()
  if FLAGS.json and not os.path.isdir(os.path.dirname(FLAGS.json) or '.'):
    cli.fail(
      f'--json={FLAGS.json!r}: its folder does not exist; expected a file '
      'path in an existing folder'
    )
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  config = FLAGS.config
  try:
    devices = _select_devices(num_devices)
  except ValueError as e:
    cli.fail(str(e))
  try:  # A config error is one line (cli's convention), before compiling.
    spec = cli.check_config(
      config, jax.device_count() if devices is None else len(devices)
    )
  except cli.CliError as e:
    cli.fail(str(e))
  mesh = sharding.make_mesh(spec.num_expert_partitions, devices)
  lowered, mesh = train.lower_train_step(config, mesh)
  compiled = lowered.compile()
  microsteps = spec.step.microsteps
  print(report(compiled, mesh, microsteps), flush=True)
  if FLAGS.json:
    figures = {
      'mesh': dict(mesh.shape),
      'memory': memory_summary(compiled),
      'flops': flops(compiled),
      'microsteps': microsteps,
      'collectives': collective_rows(compiled, mesh, microsteps),
    }
    with open(FLAGS.json, 'w') as f:
      json.dump(figures, f, indent=1)


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)

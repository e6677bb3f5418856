"""Converts parameters between our orbax checkpoints and vmoe's format.

  python -m vmoe_jsd.convert --input=WORKDIR --output=/ckpt/vmoe_s32 \\
      [--num_shards=N]
  python -m vmoe_jsd.convert --input=/ckpt/vmoe_s32 --output=/ckpt/orbax_s32

The direction follows the input. A vmoe checkpoint (Riquelme et al., 2021,
google-research/vmoe; see checkpoints/vmoe_format.py) is a prefix with a
`.index` file; it is written as a params-only orbax step folder,
`OUTPUT/state/` holding {'params': ...} as our training checkpoints do, which
initialization.load_initial_params({'source': 'orbax', 'path': OUTPUT}, ...)
reads. Our orbax checkpoints (a workdir, its checkpoints/ folder for the
latest step, or a step folder) are written as vmoe checkpoints of their
params only, in `--num_shards` data shards. Nothing is overwritten.
"""

from __future__ import annotations

import errno
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import orbax.checkpoint as ocp

from vmoe_jsd import checkpoints, cli, paths

FORMATS = ('orbax', 'vmoe')


def detect_format(path: str) -> str:
  """'vmoe' for a prefix with a .index file (or that file), 'orbax' for our
  checkpoints (a workdir, its checkpoints/ folder or a step folder).

  Raises:
    FileNotFoundError: if nothing exists at `path`.
    ValueError: if it is neither format.
  """
  prefix = path.removesuffix('.index')
  if paths.isfile(prefix + '.index'):
    return 'vmoe'
  if not paths.exists(path):
    raise FileNotFoundError(
      errno.ENOENT,
      'Input not found (neither a vmoe prefix with a .index file nor an '
      'orbax checkpoint folder)',
      path,
    )
  try:
    checkpoints.find_orbax_state_dir(path)
  except ValueError as e:
    raise ValueError(
      f'Cannot recognise the format of {path!r}: no {prefix + ".index"!r} '
      f'(vmoe), and not an orbax checkpoint ({e})'
    ) from None
  return 'orbax'


def write_orbax_params(directory: str, params: Mapping[str, Any]) -> None:
  """Writes {'params': params} (nested dict of arrays) as a step folder like
  our training's, `directory` (must not exist)."""
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    checkpointer.save(
      paths.resolve(directory),
      ocp.args.Composite(state=ocp.args.StandardSave({'params': dict(params)})),
    )


def _files_under(directory: str) -> list[str]:
  # Listed under `directory` as given (relative stays relative).
  root = paths.resolve(directory)
  return sorted(
    directory.rstrip('/') + '/' + str(folder / name)[len(str(root)) + 1 :]
    for folder, _, names in root.walk()
    for name in names
  )


def convert(
  input_path: str, output_path: str, *, num_shards: int | None = None
) -> dict[str, Any]:
  """Converts the params at `input_path` into the other format at
  `output_path` (a vmoe prefix in `num_shards` data shards, default 1; or a
  new orbax step folder); returns a summary: 'direction', 'num_arrays',
  'num_params', 'files', 'step' (orbax input only).

  Raises:
    FileNotFoundError: if the input does not exist.
    ValueError: for an unrecognised input, an existing output, or
      --num_shards with an orbax output.
  """
  source = detect_format(input_path)
  summary: dict[str, Any] = {'step': None}
  if source == 'orbax':
    prefix = output_path.removesuffix('.index')
    if paths.exists(prefix + '.index'):
      raise ValueError(f'Output {prefix + ".index"!r} exists; not overwriting.')
    params, info = checkpoints.read_orbax_params(input_path)
    files = checkpoints.write_vmoe_checkpoint(
      prefix, params, num_shards=1 if num_shards is None else num_shards
    )
    summary.update(direction='orbax -> vmoe', step=info['step'])
  else:
    if num_shards is not None:
      raise ValueError(
        '--num_shards applies to vmoe outputs; this input is a vmoe '
        'checkpoint, so the output is orbax.'
      )
    if paths.exists(output_path):
      raise ValueError(f'Output {output_path!r} exists; not overwriting.')
    params = checkpoints.read_vmoe_checkpoint(input_path)
    write_orbax_params(output_path, params)
    files = _files_under(output_path)
    summary.update(direction='vmoe -> orbax')
  leaves = list(checkpoints.flatten_tree(params).values())
  summary.update(
    num_arrays=len(leaves),
    num_params=int(sum(np.size(x) for x in leaves)),
    files=files,
  )
  return summary


def main(argv: Sequence[str] | None = None) -> int:
  parser = cli.ArgumentParser(
    prog='python -m vmoe_jsd.convert',
    description=(
      'Convert params between our orbax checkpoints and vmoe checkpoints; '
      'the direction follows the input.'
    ),
  )
  parser.add_argument(
    '--input',
    required=True,
    help='vmoe prefix (with a .index file), or orbax workdir, checkpoints/ '
    'folder or step folder.',
  )
  parser.add_argument(
    '--output',
    required=True,
    help='vmoe prefix (for an orbax input) or new orbax step folder.',
  )
  parser.add_argument(
    '--num_shards', type=int, help='data shards of a vmoe output (default 1).'
  )
  args = parser.parse_args(argv)
  try:
    summary = convert(args.input, args.output, num_shards=args.num_shards)
  except (FileNotFoundError, ValueError) as e:
    cli.print_error(str(e))  # A missing or wrong --input: one line.
    return 2
  step = '' if summary['step'] is None else f' (step {summary["step"]})'
  print(
    f'{summary["direction"]}{step}: wrote {summary["num_arrays"]} arrays, '
    f'{summary["num_params"]:,} parameters, {len(summary["files"])} files:'
  )
  for path in summary['files']:
    print(f'  {path}')
  return 0


if __name__ == '__main__':
  sys.exit(main())

"""What a run writes to its workdir, besides checkpoints and event files.

- `config.json`: the full config of the run (hyperparameters; also written to
  TensorBoard's hparams by the metric writer).
- `train_history.jsonl`: one JSON object per progress report (JSON Lines,
  appended by every (re)start; read with `read_jsonl`).
- `results.json`: the final evaluation, written once training has finished.
  `finished_result` tells a finished workdir from one still to train.

File I/O of the trainer goes through these functions so that the storage
backend can change in one place.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from vmoe_jsd import paths

CONFIG = 'config.json'
HISTORY = 'train_history.jsonl'
RESULTS = 'results.json'


def write_json(path, obj: Any) -> None:
  """Writes `obj` as indented JSON (local or gs:// path)."""
  paths.write_json(path, obj)


def read_json(path) -> Any:
  return paths.read_json(path)


def append_jsonl(path, rows: Iterable[Mapping[str, Any]]) -> None:
  """Appends one JSON object per line."""
  text = ''.join(json.dumps(dict(r), default=str) + '\n' for r in rows)
  paths.append_text(path, text)


def read_jsonl(path) -> list[dict[str, Any]]:
  text = paths.read_bytes(path).decode()
  return [json.loads(line) for line in text.splitlines() if line.strip()]


def write_config(workdir, config: Mapping[str, Any]) -> None:
  """workdir/config.json: the config as the run sees it (overrides applied),
  as a plain dict (RunSpec.config)."""
  write_json(paths.join(workdir, CONFIG), dict(config))


def is_complete(result: Mapping[str, Any] | None) -> bool:
  """Whether a results.json dict comes from a run that trained to the end."""
  if not isinstance(result, Mapping):
    return False
  steps = result.get('num_train_steps')
  return (
    'accuracy' in result and steps is not None and result.get('step') == steps
  )


def finished_result(
  workdir: str, num_train_steps: int | None = None
) -> dict[str, Any] | None:
  """workdir's results.json if it is complete, else None.

  Args:
    workdir: the run's directory.
    num_train_steps: when given, the results must be for this many steps
      (a run extended with a larger num_train_steps is not finished).

  Returns:
    The results dict, or None when the run has still to train or evaluate.
  """
  path = paths.join(workdir, RESULTS)
  if not paths.exists(path):
    return None
  try:
    result = read_json(path)
  except (OSError, ValueError):
    return None
  if not is_complete(result):
    return None
  if num_train_steps and result['num_train_steps'] != num_train_steps:
    return None
  return result


def metric_writer(workdir: str, is_main: bool):
  """TensorBoard event files in workdir (process 0), no console copy.

  clu's default writer also logs every scalar through absl; the progress
  line of the trainer is the console's copy.
  """
  # clu's writers import TensorFlow: only when a run writes events.
  from clu import metric_writers  # noqa: PLC0415 - imports TensorFlow

  if not is_main:
    return metric_writers.MultiWriter([])
  return metric_writers.SummaryWriter(workdir)


def flat_hparams(config: Mapping[str, Any]) -> dict[str, Any]:
  """{'a.b.c': value} of a config dict, for TensorBoard's hparams (values
  that are not numbers, strings or booleans as strings)."""
  flat = {}

  def walk(prefix, value):
    if isinstance(value, Mapping):
      for k, v in value.items():
        walk(f'{prefix}{k}.', v)
    elif isinstance(value, (int, float, str, bool)):
      flat[prefix[:-1]] = value
    else:
      flat[prefix[:-1]] = str(value)

  walk('', config)
  return flat

"""Run paths, local or remote (gs://), through `etils.epath`.

Everything a run reads or writes (workdir, checkpoints, results, history,
initialization sources, vmoe-format checkpoints) goes through these helpers,
so that `gs://bucket/run` reaches the bucket instead of becoming a local
folder named `gs:`.

etils picks `tf.io.gfile` or `gcsfs` for `gs://`; orbax's arrays go through
tensorstore and TensorBoard's events through TensorFlow's own GCS
filesystem (docs/checkpoints_and_storage.md: which of them an emulator can
stand in for, and how tests/test_gcs.py runs).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from etils import epath

PathLike = str | os.PathLike


def is_remote(path: PathLike) -> bool:
  """True for a path with a URI scheme (gs://, s3://, ...)."""
  return '://' in os.fspath(path)


def resolve(path: PathLike) -> epath.Path:
  """`path` (local, relative or `~`, or a URI such as `gs://bucket/run`) as
  an epath.Path: remote ones exactly as given, local ones made absolute
  (orbax needs them absolute). ValueError for an empty path."""
  text = os.fspath(path)
  if not text:
    raise ValueError('empty path: give a folder or gs://bucket/folder')
  if is_remote(text):
    return epath.Path(text)
  return epath.Path(text).expanduser().resolve()


def join(path: PathLike, *parts: str) -> epath.Path:
  """resolve(path) / parts."""
  return resolve(path).joinpath(*parts)


def exists(path: PathLike) -> bool:
  return resolve(path).exists()


def isfile(path: PathLike) -> bool:
  return resolve(path).is_file()


def isdir(path: PathLike) -> bool:
  return resolve(path).is_dir()


def makedirs(path: PathLike) -> epath.Path:
  """Creates `path` and its parents if missing; returns it."""
  out = resolve(path)
  out.mkdir(parents=True, exist_ok=True)
  return out


def read_bytes(path: PathLike) -> bytes:
  return resolve(path).read_bytes()


def write_bytes(path: PathLike, data: bytes) -> None:
  """Writes `data` to `path` whole.

  Local files are written to a temporary sibling and renamed, so a reader
  (or a kill) never sees half a file; a GCS object only appears once its
  upload completes, which gives the same guarantee.
  """
  out = resolve(path)
  if is_remote(out):
    out.write_bytes(data)
    return
  tmp = out.parent / f'.tmp.{out.name}.{os.getpid()}'
  try:
    with open(tmp, 'wb') as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, out)
  finally:
    if tmp.exists():
      tmp.unlink()


def finite_json(obj: Any) -> Any:
  """`obj` with every non-finite float (NaN, +-Infinity) replaced by None.

  Python's json writes NaN and Infinity as bare words, which strict JSON
  parsers (RFC 8259; JavaScript, jq, most other languages) reject. The
  project writes them as null instead, as JavaScript's JSON.stringify
  does: null in a number's place means "not a finite number". numpy
  scalars and arrays become plain numbers and lists; tuples become lists.
  """
  if isinstance(obj, Mapping):
    return {str(k): finite_json(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [finite_json(v) for v in obj]
  if isinstance(obj, np.ndarray) or hasattr(obj, '__array__'):
    return finite_json(np.asarray(obj).tolist())  # numpy and jax arrays
  if isinstance(obj, (bool, np.bool_)):
    return bool(obj)
  if isinstance(obj, np.integer):
    return int(obj)
  if isinstance(obj, (float, np.floating)):
    return float(obj) if math.isfinite(obj) else None
  return obj


def dumps_json(obj: Any, indent: int | None = None, default=None) -> str:
  """Strict JSON text of `obj` (non-finite floats as null, see finite_json);
  `indent` and `default` as json.dumps's."""

  return json.dumps(
    finite_json(obj), indent=indent, default=default, allow_nan=False
  )


def write_json(path: PathLike, obj: Any) -> None:
  """Writes `obj` as strict, indented JSON (see dumps_json), whole."""
  write_bytes(path, dumps_json(obj, indent=1).encode())


def read_json(path: PathLike) -> Any:
  return json.loads(read_bytes(path))


def append_text(path: PathLike, text: str) -> None:
  """Appends `text` to the file at `path` (created if missing).

  A local file is appended to and flushed to the disk (fsync) before this
  returns, so a kill -9 right after keeps it. GCS objects cannot be
  appended to, so there the object is read and written back whole: meant
  for small logs such as train_history.jsonl.
  """
  out = resolve(path)
  if is_remote(out):
    old = out.read_text() if out.exists() else ''
    write_bytes(out, (old + text).encode())
    return
  with open(out, 'a', encoding='utf-8') as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())


def listdir(path: PathLike) -> list[str]:
  """Names of the entries of folder `path` (sorted)."""
  return sorted(p.name for p in resolve(path).iterdir())

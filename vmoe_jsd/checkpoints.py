"""Checkpoints: orbax save/restore/resume, and vmoe's format.

Training state is saved with orbax's CheckpointManager under
WORKDIR/checkpoints/<step>/, locally or on GCS (paths go through
`etils.epath`, see paths.py). Locally each step is written to a temporary
folder and renamed; on GCS orbax marks a finished step with
`commit_success.txt`. Either way a kill mid-save leaves the previous
checkpoint intact.

Saving is asynchronous by default (`config.save_checkpoint.asynchronous`):
`save` returns once the arrays are copied off the devices, and the files are
written by a background thread while training goes on. Every save waits for
the previous one; `close` (and so the end of a run, a preemption stop and
the exception path) waits for the last.

A run started again with the same workdir restores the newest step that can
be read onto the current device mesh (the sharding of each array comes from
the abstract target); the data order and random streams are re-derived from
the step (see train.py). A checkpoint that cannot be read (a truncated or
missing file, a half-written folder) is reported with its step and error,
left where it is, and the previous one is tried; if none can be read the run
stops with `NoUsableCheckpointError` rather than starting from scratch.

orbax and tensorstore keep no checksum of the data, so a flipped bit on disk
used to restore silently (NaN or garbage in a kernel, or in Adam's moments).
Each save therefore records a CRC-32C of every array (the `integrity` item
of the step, JSON), and a restore compares the arrays it read with it: a
mismatch, or a restored state holding NaN or Inf, counts as a damaged step
like an unreadable one (reported in one line naming the step and the array,
left in place, the previous step tried). Each process checksums the shards
it holds and the processes agree on the verdict. Checkpoints saved before
checksums were recorded restore with a one-line note (finiteness is still
checked). A state holding NaN or Inf is never saved: it would push the
good checkpoints out of the `keep_last` window.

vmoe's own checkpoint format (`.index` + `.data-NNNNN-of-NNNNN`) is read and
written by vmoe_format.py; `read_vmoe_checkpoint` is re-exported here.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

import google_crc32c
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from vmoe_jsd import paths, run_files
from vmoe_jsd.config_errors import check_range, fail, to_dict
from vmoe_jsd.vmoe_format import (  # noqa: F401 - re-exported API
  match_tree,
  read_vmoe_checkpoint,
  write_vmoe_checkpoint,
)

DAMAGED_SUFFIX = '.damaged'
INTEGRITY_ITEM = 'integrity'  # The step's JSON item holding the checksums.


@dataclasses.dataclass(frozen=True)
class CheckpointSpec:
  """config.save_checkpoint.

  Attributes:
    every_steps: save every N steps (0: only at the end and on a stop).
    keep_last: how many checkpoints to keep (>= 1).
    asynchronous: write files in the background while training goes on.
  """

  every_steps: int = 0
  keep_last: int = 2
  asynchronous: bool = True

  @classmethod
  def from_config(cls, cfg: Mapping | None) -> CheckpointSpec:
    cfg = to_dict(cfg)
    every, keep = cfg.get('every_steps', 0), cfg.get('keep_last', 2)
    check_range('save_checkpoint.every_steps', every, 0, integer=True)
    check_range('save_checkpoint.keep_last', keep, 1, integer=True)
    asynchronous = cfg.get('asynchronous', True)
    if not isinstance(asynchronous, bool):
      fail('save_checkpoint.asynchronous', asynchronous, 'True or False')
    return cls(every, keep, asynchronous)


class NoUsableCheckpointError(RuntimeError):
  """The workdir holds checkpoints, but none of them can be restored."""


class Checkpointer:
  """Periodic orbax checkpoints of a pytree state in WORKDIR/checkpoints.

  Attributes:
    directory: where step folders are written (an epath.Path).
    every_steps: save when step % every_steps == 0 (and when forced).
    keep_last: how many checkpoints to keep.
    asynchronous: whether saves write files in the background.
    damaged: {step: error message} of checkpoints found unreadable (or
      whose data differs from its checksums, or is not finite).

  Raises (on construction):
    run_files.WorkdirError: WORKDIR/checkpoints exists and is no folder.
  """

  def __init__(
    self,
    workdir: paths.PathLike,
    every_steps: int,
    keep_last: int = 2,
    asynchronous: bool = True,
    log: Callable[[str], None] = print,
  ):
    self.directory = paths.join(workdir, 'checkpoints')
    if self.directory.exists() and not self.directory.is_dir():
      raise run_files.WorkdirError(
        f'{self.directory} is a file, not a folder: the checkpoints of the '
        'run go there. Move it away or use another --workdir.'
      )
    _quiet_closed_event_loop()
    self.every_steps = every_steps
    self.keep_last = keep_last
    self.asynchronous = asynchronous
    self.damaged: dict[int, str] = {}
    self._log = log
    self._manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=keep_last,
        create=True,
        enable_async_checkpointing=asynchronous,
      ),
    )

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def is_due(self, step: int) -> bool:
    return bool(self.every_steps) and step % self.every_steps == 0

  def maybe_save(self, step: int, state: Any, force: bool = False) -> bool:
    """Starts saving `state` as `step` if due (or forced).

    A step that already holds a good checkpoint is not written again; one
    that holds a damaged checkpoint (found by `restore_latest`) is first
    renamed to `<step>.damaged` (kept for inspection, out of orbax's way).
    The CRC-32C of every array is saved with it (before this returns, so
    the state may be changed or donated afterwards).

    Returns:
      Whether a save was started (with asynchronous saving the files are
      complete only after `wait`).

    Raises:
      FloatingPointError: `state` holds NaN or Inf (nothing is saved, so the
        older good checkpoints stay).
    """
    if not force and not self.is_due(step):
      return False
    if step in self.damaged:
      self._set_aside(step)
    elif step in self._manager.all_steps():
      return False
    checksums, non_finite = integrity_summary(state)
    if non_finite:
      raise FloatingPointError(
        f'Not saving the checkpoint of step {step}: {_first(non_finite)} '
        'holds NaN or Inf (the older checkpoints are kept). Lower the '
        'learning rate or check the data.'
      )
    self._manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        **{INTEGRITY_ITEM: ocp.args.JsonSave(integrity_record(checksums))},
      ),
    )
    return True

  def wait(self) -> None:
    """Blocks until the last save has been written (and raises its error)."""
    self._manager.wait_until_finished()

  def restore(self, step: int, abstract_state: Any) -> Any:
    """Restores `step` onto the shardings/dtypes of `abstract_state`, and
    checks it against its checksums (a collective on several processes).

    Args:
      step: a saved step.
      abstract_state: pytree of jax.ShapeDtypeStruct with `sharding` set
        (e.g. from jax.eval_shape plus the target shardings).

    Returns:
      The restored state, placed as abstract_state describes.

    Raises:
      IntegrityError: the data differs from its checksums, or is not finite.
    """
    state, record = self._read(step, abstract_state)
    problem = integrity_problem(state, record)
    if problem:
      raise IntegrityError(f'checkpoint at step {step}: {problem}')
    return state

  def restore_latest(self, abstract_state: Any) -> tuple[Any, int | None]:
    """Restores the newest checkpoint that can be read and is intact.

    Unreadable checkpoints, and those whose data differs from its saved
    checksums or is not finite, are reported (step and error, in one line),
    recorded in `self.damaged` and left in place; the next older one is
    tried. All processes agree on the outcome of every attempt.

    Args:
      abstract_state: as for `restore`.

    Returns:
      (state, step), or (None, None) when there is no checkpoint at all.

    Raises:
      NoUsableCheckpointError: checkpoints exist but none can be restored.
    """
    steps = sorted(self._manager.all_steps(), reverse=True)
    for step in steps:
      state, record, error = self._try_read(step, abstract_state)
      error = _agreed_error(error)
      if not error:  # Every process takes part in the check (a collective).
        error = _agreed_error(integrity_problem(state, record))
      if not error:
        if record is None:
          self._log(f'Note: the checkpoint at step {step} has no checksums '
                    '(saved before they were recorded); restored without '
                    'verifying its data (it is finite).')  # fmt: skip
        return state, step
      self.damaged[step] = error
      older = [s for s in steps if s < step]
      self._log(
        f'WARNING: checkpoint at step {step} in {self.directory} cannot be '
        f'restored ({error}); left in place. '
        + (f'Trying step {older[0]}.' if older else 'No older checkpoint.')
      )
    if steps:
      problems = '; '.join(f'step {s}: {self.damaged[s]}' for s in steps)
      raise NoUsableCheckpointError(
        f'None of the checkpoints in {self.directory} can be restored '
        f'({problems}). Not starting from scratch over them: repair or '
        'move away that folder (or use another --workdir) to start anew.'
      )
    return None, None

  def _read(self, step: int, abstract_state: Any) -> tuple[Any, dict | None]:
    """(state, integrity record or None if the step has none), unchecked.

    Reads through orbax's handlers, not `CheckpointManager.restore`: that
    ends with a barrier of all processes, which a process whose read failed
    never reaches, so the others would wait there while it waits in the
    agreement on the outcome (`_agreed_error`).
    """
    self.wait()
    folder = self.directory / str(step)
    record = read_integrity_record(folder)
    handler = ocp.StandardCheckpointHandler()
    try:
      state = handler.restore(
        folder / 'state', args=ocp.args.StandardRestore(abstract_state)
      )
    finally:
      handler.close()
    return state, record

  def _try_read(self, step: int, abstract_state: Any):
    """(state, record, '') or (None, None, the error in one line)."""
    try:
      return (*self._read(step, abstract_state), '')
    except Exception as e:  # noqa: BLE001 - any failure means unusable.
      return None, None, f'{type(e).__name__}: {_first_line(e)}'

  def close(self) -> None:
    """Waits for the last save and releases orbax's resources."""
    self._manager.wait_until_finished()
    self._manager.close()

  def _set_aside(self, step: int) -> None:
    source = self.directory / str(step)
    target = self.directory / f'{step}{DAMAGED_SUFFIX}'
    n = 1
    while target.exists():
      n += 1
      target = self.directory / f'{step}{DAMAGED_SUFFIX}{n}'
    if jax.process_index() == 0:
      source.rename(target)
    _sync(f'vmoe_jsd_set_aside_{step}')
    self._manager.reload()
    del self.damaged[step]
    self._log(
      f'Moved the damaged checkpoint of step {step} to {target} to save '
      'this step again.'
    )


def _first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return text[0][:300] if text else '(no message)'


def _agreed_error(error: str, max_bytes: int = 400) -> str:
  """'' if no process has an error, else the first failing process's error
  (named 'process i: ...' on several processes), the same on every process
  (a collective on multi-process runs: the texts travel as bytes)."""
  if jax.process_count() == 1:
    return error
  data = np.zeros(max_bytes, np.uint8)
  text = error.encode('utf-8', 'replace')[:max_bytes]
  data[: len(text)] = np.frombuffer(text, np.uint8)
  everyone = np.asarray(multihost_utils.process_allgather(data))
  for i, row in enumerate(everyone.reshape(jax.process_count(), -1)):
    if row.any():
      return f'process {i}: ' + bytes(row).rstrip(b'\0').decode(
        'utf-8', 'replace'
      )
  return ''


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def abstract_like(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `tree` with the given shardings."""
  return jax.tree_util.tree_map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
    tree,
    shardings,
  )


# ----------------------------------------------------------------------------
# Integrity: a CRC-32C of every saved array, and finiteness.
# ----------------------------------------------------------------------------
class IntegrityError(ValueError):
  """A restored array differs from its saved checksum, or is not finite."""


def _multmodp(a: int, b: int) -> int:
  """a(x) * b(x) modulo the CRC-32C polynomial, bit-reflected (bit 31 is
  x^0), as zlib's crc32.c computes it for its own polynomial."""
  m, p = 1 << 31, 0
  while True:
    if a & m:
      p ^= b
      if not a & (m - 1):
        return p
    m >>= 1
    b = (b >> 1) ^ _CRC32C_POLY if b & 1 else b >> 1


def _x2n_table() -> list[int]:
  table, p = [], 1 << 30  # x^1
  for _ in range(32):
    table.append(p)
    p = _multmodp(p, p)
  return table  # table[k] = x^(2^k) mod P


@functools.lru_cache(maxsize=1024)
def _x8nmodp(num_bytes: int) -> int:
  """x^(8 * num_bytes) mod P."""
  p, k = 1 << 31, 3  # x^0; 8 = 2^3
  while num_bytes:
    if num_bytes & 1:
      p = _multmodp(_X2N[k % 32], p)
    num_bytes >>= 1
    k += 1
  return p


def crc32c_combine(crc1: int, crc2: int, len2: int) -> int:
  """CRC-32C of A + B from crc1 = CRC(A), crc2 = CRC(B) and len2 = len(B)
  in bytes (the algebra of zlib's crc32_combine, for CRC-32C's
  polynomial; CRC(A + B) = CRC(A) * x^(8 len2) + CRC(B) mod P, where the
  pre- and post-inversions cancel out)."""
  return _multmodp(_x8nmodp(len2), crc1) ^ crc2


_CRC32C_POLY = 0x82F63B78  # Castagnoli et al. (1993), bit-reflected.
_X2N = _x2n_table()
CHECKSUM_ALGORITHM = 'crc32c of the row-major bytes of each whole array'


def _bounds(index: tuple, shape: tuple[int, ...]) -> tuple:
  """((start, stop) per axis) of a shard's index (slices)."""
  return tuple(s.indices(n)[:2] for s, n in zip(index, shape, strict=True))


def _runs(bounds: tuple, shape: tuple[int, ...]):
  """The contiguous pieces of a shard within the row-major whole array.

  Yields:
    (local index of the piece's leading axes, its offset in the whole
    array, its length), offsets and lengths in elements. A shard of whole
    trailing axes (any shard of a leading-axis sharding) is one piece.
  """
  strides = [math.prod(shape[i + 1 :]) for i in range(len(shape))]
  r = len(shape)
  while r and bounds[r - 1] == (0, shape[r - 1]):
    r -= 1
  if r == 0:
    yield (), 0, math.prod(shape)
    return
  start, stop = bounds[r - 1]
  lead = bounds[: r - 1]
  for idx in itertools.product(*(range(a, b) for a, b in lead)):
    offset = sum(i * s for i, s in zip(idx, strides, strict=False))
    local = tuple(i - a for i, (a, _) in zip(idx, lead, strict=True))
    yield (
      local,
      offset + start * strides[r - 1],
      (stop - start) * strides[r - 1],
    )


def _pieces(x) -> dict[tuple, Any]:
  """{bounds: one copy} of the distinct shards this process holds."""
  if not isinstance(x, jax.Array):
    return {tuple((0, n) for n in np.shape(x)): x}
  held = {}
  for shard in x.addressable_shards:
    held.setdefault(_bounds(shard.index, x.shape), shard.data)
  return held


def _run_table(x) -> tuple[tuple[int, int, tuple, tuple], ...]:
  """Every piece of the whole array (all processes), in offset order:
  (offset, length, shard bounds, local index) in elements."""
  shape = tuple(np.shape(x))
  if isinstance(x, jax.Array):
    return _sharded_run_table(shape, x.sharding)
  return tuple(_runs_of({tuple((0, n) for n in shape)}, shape))


@functools.lru_cache(maxsize=4096)
def _sharded_run_table(shape: tuple[int, ...], sharding) -> tuple:
  indices = sharding.devices_indices_map(shape).values()
  return tuple(_runs_of({_bounds(i, shape) for i in indices}, shape))


def _runs_of(distinct: set[tuple], shape: tuple[int, ...]) -> list:
  table = [(off, n, b, local) for b in distinct
           for local, off, n in _runs(b, shape)]  # fmt: skip
  return sorted(table)


def _local_crcs(leaves, tables) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """This process's CRC of each piece it holds (one copy of each), whether
  it holds it, and whether each array's pieces here are finite."""
  num_pieces = sum(len(t) for t in tables)
  crcs = np.zeros(num_pieces, np.uint32)
  held = np.zeros(num_pieces, np.uint32)
  finite = np.ones(len(leaves), np.uint32)
  pos = 0
  for i, (x, table) in enumerate(zip(leaves, tables, strict=True)):
    pieces = {b: np.asarray(d) for b, d in _pieces(x).items()}
    if jnp.issubdtype(x.dtype, jnp.inexact):
      # min and max propagate NaN, and are +-Inf if any element is.
      for data in pieces.values():
        if data.size and not np.isfinite([data.min(), data.max()]).all():
          finite[i] = 0
    for j, (_, _, bounds, local) in enumerate(table):
      if bounds in pieces:
        piece = np.ascontiguousarray(pieces[bounds][local])
        crcs[pos + j] = google_crc32c.value(piece.reshape(-1).view(np.uint8))
        held[pos + j] = 1
    pos += len(table)
  return crcs, held, finite


def _over_processes(*vectors: np.ndarray) -> list[np.ndarray]:
  """Each uint32 vector as (processes, n): every process's copy."""
  if jax.process_count() == 1:
    return [v[None] for v in vectors]
  flat = multihost_utils.process_allgather(np.concatenate(vectors))
  flat = np.asarray(flat).reshape(jax.process_count(), -1)
  return np.split(flat, np.cumsum([len(v) for v in vectors])[:-1], axis=1)


def _whole_crc(table, crcs, held, itemsize: int) -> int | None:
  """The CRC of a whole array from its pieces' (None: two processes hold
  different copies of a piece)."""
  crc = 0  # CRC-32C of no bytes.
  for j, (_, n, _, _) in enumerate(table):
    values = set(crcs[held[:, j] == 1, j].tolist())
    if len(values) != 1:
      return None
    crc = crc32c_combine(crc, values.pop(), n * itemsize)
  return crc


def integrity_summary(
  tree: Any, exchange: bool = True
) -> tuple[dict[str, str | None], list[str]]:
  """The CRC-32C of every array of `tree` and the arrays that are not finite.

  Each process reads its own shards on the host (one copy of each),
  computes the CRC-32C (Castagnoli et al., 1993: it detects every single
  flipped bit and every burst of up to 32 bits) of each contiguous piece
  and the processes exchange them (one all-gather of a few numbers per
  array), so every process gets the same result. Combining the pieces'
  CRCs gives the CRC of the whole array's row-major bytes: the same value
  for any sharding and any number of processes, and the value
  `google_crc32c.value(np.asarray(x).tobytes())` gives. Measured faster
  than a reduction on the devices (benchmarks/checkpoint_integrity.py).
  `exchange=False`: no exchange, for host arrays that each process holds
  whole and that only some processes read (e.g. params for initialization).

  Returns:
    ({name: 8 hex digits, or None if processes hold different copies},
    [names of floating arrays holding NaN or Inf]).
  """
  names = array_names(tree)
  leaves = [
    jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
    else x for x in jax.tree_util.tree_leaves(tree)
  ]  # fmt: skip
  tables = [_run_table(x) for x in leaves]
  local = _local_crcs(leaves, tables)
  crcs, held, finite = (_over_processes(*local) if exchange
                        else [v[None] for v in local])  # fmt: skip
  checksums, pos = {}, 0
  for name, x, table in zip(names, leaves, tables, strict=True):
    span = slice(pos, pos + len(table))
    crc = _whole_crc(table, crcs[:, span], held[:, span], x.dtype.itemsize)
    checksums[name] = None if crc is None else f'{crc:08x}'
    pos += len(table)
  bad = [n for n, ok in zip(names, finite.all(axis=0), strict=True) if not ok]
  return checksums, bad


def _key_name(key) -> str:
  for attr in ('key', 'name', 'idx'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def array_names(tree: Any) -> list[str]:
  """'/'-joined paths of the leaves of `tree`, in leaf order."""
  return [
    '/'.join(_key_name(k) for k in path)
    for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]
  ]


def integrity_record(checksums: Mapping[str, str]) -> dict[str, Any]:
  """What is saved with a checkpoint (JSON): the algorithm and the sums."""
  return {'algorithm': CHECKSUM_ALGORITHM, 'checksums': dict(checksums)}


def _first(names: list[str]) -> str:
  more = f' (and {len(names) - 1} more)' if len(names) > 1 else ''
  return names[0] + more


def integrity_problem(
  tree: Any, record: Mapping | None, exchange: bool = True
) -> str:
  """'' if `tree` matches `record` (None: no checksums were saved) and is
  finite; else one line naming the first bad array (and how many more).
  Every process gets the same answer (see integrity_summary); `exchange`
  as there. A tree of part of a saved state (its params only) is checked
  against the checksums of those arrays' names."""
  checksums, non_finite = integrity_summary(tree, exchange)
  if record is not None:
    if record.get('algorithm') != CHECKSUM_ALGORITHM:
      return f'unknown checksum algorithm {record.get("algorithm")!r}'
    saved = record.get('checksums', {})
    differ = [n for n, c in checksums.items() if c is None]
    if differ:
      return f'processes restored different copies of {_first(differ)}'
    missing = [n for n in checksums if n not in saved]
    if missing:
      return f'no checksum was saved for {_first(missing)}'
    wrong = [n for n, c in checksums.items() if saved[n] != c]
    if wrong:
      return (f'checksum mismatch in {_first(wrong)}: the data read differs '
              'from what was saved')  # fmt: skip
  if non_finite:
    return f'{_first(non_finite)} holds NaN or Inf'
  return ''


def read_integrity_record(step_folder) -> dict | None:
  """The checksums saved in a step folder (None: saved without them)."""
  folder = paths.resolve(str(step_folder)) / INTEGRITY_ITEM
  if not folder.exists():
    return None
  return ocp.JsonCheckpointHandler().restore(
    folder, args=ocp.args.JsonRestore()
  )


def _quiet_closed_event_loop() -> None:
  """Drops the copies of a failed read or write that orbax leaves behind.

  When one read or write of a checkpoint fails, orbax closes its asyncio
  loop while tensorstore still completes the other requests; each of their
  callbacks then raises RuntimeError('Event loop is closed') into
  sys.unraisablehook, and orbax's coroutines of the other reads that fail
  too end there unawaited ('Exception ignored in: <coroutine object
  _read_array_index_and_device_put>', with 60 lines of TensorStore spec
  each): hundreds of tracebacks around the one error that matters (which
  orbax raises, and the caller reports). Other unraisable errors go to the
  hook that was there before.
  """
  previous = sys.unraisablehook
  if getattr(previous, 'quiet_closed_event_loop', False):
    return

  def hook(unraisable):
    error = unraisable.exc_value
    if isinstance(error, RuntimeError) and str(error) == 'Event loop is closed':
      return
    code = getattr(getattr(unraisable, 'object', None), 'cr_code', None)
    if code is not None and f'{os.sep}orbax{os.sep}' in code.co_filename:
      return  # The other reads of a failed one, never awaited.
    previous(unraisable)

  hook.quiet_closed_event_loop = True
  sys.unraisablehook = hook

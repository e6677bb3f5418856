"""Image folders: `data_dir/<split>/<class>/<image>` (issue 7, item 6).

Classes are the union, over every split folder of `data_dir`, of the class
subfolders that hold at least one image, sorted by name (label = position
in that list). Labels therefore depend on the folder tree only, not on which
split is loaded (training, testing, `eval_main` reading the test split
alone): an empty class folder in one split, or a class missing from the
test split, shifts no label (issue 16). Images may be grey, RGB, RGBA or
palette PNG/JPEG/BMP/GIF/WebP files; each is converted to `channels` (1 or
3; alpha dropped).

An entry with an image extension that is not a readable regular file (a
directory named x.png, a dangling symlink, a symlink loop, a FIFO or socket,
a file without read permission) is left out of the split when it is listed,
counted, and the count logged once per split; it is never opened, so a FIFO
cannot block. A file that turns bad after the listing is opened with
O_NONBLOCK and checked with fstat, then skipped like an undecodable one: in
training its slot takes the next readable file in file order (so batches
stay deterministic), in evaluation it is masked out; each is counted in
`num_skipped` and named in the log once. Batches come from the index
pipeline of `indexed.py` (training: whole image on a canvas + original
size; evaluation: resize_small | central_crop).
"""

from __future__ import annotations

import errno
import logging
import os
import stat

from vmoe_jsd.data import indexed

IMAGE_EXTENSIONS = ('.bmp', '.gif', '.jpeg', '.jpg', '.png', '.webp')


def _is_image_name(name: str) -> bool:
  return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith('.')


def entry_problem(path: str) -> str | None:
  """Why `path` is not a readable regular file (None when it is one).

  Follows symlinks (a link to an image is an image) but never opens the
  file: `os.stat` reports dangling links and loops, S_ISREG rejects
  directories, FIFOs, sockets and devices, `os.access` unreadable files.
  """
  try:
    mode = os.stat(path).st_mode
  except FileNotFoundError:
    return 'dangling symlink' if os.path.islink(path) else 'vanished'
  except OSError as e:  # ELOOP, EACCES on a parent folder...
    if e.errno == errno.ELOOP:
      return 'symlink loop'
    return f'{type(e).__name__}: {e.strerror or e}'
  if stat.S_ISDIR(mode):
    return 'a directory'
  if not stat.S_ISREG(mode):
    return 'not a regular file (FIFO, socket or device)'
  if not os.access(path, os.R_OK):
    return 'not readable (permissions)'
  return None


def read_regular_file(path: str) -> bytes:
  """The bytes of `path`, refusing anything but a regular file.

  Opened with O_NONBLOCK, so an entry replaced by a FIFO after the listing
  cannot block the reader; fstat then checks that it is a regular file.

  Raises:
    indexed.UnreadableRecord: not a regular file, or any OS error.
  """
  flags = os.O_RDONLY | getattr(os, 'O_NONBLOCK', 0)
  try:
    fd = os.open(path, flags)
  except OSError as e:
    raise indexed.UnreadableRecord(f'{type(e).__name__}: {e}') from None
  try:
    if not stat.S_ISREG(os.fstat(fd).st_mode):
      raise indexed.UnreadableRecord('not a regular file')
    with os.fdopen(fd, 'rb', closefd=False) as f:
      return f.read()
  except OSError as e:
    raise indexed.UnreadableRecord(f'{type(e).__name__}: {e}') from None
  finally:
    os.close(fd)


def _subfolders(path: str) -> list[str]:
  return sorted(
    d
    for d in os.listdir(path)
    if not d.startswith('.') and os.path.isdir(os.path.join(path, d))
  )


def _is_readable_file(entry: os.DirEntry) -> bool:
  # DirEntry.is_file uses the directory's d_type (no system call) except for
  # symlinks, which it stats: False for a dangling link, OSError for a loop.
  try:
    return entry.is_file() and os.access(entry.path, os.R_OK)
  except OSError:
    return False


def _has_image(folder: str) -> bool:
  """Whether `folder` holds at least one readable image (stops at the first)."""
  with os.scandir(folder) as entries:
    return any(_is_image_name(e.name) and _is_readable_file(e) for e in entries)


def _check_data_dir(data_dir: str) -> None:
  if not data_dir or not os.path.isdir(data_dir):
    raise FileNotFoundError(
      f'folder dataset: data_dir={data_dir!r} is not a directory; set '
      'config.dataset.<split>.data_dir to a root with one subfolder per '
      'split (train/, test/...), each with one subfolder per class'
    )


def list_classes(data_dir: str) -> list[str]:
  """The class names of an image folder: the sorted union, over every split
  folder of `data_dir`, of the class folders holding at least one image.

  Raises:
    FileNotFoundError: data_dir is not a directory.
  """
  _check_data_dir(data_dir)
  classes = set()
  for split in _subfolders(data_dir):
    root = os.path.join(data_dir, split)
    classes.update(
      c for c in _subfolders(root) if _has_image(os.path.join(root, c))
    )
  return sorted(classes)


def list_split(data_dir: str, split: str):
  """Files, labels and class names of one split of an image folder.

  Args:
    data_dir: the root holding one subfolder per split.
    split: the split's subfolder, e.g. 'train'.

  Returns:
    (files, labels, classes, rejected): sorted paths of the readable regular
    image files, their int labels (positions in `list_classes(data_dir)`),
    the class names, and {path: reason} of the image-named entries left out
    (not readable regular files; see `entry_problem`).

  Raises:
    FileNotFoundError: data_dir or the split folder does not exist.
    ValueError: the split has no class folder or no image.
  """
  _check_data_dir(data_dir)
  root = os.path.join(data_dir, split)
  if not os.path.isdir(root):
    raise FileNotFoundError(
      f'folder dataset: split={split!r} has no folder {root!r}; the splits '
      f'in {data_dir!r} are {_subfolders(data_dir)}'
    )
  classes = list_classes(data_dir)
  label_of = {name: i for i, name in enumerate(classes)}
  files, labels, rejected = [], [], {}
  for name in _subfolders(root):
    with os.scandir(os.path.join(root, name)) as entries:
      images = sorted(
        (e for e in entries if _is_image_name(e.name)), key=lambda e: e.name
      )
    for entry in images:
      if not _is_readable_file(entry):
        rejected[entry.path] = entry_problem(entry.path) or 'unreadable'
      elif name in label_of:  # a folder with a readable image is a class
        files.append(entry.path)
        labels.append(label_of[name])
  if not files:
    raise ValueError(
      f'folder dataset: split {root!r} is empty: it needs class subfolders '
      f'holding images ({", ".join(IMAGE_EXTENSIONS)}); found classes '
      f'{_subfolders(root)}'
    )
  return files, labels, classes, rejected


def check(cfg, global_batch: int) -> None:
  """Start-up checks of a config.dataset.<split> block named 'folder'.

  Raises:
    ValueError: bad channels, empty split or fewer images than a batch.
    FileNotFoundError: missing data_dir or split folder.
  """
  if cfg.get('channels', 3) not in indexed.CHANNEL_MODES:
    raise ValueError(
      f'config.dataset.*.channels={cfg.get("channels")!r} is invalid: 1 '
      '(grey) or 3 (RGB)'
    )
  files = list_split(cfg.get('data_dir'), cfg['split'])[0]
  if len(files) < global_batch:
    raise ValueError(
      f'folder dataset {os.path.join(cfg["data_dir"], cfg["split"])!r} has '
      f'{len(files)} images, fewer than a global batch of {global_batch}; '
      'lower batch_size or add images'
    )


def log_rejected(name: str, rejected: dict[str, str]) -> None:
  """One warning for the entries a split's listing left out."""
  if not rejected:
    return
  examples = '; '.join(f'{p}: {why}' for p, why in list(rejected.items())[:3])
  more = f' (and {len(rejected) - 3} more)' if len(rejected) > 3 else ''
  logging.warning(
    '%s: skipped %d entries that are not readable regular image files: %s%s',
    name,
    len(rejected),
    examples,
    more,
  )


class FolderDataset(indexed.IndexedDataset):
  """One split of an image folder, read by index.

  Attributes:
    classes: class names, sorted (label i = classes[i]), shared by every
      split of data_dir.
    files: image paths, sorted by class then name.
    rejected: {path: reason} of the entries left out when listing.
    num_skipped: entries left out when listing plus unreadable files met
      so far.
  """

  def __init__(
    self,
    data_dir: str,
    split: str,
    image_size: int,
    channels: int = 3,
    resize_size: int | None = None,
    num_workers: int | None = None,
  ):
    if channels not in indexed.CHANNEL_MODES:
      raise ValueError(f'channels={channels!r} must be 1 or 3')
    listing = list_split(data_dir, split)
    self.files, self.labels, self.classes, self.rejected = listing
    self.name = f'folder:{os.path.join(data_dir, split)}'
    self.num_classes = len(self.classes)
    self.channels = channels
    self.image_size = image_size
    self.resize_size = resize_size
    self.num_workers = num_workers
    self._num_records = len(self.files)
    self._init_reader()
    log_rejected(self.name, self.rejected)

  @property
  def num_skipped(self) -> int:
    return len(self.rejected) + super().num_skipped

  def _load(self, index: int):
    return read_regular_file(self.files[index]), self.labels[index]

  def describe(self, index: int) -> str:
    return self.files[index]

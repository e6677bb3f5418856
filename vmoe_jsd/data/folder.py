"""Image folders: `data_dir/<split>/<class>/<image>` (issue 7, item 6).

Classes are the subfolders of the split, sorted by name (label = position).
Images may be grey, RGB, RGBA or palette PNG/JPEG/BMP/GIF/WebP files; each is
converted to `channels` (1 or 3; alpha dropped). An unreadable file is
skipped (in training its slot takes the next readable file in file order,
so batches stay deterministic; in evaluation it is masked out), counted in
`num_skipped` and named in the log once. Batches come from the index
pipeline of `indexed.py` (training: whole image on a canvas + original
size; evaluation: resize_small | central_crop).
"""

from __future__ import annotations

import os

from vmoe_jsd.data import indexed

IMAGE_EXTENSIONS = ('.bmp', '.gif', '.jpeg', '.jpg', '.png', '.webp')


def list_split(data_dir: str, split: str):
  """Files, labels and class names of one split of an image folder.

  Args:
    data_dir: the root holding one subfolder per split.
    split: the split's subfolder, e.g. 'train'.

  Returns:
    (files, labels, classes): sorted paths, their int labels, class names.

  Raises:
    FileNotFoundError: data_dir or the split folder does not exist.
    ValueError: the split has no class folder or no image.
  """
  if not data_dir or not os.path.isdir(data_dir):
    raise FileNotFoundError(
      f'folder dataset: data_dir={data_dir!r} is not a directory; set '
      'config.dataset.<split>.data_dir to a root with one subfolder per '
      'split (train/, test/...), each with one subfolder per class'
    )
  root = os.path.join(data_dir, split)
  if not os.path.isdir(root):
    found = sorted(
      d for d in os.listdir(data_dir)
      if os.path.isdir(os.path.join(data_dir, d))
    )  # fmt: skip
    raise FileNotFoundError(
      f'folder dataset: split={split!r} has no folder {root!r}; the splits '
      f'in {data_dir!r} are {found}'
    )
  classes = sorted(
    d for d in os.listdir(root)
    if os.path.isdir(os.path.join(root, d)) and not d.startswith('.')
  )  # fmt: skip
  files, labels = [], []
  for label, name in enumerate(classes):
    folder = os.path.join(root, name)
    for file in sorted(os.listdir(folder)):
      if file.lower().endswith(IMAGE_EXTENSIONS) and not file.startswith('.'):
        files.append(os.path.join(folder, file))
        labels.append(label)
  if not files:
    raise ValueError(
      f'folder dataset: split {root!r} is empty: it needs class subfolders '
      f'holding images ({", ".join(IMAGE_EXTENSIONS)}); found classes '
      f'{classes}'
    )
  return files, labels, classes


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
  files, _, _ = list_split(cfg.get('data_dir'), cfg['split'])
  if len(files) < global_batch:
    raise ValueError(
      f'folder dataset {os.path.join(cfg["data_dir"], cfg["split"])!r} has '
      f'{len(files)} images, fewer than a global batch of {global_batch}; '
      'lower batch_size or add images'
    )


class FolderDataset(indexed.IndexedDataset):
  """One split of an image folder, read by index.

  Attributes:
    classes: class names, sorted (label i = classes[i]).
    files: image paths, sorted by class then name.
    num_skipped: unreadable files met so far.
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
    self.files, self.labels, self.classes = list_split(data_dir, split)
    self.name = f'folder:{os.path.join(data_dir, split)}'
    self.num_classes = len(self.classes)
    self.channels = channels
    self.image_size = image_size
    self.resize_size = resize_size
    self.num_workers = num_workers
    self._num_records = len(self.files)
    self._init_reader()

  def _load(self, index: int):
    with open(self.files[index], 'rb') as f:
      return f.read(), self.labels[index]

  def describe(self, index: int) -> str:
    return self.files[index]

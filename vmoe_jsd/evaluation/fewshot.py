"""Few-shot linear evaluation of frozen features (V-MoE paper, Sec. 3).

Riquelme et al. (NeurIPS 2021) report "few-shot linear transfer" as in
Kolesnikov et al. (BiT) and Dosovitskiy et al. (ViT): the pre-logits of the
frozen model (the token or pooled representation before the head; after the
tanh layer when `representation_size` is set) for `shot` training images per
class, and a closed-form L2-regularised least-squares classifier on them:

  x <- (x - mean) / (std + 1e-5)      (statistics of the shots)
  x <- [x, 100]                        (a nearly unregularised bias column)
  Y  = 2 * onehot(y) - 1               (targets in {-1, +1})
  W  = argmin ||X W - Y||^2 + l2_reg ||W||^2
     = (X^T X + l2_reg I)^-1 X^T Y     (or X^T (X X^T + l2_reg I)^-1 Y)
  prediction: argmax over classes of x_test W

Shots are drawn per class with `np.random.default_rng(seed)` (a permutation
of each class's indices, its first `shot` entries), and the test accuracy is
averaged over seeds. The solve runs in float64 on the host.

config.fewshot:
  every_steps: evaluate every N training steps (0: only at the end).
  datasets: {name: {'train': <dataset block>, 'test': <dataset block>}}, the
    blocks as config.dataset.<split> (any registered dataset: tfds, folder,
    fashion_mnist, synthetic). Empty: few-shot evaluation is off.
  shots: shots per class, e.g. (1, 5, 10, 25).
  seeds: seeds of the shot selection, e.g. (0, 1, 2).
  l2_reg: the fixed regulariser (2**10, as big_vision's few-shot evaluator).
  limit: at most this many test images per dataset (None: all).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from vmoe_jsd import augment, data
from vmoe_jsd.config_errors import check_range, reject, to_dict
from vmoe_jsd.evaluation import core
from vmoe_jsd.models.spec import ModelSpec

BIAS_FEATURE = 100.0
DEFAULT_SHOTS = (1, 5, 10, 25)


def ridge_weights(
  x: np.ndarray, y: np.ndarray, num_classes: int, l2_reg: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Closed-form ridge regression on whitened features and +-1 targets.

  Args:
    x: (N, D) training features.
    y: (N,) integer labels in [0, num_classes).
    num_classes: C.
    l2_reg: the L2 regulariser (> 0).

  Returns:
    (W of shape (D + 1, C), mean (D,), std (D,)): the weights over the
    whitened features plus the bias column, and the whitening statistics.
  """
  x = np.asarray(x, np.float64)
  mean = x.mean(axis=0)
  std = x.std(axis=0) + 1e-5
  xw = _augment((x - mean) / std)
  targets = 2.0 * np.eye(num_classes)[np.asarray(y)] - 1.0
  n, d = xw.shape
  if n >= d:
    w = np.linalg.solve(xw.T @ xw + l2_reg * np.eye(d), xw.T @ targets)
  else:
    w = xw.T @ np.linalg.solve(xw @ xw.T + l2_reg * np.eye(n), targets)
  return w, mean, std


def _augment(x: np.ndarray) -> np.ndarray:
  return np.concatenate([x, np.full((x.shape[0], 1), BIAS_FEATURE)], axis=1)


def ridge_predict(
  x: np.ndarray, w: np.ndarray, mean: np.ndarray, std: np.ndarray
) -> np.ndarray:
  """Class predictions of `ridge_weights`' classifier for (M, D) features."""
  xw = _augment((np.asarray(x, np.float64) - mean) / std)
  return np.argmax(xw @ w, axis=1)


def select_shots(
  labels: np.ndarray, shot: int, seed: int, num_classes: int
) -> np.ndarray:
  """Indices of `shot` examples per class (fewer if a class has fewer)."""
  rng = np.random.default_rng(seed)
  picked = [
    rng.permutation(np.flatnonzero(labels == c))[:shot]
    for c in range(num_classes)
  ]
  return np.concatenate(picked).astype(np.int64)


def fewshot_accuracies(
  train_features: np.ndarray,
  train_labels: np.ndarray,
  test_features: np.ndarray,
  test_labels: np.ndarray,
  *,
  shots: Sequence[int] = DEFAULT_SHOTS,
  seeds: Sequence[int] = (0,),
  l2_reg: float = 2.0**10,
  num_classes: int | None = None,
) -> dict[int, list[float]]:
  """{shot: [test accuracy for each seed]} of the ridge classifier."""
  train_labels = np.asarray(train_labels)
  test_labels = np.asarray(test_labels)
  if num_classes is None:
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
  out: dict[int, list[float]] = {}
  for shot in shots:
    accs = []
    for seed in seeds:
      idx = select_shots(train_labels, shot, seed, num_classes)
      w, mean, std = ridge_weights(
        train_features[idx], train_labels[idx], num_classes, l2_reg
      )
      pred = ridge_predict(test_features, w, mean, std)
      accs.append(float(np.mean(pred == test_labels)))
    out[int(shot)] = accs
  return out


# ----------------------------------------------------------------------------
# Config and model plumbing.
# ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class FewshotDataset:
  """One few-shot dataset: its shots come from `train`, its test images
  from `test`; num_classes None: from the labels."""

  name: str
  train: data.SplitSpec
  test: data.SplitSpec
  num_classes: int | None = None


@dataclasses.dataclass(frozen=True)
class FewshotSpec:
  """config.fewshot (see the module docstring); no datasets: off."""

  every_steps: int = 0
  datasets: tuple[FewshotDataset, ...] = ()
  shots: tuple[int, ...] = DEFAULT_SHOTS
  seeds: tuple[int, ...] = (0,)
  l2_reg: float = 2.0**10
  limit: int | None = None

  @property
  def enabled(self) -> bool:
    return bool(self.datasets)

  @classmethod
  def from_config(
    cls, cfg, datasets_registry: Sequence[str], image_size: int
  ) -> FewshotSpec:
    """Raises ConfigError (key, value, what is valid) for a bad block."""
    fs = to_dict(cfg)
    every = fs.get('every_steps') or 0
    check_range('fewshot.every_steps', every, 0, integer=True)
    if not fs.get('datasets'):
      return cls(every_steps=every)
    shots = tuple(fs.get('shots') or ())
    if not shots or any(not isinstance(s, int) or s < 1 for s in shots):
      reject(
        'fewshot.shots',
        shots,
        'a non-empty tuple of integers >= 1, e.g. (1, 5)',
      )
    seeds = tuple(fs.get('seeds') or ())
    if not seeds or any(not isinstance(s, int) for s in seeds):
      reject(
        'fewshot.seeds', seeds, 'a non-empty tuple of integers, e.g. (0, 1, 2)'
      )
    l2 = fs.get('l2_reg')
    check_range('fewshot.l2_reg', l2, 0, low_open=True)
    limit = fs.get('limit')
    check_range('fewshot.limit', limit, 1, integer=True, optional=True)
    sets = []
    for name, spec in fs['datasets'].items():
      for split in ('train', 'test'):
        block = spec.get(split) if hasattr(spec, 'get') else None
        if not block or block.get('name') not in datasets_registry:
          reject(
            f'fewshot.datasets.{name}.{split}',
            block and block.get('name'),
            f'a dataset block whose name is one of {sorted(datasets_registry)}',
          )
        batch = block.get('batch_size')
        if not isinstance(batch, int) or batch < 1:
          reject(
            f'fewshot.datasets.{name}.{split}.batch_size',
            batch,
            'an integer >= 1',
          )
      sets.append(
        FewshotDataset(
          name,
          data.SplitSpec(spec['train'], image_size),
          data.SplitSpec(spec['test'], image_size),
          spec.get('num_classes'),
        )
      )
    return cls(every, tuple(sets), shots, seeds, float(l2), limit)


def make_feature_fn(model, settings) -> Callable:
  """(params, images) -> pre-logits of the deterministic centre view.

  Args:
    model: a model built with num_classes=0 (it returns its pre-logits).
    settings: augmentation settings (the view size).

  Returns:
    A function to jit.
  """

  def features(params, images):
    center = jax.vmap(lambda im: augment.center_view(im, settings))(images)
    out, _ = model.apply({'params': params}, augment.to_model_range(center))
    return out

  return features


def extract(feature_fn, params, dataset, batch_size, put_batch, limit=None):
  """(features (N, D), labels (N,)) over a dataset, padding dropped."""
  feats, labels = [], []
  for batch in core.eval_batches(dataset, batch_size, limit):
    images, mask = put_batch(batch['image'], batch['mask'])
    out = feature_fn(params, images)
    if jax.process_count() > 1:
      out = multihost_utils.process_allgather(out, tiled=True)
      mask = multihost_utils.process_allgather(mask, tiled=True)
      label = multihost_utils.process_allgather(
        put_batch(batch['label'])[0], tiled=True
      )
    else:
      label = batch['label']
    mask = np.asarray(jax.device_get(mask)).astype(bool)
    feats.append(np.asarray(jax.device_get(out), np.float64)[mask])
    labels.append(np.asarray(jax.device_get(label))[mask])
  return np.concatenate(feats), np.concatenate(labels)


def make_evaluator(spec: FewshotSpec, model: ModelSpec, settings, put_batch):
  """A function params -> few-shot results, or None when few-shot is off.
  Datasets are loaded once here.

  Args:
    spec: the few-shot datasets and settings.
    model: the model spec (its evaluation model, head dropped, gives the
      features).
    settings: augmentation settings (view size).
    put_batch: sharding.make_put_batch(mesh).

  Returns:
    None, or evaluate(params, should_stop=None) -> {dataset: {'<k>shot':
    mean accuracy, '<k>shot_std': std over seeds, '<k>shot_seeds': [...]}};
    should_stop is asked between batches, and a True raises
    core.EvaluationStopped.
  """
  if not spec.enabled:
    return None
  feature_fn = jax.jit(make_feature_fn(model.build_eval(0), settings))
  sets = [(d, d.train.load(), d.test.load()) for d in spec.datasets]

  def evaluate_fn(params, should_stop=None) -> dict[str, dict[str, Any]]:
    results = {}
    for d, train, test in sets:
      if should_stop is not None:  # core.EvaluationStopped on a stop.
        train = core.RaisingSplit(train, should_stop)
        test = core.RaisingSplit(test, should_stop)
      xtr, ytr = extract(
        feature_fn, params, train, d.train.batch_size, put_batch
      )
      xte, yte = extract(
        feature_fn, params, test, d.test.batch_size, put_batch, spec.limit
      )
      accs = fewshot_accuracies(
        xtr,
        ytr,
        xte,
        yte,
        shots=spec.shots,
        seeds=spec.seeds,
        l2_reg=spec.l2_reg,
        num_classes=d.num_classes,
      )
      results[d.name] = _summary(accs, len(ytr), len(yte))
    return results

  return evaluate_fn


def _summary(accs: Mapping[int, list[float]], num_train, num_test) -> dict:
  out: dict[str, Any] = {}
  for shot, values in accs.items():
    out[f'{shot}shot'] = float(np.mean(values))
    out[f'{shot}shot_std'] = (
      float(np.std(values, ddof=1)) if len(values) > 1 else None
    )
    out[f'{shot}shot_seeds'] = values
  out['num_train_images'] = int(num_train)
  out['num_test_images'] = int(num_test)
  return out


def format_results(results: Mapping[str, Mapping[str, Any]], step=None) -> str:
  """One line per dataset: `[fewshot step N] name: 1-shot 0.312+-0.020 ...`."""
  lines = []
  head = '[fewshot' + (f' step {step}]' if step is not None else ']')
  for name, out in results.items():
    parts = []
    for key, value in out.items():
      if key.endswith('shot'):
        std = out.get(f'{key}_std')
        pm = f'+-{std:.3f}' if std is not None else ''
        parts.append(f'{key[:-4]}-shot {value:.3f}{pm}')
    lines.append(f'{head} {name}: ' + '  '.join(parts))
  return '\n'.join(lines)


def scalars(results: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
  """{'fewshot/<dataset>/<k>shot': mean accuracy} for the metric writer."""
  return {
    f'fewshot/{name}/{key}': float(value)
    for name, out in results.items()
    for key, value in out.items()
    if key.endswith('shot')
  }


def build(ctx):
  """The registry's run: few-shot accuracies of config.fewshot's datasets
  (it reads them, not the test split)."""
  spec = ctx.spec
  evaluate_fn = make_evaluator(
    spec.fewshot, spec.model, spec.views, ctx.put_batch
  )

  def run(params, split, should_stop):
    del split
    return evaluate_fn(params, should_stop)

  return run

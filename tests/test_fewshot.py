"""Few-shot ridge regression against a float64 closed form, and its plumbing."""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vmoe_jsd import augment, config_lib, sharding, train
from vmoe_jsd.data import synthetic
from vmoe_jsd.evaluation import fewshot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'tests'))
import smoke_config  # noqa: E402


def reference_weights(x, y, num_classes, l2_reg):
  """Ridge regression as an augmented least-squares problem (float64):
  min ||[X; sqrt(l2) I] W - [Y; 0]||^2, solved by np.linalg.lstsq."""
  x = np.asarray(x, np.float64)
  mean, std = x.mean(0), x.std(0) + 1e-5
  xw = np.hstack([(x - mean) / std, np.full((len(x), 1), 100.0)])
  targets = np.where(np.arange(num_classes)[None] == y[:, None], 1.0, -1.0)
  d = xw.shape[1]
  a = np.vstack([xw, np.sqrt(l2_reg) * np.eye(d)])
  b = np.vstack([targets, np.zeros((d, num_classes))])
  w = np.linalg.lstsq(a, b, rcond=None)[0]
  return w, mean, std


@pytest.mark.parametrize('n,d', [(40, 6), (12, 30)])  # N >= D and D > N
def test_ridge_matches_float64_least_squares(n, d):
  rng = np.random.default_rng(n)
  x = rng.normal(size=(n, d)).astype(np.float32) * rng.uniform(0.1, 5, d)
  y = rng.integers(0, 3, n)
  w, mean, std = fewshot.ridge_weights(x, y, 3, l2_reg=2.5)
  w_ref, mean_ref, std_ref = reference_weights(x, y, 3, 2.5)
  np.testing.assert_allclose(w, w_ref, rtol=1e-8, atol=1e-10)
  x_test = rng.normal(size=(50, d))
  xt = np.hstack([(x_test - mean_ref) / std_ref, np.full((50, 1), 100.0)])
  np.testing.assert_array_equal(
    fewshot.ridge_predict(x_test, w, mean, std), np.argmax(xt @ w_ref, 1)
  )


def test_shots_are_per_class_and_depend_on_the_seed():
  labels = np.repeat(np.arange(4), 10)
  idx = fewshot.select_shots(labels, 3, seed=0, num_classes=4)
  assert np.bincount(labels[idx], minlength=4).tolist() == [3, 3, 3, 3]
  assert len(set(idx.tolist())) == 12
  same = fewshot.select_shots(labels, 3, seed=0, num_classes=4)
  other = fewshot.select_shots(labels, 3, seed=1, num_classes=4)
  np.testing.assert_array_equal(idx, same)
  assert not np.array_equal(idx, other)
  # A class with fewer examples than shots gives all it has.
  few = fewshot.select_shots(np.array([0, 0, 1]), 5, seed=0, num_classes=2)
  assert sorted(few.tolist()) == [0, 1, 2]


def test_accuracies_equal_the_reference_classifier():
  rng = np.random.default_rng(3)
  centers = rng.normal(size=(5, 8)) * 2
  ytr = rng.integers(0, 5, 200)
  yte = rng.integers(0, 5, 100)
  xtr = centers[ytr] + rng.normal(size=(200, 8))
  xte = centers[yte] + rng.normal(size=(100, 8))
  got = fewshot.fewshot_accuracies(
    xtr, ytr, xte, yte, shots=(1, 5), seeds=(0, 1), l2_reg=4.0
  )
  for shot in (1, 5):
    for i, seed in enumerate((0, 1)):
      idx = fewshot.select_shots(ytr, shot, seed, 5)
      w, mean, std = reference_weights(xtr[idx], ytr[idx], 5, 4.0)
      xt = np.hstack([(xte - mean) / std, np.full((100, 1), 100.0)])
      want = np.mean(np.argmax(xt @ w, 1) == yte)
      assert got[shot][i] == pytest.approx(want, abs=1e-12)
  assert np.mean(got[5]) > 0.5  # separable clusters: well above 1/5


def _fewshot_config():
  config = smoke_config.get_config()
  block = dict(name='synthetic', batch_size=16, image_size=16, num_classes=4)
  with config.unlocked():
    config.fewshot.datasets = {
      'syn': {
        'train': dict(block, split='train', num_examples=48),
        'test': dict(block, split='test', num_examples=32),
      }
    }
    config.fewshot.shots = (1, 5)
    config.fewshot.seeds = (0, 1)
    config.fewshot.l2_reg = 8.0
  return config


@pytest.mark.slow
def test_evaluator_uses_pre_logits_and_the_closed_form():
  """The features are what the head sees (logits = f @ kernel + bias); the
  accuracies equal the float64 reference on those features."""
  config = _fewshot_config()
  spec = config_lib.validate(config, num_devices=8)
  settings = spec.views
  mesh = sharding.make_mesh(1)
  put_batch = sharding.make_put_batch(mesh)
  evaluate = fewshot.make_evaluator(
    spec.fewshot, spec.model, settings, put_batch
  )
  model = spec.model.build_eval()
  params = model.init(jax.random.key(0), jnp.zeros((2, 16, 16, 1)))['params']
  # A non-zero head, so that logits test the features.
  params['head']['kernel'] = jax.random.normal(
    jax.random.key(1), params['head']['kernel'].shape
  )
  with jax.set_mesh(mesh):
    got = evaluate(params)['syn']

  feature_fn = jax.jit(
    fewshot.make_feature_fn(spec.model.build_eval(num_classes=0), settings)
  )

  def features_and_logits(split, n):
    images = synthetic.load(split, num_examples=n, image_size=16).images
    labels = synthetic.load(split, num_examples=n, image_size=16).labels
    feats = np.asarray(feature_fn(params, images), np.float64)
    center = jax.vmap(lambda im: augment.center_view(im, settings))(images)
    logits, _ = model.apply({'params': params}, augment.to_model_range(center))
    return feats, np.asarray(labels), np.asarray(logits)

  ftr, ytr, logits = features_and_logits('train', 48)
  head = params['head']
  np.testing.assert_allclose(
    ftr @ np.asarray(head['kernel']) + np.asarray(head['bias']), logits,
    rtol=1e-4, atol=1e-4,
  )  # fmt: skip
  fte, yte, _ = features_and_logits('test', 32)
  for shot in (1, 5):
    want = []
    for seed in (0, 1):
      idx = fewshot.select_shots(ytr, shot, seed, 4)
      w, mean, std = reference_weights(ftr[idx], ytr[idx], 4, 8.0)
      xt = np.hstack([(fte - mean) / std, np.full((len(fte), 1), 100.0)])
      want.append(np.mean(np.argmax(xt @ w, 1) == yte))
    assert got[f'{shot}shot_seeds'] == pytest.approx(want, abs=1e-6)
    assert got[f'{shot}shot'] == pytest.approx(np.mean(want), abs=1e-6)
  assert got['num_train_images'] == 48 and got['num_test_images'] == 32
  line = fewshot.format_results({'syn': got}, step=3)
  assert line.startswith('[fewshot step 3] syn: 1-shot ')


@pytest.mark.parametrize(
  'key,value,message',
  [
    ('shots', (0, 5), 'config.fewshot.shots=(0, 5) is invalid'),
    ('l2_reg', -1.0, 'config.fewshot.l2_reg=-1.0 is invalid'),
    ('seeds', (), 'config.fewshot.seeds=() is invalid'),
    ('every_steps', -5, 'config.fewshot.every_steps=-5 is invalid'),
  ],
)
def test_bad_fewshot_config_is_rejected(key, value, message):
  config = _fewshot_config()
  with config.unlocked():
    config.fewshot[key] = value
  with pytest.raises(ValueError, match=message.replace('(', r'\(')
                     .replace(')', r'\)').replace('.', r'\.')):  # fmt: skip
    config_lib.validate(config, num_devices=8)


@pytest.mark.slow
def test_training_runs_fewshot_periodically_and_at_the_end(tmp_path, capsys):
  config = _fewshot_config()
  with config.unlocked():
    config.num_train_steps = 2
    config.fewshot.every_steps = 1
    config.fewshot.shots = (2,)
  result = train.train_and_evaluate(config, str(tmp_path))
  out = capsys.readouterr().out
  assert '[fewshot step 1] syn: 2-shot ' in out
  assert '[fewshot step 2] syn: 2-shot ' in out
  syn = result['fewshot']['syn']
  assert 0.0 <= syn['2shot'] <= 1.0 and len(syn['2shot_seeds']) == 2
  with open(tmp_path / 'results.json') as f:
    assert json.load(f)['fewshot']['syn']['2shot'] == syn['2shot']

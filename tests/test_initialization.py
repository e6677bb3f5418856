"""Tests for initialization: ViT upcycling, vmoe/orbax sources, posemb resize.

Fake ViT checkpoints are a tiny dense model's parameters renamed by the
hand-written tables below (from the names in vision_transformer's
models_vit.py / checkpoint files and big_vision's models/vit.py), not by the
code under test.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vmoe_jsd import checkpoints, initialization
from vmoe_jsd.models import build_model

NUM_EXPERTS = 4
MOE_LAYERS = (0, 2)  # Block 1 stays dense.
IMAGE = 16  # 4x4 patches of 4x4 pixels, plus the class token: 17 tokens.
BATCH = 2
POSEMB = 'Encoder/posembed_input/pos_embedding'


def _model_config(*, moe=True, num_classes=5, group_size=17, **kwargs):
  encoder = dict(num_layers=3, mlp_dim=24, num_heads=2)
  if moe:
    # K = E and capacity = group size: every token reaches every expert and
    # its combine weights (the softmax gates) sum to 1.
    encoder['moe'] = dict(
      layers=MOE_LAYERS,
      num_experts=NUM_EXPERTS,
      group_size=group_size,
      router=dict(
        num_selected_experts=NUM_EXPERTS,
        dispatcher=dict(name='indices', capacity=group_size),
      ),
    )
  config = dict(
    num_classes=num_classes,
    patch_size=(4, 4),
    hidden_size=16,
    classifier='token',
    head_kernel_zero_init=False,
    encoder=encoder,
  )
  config.update(kwargs)
  return config


@functools.cache
def _model(moe: bool):
  return build_model(_model_config(moe=moe), deterministic=True)


@functools.cache
def _param_shapes(moe=True, num_classes=5, group_size=17, image=IMAGE):
  """Shapes of the model's params (traced once, not compiled)."""
  model = build_model(
    _model_config(moe=moe, num_classes=num_classes, group_size=group_size),
    deterministic=True,
  )
  return jax.eval_shape(
    lambda: model.init(
      {'params': jax.random.key(0), 'gating': jax.random.key(0)},
      jnp.zeros((BATCH, image, image, 3)),
    )['params']
  )


def _random_params(seed, **kwargs):
  """Params of the tiny model, every leaf drawn at random."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
    lambda s: (0.5 * rng.standard_normal(s.shape)).astype(s.dtype),
    _param_shapes(**kwargs),
  )


def _dense_params(seed=0):
  return checkpoints.flatten_tree(_random_params(seed, moe=False))


def _target_params(seed=1, **kwargs):
  return _random_params(seed, **kwargs)


def _vit_checkpoint(dense: dict, naming: str) -> dict:
  """Renames our dense params as a ViT checkpoint of `naming` would."""
  attention, norm_1, mlp = {
    'vision_transformer': (
      'MultiHeadDotProductAttention_1',
      'LayerNorm_2',
      'MlpBlock_3',
    ),
    'big_vision': (
      'MultiHeadDotProductAttention_0',
      'LayerNorm_1',
      'MlpBlock_0',
    ),
  }[naming]
  table = {
    'embedding/kernel': 'embedding/kernel',
    'embedding/bias': 'embedding/bias',
    'Encoder/encoder_norm/scale': 'Transformer/encoder_norm/scale',
    'Encoder/encoder_norm/bias': 'Transformer/encoder_norm/bias',
    'head/kernel': 'head/kernel',
    'head/bias': 'head/bias',
  }
  for block in range(3):
    ours = f'Encoder/encoderblock_{block}'
    theirs = f'Transformer/encoderblock_{block}'
    for leaf in ('scale', 'bias'):
      table[f'{ours}/LayerNorm_0/{leaf}'] = f'{theirs}/LayerNorm_0/{leaf}'
      table[f'{ours}/LayerNorm_1/{leaf}'] = f'{theirs}/{norm_1}/{leaf}'
    for proj in ('query', 'key', 'value', 'out'):
      for leaf in ('kernel', 'bias'):
        table[f'{ours}/SelfAttention/{proj}/{leaf}'] = (
          f'{theirs}/{attention}/{proj}/{leaf}'
        )
    for dense_layer in ('Dense_0', 'Dense_1'):
      for leaf in ('kernel', 'bias'):
        table[f'{ours}/Mlp/{dense_layer}/{leaf}'] = (
          f'{theirs}/{mlp}/{dense_layer}/{leaf}'
        )
  assert sorted(table) == sorted(set(dense) - {'cls', POSEMB})
  ckpt = {theirs: dense[ours] for ours, theirs in table.items()}
  if naming == 'vision_transformer':
    ckpt['cls'] = dense['cls']
    ckpt['Transformer/posembed_input/pos_embedding'] = dense[POSEMB]
  else:
    # big_vision adds the position embedding before prepending the class
    # token: our class-token position folds into its class token.
    ckpt['cls'] = dense['cls'] + dense[POSEMB][:, :1]
    ckpt['pos_embedding'] = dense[POSEMB][:, 1:]
  return ckpt


def _write_npz(path, flat: dict) -> str:
  np.savez(path, **flat)
  return str(path)


def _assert_bitwise(a, b, name=''):
  a, b = np.asarray(a), np.asarray(b)
  assert (a.dtype, a.shape) == (b.dtype, b.shape), name
  assert a.tobytes() == b.tobytes(), name


# ---------------------------------------------------------------------------
# Upcycling from ViT checkpoints.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize('naming', ['vision_transformer', 'big_vision'])
def test_upcycling_copies_dense_mlp_into_every_expert(tmp_path, naming):
  dense = _dense_params()
  target = _target_params()
  path = _write_npz(tmp_path / 'vit.npz', _vit_checkpoint(dense, naming))
  params, report = initialization.load_initial_params(
    {'source': 'vit_npz', 'path': path}, target
  )
  flat = checkpoints.flatten_tree(params)
  flat_target = checkpoints.flatten_tree(target)
  assert list(flat) == list(flat_target)
  experts, routers, others = [], [], []
  for name, value in flat.items():
    assert value.dtype == np.float32 and value.shape == flat_target[name].shape
    if '/Moe/Mlp/' in name:
      experts.append(name)
      dense_value = dense[name.replace('/Moe/Mlp/', '/Mlp/')]
      for expert in range(NUM_EXPERTS):
        _assert_bitwise(value[expert], dense_value, f'{name}[{expert}]')
    elif '/Moe/Router/' in name:
      routers.append(name)
      _assert_bitwise(value, flat_target[name], name)
    elif name.startswith('head/'):
      _assert_bitwise(value, flat_target[name], name)
    elif naming == 'big_vision' and name in ('cls', POSEMB):
      continue
    else:
      others.append(name)
      _assert_bitwise(value, dense[name], name)
  assert len(experts) == 4 * len(MOE_LAYERS)
  assert routers == [
    f'Encoder/encoderblock_{i}/Moe/Router/dense/kernel' for i in MOE_LAYERS
  ]
  assert 'Encoder/encoderblock_1/Mlp/Dense_0/kernel' in others
  assert 'Encoder/encoderblock_2/SelfAttention/out/kernel' in others

  heads = ['head/bias', 'head/kernel']
  assert report['upcycled'] == experts
  assert sorted(report['fresh']) == sorted(routers + heads)
  assert report['unused'] == heads
  if naming == 'vision_transformer':
    assert report['resized'] == []
    assert report['loaded'] == others
  else:
    # Class token carries the folded position; its own position is zero.
    _assert_bitwise(flat['cls'], dense['cls'] + dense[POSEMB][:, :1])
    _assert_bitwise(flat[POSEMB][:, 1:], dense[POSEMB][:, 1:])
    assert not flat[POSEMB][:, 0].any()
    assert report['resized'] == [POSEMB]
    assert sorted(report['loaded']) == sorted(others + ['cls'])
  assert report['naming'] == naming
  text = initialization.format_report(report)
  assert f'upcycled ({len(experts)})' in text and naming in text


def test_keep_head_copies_only_matching_shapes():
  dense = _dense_params()
  ckpt = _vit_checkpoint(dense, 'vision_transformer')
  params, report = initialization.vit_to_vmoe_params(
    ckpt, _target_params(), keep_head=True
  )
  _assert_bitwise(params['head']['kernel'], dense['head/kernel'])
  assert 'head/kernel' in report['loaded'] and report['unused'] == []

  target = _target_params(num_classes=7)
  params, report = initialization.vit_to_vmoe_params(
    ckpt, target, keep_head=True
  )
  _assert_bitwise(params['head']['kernel'], target['head']['kernel'])
  assert report['fresh'][-2:] == ['head/bias', 'head/kernel']
  assert any('head/kernel: kept fresh' in n for n in report['notes'])


def test_upcycle_false_keeps_experts_fresh():
  dense = _dense_params()
  target = _target_params()
  ckpt = _vit_checkpoint(dense, 'big_vision')
  params, report = initialization.vit_to_vmoe_params(
    ckpt, target, upcycle=False
  )
  kernel = 'Encoder/encoderblock_0/Moe/Mlp/Dense_0/kernel'
  _assert_bitwise(
    checkpoints.flatten_tree(params)[kernel],
    checkpoints.flatten_tree(target)[kernel],
  )
  assert report['upcycled'] == [] and kernel in report['fresh']
  assert (
    'Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel' in (report['unused'])
  )
  # The dense block still gets its MLP.
  assert 'Encoder/encoderblock_1/Mlp/Dense_0/kernel' in report['loaded']


def test_wrapped_and_scanned_checkpoints_load_the_same():
  dense = _dense_params()
  target = _target_params()
  ckpt = _vit_checkpoint(dense, 'big_vision')
  expected, _ = initialization.vit_to_vmoe_params(ckpt, target)
  wrapped = {f'params/{name}': value for name, value in ckpt.items()}
  scanned = {}
  for name, value in ckpt.items():
    if name.startswith('Transformer/encoderblock_0/'):
      rest = name[len('Transformer/encoderblock_0/') :]
      scanned[f'Transformer/encoderblock/{rest}'] = np.stack(
        [ckpt[f'Transformer/encoderblock_{i}/{rest}'] for i in range(3)]
      )
    elif not name.startswith('Transformer/encoderblock_'):
      scanned[name] = value
  for variant in (wrapped, scanned):
    params, _ = initialization.vit_to_vmoe_params(variant, target)
    for name, value in checkpoints.flatten_tree(expected).items():
      _assert_bitwise(checkpoints.flatten_tree(params)[name], value, name)


@functools.cache
def _logits_fn(moe: bool):
  model = _model(moe)
  return jax.jit(lambda p, x: model.apply({'params': p}, x)[0])


@pytest.mark.parametrize('naming', ['vision_transformer', 'big_vision'])
def test_upcycled_model_computes_the_dense_model(tmp_path, naming):
  """With K = E and no token dropped, an MoE block whose experts all equal
  the dense MLP f outputs sum_e gate_e * f(x) = f(x), whatever the (fresh,
  random) router: the upcycled V-MoE must give the dense ViT's logits. A
  wrong copy (wrong block, wrong layer, an expert left fresh, a misplaced
  class-token position) breaks this; perturbing one expert shows the test
  can tell."""
  dense = _dense_params(seed=2)
  path = _write_npz(tmp_path / 'vit.npz', _vit_checkpoint(dense, naming))
  params, _ = initialization.load_initial_params(
    {'source': 'vit_npz', 'path': path, 'keep_head': True},
    _target_params(seed=3),
  )
  images = jax.random.normal(jax.random.key(4), (BATCH, IMAGE, IMAGE, 3))
  want = _logits_fn(False)(checkpoints.unflatten_tree(dense), images)
  got = _logits_fn(True)(params, images)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  assert float(jnp.std(want)) > 0.1  # Not trivially equal.

  bias = params['Encoder']['encoderblock_2']['Moe']['Mlp']['Dense_1']['bias']
  bias[1, 0] += 1.0
  perturbed = _logits_fn(True)(params, images)
  assert float(jnp.max(jnp.abs(perturbed - want))) > 1e-2


# ---------------------------------------------------------------------------
# Position embeddings.
# ---------------------------------------------------------------------------


def _ramp(side: int, step: float) -> np.ndarray:
  """(side, side, 2) grid: channel 0 = 10 * row * step, 1 = col * step + 1."""
  rows, cols = np.meshgrid(np.arange(side), np.arange(side), indexing='ij')
  return np.stack([10.0 * rows * step, cols * step + 1.0], axis=-1)


def test_interpolating_a_ramp_gives_the_ramp():
  # 3x3 -> 5x5: corners aligned, output (i, j) samples input (i/2, j/2).
  got = initialization.interpolate_grid(_ramp(3, 1.0), 5, 5)
  np.testing.assert_allclose(got, _ramp(5, 0.5), atol=1e-12)
  np.testing.assert_allclose(got[4, 3], [40.0 * 0.5, 3 * 0.5 + 1.0])
  # 5x5 -> 3x3 picks rows and columns 0, 2, 4.
  got = initialization.interpolate_grid(_ramp(5, 0.5), 3, 3)
  np.testing.assert_allclose(got, _ramp(3, 1.0), atol=1e-12)


def test_interpolation_matches_scipy_zoom():
  ndimage = pytest.importorskip('scipy.ndimage')
  grid = np.random.default_rng(0).standard_normal((4, 4, 3))
  for side in (7, 3, 4):
    want = ndimage.zoom(grid, (side / 4, side / 4, 1), order=1)
    got = initialization.interpolate_grid(grid, side, side)
    np.testing.assert_allclose(got, want, atol=1e-12)


def test_resize_keeps_the_class_token_position():
  cls = np.array([[[7.25, -3.5]]], np.float32)
  posemb = np.concatenate(
    [cls, _ramp(3, 1.0).reshape(1, 9, 2).astype(np.float32)], axis=1
  )
  got, how = initialization.resize_pos_embedding(posemb, (1, 26, 2))
  _assert_bitwise(got[:, :1].astype(np.float32), cls)
  np.testing.assert_allclose(got[0, 1:].reshape(5, 5, 2), _ramp(5, 0.5))
  assert 'grid 3x3 -> 5x5' in how and 'copied' in how
  # Without a class-token position on either side.
  got, _ = initialization.resize_pos_embedding(posemb[:, 1:], (1, 25, 2))
  np.testing.assert_allclose(got[0].reshape(5, 5, 2), _ramp(5, 0.5))
  # Source without, target with: the given value.
  got, _ = initialization.resize_pos_embedding(posemb[:, 1:], (1, 26, 2), cls)
  _assert_bitwise(got[:, :1].astype(np.float32), cls)
  with pytest.raises(ValueError, match='neither a square grid'):
    initialization.resize_pos_embedding(posemb[:, :7], (1, 26, 2))


def test_vit_posemb_is_resized_onto_a_larger_grid():
  # A 24x24 image has a 6x6 grid; the checkpoint's is 4x4.
  dense = _dense_params()
  target = _random_params(1, group_size=37 * 2, image=24)
  ramp = _ramp(4, 1.0)[..., :1] * np.ones(16)  # (4, 4, D), channel-equal.
  dense[POSEMB] = np.concatenate(
    [dense[POSEMB][:, :1], ramp.reshape(1, 16, 16).astype(np.float32)], axis=1
  )
  params, report = initialization.vit_to_vmoe_params(
    _vit_checkpoint(dense, 'vision_transformer'), target
  )
  posemb = params['Encoder']['posembed_input']['pos_embedding']
  assert posemb.shape == (1, 37, 16) and posemb.dtype == np.float32
  _assert_bitwise(posemb[:, :1], dense[POSEMB][:, :1])
  want = _ramp(6, 3 / 5)[..., :1] * np.ones(16)
  np.testing.assert_allclose(posemb[0, 1:].reshape(6, 6, 16), want, atol=1e-5)
  assert report['resized'] == [POSEMB]
  assert 'grid 4x4 -> 6x6' in ' '.join(report['notes'])


def test_posemb_without_class_position_nor_class_token_keeps_target_value():
  # A big_vision 'gap' ViT has neither cls nor a class-token position.
  dense = _dense_params()
  ckpt = _vit_checkpoint(dense, 'big_vision')
  del ckpt['cls']
  target = _target_params()
  params, report = initialization.vit_to_vmoe_params(ckpt, target, strict=False)
  posemb = params['Encoder']['posembed_input']['pos_embedding']
  target_posemb = target['Encoder']['posembed_input']['pos_embedding']
  _assert_bitwise(posemb[:, :1], target_posemb[:, :1])
  _assert_bitwise(posemb[:, 1:], dense[POSEMB][:, 1:])
  assert 'cls' in report['fresh']


# ---------------------------------------------------------------------------
# Bad checkpoints and configs.
# ---------------------------------------------------------------------------


def test_shape_mismatch_names_the_arrays():
  dense = _dense_params()
  ckpt = _vit_checkpoint(dense, 'vision_transformer')
  ckpt['embedding/kernel'] = np.zeros((8, 8, 3, 16), np.float32)
  ckpt['Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel'] = np.zeros(
    (16, 48), np.float32
  )
  for strict in (True, False):
    with pytest.raises(ValueError) as info:
      initialization.vit_to_vmoe_params(ckpt, _target_params(), strict=strict)
    message = str(info.value)
    assert 'shape mismatches (2)' in message
    assert (
      'embedding/kernel (from embedding/kernel): expected (4, 4, 3, 16)'
      in (message)
    )
    assert 'expected (16, 24) per expert, got (16, 48)' in message
    assert 'Encoder/encoderblock_0/Moe/Mlp/Dense_0/kernel' in message


def test_unknown_and_missing_names_are_errors_unless_not_strict():
  dense = _dense_params()
  ckpt = _vit_checkpoint(dense, 'big_vision')
  ckpt['Transformer/encoderblock_0/Adapter_0/kernel'] = np.zeros(3)
  ckpt['extra/thing'] = np.zeros(2)
  for name in list(ckpt):
    if name.startswith('Transformer/encoderblock_1/LayerNorm_1/'):
      del ckpt[name]
  target = _target_params()
  with pytest.raises(ValueError) as info:
    initialization.vit_to_vmoe_params(ckpt, target)
  message = str(info.value)
  assert 'big_vision naming' in message
  assert 'unexpected in the checkpoint (2):' in message
  assert 'Transformer/encoderblock_0/Adapter_0/kernel' in message
  assert 'extra/thing' in message
  assert 'missing from the checkpoint (2):' in message
  assert 'Encoder/encoderblock_1/LayerNorm_1/scale' in message
  assert 'strict=False' in message

  params, report = initialization.vit_to_vmoe_params(ckpt, target, strict=False)
  assert report['unused'] == [
    'Transformer/encoderblock_0/Adapter_0/kernel',
    'extra/thing',
    'head/bias',
    'head/kernel',
  ]
  assert 'Encoder/encoderblock_1/LayerNorm_1/scale' in report['fresh']
  _assert_bitwise(
    params['Encoder']['encoderblock_1']['LayerNorm_1']['scale'],
    target['Encoder']['encoderblock_1']['LayerNorm_1']['scale'],
  )


def test_unrecognised_naming_is_an_error():
  with pytest.raises(ValueError, match='Cannot tell the ViT checkpoint'):
    initialization.vit_to_vmoe_params(
      {'embedding': {'kernel': np.zeros((4, 4, 3, 16))}}, _target_params()
    )
  with pytest.raises(ValueError, match='Not a ViT checkpoint'):
    initialization.vit_to_vmoe_params({'foo': np.zeros(1)}, _target_params())


def test_config_errors(tmp_path):
  target = _target_params()
  with pytest.raises(ValueError, match=r"choose one of \['orbax', 'vit_npz'"):
    initialization.load_initial_params({'source': 'npz', 'path': 'x'}, target)
  with pytest.raises(ValueError, match=r"unknown keys \['keep_heads'\]"):
    initialization.load_initial_params(
      {'source': 'vmoe', 'path': 'x', 'keep_heads': True}, target
    )
  for source in initialization.SOURCES:
    missing = str(tmp_path / 'nothing_here')
    with pytest.raises(FileNotFoundError, match='nothing_here'):
      initialization.load_initial_params(
        {'source': source, 'path': missing}, target
      )


# ---------------------------------------------------------------------------
# vmoe checkpoints.
# ---------------------------------------------------------------------------


def test_vmoe_checkpoint_loads_whole_tree_except_head(tmp_path):
  ckpt = _target_params(seed=5)
  target = _target_params(seed=6)
  prefix = str(tmp_path / 'ckpt')
  checkpoints.write_vmoe_checkpoint(prefix, ckpt)
  params, report = initialization.load_initial_params(
    {'source': 'vmoe', 'path': prefix + '.index'}, target
  )
  flat = checkpoints.flatten_tree(params)
  for name in checkpoints.flatten_tree(ckpt):
    want = target if name.startswith('head') else ckpt
    _assert_bitwise(flat[name], checkpoints.flatten_tree(want)[name], name)
  assert report['fresh'] == ['head/bias', 'head/kernel']
  assert 'Encoder/encoderblock_0/Moe/Router/dense/kernel' in report['loaded']

  params, report = initialization.load_initial_params(
    {'source': 'vmoe', 'path': prefix, 'keep_head': True}, target
  )
  _assert_bitwise(params['head']['bias'], ckpt['head']['bias'])
  assert report['fresh'] == [] and report['unused'] == []


def test_vmoe_checkpoint_of_another_model_lists_everything(tmp_path):
  ckpt = checkpoints.flatten_tree(_target_params())
  ckpt['Encoder/encoderblock_0/Moe/Mlp/Dense_0/kernel'] = np.zeros((2, 16, 24))
  del ckpt['Encoder/encoderblock_2/LayerNorm_0/bias']
  ckpt['Encoder/encoderblock_3/LayerNorm_0/bias'] = np.zeros(16)
  prefix = str(tmp_path / 'ckpt')
  checkpoints.write_vmoe_checkpoint(prefix, checkpoints.unflatten_tree(ckpt))
  with pytest.raises(ValueError) as info:
    initialization.load_initial_params(
      {'source': 'vmoe', 'path': prefix}, _target_params()
    )
  message = str(info.value)
  assert 'does not match the expected tree' in message
  assert 'Encoder/encoderblock_2/LayerNorm_0/bias' in message
  assert 'Encoder/encoderblock_3/LayerNorm_0/bias' in message
  assert 'expected (4, 16, 24), got (2, 16, 24)' in message


def test_vmoe_checkpoint_posemb_is_resized(tmp_path):
  ckpt = _random_params(7, group_size=37 * 2, image=24)
  prefix = str(tmp_path / 'ckpt')
  checkpoints.write_vmoe_checkpoint(prefix, ckpt)
  target = _target_params()
  params, report = initialization.load_initial_params(
    {'source': 'vmoe', 'path': prefix}, target
  )
  assert report['resized'] == [POSEMB]
  posemb = params['Encoder']['posembed_input']['pos_embedding']
  source = ckpt['Encoder']['posembed_input']['pos_embedding']
  _assert_bitwise(posemb[:, :1], source[:, :1])
  want, _ = initialization.resize_pos_embedding(source, (1, 17, 16))
  _assert_bitwise(posemb, want.astype(np.float32))

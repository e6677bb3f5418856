"""Dense ViT checkpoints as V-MoE parameters, with sparse upcycling.

A ViT `.npz` of google-research/vision_transformer or google-research/
big_vision (naming detected from the names) fills our parameter tree; every
expert of every MoE block starts as a copy of that block's dense MLP and the
router stays as initialised (Komatsuzaki et al., "Sparse Upcycling: Training
Mixture-of-Experts from Dense Checkpoints", ICLR 2023, arXiv:2212.05055,
Fig. 1). With all experts equal the MoE block computes (sum of the token's
combine weights) times the dense MLP, so with K = E the upcycled model is
the dense model.
"""

from __future__ import annotations

import collections.abc
import re
from typing import Any

import ml_dtypes
import numpy as np

from vmoe_jsd.checkpoints.tree import flatten_tree, unflatten_tree
from vmoe_jsd.initialization import fill

_ROUTER_RE = re.compile(r'^Encoder/encoderblock_\d+/Moe/Router/')
_DENSE_MLP_RE = re.compile(r'^(Encoder/encoderblock_\d+)/Mlp/')

# Children of `Transformer/encoderblock_{i}`. vision_transformer's checkpoints
# were written by pre-linen flax, which numbered submodules across types
# (LayerNorm_0, MultiHeadDotProductAttention_1, LayerNorm_2, MlpBlock_3);
# big_vision's linen model numbers them per type.
_BLOCK_CHILDREN = {
  'vision_transformer': {
    'LayerNorm_0': 'LayerNorm_0',
    'MultiHeadDotProductAttention_1': 'SelfAttention',
    'LayerNorm_2': 'LayerNorm_1',
    'MlpBlock_3': 'Mlp',
  },
  'big_vision': {
    'LayerNorm_0': 'LayerNorm_0',
    'MultiHeadDotProductAttention_0': 'SelfAttention',
    'LayerNorm_1': 'LayerNorm_1',
    'MlpBlock_0': 'Mlp',
  },
}
# Everything outside the encoder blocks, by name prefix. The position
# embedding lives in three places: vision_transformer and very old
# big_vision under posembed_input, pre-2022 big_vision in the Transformer,
# big_vision since at the root (and without a class-token position).
_OUTSIDE_BLOCKS = {
  'embedding': 'embedding',
  'cls': 'cls',
  'Transformer/posembed_input/pos_embedding': fill.POSEMB,
  'Transformer/pos_embedding': fill.POSEMB,
  'pos_embedding': fill.POSEMB,
  'Transformer/encoder_norm': 'Encoder/encoder_norm',
  'MAPHead_0/probe': 'MapHead/probe',
  'MAPHead_0/MultiHeadDotProductAttention_0': (
    'MapHead/MultiHeadDotProductAttention'
  ),
  'MAPHead_0/LayerNorm_0': 'MapHead/LayerNorm',
  'MAPHead_0/MlpBlock_0': 'MapHead/Mlp',
  'pre_logits': 'pre_logits',
  'head': 'head',
}
_BLOCK_RE = re.compile(r'^Transformer/encoderblock_(\d+)/([^/]+)(/.*)?$')
# big_vision with scan_layers=True stacks all blocks on a leading axis.
_SCANNED_RE = re.compile(r'^Transformer/encoderblock/(.+)$')
# Trees that some checkpoints wrap the model in (optimizer target, params of
# a big_vision train state, image tower of a two-tower model).
_WRAPPERS = ('', 'opt/target/', 'params/', 'params/img/')


def detect_vit_naming(names: collections.abc.Iterable[str]) -> str:
  """'vision_transformer' or 'big_vision': the naming whose encoder-block
  children a ViT's '/'-joined parameter names use (ValueError: both or
  neither)."""
  found = set()
  for name in names:
    m = _BLOCK_RE.match(name)
    if not m:
      continue
    for naming, children in _BLOCK_CHILDREN.items():
      # LayerNorm_0 is in both namings and decides nothing.
      if m.group(2) in children and m.group(2) != 'LayerNorm_0':
        found.add(naming)
  if len(found) != 1:
    raise ValueError(
      'Cannot tell the ViT checkpoint naming: expected encoder blocks with '
      'either MultiHeadDotProductAttention_1/LayerNorm_2/MlpBlock_3 '
      '(vision_transformer) or MultiHeadDotProductAttention_0/LayerNorm_1/'
      f'MlpBlock_0 (big_vision); found {sorted(found) or "neither"}.'
    )
  return found.pop()


def _vit_name_to_ours(name: str, naming: str) -> str | None:
  """Our name for a ViT checkpoint name, or None if it has none."""
  m = _BLOCK_RE.match(name)
  if m:
    child = _BLOCK_CHILDREN[naming].get(m.group(2))
    if child is None:
      return None
    return f'Encoder/encoderblock_{m.group(1)}/{child}{m.group(3) or ""}'
  for prefix, ours in _OUTSIDE_BLOCKS.items():
    if name == prefix or name.startswith(prefix + '/'):
      return ours + name[len(prefix) :]
  return None


def _unwrap_vit(flat: dict[str, Any]) -> tuple[dict[str, Any], dict, str]:
  """Strips a wrapper prefix; returns (model arrays, others, prefix)."""
  for prefix in _WRAPPERS:
    if prefix + 'embedding/kernel' in flat:
      inside = {
        n[len(prefix) :]: v for n, v in flat.items() if n.startswith(prefix)
      }
      outside = {n: v for n, v in flat.items() if not n.startswith(prefix)}
      return inside, outside, prefix
  raise ValueError(
    'Not a ViT checkpoint: no embedding/kernel under any of '
    f'{[p or "the root" for p in _WRAPPERS]}; found names such as '
    f'{sorted(flat)[:5]}.'
  )


def _unscan(flat: dict[str, Any]) -> dict[str, Any]:
  """Splits big_vision's scanned blocks into encoderblock_{i}."""
  out = {}
  for name, value in flat.items():
    m = _SCANNED_RE.match(name)
    if not m:
      out[name] = value
      continue
    for block, block_value in enumerate(np.asarray(value)):
      out[f'Transformer/encoderblock_{block}/{m.group(1)}'] = block_value
  return out


def _fix_npz_dtype(x: Any) -> np.ndarray:
  """numpy writes bfloat16 arrays to .npz as 2-byte void; reads them back."""
  x = np.asarray(x)
  if x.dtype.kind == 'V' and x.dtype.itemsize == 2:
    return x.view(ml_dtypes.bfloat16)
  return x


def vit_to_vmoe_params(
  vit_tree: collections.abc.Mapping,
  target_params: collections.abc.Mapping,
  *,
  upcycle: bool = True,
  keep_head: bool = False,
  strict: bool = True,
  what: str = 'ViT checkpoint',
) -> tuple[dict, dict]:
  """Maps a dense ViT checkpoint onto a V-MoE's parameters (upcycling).

  Names of vision_transformer and big_vision are recognised (plus scanned
  blocks and the `_WRAPPERS`). big_vision's root position embedding has no
  class-token position: the target's is then zero (posemb.py).

  Args:
    vit_tree: dict of arrays, nested (e.g. read_npz_tree(path))
      or flat with '/'-joined names (e.g. dict(np.load(path))).
    target_params: the freshly initialised params of the model to train
      (arrays, or ShapeDtypeStructs if nothing needs to stay fresh).
    upcycle: copy the dense MLPs into the experts of MoE blocks (False:
      the experts stay fresh and the dense MLPs unused).
    keep_head: copy head/pre_logits when their shapes match.
    strict: unmatched names are errors (else: reported, kept fresh/unused).
    what: how to name the checkpoint in messages.

  Returns:
    (params, report): params like target_params, as numpy arrays in the
    target's dtypes; report with the target names 'loaded', 'upcycled',
    'resized' and 'fresh', the checkpoint names left 'unused', 'notes' and
    the detected 'naming'.

  Raises:
    ValueError: listing the unmatched names (strict) and shape mismatches.
  """
  source, origin, naming, scanned = _vit_source(vit_tree, what)
  target_flat = flatten_tree(target_params)
  moe_blocks = {m.group(1) for m in map(fill.EXPERT_RE.match, target_flat) if m}

  def fresh_ok(name: str) -> bool:
    return bool(_ROUTER_RE.match(name)) or (
      not upcycle and fill.dense_mlp_name(name) is not None
    )

  def skippable(name: str) -> bool:
    m = _DENSE_MLP_RE.match(name)
    return fill.is_head(name) or (
      not upcycle and m is not None and m.group(1) in moe_blocks
    )

  flat_params, report = fill.fill_target(
    target_flat,
    source,
    what=f'{what} ({naming} naming)',
    origin=origin,
    keep_head=keep_head,
    strict=strict,
    upcycle=upcycle,
    fresh_ok=fresh_ok,
    skippable=skippable,
  )
  report['naming'] = naming + (' (scanned blocks)' if scanned else '')
  if not upcycle and moe_blocks:
    report['notes'].append(
      'upcycle=False: experts kept fresh, the dense MLPs of '
      f'{sorted(moe_blocks)} unused'
    )
  return unflatten_tree(flat_params), report


def _vit_source(vit_tree, what: str) -> tuple[dict, dict, str, bool]:
  """(our name -> array, our name -> ViT name, naming, scanned) of a ViT."""
  flat = {
    n: _fix_npz_dtype(v)
    for n, v in flatten_tree(vit_tree, strict=False).items()
  }
  inside, outside, wrapper = _unwrap_vit(flat)
  scanned = any(_SCANNED_RE.match(n) for n in inside)
  inside = _unscan(inside)
  naming = detect_vit_naming(inside)
  source, origin, unmapped = {}, {}, {}
  for name, value in inside.items():
    ours = _vit_name_to_ours(name, naming)
    if ours is None:
      unmapped[wrapper + name] = value
      continue
    if ours in source:
      raise ValueError(
        f'The {what} has two arrays for {ours!r}: '
        f'{origin[ours]!r} and {wrapper + name!r}.'
      )
    source[ours] = value
    origin[ours] = wrapper + name
  # Names without a counterpart keep their own name, which no target has.
  source.update({**outside, **unmapped})
  origin.update({name: name for name in {**outside, **unmapped}})
  return source, origin, naming, scanned

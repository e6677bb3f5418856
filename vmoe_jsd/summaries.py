"""Norm summaries and router statistics computed inside the train step.

`config.summaries` (both off by default):
  norms: the L2 norms of the parameters (after the update), the gradients
    and the updates: over the whole tree ('norm/<tree>/global') and over
    each named group of parameters ('norm/<tree>/<group>'). A group is the
    set of parameters whose '/'-joined name (e.g.
    'Encoder/encoderblock_1/Moe/Router/dense/kernel') matches its regex
    (`re.search`), as vmoe's TreeSummarizer rules (vmoe/train/
    tree_summarizer.py) and vmoe's 'global_norm/{grads,updates,params}'.
    A group that matches no parameter is left out (the router and expert
    groups of a dense model); groups may overlap.
  router: per MoE layer, from the clean router logits z (G, S, E) of the
    step's views: the mean over tokens of ||z||_2 ('logit_norm'), the router
    z-loss mean(logsumexp(z)^2) ([ST-MoE] Zoph et al., arXiv:2202.08906,
    Eq. 5; 'z_loss', logged whatever its weight in the loss) and the mean
    top-1 probability max_e softmax(z)_e ('top1_prob'), under
    'router/encoderblock_<i>/'.

Every value is a float32 scalar that carries no gradient; the step adds
them to its metrics, so the progress report writes them to TensorBoard and
to train_history.jsonl.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import flax.traverse_util
import jax
import jax.numpy as jnp

from vmoe_jsd import losses, models
from vmoe_jsd.config_errors import check_keys, reject, to_dict

Array = jax.Array

# (name, regex) over '/'-joined parameter names (models/vit_moe.py's tree).
DEFAULT_NORM_GROUPS = (
  ('router', r'/Moe/Router/'),
  ('experts', r'/Moe/Mlp/'),
  ('attention', r'/SelfAttention/'),
  ('mlp', r'encoderblock_\d+/Mlp/'),
  ('embedding', r'^(embedding/|cls$|Encoder/posembed_input/)'),
  ('head', r'^(head|pre_logits)/'),
)
SUMMARY_KEYS = ('norms', 'router', 'norm_groups')


@dataclasses.dataclass(frozen=True)
class SummarySpec:
  """What the train step summarises (config.summaries: module docstring);
  `norm_groups`: ((name, regex), ...) parameter groups of the norms."""

  norms: bool = False
  router: bool = False
  norm_groups: tuple[tuple[str, str], ...] = DEFAULT_NORM_GROUPS

  @classmethod
  def from_config(cls, block) -> SummarySpec:
    """From config.summaries (absent: everything off)."""
    block = to_dict(block)
    check_keys('summaries', block, SUMMARY_KEYS)
    for key in ('norms', 'router'):
      if not isinstance(block.get(key, False), bool):
        reject(f'summaries.{key}', block[key], 'True or False')
    groups = block.get('norm_groups', DEFAULT_NORM_GROUPS)
    return cls(
      norms=block.get('norms', False),
      router=block.get('router', False),
      norm_groups=_check_groups(groups),
    )


def _check_groups(groups) -> tuple[tuple[str, str], ...]:
  valid = 'a list of (name, regex) pairs with distinct names, e.g. ' + repr(
    list(DEFAULT_NORM_GROUPS[:1])
  )
  out = []
  for group in groups or ():
    if (
      not isinstance(group, (list, tuple))
      or len(group) != 2
      or not all(isinstance(x, str) and x for x in group)
    ):
      reject('summaries.norm_groups', group, valid)
    try:
      re.compile(group[1])
    except re.error as e:
      reject('summaries.norm_groups', group, f'{valid} (regex: {e})')
    out.append((group[0], group[1]))
  names = [name for name, _ in out]
  if 'global' in names or len(set(names)) != len(names):
    reject('summaries.norm_groups', names, f"{valid}, none named 'global'")
  return tuple(out)


def group_members(params, groups) -> dict[str, tuple[str, ...]]:
  """{group name: '/'-joined names of the parameters it matches}, without
  the groups that match none (names are read at trace time)."""
  names = list(flax.traverse_util.flatten_dict(params, sep='/'))
  out = {}
  for group, regex in groups:
    pattern = re.compile(regex)
    members = tuple(n for n in names if pattern.search(n))
    if members:
      out[group] = members
  return out


def tree_norms(trees: Mapping[str, Any], groups) -> dict[str, Array]:
  """L2 norms of each tree ({'params': ..., 'grads': ..., ...}), global and
  per (name, regex) group of its leaves: {'norm/<tree>/global': ...,
  'norm/<tree>/<group>': ...} float32."""
  out = {}
  for tree_name, tree in trees.items():
    flat = flax.traverse_util.flatten_dict(tree, sep='/')
    # One sum of squares per leaf, shared by the global and group norms.
    squares = {
      n: jnp.sum(jnp.square(x.astype(jnp.float32))) for n, x in flat.items()
    }
    out[f'norm/{tree_name}/global'] = jnp.sqrt(sum(squares.values()))
    for group, members in group_members(tree, groups).items():
      out[f'norm/{tree_name}/{group}'] = jnp.sqrt(
        sum(squares[n] for n in members)
      )
  return jax.lax.stop_gradient(out)


def router_statistics(intermediates, layers) -> dict[str, Array]:
  """Per MoE layer of the sown 'intermediates': mean ||z||_2, router z-loss
  and mean top-1 probability, as
  {'router/encoderblock_<i>/{logit_norm,z_loss,top1_prob}': float32}."""
  out = {}
  by_layer = models.router_logits_by_layer(intermediates, layers)
  for block, logits in by_layer.items():
    z = jax.lax.stop_gradient(logits).astype(jnp.float32)  # (G, S, E)
    prefix = f'router/encoderblock_{block}'
    out[f'{prefix}/logit_norm'] = jnp.mean(jnp.linalg.norm(z, axis=-1))
    out[f'{prefix}/z_loss'] = losses.router_z_loss(z)
    out[f'{prefix}/top1_prob'] = jnp.mean(jnp.max(jax.nn.softmax(z), -1))
  return out

"""Evaluation: accuracy and routing consistency across views.

Routing consistency (per MoE layer), on two augmented views of each
evaluation image made with a fixed key, over patch tokens (the class token
has no spatial correspondence and is left out):
  - agreement: fraction of matched patch pairs (both directions, view 1 ->
    view 2 and view 2 -> view 1) whose top-1 experts are equal;
  - chance: sum_e load_e^2, the agreement two independent tokens with the
    observed top-1 load would reach (1/E balanced, 1 collapsed);
  - kappa = (agreement - chance) / (1 - chance) (Cohen's kappa with equal
    marginals): 0 at chance, 1 perfect. Agreement alone rises when the router
    collapses onto few experts; kappa does not;
  - jsd: mean Jensen-Shannon divergence of the clean router softmax of
    matched pairs (nats, at most ln 2);
  - confidence: mean largest router probability; entropy: mean router
    entropy (nats) and its fraction of the maximum, ln E;
  - load: fraction of patch tokens whose top-1 is each expert;
  - dropped: fraction of token choices over capacity (from the router, on
    the deterministic accuracy view, with the evaluation capacity factor).

The per-batch function returns sums, so batches (and processes) add up
exactly; `finalize_routing` turns the sums into the figures above.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from vmoe_jsd import losses

Array = jax.Array


def routing_sums(logits: Array, maps: Array, mask: Array) -> dict[str, Array]:
  """Sums behind the routing-consistency figures, for one batch.

  Args:
    logits: (B, 2, P, E) clean router logits of the patch tokens of the two
      views of each image.
    maps: (B, 2, P) int32 patch correspondences (maps[:, 0]: view 1 -> view
      2, maps[:, 1]: view 2 -> view 1), -1 for no match.
    mask: (B,) bool, False for padding examples.

  Returns:
    A dict of scalar / (E,) sums: pairs, agree, jsd, tokens, load (E,),
    confidence, entropy.
  """
  num_experts = logits.shape[-1]
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
  probs = jnp.exp(log_probs)
  top1 = jnp.argmax(logits, axis=-1)  # (B, 2, P)
  valid = (maps >= 0) & mask[:, None, None]  # (B, 2, P)
  # Partner of each patch in the other view: view 1's partners come from
  # view 2 and vice versa.
  other_top1 = top1[:, ::-1]
  other_log_probs = log_probs[:, ::-1]
  partner_top1 = jnp.take_along_axis(other_top1, jnp.maximum(maps, 0), axis=2)
  partner_log_probs = jnp.take_along_axis(
    other_log_probs, jnp.maximum(maps, 0)[..., None], axis=2
  )
  jsd = losses.jensen_shannon(log_probs, partner_log_probs)
  token_mask = jnp.broadcast_to(mask[:, None, None], top1.shape)
  entropy = -jnp.sum(probs * log_probs, axis=-1)
  return {
    'pairs': jnp.sum(valid),
    'agree': jnp.sum(valid & (top1 == partner_top1)),
    'jsd': jnp.sum(jnp.where(valid, jsd, 0.0)),
    'tokens': jnp.sum(token_mask),
    'load': jnp.sum(
      jax.nn.one_hot(top1, num_experts) * token_mask[..., None],
      axis=(0, 1, 2),
    ),
    'confidence': jnp.sum(jnp.where(token_mask, jnp.max(probs, -1), 0.0)),
    'entropy': jnp.sum(jnp.where(token_mask, entropy, 0.0)),
  }


def finalize_routing(sums: dict[str, np.ndarray]) -> dict[str, object]:
  """Routing figures from accumulated `routing_sums` (host numpy)."""
  pairs = float(sums['pairs'])
  tokens = float(sums['tokens'])
  load = np.asarray(sums['load'], np.float64) / max(tokens, 1.0)
  num_experts = load.shape[0]
  agreement = float(sums['agree']) / pairs if pairs else float('nan')
  chance = float(np.sum(load**2))
  kappa = (
    (agreement - chance) / (1.0 - chance) if chance < 1.0 else float('nan')
  )
  entropy = float(sums['entropy']) / max(tokens, 1.0)
  return {
    'agreement': agreement,
    'chance': chance,
    'kappa': kappa,
    'jsd': float(sums['jsd']) / pairs if pairs else float('nan'),
    'confidence': float(sums['confidence']) / max(tokens, 1.0),
    'entropy': entropy,
    'entropy_fraction': entropy / math.log(num_experts)
    if num_experts > 1
    else 0.0,
    'load': [float(x) for x in load],
    'pairs': int(pairs),
  }


def format_routing_table(routing: dict[str, dict]) -> str:
  """A fixed-width text table of the routing figures, one row per layer."""
  header = (
    f'{"layer":<16}{"agree":>7}{"chance":>8}{"kappa":>7}{"jsd":>8}'
    f'{"conf":>6}{"H/Hmax":>7}{"dropped":>8}  load'
  )
  rows = [header]
  for name, r in routing.items():
    load = ' '.join(f'{x:.2f}' for x in r['load'])
    rows.append(
      f'{name:<16}{r["agreement"]:>7.3f}{r["chance"]:>8.3f}'
      f'{r["kappa"]:>7.3f}{r["jsd"]:>8.4f}{r["confidence"]:>6.2f}'
      f'{r["entropy_fraction"]:>7.2f}{r.get("dropped", float("nan")):>8.3f}'
      f'  [{load}]'
    )
  return '\n'.join(rows)

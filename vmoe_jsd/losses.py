"""Loss functions: classification, MoE auxiliary losses, router consistency.

Every function here is a plain function of arrays, testable alone; the
modules and the train step only wire them together.

References:
  [V-MoE] Riquelme et al., "Scaling Vision with Sparse Mixture of Experts",
    NeurIPS 2021, arXiv:2106.05974. Appendix A: importance and load losses.
  [GShard] Lepikhin et al., arXiv:2006.16668, Algorithm 1: l_aux.
  [ST-MoE] Zoph et al., arXiv:2202.08906, Eq. 5: router z-loss.
  [JSD] Kada, Kawakami, Ikehata, Sato, "Router consistency learning for
    sparse Mixture-of-Experts vision transformers", MIRU 2023: the
    Jensen-Shannon divergence between the router distributions of patches of
    two augmented views that show the same image point.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

Array = jax.Array

LN2 = math.log(2.0)


# ----------------------------------------------------------------------------
# Classification.
# ----------------------------------------------------------------------------
def _as_targets(labels: Array, num_classes: int) -> Array:
  """Integer labels (B,) -> one-hot (B, C); soft/one-hot labels unchanged."""
  if jnp.issubdtype(labels.dtype, jnp.integer):
    return jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  return labels.astype(jnp.float32)


def softmax_xent(logits: Array, labels: Array) -> Array:
  """Softmax cross-entropy per example.

  Args:
    logits: (B, C) unnormalised scores.
    labels: (B,) integer class ids, or (B, C) one-hot / soft targets that sum
      to one per example.

  Returns:
    (B,) float32 cross-entropy, -sum_c y_c log softmax(z)_c.
  """
  targets = _as_targets(labels, logits.shape[-1])
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.sum(targets * log_probs, axis=-1)


def sigmoid_xent(logits: Array, labels: Array) -> Array:
  """Sigmoid (binary, per class) cross-entropy per example, summed over classes.

  This is the loss V-MoE trains ImageNet models with (vmoe's `sigmoid_xent`
  sums over classes and averages over examples).

  Args:
    logits: (B, C) unnormalised scores.
    labels: (B,) integer class ids, or (B, C) multi-hot / soft targets in [0,1].

  Returns:
    (B,) float32 loss, -sum_c [y_c log s(z_c) + (1 - y_c) log(1 - s(z_c))].
  """
  targets = _as_targets(labels, logits.shape[-1])
  logits = logits.astype(jnp.float32)
  log_p = jax.nn.log_sigmoid(logits)
  log_not_p = jax.nn.log_sigmoid(-logits)
  return -jnp.sum(targets * log_p + (1.0 - targets) * log_not_p, axis=-1)


CLASSIFICATION_LOSSES = {
  'softmax_xent': softmax_xent,
  'sigmoid_xent': sigmoid_xent,
}


def get_classification_loss(name: str):
  if name not in CLASSIFICATION_LOSSES:
    raise ValueError(
      f'loss.name={name!r} is unknown; choose one of '
      f'{sorted(CLASSIFICATION_LOSSES)}'
    )
  return CLASSIFICATION_LOSSES[name]


# ----------------------------------------------------------------------------
# MoE auxiliary losses, for ONE routing group. vmap over groups.
# ----------------------------------------------------------------------------
def cv_squared(x: Array) -> Array:
  """Squared coefficient of variation, var(x) / mean(x)^2, over all of x.

  Equal to (std / mean)^2 as in [V-MoE] Eq. (A.2)/(A.6), but computed from
  the variance: the square root inside `std` has an infinite derivative at
  zero, so `jnp.std(x)` gives NaN gradients exactly when the load is
  perfectly balanced. This form has gradient 2 (x - mean) / (n mean^2) there.
  """
  x = x.astype(jnp.float32)
  mean = jnp.mean(x)
  var = jnp.mean(jnp.square(x - mean))
  return var / jnp.square(mean)


def importance_loss(gates: Array) -> Array:
  """Importance loss of [V-MoE] Appendix A.1, for one group.

  Args:
    gates: (S, E) router softmax (clean, before noise) of the group's tokens.

  Returns:
    Scalar: CV^2 of the per-expert importance Imp_e = sum_s gates[s, e].
  """
  return cv_squared(jnp.sum(gates, axis=0))


def load_loss(
  logits: Array,
  noisy_logits: Array,
  noise_std: float,
  num_selected_experts: int,
) -> Array:
  """Load loss of [V-MoE] Appendix A.2, for one group.

  For each token the threshold is its K-th largest noisy logit. The
  probability that expert e would be selected if only its own noise were
  re-sampled is P(logit_e + eps >= threshold) = 1 - Phi((threshold -
  logit_e) / sigma). The load of an expert is the mean of that probability
  over tokens; the loss is its CV^2.

  Args:
    logits: (S, E) clean router logits.
    noisy_logits: (S, E) logits plus Gaussian noise of std `noise_std`.
    noise_std: the noise standard deviation actually used (sigma).
    num_selected_experts: K.

  Returns:
    Scalar load loss.
  """
  # The gradient flows through the threshold too (into the noisy logits, so
  # into the clean ones), as in vmoe.
  threshold = jax.lax.top_k(noisy_logits, num_selected_experts)[0][..., -1:]
  prob_selected = 1.0 - jax.scipy.stats.norm.cdf(
    (threshold - logits) / noise_std
  )
  return cv_squared(jnp.mean(prob_selected, axis=0))


def gshard_loss(gates: Array) -> Array:
  """GShard auxiliary loss ([GShard] Algorithm 1, l_aux), for one group.

  mean_e(fraction of tokens whose top-1 is e * mean gate of e) * E^2; the E^2
  factor is in GShard's released code (lingvo) and in vmoe. Equals 1 when
  both are uniform.

  Args:
    gates: (S, E) router softmax used for dispatch.

  Returns:
    Scalar.
  """
  num_experts = gates.shape[-1]
  mean_gates = jnp.mean(gates, axis=0)
  top1 = jax.nn.one_hot(jnp.argmax(gates, axis=-1), num_experts)
  mean_top1 = jnp.mean(top1, axis=0)
  return jnp.mean(mean_top1 * mean_gates) * num_experts**2


def router_z_loss(logits: Array) -> Array:
  """Router z-loss ([ST-MoE] Eq. 5): mean over tokens of logsumexp(logits)^2.

  Args:
    logits: (..., E) router logits.

  Returns:
    Scalar.
  """
  z = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
  return jnp.mean(jnp.square(z))


# ----------------------------------------------------------------------------
# Router consistency.
# ----------------------------------------------------------------------------
def jensen_shannon(log_p: Array, log_q: Array) -> Array:
  """Jensen-Shannon divergence between distributions given as log-probs.

  JSD(p, q) = 1/2 KL(p || m) + 1/2 KL(q || m), m = (p + q) / 2, in nats, so
  0 <= JSD <= ln 2. Working in log space (log m = logaddexp(log p, log q) -
  ln 2) needs no epsilon: a zero probability contributes exp(-inf) * (...)
  = 0, never 0 * log 0; `jnp.where` guards the value and the gradient.

  Args:
    log_p: (..., E) log-probabilities (e.g. log_softmax of router logits).
    log_q: (..., E) log-probabilities, same shape.

  Returns:
    (...) JSD per distribution pair.
  """
  log_p = log_p.astype(jnp.float32)
  log_q = log_q.astype(jnp.float32)
  log_m = jnp.logaddexp(log_p, log_q) - LN2

  def kl_to_m(log_a):
    a = jnp.exp(log_a)
    finite = a > 0
    safe_log_a = jnp.where(finite, log_a, 0.0)
    return jnp.sum(jnp.where(finite, a * (safe_log_a - log_m), 0.0), axis=-1)

  return 0.5 * (kl_to_m(log_p) + kl_to_m(log_q))


def gather_patches(values: Array, index: Array) -> Array:
  """values (B, P, ...) indexed per example by index (B, Q) -> (B, Q, ...).

  Negative indices (no match) are clamped to 0; mask them separately.
  """
  safe = jnp.maximum(index, 0)
  return jnp.take_along_axis(
    values, safe.reshape(safe.shape + (1,) * (values.ndim - 2)), axis=1
  )


def router_consistency(
  logits_v1: Array,
  logits_v2: Array,
  map_12: Array,
  map_21: Array,
  temperature: float = 1.0,
) -> tuple[Array, Array]:
  """Mean JSD between router distributions of corresponding patches.

  The router distribution of a patch is softmax(logits / temperature). For
  every patch i of view 1 with a match j = map_12[i] >= 0 in view 2, the pair
  (i, j) contributes JSD(p1_i, p2_j); likewise for every matched patch of
  view 2 through map_21. The loss is the mean over all matched pairs of both
  directions (so both views are pulled towards each other symmetrically, and
  patches that fall outside the other view are ignored).

  Args:
    logits_v1: (B, P, E) clean router logits of the patches of view 1.
    logits_v2: (B, P, E) the same for view 2.
    map_12: (B, P) int, index into view 2's patches, -1 for no match.
    map_21: (B, P) int, index into view 1's patches, -1 for no match.
    temperature: > 0; T > 1 softens the compared distributions.

  Returns:
    (mean JSD over matched pairs (0 when there is none), number of pairs).
  """
  log_p1 = jax.nn.log_softmax(logits_v1.astype(jnp.float32) / temperature)
  log_p2 = jax.nn.log_softmax(logits_v2.astype(jnp.float32) / temperature)
  jsd_12 = jensen_shannon(log_p1, gather_patches(log_p2, map_12))
  jsd_21 = jensen_shannon(log_p2, gather_patches(log_p1, map_21))
  valid_12 = map_12 >= 0
  valid_21 = map_21 >= 0
  total = jnp.sum(jnp.where(valid_12, jsd_12, 0.0)) + jnp.sum(
    jnp.where(valid_21, jsd_21, 0.0)
  )
  count = jnp.sum(valid_12) + jnp.sum(valid_21)
  mean = total / jnp.maximum(count, 1).astype(jnp.float32)
  return mean, count

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
  [PRC] Kada et al., "Pairwise Router Consistency" for sparse MoE vision
    transformers, IEEE Open Journal of Signal Processing 2025, code
    github.com/m82kada/PRC (vmoe/nn/routing.py, losses
    `matrix_top1_diagonal` / `matrix_top1_offdiagonal`): a Barlow-Twins
    cross-correlation of the two views' router softmaxes.
  [Barlow] Zbontar et al., "Barlow Twins", ICML 2021, Eq. (1).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from vmoe_jsd.config_errors import lookup

Array = jax.Array

LN2 = math.log(2.0)


# Classification.
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
  return lookup(CLASSIFICATION_LOSSES, 'loss.name', name)


# MoE auxiliary losses, for ONE routing group. vmap over groups.
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
  """Importance loss of [V-MoE] Appendix A.1, for one group: CV^2 of the
  per-expert importance Imp_e = sum_s gates[s, e], `gates` (S, E) the
  router softmax (clean, before noise) of the group's tokens."""
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
    Scalar float32 load loss (inputs of any float dtype are cast first).
  """
  # float32 whatever the model dtype: jax.scipy.stats.norm.cdf rejects
  # bfloat16, and the tail probabilities need more than bfloat16's 8 bits.
  logits = logits.astype(jnp.float32)
  noisy_logits = noisy_logits.astype(jnp.float32)
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

  `gates`: (S, E) router softmax used for dispatch.
  """
  num_experts = gates.shape[-1]
  mean_gates = jnp.mean(gates, axis=0)
  top1 = jax.nn.one_hot(jnp.argmax(gates, axis=-1), num_experts)
  mean_top1 = jnp.mean(top1, axis=0)
  return jnp.mean(mean_top1 * mean_gates) * num_experts**2


def router_z_loss(logits: Array) -> Array:
  """Router z-loss ([ST-MoE] Eq. 5): mean over tokens of logsumexp(logits)^2
  of (..., E) router logits."""
  z = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
  return jnp.mean(jnp.square(z))


# Router consistency.
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


@dataclasses.dataclass(frozen=True)
class ConsistencyOptions:
  """How the router-consistency term is computed (config.consistency).

  Attributes:
    loss: a name in CONSISTENCY_LOSSES.
    temperature: > 0; every loss compares softmax(logits / temperature) (or,
      for 'margin', logits / temperature). Temperature alone does not stop
      flattening: the router rescales its logits to undo it.
    stop_gradient: 'none' (both views learn), 'view1' or 'view2' (that view
      is a fixed target: no gradient flows into its router outputs).
    include_cls: also compare the class tokens of the two views ([PRC]).
    diagonal_weight: 'cross_correlation' only: weight of the diagonal term.
    offdiagonal_weight: 'cross_correlation' only: weight of the off-diagonal
      term. [PRC]'s released configs use 5e-3 and 5e-2, i.e. a consistency
      weight of 5e-3 with diagonal_weight 1 and offdiagonal_weight 10.
    margin: 'margin' only: the required top-1 logit gap (logit units).
    entropy_cap: 'jsd_entropy' only: router entropy, as a fraction of ln E,
      above which the entropy penalty starts.
    entropy_weight: 'jsd_entropy' only: weight of that penalty.
  """

  loss: str = 'jsd'
  temperature: float = 1.0
  stop_gradient: str = 'none'
  include_cls: bool = False
  diagonal_weight: float = 1.0
  offdiagonal_weight: float = 10.0
  margin: float = 1.0
  entropy_cap: float = 0.5
  entropy_weight: float = 1.0

  def __post_init__(self):
    lookup(CONSISTENCY_LOSSES, 'consistency.loss', self.loss)
    if self.stop_gradient not in STOP_GRADIENT:
      raise ValueError(
        f'consistency.stop_gradient={self.stop_gradient!r} is unknown; '
        f'choose one of {list(STOP_GRADIENT)}'
      )
    if not self.temperature > 0:
      raise ValueError(
        f'consistency.temperature={self.temperature!r} must be > 0'
      )
    names = 'diagonal_weight', 'offdiagonal_weight', 'margin', 'entropy_weight'
    for name in names:
      if not getattr(self, name) >= 0:
        raise ValueError(
          f'consistency.{name}={getattr(self, name)!r} must be >= 0'
        )
    if not 0 <= self.entropy_cap <= 1:
      raise ValueError(
        f'consistency.entropy_cap={self.entropy_cap!r} must be in [0, 1] '
        '(a fraction of ln E)'
      )

  @classmethod
  def from_config(cls, cfg) -> ConsistencyOptions:
    """From config.consistency; keys that are not options are ignored."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in dict(cfg).items() if k in names})


STOP_GRADIENT = ('none', 'view1', 'view2')


def matched_pairs(
  logits_v1: Array,
  logits_v2: Array,
  map_12: Array,
  map_21: Array,
  cls_v1: Array | None = None,
  cls_v2: Array | None = None,
) -> tuple[Array, Array, Array]:
  """Router logits of corresponding tokens, view 1 first, as pairs.

  Every patch i of view 1 with a match j = map_12[i] >= 0 gives the pair
  (view 1 patch i, view 2 patch j); every patch j of view 2 with a match
  i = map_21[j] gives (view 1 patch i, view 2 patch j). Both directions are
  kept (the maps are not inverse permutations when the crops differ in
  scale). With class tokens, (cls_v1, cls_v2) is one more pair per image.

  Args:
    logits_v1: (B, P, E) router logits of view 1's patches.
    logits_v2: (B, P, E) the same for view 2.
    map_12: (B, P) int, index into view 2's patches, -1 for no match.
    map_21: (B, P) int, index into view 1's patches, -1 for no match.
    cls_v1: optional (B, E) router logits of view 1's class token.
    cls_v2: optional (B, E) the same for view 2.

  Returns:
    a: (B, N, E) view-1 logits, b: (B, N, E) view-2 logits, valid: (B, N)
    bool; N = 2P (+1 with class tokens).
  """
  a = jnp.concatenate([logits_v1, gather_patches(logits_v1, map_21)], 1)
  b = jnp.concatenate([gather_patches(logits_v2, map_12), logits_v2], 1)
  valid = jnp.concatenate([map_12 >= 0, map_21 >= 0], axis=1)
  if (cls_v1 is None) != (cls_v2 is None):
    raise ValueError('Give the class-token logits of both views or neither.')
  if cls_v1 is not None:
    a = jnp.concatenate([a, cls_v1[:, None]], axis=1)
    b = jnp.concatenate([b, cls_v2[:, None]], axis=1)
    valid = jnp.concatenate([valid, jnp.ones_like(valid[:, :1])], axis=1)
  return a, b, valid


def num_matched_pairs(map_12: Array, map_21: Array, with_cls: bool = False):
  """The number of valid pairs `matched_pairs` gives for these (B, P) maps
  (-1: no match): the matches of both directions, + B when `with_cls`
  (one class-token pair per image); an int32 scalar."""
  count = jnp.sum(map_12 >= 0) + jnp.sum(map_21 >= 0)
  return count + (map_12.shape[0] if with_cls else 0)


def _masked_mean(values: Array, valid: Array) -> Array:
  count = jnp.maximum(jnp.sum(valid), 1).astype(jnp.float32)
  return jnp.sum(jnp.where(valid, values, 0.0)) / count


def _log_probs(a: Array, b: Array, opts: ConsistencyOptions):
  t = opts.temperature
  return (
    jax.nn.log_softmax(a.astype(jnp.float32) / t),
    jax.nn.log_softmax(b.astype(jnp.float32) / t),
  )


def consistency_jsd(a, b, valid, opts):
  """Mean over pairs of JSD(p, q), p = softmax(a / T), q = softmax(b / T).

  [JSD]: JSD(p, q) = 1/2 KL(p || m) + 1/2 KL(q || m), m = (p + q) / 2.
  Rescaling: JSD -> 0 as both logit vectors shrink to 0 (uniform p = q), so
  the router can lower it by flattening instead of agreeing; this loss does
  NOT resist rescaling (kept as the seed paper's baseline).
  """
  lp, lq = _log_probs(a, b, opts)
  return _masked_mean(jensen_shannon(lp, lq), valid)


def consistency_sym_kl(a, b, valid, opts):
  """Mean over pairs of the symmetric KL, 1/2 [KL(p || q) + KL(q || p)].

  Equal to 1/2 sum_e (p_e - q_e)(log p_e - log q_e), computed in log space.
  Rescaling: 0 at uniform p = q, so like JSD it can be met by flattening.
  """
  lp, lq = _log_probs(a, b, opts)
  value = 0.5 * jnp.sum((jnp.exp(lp) - jnp.exp(lq)) * (lp - lq), axis=-1)
  return _masked_mean(value, valid)


def consistency_l2(a, b, valid, opts):
  """Mean over pairs of the squared Euclidean distance ||p - q||^2 in [0, 2].

  Squared (smooth at p = q; [PRC]'s code takes a square root with an
  epsilon). Rescaling: 0 at uniform p = q, so it can be met by flattening.
  """
  lp, lq = _log_probs(a, b, opts)
  value = jnp.sum(jnp.square(jnp.exp(lp) - jnp.exp(lq)), axis=-1)
  return _masked_mean(value, valid)


def consistency_hard_target(a, b, valid, opts):
  """Symmetric cross-entropy to the other view's top-1 expert.

  loss = 1/2 [CE(p, onehot(argmax q)) + CE(q, onehot(argmax p))], the
  targets carry no gradient (argmax). Rescaling: CE to a one-hot target is
  smallest for a one-hot p and equals ln E for a uniform p, so flattening
  raises it; along logits s * z, dCE/ds at s -> 0 is -(z_t - mean_e z_e) < 0
  whenever the target logit z_t is above the mean: the loss pushes matched
  routers that agree to be sharper, not flatter.
  """
  lp, lq = _log_probs(a, b, opts)
  num_experts = a.shape[-1]
  target_p = jax.nn.one_hot(jnp.argmax(lq, -1), num_experts)
  target_q = jax.nn.one_hot(jnp.argmax(lp, -1), num_experts)
  value = -0.5 * (
    jnp.sum(target_p * lp, axis=-1) + jnp.sum(target_q * lq, axis=-1)
  )
  return _masked_mean(value, valid)


def _top1_gap(logits: Array, target: Array) -> Array:
  """z_target - max_{e != target} z_e, per row."""
  num_experts = logits.shape[-1]
  is_target = jax.nn.one_hot(target, num_experts, dtype=bool)
  z_t = jnp.sum(jnp.where(is_target, logits, 0.0), axis=-1)
  z_other = jnp.max(jnp.where(is_target, -jnp.inf, logits), axis=-1)
  return z_t - z_other


def consistency_margin(a, b, valid, opts):
  """Hinge on the logit gap of the consensus expert of each matched pair.

  With z = logits / T of the two views and the consensus expert
  t = argmax_e (p_e + q_e) (no gradient),
    loss = 1/2 [max(0, m - g(z1)) + max(0, m - g(z2))],
    g(z) = z_t - max_{e != t} z_e.
  Both views must put the same expert first by at least the margin m.
  Rescaling: a uniform router has g = 0 and pays m, so flattening is the
  worst case, not an escape. Scaling logits up helps only pairs that already
  agree (for a disagreeing pair one g < 0 and grows more negative), so the
  router cannot meet the margin by rescaling without agreeing.
  """
  t = opts.temperature
  z1 = a.astype(jnp.float32) / t
  z2 = b.astype(jnp.float32) / t
  target = jnp.argmax(
    jax.lax.stop_gradient(jax.nn.softmax(z1) + jax.nn.softmax(z2)), axis=-1
  )
  hinge = lambda z: jax.nn.relu(opts.margin - _top1_gap(z, target))
  value = 0.5 * (hinge(z1) + hinge(z2))
  return _masked_mean(value, valid)


def consistency_jsd_entropy(a, b, valid, opts):
  """JSD plus an entropy cap on both routers of each pair.

  loss = JSD(p, q) + w/2 [max(0, H(p)/ln E - c) + max(0, H(q)/ln E - c)],
  w = entropy_weight, c = entropy_cap. Rescaling: flattening drives JSD to 0
  but H/ln E to 1, which costs w (1 - c); with w (1 - c) larger than the JSD
  it saves (at most ln 2), the flat router is not the cheaper solution.
  """
  lp, lq = _log_probs(a, b, opts)
  log_e = math.log(a.shape[-1])

  def excess(lx):
    h = -jnp.sum(jnp.exp(lx) * lx, axis=-1) / log_e
    return jax.nn.relu(h - opts.entropy_cap)

  value = jensen_shannon(lp, lq) + 0.5 * opts.entropy_weight * (
    excess(lp) + excess(lq)
  )
  return _masked_mean(value, valid)


def cross_correlation_matrix(a, b, valid, temperature=1.0) -> Array:
  """C = E / N sum over valid pairs of p q^T, (E, E) ([PRC]).

  p = softmax(a / T) (view 1), q = softmax(b / T) (view 2), N the number of
  valid pairs. C_ee = 1 for every e exactly when every pair agrees one-hot
  and each expert takes 1/E of the pairs.
  """
  num_experts = a.shape[-1]
  p, q = (
    jax.nn.softmax(x.astype(jnp.float32) / temperature).reshape(-1, num_experts)
    for x in (a, b)
  )
  w = valid.reshape(-1, 1).astype(jnp.float32)
  count = jnp.maximum(jnp.sum(w), 1.0)
  return num_experts * (p * w).T @ q / count


def consistency_cross_correlation(a, b, valid, opts):
  """[PRC]'s Barlow-Twins loss on the cross-correlation of router outputs.

  With C = cross_correlation_matrix (E / N sum_pairs p q^T, as in [PRC]'s
  code: the softmax of each view's router, scaled by E so that a balanced,
  perfectly agreeing one-hot routing has C = I):
    loss = diagonal_weight * mean_e (C_ee - 1)^2
         + offdiagonal_weight * mean_{e != f} C_ef^2
  ([Barlow] Eq. 1 with means instead of sums, as [PRC]'s
  `matrix_top1_diagonal` and `matrix_top1_offdiagonal` compute it). Unlike
  [PRC], pairs come from both directions of the patch maps (matched_pairs).
  Rescaling: flat routers give C_ef = 1/E everywhere, so the diagonal term
  is (1 - 1/E)^2, its maximum over balanced routings; only sharp, agreeing
  and balanced routers reach 0. It is a batch-level loss, not a mean of
  per-pair terms.
  """
  c = cross_correlation_matrix(a, b, valid, opts.temperature)
  num_experts = c.shape[0]
  eye = jnp.eye(num_experts, dtype=bool)
  diagonal = jnp.mean(jnp.square(jnp.diagonal(c) - 1.0))
  off = jnp.sum(jnp.where(eye, 0.0, jnp.square(c))) / max(
    num_experts * (num_experts - 1), 1
  )
  return opts.diagonal_weight * diagonal + opts.offdiagonal_weight * off


# The one registry of consistency losses: name -> f(a, b, valid, options),
# a/b: (..., E) router logits of view 1 / view 2 of matched pairs.
CONSISTENCY_LOSSES = {
  'jsd': consistency_jsd,
  'sym_kl': consistency_sym_kl,
  'l2': consistency_l2,
  'cross_correlation': consistency_cross_correlation,
  'hard_target': consistency_hard_target,
  'margin': consistency_margin,
  'jsd_entropy': consistency_jsd_entropy,
}


def router_consistency(
  logits_v1: Array,
  logits_v2: Array,
  map_12: Array,
  map_21: Array,
  temperature: float = 1.0,
  options: ConsistencyOptions | None = None,
  cls_v1: Array | None = None,
  cls_v2: Array | None = None,
) -> tuple[Array, Array]:
  """The consistency loss of corresponding patches of two views.

  Pairs come from `matched_pairs` (both map directions, optional class-token
  pair); the loss is `options.loss` from CONSISTENCY_LOSSES (default: the
  mean JSD over matched pairs, [JSD]); pairs whose patch falls outside the
  other view are ignored. `options.stop_gradient` makes one view a fixed
  target.

  Args:
    logits_v1: (B, P, E) clean router logits of the patches of view 1.
    logits_v2: (B, P, E) the same for view 2.
    map_12: (B, P) int, index into view 2's patches, -1 for no match.
    map_21: (B, P) int, index into view 1's patches, -1 for no match.
    temperature: > 0; used when `options` is None.
    options: the loss and its options (default: JSD at `temperature`).
    cls_v1: optional (B, E) router logits of view 1's class token.
    cls_v2: optional (B, E) the same for view 2.

  Returns:
    (loss (0 when there is no pair), number of matched pairs).
  """
  if options is None:
    options = ConsistencyOptions(temperature=temperature)
  a, b, valid = matched_pairs(
    logits_v1, logits_v2, map_12, map_21, cls_v1, cls_v2
  )
  if options.stop_gradient == 'view1':
    a = jax.lax.stop_gradient(a)
  elif options.stop_gradient == 'view2':
    b = jax.lax.stop_gradient(b)
  count = jnp.sum(valid)
  value = CONSISTENCY_LOSSES[options.loss](a, b, valid, options)
  return jnp.where(count > 0, value, 0.0), count

"""What every evaluation shares: the batches of a split, stopping between
them, float64 sums over batches, the router logits of the evaluation model
and the two evaluation views of each example.

Padding (the last batch, and on many hosts whole batches, see
data/eval_padding.py) never counts: every per-batch function returns sums
masked by `mask`, so batches and processes add up exactly. The two views of
an example are drawn with a key folded from its position in the split, so
no figure depends on the batch size, the padding or the number of processes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from vmoe_jsd import augment, models, streams

Array = jax.Array


def eval_batches(dataset, batch_size: int, limit: int | None = None):
  """This process's evaluation batches (padded alike on every process)."""
  return dataset.eval_batches(
    batch_size,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    limit=limit,
  )


class StoppableSplit:
  """A test split whose `eval_batches` end early once should_stop() says so.

  Asked between batches (never before the first nor after the last: a
  request then is seen at the train step's own check, the evaluation
  complete). After a stop, `stopped` is True and every later `eval_batches`
  is empty: the figures of an evaluation over it are of the batches before
  the stop, for the caller to discard. On several processes should_stop
  must give the same answer on all (PreemptionGuard.should_stop does);
  their batch counts are equal (padded alike).

  Attributes:
    dataset: the split.
    stopped: whether should_stop ended an iteration.
  """

  def __init__(self, dataset, should_stop: Callable[[], bool]):
    self.dataset, self.should_stop, self.stopped = dataset, should_stop, False

  def eval_batches(self, *args, **kwargs) -> Iterator[dict]:
    for i, batch in enumerate(self.dataset.eval_batches(*args, **kwargs)):
      if self.stopped or (i and self.should_stop()):
        self.stopped = True
        return
      yield batch

  def __len__(self) -> int:
    return len(self.dataset)

  def __getattr__(self, name):
    return getattr(self.dataset, name)


class EvaluationStopped(Exception):
  """A stop request ended an evaluation between two batches."""


class RaisingSplit(StoppableSplit):
  """A StoppableSplit that raises EvaluationStopped where it would end
  early: for evaluations that read the split several times or on their own
  terms (few-shot, the robustness suites), whose partial figures the caller
  could not tell from complete ones. The same batch on every process."""

  def eval_batches(self, *args, **kwargs) -> Iterator[dict]:
    yield from super().eval_batches(*args, **kwargs)
    if self.stopped:
      raise EvaluationStopped


def sum_over_batches(
  step_fn: Callable[[np.int32, Mapping], Mapping[str, Array]],
  batches: Iterable[Mapping],
) -> dict[str, np.ndarray]:
  """Sums, in float64 on the host, the per-batch sums of `step_fn`.

  Args:
    step_fn: (batch index, host batch) -> {name: device sum}; it puts the
      batch on the devices itself.
    batches: host batches.

  Returns:
    {name: float64 total}.
  """
  totals: dict[str, np.ndarray] = {}
  for i, batch in enumerate(batches):
    sums = jax.device_get(step_fn(np.int32(i), batch))
    for k, v in sums.items():
      totals[k] = totals.get(k, 0) + np.asarray(v, np.float64)
  return totals


def group_real_tokens(mask: Array, num_groups: int) -> Array:
  """Real (unpadded) tokens of each routing group, (G,) float32.

  The model splits the batch's B * T tokens, in order, into G groups of
  S = B * T / G tokens (vit_moe.MlpMoeBlock): example b holds the flat
  positions [b * T, (b + 1) * T).

  Args:
    mask: (B,) bool, False for padding examples.
    num_groups: G; B * T must be a multiple of it.

  Returns:
    (G,) float32 w_g = (real tokens of group g) * G / T: proportional to the
    count, with a factor that is the same for every group and batch, so
    weighted means are exact. (Scaled by G / T, example b covers [b * G,
    (b + 1) * G) and group g covers [g * B, (g + 1) * B).)
  """
  # Repeat each example G times instead of T: the flat layout then has the
  # same proportions, and G rows of B entries are the groups.
  scaled = jnp.repeat(mask.astype(jnp.float32), num_groups)  # (B * G,)
  return jnp.sum(scaled.reshape(num_groups, -1), axis=1)


def router_logits(eval_model, params, views, layers) -> dict:
  """{block: (G, S, E) clean router logits} of (N, S, S, C) views in [0, 1]."""
  _, state = eval_model.apply(
    {'params': params}, augment.to_model_range(views), mutable=['intermediates']
  )
  return models.router_logits_by_layer(state['intermediates'], layers)


def apply_with_router_logits(eval_model, params, inputs, layers):
  """(logits (N, classes), {block: (G, S, E) router logits}) of model inputs
  (N, S, S, C) in [-1, 1], from one forward pass (robustness, attacks)."""
  (logits, _), state = eval_model.apply(
    {'params': params}, inputs, mutable=['intermediates']
  )
  return logits, models.router_logits_by_layer(state['intermediates'], layers)


def router_logits_of_views(eval_model, params, views, layers) -> dict:
  """Router logits per MoE layer for paired views.

  Args:
    eval_model: the deterministic model.
    params: its parameters.
    views: (n, 2, H, W, C) views in [0, 1] (augment.paired_views).
    layers: the MoE block indices to read.

  Returns:
    {block: logits} for the 2n images in view-major-within-image order
    (image 0 view 1, image 0 view 2, image 1 view 1, ...).
  """
  flat = views.reshape(-1, *views.shape[2:])
  return router_logits(eval_model, params, flat, layers)


def evaluation_views(views_key, images, index, mask, settings):
  """The two random views of each example, keyed by its position in the
  split (padding: position 0), and their patch maps."""
  keys = streams.example_keys(views_key, jnp.where(mask, index, 0))
  return jax.vmap(lambda k, im: augment.paired_views(k, im, settings))(
    keys, images
  )


def ratio(num, den) -> float | None:
  """num / den as a float; None (null in the JSON) when den is 0."""
  return float(num / den) if den else None


def dash(value, spec: str = '.3f') -> str:
  """A console-table cell: `value` formatted, '-' for a missing number."""
  return '-' if value is None else format(value, spec)

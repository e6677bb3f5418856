"""Which expert each class's patches go to: top-1 counts per class and
expert on the clean evaluation view (analyze's expert_by_class figure; the
class-specialisation view of V-MoE, Riquelme et al., NeurIPS 2021, Sec. 6).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vmoe_jsd import augment, models
from vmoe_jsd.evaluation import core
from vmoe_jsd.models.spec import ModelSpec


def make_class_counts_fn(
  eval_model, model: ModelSpec, settings, num_classes: int
):
  """jit-able (params, images, labels, mask) -> {block: (classes, E) counts}.

  Counts the patch tokens of the clean evaluation view of each class whose
  top-1 expert is each expert.
  """
  layers, prefix = model.moe_layers, model.num_prefix_tokens

  def fn(params, images, labels, mask):
    center = jax.vmap(lambda im: augment.center_view(im, settings))(images)
    by_layer = core.router_logits(eval_model, params, center, layers)
    cls = jax.nn.one_hot(labels, num_classes) * mask[:, None]  # (B, C)
    out = {}
    for b, lg in by_layer.items():
      patches = models.per_image_patches(lg, images.shape[0], prefix)
      experts = jax.nn.one_hot(jnp.argmax(patches, -1), lg.shape[-1])
      out[b] = jnp.einsum('bc,bpe->ce', cls, experts)
    return out

  return fn


def build(ctx):
  """The registry's run: {block: (classes, E) float64 top-1 counts} over
  the evaluated test images."""
  spec = ctx.spec
  model = spec.model
  count_fn = jax.jit(
    make_class_counts_fn(ctx.eval_model, model, spec.views, model.num_classes)
  )
  fields = ('image', 'label', 'mask')

  def run(params, split, should_stop):
    del should_stop  # split raises on a stop.
    return core.sum_over_batches(
      lambda _, b: count_fn(params, *ctx.put_batch(*(b[f] for f in fields))),
      core.eval_batches(split, ctx.batch_size, spec.evaluate.limit),
    )

  return run


def table(counts) -> str:
  """Each layer's top-1 share of every expert per class, one row a class."""
  rows = []
  for block, c in sorted(counts.items()):
    share = c / c.sum(1, keepdims=True).clip(min=1)
    rows.append(f'encoderblock_{block}: top-1 share per class (rows)')
    rows += ['  ' + ' '.join(f'{x:.2f}' for x in r) for r in share]
  return '\n'.join(rows)

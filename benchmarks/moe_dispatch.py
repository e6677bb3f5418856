r"""One MoE layer, forward + backward: dispatchers side by side with vmoe's.

  python benchmarks/moe_dispatch.py [--group_sizes=1024,4096] [--repeats=5]

8192 tokens of width D=192 (MLP 768), E=8 experts, K=2, capacity factor
1.25, groups of S tokens; the experts are a plain two-layer GELU MLP so
that only dispatch and combine differ. Variants:
  einsum      vmoe_jsd's einsum dispatcher (boolean one-hot, fused)
  einsum_old  the previous vmoe_jsd einsum dispatcher: dispatch and combine
              (G, S, E, C) tensors from float einsums over K (kept here)
  indices     vmoe_jsd's indices dispatcher
  vmoe_einsum / vmoe_indices  google-research/vmoe's own dispatchers, when
              /work/anchors/google-research+vmoe imports.
Prints the median wall time of the jitted fwd+bwd (after compilation) and
XLA's temp memory of the forward and of fwd+bwd (memory_analysis).
"""

import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from einops import rearrange

# Measure the code of this checkout, not whatever vmoe_jsd is installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from vmoe_jsd.models import moe  # noqa: E402 - after the path above

_GROUPS = flags.DEFINE_list('group_sizes', ['1024', '4096'], 'S values')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'timed repetitions')
_VARIANTS = flags.DEFINE_list('variants', None, 'subset of the variants')
_VMOE = flags.DEFINE_string(
  'vmoe_path', '/work/anchors/google-research+vmoe', 'vmoe checkout'
)

TOKENS, DIM, MLP, EXPERTS, K, CF = 8192, 192, 768, 8, 2, 1.25


def _old_einsum_dispatcher(gates, capacity):
  """The einsum dispatcher as it was before (float einsums over K)."""
  top_gate, expert_index, buffer_index = jax.vmap(
    lambda g: moe.top_experts_per_item(g, K, False)
  )(gates)
  combine = jnp.where(buffer_index < capacity, top_gate, 0.0)
  expert_oh = jax.nn.one_hot(expert_index, EXPERTS, dtype=gates.dtype)
  slot_oh = jax.nn.one_hot(buffer_index, capacity, dtype=gates.dtype)
  dispatch = jnp.einsum('GSKE,GSKC->GSEC', expert_oh, slot_oh) > 0
  combine_w = jnp.einsum('GSKE,GSKC,GSK->GSEC', expert_oh, slot_oh, combine)
  return moe.EinsumDispatcher(dispatch, combine_w)


def _layer(variant, group_size):
  capacity = moe.compute_capacity(K * group_size, EXPERTS, CF)

  def make(gates):
    if variant in ('einsum', 'indices'):
      return moe.make_top_k_dispatcher(
        gates, K, name=variant, capacity_factor=CF
      )[0]
    if variant == 'einsum_old':
      return _old_einsum_dispatcher(gates, capacity)
    # vmoe is an optional checkout put on sys.path by main (--vmoe_path).
    import vmoe.moe  # noqa: PLC0415 - optional, from --vmoe_path at run time

    name = variant.split('_')[1]
    return jax.vmap(
      lambda g: vmoe.moe.get_top_experts_per_item_dispatcher(
        g, name, K, capacity=capacity, batch_priority=False
      )
    )(gates)

  def loss(params, x):
    w_router, w1, w2 = params
    groups = x.reshape(-1, group_size, DIM)
    gates = jax.nn.softmax(groups @ w_router)
    dispatcher = make(gates)
    # vmoe's vmapped dispatcher fields carry G; its methods take (G, S, D)
    # and give its expert layout (E, G * C, D). Ours give (G, E, C, D), laid
    # out expert-major for the experts as in the model (moe._local_moe).
    buffers = dispatcher.dispatch(groups)
    ours = buffers.ndim == 4
    if ours:
      num_groups = buffers.shape[0]
      buffers = rearrange(buffers, 'g e c d -> e (g c) d')
    hidden = jax.nn.gelu(jnp.einsum('END,EDF->ENF', buffers, w1))
    out = jnp.einsum('ENF,EFD->END', hidden, w2)
    if ours:
      out = rearrange(out, 'e (g c) d -> g e c d', g=num_groups)
    y = dispatcher.combine(out)
    return jnp.mean(jnp.square(y))

  return loss


def main(_):
  variants = ['einsum', 'einsum_old', 'indices']
  if os.path.isdir(_VMOE.value):
    sys.path.insert(0, _VMOE.value)
    try:
      import vmoe.moe  # noqa: F401, PLC0415 - optional, from --vmoe_path

      variants += ['vmoe_einsum', 'vmoe_indices']
    except Exception as e:  # noqa: BLE001 - report and go on without it.
      print(f'vmoe does not import ({e!r}); compared to einsum_old only')
  if _VARIANTS.value:
    variants = [v for v in variants if v in _VARIANTS.value]
  keys = jax.random.split(jax.random.key(0), 4)
  params = (
    jax.random.normal(keys[0], (DIM, EXPERTS)) * 0.1,
    jax.random.normal(keys[1], (EXPERTS, DIM, MLP)) * DIM**-0.5,
    jax.random.normal(keys[2], (EXPERTS, MLP, DIM)) * MLP**-0.5,
  )
  x = jax.random.normal(keys[3], (TOKENS, DIM))
  print(
    f'{jax.devices()[0].platform}: {TOKENS} tokens, D={DIM}, MLP={MLP}, '
    f'E={EXPERTS}, K={K}, cf={CF}'
  )
  print(
    f'{"S":>5} {"variant":<13} {"fwd+bwd ms":>10} {"fwd temp MiB":>12} '
    f'{"fwd+bwd temp MiB":>16} {"loss":>12}'
  )
  for group_size in (int(s) for s in _GROUPS.value):
    for variant in variants:
      loss = _layer(variant, group_size)
      fwd = jax.jit(loss).lower(params, x).compile()
      grad = jax.jit(jax.value_and_grad(loss)).lower(params, x).compile()
      value = float(grad(params, x)[0])
      times = []
      for _ in range(_REPEATS.value):
        t = time.perf_counter()
        jax.block_until_ready(grad(params, x))
        times.append(time.perf_counter() - t)
      mib = lambda c: c.memory_analysis().temp_size_in_bytes / 2**20  # noqa: E731
      print(
        f'{group_size:>5} {variant:<13} {np.median(times) * 1e3:>10.1f} '
        f'{mib(fwd):>12.1f} {mib(grad):>16.1f} {value:>12.8f}',
        flush=True,
      )


if __name__ == '__main__':
  app.run(main)

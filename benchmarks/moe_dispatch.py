r"""One MoE layer, forward + backward: ours beside vmoe's, interleaved.

  python benchmarks/moe_dispatch.py [--suites=layer,dispatch] \
      [--group_sizes=256,1024,4096] [--rounds=5] [--per_visit=2] \
      [--vmoe_path=VMOE_DIR --vit_path=VIT_JAX_DIR]

8192 tokens of width D=192 (MLP 768), E=8 experts, K=2, capacity factor
1.25, groups of S tokens, loss mean(y^2) (+ the auxiliary loss), gradients
with respect to the parameters and the input: the shape of
../shared/bench/side_by_side.py --suites layer.

Suites:
  layer     the model's MoE layer (models.MlpMoeBlock: router with noise and
            auxiliary losses, moe.sparse_moe, vit_moe.expert_mlp), one
            device, for both dispatchers; beside google-research/vmoe's
            MlpMoeBlock on the same parameters and keys when --vmoe_path
            (default $VMOE_SRC) imports (vmoe also needs vit_jax,
            --vit_path or $VIT_JAX_SRC, and pandas + cachetools), and
            always beside `plain`: the same dispatcher with a hand-written
            (E, G * C, D) expert MLP and a noise-free router, the layout
            vmoe runs its experts in. A model layer slower or bigger than
            `plain` or vmoe is a regression of the layer's wiring, not of
            the dispatcher (issue 15: a 5-D expert einsum cost 1.15x and
            120 MiB of forward temp memory against 75).
  dispatch  the dispatchers alone with the plain experts: einsum, the
            earlier einsum_old (float (G, S, E, C) tensors from einsums
            over K), indices, and vmoe's own dispatchers when vmoe imports.

Every program is compiled first; then each round runs every program
--per_visit times in an order rotated by the round, so all see the same
machine load. Printed: the median over rounds, the ratio to vmoe (or to
plain) as the median of per-round ratios, and XLA's temp memory of the
forward and of forward + backward (memory_analysis, exact).
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
from vmoe_jsd import cli, models  # noqa: E402 - after the path above
from vmoe_jsd.models import moe  # noqa: E402 - after the path above

_SUITES = flags.DEFINE_list('suites', ['layer', 'dispatch'], 'suites to run')
_GROUPS = flags.DEFINE_list('group_sizes', ['256', '1024', '4096'], 'S values')
_ROUNDS = flags.DEFINE_integer(
  'rounds', 5, 'interleaved timing rounds', lower_bound=1
)
_PER_VISIT = flags.DEFINE_integer(
  'per_visit', 2, 'steps per program a round', lower_bound=1
)
_VARIANTS = flags.DEFINE_list('variants', None, 'subset of the variants')
_VMOE = flags.DEFINE_string(
  'vmoe_path',
  os.environ.get('VMOE_SRC', '/work/anchors/google-research+vmoe'),
  'directory holding the vmoe/ package (google-research/vmoe checkout)',
)
_VIT = flags.DEFINE_string(
  'vit_path', os.environ.get('VIT_JAX_SRC', ''), 'directory holding vit_jax/'
)

TOKENS, DIM, MLP, EXPERTS, K, CF = 8192, 192, 768, 8, 2, 1.25
DISPATCHERS = ('einsum', 'indices')


def _import_vmoe():
  """vmoe's moe and vit_moe modules, or None (with the reason printed)."""
  if not os.path.isdir(_VMOE.value):
    print(f'no vmoe checkout at {_VMOE.value}: compared to plain only')
    return None
  sys.path.insert(0, _VMOE.value)
  if _VIT.value:
    sys.path.insert(1, _VIT.value)
  try:
    # Optional checkouts put on sys.path just above, at run time.
    import vmoe.moe  # noqa: PLC0415
    from vmoe.nn import vit_moe  # noqa: PLC0415
  except Exception as e:  # noqa: BLE001 - report and go on without it.
    print(f'vmoe does not import ({e!r}): compared to plain only')
    return None
  return vmoe.moe, vit_moe


# ----------------------------------------------------------------------------
# Suite 'dispatch': the dispatchers with plain (E, G * C, D) experts.
# ----------------------------------------------------------------------------
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


def _plain_loss(variant, group_size, vmoe_moe):
  """loss(params, x) of a layer with plain experts and `variant` dispatch."""
  capacity = moe.compute_capacity(K * group_size, EXPERTS, CF)

  def make(gates):
    if variant in DISPATCHERS:
      return moe.make_top_k_dispatcher(
        gates, K, name=variant, capacity_factor=CF
      )[0]
    if variant == 'einsum_old':
      return _old_einsum_dispatcher(gates, capacity)
    name = variant.split('_')[1]
    return jax.vmap(
      lambda g: vmoe_moe.get_top_experts_per_item_dispatcher(
        g, name, K, capacity=capacity, batch_priority=False
      )
    )(gates)

  def loss(params, x):
    w_router, w1, w2 = params
    groups = x.reshape(-1, group_size, DIM)
    dispatcher = make(jax.nn.softmax(groups @ w_router))
    # vmoe's vmapped dispatchers take (G, S, D) and give its expert layout
    # (E, G * C, D); ours give (G, E, C, D), laid out expert-major here.
    buffers = dispatcher.dispatch(groups)
    ours = buffers.ndim == 4
    if ours:
      num_groups = buffers.shape[0]
      buffers = rearrange(buffers, 'g e c d -> e (g c) d')
    hidden = jax.nn.gelu(jnp.einsum('END,EDF->ENF', buffers, w1))
    out = jnp.einsum('ENF,EFD->END', hidden, w2)
    if ours:
      out = rearrange(out, 'e (g c) d -> g e c d', g=num_groups)
    return jnp.mean(jnp.square(dispatcher.combine(out)))

  return loss


def _plain_params():
  keys = jax.random.split(jax.random.key(0), 4)
  params = (
    jax.random.normal(keys[0], (DIM, EXPERTS)) * 0.1,
    jax.random.normal(keys[1], (EXPERTS, DIM, MLP)) * DIM**-0.5,
    jax.random.normal(keys[2], (EXPERTS, MLP, DIM)) * MLP**-0.5,
  )
  return params, jax.random.normal(keys[3], (TOKENS, DIM))


def dispatch_programs(group_size, vmoe_mods):
  variants = ['einsum', 'einsum_old', 'indices']
  if vmoe_mods:
    variants += ['vmoe_einsum', 'vmoe_indices']
  params, x = _plain_params()
  progs = []
  for variant in variants:
    loss = _plain_loss(variant, group_size, vmoe_mods and vmoe_mods[0])
    progs.append(_program(f'{variant}', group_size, loss, params, x))
  return progs


# ----------------------------------------------------------------------------
# Suite 'layer': the model's MoE layer beside vmoe's and beside plain.
# ----------------------------------------------------------------------------
def _router(dispatcher):
  return dict(
    num_selected_experts=K, noise_std=1.0, importance_loss_weight=0.005,
    load_loss_weight=0.005,
    dispatcher=dict(name=dispatcher, capacity_factor=CF, batch_priority=False),
  )  # fmt: skip


def _block_loss(block_cls, dispatcher, group_size):
  """loss(params, x) of one MlpMoeBlock, as side_by_side.py's layer suite."""
  layer = block_cls(
    mlp_dim=MLP, num_experts=EXPERTS, group_size=group_size,
    deterministic=False, split_rngs=False, router=_router(dispatcher),
  )  # fmt: skip
  rngs = {'gating': jax.random.PRNGKey(3), 'dropout': jax.random.PRNGKey(4)}

  def forward(params, x):
    y, metrics = layer.apply({'params': params}, x, rngs=rngs)
    return y, jnp.mean(metrics['auxiliary_loss'])

  def loss(params, x):
    y, aux = forward(params, x)
    return jnp.mean(y * y) + aux

  return layer, forward, loss


def layer_programs(group_size, vmoe_mods):
  """Programs (ours, vmoe's, plain) x dispatchers at one group size."""
  x = jax.device_put(
    np.random.default_rng(0).standard_normal(
      (TOKENS // group_size, group_size, DIM), dtype=np.float32
    )
  )
  init_rngs = {
    'params': jax.random.PRNGKey(0),
    'gating': jax.random.PRNGKey(1),
    'dropout': jax.random.PRNGKey(2),
  }
  layer, _, _ = _block_loss(models.MlpMoeBlock, 'einsum', group_size)
  params = jax.jit(layer.init)(init_rngs, x)['params']
  plain_params, plain_x = _plain_params()
  progs = []
  for dispatcher in DISPATCHERS:
    _, fwd, loss = _block_loss(models.MlpMoeBlock, dispatcher, group_size)
    ours = _program(f'ours_{dispatcher}', group_size, loss, params, x, fwd)
    progs.append(ours)
    if vmoe_mods:
      block = vmoe_mods[1].MlpMoeBlock
      _, fwd, loss = _block_loss(block, dispatcher, group_size)
      ref = _program(f'vmoe_{dispatcher}', group_size, loss, params, x, fwd)
      ours.check = float(jnp.max(jnp.abs(ours.output - ref.output)))
      progs.append(ref)
    loss = _plain_loss(dispatcher, group_size, None)
    progs.append(
      _program(f'plain_{dispatcher}', group_size, loss, plain_params, plain_x)
    )
  return progs


# ----------------------------------------------------------------------------
# Compile, time interleaved, print.
# ----------------------------------------------------------------------------
class _Program:
  def __init__(self, name, group_size, grad, fwd_mib, grad_mib, output, args):
    self.name, self.group_size, self.grad = name, group_size, grad
    self.fwd_mib, self.grad_mib, self.output = fwd_mib, grad_mib, output
    self.args, self.times, self.check = args, [], None

  def run(self):
    jax.block_until_ready(self.grad(*self.args))


def _program(name, group_size, loss, params, x, forward=None):
  """Compiles loss's forward and its gradient (params and input)."""
  forward = forward or loss
  fwd = jax.jit(forward).lower(params, x).compile()
  grad = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile()
  output = fwd(params, x)
  output = output[0] if isinstance(output, tuple) else output
  mib = lambda c: c.memory_analysis().temp_size_in_bytes / 2**20  # noqa: E731
  return _Program(
    name, group_size, grad, mib(fwd), mib(grad), output, (params, x)
  )


def interleave(progs, rounds, per_visit):
  """Each round runs every program, order rotated; keeps per-round means."""
  for p in progs:
    p.run()  # warm-up
  for r in range(rounds):
    shift = r % len(progs)
    for p in progs[shift:] + progs[:shift]:
      t = time.perf_counter()
      for _ in range(per_visit):
        p.run()
      p.times.append((time.perf_counter() - t) / per_visit)


def _reference(p, by_name):
  """vmoe's program of the same dispatcher, else plain's (or None)."""
  variant = p.name.split('_', 1)[-1]
  if p.name.startswith('ours_'):
    return by_name.get(f'vmoe_{variant}') or by_name.get(f'plain_{variant}')
  if p.name in DISPATCHERS + ('einsum_old',):
    return by_name.get(f'vmoe_{p.name.split("_")[0]}')
  return None


def print_table(progs):
  by_name = {p.name: p for p in progs}
  print(
    '| S | program | fwd+bwd ms (median) | vs | ratio (median per round) |'
    ' fwd temp MiB | fwd+bwd temp MiB | max abs diff of y vs vmoe |'
  )
  print('|---|---|---|---|---|---|---|---|')
  for p in progs:
    ref = _reference(p, by_name)
    ratio, ref_name = '-', '-'
    if ref is not None:
      ratio = f'{np.median(np.divide(p.times, ref.times)):.3f}x'
      ref_name = ref.name
    check = '-' if p.check is None else f'{p.check:.1e}'
    print(
      f'| {p.group_size} | {p.name} | {np.median(p.times) * 1e3:.1f} | '
      f'{ref_name} | {ratio} | {p.fwd_mib:.2f} | {p.grad_mib:.2f} | '
      f'{check} |',
      flush=True,
    )


def main(_):
  vmoe_mods = _import_vmoe()
  print(
    f'{jax.devices()[0].platform}: {TOKENS} tokens, D={DIM}, MLP={MLP}, '
    f'E={EXPERTS}, K={K}, cf={CF}; {_ROUNDS.value} rounds x '
    f'{_PER_VISIT.value} steps per program, interleaved'
  )
  builders = {'layer': layer_programs, 'dispatch': dispatch_programs}
  for suite in _SUITES.value:
    progs = []
    for group_size in (int(s) for s in _GROUPS.value):
      progs += builders[suite](group_size, vmoe_mods)
    if _VARIANTS.value:
      progs = [p for p in progs if p.name in _VARIANTS.value]
    interleave(progs, _ROUNDS.value, _PER_VISIT.value)
    print(f'\n## suite {suite}\n')
    print_table(progs)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)

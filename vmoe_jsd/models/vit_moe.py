"""Vision Transformer with sparse MoE MLP blocks (V-MoE).

Riquelme et al., "Scaling Vision with Sparse Mixture of Experts", NeurIPS
2021 (arXiv:2106.05974), on the ViT of Dosovitskiy et al. (arXiv:2010.11929):
patch embedding, optional class token, position embeddings, pre-LN encoder
blocks whose MLP is replaced by a mixture of MLP experts on chosen blocks,
final LayerNorm, a pooling ('token', 'gap' or 'map' attention pooling), an
optional tanh pre-logits layer and a linear head.

Parameter names and shapes follow google-research/vmoe's `VisionTransformerMoe`
(e.g. `Encoder/encoderblock_1/Moe/Router/dense/kernel`,
`Encoder/encoderblock_1/Moe/Mlp/Dense_0/kernel` with experts stacked on axis
0), so vmoe checkpoints map one to one.

`__call__` returns (logits, metrics). metrics['auxiliary_loss'] has shape (G,):
the auxiliary loss of each routing group summed over the MoE blocks (as in
vmoe); metrics['encoderblock_{i}'] holds that block's router metrics.
Router logits are sown into 'intermediates' (see routing.py).

Mixed precision (`dtype`, e.g. bfloat16; Micikevicius et al., "Mixed
Precision Training", ICLR 2018, arXiv:1710.03740, without loss scaling):
parameters stay float32 and are cast where a layer computes; the encoder
blocks compute in `dtype`, while the residual stream, the embeddings, the
final LayerNorm, the pooling and the head stay float32. Rematerialisation
(`encoder.remat`; Chen et al., "Training Deep Nets with Sublinear Memory
Cost", arXiv:1604.06174) wraps each block in `flax.linen.remat` with a
policy of REMAT_POLICIES. docs/scaling_and_performance.md has the details
(which ops run in which dtype, what each policy saves).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vmoe_jsd.config_errors import lookup
from vmoe_jsd.models import moe, routing

Array = jax.Array
KwArgs = Mapping[str, Any]


class MlpBlock(nn.Module):
  """Transformer MLP: Dense -> GELU -> Dropout -> Dense -> Dropout.

  Attributes:
    mlp_dim: hidden width.
    dropout_rate: dropout after each dense layer.
    deterministic: disables dropout.
    dtype: computation dtype.
  """

  mlp_dim: int
  dropout_rate: float = 0.0
  deterministic: bool = False
  dtype: Any = None

  @nn.compact
  def __call__(self, inputs: Array) -> Array:
    dense = lambda features: nn.Dense(
      features,
      dtype=self.dtype,
      kernel_init=nn.initializers.xavier_uniform(),
      bias_init=nn.initializers.normal(stddev=1e-6),
    )
    x = dense(self.mlp_dim)(inputs)
    x = nn.gelu(x)
    x = nn.Dropout(self.dropout_rate, deterministic=self.deterministic)(x)
    x = dense(inputs.shape[-1])(x)
    return nn.Dropout(self.dropout_rate, deterministic=self.deterministic)(x)


class MlpMoeBlock(nn.Module):
  """Sparse mixture of MLP experts ([V-MoE] Eq. 1-2).

  Tokens of all images are split into groups of `group_size`; each group is
  routed independently; experts run on fixed-capacity buffers, expert
  parallel under a (data, expert) mesh (moe.sparse_moe, in shard_map).

  Dropout inside the experts draws one mask per (expert, group) from
  fold_in(fold_in(key, expert), group) (moe.dropout_keys): the same masks
  whatever the mesh, and different for every expert, so 'dropout' in
  split_rngs has no effect (kept for vmoe config compatibility).

  Attributes:
    mlp_dim: hidden width of every expert.
    num_experts: E.
    group_size: S, tokens per routing group; must divide the batch's tokens.
    dropout_rate: dropout inside the experts.
    deterministic: evaluation mode (no noise, no dropout).
    router: router kwargs; 'name' picks the class (routing.ROUTERS).
    split_rngs: initialise each expert from its own key (vmoe's default is
      False: all experts start identical and diverge through routing). A
      list may name 'params' (and 'dropout', which is ignored, see above).
    dtype: computation dtype.
  """

  mlp_dim: int
  num_experts: int
  group_size: int
  dropout_rate: float = 0.0
  deterministic: bool = False
  router: KwArgs | None = None
  split_rngs: bool | Sequence[str] = False
  dtype: Any = None

  @nn.compact
  def __call__(self, inputs: Array):
    batch_shape, hidden = inputs.shape[:-1], inputs.shape[-1]
    num_tokens = math.prod(batch_shape)
    if num_tokens % self.group_size:
      raise ValueError(
        f'group_size={self.group_size} does not divide the {num_tokens} '
        f'tokens of the batch (shape {inputs.shape})'
      )
    x = inputs.reshape(-1, self.group_size, hidden)  # (G, S, D)
    router_kwargs = dict(self.router or {})
    router_cls = routing.get_router_cls(
      router_kwargs.pop('name', 'NoisyTopExpertsPerItemRouter')
    )
    router_kwargs.setdefault('deterministic', self.deterministic)
    routing_arrays, route = router_cls(
      num_experts=self.num_experts,
      dtype=self.dtype,
      name='Router',
      **router_kwargs,
    )(x, split=True)
    if isinstance(self.split_rngs, bool):
      split_params = self.split_rngs
    else:
      split_params = 'params' in self.split_rngs
    # The vmapped MlpBlock only creates the parameters (names and init as
    # vmoe's: Mlp/Dense_0/kernel stacked on axis 0); the experts run as the
    # pure expert_mlp under moe.sparse_moe.
    experts = nn.vmap(
      MlpBlock,
      in_axes=0,
      out_axes=0,
      variable_axes={'params': 0},
      split_rngs={'params': split_params},
      axis_size=self.num_experts,
    )(mlp_dim=self.mlp_dim, deterministic=True, dtype=self.dtype, name='Mlp')
    if self.is_initializing():
      experts(jnp.zeros((self.num_experts, 1, hidden), x.dtype))
    dropout_key = None
    if not self.deterministic and self.dropout_rate > 0:
      dropout_key = self.make_rng('dropout')
    y, metrics = moe.sparse_moe(
      x,
      routing_arrays,
      experts.variables['params'],
      dropout_key,
      route_fn=route,
      expert_fn=functools.partial(
        expert_mlp, dropout_rate=self.dropout_rate, dtype=self.dtype
      ),
      num_experts=self.num_experts,
    )  # (G, S, D)
    return y.reshape(*batch_shape, y.shape[-1]), metrics


def _dropout(x: Array, keys: Array, rate: float) -> Array:
  """Inverted dropout with one key per leading (E, J, G) entry."""
  keep = 1.0 - rate
  mask = jax.vmap(
    jax.vmap(jax.vmap(lambda k: jax.random.bernoulli(k, keep, x.shape[3:])))
  )(keys)
  return jnp.where(mask, x / keep, jnp.zeros_like(x))


def expert_mlp(
  params, x: Array, keys: Array | None, *, dropout_rate: float, dtype=None
) -> Array:
  """E_loc expert MLPs (MlpBlock's maths) on their (E_loc, J, G, C, D) buffers.

  Args:
    params: {'Dense_0': {'kernel' (E_loc, D, F), 'bias' (E_loc, F)},
      'Dense_1': {...}} as created by the vmapped MlpBlock.
    x: (E_loc, J, G, C, D) buffers of the local experts.
    keys: (E_loc, J, G) dropout keys (moe.dropout_keys) or None.
    dropout_rate: dropout after each dense layer when keys are given.
    dtype: computation dtype (None: the promoted input/param dtype).

  Returns:
    (E_loc, J, G, C, D) outputs.
  """

  # The dense layers see (E_loc, J * G * C, D), as vmoe's vmapped Dense does:
  # on a 5-D einsum XLA:CPU gave the dot and its GELU separate buffers and
  # layout copies (MoE layer forward temp memory 120 MiB against 75, 1.15x
  # the time; benchmarks/moe_dispatch.py). Dropout reads the 5-D view.
  lead = x.shape[:-1]  # (E_loc, J, G, C)

  def dense(p, h):  # (E_loc, N, D) -> (E_loc, N, F)
    h, kernel, bias = nn.dtypes.promote_dtype(
      h, p['kernel'], p['bias'], dtype=dtype
    )
    return jnp.einsum('end,edf->enf', h, kernel) + bias[:, None, :]

  def dropout(h, keys_or_none):
    if keys_or_none is None:
      return h
    h5 = _dropout(h.reshape(*lead, h.shape[-1]), keys_or_none, dropout_rate)
    return h5.reshape(h.shape)

  if keys is not None and dropout_rate > 0:
    keys = jax.vmap(jax.vmap(jax.vmap(lambda k: jax.random.split(k))))(keys)
    first, second = keys[..., 0], keys[..., 1]
  else:
    first = second = None
  flat = x.reshape(x.shape[0], -1, x.shape[-1])
  h = dropout(nn.gelu(dense(params['Dense_0'], flat)), first)
  y = dropout(dense(params['Dense_1'], h), second)
  return y.reshape(*lead, y.shape[-1])


class MapHead(nn.Module):
  """Multi-head attention pooling (Lee et al. 2019; big_vision's MAP head).

  Attributes:
    mlp_dim: MLP width.
    num_heads: attention heads.
    qk_norm: LayerNorm on queries and keys.
  """

  mlp_dim: int
  num_heads: int
  qk_norm: bool = False

  @nn.compact
  def __call__(self, x: Array) -> Array:
    probe = self.param(
      'probe', nn.initializers.xavier_uniform(), (1, 1, x.shape[-1]), x.dtype
    )
    probe = jnp.tile(probe, [x.shape[0], 1, 1])
    x = nn.MultiHeadDotProductAttention(
      num_heads=self.num_heads,
      kernel_init=nn.initializers.xavier_uniform(),
      deterministic=True,
      normalize_qk=self.qk_norm,
      name='MultiHeadDotProductAttention',
    )(inputs_q=probe, inputs_k=x, inputs_v=x)
    y = nn.LayerNorm(name='LayerNorm')(x)
    y = MlpBlock(mlp_dim=self.mlp_dim, deterministic=True, name='Mlp')(y)
    return (x + y)[:, 0, :]


REMAT_POLICIES = {
  'none': None,
  'full': jax.checkpoint_policies.nothing_saveable,
  'dots_saveable': jax.checkpoint_policies.dots_saveable,
  'dots_with_no_batch_dims_saveable': (
    jax.checkpoint_policies.dots_with_no_batch_dims_saveable
  ),
}


def check_remat(remat: str) -> None:
  """Raises ValueError unless `remat` names an entry of REMAT_POLICIES."""
  lookup(REMAT_POLICIES, 'model.encoder.remat', remat, list(REMAT_POLICIES))


def remat_block(block_cls: type[nn.Module], remat: str) -> type[nn.Module]:
  """`block_cls`, wrapped in nn.remat with the named policy unless 'none'.

  Args:
    block_cls: a module class whose __call__ takes only arrays.
    remat: a key of REMAT_POLICIES.

  Returns:
    The class to instantiate (parameter names are unchanged by nn.remat).
  """
  check_remat(remat)
  if remat == 'none':
    return block_cls
  return nn.remat(block_cls, policy=REMAT_POLICIES[remat])


class EncoderBlock(nn.Module):
  """Pre-LN transformer block; its MLP is dense ('Mlp') or an MoE ('Moe').

  Attributes:
    num_heads: attention heads.
    mlp_dim: MLP width (of each expert on MoE blocks).
    moe: MoE kwargs (MlpMoeBlock fields) or None for a dense MLP.
    dropout_rate: dropout after attention and in the MLP.
    attention_dropout_rate: dropout on the attention weights.
    attention_qk_norm: LayerNorm on queries and keys.
    deterministic: evaluation mode.
    dtype: computation dtype.
  """

  num_heads: int
  mlp_dim: int
  moe: KwArgs | None = None
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  attention_qk_norm: bool = False
  deterministic: bool = False
  dtype: Any = None

  @nn.compact
  def __call__(self, inputs: Array):
    x = nn.LayerNorm(dtype=self.dtype)(inputs)
    x = nn.MultiHeadDotProductAttention(
      num_heads=self.num_heads,
      dtype=self.dtype,
      kernel_init=nn.initializers.xavier_uniform(),
      broadcast_dropout=False,
      deterministic=self.deterministic,
      dropout_rate=self.attention_dropout_rate,
      normalize_qk=self.attention_qk_norm,
      force_fp32_for_softmax=True,
      name='SelfAttention',
    )(inputs_q=x, inputs_k=x, inputs_v=x)
    x = nn.Dropout(self.dropout_rate, deterministic=self.deterministic)(x)
    x = x + inputs
    y = nn.LayerNorm(dtype=self.dtype)(x)
    if self.moe is None:
      y = MlpBlock(
        mlp_dim=self.mlp_dim,
        dropout_rate=self.dropout_rate,
        deterministic=self.deterministic,
        dtype=self.dtype,
        name='Mlp',
      )(y)
      return x + y, None
    moe_kwargs = {'mlp_dim': self.mlp_dim, 'dropout_rate': self.dropout_rate}
    moe_kwargs.update(self.moe)
    y, metrics = MlpMoeBlock(
      deterministic=self.deterministic,
      dtype=self.dtype,
      name='Moe',
      **moe_kwargs,
    )(y)
    return x + y, metrics


def sincos2d_embedding(
  height: int, width: int, dim: int, temperature: float = 10_000.0
) -> Array:
  """2-D sine-cosine position embedding (MoCo v3, arXiv:2104.02057), (H*W, D).

  Per axis, D/4 frequencies omega_i = temperature^(-i / (D/4 - 1)); the
  embedding is [sin(x w), cos(x w), sin(y w), cos(y w)].
  """
  if dim % 4 or dim < 8:
    raise ValueError(f'sincos2d needs hidden_size % 4 == 0 and >= 8; got {dim}')
  y, x = jnp.mgrid[:height, :width].astype(jnp.float32)
  omega = jnp.arange(dim // 4, dtype=jnp.float32) / (dim // 4 - 1)
  omega = 1.0 / temperature**omega
  x = jnp.einsum('n,d->nd', x.reshape(-1), omega)
  y = jnp.einsum('n,d->nd', y.reshape(-1), omega)
  return jnp.concatenate(
    [jnp.sin(x), jnp.cos(x), jnp.sin(y), jnp.cos(y)], axis=-1
  )


class AddPositionEmbs(nn.Module):
  """Learned position embedding 'pos_embedding' of shape (1, T, D)."""

  @nn.compact
  def __call__(self, inputs: Array) -> Array:
    pos = self.param(
      'pos_embedding',
      nn.initializers.normal(stddev=0.02),
      (1, inputs.shape[1], inputs.shape[2]),
    )
    return inputs + pos.astype(inputs.dtype)


class EncoderMoe(nn.Module):
  """Transformer encoder with MoE MLPs on the blocks listed in moe['layers'].

  Attributes:
    num_layers: encoder blocks.
    mlp_dim: MLP width.
    num_heads: attention heads.
    dropout_rate: dropout rate.
    attention_dropout_rate: attention dropout rate.
    attention_qk_norm: LayerNorm on queries and keys.
    moe: MoE kwargs, including 'layers' (0-based block indices).
    position_emb: {'name': 'learned' | 'sincos2d' | 'none', ...}.
    patch_grid: (h, w) patch grid, needed by sincos2d.
    num_prefix_tokens: tokens before the patches (1 with a class token);
      they get no sincos2d embedding.
    deterministic: evaluation mode.
    dtype: computation dtype inside the blocks (the residual stream and the
      final LayerNorm stay float32; see the module docstring).
    remat: rematerialisation of each block, a key of REMAT_POLICIES.
  """

  num_layers: int
  mlp_dim: int
  num_heads: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  attention_qk_norm: bool = False
  moe: KwArgs | None = None
  position_emb: KwArgs | None = None
  patch_grid: tuple[int, int] | None = None
  num_prefix_tokens: int = 0
  deterministic: bool = False
  dtype: Any = None
  remat: str = 'none'

  @nn.compact
  def __call__(self, inputs: Array):
    block_cls = remat_block(EncoderBlock, self.remat)
    x = self._add_position_emb(inputs)
    x = nn.Dropout(self.dropout_rate, deterministic=self.deterministic)(x)
    moe_kwargs = dict(self.moe or {})
    moe_layers = tuple(moe_kwargs.pop('layers', ()))
    metrics = {}
    for block in range(self.num_layers):
      name = f'encoderblock_{block}'
      x, block_metrics = block_cls(
        num_heads=self.num_heads,
        mlp_dim=self.mlp_dim,
        moe=moe_kwargs if block in moe_layers else None,
        dropout_rate=self.dropout_rate,
        attention_dropout_rate=self.attention_dropout_rate,
        attention_qk_norm=self.attention_qk_norm,
        deterministic=self.deterministic,
        dtype=self.dtype,
        name=name,
      )(x)
      if block_metrics is not None:
        metrics[name] = block_metrics
    encoded = nn.LayerNorm(name='encoder_norm')(x)
    metrics['auxiliary_loss'] = sum(
      m['auxiliary_loss'] for m in metrics.values()
    )
    return encoded, metrics

  def _add_position_emb(self, inputs: Array) -> Array:
    cfg = dict(self.position_emb or {})
    name = cfg.get('name', 'learned')
    if name == 'none':
      return inputs
    if name == 'learned':
      return AddPositionEmbs(name='posembed_input')(inputs)
    if name == 'sincos2d':
      height, width = self.patch_grid
      emb = sincos2d_embedding(
        height, width, inputs.shape[-1], cfg.get('temperature', 10_000.0)
      ).astype(inputs.dtype)
      prefix = self.num_prefix_tokens
      return jnp.concatenate(
        [inputs[:, :prefix], inputs[:, prefix:] + emb[None]], axis=1
      )
    raise ValueError(
      f"position_emb.name={name!r} is unknown; choose one of ['learned', "
      "'none', 'sincos2d']"
    )


class VisionTransformerMoe(nn.Module):
  """V-MoE: a Vision Transformer with sparse MoE layers.

  Attributes:
    num_classes: classes of the linear head; None or 0 returns the
      pre-logits features.
    patch_size: (ph, pw).
    hidden_size: D.
    encoder: EncoderMoe kwargs (num_layers, mlp_dim, num_heads, moe, ...).
    classifier: 'token' (class token), 'gap' (mean of tokens), 'map'
      (attention pooling) or '0' (the first token, no class token added).
    representation_size: width of an optional tanh pre-logits layer.
    deterministic: evaluation mode (no dropout, no router noise).
    head_bias_init: initial bias of the head.
    head_kernel_zero_init: zero-initialised head kernel (else LeCun normal).
    dtype: computation dtype of the encoder blocks (e.g. jnp.bfloat16), as
      vmoe's encoder dtype; the patch embedding, residual stream, pooling
      and head compute in float32 and params stay float32 (module
      docstring).
  """

  num_classes: int | None
  patch_size: tuple[int, int]
  hidden_size: int
  encoder: KwArgs
  classifier: str = 'token'
  representation_size: int | None = None
  deterministic: bool = False
  head_bias_init: float = 0.0
  head_kernel_zero_init: bool = True
  dtype: Any = None

  @nn.compact
  def __call__(self, images: Array):
    x = nn.Conv(
      self.hidden_size,
      kernel_size=tuple(self.patch_size),
      strides=tuple(self.patch_size),
      padding='VALID',
      name='embedding',
    )(images)
    batch, grid_h, grid_w, hidden = x.shape
    x = x.reshape(batch, grid_h * grid_w, hidden)
    prefix = 0
    if self.classifier == 'token':
      cls = self.param('cls', nn.initializers.zeros, (1, 1, hidden))
      x = jnp.concatenate(
        [jnp.tile(cls.astype(x.dtype), [batch, 1, 1]), x], axis=1
      )
      prefix = 1
    x, metrics = EncoderMoe(
      name='Encoder',
      deterministic=self.deterministic,
      patch_grid=(grid_h, grid_w),
      num_prefix_tokens=prefix,
      dtype=self.dtype,
      **self.encoder,
    )(x)
    if self.classifier in ('token', '0'):
      x = x[:, 0]
    elif self.classifier == 'gap':
      x = jnp.mean(x, axis=1)
    elif self.classifier == 'map':
      x = MapHead(
        num_heads=self.encoder['num_heads'],
        mlp_dim=self.encoder['mlp_dim'],
        qk_norm=self.encoder.get('attention_qk_norm', False),
        name='MapHead',
      )(x)
    else:
      raise ValueError(
        f"classifier={self.classifier!r} is unknown; choose one of ['0', "
        "'gap', 'map', 'token']"
      )
    if self.representation_size is not None:
      x = jnp.tanh(nn.Dense(self.representation_size, name='pre_logits')(x))
    if not self.num_classes:
      return x, metrics
    kernel_init = (
      nn.initializers.zeros
      if self.head_kernel_zero_init
      else nn.linear.default_kernel_init
    )
    logits = nn.Dense(
      self.num_classes,
      kernel_init=kernel_init,
      bias_init=nn.initializers.constant(self.head_bias_init),
      name='head',
    )(x.astype(jnp.float32))
    return logits, metrics

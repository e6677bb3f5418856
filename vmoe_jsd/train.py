"""Training and evaluation of V-MoE with router-consistency learning.

One jitted train step (DESIGN.md):
  1. two augmented views of every image and their patch correspondences,
     on device (augment.batched_paired_views), views of an image adjacent;
     with config.mixup, both views of image i mixed with the same partner
     in its device's shard (augment.mixup; maps stay image i's);
  2. the model on all 2B views; clean router logits leave each MoE layer
     through the 'intermediates' collection;
  3. loss = xent(both views) + auxiliary (importance + load)
            + consistency.weight * mean_layers JSD(router(view1), router(view2))
     over matched patches (Kada et al., MIRU 2023);
  4. optax update.

Random streams are derived from (config.seed, step): augmentation, dropout
and router noise each get their own key, so a resumed run repeats exactly
what an uninterrupted one would have done.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import time
from collections.abc import Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import NamedSharding, PartitionSpec

from vmoe_jsd import (
  analyze,
  augment,
  checkpoints,
  config_lib,
  data,
  evaluate,
  fewshot,
  initialization,
  losses,
  models,
  paths,
  resilience,
  run_files,
  sharding,
  stability,
)
from vmoe_jsd.models import build_model

Array = jax.Array


@flax.struct.dataclass
class TrainState:
  step: Array
  params: Any
  opt_state: Any


# ----------------------------------------------------------------------------
# Optimizer.
# ----------------------------------------------------------------------------
def make_schedule(lr_cfg: Mapping, num_steps: int) -> optax.Schedule:
  """Learning-rate schedule from config.optimizer.learning_rate."""
  name = lr_cfg.get('schedule', 'constant')
  peak = lr_cfg['peak_value']
  end = lr_cfg.get('end_value', 0.0)
  warmup = int(lr_cfg.get('warmup_steps', 0))
  if name == 'constant':
    return optax.constant_schedule(peak)
  warm = optax.linear_schedule(0.0, peak, max(warmup, 1))
  decay_steps = max(num_steps - warmup, 1)
  if name == 'warmup_cosine_decay':
    decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=end / peak)
  elif name == 'warmup_linear_decay':
    decay = optax.linear_schedule(peak, end, decay_steps)
  elif name == 'warmup_rsqrt_decay':
    decay = lambda s: peak * jnp.sqrt(max(warmup, 1) / (s + max(warmup, 1)))
  else:
    raise ValueError(
      f'optimizer.learning_rate.schedule={name!r} is unknown; choose one of '
      f'{config_lib.SCHEDULES}'
    )
  return optax.join_schedules([warm, decay], [warmup])


def _decay_rules(weight_decay) -> list[tuple[str, float]]:
  if weight_decay is None:
    return []
  if isinstance(weight_decay, (int, float)):
    # A single number decays kernels only (not biases, norms, embeddings).
    return [('.*/kernel$', float(weight_decay))] if weight_decay else []
  return [(str(p), float(v)) for p, v in weight_decay]


def make_optimizer(opt_cfg: Mapping, num_steps: int):
  """optax transformation and schedule from config.optimizer.

  Global-norm clipping, then Adam (or SGD with momentum), then decoupled
  weight decay (AdamW, Loshchilov & Hutter 2019) on the parameters matched by
  weight_decay's regexes, all scaled by the learning-rate schedule.
  """
  schedule = make_schedule(opt_cfg['learning_rate'], num_steps)
  parts = []
  clip = (opt_cfg.get('gradient_clip') or {}).get('global_norm')
  if clip:
    parts.append(optax.clip_by_global_norm(clip))
  name = opt_cfg.get('name', 'adamw')
  if name in ('adam', 'adamw'):
    parts.append(
      optax.scale_by_adam(
        b1=opt_cfg.get('b1', 0.9),
        b2=opt_cfg.get('b2', 0.999),
        eps=opt_cfg.get('eps', 1e-8),
      )
    )
  elif name == 'sgd':
    parts.append(optax.trace(decay=opt_cfg.get('momentum', 0.9)))
  else:
    raise ValueError(
      f'optimizer.name={name!r} is unknown; choose one of '
      f'{list(config_lib.OPTIMIZERS)}'
    )
  for pattern, value in _decay_rules(opt_cfg.get('weight_decay')):
    regex = re.compile(pattern)
    parts.append(
      optax.add_decayed_weights(
        value,
        mask=functools.partial(_name_mask, regex),
      )
    )
  parts.append(optax.scale_by_learning_rate(schedule))
  return optax.chain(*parts), schedule


def _name_mask(regex, params):
  return jax.tree_util.tree_map_with_path(
    lambda path, _: bool(
      regex.fullmatch('/'.join(sharding._key_name(k) for k in path))
    ),
    params,
  )


# ----------------------------------------------------------------------------
# Pieces of the step.
# ----------------------------------------------------------------------------
def consistency_loss(
  intermediates,
  maps: Array,
  *,
  layers,
  prefix: int,
  temperature: float = 1.0,
  options: losses.ConsistencyOptions | None = None,
) -> tuple[Array, dict[str, Array]]:
  """Mean over `layers` of the router-consistency loss between the views.

  Args:
    intermediates: the model's sown 'intermediates' on (2B, ...) views with
      the two views of each image adjacent.
    maps: (B, 2, P) patch correspondences.
    layers: MoE blocks to include.
    prefix: tokens before the patches (1 with a class token).
    temperature: softmax temperature (used when `options` is None: JSD).
    options: losses.ConsistencyOptions (loss name, stop-gradient, class
      token...); `include_cls` needs prefix >= 1 (token 0 is the class token).

  Returns:
    (mean loss, {'jsd/encoderblock_i': ..., 'matched_pairs': ...}); the
    per-layer keys keep the name 'jsd/' whatever the loss.
  """
  if options is None:
    options = losses.ConsistencyOptions(temperature=temperature)
  num_images, _, num_patches = maps.shape
  per_layer = {}
  pairs = 0
  for block, logits in models.router_logits_by_layer(
    intermediates, layers
  ).items():
    patches = models.per_image_patches(logits, 2 * num_images, prefix)
    patches = patches.reshape(num_images, 2, num_patches, -1)
    cls = None
    if options.include_cls:
      tokens = logits.reshape(num_images, 2, -1, logits.shape[-1])
      cls = tokens[:, :, 0]  # (B, 2, E)
    value, pairs = losses.router_consistency(
      patches[:, 0],
      patches[:, 1],
      maps[:, 0],
      maps[:, 1],
      options=options,
      cls_v1=None if cls is None else cls[:, 0],
      cls_v2=None if cls is None else cls[:, 1],
    )
    per_layer[f'jsd/encoderblock_{block}'] = value
  mean = sum(per_layer.values()) / len(per_layer)
  return mean, {**per_layer, 'matched_pairs': pairs}


# ----------------------------------------------------------------------------
# Train and eval steps.
# ----------------------------------------------------------------------------
def make_train_step(config, model, tx, schedule, settings):
  """The pure train step: (state, images, labels) -> (state, metrics)."""
  loss_fn = losses.get_classification_loss(config.loss.name)
  cons = config.consistency
  cons_layers = config_lib.consistency_layers(config)
  has_moe = bool(config_lib.moe_layers(config.model))
  weight = float(cons.weight)
  prefix = config_lib.num_prefix_tokens(config.model)
  train_key = jax.random.fold_in(jax.random.key(config.seed), 1)
  mixup_concentration = config_lib.mixup_concentration(config)
  nan_policy = config.get('nan_policy', 'stop')

  def train_step(state: TrainState, images: Array, labels: Array,
                 orig_sizes: Array | None = None):  # fmt: skip
    step_key = jax.random.fold_in(train_key, state.step)
    aug_key, dropout_key, gating_key = jax.random.split(step_key, 3)
    # Crops sampled in original-image pixels when the host sends the sizes.
    views, maps = augment.batched_paired_views(
      aug_key, images, settings, orig_sizes
    )
    num_images = images.shape[0]
    targets = labels
    if mixup_concentration > 0:  # Both views of image i with one partner.
      views, maps, targets, _ = augment.mixup(
        jax.random.fold_in(step_key, 1),
        views,
        maps,
        labels,
        concentration=mixup_concentration,
        num_classes=config.model.num_classes,
        num_groups=jax.device_count(),  # One per device shard of the batch.
      )
    views = views.reshape(2 * num_images, *views.shape[2:])
    labels2 = jnp.repeat(labels, 2)
    targets2 = jnp.repeat(targets, 2, axis=0)

    def objective(params):
      (logits, metrics), state_vars = model.apply(
        {'params': params},
        augment.to_model_range(views),
        rngs={'dropout': dropout_key, 'gating': gating_key},
        mutable=['intermediates'],
      )
      xent = jnp.mean(loss_fn(logits, targets2))
      aux = jnp.mean(metrics['auxiliary_loss']) if has_moe else 0.0
      out = {'xent': xent, 'auxiliary_loss': aux}
      total = xent + aux
      if cons_layers:
        jsd, jsd_metrics = consistency_loss(
          state_vars['intermediates'],
          maps,
          layers=cons_layers,
          prefix=prefix,
          options=losses.ConsistencyOptions.from_config(cons),
        )
        if weight > 0:
          total = total + weight * jsd
        else:  # Logged, not trained on.
          jsd = jax.lax.stop_gradient(jsd)
          jsd_metrics = jax.lax.stop_gradient(jsd_metrics)
        out.update(jsd_metrics, consistency=jsd)
      for name, m in metrics.items():
        if isinstance(m, Mapping):
          dropped = m.get('dropped_fraction', m.get('dropped_tokens'))
          if dropped is not None:
            out[f'dropped/{name}'] = jnp.mean(dropped)
      out['train_accuracy'] = jnp.mean(jnp.argmax(logits, -1) == labels2)
      out['total_loss'] = total
      return total, out

    grads, metrics = jax.grad(objective, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics['grad_norm'] = optax.tree.norm(grads)
    metrics['learning_rate'] = schedule(state.step)
    new_state = TrainState(state.step + 1, params, opt_state)
    new_state = resilience.apply_nan_policy(
      nan_policy, state, new_state, metrics
    )
    return new_state, metrics

  return train_step


# ----------------------------------------------------------------------------
# Setup shared by training and compile-only inspection.
# ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TrainingSetup:
  """What training builds before its first step (see build_training)."""

  model: Any
  tx: Any
  schedule: Any
  settings: Any
  init_state: Any  # key -> TrainState
  init_key: Array
  abstract_state: TrainState  # of jax.ShapeDtypeStruct
  state_shardings: TrainState  # of NamedSharding
  data_sharding: NamedSharding
  # jitted (state, images, labels, orig_sizes) -> (state, metrics)
  train_step: Any


def build_training(config, mesh, num_steps: int, image_shape) -> TrainingSetup:
  """Model, optimizer, state shardings and the jitted train step.

  Nothing is run or read: the state exists only as abstract shapes.

  Args:
    config: the run config.
    mesh: the ('data', 'expert') mesh.
    num_steps: training steps (for the learning-rate schedule).
    image_shape: (H, W, C) of the dataset's images (before augmentation).

  Returns:
    A TrainingSetup.
  """
  settings = config_lib.view_settings(config)
  model = build_model(config.model, deterministic=False)
  tx, schedule = make_optimizer(config.optimizer, num_steps)
  batch_size = config.dataset.train.batch_size

  def init_state(key):
    dummy = jnp.zeros(
      (2 * batch_size, settings.size, settings.size, image_shape[-1])
    )
    params = model.init({'params': key, 'dropout': key, 'gating': key}, dummy)[
      'params'
    ]
    return TrainState(jnp.int32(0), params, tx.init(params))

  init_key = jax.random.fold_in(jax.random.key(config.seed), 0)
  with jax.set_mesh(mesh):
    abstract = jax.eval_shape(init_state, init_key)
  rules = config.get('params_axis_resources') or sharding.DEFAULT_RULES
  state_shardings = sharding.tree_shardings(abstract, mesh, rules)
  state_shardings = state_shardings.replace(
    step=NamedSharding(mesh, PartitionSpec())
  )
  data_sharding = sharding.batch_sharding(mesh)
  train_step = jax.jit(
    make_train_step(config, model, tx, schedule, settings),
    in_shardings=(state_shardings,) + (data_sharding,) * 3,
    out_shardings=(state_shardings, None),
    donate_argnums=(0,),
  )
  return TrainingSetup(
    model=model,
    tx=tx,
    schedule=schedule,
    settings=settings,
    init_state=init_state,
    init_key=init_key,
    abstract_state=abstract,
    state_shardings=state_shardings,
    data_sharding=data_sharding,
    train_step=train_step,
  )


def dataset_image_shape(
  cfg, default_image_size: int | None = None
) -> tuple[int, int, int]:
  """(H, W, C) of a config.dataset.<split>'s images, without reading data.

  Args:
    cfg: the dataset block.
    default_image_size: a 'folder' block's size when it sets none (the
      augmentation size, as data.get_dataset).

  Returns:
    The shape of the images (the canvas of 'tfds' and 'folder' blocks).
  """
  name = cfg['name']
  if name == 'fashion_mnist':
    return (28, 28, 1)
  if name == 'synthetic':
    size = cfg.get('image_size', 16)
    return (size, size, cfg.get('channels', 1))
  if name == 'tfds':
    size = cfg['image_size']
    return (size, size, cfg.get('channels', 3))
  if name == 'folder':
    size = cfg.get('image_size') or default_image_size
    return (size, size, cfg.get('channels', 3))
  raise ValueError(
    f'dataset.name={name!r} is unknown; choose one of {sorted(data.DATASETS)}'
  )


def lower_train_step(config: ml_collections.ConfigDict, mesh=None):
  """The train step of `config` lowered from abstract shapes (nothing run).

  Args:
    config: the run config (validated against the visible devices).
    mesh: defaults to the training mesh over all visible devices.

  Returns:
    (jax.stages.Lowered, mesh).
  """
  if mesh is None:
    config_lib.validate(config, jax.device_count())
    mesh = sharding.make_mesh(config.get('num_expert_partitions', 1))
  else:
    config_lib.validate(config, mesh.devices.size)
  train_cfg = config.dataset.train
  try:
    num_steps = config_lib.num_train_steps(
      config, train_cfg.get('num_examples')
    )
  except ValueError:  # Epochs of a dataset whose size is not in the config:
    num_steps = 1  # only the schedule's constants depend on it.
  image_shape = dataset_image_shape(train_cfg, config.augment.size)
  setup = build_training(config, mesh, num_steps, image_shape)
  batch = train_cfg.batch_size
  state = jax.tree_util.tree_map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
    setup.abstract_state,
    setup.state_shardings,
  )
  images = jax.ShapeDtypeStruct(
    (batch, *image_shape), jnp.uint8, sharding=setup.data_sharding
  )
  labels = jax.ShapeDtypeStruct(
    (batch,), jnp.int32, sharding=setup.data_sharding
  )
  orig_sizes = jax.ShapeDtypeStruct(
    (batch, 2), jnp.int32, sharding=setup.data_sharding
  )
  with jax.set_mesh(mesh):
    lowered = setup.train_step.lower(state, images, labels, orig_sizes)
  return lowered, mesh


def compile_train_step(config: ml_collections.ConfigDict):
  """The compiled train step of `config`, from abstract shapes only.

  Builds the mesh (all visible devices, config.num_expert_partitions),
  model, optimizer and shardings exactly as train_and_evaluate does; no
  data is read and nothing runs. Inspect the result with `.as_text()`,
  `.memory_analysis()`, `.cost_analysis()` (see vmoe_jsd.inspect_step).

  Returns:
    jax.stages.Compiled.
  """
  lowered, _ = lower_train_step(config)
  return lowered.compile()


# ----------------------------------------------------------------------------
# The loop.
# ----------------------------------------------------------------------------
def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, reevaluate: bool = False
):
  """Trains (resuming from workdir if it holds checkpoints) and evaluates.

  `workdir` may be local or remote (gs://...); see paths.py. SIGTERM (or a
  first Ctrl-C) stops the run after the current step with a checkpoint of
  it (see resilience.py).

  Args:
    config: the run's config.
    workdir: checkpoints, event files, config.json, train_history.jsonl and
      results.json go here.
    reevaluate: on a finished workdir, evaluate the final checkpoint again
      and rewrite results.json (keeping its training time); without it, a
      finished workdir is left as it is.

  Returns:
    The final evaluation result (also written to workdir/results.json), or
    {'preempted_at_step': step, 'signal': name} when stopped by a signal.
  """
  # --- Config and mesh. -------------------------------------------------
  config_lib.validate(config, jax.device_count())
  is_main = jax.process_index() == 0
  log = print if is_main else (lambda *a, **k: None)
  finished = run_files.finished_result(workdir, config.get('num_train_steps'))
  if finished is not None and not reevaluate:
    log(
      f'{workdir} has finished ({finished["num_train_steps"]} steps, test '
      f'accuracy {finished["accuracy"]:.4f}); results.json kept. Pass '
      '--reevaluate to evaluate its final checkpoint again.',
      flush=True,
    )
    return finished
  workdir = paths.makedirs(workdir)
  mesh = sharding.make_mesh(config.get('num_expert_partitions', 1))
  writer = run_files.metric_writer(str(workdir), is_main)
  if is_main:
    run_files.write_config(workdir, config)

  # --- Input. -----------------------------------------------------------
  train_ds = data.get_dataset(config.dataset.train, config.augment.size)
  test_ds = data.get_dataset(config.dataset.test, config.augment.size)
  num_steps = config_lib.num_train_steps(config, len(train_ds))
  settings = config_lib.view_settings(config)
  put_batch = sharding.make_put_batch(mesh)

  # --- Model, optimizer, shardings, step. ------------------------------
  setup = build_training(config, mesh, num_steps, train_ds.image_shape)
  init_state, init_key = setup.init_state, setup.init_key
  abstract, state_shardings = setup.abstract_state, setup.state_shardings
  eval_model = build_model(
    config_lib.eval_model_config(config), deterministic=True
  )
  batch_size = config.dataset.train.batch_size

  # --- Restore or initialise. -------------------------------------------
  ckpt = checkpoints.Checkpointer(
    workdir,
    every_steps=config.save_checkpoint.every_steps,
    keep_last=config.save_checkpoint.get('keep_last', 2),
    asynchronous=config.save_checkpoint.get('asynchronous', True),
    log=lambda msg: log(msg, flush=True),
  )
  with jax.set_mesh(mesh):
    state, latest = ckpt.restore_latest(
      checkpoints.abstract_like(abstract, state_shardings)
    )
    if latest is not None:
      log(f'Resumed from {ckpt.directory} at step {latest}.', flush=True)
    else:
      state = jax.jit(init_state, out_shardings=state_shardings)(init_key)
      init_cfg = config.get('initialization')
      if init_cfg and init_cfg.get('source'):
        params, report = initialization.load_initial_params(
          init_cfg, jax.device_get(state.params)
        )
        log(initialization.format_report(report), flush=True)
        state = state.replace(
          params=jax.device_put(params, state_shardings.params)
        )
  start_step = int(jax.device_get(state.step))
  num_params = sum(x.size for x in jax.tree_util.tree_leaves(state.params))
  log(
    f'Model: {num_params:,} parameters; {num_steps} steps of {batch_size} '
    f'images x 2 views; devices: {jax.device_count()} (mesh '
    f'{dict(mesh.shape)}).',
    flush=True,
  )
  if is_main and start_step == 0:
    writer.write_hparams(_flat_hparams(config))

  # --- Compiled steps. --------------------------------------------------
  train_step = setup.train_step
  eval_step = jax.jit(evaluate.make_eval_step(config, eval_model, settings))
  stability_step = jax.jit(
    stability.make_stability_step(config, eval_model, settings)
  )
  routing_maps = (
    analyze.RoutingMapWriter(config, eval_model, settings, test_ds)
    if jax.process_count() == 1  # Its jitted call runs on one process.
    else None
  )
  fewshot_eval = fewshot.make_evaluator(
    config, config_lib.eval_model_config(config), settings, put_batch
  )

  def do_fewshot(step):
    with jax.set_mesh(mesh):
      out = fewshot_eval(state.params)
    writer.write_scalars(step, fewshot.scalars(out))
    log(fewshot.format_results(out, step), flush=True)
    return out

  def do_eval(step):
    with jax.set_mesh(mesh):
      t0 = time.time()
      result = evaluate.run_evaluation(eval_step, state.params, test_ds, config,
                              put_batch)  # fmt: skip
    result['step'] = step
    result['eval_seconds'] = time.time() - t0
    writer.write_scalars(step, evaluate.routing_scalars(result))
    log(
      f'[eval step {step}] test accuracy {result["accuracy"]:.4f} on '
      f'{result["num_examples"]} images ({result["eval_seconds"]:.1f}s)',
      flush=True,
    )
    if result['routing']:
      log(evaluate.format_routing_table(result['routing']), flush=True)
    with jax.set_mesh(mesh):
      stab = stability.run_stability(stability_step, state.params, test_ds,
                                     config, put_batch)  # fmt: skip
    if stab:
      result['stability'] = stab
      writer.write_scalars(step, stability.stability_scalars(stab))
      log(stability.format_stability_table(stab), flush=True)
    if routing_maps is not None:
      routing_maps.write(writer, step, state.params)
    return result

  # --- Train loop. ------------------------------------------------------
  batches = data.prefetch(
    train_ds.train_batches(
      batch_size,
      seed=config.seed,
      start_step=start_step,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
    )
  )
  report_every = config.report_progress.every_steps
  eval_every = config.evaluate.get('every_steps')
  result = None
  train_time = 0.0
  t_last = time.time()
  steps_since = 0
  history = []
  nan_policy = config.get('nan_policy', 'stop')
  skipped = 0  # Under 'skip': a device scalar, summed without host syncs.
  guard = resilience.PreemptionGuard()
  for step in guard.steps(start_step, num_steps, on_exit=ckpt.wait):
    batch = next(batches)
    arrays = put_batch(batch['image'], batch['label'], data.orig_sizes(batch))
    with jax.set_mesh(mesh):
      state, metrics = train_step(state, *arrays)
    steps_since += 1
    if nan_policy == 'skip':
      skipped = skipped + metrics['skipped']
    if step % report_every == 0 or step == num_steps or step == start_step + 1:
      metrics = jax.device_get(metrics)
      now = time.time()
      dt = now - t_last
      # The first step after (re)start includes compilation.
      if step != start_step + 1:
        train_time += dt
      t_last = now
      _check_finite(metrics, step, nan_policy)
      img_per_s = steps_since * batch_size / max(dt, 1e-9)
      steps_since = 0
      scalars = {k: float(v) for k, v in metrics.items()}
      scalars['images_per_second'] = img_per_s
      if nan_policy == 'skip':
        scalars['skipped_steps'] = float(jax.device_get(skipped))
      if step == start_step + 1:
        eta = float('nan')  # This step's time is mostly compilation.
        scalars.pop('images_per_second')
      else:
        eta = (num_steps - step) * batch_size / max(img_per_s, 1e-9)
      writer.write_scalars(step, scalars)
      history.append({'step': step, **scalars})
      log(_progress_line(step, num_steps, scalars, img_per_s, eta), flush=True)
    if eval_every and step % eval_every == 0 and step != num_steps:
      do_eval(step)
      t_last = time.time()
      steps_since = 0
    if fewshot_eval and fewshot.due(config, step, num_steps):
      do_fewshot(step)
      t_last = time.time()
      steps_since = 0
    if ckpt.every_steps and step % ckpt.every_steps == 0 and step != num_steps:
      _check_finite(jax.device_get(metrics), step, nan_policy)
      ckpt.maybe_save(step, state)
      t_last = time.time()
      steps_since = 0

  if guard.stopped_at is not None:
    return _stop_preempted(
      guard, ckpt, state, writer, workdir, history if is_main else None, log
    )

  # --- Final evaluation and checkpoint. ---------------------------------
  ckpt.maybe_save(num_steps, state, force=True)
  ckpt.close()
  result = do_eval(num_steps)
  if fewshot_eval:
    result['fewshot'] = do_fewshot(num_steps)
  if finished is not None:  # --reevaluate: the training time stays.
    train_time = finished.get('train_seconds_excluding_compile', train_time)
  result['train_seconds_excluding_compile'] = train_time
  result['num_train_steps'] = num_steps
  # Unreadable images skipped (image folders; logged once each).
  result['skipped_images'] = {
    'train': getattr(train_ds, 'num_skipped', 0),
    'test': getattr(test_ds, 'num_skipped', 0),
  }
  result['consistency_weight'] = float(config.consistency.weight)
  if is_main:
    paths.write_json(workdir / run_files.RESULTS, result)
    _append_history(workdir, history)
  writer.flush()
  writer.close()
  return result


def _check_finite(metrics, step, nan_policy='stop'):
  # Under 'skip' a non-finite step was not applied (see resilience.py).
  if nan_policy == 'stop':
    resilience.check_finite(metrics, step)


def _append_history(workdir, history):
  run_files.append_jsonl(workdir / run_files.HISTORY, history)


def _stop_preempted(guard, ckpt, state, writer, workdir, history, log):
  """Saves the step just finished, waits for it, and reports the stop."""
  step = guard.stopped_at
  ckpt.maybe_save(step, state, force=True)
  ckpt.close()
  if history is not None:
    _append_history(workdir, history)
  writer.flush()
  writer.close()
  log(
    f'Stopped by {guard.signal_name} after step {step}: checkpoint saved in '
    f'{ckpt.directory}. Run the same command to resume.',
    flush=True,
  )
  return {'preempted_at_step': step, 'signal': guard.signal_name}


def _progress_line(step, num_steps, s, img_per_s, eta) -> str:
  parts = [
    f'[step {step}/{num_steps}]',
    f'loss {s["total_loss"]:.4f}',
    f'xent {s["xent"]:.4f}',
    f'aux {s["auxiliary_loss"]:.4f}',
  ]
  if 'consistency' in s:
    parts.append(f'jsd {s["consistency"]:.4f}')
  if s.get('skipped_steps'):
    parts.append(f'skipped {int(s["skipped_steps"])}')
  parts += [
    f'acc {s["train_accuracy"]:.3f}',
    f'lr {s["learning_rate"]:.2e}',
  ]
  if math.isfinite(eta):
    parts += [f'{img_per_s:.0f} img/s', f'ETA {_hms(eta)}']
  else:
    parts.append('(compiling)')
  return '  '.join(parts)


def _hms(seconds: float) -> str:
  if not math.isfinite(seconds):
    return '?'
  seconds = int(seconds)
  return f'{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}'


def _flat_hparams(config) -> dict[str, Any]:
  flat = {}

  def walk(prefix, value):
    if isinstance(value, Mapping):
      for k, v in value.items():
        walk(f'{prefix}{k}.', v)
    elif isinstance(value, (int, float, str, bool)):
      flat[prefix[:-1]] = value
    else:
      flat[prefix[:-1]] = str(value)

  walk('', config_lib.to_dict(config))
  return flat

"""Training and evaluation of V-MoE with router-consistency learning.

`train_and_evaluate(config, workdir)` resolves the config once
(config_lib.validate -> RunSpec) and runs one story in banner sections, as
big_vision's train.py: finished-run check, mesh and run files, input, model
and optimizer, restore or initialise, evaluations, the loop, the end. Every
periodic action of the loop goes through `progress.itstime`. The pure
train step is step.py's; the data flow is in docs/architecture.md.

A resumed run re-derives every random stream from the seed and the step
(streams.py), so it repeats exactly what an uninterrupted one would have
done.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from vmoe_jsd import (
  augment,
  checkpoints,
  config_lib,
  data,
  evaluate,
  fewshot,
  figures,
  initialization,
  optimizer,
  paths,
  profiling,
  progress,
  resilience,
  robustness,
  run_files,
  sharding,
  stability,
  streams,
)
from vmoe_jsd.step import TrainState, make_train_step

Array = jax.Array


# ----------------------------------------------------------------------------
# Model, optimizer, shardings and the compiled step (nothing is run).
# ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TrainingSetup:
  """What training builds before its first step (see build_training)."""

  model: Any  # models.VisionTransformerMoe (training mode)
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  settings: augment.ViewSettings
  init_state: Callable[[Array], TrainState]
  init_key: Array
  abstract_state: TrainState  # of jax.ShapeDtypeStruct
  state_shardings: TrainState  # of NamedSharding
  data_sharding: NamedSharding
  # jitted (state, images, labels, orig_sizes) -> (state, metrics)
  train_step: Callable


def build_training(
  spec: config_lib.RunSpec, mesh, num_steps: int, image_shape
) -> TrainingSetup:
  """Model, optimizer, state shardings and the jitted train step.

  Args:
    spec: the resolved run.
    mesh: the ('data', 'expert') mesh.
    num_steps: training steps (for the learning-rate schedule).
    image_shape: (H, W, C) of the dataset's images (before augmentation).
  """
  settings = spec.views
  model = spec.model.build(deterministic=False)
  tx, schedule = optimizer.make_optimizer(spec.optimizer, num_steps)
  views_shape = (2 * spec.train_data.batch_size, settings.size,
                 settings.size, image_shape[-1])  # fmt: skip

  def init_state(key):
    rngs = {'params': key, 'dropout': key, 'gating': key}
    params = model.init(rngs, jnp.zeros(views_shape))['params']
    return TrainState(jnp.int32(0), params, tx.init(params))

  init_key = streams.stream(spec.seed, 'init')
  with jax.set_mesh(mesh):
    abstract = jax.eval_shape(init_state, init_key)
  state_shardings = sharding.tree_shardings(abstract, mesh, spec.params_rules)
  state_shardings = state_shardings.replace(
    step=NamedSharding(mesh, PartitionSpec())
  )
  data_sharding = sharding.batch_sharding(mesh)
  step_fn = make_train_step(spec.step, model, tx, schedule, settings,
                            streams.stream(spec.seed, 'train'))  # fmt: skip
  train_step = jax.jit(
    step_fn,
    in_shardings=(state_shardings,) + (data_sharding,) * 3,
    out_shardings=(state_shardings, None),
    donate_argnums=(0,),
  )
  return TrainingSetup(
    model, tx, schedule, settings, init_state, init_key, abstract,
    state_shardings, data_sharding, train_step,
  )  # fmt: skip


def lower_train_step(config: ml_collections.ConfigDict, mesh=None):
  """The train step of `config` lowered from abstract shapes (nothing run).

  Args:
    config: the run config (validated against the mesh's devices).
    mesh: defaults to the training mesh over all visible devices.

  Returns:
    (jax.stages.Lowered, mesh).
  """
  num_devices = jax.device_count() if mesh is None else mesh.devices.size
  spec = config_lib.validate(config, num_devices)
  if mesh is None:
    mesh = sharding.make_mesh(spec.num_expert_partitions)
  try:
    num_steps = spec.num_train_steps(spec.train_data.block.get('num_examples'))
  except ValueError:  # Epochs of a dataset whose size is not in the config:
    num_steps = 1  # only the schedule's constants depend on it.
  image_shape = spec.train_data.image_shape()
  setup = build_training(spec, mesh, num_steps, image_shape)
  batch = spec.train_data.batch_size
  state = jax.tree_util.tree_map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
    setup.abstract_state,
    setup.state_shardings,
  )

  def arg(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=setup.data_sharding)

  args = (arg((batch, *image_shape), jnp.uint8), arg((batch,), jnp.int32),
          arg((batch, 2), jnp.int32))  # fmt: skip
  with jax.set_mesh(mesh):
    lowered = setup.train_step.lower(state, *args)
  return lowered, mesh


def compile_train_step(config: ml_collections.ConfigDict):
  """The compiled train step of `config`, from abstract shapes only.

  Builds the mesh (all visible devices, config.num_expert_partitions),
  model, optimizer and shardings exactly as train_and_evaluate does; no
  data is read and nothing runs. Inspect the result with `.as_text()`,
  `.memory_analysis()`, `.cost_analysis()` (see vmoe_jsd.inspect_step).
  """
  lowered, _ = lower_train_step(config)
  return lowered.compile()


# ----------------------------------------------------------------------------
# Pieces of the story.
# ----------------------------------------------------------------------------
def restore_or_init(spec, setup: TrainingSetup, ckpt, mesh, log) -> TrainState:
  """The newest readable checkpoint of the workdir, or a fresh state (with
  config.initialization's parameters, if any)."""
  with jax.set_mesh(mesh):
    state, latest = ckpt.restore_latest(
      checkpoints.abstract_like(setup.abstract_state, setup.state_shardings)
    )
    if latest is not None:
      log(f'Resumed from {ckpt.directory} at step {latest}.')
      return state
    state = jax.jit(setup.init_state, out_shardings=setup.state_shardings)(
      setup.init_key
    )
    if spec.initialization:
      params, report = initialization.load_initial_params(
        spec.initialization, jax.device_get(state.params)
      )
      log(initialization.format_report(report))
      state = state.replace(
        params=jax.device_put(params, setup.state_shardings.params)
      )
  return state


@dataclasses.dataclass
class Evaluations:
  """The compiled evaluations of a run and where their results go.

  `test(params, step)` measures accuracy, routing across views and
  stability on the test split; `fewshot(params, step)` the few-shot
  accuracies (None when config.fewshot names no dataset).
  """

  spec: config_lib.RunSpec
  mesh: Any
  test_ds: Any
  writer: Any
  log: Callable[[str], None]
  put_batch: Callable
  eval_step: Callable
  stability_step: Callable
  routing_maps: figures.RoutingMapWriter | None
  fewshot_fn: Callable | None
  robustness_fn: Callable | None = None

  @classmethod
  def build(cls, spec, mesh, test_ds, writer, log) -> Evaluations:
    eval_model = spec.model.build_eval()
    put_batch = sharding.make_put_batch(mesh)
    views_key = streams.stream(spec.seed, 'eval_views')
    eval_step = jax.jit(evaluate.make_eval_step(
      eval_model, spec.model, spec.views, views_key))  # fmt: skip
    stability_step = jax.jit(stability.make_stability_step(
      eval_model, spec.model, spec.views, spec.stability,
      streams.stream(spec.seed, 'stability_noise')))  # fmt: skip
    routing_maps = None
    if jax.process_count() == 1:  # Its jitted call runs on one process.
      routing_maps = figures.RoutingMapWriter.build(
        spec.evaluate.routing_map_images, eval_model, spec.model,
        spec.views, views_key, test_ds, spec.test_data.name)  # fmt: skip
    fewshot_fn = fewshot.make_evaluator(
      spec.fewshot, spec.model, spec.views, put_batch
    )
    robustness_fn = None
    if spec.robustness is not None and spec.robustness.enabled:
      robustness_fn = robustness.make_evaluator(
        spec.robustness, spec.model, spec.views, spec.seed,
        spec.step.loss, put_batch)  # fmt: skip
    return cls(spec, mesh, test_ds, writer, log, put_batch, eval_step,
               stability_step, routing_maps, fewshot_fn,
               robustness_fn)  # fmt: skip

  def test(self, params, step: int,
           should_stop: Callable[[], bool] | None = None):  # fmt: skip
    """The test evaluation of `step`: its dict, or None when should_stop
    (asked between batches) abandoned it; nothing is written then."""
    spec, batch = self.spec, self.spec.test_data.batch_size
    split = evaluate.StoppableSplit(self.test_ds, should_stop or _never)
    t0 = time.time()
    with jax.set_mesh(self.mesh):
      result = evaluate.run_evaluation(
        self.eval_step, params, split, batch, spec.evaluate.limit,
        spec.model.moe_layers, self.put_batch)  # fmt: skip
      eval_seconds = time.time() - t0
      stab = {} if split.stopped else stability.run_stability(
        self.stability_step, params, split, batch, spec.stability,
        self.put_batch)  # fmt: skip
    if split.stopped:
      return None
    if self.robustness_fn is not None:  # evaluate.robustness.enabled
      try:  # Before anything is written: a stop inside writes nothing.
        with jax.set_mesh(self.mesh):
          result['robustness'] = self.robustness_fn(
            params, evaluate.RaisingSplit(self.test_ds, should_stop or _never),
            batch)  # fmt: skip
      except evaluate.EvaluationStopped:
        return None
    result['step'] = step
    result['eval_seconds'] = eval_seconds
    self.writer.write_scalars(step, evaluate.routing_scalars(result))
    self.log(
      f'[eval step {step}] test accuracy {result["accuracy"]:.4f} on '
      f'{result["num_examples"]} images ({result["eval_seconds"]:.1f}s)'
    )
    if result['routing']:
      self.log(evaluate.format_routing_table(result['routing']))
    if stab:
      result['stability'] = stab
      self.writer.write_scalars(step, stability.stability_scalars(stab))
      self.log(stability.format_stability_table(stab))
    if self.routing_maps is not None:
      self.routing_maps.write(self.writer, step, params)
    return result

  def final(self, params, step: int,
            should_stop: Callable[[], bool] | None = None):  # fmt: skip
    """The end of training: the test evaluation and, if on, few-shot (None
    when should_stop abandoned the test evaluation)."""
    result = self.test(params, step, should_stop)
    if result is not None and self.fewshot_fn:
      result['fewshot'] = self.fewshot(params, step, should_stop)
      if result['fewshot'] is None:
        return None
    return result

  def fewshot(self, params, step: int,
              should_stop: Callable[[], bool] | None = None):  # fmt: skip
    """The few-shot results of `step`, or None when should_stop (asked
    between batches of its datasets) abandoned them; nothing written then."""
    try:
      with jax.set_mesh(self.mesh):
        out = self.fewshot_fn(params, should_stop or _never)
    except evaluate.EvaluationStopped:
      return None
    self.writer.write_scalars(step, fewshot.scalars(out))
    self.log(fewshot.format_results(out, step))
    return out


def _never() -> bool:
  return False


def report(step, metrics, skipped, clock: progress.Progress, writer,
           log) -> dict[str, Any]:  # fmt: skip
  """Writes and prints the progress of `step`; returns its history row."""
  metrics = jax.device_get(metrics)
  img_per_s, eta = clock.measure(step)
  check_finite(metrics, step, skipped)
  scalars = {k: float(v) for k, v in metrics.items()}
  scalars['images_per_second'] = img_per_s
  if skipped is not None:
    scalars['skipped_steps'] = float(jax.device_get(skipped))
  if step == clock.start_step + 1:  # This step's time is mostly compilation.
    scalars.pop('images_per_second')
  writer.write_scalars(step, scalars)
  log(_progress_line(step, clock.num_steps, scalars, img_per_s, eta))
  return {'step': step, **scalars}


def check_finite(metrics, step, skipped=None) -> None:
  """Stops on a non-finite loss; under nan_policy='skip' (a skip counter
  is kept) that step was not applied (resilience.py)."""
  if skipped is None:
    resilience.check_finite(metrics, step)


# Indirection kept so that tests can watch the progress lines.
_progress_line = progress.progress_line


# ----------------------------------------------------------------------------
# The story.
# ----------------------------------------------------------------------------
def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, reevaluate: bool = False,
  allow_config_change: bool = False,
):  # fmt: skip
  """Trains (resuming from workdir if it holds checkpoints) and evaluates.

  `workdir` may be local or remote (gs://...); see paths.py. It is locked
  for the whole run (run_files.lock_workdir). SIGTERM (or a first Ctrl-C)
  stops the run after the current step with a checkpoint of it (see
  resilience.py).

  Args:
    config: the run's config.
    workdir: checkpoints, event files, config.json, train_history.jsonl and
      results.json go here.
    reevaluate: on a finished workdir, evaluate the final checkpoint again
      and rewrite results.json (keeping its training time); without it, a
      finished workdir is left as it is.
    allow_config_change: resume even when the config differs from the
      workdir's config.json in keys outside run_files.RESUMABLE_KEYS.

  Returns:
    The final evaluation result (also written to workdir/results.json), or
    {'preempted_at_step': step, 'signal': name} when stopped by a signal.

  Raises:
    run_files.WorkdirError: the workdir is in use by another run, is no
      folder or cannot be written, or was trained with another config
      (run_files.ConfigChangedError).
  """
  spec = config_lib.validate(config, jax.device_count())
  is_main = jax.process_index() == 0
  log = (lambda msg: print(msg, flush=True)) if is_main else (lambda msg: None)
  workdir = run_files.prepare_workdir(workdir)
  # Watching from here, not from the first step: a SIGTERM during restore
  # or the first compilations (minutes at ImageNet size) stops the run
  # before its first step, on every process. Without it one process died
  # alone (single-process default), or, under jax.distributed, its notifier
  # swallowed the signal and the run trained on until killed.
  guard = resilience.PreemptionGuard()
  with run_files.lock_workdir(workdir, log), guard.watching():
    return _run(spec, workdir, reevaluate, allow_config_change, is_main, log,
                guard)  # fmt: skip


def _run(spec, workdir, reevaluate, allow_config_change, is_main, log, guard):
  """train_and_evaluate's story, with the workdir locked."""
  # --- Config: a finished run is left as it is; a resume keeps its config.
  finished = run_files.finished_result(workdir, spec.num_steps or None)
  keep = finished is not None and not reevaluate
  run_files.on_process_0(lambda: run_files.check_resume_config(
    workdir, spec.config, allow_config_change, log, record=not keep,
  ), "the config differs from the workdir's config.json")  # fmt: skip
  if keep:
    log(f'{workdir} has finished ({finished["num_train_steps"]} steps, test '
        f'accuracy {finished["accuracy"]:.4f}); results.json kept. Pass '
        '--reevaluate to evaluate its final checkpoint again.')  # fmt: skip
    return finished

  # --- Mesh, run files and input. ----------------------------------------
  mesh = sharding.make_mesh(spec.num_expert_partitions)
  writer = run_files.metric_writer(str(workdir), is_main)
  if is_main:
    run_files.write_config(workdir, spec.config)
  train_ds, test_ds = spec.train_data.load(), spec.test_data.load()
  num_steps = spec.num_train_steps(len(train_ds))

  # --- Model, optimizer, step; restore or initialise; evaluations. -------
  setup = build_training(spec, mesh, num_steps, train_ds.image_shape)
  ckpt = checkpoints.Checkpointer(
    workdir, spec.checkpoint.every_steps, spec.checkpoint.keep_last,
    spec.checkpoint.asynchronous, log=log)  # fmt: skip
  state = restore_or_init(spec, setup, ckpt, mesh, log)
  start_step = int(jax.device_get(state.step))
  describe_run(spec, state, start_step, num_steps, mesh, writer, log, is_main)
  evals = Evaluations.build(spec, mesh, test_ds, writer, log)

  # --- Loop (the history is written as it goes, the time kept). ----------
  batch_size = spec.train_data.batch_size
  clock = progress.Progress(start_step, num_steps, batch_size)
  history = run_files.History(
    workdir / run_files.HISTORY, start_step, is_main,
    seconds_fn=lambda: clock.train_seconds)  # fmt: skip
  clock.train_seconds = history.train_seconds_until(start_step, batch_size)
  trace_dir = str(workdir) if is_main else None  # config.profile's trace
  state, history = train_loop(spec, setup, state, train_ds, mesh, ckpt, evals,
                              clock, guard, writer, log, trace_dir,
                              history, workdir)  # fmt: skip
  stopped = guard.stopped_at is not None
  if guard.stopped_at != 0:  # Stopped before step 1: nothing to save.
    ckpt.maybe_save(guard.stopped_at if stopped else num_steps, state,
                    force=True)  # fmt: skip
  ckpt.close()
  if stopped:
    return _stop_preempted(guard, ckpt, writer, workdir, history, log)

  # --- The end: final evaluation and results. ----------------------------
  # A stop request ends it between batches (the guard watches the run).
  result = evals.final(state.params, num_steps, guard.should_stop)
  if result is None:  # Its checkpoint is saved; a resume evaluates again.
    guard.stop_at(num_steps, 'the final evaluation')
    return _stop_preempted(guard, ckpt, writer, workdir, history, log)
  train_time = clock.train_seconds  # Of every segment since step 0.
  if finished is not None:  # --reevaluate: the training time stays.
    train_time = finished.get('train_seconds_excluding_compile', train_time)
  result.update(
    train_seconds_excluding_compile=train_time, num_train_steps=num_steps,
    # Unreadable images skipped (image folders; logged once each).
    skipped_images={'train': getattr(train_ds, 'num_skipped', 0),
                    'test': getattr(test_ds, 'num_skipped', 0)},
    consistency_weight=spec.step.consistency_weight,
  )  # fmt: skip
  if is_main:
    paths.write_json(workdir / run_files.RESULTS, result)
  writer.flush()
  writer.close()
  return result


def train_loop(spec, setup, state, train_ds, mesh, ckpt, evals,
               clock: progress.Progress, guard, writer, log,
               profile_dir: str | None = None,
               history: run_files.History | None = None,
               workdir=None):  # fmt: skip
  """Steps from clock.start_step to clock.num_steps (or to a stop signal),
  with every periodic action; returns (state, progress history rows).
  config.profile's steps are traced into profile_dir (None: not traced).
  Each report's row goes to `history` (written at once; default a list).
  A stop request during a periodic evaluation ends the loop at that step
  and notes it in workdir, so that the resumed run evaluates it again
  (before its first step) and writes what an uninterrupted run writes."""
  start_step, num_steps = clock.start_step, clock.num_steps
  if not redo_interrupted_evaluation(spec, evals, state.params, clock, guard,
                                     workdir, log):  # fmt: skip
    return state, [] if history is None else history
  compile_together(spec, setup, state, mesh, train_ds.image_shape)
  window = profiling.ProfileWindow(spec.profile, profile_dir, start_step,
                                   num_steps, log)  # fmt: skip
  put_batch = sharding.make_put_batch(mesh)
  batches = data.prefetch(train_ds.train_batches(
    spec.train_data.batch_size, seed=spec.seed, start_step=start_step,
    process_index=jax.process_index(), process_count=jax.process_count(),
  ))  # fmt: skip
  history = [] if history is None else history
  # Under 'skip': a device scalar, summed without host syncs.
  skipped = 0 if spec.step.nan_policy == 'skip' else None
  for step in guard.steps(start_step, num_steps, on_exit=ckpt.wait):
    window.before_step(step)
    batch = next(batches)
    arrays = put_batch(batch['image'], batch['label'], data.orig_sizes(batch))
    with jax.set_mesh(mesh):
      state, metrics = setup.train_step(state, *arrays)
    window.after_step(step, state)
    clock.step_done()
    if skipped is not None:
      skipped = skipped + metrics['skipped']
    if progress.itstime(step, spec.report_every, num_steps, last=True,
                        first=start_step + 1):  # fmt: skip
      history.append(report(step, metrics, skipped, clock, writer, log))
    if not periodic_evaluations(spec, evals, state.params, step, clock,
                                guard):  # fmt: skip
      guard.stop_at(step, 'its evaluation')
      note_interrupted_evaluation(workdir, step)
      continue  # steps() ends here; the caller saves this step.
    if progress.itstime(step, spec.checkpoint.every_steps, num_steps):
      check_finite(jax.device_get(metrics), step, skipped)
      ckpt.maybe_save(step, state)
      clock.resume()
  window.close()
  return state, history


def compile_together(spec, setup, state, mesh, image_shape) -> None:
  """On several processes, compiles the train step and waits for all.

  Each process compiles at its first call, and under load one can finish
  long before another; gloo (XLA:CPU's collectives) then gives up at the
  step's first collective after 30 s without its peer ('Gloo context
  initialization failed'). Compiled ahead (jit reuses the executable) and
  met at a barrier, the processes start step 1 together. On one process
  nothing happens here: the first step compiles, as before.
  """
  if jax.process_count() == 1:
    return
  batch = spec.train_data.batch_size

  def arg(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=setup.data_sharding)

  with jax.set_mesh(mesh):
    setup.train_step.lower(
      state, arg((batch, *image_shape), jnp.uint8), arg((batch,), jnp.int32),
      arg((batch, 2), jnp.int32),
    ).compile()  # fmt: skip
  multihost_utils.sync_global_devices('vmoe_jsd: train step compiled')


# A stop request abandoned the periodic evaluation of the step saved last;
# process 0 notes that step here, in the workdir, for the resumed run.
INTERRUPTED_EVALUATION = 'interrupted_evaluation.json'


def periodic_evaluations(spec, evals, params, step: int,
                         clock: progress.Progress, guard) -> bool:  # fmt: skip
  """The evaluations due after `step`; False when a stop request abandoned
  the test evaluation (between two of its batches; nothing was written)."""
  num_steps = clock.num_steps
  if progress.itstime(step, spec.evaluate.every_steps, num_steps):
    done = evals.test(params, step, guard.should_stop) is not None
    clock.resume()
    if not done:
      return False
  if evals.fewshot_fn and progress.itstime(step, spec.fewshot.every_steps,
                                           num_steps):  # fmt: skip
    done = evals.fewshot(params, step, guard.should_stop) is not None
    clock.resume()
    if not done:  # A resume redoes this step's evaluations, test included.
      return False
  return True


def note_interrupted_evaluation(workdir, step: int) -> None:
  if workdir is not None and jax.process_index() == 0:
    paths.write_json(paths.join(workdir, INTERRUPTED_EVALUATION),
                     {'step': step})  # fmt: skip


def redo_interrupted_evaluation(spec, evals, params, clock, guard, workdir,
                                log) -> bool:  # fmt: skip
  """Runs the periodic evaluations of clock.start_step again if a stop
  abandoned them there; False when a stop request abandons them again.

  Every process reads the note (the workdir is shared, as the checkpoints
  are); process 0 removes it once the evaluations are done (by then every
  process has read it: they ran the evaluations' collectives together). A
  note of another step (its checkpoint was never finished) is dropped.
  """
  if workdir is None:
    return True
  path = paths.join(workdir, INTERRUPTED_EVALUATION)
  if not paths.exists(path):
    return True
  step = clock.start_step
  if paths.read_json(path).get('step') == step:
    log(f'The evaluation of step {step} was interrupted; evaluating again.')
    if not periodic_evaluations(spec, evals, params, step, clock, guard):
      guard.stop_at(step, 'its evaluation')
      return False
  if jax.process_index() == 0:
    path.unlink(missing_ok=True)
  return True


def describe_run(spec, state, start_step, num_steps, mesh, writer, log,
                 is_main) -> None:  # fmt: skip
  """The model line on the console; the hyperparameters on a fresh run."""
  num_params = sum(x.size for x in jax.tree_util.tree_leaves(state.params))
  log(f'Model: {num_params:,} parameters; {num_steps} steps of '
      f'{spec.train_data.batch_size} images x 2 views; devices: '
      f'{jax.device_count()} (mesh {dict(mesh.shape)}).')  # fmt: skip
  if is_main and start_step == 0:
    writer.write_hparams(run_files.flat_hparams(spec.config))


def _stop_preempted(guard, ckpt, writer, workdir, history, log):
  """Reports a stop by signal (its step is saved); the history rows are
  already in workdir (run_files.History writes them as they come)."""
  del workdir, history
  writer.flush()
  writer.close()
  during = f' (during {guard.stopped_during}, which a resume runs again)'
  saved = (f'checkpoint saved in {ckpt.directory}' if guard.stopped_at
           else 'nothing trained yet, so nothing saved')  # fmt: skip
  log(f'Stopped by {guard.signal_name} after step {guard.stopped_at}'
      f'{during if guard.stopped_during else ""}: {saved}. Run the same '
      'command to resume.')  # fmt: skip
  return {'preempted_at_step': guard.stopped_at, 'signal': guard.signal_name}

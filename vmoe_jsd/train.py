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
  initialization,
  optimizer,
  paths,
  profiling,
  progress,
  resilience,
  run_files,
  sharding,
  streams,
)
from vmoe_jsd.config_errors import flatten
from vmoe_jsd.evaluation.periodic import Evaluations
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
  views_shape = (
    2 * spec.train_data.batch_size,
    settings.size,
    settings.size,
    image_shape[-1],
  )

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
  step_fn = make_train_step(
    spec.step, model, tx, schedule, settings, streams.stream(spec.seed, 'train')
  )
  train_step = jax.jit(
    step_fn,
    in_shardings=(state_shardings,) + (data_sharding,) * 3,
    out_shardings=(state_shardings, None),
    donate_argnums=(0,),
  )
  return TrainingSetup(
    model,
    tx,
    schedule,
    settings,
    init_state,
    init_key,
    abstract,
    state_shardings,
    data_sharding,
    train_step,
  )


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

  args = abstract_batch(setup, batch, image_shape)
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


def report(
  step, metrics, skipped, clock: progress.Progress, writer, log
) -> dict[str, Any]:
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
  config: ml_collections.ConfigDict,
  workdir: str,
  reevaluate: bool = False,
  allow_config_change: bool = False,
):
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
    return _run(
      spec, workdir, reevaluate, allow_config_change, is_main, log, guard
    )


@dataclasses.dataclass
class RunContext:
  """What the loop and its periodic actions share within one run.

  Attributes:
    spec: the resolved run.
    mesh: the ('data', 'expert') mesh.
    setup: the model, optimizer and compiled step (build_training).
    ckpt: the workdir's checkpoints.
    evals: the run's evaluations.
    clock: steps, images/s, ETA and the training time.
    guard: the stop-signal guard (resilience.PreemptionGuard).
    writer: the metric writer (TensorBoard).
    log: prints on process 0.
    workdir: the run's folder (None: notes nothing there).
    history: each report's row goes here (run_files.History or a list).
    profile_dir: config.profile's trace goes here (None: not traced).
  """

  spec: config_lib.RunSpec
  mesh: Any
  setup: TrainingSetup
  ckpt: checkpoints.Checkpointer
  evals: Evaluations
  clock: progress.Progress
  guard: resilience.PreemptionGuard
  writer: Any
  log: Callable[[str], None]
  workdir: Any = None
  history: Any = dataclasses.field(default_factory=list)
  profile_dir: str | None = None


def _run(spec, workdir, reevaluate, allow_config_change, is_main, log, guard):
  """train_and_evaluate's story, with the workdir locked."""
  # --- Config: a finished run is left as it is; a resume keeps its config.
  finished = run_files.finished_result(workdir, spec.num_steps or None)
  keep = finished is not None and not reevaluate
  run_files.on_process_0(
    lambda: run_files.check_resume_config(
      workdir, spec.config, allow_config_change, log, record=not keep
    ),
    "the config differs from the workdir's config.json",
  )
  if keep:
    log(
      f'{workdir} has finished ({finished["num_train_steps"]} steps, test '
      f'accuracy {finished["accuracy"]:.4f}); results.json kept. Pass '
      '--reevaluate to evaluate its final checkpoint again.'
    )
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
    workdir,
    spec.checkpoint.every_steps,
    spec.checkpoint.keep_last,
    spec.checkpoint.asynchronous,
    log=log,
  )
  state = restore_or_init(spec, setup, ckpt, mesh, log)
  start_step = int(jax.device_get(state.step))
  describe_run(spec, state, start_step, num_steps, mesh, writer, log, is_main)
  evals = Evaluations.build(spec, mesh, test_ds, writer, log)

  # --- Loop (the history is written as it goes, the time kept). ----------
  batch_size = spec.train_data.batch_size
  clock = progress.Progress(start_step, num_steps, batch_size)
  history = run_files.History(
    workdir / run_files.HISTORY,
    start_step,
    is_main,
    seconds_fn=lambda: clock.train_seconds,
  )
  clock.train_seconds = history.train_seconds_until(start_step, batch_size)
  run = RunContext(
    spec,
    mesh,
    setup,
    ckpt,
    evals,
    clock,
    guard,
    writer,
    log,
    workdir,
    history,
    str(workdir) if is_main else None,
  )
  state = train_loop(run, state, train_ds)
  stopped = guard.stopped_at is not None
  if guard.stopped_at != 0:  # Stopped before step 1: nothing to save.
    last = guard.stopped_at if stopped else num_steps
    ckpt.maybe_save(last, state, force=True)
  ckpt.close()
  if stopped:
    return _stop_preempted(run)
  return _finish(run, state, finished, train_ds, test_ds, is_main)


def _finish(run: RunContext, state, finished, train_ds, test_ds, is_main):
  """The end: the final evaluation (a stop request ends it between
  batches; its checkpoint is saved, and a resume evaluates again), then
  results.json."""
  spec, num_steps = run.spec, run.clock.num_steps
  result = run.evals.final(state.params, num_steps, run.guard.should_stop)
  if result is None:
    run.guard.stop_at(num_steps, 'the final evaluation')
    return _stop_preempted(run)
  train_time = run.clock.train_seconds  # Of every segment since step 0.
  if finished is not None:  # --reevaluate: the training time stays.
    train_time = finished.get('train_seconds_excluding_compile', train_time)
  result.update(
    train_seconds_excluding_compile=train_time,
    num_train_steps=num_steps,
    # Unreadable images skipped (image folders; logged once each).
    skipped_images={
      'train': getattr(train_ds, 'num_skipped', 0),
      'test': getattr(test_ds, 'num_skipped', 0),
    },
    consistency_weight=spec.step.consistency_weight,
  )
  if is_main:
    paths.write_json(run.workdir / run_files.RESULTS, result)
  run.writer.flush()
  run.writer.close()
  return result


def train_loop(run: RunContext, state, train_ds):
  """Steps from clock.start_step to clock.num_steps (or to a stop signal),
  with every periodic action; returns the state. Each report's row goes to
  run.history. A stop request during a periodic evaluation ends the loop at
  that step and notes it in the workdir, so that the resumed run evaluates
  it again (before its first step) and writes what an uninterrupted run
  writes."""
  spec, clock, guard = run.spec, run.clock, run.guard
  start_step, num_steps = clock.start_step, clock.num_steps
  if not redo_interrupted_evaluation(run, state.params):
    return state
  compile_together(
    run.setup, state, run.mesh, spec.train_data.batch_size, train_ds.image_shape
  )
  window = profiling.ProfileWindow(
    spec.profile, run.profile_dir, start_step, num_steps, run.log
  )
  put_batch = sharding.make_put_batch(run.mesh)
  batches = data.prefetch(
    train_ds.train_batches(
      spec.train_data.batch_size,
      seed=spec.seed,
      start_step=start_step,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
    )
  )
  # Under 'skip': a device scalar, summed without host syncs.
  skipped = 0 if spec.step.nan_policy == 'skip' else None
  for step in guard.steps(start_step, num_steps, on_exit=run.ckpt.wait):
    window.before_step(step)
    batch = next(batches)
    arrays = put_batch(batch['image'], batch['label'], data.orig_sizes(batch))
    with jax.set_mesh(run.mesh):
      state, metrics = run.setup.train_step(state, *arrays)
    window.after_step(step, state)
    clock.step_done()
    if skipped is not None:
      skipped = skipped + metrics['skipped']
    if progress.itstime(
      step, spec.report_every, num_steps, last=True, first=start_step + 1
    ):
      row = report(step, metrics, skipped, clock, run.writer, run.log)
      run.history.append(row)
    if not periodic_evaluations(run, state.params, step):
      guard.stop_at(step, 'its evaluation')
      note_interrupted_evaluation(run.workdir, step)
      continue  # steps() ends here; the caller saves this step.
    if progress.itstime(step, spec.checkpoint.every_steps, num_steps):
      check_finite(jax.device_get(metrics), step, skipped)
      run.ckpt.maybe_save(step, state)
      clock.resume()
  window.close()
  return state


def abstract_batch(setup: TrainingSetup, batch_size: int, image_shape):
  """The train step's (images, labels, orig_sizes) as sharded abstract
  arrays, for lowering it without data."""

  def arg(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=setup.data_sharding)

  return (
    arg((batch_size, *image_shape), jnp.uint8),
    arg((batch_size,), jnp.int32),
    arg((batch_size, 2), jnp.int32),
  )


def compile_together(setup, state, mesh, batch_size, image_shape) -> None:
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
  args = abstract_batch(setup, batch_size, image_shape)
  with jax.set_mesh(mesh):
    setup.train_step.lower(state, *args).compile()
  multihost_utils.sync_global_devices('vmoe_jsd: train step compiled')


# A stop request abandoned the periodic evaluation of the step saved last;
# process 0 notes that step here, in the workdir, for the resumed run.
INTERRUPTED_EVALUATION = 'interrupted_evaluation.json'


def periodic_evaluations(run: RunContext, params, step: int) -> bool:
  """The evaluations due after `step`; False when a stop request abandoned
  one (between two of its batches; nothing was written)."""
  spec, num_steps, evals = run.spec, run.clock.num_steps, run.evals
  due = []
  if progress.itstime(step, spec.evaluate.every_steps, num_steps):
    due.append(evals.test)
  if evals.has_fewshot and progress.itstime(
    step, spec.fewshot.every_steps, num_steps
  ):
    due.append(evals.fewshot)
  for evaluation in due:
    done = evaluation(params, step, run.guard.should_stop) is not None
    run.clock.resume()
    if not done:  # A resume redoes this step's evaluations, all of them.
      return False
  return True


def note_interrupted_evaluation(workdir, step: int) -> None:
  if workdir is not None and jax.process_index() == 0:
    path = paths.join(workdir, INTERRUPTED_EVALUATION)
    paths.write_json(path, {'step': step})


def redo_interrupted_evaluation(run: RunContext, params) -> bool:
  """Runs the periodic evaluations of clock.start_step again if a stop
  abandoned them there; False when a stop request abandons them again.

  Every process reads the note (the workdir is shared, as the checkpoints
  are); process 0 removes it once the evaluations are done (by then every
  process has read it: they ran the evaluations' collectives together). A
  note of another step (its checkpoint was never finished) is dropped.
  """
  if run.workdir is None:
    return True
  path = paths.join(run.workdir, INTERRUPTED_EVALUATION)
  if not paths.exists(path):
    return True
  step = run.clock.start_step
  if paths.read_json(path).get('step') == step:
    run.log(f'The evaluation of step {step} was interrupted; evaluating again.')
    if not periodic_evaluations(run, params, step):
      run.guard.stop_at(step, 'its evaluation')
      return False
  if jax.process_index() == 0:
    path.unlink(missing_ok=True)
  return True


def describe_run(
  spec, state, start_step, num_steps, mesh, writer, log, is_main
) -> None:
  """The model line on the console; the hyperparameters on a fresh run."""
  num_params = sum(x.size for x in jax.tree_util.tree_leaves(state.params))
  log(
    f'Model: {num_params:,} parameters; {num_steps} steps of '
    f'{spec.train_data.batch_size} images x 2 views; devices: '
    f'{jax.device_count()} (mesh {dict(mesh.shape)}).'
  )
  if is_main and start_step == 0:
    writer.write_hparams(flatten(spec.config, stringify=True))


def _stop_preempted(run: RunContext):
  """Reports a stop by signal (its step is saved); the history rows are
  already in the workdir (run_files.History writes them as they come)."""
  guard = run.guard
  run.writer.flush()
  run.writer.close()
  during = f' (during {guard.stopped_during}, which a resume runs again)'
  saved = 'nothing trained yet, so nothing saved'
  if guard.stopped_at:
    saved = f'checkpoint saved in {run.ckpt.directory}'
  run.log(
    f'Stopped by {guard.signal_name} after step {guard.stopped_at}'
    f'{during if guard.stopped_during else ""}: {saved}. Run the same '
    'command to resume.'
  )
  return {'preempted_at_step': guard.stopped_at, 'signal': guard.signal_name}

"""Every evaluation of the project, in one registry, built from the spec.

Training (train.py), `eval_main` and `analyze` run their evaluations through
an `Evaluator`: it builds the evaluation model, the views key and each
named evaluation's jitted program once from the resolved RunSpec
(`Context.build`), then runs them by name as often as asked. Each entry of
EVALUATIONS says how to build the evaluation (a module-level
`build(ctx)`), how its result becomes TensorBoard scalars and how it reads
on the console.

`build(ctx)` returns `run(params, split, should_stop) -> result dict`:
`split` is the test split wrapped in a `core.RaisingSplit`, so a stop
request between two batches raises `core.EvaluationStopped` and no partial
figure escapes; an evaluation that reads other data (few-shot) wraps it
the same way with `should_stop`.

Adding an evaluation: one module under evaluation/ with its `build(ctx)`
(and, if it has a config block, its spec checked in config_lib), plus one
entry below (docs/architecture.md, "An evaluation").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax

from vmoe_jsd import sharding, streams
from vmoe_jsd.evaluation import (
  accuracy,
  attacks,
  core,
  corruptions,
  experts,
  fewshot,
  serving,
  stability,
)

Result = Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class Context:
  """What every evaluation is built from.

  Attributes:
    spec: the resolved run (config_lib.RunSpec).
    mesh: the ('data', 'expert') device mesh.
    put_batch: sharding.make_put_batch(mesh).
    eval_model: the deterministic evaluation model.
    views_key: the key of the two evaluation views of each example.
  """

  spec: Any
  mesh: Any
  put_batch: Callable
  eval_model: Any
  views_key: jax.Array

  @classmethod
  def build(cls, spec, mesh) -> Context:
    return cls(
      spec,
      mesh,
      sharding.make_put_batch(mesh),
      spec.model.build_eval(),
      streams.stream(spec.seed, 'eval_views'),
    )

  @property
  def batch_size(self) -> int:
    return self.spec.test_data.batch_size

  def batched(self, make_step, run_fn, block, *step_args):
    """The common build: jits make_step(eval_model, model spec, views,
    block, *step_args) once, and runs run_fn(step, params, split, batch
    size, block, put_batch) over the test split."""
    spec = self.spec
    step = jax.jit(
      make_step(self.eval_model, spec.model, spec.views, block, *step_args)
    )

    def run(params, split, should_stop):
      del should_stop  # split raises on a stop.
      return run_fn(step, params, split, self.batch_size, block, self.put_batch)

    return run


@dataclasses.dataclass(frozen=True)
class Evaluation:
  """One registered evaluation.

  Attributes:
    build: ctx -> run(params, split, should_stop) -> result.
    table: result -> its console text ('' for nothing to show).
    scalars: result -> {TensorBoard tag: value} (None: none written).
  """

  build: Callable[[Context], Callable[..., dict]]
  table: Callable[[Result], str]
  scalars: Callable[[Result], dict[str, float]] | None = None


def _suite_table(name: str, format_fn) -> Callable[[Result], str]:
  return lambda result: f'[{name}]\n' + format_fn(result)


EVALUATIONS: dict[str, Evaluation] = {
  'accuracy': Evaluation(
    accuracy.build, accuracy.table, accuracy.routing_scalars
  ),
  'stability': Evaluation(
    stability.build,
    stability.format_stability_table,
    stability.stability_scalars,
  ),
  'fewshot': Evaluation(fewshot.build, fewshot.format_results, fewshot.scalars),
  'corruptions': Evaluation(
    corruptions.build,
    _suite_table('corruptions', corruptions.format_corruptions),
  ),
  'attacks': Evaluation(
    attacks.build, _suite_table('attacks', attacks.format_attacks)
  ),
  'cheap': Evaluation(
    serving.build, _suite_table('cheap', serving.format_cheap)
  ),
  'expert_by_class': Evaluation(experts.build, experts.table),
}


def _never() -> bool:
  return False


class Evaluator:
  """The named evaluations of a run, each built once and run on demand.

  `evaluator(name, params, dataset, should_stop)` runs one on `dataset`
  (the test split) under the mesh; a stop request raises
  core.EvaluationStopped between two batches.
  """

  def __init__(self, spec, mesh, names: Iterable[str]):
    self.ctx = Context.build(spec, mesh)
    self.runs = {n: EVALUATIONS[n].build(self.ctx) for n in names}

  def __call__(self, name: str, params, dataset, should_stop=None) -> dict:
    should_stop = should_stop or _never
    split = core.RaisingSplit(dataset, should_stop)
    with jax.set_mesh(self.ctx.mesh):
      return self.runs[name](params, split, should_stop)

  def __contains__(self, name: str) -> bool:
    return name in self.runs


def table(name: str, result: Result) -> str:
  """The console text of `name`'s result."""
  return EVALUATIONS[name].table(result)


def scalars(name: str, result: Result) -> dict[str, float]:
  """The TensorBoard scalars of `name`'s result ({} if it writes none)."""
  fn = EVALUATIONS[name].scalars
  return {} if fn is None else fn(result)

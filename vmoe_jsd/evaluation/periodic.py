"""The evaluations of a training run, and where their results go.

train.py builds one `Evaluations` per run: the registry's evaluations
(registry.py) that config.evaluate, config.fewshot and
config.evaluate.robustness ask for, run at the cadences of train.py's loop,
with their scalars in TensorBoard, their tables on the console and the
routing-map figure (figures.RoutingMapWriter) at each test evaluation.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax

from vmoe_jsd.evaluation import core, fewshot, figures, registry


@dataclasses.dataclass
class Evaluations:
  """The evaluations of a run (evaluation/registry.py) and where their
  results go.

  `test(params, step)` measures accuracy, routing across views, stability
  and, when config.evaluate.robustness.enabled, the robustness suites on
  the test split; `fewshot(params, step)` the few-shot accuracies. Both
  give None when a stop request abandoned them (nothing is written then).
  """

  evaluator: registry.Evaluator
  test_ds: Any
  writer: Any
  log: Callable[[str], None]
  suites: tuple[str, ...]  # robustness suites run at every evaluation
  routing_maps: figures.RoutingMapWriter | None

  @classmethod
  def build(cls, spec, mesh, test_ds, writer, log) -> Evaluations:
    suites = ()
    if spec.robustness is not None and spec.robustness.enabled:
      suites = spec.robustness.suites
    names = ['accuracy', 'stability', *suites]
    if spec.fewshot.enabled:
      names.append('fewshot')
    evaluator = registry.Evaluator(spec, mesh, names)
    routing_maps = None
    if jax.process_count() == 1:  # Its jitted call runs on one process.
      routing_maps = figures.RoutingMapWriter.build(evaluator.ctx, test_ds)
    return cls(evaluator, test_ds, writer, log, suites, routing_maps)

  @property
  def has_fewshot(self) -> bool:
    return 'fewshot' in self.evaluator

  def test(self, params, step: int, should_stop=None):
    """The test evaluation of `step`: its dict, or None."""

    def run(name):
      return self.evaluator(name, params, self.test_ds, should_stop)

    try:
      t0 = time.time()
      result = run('accuracy')
      eval_seconds = time.time() - t0
      stab = run('stability')
      if self.suites:  # Before anything is written.
        result['robustness'] = {name: run(name) for name in self.suites}
    except core.EvaluationStopped:
      return None
    result['step'] = step
    result['eval_seconds'] = eval_seconds
    self.writer.write_scalars(step, registry.scalars('accuracy', result))
    self.log(
      f'[eval step {step}] test accuracy {result["accuracy"]:.4f} on '
      f'{result["num_examples"]} images ({result["eval_seconds"]:.1f}s)'
    )
    if result['routing']:
      self.log(registry.table('accuracy', result))
    if stab:
      result['stability'] = stab
      self.writer.write_scalars(step, registry.scalars('stability', stab))
      self.log(registry.table('stability', stab))
    if self.routing_maps is not None:
      self.routing_maps.write(self.writer, step, params)
    return result

  def final(self, params, step: int, should_stop=None):
    """The end of training: the test evaluation and, if on, few-shot."""
    result = self.test(params, step, should_stop)
    if result is not None and self.has_fewshot:
      result['fewshot'] = self.fewshot(params, step, should_stop)
      if result['fewshot'] is None:
        return None
    return result

  def fewshot(self, params, step: int, should_stop=None):
    """The few-shot results of `step`, or None."""
    try:
      out = self.evaluator('fewshot', params, self.test_ds, should_stop)
    except core.EvaluationStopped:
      return None
    self.writer.write_scalars(step, registry.scalars('fewshot', out))
    self.log(fewshot.format_results(out, step))
    return out

r"""Reproduction study of the router-consistency losses (issue 8, item 4).

Trains configs/default.py without consistency (weight 0) and with each
consistency loss, as subprocesses of `python -m vmoe_jsd.main`, one workdir
per run under runs/study/{n<steps>,full}/<setting>_s<seed>. A run whose
workdir holds results.json is skipped and an interrupted run resumes from
its last checkpoint (main does that), so rerunning the same command
finishes the study. Reports are written FROM the runs' results.json files,
never by hand.

  # Everything (resumable): the weight search, then the finalists, 3 seeds.
  python tools/study.py

Two phases:
  1. search (`--phase=search`): every loss at weights 0.03, 0.1, 0.3 on a
     400-step schedule, seed 0, plus the baseline: 22 runs of about 1.2 min
     alone on 2 CPU cores. `choose` picks each loss's weight and the best
     `--finalists` losses by the issue's target conditions (see its
     docstring); writes docs/search.md and docs/search_choice.json.
  2. final (`--phase=final`, or the default `all`): the baseline, jsd@0.1
     (the seed paper's setting) and the finalists on the full schedule
     (2300 steps, about 5.5 min per run alone), seeds 0,1,2; analyze on the
     first seed of each for its routing-map figure; writes docs/results.md
     with the search's table.

  # Exactly some settings at some schedule (pilots, checks):
  python tools/study.py --steps=300 --seeds=0 \
      --settings=none,jsd,hard_target,cross_correlation --label=pilot \
      --report=/tmp/pilot.md

A setting is `LOSS` (its weight from DEFAULT_WEIGHTS), `LOSS@WEIGHT`, or
`none` (consistency weight 0, the baseline). Extra `--override=KEY=VALUE`
flags go to every run (e.g. `--override=consistency.margin=2.0`).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import fcntl
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, 'configs', 'default.py')

# Weights of the full study. jsd 0.1 is the seed paper's setting and this
# repository's default; the others are first guesses of the same order
# (each loss is O(0.1-1) at initialisation), to be replaced by the result of
# a search on the short schedule (see docs/results.md).
DEFAULT_WEIGHTS = {
  'jsd': 0.1,
  'sym_kl': 0.1,
  'l2': 0.1,
  'cross_correlation': 0.1,
  'hard_target': 0.1,
  'margin': 0.1,
  'jsd_entropy': 0.1,
}
DEFAULT_SETTINGS = ('none',) + tuple(DEFAULT_WEIGHTS)


# Named recipes: (loss, weight, extra overrides). 'prc' is Pairwise Router
# Consistency's released setting (configs/imagenet_prc.py): the
# cross-correlation loss at 5e-3 x (diagonal 1 : off-diagonal 10), the class
# tokens paired, the importance and load losses off.
RECIPES = {
  'prc': ('cross_correlation', 5e-3, (
    'consistency.diagonal_weight=1.0', 'consistency.offdiagonal_weight=10.0',
    'consistency.include_cls=True',
    'model.encoder.moe.router.importance_loss_weight=0.0',
    'model.encoder.moe.router.load_loss_weight=0.0',
  )),
}  # fmt: skip
# A '/k1' suffix trains the setting with top-1 routing (K=1) instead of
# the config's K=2.
TOP1_SUFFIX = '/k1'


def setting_overrides(name: str) -> list[str]:
  """The config overrides a setting adds beyond its loss and weight."""
  base, top1 = _split_top1(name)
  extra = list(RECIPES[base][2]) if base in RECIPES else []
  if top1:
    extra.append('model.encoder.moe.router.num_selected_experts=1')
  return extra


def _split_top1(text: str) -> tuple[str, bool]:
  if text.endswith(TOP1_SUFFIX):
    return text[: -len(TOP1_SUFFIX)], True
  return text, False


def parse_setting(text: str) -> tuple[str, str, float]:
  """'none' | 'LOSS' | 'LOSS@WEIGHT' | a RECIPES name, optionally with the
  '/k1' suffix (top-1 routing) -> (name, loss, weight)."""
  base, top1 = _split_top1(text)
  suffix = TOP1_SUFFIX if top1 else ''
  if base == 'none':
    return 'none' + suffix, 'jsd', 0.0
  if base in RECIPES:
    return base + suffix, RECIPES[base][0], RECIPES[base][1]
  name, loss, weight = _parse_loss(base)
  return name + suffix, loss, weight


def _parse_loss(text: str) -> tuple[str, str, float]:
  loss, _, weight = text.partition('@')
  if loss not in DEFAULT_WEIGHTS:
    raise SystemExit(
      f'--settings: {loss!r} is not a consistency loss; choose from '
      f'{["none", *RECIPES, *DEFAULT_WEIGHTS]} (optionally LOSS@WEIGHT, '
      f'and {TOP1_SUFFIX!r} after any of them for top-1 routing)'
    )
  w = float(weight) if weight else DEFAULT_WEIGHTS[loss]
  if not w > 0:
    raise SystemExit(f'--settings: weight of {text!r} must be > 0')
  return f'{loss}@{w:g}', loss, w


def run_dir(root: str, name: str, seed: int, steps: int | None) -> str:
  schedule = f'n{steps}' if steps else 'full'
  folder = name.replace('/', '_')  # 'none/k1' -> 'none_k1'
  return os.path.join(root, schedule, f'{folder}_s{seed}')


def run_flags(name, loss, weight, seed, steps, overrides) -> list[str]:
  flags = [
    f'--config={CONFIG}',
    f'--config.seed={seed}',
    f'--config.consistency.loss={loss}',
    f'--config.consistency.weight={weight}',
  ]
  if steps:
    flags.append(f'--config.num_train_steps={steps}')
  flags += [f'--config.{o}' for o in setting_overrides(name)]
  flags += [f'--config.{o}' for o in overrides]
  return flags


def run_one(workdir: str, flags: list[str]) -> None:
  """Trains one run (resuming if interrupted); records its wall time.

  Two study processes that share a run folder take turns on it (a lock
  file): the second waits, then finds results.json and skips the run.
  """
  os.makedirs(workdir, exist_ok=True)
  lock = open(os.path.join(workdir, '.study_lock'), 'w')  # noqa: SIM115
  fcntl.flock(lock, fcntl.LOCK_EX)
  try:
    if os.path.exists(os.path.join(workdir, 'results.json')):
      print(f'done meanwhile by another process: {workdir}', flush=True)
      return
    _train(workdir, flags)
  finally:
    lock.close()


def _train(workdir: str, flags: list[str]) -> None:
  cmd = [sys.executable, '-m', 'vmoe_jsd.main', f'--workdir={workdir}', *flags]
  print('$', ' '.join(cmd), flush=True)
  t0 = time.time()
  with open(os.path.join(workdir, 'log.txt'), 'a') as log:
    proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
  if proc.returncode:
    raise SystemExit(
      f'run failed (exit {proc.returncode}); see {workdir}/log.txt'
    )
  wall = time.time() - t0
  path = os.path.join(workdir, 'study_wall_seconds.json')
  previous = []
  if os.path.exists(path):
    with open(path) as f:
      previous = json.load(f)
  with open(path, 'w') as f:
    json.dump(previous + [wall], f, allow_nan=False)


def analyze_one(workdir: str, flags: list[str]) -> str:
  """Runs vmoe_jsd.analyze on a finished run (once); returns its folder."""
  out = os.path.join(workdir, 'analysis')
  if not os.path.exists(os.path.join(out, 'results.json')):
    cmd = [sys.executable, '-m', 'vmoe_jsd.analyze', f'--workdir={workdir}',
           f'--out={out}', *flags]  # fmt: skip
    print('$', ' '.join(cmd), flush=True)
    with open(os.path.join(workdir, 'analyze_log.txt'), 'w') as log:
      proc = subprocess.run(cmd, cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT)  # fmt: skip
    if proc.returncode:
      raise SystemExit(f'analyze failed; see {workdir}/analyze_log.txt')
  return out


# ----------------------------------------------------------------------------
# The weight search and the choice of finalists.
# ----------------------------------------------------------------------------
SEARCH_STEPS = 400
SEARCH_WEIGHTS = (0.03, 0.1, 0.3)
# With one search seed there is no baseline std; the accuracy condition of
# the search allows this many points (fraction) below the baseline instead.
SEARCH_ACCURACY_TOLERANCE = 0.01
# The seed paper's setting, always in the final comparison as the reference.
REFERENCE = 'jsd@0.1'


def search_score(check: dict) -> tuple[int, float]:
  """Order of merit of one setting against the baseline (higher is better).

  First the number of the target's four conditions it meets (kappa +0.15
  on every layer, entropy no higher than the baseline's, accuracy, load at
  most twice the fair share), then its smallest per-layer kappa gain.
  """
  passed = sum(
    bool(check[k]) for k in ('kappa_ok', 'entropy_ok', 'accuracy_ok', 'load_ok')
  )
  return passed, check['min_d_kappa']


def choose(
  base: dict,
  aggs: dict,
  parsed,
  finalists: int,
  tolerance: float = SEARCH_ACCURACY_TOLERANCE,
) -> dict:
  """The search's decision, from its aggregates (documented in the report).

  For each loss, its weight with the best `search_score`; then the
  `finalists` losses whose chosen settings score best go to the full
  schedule, beside the baseline and the reference (jsd@0.1).

  Returns {'checks': {setting: check}, 'best_weight': {loss: setting},
  'finalists': [setting, ...]} (finalists best first).
  """
  checks = {}
  by_loss: dict[str, list[str]] = {}
  for name, loss, _ in parsed:
    if name == 'none' or name not in aggs:
      continue
    checks[name] = target_check(base, aggs[name], tolerance)
    by_loss.setdefault(loss, []).append(name)
  best = {
    loss: max(names, key=lambda n: search_score(checks[n]))
    for loss, names in by_loss.items()
  }
  ranked = sorted(
    best.values(), key=lambda n: search_score(checks[n]), reverse=True
  )
  return {
    'checks': checks,
    'best_weight': best,
    'finalists': ranked[:finalists],
  }


def search_table(base: dict, aggs: dict, decision: dict, layers) -> list[str]:
  """Markdown rows of the search: one per setting, the choice marked."""
  short = lambda layer: layer.replace('encoderblock_', 'b')
  head = ' / '.join(short(x) for x in layers)
  lines = [
    f'| setting | accuracy (%) | Δkappa {head} | H/Hmax {head} | '
    f'max/fair {head} | conditions met (of 4) | chosen |',
    '| --- | --- | --- | --- | --- | --- | --- |',
  ]

  def row(name, agg, check):
    lay = agg['layers']
    ent = ' / '.join(f'{lay[x]["entropy_fraction"][0]:.2f}' for x in layers)
    mf = ' / '.join(f'{lay[x]["max_load_share"][0]:.2f}' for x in layers)
    acc = f'{agg["accuracy"][0] * 100:.2f}'
    if check is None:
      return f'| {name} (baseline) | {acc} | — | {ent} | {mf} | — | — |'
    dk = ' / '.join(f'{check["d_kappa"][x]:+.3f}' for x in layers)
    mark = []
    if name in decision['best_weight'].values():
      mark.append('best weight')
    if name in decision['finalists']:
      mark.append(f'finalist {decision["finalists"].index(name) + 1}')
    return (
      f'| {name} | {acc} | {dk} | {ent} | {mf} | '
      f'{search_score(check)[0]} | {", ".join(mark) or "—"} |'
    )

  lines.append(row('none', base, None))
  for name, check in decision['checks'].items():
    lines.append(row(name, aggs[name], check))
  return lines


# ----------------------------------------------------------------------------
# Aggregation and the report.
# ----------------------------------------------------------------------------
def mean_std(values):
  """(mean, sample std or nan for n < 2, n)."""
  values = [v for v in values if v is not None and math.isfinite(v)]
  n = len(values)
  if not n:
    return float('nan'), float('nan'), 0
  mean = sum(values) / n
  if n < 2:
    return mean, float('nan'), n
  var = sum((v - mean) ** 2 for v in values) / (n - 1)
  return mean, math.sqrt(var), n


def fmt(mean, std, digits=3, scale=1.0):
  if not math.isfinite(mean):
    return 'n/a'
  if math.isfinite(std):
    return f'{mean * scale:.{digits}f} ± {std * scale:.{digits}f}'
  return f'{mean * scale:.{digits}f}'


def aggregate(results: list[dict]) -> dict:
  """Mean/std over seeds of the figures the report shows."""
  agg = {
    'accuracy': mean_std([r['accuracy'] for r in results]),
    'train_seconds': mean_std(
      [r.get('train_seconds_excluding_compile') for r in results]
    ),
    'wall_seconds': mean_std([r.get('_wall') for r in results]),
    'layers': {},
  }
  layers = results[0]['routing'].keys()
  for layer in layers:
    rows = [r['routing'][layer] for r in results]
    entry = {
      k: mean_std([row[k] for row in rows])
      for k in ('agreement', 'chance', 'kappa', 'jsd', 'confidence',
                'entropy_fraction', 'dropped')
    }  # fmt: skip
    num_experts = len(rows[0]['load'])
    entry['load'] = [
      mean_std([row['load'][e] for row in rows])[0] for e in range(num_experts)
    ]
    entry['max_load_share'] = mean_std(
      [max(row['load']) * num_experts for row in rows]
    )
    flips = [r.get('stability', {}).get('flip_rate', {}).get(layer) for r in
             results]  # fmt: skip
    if all(flips):
      entry['flip'] = {
        name: mean_std([f[name] for f in flips]) for name in flips[0]
      }
    agg['layers'][layer] = entry
  return agg


def target_check(base: dict, agg: dict, tolerance: float = 0.0) -> dict:
  """Issue 8's target for one setting against the baseline aggregate.

  Accuracy must be at least the baseline mean minus one std over seeds, or
  minus `tolerance` (a fraction) where that is larger (the one-seed search
  has no std).
  """
  std = base['accuracy'][1] if math.isfinite(base['accuracy'][1]) else 0.0
  acc_floor = base['accuracy'][0] - max(std, tolerance)
  d_kappa = {
    layer: agg['layers'][layer]['kappa'][0] - base['layers'][layer]['kappa'][0]
    for layer in base['layers']
  }
  entropy_ok = all(
    agg['layers'][layer]['entropy_fraction'][0]
    <= base['layers'][layer]['entropy_fraction'][0]
    for layer in base['layers']
  )
  load_ok = all(
    agg['layers'][layer]['max_load_share'][0] <= 2.0 for layer in base['layers']
  )
  acc_ok = agg['accuracy'][0] >= acc_floor
  kappa_ok = all(d >= 0.15 for d in d_kappa.values())
  return {
    'd_kappa': d_kappa,
    'min_d_kappa': min(d_kappa.values()),
    'kappa_ok': kappa_ok,
    'entropy_ok': entropy_ok,
    'accuracy_ok': acc_ok,
    'load_ok': load_ok,
    'met': kappa_ok and entropy_ok and acc_ok and load_ok,
  }


def summary_table(aggs, names, layers, base, tolerance) -> list[str]:
  """The study in one table: means ± std over seeds, and the target."""
  if not names:
    return []
  short = lambda layer: layer.replace('encoderblock_', 'b')
  head = ' / '.join(short(x) for x in layers)
  has_flip = all(
    'shift_1' in aggs[n]['layers'][x].get('flip', {})
    for n in names
    for x in layers
  )
  lines = [
    '## Summary',
    '',
    'Means over seeds (± sample std where there are several). kappa: '
    'top-1 agreement of matched patches of two views beyond chance; '
    'H/Hmax: router entropy (1 = uniform); max/fair: largest expert load '
    '× E; flip: share of patches whose top-1 expert changes under a '
    '1-pixel shift. Definitions and the other figures below.',
    '',
    f'| setting | runs | accuracy (%) | kappa {head} | H/Hmax {head} | '
    f'max/fair {head} |' + (f' flip, 1 px {head} |' if has_flip else '')
    + ' issue 8 target |',
    '| --- | --- | --- | --- | --- | --- |' + (' --- |' if has_flip else '')
    + ' --- |',
  ]  # fmt: skip
  for name in names:
    a = aggs[name]
    lay = a['layers']

    def per_layer(get, digits, lay=lay):
      return ' / '.join(fmt(*get(lay[x])[:2], digits) for x in layers)

    if name == 'none':
      target = 'baseline'
    elif base is None:
      target = 'n/a'
    else:
      target = 'met' if target_check(base, a, tolerance)['met'] else 'not met'
    row = (
      f'| {name} | {a["accuracy"][2]} | {fmt(*a["accuracy"][:2], 2, 100)} | '
      f'{per_layer(lambda e: e["kappa"], 3)} | '
      f'{per_layer(lambda e: e["entropy_fraction"], 2)} | '
      f'{per_layer(lambda e: e["max_load_share"], 2)} |'
    )
    if has_flip:
      row += f' {per_layer(lambda e: e["flip"]["shift_1"], 3)} |'
    lines.append(row + f' {target} |')
  return lines + ['']


def yes(flag: bool) -> str:
  return 'yes' if flag else '**no**'


def write_report(
  path,
  label,
  steps,
  seeds,
  settings,
  runs,
  figures,
  argv,
  jobs=1,
  sections=(),
  tolerance=0.0,
  intro=(),
):
  """docs/results.md from the aggregated runs.

  `intro` lines go after the header, `sections` lines before the closing
  'What this shows' part; `tolerance` is target_check's accuracy tolerance.
  """
  aggs = {name: aggregate(rs) for name, rs in runs.items() if rs}
  names = [s for s in settings if s in aggs]
  base = aggs.get('none')
  layers = list(next(iter(aggs.values()))['layers']) if aggs else []
  short = lambda layer: layer.replace('encoderblock_', 'block ')
  schedule = f'{steps} steps' if steps else 'the full default schedule'
  lines = [
    f'# Consistency-loss study: {label}',
    '',
    '*Generated by `tools/study.py` from the runs\' `results.json`; do not '
    'edit by hand.*',
    '',
    f'- Command: `python {" ".join(argv)}`',
    f'- Schedule: `configs/default.py` with {schedule} '
    f'(`--config.num_train_steps={steps}`)' if steps else
    '- Schedule: `configs/default.py` as it is (2300 steps)',
    f'- Seeds: {", ".join(map(str, seeds))} (one run per seed and setting; '
    'std is the sample standard deviation over seeds, absent with one seed)',
    f'- Machine: {platform.machine()}, {os.cpu_count()} CPU cores, '
    f'{cpu_description()}, '
    f'{platform.python_implementation()} {platform.python_version()}; '
    f'generated {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC',
    f'- Code: commit {code_version()}',
    f'- Runs at once: {jobs} (train and wall times are of runs sharing the '
    'machine with each other and with whatever else ran)',
    '- Routing figures: the evaluation\'s two augmented views of each test '
    'image (fixed key), patch tokens; flip rates: clean centred view vs '
    'pixel noise and shifts (vmoe_jsd/stability.py) on the first 2000 test '
    'images.',
    '',
  ]  # fmt: skip
  lines += list(intro)
  if label.startswith('pilot'):
    lines += [
      f'**This is a pilot on a short schedule ({schedule}), not the study**: '
      'accuracies are far below the full schedule\'s and '
      + ('one seed cannot separate settings from seed noise. '
         if len(seeds) < 2 else '')
      + 'Read it as a check that the tooling works and as a first hint.',
      '',
    ]  # fmt: skip
  lines += summary_table(aggs, names, layers, base, tolerance)
  lines += [
    '## Accuracy and time',
    '',
    '| setting | runs | test accuracy (%) | train time (s, no compile) | '
    'wall time (s) |',
    '| --- | --- | --- | --- | --- |',
  ]
  for name in names:
    a = aggs[name]
    lines.append(
      f'| {name} | {a["accuracy"][2]} | {fmt(*a["accuracy"][:2], 2, 100)} | '
      f'{fmt(*a["train_seconds"][:2], 0)} | {fmt(*a["wall_seconds"][:2], 0)} |'
    )
  lines += [
    '',
    '## Routing across views, per MoE layer',
    '',
    'kappa = (agree - chance) / (1 - chance); chance = sum_e load_e^2; '
    'conf: mean top router probability; H/Hmax: router entropy / ln E; '
    'load: top-1 share per expert (mean over seeds); max/fair: largest '
    'load x E; dropped: token choices over capacity.',
    '',
    '| setting | layer | kappa | agree | chance | conf | H/Hmax | JSD | '
    'load | max/fair | dropped |',
    '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |',
  ]
  for name in names:
    for layer in layers:
      e = aggs[name]['layers'][layer]
      load = ' '.join(f'{x:.2f}' for x in e['load'])
      lines.append(
        f'| {name} | {short(layer)} | {fmt(*e["kappa"][:2])} | '
        f'{fmt(*e["agreement"][:2])} | {fmt(*e["chance"][:2])} | '
        f'{fmt(*e["confidence"][:2], 2)} | '
        f'{fmt(*e["entropy_fraction"][:2], 2)} | {fmt(*e["jsd"][:2], 4)} | '
        f'{load} | {fmt(*e["max_load_share"][:2], 2)} | '
        f'{fmt(*e["dropped"][:2])} |'
      )
  first = aggs[names[0]]['layers'][layers[0]] if names and layers else {}
  if 'flip' in first:
    pert = list(first['flip'])
    lines += [
      '',
      '## Routing stability: top-1 flip rate',
      '',
      'Fraction of patches whose top-1 expert changes under Gaussian pixel '
      'noise (sd on pixels in [0, 1]) or a shift of 1 or 2 pixels (down and '
      'right averaged, exact patch correspondence). Lower is more stable.',
      '',
      '| setting | layer | ' + ' | '.join(pert) + ' |',
      '| --- | --- | ' + ' | '.join('---' for _ in pert) + ' |',
    ]
    for name in names:
      for layer in layers:
        f = aggs[name]['layers'][layer].get('flip', {})
        lines.append(
          f'| {name} | {short(layer)} | '
          + ' | '.join(fmt(*f[p][:2]) if p in f else 'n/a' for p in pert)
          + ' |'
        )
  if base:
    lines += [
      '',
      '## Against the target of issue 8',
      '',
      'Target: kappa +0.15 or more over the weight-0 baseline on every MoE '
      'layer (mean over seeds), router entropy (H/Hmax) no higher than the '
      "baseline's on every layer, accuracy no lower than the baseline mean "
      'minus one std'
      + (
        f' (or minus {tolerance * 100:g} points where that is lower)'
        if tolerance
        else ''
      )
      + ', and no expert above twice its fair share.',
      '',
      '| setting | Δkappa per layer | kappa +0.15 | entropy <= base | '
      'accuracy ok | load <= 2x fair | met |',
      '| --- | --- | --- | --- | --- | --- | --- |',
    ]
    checks = {}
    for name in names:
      if name == 'none':
        continue
      c = checks[name] = target_check(base, aggs[name], tolerance)
      dk = ' / '.join(f'{v:+.3f}' for v in c['d_kappa'].values())
      lines.append(
        f'| {name} | {dk} | {yes(c["kappa_ok"])} | {yes(c["entropy_ok"])} '
        f'| {yes(c["accuracy_ok"])} | {yes(c["load_ok"])} | '
        f'{yes(c["met"])} |'
      )
    met = [n for n, c in checks.items() if c['met']]
    lines.append('')
    tentative = len(seeds) < 2 or label.startswith('pilot')
    if met and tentative:
      lines.append(
        f'All four conditions hold in this {label} for: {", ".join(met)}. '
        "This is not the study's verdict (see below)."
      )
    elif met:
      lines.append(f'Met the target: {", ".join(met)}.')
    elif checks:
      # Closest: most conditions met, then the largest smallest Δkappa.
      def score(n):
        c = checks[n]
        passed = sum(c[k] for k in ('kappa_ok', 'entropy_ok', 'accuracy_ok',
                                    'load_ok'))  # fmt: skip
        return passed, c['min_d_kappa']

      best = max(checks, key=score)
      lines.append(
        f'No setting met the target. Closest (most conditions met, then '
        f'largest smallest Δkappa): **{best}**, Δkappa '
        + ' / '.join(f'{v:+.3f}' for v in checks[best]['d_kappa'].values())
        + '.'
      )
    if len(seeds) < 2:
      lines.append(
        'With one seed the accuracy condition compares against the baseline '
        'run itself (no std), and run-to-run drift on one machine is of the '
        'order of the effects (README, NOTES): nothing here is significant.'
      )
  lines += list(sections)
  if figures:
    lines += ['', '## Routing maps (first seed of each setting)', '']
    for name, rel in figures.items():
      lines += [f'### {name}', '', f'![routing maps, {name}]({rel})', '']
  lines += ['', '## What this shows and what it does not', '']
  if base:
    for name in names:
      if name == 'none':
        continue
      a = aggs[name]['layers']
      b = base['layers']
      flatter = [
        short(x)
        for x in layers
        if a[x]['entropy_fraction'][0] > b[x]['entropy_fraction'][0]
      ]
      skewed = [short(x) for x in layers if a[x]['max_load_share'][0] > 2.0]
      unused = [short(x) for x in layers if min(a[x]['load']) < 0.02]
      notes = []
      if flatter:
        notes.append(
          f"router entropy above the baseline's on {', '.join(flatter)} "
          '(kappa gained partly by flattening)'
        )
      if skewed:
        notes.append(
          f'an expert above twice its fair share on {", ".join(skewed)}'
          + (
            f', experts with < 2% of tokens on {", ".join(unused)}'
            if unused
            else ''
          )
          + ' (agreement gained partly by collapsing onto fewer experts; '
          'kappa discounts it only through the chance level)'
        )
      if not notes:
        notes.append(
          'sharper than the baseline on every layer, load within twice the '
          'fair share'
        )
      lines.append(f'- {name}: ' + '; '.join(notes) + '.')  # fmt: skip
  lines += [
    '- Each number above is a mean over the listed seeds of one machine; '
    'settings differ only in the consistency loss and its weight.',
    '- kappa is read with its chance level, entropy and load beside it: a '
    'loss that raises kappa while H/Hmax rises has flattened the router.',
    '- Flip rates measure stability to perturbations the loss never saw '
    '(noise, sub-patch shifts).',
    '',
  ]
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w') as f:
    f.write('\n'.join(lines))
  return aggs


# CPU features that change how XLA:CPU computes (bfloat16 dots natively or
# through float32, vector width): runs reproduce bit for bit on one machine,
# across machines only within the seed spread (docs/results.md).
CPU_FLAGS = ('avx2', 'avx512f', 'avx512_bf16', 'amx_bf16', 'amx_tile')


def cpu_description(cpuinfo: str = '/proc/cpuinfo') -> str:
  """'CPU <model name> (flags: avx2 avx512f ...)' from /proc/cpuinfo."""
  try:
    with open(cpuinfo) as f:
      text = f.read()
  except OSError:
    return f'CPU {platform.processor() or "unknown"} (flags unknown)'
  model, flags = 'unknown', set()
  for line in text.splitlines():
    key, _, value = line.partition(':')
    if key.strip() == 'model name' and model == 'unknown':
      model = value.strip()
    elif key.strip() in ('flags', 'Features') and not flags:
      flags = set(value.split())
  present = [f for f in CPU_FLAGS if f in flags]
  listed = ' '.join(present) or 'none of ' + '/'.join(CPU_FLAGS)
  return f'CPU {model} (flags: {listed})'


def code_version() -> str:
  """Git commit of the checkout, '+local changes' when the code differs."""
  try:
    commit = subprocess.run(
      ['git', 'rev-parse', '--short=12', 'HEAD'], cwd=ROOT,
      capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    dirty = subprocess.run(
      ['git', 'status', '--porcelain', '--', 'vmoe_jsd', 'configs'],
      cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
  except (OSError, subprocess.CalledProcessError):
    return 'unknown (not a git checkout)'
  trees = []
  for folder in ('vmoe_jsd', 'configs'):
    tree = subprocess.run(
      ['git', 'rev-parse', '--short=12', f'HEAD:{folder}'], cwd=ROOT,
      capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    trees.append(f'{folder}/ tree {tree}')
  # Tree hashes change only when the training code or configs do, so runs
  # trained at an earlier commit with the same trees ran the same code.
  return f'{commit} ({", ".join(trees)})' + (
    ' +local changes to vmoe_jsd/ or configs/' if dirty else ''
  )


def train_and_collect(root, parsed, seeds, steps, overrides, jobs,
                      report_only=False) -> dict[str, list[dict]]:  # fmt: skip
  """Trains the missing runs (unless report_only); {setting: [results]}."""
  pending = []
  for name, loss, weight in parsed:
    for seed in seeds:
      workdir = run_dir(root, name, seed, steps)
      if os.path.exists(os.path.join(workdir, 'results.json')):
        print(f'done already: {workdir}', flush=True)
      elif not report_only:
        pending.append(
          (workdir, run_flags(name, loss, weight, seed, steps, overrides))
        )
  if pending:
    print(f'{len(pending)} run(s) to train', flush=True)
    # Runs are independent processes; jobs > 1 runs several at once.
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
      for future in [pool.submit(run_one, *p) for p in pending]:
        future.result()
  runs: dict[str, list[dict]] = {}
  for name, _, _ in parsed:
    runs[name] = []
    for seed in seeds:
      workdir = run_dir(root, name, seed, steps)
      result_path = os.path.join(workdir, 'results.json')
      if not os.path.exists(result_path):
        continue
      with open(result_path) as f:
        result = json.load(f)
      wall_path = os.path.join(workdir, 'study_wall_seconds.json')
      if os.path.exists(wall_path):
        with open(wall_path) as f:
          walls = json.load(f)
        # Interrupted runs: only an uninterrupted single run is timed.
        result['_wall'] = walls[0] if len(walls) == 1 else None
      runs[name].append(result)
  return runs


def routing_figures(root, parsed, seed, steps, overrides, fig_dir, label):
  """analyze on the `seed` run of each setting; {setting: figure path}."""
  figures = {}
  for name, loss, weight in parsed:
    workdir = run_dir(root, name, seed, steps)
    if not os.path.exists(os.path.join(workdir, 'results.json')):
      continue
    analysis = analyze_one(
      workdir, run_flags(name, loss, weight, seed, steps, overrides)
    )
    os.makedirs(fig_dir, exist_ok=True)
    tag = label.replace(' ', '_')
    stem = name.replace('@', '_w').replace('/', '_')
    fig_name = f'{tag}_{stem}_routing_maps.png'
    shutil.copyfile(
      os.path.join(analysis, 'routing_maps.png'),
      os.path.join(fig_dir, fig_name),
    )
    figures[name] = f'figures/{fig_name}'
  return figures


def search_phase(args, argv):
  """Short schedule, one weight grid per loss: writes the search report and
  returns the decision (see choose)."""
  losses = [x for x in args.losses.split(',') if x]
  weights = [float(w) for w in args.search_weights.split(',') if w]
  seeds = [int(x) for x in args.search_seeds.split(',') if x]
  parsed = [parse_setting('none')] + [
    parse_setting(f'{loss}@{w:g}') for loss in losses for w in weights
  ]
  runs = train_and_collect(
    args.root,
    parsed,
    seeds,
    args.search_steps,
    args.override,
    args.jobs,
    args.report_only,
  )
  aggs = {name: aggregate(rs) for name, rs in runs.items() if rs}
  missing = [name for name, _, _ in parsed if name not in aggs]
  if 'none' not in aggs or missing:
    raise SystemExit(
      f'the weight search lacks runs of {missing}: run it without '
      '--report_only (finished runs are skipped)'
    )
  tolerance = SEARCH_ACCURACY_TOLERANCE if len(seeds) < 2 else 0.0
  decision = choose(aggs['none'], aggs, parsed, args.finalists, tolerance)
  layers = list(aggs['none']['layers'])
  rule = [
    '',
    '## The choice',
    '',
    f'Each loss was run at weights {", ".join(f"{w:g}" for w in weights)} '
    f'on this short schedule. Rule (tools/study.py `choose`, applied by the '
    'script): for each loss the weight that meets the most of the four '
    "target conditions against this schedule's baseline (accuracy allowed "
    f'{tolerance * 100:g} percentage point(s) below it with one seed), '
    'ties broken by '
    'the largest smallest-over-layers kappa gain; the '
    f'best {args.finalists} losses (their chosen weights, ranked by the '
    f'same order) go to the full schedule, with the baseline and {REFERENCE} '
    "(the seed paper's setting).",
    '',
    *search_table(aggs['none'], aggs, decision, layers),
    '',
    f'Finalists: {", ".join(decision["finalists"])}.',
  ]
  write_report(
    args.search_report, 'weight search', args.search_steps, seeds,
    [n for n, _, _ in parsed], runs, {}, argv, jobs=args.jobs,
    sections=rule, tolerance=tolerance,
    intro=[
      f'**A weight search on a short schedule ({args.search_steps} steps, '
      f'{len(seeds)} seed(s)), not the study**: it picks the finalists of '
      '[the full-schedule comparison](results.md). Accuracies are far '
      "below the full schedule's, and one seed cannot separate close "
      'settings from seed noise.',
      '',
    ],
  )  # fmt: skip
  choice_path = os.path.join(
    os.path.dirname(args.search_report), 'search_choice.json'
  )
  with open(choice_path, 'w') as f:
    json.dump({
      'search_steps': args.search_steps, 'search_seeds': seeds,
      'weights': weights, 'best_weight': decision['best_weight'],
      'finalists': decision['finalists'],
    }, f, indent=1, allow_nan=False)  # fmt: skip
  print(f'Wrote {args.search_report} and {choice_path}', flush=True)
  return decision, rule


def runs_and_figures(args, parsed, seeds, steps, tag):
  """Trains what is missing; the results and the first seed's figures."""
  runs = train_and_collect(
    args.root, parsed, seeds, steps, args.override, args.jobs, args.report_only
  )
  figures = {}
  if not args.no_analyze:
    fig_dir = os.path.join(os.path.dirname(args.report), 'figures')
    figures = routing_figures(
      args.root, parsed, seeds[0], steps, args.override, fig_dir, tag
    )
  return runs, figures


def final_phase(args, argv, decision, rule):
  """The baseline, the reference and the finalists on the full schedule."""
  seeds = [int(x) for x in args.seeds.split(',') if x]
  names = ['none', REFERENCE] + [
    n for n in decision['finalists'] if n != REFERENCE
  ]
  parsed = [parse_setting(n) for n in names]
  runs, figures = runs_and_figures(args, parsed, seeds, None, 'study')
  search_link = os.path.relpath(
    args.search_report, os.path.dirname(args.report)
  )
  intro = [
    f"Settings: the weight-0 baseline, the seed paper's {REFERENCE}, and "
    f'the finalists of [a weight search]({search_link}) on a '
    f'{args.search_steps}-step schedule (its table is repeated below).',
    '',
  ]
  sections = ['', '## How the settings were chosen'] + rule[2:]
  write_report(
    args.report,
    args.label,
    None,
    seeds,
    names,
    runs,
    figures,
    argv,
    jobs=args.jobs,
    sections=sections,
    intro=intro,
  )
  print(f'Wrote {args.report}', flush=True)


def custom(args, argv):
  """--settings given: exactly those settings at --steps (pilots, checks)."""
  seeds = [int(s) for s in args.seeds.split(',') if s]
  parsed = [parse_setting(s) for s in args.settings.split(',') if s]
  steps = args.steps or None
  runs, figures = runs_and_figures(args, parsed, seeds, steps, args.label)
  write_report(
    args.report,
    args.label,
    steps,
    seeds,
    [n for n, _, _ in parsed],
    runs,
    figures,
    argv,
    jobs=args.jobs,
  )
  print(f'Wrote {args.report}')


# ----------------------------------------------------------------------------
# Issue 14: what consistent routing buys (corruptions, attacks, cheaper
# inference), from eval_main's suites on every trained run.
# ----------------------------------------------------------------------------
ROBUSTNESS_FILES = ('corruptions_test.json', 'attacks_test.json',
                    'cheap_test.json')  # fmt: skip
# Target of issue 14: a drop cut by this share against the baseline, or at
# most this many points lost at K=1 while the baseline loses clearly more.
DROP_CUT = 0.25
K1_LOSS = 0.003


def robustness_one(workdir: str, flags: list[str], extra: list[str]) -> bool:
  """Runs eval_main's robustness suites on a finished run (once)."""
  if all(os.path.exists(os.path.join(workdir, f)) for f in ROBUSTNESS_FILES):
    return True
  cmd = [sys.executable, '-m', 'vmoe_jsd.eval_main',
         f'--checkpoint={workdir}', '--suite=robustness', *flags,
         *[f'--config.{o}' for o in extra]]  # fmt: skip
  print('$', ' '.join(cmd), flush=True)
  with open(os.path.join(workdir, 'robustness_log.txt'), 'w') as log:
    proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
  if proc.returncode:
    print(f'robustness failed; see {workdir}/robustness_log.txt', flush=True)
  return proc.returncode == 0


def _read_suites(workdir: str) -> dict | None:
  out = {}
  for name in ROBUSTNESS_FILES:
    path = os.path.join(workdir, name)
    if not os.path.exists(path):
      return None
    with open(path) as f:
      out[name.split('_')[0]] = json.load(f)
  return out


def robustness_figures(suites: dict) -> dict[str, float]:
  """The per-run numbers the robustness report aggregates (fractions)."""
  c, a, ch = suites['corruptions'], suites['attacks'], suites['cheap']
  fig = {
    'clean': c['clean_accuracy'],
    'corruption_accuracy': c['summary']['mean_accuracy'],
    'corruption_drop': c['summary']['accuracy_drop'],
    'attack_clean': a['clean']['accuracy'],
  }
  for attack in ('pgd', 'routing'):
    if attack in a:
      fig[f'{attack}_accuracy'] = a[attack]['accuracy']
      fig[f'{attack}_drop'] = a[attack]['accuracy_drop']
      for layer, v in (a[attack].get('routing_changes') or {}).items():
        fig[f'{attack}_routing_changes/{layer}'] = v
  for layer, v in c['summary']['mean_flip_rate'].items():
    fig[f'corruption_flip/{layer}'] = v
  for row in ch['rows']:
    fig[f'cheap/{row["name"]}/drop'] = row['accuracy_drop']
    fig[f'cheap/{row["name"]}/flops'] = row['expert_flops']
    dropped = list((row.get('dropped_tokens') or {}).values())
    if dropped:  # Tokens no expert took, mean over the MoE layers.
      fig[f'cheap/{row["name"]}/dropped_tokens'] = sum(dropped) / len(dropped)
  return fig


def aggregate_robustness(root, parsed, seeds, steps) -> dict:
  """{setting: {figure: (mean, std, n)}} over the runs that have suites."""
  aggs = {}
  for name, _, _ in parsed:
    figs = []
    for seed in seeds:
      suites = _read_suites(run_dir(root, name, seed, steps))
      if suites is not None:
        figs.append(robustness_figures(suites))
    if figs:
      keys = sorted(set().union(*figs))
      aggs[name] = {k: mean_std([f.get(k) for f in figs]) for k in keys}
  return aggs


def robustness_verdict(
  base: dict, agg: dict, serving: bool = True
) -> list[str]:
  """Issue 14's target conditions for one setting against the baseline
  trained with the same K; `serving`: also the K=2-trained model served at
  K=1 (not asked of a model trained at K=1)."""
  notes = []
  for key, label in (('corruption_drop', 'corruption drop'),
                     ('pgd_drop', 'PGD drop')):  # fmt: skip
    b, s = base.get(key), agg.get(key)
    if not b or not s or not math.isfinite(b[0]) or b[0] <= 0:
      continue
    cut = (b[0] - s[0]) / b[0]
    beyond = math.isfinite(b[1]) and b[0] - s[0] > b[1]
    met = cut >= DROP_CUT and beyond
    verdict = 'met' if met else 'not met'
    notes.append(
      f'{label} cut by {cut * 100:.0f}% ({verdict}: needs >= '
      f'{DROP_CUT * 100:.0f}% and beyond 1 baseline std)'
    )
  k1 = [k for k in agg if k.startswith('cheap/k1_cf') and k.endswith('/drop')]
  k1 = k1 if serving else []

  # K=1 at the largest capacity factor: the default evaluation's (4.0 in
  # the default config), so that only K changes.
  def factor(key):
    return float(key.split('_cf')[1].split('/')[0])

  k1 = sorted((k for k in k1 if k in base), key=factor, reverse=True)
  for key in k1[:1]:
    b, s = base[key], agg[key]
    met = (
      s[0] <= K1_LOSS
      and math.isfinite(b[1])
      and b[0] - s[0] > max(b[1], 0.0)
      and b[0] > K1_LOSS
    )
    notes.append(
      f'served at K=1 ({key.split("/")[1]}): loses {s[0] * 100:.2f} points '
      f"against the baseline's {b[0] * 100:.2f} "
      f'({"met" if met else "not met"}: needs <= {K1_LOSS * 100:.1f} while '
      'the baseline loses more by over 1 std)'
    )
  return notes


def robustness_table(aggs: dict, names: list[str]) -> list[str]:
  layers = sorted({k.split('/')[1] for a in aggs.values() for k in a
                   if k.startswith('corruption_flip/')})  # fmt: skip
  short = lambda layer: layer.replace('encoderblock_', 'b')
  head = ('| setting | runs | clean (%) | corruptions (%) | drop (pts) | '
          'PGD (%) | PGD drop (pts) | routing attack drop (pts) | '
          + ' | '.join(f'PGD routing changes {short(x)}' for x in layers)
          + ' |')  # fmt: skip
  lines = [head, '|' + ' --- |' * (head.count('|') - 1)]
  for name in names:
    a = aggs[name]

    def get(k, d=3, s=1.0, a=a):
      return fmt(*a.get(k, (math.nan, math.nan))[:2], d, s)

    runs = max(v[2] for v in a.values())
    cells = [name, str(runs), get('clean', 2, 100),
             get('corruption_accuracy', 2, 100), get('corruption_drop', 2, 100),
             get('pgd_accuracy', 2, 100), get('pgd_drop', 2, 100),
             get('routing_drop', 2, 100)] + [
      get(f'pgd_routing_changes/{x}') for x in layers]  # fmt: skip
    lines.append('| ' + ' | '.join(cells) + ' |')
  return lines


def cheap_table(aggs: dict, names: list[str]) -> list[str]:
  rows = sorted({k.split('/')[1] for a in aggs.values() for k in a
                 if k.startswith('cheap/')})  # fmt: skip
  rows = [r for r in rows if r != 'default']
  head = '| setting | ' + ' | '.join(rows) + ' |'
  lines = [
    'Accuracy lost (points) against the default evaluation when served '
    "with the row's K and capacity factor; expert FLOPs relative to the "
    'default evaluation (capacity-bound slots) in the last line.',
    '',
    head,
    '|' + ' --- |' * (len(rows) + 1),
  ]
  for name in names:
    a = aggs[name]
    cells = [fmt(*a.get(f'cheap/{r}/drop', (math.nan, math.nan))[:2], 2, 100)
             for r in rows]  # fmt: skip
    lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
  first = aggs[names[0]] if names else {}
  flops = [fmt(first.get(f'cheap/{r}/flops', (math.nan,) * 2)[0], math.nan, 3)
           for r in rows]  # fmt: skip
  lines.append('| expert FLOPs | ' + ' | '.join(flops) + ' |')
  if any(f'cheap/{r}/dropped_tokens' in aggs[n] for n in names for r in rows):
    lines += [
      '', 'Tokens dropped (%: tokens that no expert took, mean over the MoE '
      'layers) in the same evaluations; the default evaluation in the first '
      'column.', '',
      '| setting | default | ' + ' | '.join(rows) + ' |',
      '|' + ' --- |' * (len(rows) + 2),
    ]  # fmt: skip
    for name in names:
      cells = [fmt(*aggs[name].get(f'cheap/{r}/dropped_tokens',
                                   (math.nan, math.nan))[:2], 2, 100)
               for r in ['default', *rows]]  # fmt: skip
      lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
  return lines


def robustness_report(path, aggs, names, steps, seeds, argv, missing):
  """docs/robustness_results.md from the runs' suite files."""
  base = aggs.get('none')
  lines = [
    '# What consistent routing buys: corruptions, attacks, cheaper '
    'inference',
    '',
    "*Generated by `tools/study.py --robustness` from the runs' "
    '`corruptions_test.json`, `attacks_test.json` and `cheap_test.json` '
    '(vmoe_jsd/eval_main.py, docs/robustness.md); do not edit by hand.*',
    '',
    f'- Command: `python {" ".join(argv)}`',
    f'- Schedule: `configs/default.py` with {steps} steps' if steps else
    '- Schedule: `configs/default.py` as it is',
    f'- Seeds asked: {", ".join(map(str, seeds))}; `runs` says how many '
    'had finished with their suites (mean ± sample std over them)',
    f'- Machine: {platform.machine()}, {os.cpu_count()} CPU cores, '
    f'{cpu_description()}; generated '
    f'{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC',
    f'- Code: commit {code_version()}',
    '',
  ]  # fmt: skip
  if missing:
    lines += ['**Cells that did not run** (not trained or not evaluated '
              'when this report was made): ' + ', '.join(missing) + '.',
              '']  # fmt: skip
  lines += ['## Accuracy under corruption and attack', '',
            *robustness_table(aggs, names), '',
            '## Serving at K=1 or a lower capacity factor', '',
            *cheap_table(aggs, names), '',
            '## Against the target', '']  # fmt: skip
  if base is None:
    lines.append('No baseline run has its suites yet: nothing to compare.')
  base_k1 = aggs.get('none' + TOP1_SUFFIX)
  for name in names:
    top1 = name.endswith(TOP1_SUFFIX)
    against = base_k1 if top1 else base
    if name in ('none', 'none' + TOP1_SUFFIX) or against is None:
      continue
    notes = robustness_verdict(against, aggs[name], serving=not top1)
    vs = ' (against none/k1, both trained at K=1)' if top1 else ''
    lines.append(f'- {name}{vs}: ' + ('; '.join(notes) or 'no figures') + '.')
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w') as f:
    f.write('\n'.join(lines) + '\n')


def robustness_phase(args, argv):
  """--robustness: suites on every finished run of --settings, a report."""
  seeds = [int(s) for s in args.seeds.split(',') if s]
  parsed = [parse_setting(s) for s in args.settings.split(',') if s]
  steps = args.steps or None
  missing = []
  for name, loss, weight in parsed:
    for seed in seeds:
      workdir = run_dir(args.root, name, seed, steps)
      if not os.path.exists(os.path.join(workdir, 'results.json')):
        missing.append(f'{name} seed {seed}')
        continue
      flags = run_flags(name, loss, weight, seed, steps, args.override)
      if args.report_only:
        ok = _read_suites(workdir) is not None
      else:
        ok = robustness_one(workdir, flags, args.robustness_override)
      if not ok:
        missing.append(f'{name} seed {seed} (suites)')
  aggs = aggregate_robustness(args.root, parsed, seeds, steps)
  names = [n for n, _, _ in parsed if n in aggs]
  robustness_report(args.robustness_report, aggs, names, steps, seeds, argv,
                    missing)  # fmt: skip
  print(f'Wrote {args.robustness_report}', flush=True)


def main():
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument(
    '--phase', choices=('all', 'search', 'final'), default='all',
    help='search: the short-schedule weight search only; final: the '
    'full-schedule comparison (needs the search runs); all: both',
  )  # fmt: skip
  parser.add_argument('--seeds', default='0,1,2')
  parser.add_argument('--losses', default=','.join(DEFAULT_WEIGHTS))
  parser.add_argument('--search_steps', type=int, default=SEARCH_STEPS)
  parser.add_argument('--search_seeds', default='0')
  parser.add_argument(
    '--search_weights', default=','.join(f'{w:g}' for w in SEARCH_WEIGHTS)
  )
  parser.add_argument(
    '--finalists', type=int, default=3,
    help='losses that go from the search to the full schedule',
  )  # fmt: skip
  parser.add_argument(
    '--settings', default='',
    help='instead of search + final: exactly these settings (none, LOSS or '
    'LOSS@WEIGHT, comma-separated) at --steps',
  )  # fmt: skip
  parser.add_argument(
    '--steps', type=int, default=0,
    help="with --settings: num_train_steps (0: the config's)",
  )  # fmt: skip
  parser.add_argument('--root', default=os.path.join(ROOT, 'runs', 'study'))
  docs = os.path.join(ROOT, 'docs')
  parser.add_argument('--report', default=os.path.join(docs, 'results.md'))
  parser.add_argument(
    '--search_report', default=os.path.join(docs, 'search.md')
  )
  parser.add_argument('--label', default='full study')
  parser.add_argument(
    '--override', action='append', default=[], help='KEY=VALUE for all runs'
  )
  parser.add_argument(
    '--report_only', action='store_true', help='report finished runs only'
  )
  parser.add_argument(
    '--jobs', type=int, default=1, help='runs at once (default 1)'
  )
  parser.add_argument(
    '--no_analyze', action='store_true', help='no routing-map figures'
  )
  parser.add_argument(
    '--robustness', action='store_true',
    help='with --settings: run eval_main --suite=robustness on every '
    'finished run (once) and write --robustness_report; trains nothing',
  )  # fmt: skip
  parser.add_argument(
    '--robustness_override', action='append', default=[],
    help='KEY=VALUE for the suites only (e.g. evaluate.robustness.limit=500)',
  )  # fmt: skip
  parser.add_argument(
    '--robustness_report',
    default=os.path.join(docs, 'robustness_results.md'),
  )
  args = parser.parse_args()
  for loss in args.losses.split(','):
    if loss and loss not in DEFAULT_WEIGHTS:
      raise SystemExit(
        f'--losses: {loss!r} is not a consistency loss; choose from '
        f'{list(DEFAULT_WEIGHTS)}'
      )
  argv = [os.path.relpath(sys.argv[0], ROOT)] + [
    a for a in sys.argv[1:] if a not in ('--report_only', '--no_analyze')
  ]
  if args.robustness:
    if not args.settings:
      raise SystemExit('--robustness needs --settings (the trained runs)')
    robustness_phase(args, argv)
    return
  if args.settings:
    custom(args, argv)
    return
  decision, rule = search_phase(args, argv)
  if args.phase in ('all', 'final'):
    final_phase(args, argv, decision, rule)


if __name__ == '__main__':
  main()

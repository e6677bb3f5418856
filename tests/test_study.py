"""tools/study.py: settings, aggregation over seeds and the target check,
against hand-computed values; the report is written from results files."""

import json
import math
import os
import sys

import commands
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'tools'))
import study  # noqa: E402
import study_report  # noqa: E402


def fake_result(acc, kappas, entropies, loads, flips=None):
  routing = {}
  for i, (k, h, load) in enumerate(zip(kappas, entropies, loads, strict=True)):
    routing[f'encoderblock_{2 * i + 1}'] = {
      'agreement': 0.5,
      'chance': sum(x * x for x in load),
      'kappa': k,
      'jsd': 0.01,
      'confidence': 0.6,
      'entropy_fraction': h,
      'dropped': 0.0,
      'load': list(load),
    }
  out = {
    'accuracy': acc,
    'routing': routing,
    'train_seconds_excluding_compile': 100.0,
  }
  if flips is not None:
    out['stability'] = {
      'flip_rate': {layer: {'noise_0.1': flips} for layer in routing}
    }
  return out


FLAT = (0.25, 0.25, 0.25, 0.25)


def test_settings_are_parsed_and_bad_ones_rejected():
  assert study.parse_setting('none') == ('none', 'jsd', 0.0)
  assert study.parse_setting('margin@0.3') == ('margin@0.3', 'margin', 0.3)
  assert study.parse_setting('jsd') == ('jsd@0.1', 'jsd', 0.1)
  with pytest.raises(SystemExit, match="'kl' is not a consistency loss"):
    study.parse_setting('kl')
  with pytest.raises(SystemExit, match='must be > 0'):
    study.parse_setting('l2@0')


def test_prc_recipe_and_top1_suffix_set_the_right_flags():
  name, loss, weight = study.parse_setting('prc/k1')
  assert (name, loss, weight) == ('prc/k1', 'cross_correlation', 5e-3)
  flags = study.run_flags(name, loss, weight, 1, 400, ['evaluate.limit=8'])
  for flag in (
    '--config.consistency.include_cls=True',
    '--config.consistency.offdiagonal_weight=10.0',
    '--config.model.encoder.moe.router.importance_loss_weight=0.0',
    '--config.model.encoder.moe.router.load_loss_weight=0.0',
    '--config.model.encoder.moe.router.num_selected_experts=1',
    '--config.evaluate.limit=8',
  ):
    assert flag in flags
  # Plain settings add nothing but their loss and weight.
  plain = study.run_flags('none', 'jsd', 0.0, 0, None, [])
  assert not any('router' in f or 'include_cls' in f for f in plain)
  assert study.parse_setting('cross_correlation@0.3/k1')[0] == (
    'cross_correlation@0.3/k1'
  )
  assert study.run_dir('R', 'none/k1', 2, 400) == os.path.join(
    'R', 'n400', 'none_k1_s2'
  )
  with pytest.raises(SystemExit, match='not a consistency loss'):
    study.parse_setting('kl/k1')


def test_aggregate_and_target_check_by_hand():
  base = study_report.aggregate(
    [
      fake_result(0.80, (0.40, 0.30), (0.6, 0.8), (FLAT, FLAT), 0.2),
      fake_result(0.82, (0.44, 0.34), (0.6, 0.8), (FLAT, FLAT), 0.4),
    ]
  )
  mean, std, n = base['accuracy']
  assert (mean, n) == (pytest.approx(0.81), 2)
  assert std == pytest.approx(math.sqrt(2 * 0.01**2 / 1))  # 0.01414
  assert base['layers']['encoderblock_1']['kappa'][0] == pytest.approx(0.42)
  assert base['layers']['encoderblock_1']['flip']['noise_0.1'][0] == (
    pytest.approx(0.3)
  )
  skewed = (0.55, 0.15, 0.15, 0.15)  # 0.55 * 4 = 2.2 > 2x fair share.
  good = study_report.aggregate(
    [
      fake_result(0.80, (0.60, 0.50), (0.5, 0.8), (FLAT, FLAT)),
    ]
  )
  c = study_report.target_check(base, good)
  assert c['d_kappa'] == {
    'encoderblock_1': pytest.approx(0.18),
    'encoderblock_3': pytest.approx(0.18),
  }
  # Accuracy 0.80 >= 0.81 - 0.01414; entropy 0.5 <= 0.6, 0.8 <= 0.8.
  assert c['met']
  bad = study_report.aggregate(
    [
      fake_result(0.79, (0.60, 0.45), (0.7, 0.8), (skewed, FLAT)),
    ]
  )
  c = study_report.target_check(base, bad)
  assert not c['kappa_ok']  # Block 3: +0.13.
  assert not c['entropy_ok'] and not c['load_ok'] and not c['accuracy_ok']


def test_report_only_writes_results_md_from_the_run_folders(tmp_path):
  root = tmp_path / 'runs'
  for name, acc in (('none', 0.8), ('margin@0.1', 0.81)):
    for seed in (0, 1):
      d = root / 'n50' / f'{name}_s{seed}'
      d.mkdir(parents=True)
      r = fake_result(acc + 0.01 * seed, (0.4, 0.3), (0.6, 0.8), (FLAT, FLAT))
      (d / 'results.json').write_text(json.dumps(r))
  report = tmp_path / 'docs' / 'results.md'
  proc = commands.run(
    [
      sys.executable,
      os.path.join(ROOT, 'tools', 'study.py'),
      '--settings=none,margin@0.1',
      '--seeds=0,1',
      '--steps=50',
      f'--root={root}',
      f'--report={report}',
      '--label=pilot test',
      '--report_only',
      '--no_analyze',
    ]
  )
  assert proc.returncode == 0, proc.stderr
  text = report.read_text()
  assert '| none | 2 | 80.50 ± 0.71 |' in text
  assert '| margin@0.1 | 2 | 81.50 ± 0.71 |' in text
  assert 'No setting met the target' in text
  assert 'This is a pilot on a short schedule (50 steps' in text


def _write_runs(root, steps_dir, results_by_setting, seeds=(0,)):
  for name, result in results_by_setting.items():
    for seed in seeds:
      d = root / steps_dir / f'{name}_s{seed}'
      d.mkdir(parents=True)
      (d / 'results.json').write_text(json.dumps(result))


# Hand-made search: none at kappa (.4, .3), entropy (.6, .8), 80% accuracy.
SEARCH = {
  'none': fake_result(0.80, (0.4, 0.3), (0.6, 0.8), (FLAT, FLAT)),
  # All four conditions (accuracy 79.5 >= 80 - 1 point), min Δkappa .2.
  'margin@0.1': fake_result(0.795, (0.6, 0.5), (0.5, 0.7), (FLAT, FLAT)),
  # More kappa, but accuracy 75 < 79: three conditions, so not chosen.
  'margin@0.3': fake_result(0.75, (0.8, 0.7), (0.5, 0.7), (FLAT, FLAT)),
  # Δkappa .1 < .15: three conditions (entropy, accuracy, load).
  'l2@0.1': fake_result(0.80, (0.5, 0.4), (0.5, 0.7), (FLAT, FLAT)),
  # Flatter and too little kappa on block 1: two conditions.
  'l2@0.3': fake_result(0.80, (0.45, 0.9), (0.9, 0.9), (FLAT, FLAT)),
}


def test_choose_picks_each_losses_weight_then_the_finalists_by_hand():
  parsed = [study.parse_setting(n) for n in SEARCH]
  aggs = {n: study_report.aggregate([r]) for n, r in SEARCH.items()}
  decision = study.choose(aggs['none'], aggs, parsed, finalists=1)
  assert decision['best_weight'] == {'margin': 'margin@0.1', 'l2': 'l2@0.1'}
  assert decision['finalists'] == ['margin@0.1']
  assert study_report.search_score(decision['checks']['l2@0.1']) == (
    3,
    pytest.approx(0.1),
  )
  assert study_report.search_score(decision['checks']['l2@0.3'])[0] == 2
  # Without the one-seed tolerance margin@0.1 fails the accuracy condition.
  strict = study.choose(aggs['none'], aggs, parsed, 2, tolerance=0.0)
  assert not strict['checks']['margin@0.1']['accuracy_ok']


def test_search_then_final_reports_from_the_run_folders(tmp_path):
  root = tmp_path / 'runs'
  _write_runs(root, 'n50', SEARCH)
  full = {
    'none': fake_result(0.86, (0.4, 0.3), (0.6, 0.8), (FLAT, FLAT)),
    'jsd@0.1': fake_result(0.86, (0.5, 0.4), (0.8, 0.9), (FLAT, FLAT)),
    'margin@0.1': fake_result(0.86, (0.6, 0.5), (0.5, 0.7), (FLAT, FLAT)),
  }
  _write_runs(root, 'full', full, seeds=(0, 1))
  docs = tmp_path / 'docs'
  proc = commands.run(
    [
      sys.executable,
      os.path.join(ROOT, 'tools', 'study.py'),
      '--phase=final',
      '--losses=margin,l2',
      '--search_weights=0.1,0.3',
      '--search_steps=50',
      '--finalists=1',
      '--seeds=0,1',
      f'--root={root}',
      f'--report={docs / "results.md"}',
      f'--search_report={docs / "search.md"}',
      '--report_only',
      '--no_analyze',
    ]
  )
  assert proc.returncode == 0, proc.stderr
  choice = json.loads((docs / 'search_choice.json').read_text())
  assert choice['finalists'] == ['margin@0.1']
  search = (docs / 'search.md').read_text()
  assert '| margin@0.1 | 79.50 | +0.200 / +0.200 |' in search
  assert 'best weight, finalist 1 |' in search
  results = (docs / 'results.md').read_text()
  assert '## How the settings were chosen' in results
  assert '| margin@0.1 | 2 | 86.00 ± 0.00 |' in results
  assert 'Met the target: margin@0.1.' in results
  summary = results.split('## Summary')[1].split('## Accuracy')[0]
  assert (
    '| margin@0.1 | 2 | 86.00 ± 0.00 | 0.600 ± 0.000 / 0.500 ± 0.000 |'
    in (summary)
  )
  assert summary.count('| met |') == 1 and summary.count('| not met |') == 1
  # A search with a missing run is refused, naming it.
  (root / 'n50' / 'l2@0.3_s0' / 'results.json').unlink()
  proc = commands.run(
    [
      sys.executable,
      os.path.join(ROOT, 'tools', 'study.py'),
      '--phase=search',
      '--losses=margin,l2',
      '--search_weights=0.1,0.3',
      '--search_steps=50',
      f'--root={root}',
      '--report_only',
      f'--search_report={docs / "search.md"}',
    ]
  )
  assert proc.returncode != 0
  assert "lacks runs of ['l2@0.3']" in proc.stderr


def test_cpu_description_names_the_model_and_the_bf16_flags(tmp_path):
  info = tmp_path / 'cpuinfo'
  info.write_text(
    'processor\t: 0\nmodel name\t: AMD EPYC 9B14\n'
    'flags\t\t: fpu sse avx2 avx512f avx512_bf16 vaes\n'
    'processor\t: 1\nmodel name\t: AMD EPYC 9B14\nflags\t\t: fpu\n'
  )
  assert study_report.cpu_description(str(info)) == (
    'CPU AMD EPYC 9B14 (flags: avx2 avx512f avx512_bf16)'
  )
  info.write_text('model name : Old\nflags : sse2\n')
  assert 'none of avx2/' in study_report.cpu_description(str(info))


def _suites(clean, corrupted, pgd, k1):
  layer = 'encoderblock_1'
  return {
    'corruptions': {
      'clean_accuracy': clean,
      'summary': {
        'mean_accuracy': corrupted,
        'accuracy_drop': clean - corrupted,
        'mean_flip_rate': {layer: 0.1},
      },
    },
    'attacks': {
      'clean': {'accuracy': clean},
      'pgd': {
        'accuracy': pgd,
        'accuracy_drop': clean - pgd,
        'routing_changes': {layer: 0.2},
      },
    },
    'cheap': {
      'rows': [
        {
          'name': 'default',
          'accuracy_drop': 0.0,
          'expert_flops': 1.0,
          'dropped_tokens': {layer: 0.0, 'encoderblock_3': 0.02},
        },
        {
          'name': 'k1_cf4',
          'accuracy_drop': k1,
          'expert_flops': 0.5,
          'dropped_tokens': {layer: 0.1, 'encoderblock_3': 2 * k1},
        },
      ]
    },
  }


def _write_suite_files(root, cases):
  """{setting: [figures of seed 0, seed 1, ...]} as the runs' suite files."""
  for name, runs in cases.items():
    for seed, figures in enumerate(runs):
      workdir = study.run_dir(root, name, seed, 400)
      os.makedirs(workdir)
      for suite, data in _suites(*figures).items():
        with open(os.path.join(workdir, f'{suite}_test.json'), 'w') as f:
          json.dump(data, f)


def test_robustness_verdict_by_hand(tmp_path):
  root = str(tmp_path)
  cases = {
    'none': [(0.80, 0.60, 0.40, 0.05), (0.82, 0.60, 0.42, 0.07)],
    'prc': [(0.80, 0.70, 0.40, 0.002), (0.82, 0.72, 0.42, 0.002)],
  }
  _write_suite_files(root, cases)
  parsed = [study.parse_setting('none'), study.parse_setting('prc')]
  aggs = study.aggregate_robustness(root, parsed, [0, 1], 400)
  # Baseline corruption drops 0.20, 0.22 (mean 0.21, std 0.01414);
  # prc's 0.10, 0.10: cut by 52%, 0.11 beyond the std: met.
  assert aggs['none']['corruption_drop'][0] == pytest.approx(0.21)
  notes = study_report.robustness_verdict(aggs['none'], aggs['prc'])
  assert notes[0] == (
    'corruption drop cut by 52% (met: needs >= 25% and beyond 1 baseline std)'
  )
  # PGD drops equal (0.40 both): cut 0%, not met.
  assert notes[1].startswith('PGD drop cut by 0% (not met')
  # K=1: prc loses 0.2 points, the baseline 6 +- 1.4: met.
  assert notes[2].startswith('served at K=1 (k1_cf4): loses 0.20 points')
  assert '(met:' in notes[2]
  report = tmp_path / 'r.md'
  study_report.robustness_report(
    str(report),
    aggs,
    ['none', 'prc'],
    400,
    [0, 1],
    ['tools/study.py'],
    ['prc/k1 seed 0'],
  )
  text = report.read_text()
  assert '| prc | 2 | 81.00 ± 1.41 | 71.00 ± 1.41 | 10.00 ± 0.00 |' in text
  assert 'prc/k1 seed 0' in text
  # Dropped tokens, mean over the two layers, in %: default (0 + 2) / 2 = 1;
  # k1_cf4 for the baseline's seeds (10 + 10) / 2 = 10 and (10 + 14) / 2 =
  # 12: 11 +- 1.41.
  assert '| none | 1.00 ± 0.00 | 11.00 ± 1.41 |' in text


def test_top1_trained_settings_are_judged_against_the_top1_baseline(tmp_path):
  root = str(tmp_path)
  cases = {  # none/k1's corruption drops 0.30, 0.32; prc/k1's 0.20, 0.20.
    'none': [(0.80, 0.60, 0.40, 0.05), (0.82, 0.60, 0.42, 0.07)],
    'none/k1': [(0.80, 0.50, 0.40, 0.0), (0.82, 0.50, 0.42, 0.0)],
    'prc/k1': [(0.80, 0.60, 0.40, 0.0), (0.82, 0.62, 0.42, 0.0)],
  }
  _write_suite_files(root, cases)
  names = list(cases)
  aggs = study.aggregate_robustness(
    root, [study.parse_setting(n) for n in names], [0, 1], 400
  )
  report = tmp_path / 'r.md'
  study_report.robustness_report(
    str(report), aggs, names, 400, [0, 1], ['tools/study.py'], []
  )
  verdicts = [
    ln for ln in report.read_text().splitlines() if ln.startswith('- prc')
  ]
  # Cut (0.31 - 0.20) / 0.31 = 35%, beyond none/k1's std 0.014: met; the
  # K=2 baseline (drop 0.21) would have said 5%, not met.
  assert verdicts == [
    '- prc/k1 (against none/k1, both trained at K=1): corruption drop cut '
    'by 35% (met: needs >= 25% and beyond 1 baseline std); PGD drop cut by '
    '0% (not met: needs >= 25% and beyond 1 baseline std).'
  ]


def test_dry_run_prints_the_runs_still_to_train_and_writes_nothing(tmp_path):
  root = tmp_path / 'runs'
  finished = dict(SEARCH['none'], step=50, num_train_steps=50)
  _write_runs(root, 'n50', {'none': finished})
  docs = tmp_path / 'docs'
  proc = commands.run(
    [
      sys.executable,
      os.path.join(ROOT, 'tools', 'study.py'),
      '--losses=margin',
      '--search_weights=0.1',
      '--search_steps=50',
      f'--root={root}',
      f'--search_report={docs / "search.md"}',
      '--dry_run',
    ]
  )
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  assert lines[0] == f'# finished, skipped: {root}/n50/none_s0'
  assert lines[1].split()[1:] == [
    '-m',
    'vmoe_jsd.main',
    f'--config={study.CONFIG}',
    f'--workdir={root}/n50/margin@0.1_s0',
    '--config.seed=0',
    '--config.consistency.loss=margin',
    '--config.consistency.weight=0.1',
    '--config.num_train_steps=50',
  ]
  assert len(lines) == 2  # The search only: the finalists are not known.
  assert not docs.exists() and not (root / 'n50' / 'margin@0.1_s0').exists()

"""The benchmarks run, and the quadratic's simulations agree with theory.

The oracle check is statistical: each simulated mean must lie within
``Z_TOLERANCE`` standard errors (over independent seeds) of its closed form,
so it fails on a wrong formula or a wrong simulation, not on bad luck
(a 5-sigma miss happens by chance about once in two million runs per oracle).
"""

import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

BENCHMARKS = pathlib.Path(__file__).parent.parent / 'benchmarks'
Z_TOLERANCE = 5.0
sys.path[:0] = [str(BENCHMARKS / group)
                for group in ('lm', 'synthetic', 'cost', '.')]
# pylint: disable=g-import-not-at-top,wrong-import-position,g-bad-import-order
import _claims
import _schedules
import quadratic

# pylint: enable=g-import-not-at-top,wrong-import-position,g-bad-import-order


def run_benchmark(script, *args, cwd, env=None):
  # A guard against a hang, not a speed test: generous, for a shared machine.
  env = dict(os.environ, MPLBACKEND='Agg', **(env or {}))
  proc = subprocess.run([sys.executable, str(BENCHMARKS / script), *args],
                        cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=900, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc


@pytest.fixture(scope='module')
def quadratic_results(tmp_path_factory):
  out = tmp_path_factory.mktemp('quadratic')
  run_benchmark('synthetic/quadratic.py', '--quick', '--steps', '1000',
                '--seeds', '256', '--out', str(out), cwd=out)
  assert (out / 'quadratic.png').stat().st_size > 0
  return json.loads((out / 'results.json').read_text())


def test_quadratic_has_every_curve(quadratic_results):
  curves = quadratic_results['curves']
  assert set(curves) == {'vanilla', 'ema', 'bema', 'ouema', 'dema', 'pace',
                         'ema/theory', 'bema/theory', 'ouema/theory'}
  for curve in curves.values():
    steps = [s for s, _ in curve]
    assert steps == sorted(steps) and steps[-1] == 1000
    assert all(math.isfinite(v) for _, v in curve)


def test_quadratic_oracles_match_closed_forms(quadratic_results):
  oracles = quadratic_results['oracles']
  names = {o['name'].split('/')[0] for o in oracles}
  assert names == {'last_iterate', 'mle', 'stylised_pace_ema', 'merge',
                   'decayed'}
  for o in oracles:
    z = (o['measured'] - o['theory']) / o['stderr']
    assert abs(z) < Z_TOLERANCE, o
    # And a plain relative bound, so a huge stderr cannot hide a bad match.
    assert o['measured'] == pytest.approx(o['theory'], rel=0.1), o


def test_pullback_lowers_the_stationary_ema_error(quadratic_results):
  pace = sorted((float(o['name'].split('c=')[1]), o)
                for o in quadratic_results['oracles']
                if o['name'].startswith('stylised_pace_ema'))
  (c0, plain), (c1, pulled) = pace
  assert c0 == 0.0 < c1
  assert pulled['theory'] < plain['theory']
  assert (plain['measured'] - pulled['measured']
          > Z_TOLERANCE * math.hypot(plain['stderr'], pulled['stderr']))


def test_pullback_factor_saturates_at_a_fixed_average(quadratic_results):
  """Along alpha -> 0 (noise-to-curvature ratio without bound) the best
  clipped gain is 1 and the factor tends to 1 / beta for a fixed beta
  (gamma0(0) -> eta sigma^2 / (2 alpha), gamma0(1) -> beta times that),
  while with beta = eta alpha it grows like 1 / (2 eta alpha)."""
  rows = quadratic_results['pace_family']
  beta = quadratic.STYLISED['beta']
  for average in ('fixed', 'lengthening'):
    factors = [r['factor'] for r in rows if r['average'] == average]
    assert factors == sorted(factors) and factors[0] > 1
  fixed = [r for r in rows if r['average'] == 'fixed']
  assert fixed[-1]['factor'] == pytest.approx(1 / beta, rel=1e-3)
  assert all(r['factor'] < 1 / beta for r in fixed)
  longest = rows[-1]
  assert longest['average'] == 'lengthening'
  assert longest['factor'] == pytest.approx(
      1 / (2 * quadratic.STYLISED['eta'] * longest['alpha']), rel=0.01)
  simulated = [r for r in rows if 'simulated_factor' in r]
  assert {r['average'] for r in simulated} == {'fixed', 'lengthening'}
  for r in simulated:
    z = (r['simulated_factor'] - r['factor']) / r['simulated_factor_stderr']
    assert abs(z) < Z_TOLERANCE, r
    assert r['simulated_factor'] == pytest.approx(r['factor'], rel=0.1), r


def test_theory_matched_bema_is_the_mle_over_the_whole_run(
    quadratic_results):
  """With beta_t = 1/t and alpha_t = 1/(eta t) the library's BEMA is Thm.
  2's estimator up to O(1/K): its error follows sigma^2 Tr(A^-2) / K at
  every step, while the running mean lags and the language-model defaults
  stall (the BEMA paper's Fig. 2)."""
  curves = quadratic_results['curves']
  dim = quadratic.DIM
  for (step, bema), (_, ema), (_, ouema) in zip(
      curves['bema/theory'], curves['ema/theory'], curves['ouema/theory']):
    mle = quadratic.SIGMA ** 2 * dim / step
    if step >= 10:  # 256 seeds: the mean of a chi^2_20 is within ~2%
      assert bema == pytest.approx(mle, rel=0.2), step
      assert bema < ouema < ema, step
  final = {k: v[-1][1] for k, v in curves.items()}
  assert final['bema/theory'] < final['vanilla'] / 3
  assert final['bema'] > 10 * final['bema/theory']
  assert quadratic_results['fig2']['holds_from_step'] <= 10


@pytest.mark.parametrize('c', [0.0, 0.02, 0.05, 0.2])
def test_stylised_pace_formula_is_the_recursions_stationary_variance(c):
  """The stylised PACE closed form (Au and Block 2026, Prop. 2) against the
  stationary covariance of the linear recursion itself, Sigma = M Sigma M^T
  + b b^T, solved by vectorisation."""
  eta, beta = quadratic.STYLISED['eta'], quadratic.STYLISED['beta']
  a = eta * quadratic.STYLISED['alpha']
  # state (x, e): x' = (1 - a - c) x + c e - eta xi, e' = (1-beta) e + beta x'
  m = np.array([[1 - a - c, c],
                [beta * (1 - a - c), 1 - beta + beta * c]])
  b = np.array([-eta, -beta * eta]) * quadratic.SIGMA
  sigma = np.linalg.solve(np.eye(4) - np.kron(m, m),
                          np.outer(b, b).ravel()).reshape(2, 2)
  assert quadratic.stylised_pace_theory(c) == pytest.approx(sigma[1, 1],
                                                            rel=1e-9)


def test_finetune_smoke(tmp_path):
  # The smoke run is mostly compilation; XLA's cheapest optimisation level
  # cuts it by about a quarter, and its few steps' numbers are not checked.
  run_benchmark('lm/finetune.py', '--smoke', '--out', str(tmp_path / 'out'),
                '--cache', str(tmp_path / 'cache'), cwd=tmp_path,
                env={'XLA_FLAGS': '--xla_backend_optimization_level=0'})
  assert list((tmp_path / 'cache').glob('pretrained-*.npz'))
  results = json.loads((tmp_path / 'out' / 'results.json').read_text())
  methods = results['methods']
  assert {'adamw', 'ema', 'bema', 'ouema', 'dema', 'pace',
          'adaptive_ademamix', 'ademamix', 'adamw/cosine', 'adamw/wsd',
          'ema/cosine', 'ema/wsd', 'pace/wsd', 'schedule_free'} <= set(methods)
  assert 'bema/f=1' in methods  # the update_freq sweep
  start = {m['curve'][0][1] for k, m in methods.items()
           if not k.startswith('merge/')}
  # Step 0 is the pretrained model for every method; a merge of checkpoints
  # exists at the last step only.
  assert all(m['curve'][0][0] == results['config']['steps']
             for k, m in methods.items() if k.startswith('merge/'))
  assert max(start) - min(start) < 1e-5
  seeds, steps = results['config']['seeds'], results['config']['steps']
  for m in methods.values():
    assert math.isfinite(m['final_eval_loss'])
    assert m['final_eval_loss'] == pytest.approx(m['curve'][-1][1])
    assert len(m['steps_to_target_per_seed']) == seeds
    for s in m['steps_to_target_per_seed']:
      assert s is None or 0 <= s <= steps
  # AdamW reaches its own final loss at the last step at the latest.
  assert all(s is not None for s in
             methods['adamw']['steps_to_target_per_seed'])
  assert steps == methods['adamw']['curve'][-1][0]
  sweep = results['learning_rate_sweep']
  assert len(sweep) == len(results['config']['learning_rates']) >= 2
  for by_method in sweep.values():
    assert {'adamw', 'adamw/cosine', 'ema/wsd', 'pace', 'pace/wsd',
            'schedule_free'} <= set(by_method)
  # pace/matched: the sweep at every rate, c chosen on validation, and at
  # c = 0 exactly the ema baseline at lag 1 (PACE's EMA without a pullback).
  for lr, entry in results['pace_matched'].items():
    assert entry['chosen_pullback'] in map(float, entry['by_pullback'])
    assert sweep[lr]['pace/matched']['final_eval_loss_per_seed'] == (
        sweep[lr]['pace/matched/pullback=' + '{:g}'.format(
            entry['chosen_pullback'])]['final_eval_loss_per_seed'])
    assert np.abs(entry['pullback_0_minus_ema/lag=1_per_seed']).max() < 1e-6
  claims = results['claims']
  # PACE's three twice (pace/matched, then pace), WSM's and PMA's merges.
  assert len(claims) == 12
  assert {'merge/linear', 'merge/cosine', 'merge/1-sqrt',
          'merge/mean'} <= set(methods)
  for c in claims:
    assert set(c) == {'claim', 'source', 'measured', 'verdict'}
    assert c['verdict'] in _claims.VERDICTS and c['measured']
  assert (tmp_path / 'out' / 'finetune.png').stat().st_size > 0


def test_finetune_parts_combine_to_the_whole_run(tmp_path):
  """A study run seed by seed (``--first-seed``) and joined by
  ``combine.py`` gives what one run over both seeds gives: the same
  per-seed losses, mean curves, chosen pullback and claims."""
  def finetune(out, *args):
    run_benchmark('lm/finetune.py', '--smoke', '--pace-only', '--lr', '1e-3',
                  '3e-3', '--steps', '4', '--out', str(tmp_path / out),
                  '--cache', str(tmp_path / 'cache'), *args, cwd=tmp_path,
                  env={'XLA_FLAGS': '--xla_backend_optimization_level=0'})
    return str(tmp_path / out)
  whole = finetune('whole', '--seeds', '2')
  first = finetune('first', '--seeds', '1')
  second = finetune('second', '--seeds', '1', '--first-seed', '1')
  run_benchmark('lm/combine.py', second, first, '--out',
                str(tmp_path / 'joined'), cwd=tmp_path)
  expected, joined = (json.loads((pathlib.Path(p) / 'results.json')
                                 .read_text())
                      for p in (whole, tmp_path / 'joined'))
  assert joined['config']['seeds_by_rate'] == {'0.001': [0, 1],
                                               '0.003': [0, 1]}
  for lr, methods in expected['learning_rate_sweep'].items():
    assert set(joined['learning_rate_sweep'][lr]) == set(methods)
    for name, m in methods.items():
      got = joined['learning_rate_sweep'][lr][name]
      for field in ('final_eval_loss_per_seed', 'steps_to_target_per_seed'):
        assert got[field] == m[field], (lr, name, field)
      assert got['final_eval_loss'] == pytest.approx(m['final_eval_loss'])
  for name, m in expected['methods'].items():
    got = joined['methods'][name]
    assert got['final_validation_loss_per_seed'] == (
        m['final_validation_loss_per_seed'])
    np.testing.assert_allclose(got['curve'], m['curve'], rtol=1e-6)
  for lr, entry in expected['pace_matched'].items():
    assert joined['pace_matched'][lr]['chosen_pullback'] == (
        entry['chosen_pullback'])
    for c, row in entry['by_pullback'].items():
      got = joined['pace_matched'][lr]['by_pullback'][c]
      assert got['held_out_loss_per_seed'] == row['held_out_loss_per_seed']
      for field in ('held_out_loss', 'validation_loss', 'mean_gain',
                    'clipped_fraction'):
        assert got[field] == pytest.approx(row[field]), (lr, c, field)
  assert joined['claims'] == expected['claims']
  proc = subprocess.run([sys.executable, str(BENCHMARKS / 'lm/combine.py'),
                         first, whole, '--out', str(tmp_path / 'bad')],
                        capture_output=True, text=True, check=False)
  assert proc.returncode == 2 and 'appear twice' in proc.stderr


def _part(folder, first, seeds, rates, **settings):
  """A results.json as finetune.py writes it, AdamW's rows only, its
  losses 1 + seed / 100."""
  row = {'final_eval_loss_per_seed': [1 + s / 100 for s in
                                      range(first, first + seeds)],
         'steps_to_target_per_seed': [10] * seeds, 'final_eval_loss': 1.0,
         'final_eval_loss_std': 0.0}
  config = {**dict(seeds=seeds, first_seed=first, learning_rate=1e-3,
                   learning_rates=list(rates), machine='m', wall_seconds=1.0,
                   pretrain={'held_out_loss': 1.5}, steps=10, eval_every=5),
            **settings}
  results = dict(
      config=config, methods={'adamw': dict(
          row, final_validation_loss_per_seed=[1.0] * seeds,
          curve=[[0, 2.0], [10, 1.0]])},
      learning_rate_sweep={f'{lr:g}': {'adamw': row} for lr in rates},
      matched_profiles={'steps': 10})
  folder.mkdir()
  (folder / 'results.json').write_text(json.dumps(results))
  return str(folder)


def test_combine_refuses_parts_that_do_not_pair(tmp_path):
  """A rate without every seed, a seed twice (also through a joined
  result, whose seeds are its own) or a setting that differs is refused."""
  import combine  # pylint: disable=g-import-not-at-top
  def refused(match, *parts):
    with pytest.raises(ValueError, match=match):
      combine.combine(list(parts))
  tmp = tmp_path
  both = _part(tmp / 'both', 0, 2, [1e-3, 3e-3])
  third = _part(tmp / 'third', 2, 1, [1e-3, 3e-3])
  refused('another rate', both, _part(tmp / 'one_rate', 2, 1, [1e-3]))
  refused('differs .* in steps', both,
          _part(tmp / 'longer', 2, 1, [1e-3, 3e-3], steps=20))
  # Seeds 0 and 2, in seed order: the joined result says so, not 0 and 1.
  joined = combine.combine([third, _part(tmp / 'first', 0, 1,
                                         [1e-3, 3e-3])])
  assert joined['config']['seeds_by_rate']['0.001'] == [0, 2]
  assert joined['learning_rate_sweep']['0.001']['adamw'][
      'final_eval_loss_per_seed'] == [1.0, 1.02]
  (tmp / 'joined').mkdir()
  (tmp / 'joined' / 'results.json').write_text(json.dumps(joined))
  refused('appear twice', str(tmp / 'joined'), third)
  # Seed 1 joins between them, whatever the order of the parts.
  rejoined = combine.combine([str(tmp / 'joined'),
                              _part(tmp / 'second', 1, 1, [1e-3, 3e-3])])
  assert rejoined['config']['seeds_by_rate']['0.003'] == [0, 1, 2]
  assert rejoined['learning_rate_sweep']['0.003']['adamw'][
      'final_eval_loss_per_seed'] == [1.0, 1.01, 1.02]


def test_combine_chooses_the_pullback_over_every_seed():
  """The pullback is chosen on the mean validation loss over all seeds: a
  part of one seed that prefers 0.1 and a part of two that prefer 0 give
  (0.8 + 2 * 1.15) / 3 = 1.033 against 1.0, so 0."""
  import combine  # pylint: disable=g-import-not-at-top
  def entry(validation, held):
    return dict(chosen_pullback=min(validation, key=validation.get),
                by_pullback={c: dict(validation_loss=v,
                                     held_out_loss=float(np.mean(held[c])),
                                     held_out_loss_per_seed=held[c],
                                     mean_gain=0.0, clipped_fraction=0.0)
                             for c, v in validation.items()},
                pullback_0_minus_ema_per_seed=[0.0] * len(held['0']))
  one = entry({'0': 1.0, '0.1': 0.8}, {'0': [2.0], '0.1': [1.9]})
  two = entry({'0': 1.0, '0.1': 1.15}, {'0': [2.1, 2.2], '0.1': [2.3, 2.4]})
  assert one['chosen_pullback'] == '0.1' and two['chosen_pullback'] == '0'
  # Unweighted, the parts' means would give (0.8 + 1.15) / 2 < 1 and 0.1.
  joined = combine._join_matched([one, two], [1, 2], [0, 1, 2])
  assert joined['chosen_pullback'] == 0.0
  assert joined['by_pullback']['0.1']['validation_loss'] == pytest.approx(
      (0.8 + 2 * 1.15) / 3)
  assert joined['by_pullback']['0.1']['held_out_loss_per_seed'] == [
      1.9, 2.3, 2.4]
  assert joined['pullback_0_minus_ema_per_seed'] == [0.0] * 3


def test_low_precision_smoke(tmp_path):
  run_benchmark('cost/low_precision.py', '--smoke', '--out',
                str(tmp_path / 'out'), '--cache', str(tmp_path / 'cache'),
                cwd=tmp_path,
                env={'XLA_FLAGS': '--xla_backend_optimization_level=0'})
  results = json.loads((tmp_path / 'out' / 'results.json').read_text())
  memory = results['bytes_per_parameter']
  # 4 and 2 bytes per element and copy, plus a few scalars per state.
  for name, copies in (('ema', 1), ('bema', 2), ('dema', 2), ('ouema', 2),
                       ('posthoc_ema()', 5)):
    assert memory[f'{name} float32'] == pytest.approx(4 * copies, rel=1e-2)
    assert memory[f'{name} bfloat16'] == pytest.approx(2 * copies, rel=1e-2)
  assert all(np.isfinite(r['distance']) for r in results['rows'])


@pytest.mark.parametrize('schedule', _schedules.SCHEDULES)
def test_schedules_are_the_pace_papers(schedule):
  """Step k (from 1) against the definitions: warmup peak k / W, then
  constant, cosine to 0 at T, or constant until 0.8 T and linear to 0."""
  peak, steps = 2e-3, 200
  warmup = 10
  assert _schedules.warmup_steps(steps) == warmup
  rate = _schedules.learning_rate(peak, schedule, steps)
  for k in range(1, steps + 1):
    if k <= warmup:
      expected = peak * k / warmup
    elif schedule == 'constant':
      expected = peak
    elif schedule == 'cosine':
      expected = peak * (1 + math.cos(math.pi * (k - warmup)
                                      / (steps - warmup))) / 2
    else:
      expected = peak if k <= 160 else peak * (steps - k) / 40
    assert float(rate(k - 1)) == pytest.approx(expected, abs=1e-9), k
  assert schedule == 'constant' or float(rate(steps - 1)) == 0.0


@pytest.mark.parametrize('diffs, sign, verdict', [
    ([-0.02, -0.03, -0.025], -1, 'reproduced'),
    ([-0.02, 0.001, -0.025], -1, 'partly'),      # one seed disagrees
    ([-0.001, -0.02], -1, 'partly'),             # not beyond one sd
    ([-0.02], -1, 'partly'),                     # one seed: no spread
    ([0.01, 0.02], -1, 'not reproduced'),
    ([0.01, 0.02], +1, 'reproduced'),
    ([0.0, 0.0], -1, 'not reproduced'),
])
def test_sign_verdict(diffs, sign, verdict):
  assert _claims.sign_verdict(diffs, sign) == verdict


def test_competitive_and_combined_verdicts():
  assert _claims.competitive_verdict([0.001, -0.002]) == 'reproduced'
  assert _claims.competitive_verdict([0.005, 0.006]) == 'partly'
  assert _claims.competitive_verdict([0.05, 0.06]) == 'not reproduced'
  assert _claims.combine(['reproduced', 'reproduced']) == 'reproduced'
  assert _claims.combine(['reproduced', 'not reproduced']) == 'partly'
  assert _claims.combine(['not reproduced'] * 2) == 'not reproduced'
  assert _claims.steps_to_target([[0, 3.0], [5, 2.0], [10, 1.0]], 2.0) == 5
  assert _claims.steps_to_target([[0, 3.0], [5, 2.5]], 2.0) is None


def _evidence(pace_by_lr):
  """Three seeds; baselines at 1.0 + seed / 100; PACE as given."""
  finals = {}
  for lr, pace in pace_by_lr.items():
    finals[lr] = {b: [1.0, 1.01, 1.02] for b in ('adamw', 'adamw/wsd', 'ema')}
    finals[lr]['adamw/wsd'] = [0.99, 1.0, 1.01]  # the strongest baseline
    finals[lr]['pace'] = pace
  steps = {lr: {k: [0] * 3 for k in v} for lr, v in finals.items()}
  return _claims.Evidence(finals, steps, base_lr=1e-3, never=100)


def _claim(evidence, starts):
  return next(c for c in _claims.claims(
      evidence, ('adamw', 'adamw/wsd', 'ema'))
              if c['claim'].startswith(starts))


def test_pace_claims_judge_the_strongest_baseline_and_the_trend():
  growing = _evidence({3e-4: [0.985, 0.995, 1.005],   # margin 0.005
                       1e-3: [0.97, 0.98, 0.99],      # 0.02
                       3e-3: [0.94, 0.95, 0.96]})     # 0.05
  assert _claim(growing, 'PACE at a constant')['verdict'] == 'reproduced'
  assert _claim(growing, "PACE's margin")['verdict'] == 'reproduced'
  # Ahead of AdamW at its constant rate but behind its wsd schedule.
  behind = _evidence({1e-3: [0.995, 1.005, 1.015]})
  assert _claim(behind, 'PACE at a constant')['verdict'] == 'partly'
  # One rate cannot say how the margin moves with the rate.
  assert _claim(behind, "PACE's margin")['verdict'] == 'untested'
  dipping = _evidence({3e-4: [0.985, 0.995, 1.005],
                       1e-3: [0.98, 0.99, 1.0],       # margin 0.01
                       2e-3: [0.985, 0.995, 1.005],   # falls back to 0.005
                       3e-3: [0.94, 0.95, 0.96]})
  assert _claim(dipping, "PACE's margin")['verdict'] == 'partly'


def test_merge_claims_are_judged_at_every_rate():
  """WSM's claim holds at a rate where the merge ties or beats wsd; a rate
  where it trails wsd beyond the tolerance makes the claim partly. One rate
  is named in the claim; several are its parts."""
  def evidence(merge_by_lr):
    finals = {lr: {'adamw': [1.1, 1.11, 1.12], 'adamw/wsd': [1.0, 1.01, 1.02],
                   'ema': [1.0, 1.01, 1.02], 'merge/linear': merge,
                   'merge/mean': merge} for lr, merge in merge_by_lr.items()}
    steps = {lr: {k: [0] * 3 for k in v} for lr, v in finals.items()}
    return _claims.Evidence(finals, steps, base_lr=1e-3, never=100)
  ahead, behind = [0.99, 1.0, 1.01], [1.05, 1.06, 1.07]
  wsm, pma = 'Merging a constant-rate', 'The plain mean'
  one = evidence({1e-3: ahead})
  assert _claim(one, wsm)['verdict'] == 'reproduced'
  assert '(lr 0.001, 3 seeds, paired)' in _claim(one, wsm)['claim']
  both = evidence({1e-3: ahead, 3e-3: behind})
  assert _claim(both, wsm)['verdict'] == 'partly'
  assert _claim(both, pma)['verdict'] == 'partly'
  assert 'at each rate' in _claim(both, wsm)['claim']
  assert 'lr 0.003: merge/linear - adamw/wsd = +0.0500' in (
      _claim(both, wsm)['measured'])
  assert _claim(evidence({1e-3: behind, 3e-3: behind}), pma)['verdict'] == (
      'not reproduced')


def test_overhead_tables_agree_with_the_readme():
  """The contenders' memory floors are the README's; targets name them."""
  import overhead  # pylint: disable=g-import-not-at-top
  adamw = 7 * 4  # gradient read; params and both moments read and written
  pace_state = 4  # PACE's EMA, beyond AdamW's state
  floors = {c.label: (adamw + c.extra.bytes_per_param(4, pace_state)) / adamw
            for c in overhead.contenders()}
  readme = {'adamw1': 1.0, 'ema1': 1.43, 'bema1': 1.43, 'dema1': 1.71,
            'ouema1': 1.57, 'pace1': 1.29, 'ema400': 1.0, 'bema400': 1.0,
            'dema400': 1.0, 'ouema400': 1.0, 'power_ema1': 1.43,
            'power_ema400': 1.0}
  # Contenders the README's table does not list (averages of several EMAs,
  # posthoc_ema) are held to their own floors by the compiled-step tests.
  assert {k: floors[k] for k in readme} == pytest.approx(readme, abs=0.005)
  assert set(overhead.TARGETS) <= set(floors)


def test_long_run_energy_is_the_quadratics_covariance():
  """The screen's closed form E ||sum_s v_s theta_s||^2 against the mean and
  covariance of SGD's iterates, written out step by step."""
  import posthoc_long_runs  # pylint: disable=g-import-not-at-top
  num_steps, curvatures = 30, np.array([1.0, 0.1, 0.01])
  v = np.random.default_rng(0).normal(size=num_steps + 1)
  lr, noise = posthoc_long_runs.LEARNING_RATE, posthoc_long_runs.NOISE
  s = np.arange(num_steps + 1)
  expected = 0.0
  for h in curvatures:
    a = 1 - lr * h
    mean = posthoc_long_runs.START * a ** s
    # theta_s - mean = -lr sum_{k=1}^{s} a^(s-k) xi_k: independent noises.
    gain = np.where(s[:, None] >= s[None, 1:],
                    a ** np.maximum(s[:, None] - s[None, 1:], 0), 0.0)
    covariance = (lr * noise) ** 2 * gain @ gain.T
    expected += (v @ mean) ** 2 + v @ covariance @ v
  quadratic = posthoc_long_runs.Quadratic(num_steps, curvatures)
  assert quadratic.energy(v) == pytest.approx(expected, rel=1e-10)
  at = np.array([0, 7, 30])
  assert quadratic.iterate_energy(at) == pytest.approx(
      [quadratic.energy(np.eye(num_steps + 1)[t]) for t in at], rel=1e-10)


def test_posthoc_long_runs_quick(tmp_path):
  run_benchmark('synthetic/posthoc_long_runs.py', '--quick', '--out',
                str(tmp_path), cwd=tmp_path)
  results = json.loads((tmp_path / 'results.json').read_text())
  assert results['tracked'] and results['table'] and results['cost']
  # The chosen set at snapshot_steps' placement, on models: within 2%.
  f32 = [r['error'] for r in results['validation']
         if r['storage'] == 'float32, ridge 1e-4' and r['snapshots'] == 40]
  assert f32 and max(f32) < 0.02
  assert 'Profile residual' in (tmp_path / 'results.md').read_text()
  assert (tmp_path / 'errors.png').stat().st_size > 0


def test_merge_command_memory_does_not_grow_with_the_checkpoints(tmp_path):
  run_benchmark('cost/merge_command.py', '--quick', '--out', str(tmp_path),
                cwd=tmp_path)
  results = json.loads((tmp_path / 'results.json').read_text())
  peaks = {r['checkpoints']: r['peak_mib'] for r in results['rows']}
  assert sorted(peaks) == [1, 2, 4, 8, 16]
  # Holding every checkpoint would add 15 of them from k = 1 to k = 16.
  assert peaks[16] - peaks[1] < 8 * results['checkpoint_mib']

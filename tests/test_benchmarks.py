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
sys.path.insert(0, str(BENCHMARKS))
import quadratic  # pylint: disable=g-import-not-at-top,wrong-import-position


def run_benchmark(script, *args, cwd, env=None):
  env = dict(os.environ, MPLBACKEND='Agg', **(env or {}))
  proc = subprocess.run([sys.executable, str(BENCHMARKS / script), *args],
                        cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=170, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc


@pytest.fixture(scope='module')
def quadratic_results(tmp_path_factory):
  out = tmp_path_factory.mktemp('quadratic')
  run_benchmark('quadratic.py', '--quick', '--steps', '1000', '--seeds', '256',
                '--out', str(out), cwd=out)
  assert (out / 'quadratic.png').stat().st_size > 0
  return json.loads((out / 'results.json').read_text())


def test_quadratic_has_every_curve(quadratic_results):
  curves = quadratic_results['curves']
  assert set(curves) == {'vanilla', 'ema', 'bema', 'ouema', 'dema', 'pace'}
  for curve in curves.values():
    steps = [s for s, _ in curve]
    assert steps == sorted(steps) and steps[-1] == 1000
    assert all(math.isfinite(v) for _, v in curve)


def test_quadratic_oracles_match_closed_forms(quadratic_results):
  oracles = quadratic_results['oracles']
  names = {o['name'].split('/')[0] for o in oracles}
  assert names == {'last_iterate', 'mle', 'stylised_pace_ema'}
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


@pytest.mark.parametrize('c', [0.0, 0.02, 0.05, 0.2])
def test_stylised_pace_formula_is_the_recursions_stationary_variance(c):
  """SPEC 3's closed form against the stationary covariance of the linear
  recursion itself, Sigma = M Sigma M^T + b b^T, solved by vectorisation."""
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
  run_benchmark('finetune.py', '--smoke', '--out', str(tmp_path / 'out'),
                '--cache', str(tmp_path / 'cache'), cwd=tmp_path,
                env={'XLA_FLAGS': '--xla_backend_optimization_level=0'})
  assert list((tmp_path / 'cache').glob('pretrained-*.npz'))
  results = json.loads((tmp_path / 'out' / 'results.json').read_text())
  methods = results['methods']
  assert {'adamw', 'ema', 'bema', 'ouema', 'dema', 'pace',
          'adaptive_ademamix', 'ademamix'} <= set(methods)
  assert 'bema/f=1' in methods  # the update_freq sweep
  start = {m['curve'][0][1] for m in methods.values()}
  # Step 0 is the pretrained model for every method.
  assert max(start) - min(start) < 1e-5
  for m in methods.values():
    assert math.isfinite(m['final_eval_loss'])
    assert m['final_eval_loss'] == m['curve'][-1][1]
  assert results['config']['steps'] == methods['adamw']['curve'][-1][0]
  assert (tmp_path / 'out' / 'finetune.png').stat().st_size > 0


def test_overhead_tables_agree_with_the_readme():
  """The contenders' memory floors are the README's; targets name them."""
  import overhead  # pylint: disable=g-import-not-at-top
  adamw = 7 * 4  # gradient read; params and both moments read and written
  pace_state = 4  # PACE's EMA, beyond AdamW's state
  floors = {c.label: (adamw + c.extra.bytes_per_param(4, pace_state)) / adamw
            for c in overhead.contenders()}
  readme = {'adamw1': 1.0, 'ema1': 1.43, 'bema1': 1.43, 'dema1': 1.71,
            'ouema1': 1.57, 'pace1': 1.29, 'ema400': 1.0, 'bema400': 1.0,
            'dema400': 1.0, 'ouema400': 1.0}
  assert floors == pytest.approx(readme, abs=0.005)
  assert set(overhead.TARGETS) <= set(floors)

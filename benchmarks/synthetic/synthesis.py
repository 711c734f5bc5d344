"""Post-hoc synthesis of averages never tracked, on SGD on a noisy quadratic.

While SGD trains, a few EMAs with power-law weights beta_t = (10 + t) **
-ema_power are tracked (every step), and each one's value is saved every
``spacing`` steps together with the iterate theta_s; theta_0 is kept too.
After training, the model of a stabilizer that was never run (EMA, BEMA,
DEMA, OUEMA with other hyperparameters) at step T is synthesized as the
combination of the saved arrays whose profiles (their weights on
theta_0..theta_T) best match its profile in least squares, as the post-hoc
EMA of Karras et al. (2024, "Analyzing and Improving the Training Dynamics
of Diffusion Models", Section 3 and its appendix on post-hoc EMA) does, and
compared with the model the stabilizer computes online on the same
trajectory.

Two problems, one still converging at T and one stationary, several seeds
each (the runs). Reported, per target and over runs:
* error: ||synthesized - online|| / ||online - theta_T||, the part of what
  averaging changes that the synthesis gets wrong;
* residual: the profile mismatch ||B^T x - w|| / ||w|| that the fit reports
  without seeing any weights: a bound on trust, pessimistic for a target on a
  coarser update grid (update_freq=5), which no smooth average can match
  step by step but whose local mean it matches;
* sum|x|: the coefficients' size, which scales the rounding error of stored
  snapshots (float32 and bfloat16 columns).

Then the tracked set and the snapshot spacing are varied, over the same
targets and a held-out family, to choose the default tracked powers.
Everything is float64 NumPy; the whole study takes well under a minute.

  python benchmarks/synthetic/synthesis.py --out DIR
"""

from __future__ import annotations

import os

# The fits are dense SVDs of a few hundred columns: one BLAS thread is about
# as fast, and several threads fighting over a busy machine's cores are ten
# times slower. Set before NumPy loads its BLAS.
for _variable in ('OPENBLAS_NUM_THREADS', 'OMP_NUM_THREADS', 'MKL_NUM_THREADS'):
  os.environ.setdefault(_variable, '1')

# pylint: disable=g-import-not-at-top,wrong-import-position
import argparse
import itertools
import pathlib
import sys
import time

import numpy as np

from optax_bema import _profiles

# The helpers every group shares (_common, _transforms) are one folder up.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import _common
import optax_bema
from optax_bema import catalog

STEPS = 2000
DIM = 100
LEARNING_RATE = 0.1
NOISE = 1.0
START_OFFSET = 5.0
SEEDS = 4
# The smallest curvature of each problem (the largest is 1, log-spaced).
# 'converging': the flat directions (time constant 1 / (lr a) = 1000 steps)
# are still far from mu at T, so the averages' lag matters as much as their
# noise reduction. 'stationary': every direction has forgotten the start, and
# the EMAs land nearer mu than the last iterate does.
PROBLEMS = {'converging': 0.01, 'stationary': 0.1}

TRACKED = dict(update_freq=1, lag=10.0, multiplier=1.0)
SAVE_EVERY = 10  # the finest spacing studied; coarser ones subsample it
SPACING = 20
SPACINGS = (10, 20, 50, 100, 200)
CHOICE_SPACINGS = (20, 50)  # the spacings the default must serve
# name: (kind, hyperparameters, the error allowed)
TARGETS = {
    'ema(0.4)': ('ema', dict(ema_power=0.4, update_freq=1), 0.05),
    'ema(0.7, lag 50)': ('ema', dict(ema_power=0.7, lag=50.0, update_freq=1),
                         0.05),
    'bema(0.5, 0.3)': ('bema', dict(ema_power=0.5, bias_power=0.3,
                                    update_freq=1), 0.05),
    'dema(0.6)': ('dema', dict(ema_power=0.6, update_freq=1), 0.05),
    'ouema(0.5, 0.2)': ('ouema', dict(ema_power=0.5, bias_power=0.2,
                                      update_freq=1), 0.05),
    'bema(0.5, 0.2) f=5': ('bema', dict(ema_power=0.5, bias_power=0.2,
                                        update_freq=5), 0.10),
}
# A wider family, to check that a tracked set generalises: powers that no
# candidate set tracks, from ema_power 0.33 (a window of about 12 steps at T,
# shorter than most tracked ones) to 1 (all of training).
HELD_OUT = {
    **{f'ema({p})': ('ema', dict(ema_power=p, update_freq=1), None)
       for p in (0.33, 0.55, 0.85, 0.95, 1.0)},
    **{f'bema({p}, {q})': ('bema', dict(ema_power=p, bias_power=q,
                                        update_freq=1), None)
       for p, q in ((0.42, 0.2), (0.72, 0.2), (0.62, 0.5))},
    'dema(0.42)': ('dema', dict(ema_power=0.42, update_freq=1), None),
    'dema(0.78)': ('dema', dict(ema_power=0.78, update_freq=1), None),
    'ouema(0.68, 0.4)': ('ouema', dict(ema_power=0.68, bias_power=0.4,
                                       update_freq=1), None),
    'ema(0.55) f=10': ('ema', dict(ema_power=0.55, update_freq=10), None),
}
CANDIDATE_SETS = (
    (0.5,), (0.4,), (0.6,),
    (0.4, 0.6), (0.35, 0.65), (0.3, 0.7), (0.25, 0.75), (0.3, 0.9),
    (0.3, 0.5), (0.5, 0.8),
    (0.3, 0.5, 0.7), (0.25, 0.5, 0.75), (0.3, 0.5, 0.9), (0.2, 0.45, 0.8),
    (0.35, 0.5, 0.8),
    (0.2, 0.4, 0.6, 0.8), (0.3, 0.45, 0.6, 0.75),
)
RIDGES = (0.0, 1e-6, 1e-4, 1e-3)


def simulate(seeds: int, smallest_curvature: float
             ) -> tuple[np.ndarray, np.ndarray]:
  """theta_0..theta_T of SGD on 0.5 (x - mu)^T A (x - mu), noisy gradients.

  Returns:
    ``(thetas, mu)``, shapes ``(seeds, STEPS + 1, DIM)`` and ``(DIM,)``.
  """
  rng = np.random.default_rng(0)
  curvatures = np.logspace(0.0, np.log10(smallest_curvature), DIM)
  mu = rng.normal(size=DIM)
  theta = np.tile(mu + START_OFFSET, (seeds, 1))
  thetas = [theta]
  for _ in range(STEPS):
    noise = NOISE * rng.normal(size=theta.shape)
    theta = theta - LEARNING_RATE * (curvatures * (theta - mu) + noise)
    thetas.append(theta)
  return np.stack(thetas, axis=1), mu


def online_model(kind: str, hyperparams, thetas: np.ndarray) -> np.ndarray:
  """The stabilizer's model after the last step: its profile applied to the
  iterates, vectorised over runs (equal to the online recursion to float32
  rounding, as the library's tests check against a reference loop)."""
  return np.einsum('s,rsd->rd', _profile(kind, hyperparams, STEPS), thetas)


def _profile(kind: str, hyperparams, num_steps: int) -> np.ndarray:
  return optax_bema.profile(catalog.stabilizer(kind, **hyperparams),
                            num_steps)


def tracked_snapshots(powers, thetas: np.ndarray) -> np.ndarray:
  """Each tracked EMA's value every SAVE_EVERY steps, updated every step.

  Returns:
    Shape ``(len(powers), STEPS // SAVE_EVERY, runs, DIM)``; index k is
    step (k + 1) * SAVE_EVERY.
  """
  powers = np.asarray(powers)
  ema = np.repeat(thetas[None, :, 0], len(powers), axis=0)
  saved = []
  for t in range(1, thetas.shape[1]):
    base = TRACKED['lag'] + TRACKED['multiplier'] * t
    beta = (base ** -powers)[:, None, None]
    ema = (1 - beta) * ema + beta * thetas[None, :, t]
    if t % SAVE_EVERY == 0:
      saved.append(ema)
  return np.stack(saved, axis=1)


class Study:
  """The runs (problems x seeds), their tracked EMAs and online targets.

  The fit sees only profiles, so one fit serves every run.
  """

  def __init__(self, seeds: int):
    runs = [simulate(seeds, c) for c in PROBLEMS.values()]
    self.thetas = np.concatenate([thetas for thetas, _ in runs])
    self.mu = np.concatenate([np.tile(mu, (seeds, 1)) for _, mu in runs])
    self.powers = sorted({p for s in CANDIDATE_SETS for p in s})
    self.snapshots = tracked_snapshots(self.powers, self.thetas)
    self.targets = {**TARGETS, **HELD_OUT}
    self.online = np.stack([online_model(k, hp, self.thetas)
                            for k, hp, _ in self.targets.values()])
    self.weights = np.stack([_profile(k, hp, STEPS)
                             for k, hp, _ in self.targets.values()])
    self._tracked_profiles = {}

  def _tracked_profile(self, power: float, step: int) -> np.ndarray:
    key = (power, step)
    if key not in self._tracked_profiles:
      w = _profile('ema', {**TRACKED, 'ema_power': power}, step)
      self._tracked_profiles[key] = np.pad(w, (0, STEPS - step))
    return self._tracked_profiles[key]

  def evaluate(self, powers, spacing: int, ridge: float = 1e-6,
               storage: str = 'float64') -> dict:
    """Synthesizes every target from one tracked set and spacing.

    The saved arrays are each tracked EMA at each snapshot step, theta at
    each snapshot step (theta_T among them) and theta_0.

    Returns:
      ``error`` (targets, runs), ``residual`` and ``l1`` (targets,).
    """
    steps = np.arange(spacing, STEPS + 1, spacing)
    one_hot = np.eye(STEPS + 1)
    basis = np.stack(
        [self._tracked_profile(p, s) for p in powers for s in steps]
        + [one_hot[s] for s in steps] + [one_hot[0]])
    index = [self.powers.index(p) for p in powers]
    saved = np.concatenate([
        self.snapshots[index][:, steps // SAVE_EVERY - 1].reshape(
            (-1,) + self.thetas[:, 0].shape),
        self.thetas[:, steps].transpose(1, 0, 2), self.thetas[None, :, 0]])
    coefficients, residual = _profiles.fit(self.weights, basis, ridge=ridge)
    synth = np.einsum('mr,rnd->mnd', coefficients, _stored(saved, storage))
    scale = np.linalg.norm(self.online - self.thetas[None, :, -1], axis=-1)
    error = np.linalg.norm(synth - self.online, axis=-1) / scale
    return dict(error=error, residual=residual,
                l1=np.abs(coefficients).sum(axis=1))


def _stored(x: np.ndarray, storage: str) -> np.ndarray:
  """x as saved in ``storage`` precision, read back in float64."""
  if storage == 'bfloat16':  # round to nearest even on float32's top 16 bits
    bits = x.astype(np.float32).view(np.uint32)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.view(np.float32).astype(np.float64)
  return x.astype(storage).astype(np.float64)


def _pct(x: float) -> str:
  return f'{100 * x:.2f}%'


def recommend(score: dict) -> tuple:
  """The default tracked powers, by a rule stated here rather than by eye.

  ``score[powers]`` is the worst error over every target (required and
  held-out) and seed at the spacings in CHOICE_SPACINGS, or None where a
  required tolerance is missed. Of the sets of 2 or 3 powers, the best pair
  wins unless the best triple at least halves its score: each tracked power
  costs a parameter-sized copy in memory and one more array per snapshot.
  """
  best = {n: min((s for s, v in score.items() if len(s) == n and v is not None),
                 key=score.get, default=None) for n in (2, 3)}
  pair, triple = best[2], best[3]
  if pair is None or (triple is not None
                      and score[triple] <= 0.5 * score[pair]):
    return triple
  return pair


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--seeds', type=int, default=SEEDS)
  parser.add_argument('--out', default=None,
                      help='directory for results.json (none: print only)')
  args = parser.parse_args()
  start = time.perf_counter()
  study = Study(args.seeds)
  names = list(study.targets)
  required = np.arange(len(TARGETS))
  held_out = np.arange(len(TARGETS), len(names))
  allowed = np.array([TARGETS[n][2] for n in TARGETS])

  print(f'SGD on {DIM}-d quadratics, curvatures log-spaced from 1 down to '
        f'{list(PROBLEMS.values())} ({", ".join(PROBLEMS)}), lr '
        f'{LEARNING_RATE}, noise {NOISE}, {STEPS} steps, {args.seeds} seeds '
        'each. What averaging does: mean ||model - mu|| (||model - theta_T||)')
  by_problem = np.arange(len(study.thetas)).reshape(len(PROBLEMS), -1)
  distance = lambda a, b, r: np.linalg.norm(a[r] - b[r], axis=-1).mean()
  print(f'{"":20s}' + ''.join(f'{p:>20s}' for p in PROBLEMS))
  print(f'{"last iterate":20s}' + ''.join(
      f'{distance(study.thetas[:, -1], study.mu, r):20.2f}'
      for r in by_problem))
  for i in required:
    print(f'{names[i]:20s}' + ''.join(
        f'{distance(study.online[i], study.mu, r):13.2f} '
        f'({distance(study.online[i], study.thetas[:, -1], r):4.2f})'
        for r in by_problem))

  # Worst error over runs per target, for every tracked set and spacing.
  worst = {}
  for powers in CANDIDATE_SETS:
    for spacing in SPACINGS if len(powers) < 4 else (SPACING,):
      worst[powers, spacing] = study.evaluate(powers, spacing)['error'].max(1)
  passes = {s: bool((worst[s, SPACING][required] <= allowed).all())
            for s in CANDIDATE_SETS}
  score = {s: max(worst[s, c].max() for c in CHOICE_SPACINGS)
           if passes[s] and len(s) < 4 else None for s in CANDIDATE_SETS}
  chosen = recommend(score)

  print(f'\nTracked set vs error, snapshots every {SPACING} steps; error = '
        '||synth - online|| / ||online - theta_T||, worst over runs')
  print(f'{"tracked ema_powers":22s} {"worst req":>10s} {"mean req":>9s} '
        f'{"worst held-out":>14s}  pass')
  for powers in CANDIDATE_SETS:
    w = worst[powers, SPACING]
    print(f'{str(powers):22s} {_pct(w[required].max()):>10s} '
          f'{_pct(w[required].mean()):>9s} {_pct(w[held_out].max()):>14s}  '
          f'{"yes" if passes[powers] else "NO"}')

  print('\nSnapshot spacing vs worst error, required targets / held-out')
  print(f'{"tracked ema_powers":22s}' + ''.join(
      f'{"every " + str(s):>18s}' for s in SPACINGS))
  for powers in (s for s in CANDIDATE_SETS if len(s) < 4):
    print(f'{str(powers):22s}' + ''.join(
        f'{_pct(w[required].max()) + " / " + _pct(w[held_out].max()):>18s}'
        for w in (worst[powers, s] for s in SPACINGS)))

  print(f'\nRecommended default tracked ema_powers: {chosen} (worst error '
        f'{_pct(score[chosen])} over all targets at spacings '
        f'{CHOICE_SPACINGS}); per target at spacing {SPACING}, over runs:')
  runs = {s: study.evaluate(chosen, SPACING, storage=s)
          for s in ('float64', 'float32', 'bfloat16')}
  print(f'{"target":22s} {"allowed":>7s} {"mean":>7s} {"max":>7s} '
        f'{"residual":>8s} {"sum|x|":>7s} {"float32":>8s} {"bfloat16":>8s}')
  detail = {}
  for i, name in enumerate(names):
    row = dict(error_mean=runs['float64']['error'][i].mean(),
               error_max=runs['float64']['error'][i].max(),
               residual=runs['float64']['residual'][i],
               l1=runs['float64']['l1'][i],
               error_max_float32=runs['float32']['error'][i].max(),
               error_max_bfloat16=runs['bfloat16']['error'][i].max())
    detail[name] = {k: float(v) for k, v in row.items()}
    limit = study.targets[name][2]
    print(f'{name:22s} {_pct(limit) if limit else "held":>7s} '
          f'{_pct(row["error_mean"]):>7s} {_pct(row["error_max"]):>7s} '
          f'{_pct(row["residual"]):>8s} {row["l1"]:7.1f} '
          f'{_pct(row["error_max_float32"]):>8s} '
          f'{_pct(row["error_max_bfloat16"]):>8s}')

  widest = next(s for s in CANDIDATE_SETS if len(s) == 4)
  print(f'\nRidge vs snapshot precision, spacing {SPACING}: worst error over '
        'all targets and runs')
  print(f'{"tracked ema_powers":22s} {"ridge":>6s} {"float64":>8s} '
        f'{"float32":>8s} {"bfloat16":>9s} {"max sum|x|":>10s}')
  by_ridge = {}
  for powers, ridge in itertools.product((chosen, widest), RIDGES):
    cells = [study.evaluate(powers, SPACING, ridge, s)
             for s in ('float64', 'float32', 'bfloat16')]
    by_ridge[f'{powers} ridge={ridge:g}'] = [float(c['error'].max())
                                             for c in cells]
    print(f'{str(powers):22s} {ridge:6.0e} ' + ' '.join(
        f'{_pct(c["error"].max()):>8s}' for c in cells)
          + f' {cells[0]["l1"].max():10.1f}')

  elapsed = time.perf_counter() - start
  print(f'\n{elapsed:.1f} s')
  if args.out:
    path = _common.write_results(args.out, dict(
        config=dict(steps=STEPS, dim=DIM, learning_rate=LEARNING_RATE,
                    noise=NOISE, start_offset=START_OFFSET, seeds=args.seeds,
                    smallest_curvatures=PROBLEMS,
                    tracked=TRACKED, spacing=SPACING,
                    choice_spacings=CHOICE_SPACINGS),
        targets={n: dict(kind=k, hyperparams=hp, allowed=a)
                 for n, (k, hp, a) in study.targets.items()},
        recommended=dict(ema_powers=list(chosen), score=score[chosen]),
        worst_error={f'{s} every {c}': dict(zip(names, w.tolist()))
                     for (s, c), w in worst.items()},
        per_target=detail, by_ridge=by_ridge, seconds=elapsed,
        machine=_common.machine_line()))
    print(f'wrote {path}')


if __name__ == '__main__':
  main()

"""The theory, simulated: SGD on a noisy quadratic (BEMA paper, Section 3).

    theta_{k+1} = theta_k - eta (A (theta_k - mu) + xi_k),  Cov xi = sigma^2 I

from a start far from mu, many seeds at once (``jax.vmap``). The curves are
E||estimate - mu||^2 over steps for the last iterate ("vanilla"), the
library's EMA, BEMA, OUEMA and DEMA fed the simulated trajectory (all in one
``optax_bema.averages`` last in SGD's chain), and the library's PACE run on
the same quadratic.

The stabilizers run twice over the A = I trajectory: with the BEMA paper's
language-model defaults (its Table 2), and theory-matched (``.../theory``):
the EMA weight beta_t = 1/t, a running mean, and the bias weight
alpha_t = 1/(eta a t), Thm. 2's estimator's (lag 0 in both bases; a lag of 1
would give 1/(1 + eta a t), far below it until eta a t >> 1), so that BEMA
tracks the MLE over the whole run (the paper's Fig. 2); OUEMA
debiases with p_t close to exp(-eta a t), the OU model's decay of the
start. A single clock matches one curvature only, so the ill-conditioned
problem runs the defaults alone.

The oracles compare simulation with closed form (the BEMA paper's Section 3
and the PACE paper's Prop. 2):

* last iterate: the EXACT discrete formula for SGD,
  ||(I - eta A)^K (theta_0 - mu)||^2
  + eta^2 sigma^2 sum_i (1 - (1 - eta a_i)^{2K}) / (1 - (1 - eta a_i)^2),
  not the continuous-time Prop. 2, reported beside it as printed in the BEMA
  paper (``prop2_as_printed``): its noise term is twice the SDE's own;
* the discrete MLE mean(theta_0..theta_{K-1}) + (theta_K - theta_0)/(eta A K):
  sigma^2 Tr(A^-2) / K exactly (Thm. 2's discrete analogue);
* stylised PACE (Prop. 2 of the PACE paper), the 1-D recursion
  x' = x - a x - eta xi + c (e - x),  e' = (1 - beta) e + beta x'
  (x = theta - mu, e = EMA - mu, pullback toward the EMA of BEFORE the
  update): stationary E[e^2] = gamma0(c), for c = 0 and a small c > 0.

And the PACE paper's claim that the pullback lowers the limiting error of
the average by an arbitrarily large factor on some instances: along a
family whose noise-to-curvature ratio sigma^2 / alpha grows without bound
(alpha -> 0), the factor gamma0(0) / min over gains in [0, 1] of gamma0,
in closed form and simulated, with the average fixed (beta constant) and
with it lengthening as the curvature falls (beta = eta alpha). A diagonal
instance's error is the sum of its coordinates', so its factor tends to
that of its coordinate of largest ratio.

And checkpoint merging (``_merging.py``; WSM, arXiv 2507.17634): SGD at
a constant rate merged over its last 20% with ``optax_bema.decay_profile``
weights for each decay shape (linear, cosine, 1-sqrt), against SGD whose
rate decays over the same 20% with that shape, on the same noise, both
against their exact discrete closed forms, on both problems.

Each oracle carries the standard error of its Monte-Carlo mean over seeds,
so agreement is judged statistically.

  python benchmarks/synthetic/quadratic.py --quick --out DIR
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import optax_bema

# The helpers every group shares (_common) are one folder up.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import _common
import _merging
from optax_bema import catalog

DIM = 20
SIGMA = 1.0
START_OFFSET = 3.0      # theta_0 = mu + 3 in every coordinate: ||.||^2 = 180
# Paper Fig. 2 is A = I; the second problem has condition number 100.
# ``curvature`` a, where one exists, sets the theory-matched stabilizers.
PROBLEMS = {
    'isotropic': dict(eigs=np.ones(DIM), eta=0.01, curvature=1.0),
    'ill_conditioned': dict(eigs=np.logspace(0.0, -2.0, DIM), eta=0.1),
}
# The BEMA paper's Table 2 defaults, but updating every step: on a quadratic
# every step is cheap and the stabilizers' schedules are in absolute steps.
STABILIZER_HPARAMS = dict(ema_power=0.5, bias_power=0.2, lag=10.0,
                          multiplier=1.0, update_freq=1)
# OUEMA's p_t = (1 + gamma_alpha t)^-power with power = OU_POWER and
# gamma_alpha = eta a / OU_POWER never differs from the OU model's own decay
# exp(-eta a t) by more than 0.003 (a power law can only approach it).
OU_POWER = 100.0


def theory_hparams(eta, curvature):
  """Per stabilizer: beta_t = 1/t (lag 0: the running mean of theta_1 ..
  theta_t); BEMA's alpha_t = 1/(eta a t), Thm. 2's weight; OUEMA's p_t close
  to exp(-eta a t), the OU model's decay of the start."""
  common = dict(ema_power=1.0, lag=0.0, multiplier=1.0, update_freq=1)
  return dict(
      ema=common,
      bema=dict(common, bias_power=1.0, bias_multiplier=eta * curvature),
      ouema=dict(common, bias_power=OU_POWER,
                 bias_multiplier=eta * curvature / OU_POWER))
# PACE's paper headline pullback, with the stabilizers' ema_power so its EMA
# window matches theirs. Near mu its Adam denominator is the gradient's RMS,
# about sigma, so it acts like SGD with step lr / sigma: lr = eta * sigma
# matches SGD there (far from mu it moves ~lr per coordinate instead).
PACE_HPARAMS = dict(pullback=0.15, ema_power=0.5, weight_decay=0.0)
# Stylised PACE: a = eta * alpha = 0.1, constant EMA weight and gains.
STYLISED = dict(eta=0.1, alpha=1.0, beta=0.05, gains=(0.0, 0.05))
# The family: curvature alpha from 1 to 1e-4 at sigma = 1, eta = 0.1; the
# gain is PACE's, clipped at 1, and the best one is found on GAIN_GRID. With
# the gain at 1 the iterate and its EMA relax together at rate about
# a beta (a = eta alpha), so a member is simulated only where its run of
# 10 * steps is at least RELAXATIONS / (a beta) steps: the first half,
# discarded, then spans 5 such times.
FAMILY = dict(alphas=tuple(float(a) for a in np.logspace(0, -4, 9)))
GAIN_GRID = np.linspace(0.0, 1.0, 4001)
RELAXATIONS = 10


def simulate(eigs, eta, steps, seeds, key, curvature=None):
  """Runs every method on ``seeds`` independent noise sequences.

  Returns ``(curves, finals)``: ``curves[name]`` is E||estimate - mu||^2 after
  each step (mean over seeds), ``finals`` the per-seed errors at step K of the
  last iterate and of the discrete MLE.
  """
  eigs = jnp.asarray(eigs, jnp.float32)
  mu = jnp.ones(DIM)
  theta0 = mu + START_OFFSET
  stabilizers = _common.make_stabilizers(catalog.BEMA_PAPER,
                                         **STABILIZER_HPARAMS)
  if curvature is not None:
    stabilizers.update({
        f'{k}/theory': catalog.stabilizer(k, **hparams)
        for k, hparams in theory_hparams(eta, curvature).items()})
  sgd = optax.chain(optax.sgd(eta), optax_bema.averages(**stabilizers))
  pace = optax_bema.pace(eta * SIGMA, **PACE_HPARAMS)

  def gradient(theta, noise):
    return eigs * (theta - mu) + SIGMA * noise

  def init():
    return dict(theta=theta0, sgd=sgd.init(theta0),
                pace_params=theta0, pace=pace.init(theta0),
                theta_sum=jnp.zeros(DIM))

  def step(carry, key):
    """One seed's SGD step and PACE step, each on its own noise draw."""
    noise = jax.random.normal(key, (2, DIM))
    theta = carry['theta']
    updates, sgd_state = sgd.update(gradient(theta, noise[0]), carry['sgd'],
                                    theta)
    new_theta = optax.apply_updates(theta, updates)
    pace_updates, pace_state = pace.update(
        gradient(carry['pace_params'], noise[1]), carry['pace'],
        carry['pace_params'])
    pace_params = optax.apply_updates(carry['pace_params'], pace_updates)
    models = {k: optax_bema.averaged_params(sgd_state, new_theta, name=k)
              for k in stabilizers}
    models['vanilla'] = new_theta
    models['pace'] = optax_bema.averaged_params(pace_state, pace_params)
    errors = {k: jnp.sum((m - mu) ** 2) for k, m in models.items()}
    carry = dict(theta=new_theta, sgd=sgd_state,
                 pace_params=pace_params, pace=pace_state,
                 theta_sum=carry['theta_sum'] + theta)
    return carry, errors

  def run(key):
    # Every seed starts from the same theta_0; only the noise differs.
    carry = jax.tree.map(lambda x: jnp.broadcast_to(x, (seeds,) + x.shape),
                         init())
    step_keys = jax.random.split(jax.random.fold_in(key, 1), (steps, seeds))

    def all_seeds(carry, keys):
      carry, errors = jax.vmap(step)(carry, keys)
      return carry, jax.tree.map(jnp.mean, errors)
    carry, curves = jax.lax.scan(all_seeds, carry, step_keys)
    mle = (carry['theta_sum'] / steps
           + (carry['theta'] - theta0) / (eta * eigs * steps))
    finals = {'last_iterate': jnp.sum((carry['theta'] - mu) ** 2, -1),
              'mle': jnp.sum((mle - mu) ** 2, -1)}
    return curves, finals

  return jax.jit(run)(key)


def last_iterate_theory(eigs, eta, steps):
  contraction = 1.0 - eta * eigs
  bias = np.sum((contraction ** steps * START_OFFSET) ** 2)
  variance = eta ** 2 * SIGMA ** 2 * np.sum(
      (1.0 - contraction ** (2 * steps)) / (1.0 - contraction ** 2))
  return float(bias + variance)


def prop2_as_printed(eigs, eta, steps):
  """The BEMA paper's continuous-time Prop. 2 at T = eta K, as printed, for
  comparison only.

  Its noise term is twice the stationary variance eta sigma^2 / (2 a) of the
  SDE it states, and of SGD as eta -> 0; the oracle uses the exact formula.
  """
  decay = np.exp(-eigs * eta * steps)
  return float(np.sum((decay * START_OFFSET) ** 2) + eta * SIGMA ** 2
               * np.sum((1.0 - decay ** 2) / eigs))


def mle_theory(eigs, steps):
  return float(SIGMA ** 2 * np.sum(eigs ** -2.0) / steps)


def stylised_pace_theory(c, alpha=None, beta=None):
  """gamma0(c): the PACE paper's Prop. 2, stationary EMA error (inf where
  the recursion is unstable); ``c`` may be an array."""
  eta = STYLISED['eta']
  beta = STYLISED['beta'] if beta is None else beta
  a = eta * (STYLISED['alpha'] if alpha is None else alpha)
  u = np.asarray(c, np.float64) * (1 - beta)
  second = 4 - 2 * a - 2 * beta + a * beta - 2 * u
  gamma0 = (beta * eta ** 2 * SIGMA ** 2 * (2 - a - beta + a * beta - u)
            / (a * (a + beta - a * beta + u) * second))
  gamma0 = np.where((second > 0) & (gamma0 > 0), gamma0, np.inf)
  return float(gamma0) if gamma0.ndim == 0 else gamma0


def family_factor(alpha, beta) -> tuple[float, float]:
  """(best gain, gamma0(0) / gamma0(best gain)) over gains in [0, 1]."""
  errors = stylised_pace_theory(GAIN_GRID, alpha, beta)
  best = int(np.argmin(errors))
  return float(GAIN_GRID[best]), float(errors[0] / errors[best])


def simulate_stylised_pace(c, steps, seeds, key, alpha=None, beta=None):
  """Per-seed time average of e^2 over the second half of ``steps``."""
  eta = STYLISED['eta']
  beta = STYLISED['beta'] if beta is None else beta
  a = eta * (STYLISED['alpha'] if alpha is None else alpha)

  def one_seed(key):
    def step(carry, noise):
      x, e = carry
      x = x - a * x - eta * SIGMA * noise + c * (e - x)
      e = (1 - beta) * e + beta * x
      return (x, e), e ** 2
    noise = jax.random.normal(key, (steps,))
    _, squares = jax.lax.scan(step, (jnp.zeros(()), jnp.zeros(())), noise)
    return jnp.mean(squares[steps // 2:])
  return jax.jit(jax.vmap(one_seed))(jax.random.split(key, seeds))


def pace_family(steps, seeds, key) -> list[dict]:
  """The factor along the family, for a fixed and a lengthening average;
  simulated (c = 0 against the best gain, the same noise) where ``steps``
  reach the stationary state (see ``RELAXATIONS``)."""
  out = []
  for i, alpha in enumerate(FAMILY['alphas']):
    for average, beta in (('fixed', STYLISED['beta']),
                          ('lengthening', STYLISED['eta'] * alpha)):
      gain, factor = family_factor(alpha, beta)
      row = dict(average=average, alpha=alpha, beta=beta,
                 noise_to_curvature=SIGMA ** 2 / alpha, best_gain=gain,
                 factor=factor)
      if steps * STYLISED['eta'] * alpha * beta >= RELAXATIONS:
        k = jax.random.fold_in(key, i)
        plain, pulled = (np.asarray(simulate_stylised_pace(
            c, steps, seeds, k, alpha, beta), np.float64) for c in (0.0, gain))
        ratio = plain.mean() / pulled.mean()
        # Delta method for a ratio of means of paired samples.
        rel = np.std(plain / plain.mean() - pulled / pulled.mean(),
                     ddof=1) / np.sqrt(seeds)
        row.update(simulated_factor=float(ratio),
                   simulated_factor_stderr=float(ratio * rel))
      out.append(row)
  return out


def oracle(name, samples, theory):
  samples = np.asarray(samples, np.float64)
  return dict(name=name, measured=float(samples.mean()), theory=theory,
              stderr=float(samples.std(ddof=1) / np.sqrt(samples.size)))


def thin(curve, points=200):
  """About ``points`` log-spaced [step, mse] pairs (steps count from 1)."""
  steps = np.unique(np.geomspace(1, len(curve), points).astype(int))
  return [[int(s), float(curve[s - 1])] for s in steps]


def fig2_ordering(curves) -> dict:
  """Where the BEMA paper's Fig. 2 order, theory-matched BEMA < OUEMA <
  EMA, holds over the logged steps of the A = I run."""
  names = [f'{k}/theory' for k in ('bema', 'ouema', 'ema')]
  steps = [s for s, _ in curves[names[0]]]
  values = np.array([[v for _, v in curves[k]] for k in names])
  holds = (values[0] < values[1]) & (values[1] < values[2])
  broken = np.flatnonzero(~holds)
  start = broken[-1] + 1 if broken.size else 0  # the order's last onset
  return dict(order=names, fraction_of_steps=float(holds.mean()),
              holds_from_step=int(steps[start]) if start < len(steps)
              else None,
              mle_theory_at_end=mle_theory(PROBLEMS['isotropic']['eigs'],
                                           steps[-1]),
              at_end={k: float(v[-1][1]) for k, v in curves.items()})


def _family_panel(ax, family):
  """The factor against the noise-to-curvature ratio: closed form (lines),
  simulated (points, +- 2 standard errors)."""
  for i, average in enumerate(('fixed', 'lengthening')):
    rows = [r for r in family if r['average'] == average]
    label = (f'fixed average, beta {rows[0]["beta"]:g}' if average == 'fixed'
             else 'lengthening average, beta = eta alpha')
    ax.plot([r['noise_to_curvature'] for r in rows],
            [r['factor'] for r in rows], '-', color=f'C{i}', label=label)
    simulated = [r for r in rows if 'simulated_factor' in r]
    ax.errorbar([r['noise_to_curvature'] for r in simulated],
                [r['simulated_factor'] for r in simulated],
                yerr=[2 * r['simulated_factor_stderr'] for r in simulated],
                fmt='o', color=f'C{i}', ms=4)
  ax.axhline(1 / STYLISED['beta'], color='k', ls=':', lw=0.8,
             label='1 / beta (fixed average\'s limit)')
  ax.set_xscale('log')
  ax.set_yscale('log')
  ax.set_xlabel('noise-to-curvature ratio sigma^2 / alpha')
  ax.set_ylabel('EMA error without pullback / with the best gain')
  ax.set_title(f'stylised PACE along the family, eta {STYLISED["eta"]:g}\n'
               '(lines: closed form; points: simulated)')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)


def plot(curves, family, merging, steps, seeds, out_dir):
  """The A = I run with the paper's defaults and theory-matched, the
  ill-conditioned run, each against Thm. 2's MLE floor, and the stylised
  PACE family."""
  isotropic = curves['isotropic']
  theory = {k: v for k, v in isotropic.items()
            if k == 'vanilla' or k.endswith('/theory')}
  panels = [
      ('isotropic', 'A = I, language-model defaults (bias_power 0.2)',
       {k: v for k, v in isotropic.items() if k not in theory or
        k == 'vanilla'}),
      ('isotropic', 'A = I, theory-matched: beta_t = 1/t, '
       'alpha_t = 1/(eta t)', theory),
      ('ill_conditioned', 'ill-conditioned (kappa 100), defaults',
       curves['ill_conditioned'])]
  fig, axes = plt.subplots(1, len(panels) + 2, figsize=(27, 4.5))
  for ax, (problem, title, shown) in zip(axes, panels):
    _common.plot_curves(ax, shown, title=f'{title}\nd={DIM}, {seeds} seeds',
                        ylabel='E||estimate - mu||^2', logy=True)
    # Thm. 2's MLE knows A and eta: the floor no A-blind average can beat.
    ks = np.geomspace(1, steps, 100)
    ax.plot(ks, mle_theory(PROBLEMS[problem]['eigs'], 1) / ks, 'k--', lw=0.8,
            label='MLE (theory)')
    ax.legend(fontsize=7)
    ax.set_xscale('log')
  _family_panel(axes[-2], family)
  _merging.panel(axes[-1], merging)
  return _common.save_figure(fig, out_dir, 'quadratic.png')


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  _common.add_common_args(parser, 'benchmarks/results/synthetic/quadratic')
  parser.add_argument('--steps', type=int, help='SGD steps (override)')
  parser.add_argument('--seeds', type=int, help='seeds (override)')
  args = parser.parse_args()
  steps = args.steps or (2000 if args.quick else 10000)
  seeds = args.seeds or (256 if args.quick else 2048)
  started = time.time()
  key = jax.random.key(0)

  oracles, curves = [], {}
  for i, (problem, spec) in enumerate(PROBLEMS.items()):
    curve, finals = simulate(spec['eigs'], spec['eta'], steps, seeds,
                             jax.random.fold_in(key, i),
                             spec.get('curvature'))
    curves[problem] = {k: thin(np.asarray(v)) for k, v in curve.items()}
    oracles.append(dict(
        oracle(f'last_iterate/{problem}', finals['last_iterate'],
               last_iterate_theory(spec['eigs'], spec['eta'], steps)),
        prop2_as_printed=prop2_as_printed(spec['eigs'], spec['eta'], steps)))
    oracles.append(oracle(f'mle/{problem}', finals['mle'],
                          mle_theory(spec['eigs'], steps)))
  for c in STYLISED['gains']:
    samples = simulate_stylised_pace(c, 10 * steps, seeds,
                                     jax.random.fold_in(key, 100))
    oracles.append(oracle(f'stylised_pace_ema/c={c}', samples,
                          stylised_pace_theory(c)))

  merging = {}
  for i, (problem, spec) in enumerate(PROBLEMS.items()):
    setting = (spec['eigs'], spec['eta'], SIGMA, START_OFFSET, steps)
    samples = _merging.simulate(*setting, seeds,
                                np.random.default_rng(300 + i))
    merging[problem] = dict(last_iterate=float(samples['last_iterate'].mean()))
    for name, closed in _merging.theory(*setting).items():
      kind, shape = name.split('/')
      oracles.append(oracle(f'{kind}/{problem}/{shape}', samples[name],
                            closed))
      merging[problem][name] = dict(measured=oracles[-1]['measured'],
                                    theory=closed)

  family = pace_family(10 * steps, seeds, jax.random.fold_in(key, 200))
  fig2 = fig2_ordering(curves['isotropic'])
  results = dict(oracles=oracles, curves=curves['isotropic'],
                 curves_ill_conditioned=curves['ill_conditioned'], fig2=fig2,
                 pace_family=family, merging=merging,
                 config=dict(dim=DIM, sigma=SIGMA, steps=steps, seeds=seeds,
                             start_offset=START_OFFSET,
                             problems={k: dict(eta=v['eta'],
                                               eigs=v['eigs'].tolist())
                                       for k, v in PROBLEMS.items()},
                             stabilizers=STABILIZER_HPARAMS,
                             theory_stabilizers=theory_hparams(
                                 PROBLEMS['isotropic']['eta'],
                                 PROBLEMS['isotropic']['curvature']),
                             pace=PACE_HPARAMS, stylised_pace=STYLISED,
                             merging=dict(window=_merging.window(steps),
                                          shapes=list(_merging.SHAPES)),
                             pace_family=dict(FAMILY, gains='0 to 1, '
                                              f'{GAIN_GRID.size} points'),
                             machine=_common.machine_line(),
                             wall_seconds=round(time.time() - started, 1)))
  path = _common.write_results(args.out, results)
  plot(curves, family, merging, steps, seeds, args.out)

  print(f'{"oracle":32s} {"measured":>11s} {"theory":>11s} {"z":>6s}')
  for o in oracles:
    z = (o['measured'] - o['theory']) / o['stderr']
    print(f'{o["name"]:32s} {o["measured"]:11.5g} {o["theory"]:11.5g} {z:6.2f}')
  print(f'final E||estimate - mu||^2 at step {steps}:')
  for problem in PROBLEMS:
    print('  ' + problem + ': ' + ', '.join(
        f'{k} {v[-1][1]:.4g}' for k, v in curves[problem].items()))
  print(f"Fig. 2's order (theory-matched bema < ouema < ema) holds at "
        f"{fig2['fraction_of_steps']:.0%} of the logged steps, at every one "
        f"from step {fig2['holds_from_step']}; MLE (theory) at the end "
        f"{fig2['mle_theory_at_end']:.4g}")
  print('stylised PACE: EMA error without pullback / with the best gain '
        '(simulated +- stderr), along sigma^2 / alpha')
  for r in family:
    simulated = (f'  simulated {r["simulated_factor"]:.4g} +- '
                 f'{r["simulated_factor_stderr"]:.2g}'
                 if 'simulated_factor' in r else '')
    print(f'  {r["average"]:11s} beta {r["beta"]:<8.3g} ratio '
          f'{r["noise_to_curvature"]:<8.3g} gain {r["best_gain"]:.4f} '
          f'factor {r["factor"]:.4g}{simulated}')
  print(_merging.table(merging, steps))
  print(f'wrote {path} in {time.time() - started:.0f}s')


if __name__ == '__main__':
  main()

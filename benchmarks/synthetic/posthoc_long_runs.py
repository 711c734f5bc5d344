"""Post-hoc synthesis over long runs: which averages to track, when to save.

People save a few dozen checkpoints per run whatever its length. A
power-law EMA's window grows like t ** ema_power, so near the end of a long
run a short target average is seen only by snapshots taken inside its
window; EDM2 (Karras et al. 2024, "Analyzing and Improving the Training
Dynamics of Diffusion Models", Sec. 3) tracks power-function averages whose
width grows in proportion to t. This study chooses ``posthoc_ema``'s
tracked set and ``snapshot_steps``' placement, on SGD on a noisy quadratic
(curvatures log-spaced 1 to 1e-3, learning rate 0.1, unit gradient noise,
start at 5, optimum 0):

1. Screen, in profile space, candidate tracked sets (at most 4 averages:
   power-function stds, power-law powers, mixes) and snapshot placements
   (a fraction of the snapshots at distances from the end spaced evenly in
   log scale, the rest evenly spaced) for runs of 1e3 to 1e6 steps. The
   error of a fit is computed exactly in expectation over the quadratic's
   noise: the synthesized model minus the online one is r . theta for the
   profile residual r, whose mean and variance are closed forms of r
   (a backward filter per curvature), relative to those of online -
   theta_T (r from ``optax_bema.synthesized_profile``, the weights on the
   iterates of the model ``synthesize`` returns). No model is simulated: a
   run of 1e6 steps costs seconds.
   bfloat16 storage adds each stored array's rounding, scaled by its
   coefficient (ridge 1e-3 there; 1e-4 for float32, see F32_RIDGE).
2. Pick the default by the rule in ``choose``, and measure the range of
   targets (kinds and settings) it synthesizes within 2% at every length.
3. Validate on models: the library itself trains (``optax.chain(sgd,
   posthoc_ema(...))`` under ``jax.lax.scan``) with the targets run online
   by ``optax_bema.averages`` in the same chain, snapshots saved at the
   steps ``snapshot_steps`` names, ``synthesize`` on float32 and on
   bfloat16-stored snapshots, and on those of a second ``posthoc_ema`` in
   the same chain with bfloat16 accumulators (saved as they are); error
   ||synthesized - online|| / ||online - theta_T||.
   With each model, the profile residual ``synthesize`` reports: a bound on
   trust that is pessimistic for targets updated every few hundred steps.
4. Synthesis' own cost at 1e6 (and 1e7) steps, in a subprocess: wall time
   and peak host memory.

  python benchmarks/synthetic/posthoc_long_runs.py [--quick] [--out DIR]
"""

from __future__ import annotations

import os

for _variable in ('OPENBLAS_NUM_THREADS', 'OMP_NUM_THREADS', 'MKL_NUM_THREADS'):
  os.environ.setdefault(_variable, '1')

# pylint: disable=g-import-not-at-top,wrong-import-position
import argparse
import inspect
import json
import resource
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy import signal

import optax_bema
from optax_bema import catalog

LEARNING_RATE = 0.1
NOISE = 1.0
START = 5.0
GOAL = 0.02
BF16_UNIT = 2.0 ** -9  # bfloat16's relative rounding (half an ulp)
BF16_RIDGE = 1e-3
# A ridge of float32's rounding (1e-6) is too small for long runs: an
# average accumulated in float32 over t steps is off by about 6e-8 sqrt(t)
# of its size (1e-4 at 1e6 steps), and the largest coefficients multiply
# that. The study fits float32 snapshots at 1e-4 (synthesize's default since
# this study) and reports 1e-6, the previous default, too.
F32_RIDGE = 1e-4
DEFAULT_RIDGE = 1e-6
BF16_ACCUMULATOR_RIDGE = 0.1


def issue_targets() -> dict:
  """The issue's target set: none of them is tracked (the tests' own)."""
  return catalog.long_run_targets()


def wider_targets() -> dict:
  """A grid around the issue's set, to state the range the default covers."""
  b, out = optax_bema, {}
  for p in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9):
    out[f'EMA {p}'] = b.ema(ema_power=p, update_freq=1)
    out[f'BEMA {p}/0.2'] = b.bema(ema_power=p, update_freq=1)
    out[f'BEMA {p}/0.4'] = b.bema(ema_power=p, bias_power=0.4, update_freq=1)
    out[f'DEMA {p}'] = b.dema(ema_power=p, update_freq=1)
    out[f'OUEMA {p}/0.2'] = b.ouema(ema_power=p, update_freq=1)
  for s in (0.01, 0.02, 0.05, 0.1, 0.2, 0.28):
    out[f'power {s}'] = b.power_ema(s)
  for f in (10, 100, 400):
    out[f'EMA 0.5 every {f}'] = b.ema(update_freq=f)
    out[f'BEMA 0.5/0.2 every {f}'] = b.bema(update_freq=f)
  return out


# Candidate tracked sets: (ema_powers, stds), at most 4 averages.
CANDIDATES = [
    ((0.3, 0.5, 0.9), ()),               # the previous default
    ((0.25, 0.5, 0.75, 0.95), ()),
    ((), (0.05, 0.1)),                   # EDM2's pair
    ((), (0.03, 0.1, 0.2)),
    ((), (0.02, 0.05, 0.1, 0.2)),
    ((), (0.01, 0.04, 0.12, 0.25)),
    ((0.3,), (0.05, 0.15)),
    ((0.3,), (0.03, 0.1, 0.2)),
    ((0.25,), (0.02, 0.08, 0.2)),
    ((0.25, 0.5), (0.05, 0.15)),
    ((0.3, 0.6), (0.1,)),
]
QUICK_CANDIDATES = [CANDIDATES[i] for i in (0, 1, 2)]
# Fraction of the snapshots placed at log-spaced distances from the end.
FRACTIONS = (0.0, 0.25, 0.5, 0.75)


def placement(num_steps: int, count: int, fraction: float) -> np.ndarray:
  """Steps 0 and T, ``count - g`` evenly spaced from 0, and g = round(
  fraction * count) at distances from T spaced evenly in log scale (then
  made distinct whole numbers), from 1 step to below the even spacing (to
  T without even ones): at most ``count + 1`` steps."""
  g = int(round(fraction * count))
  even = count - g
  spaced = np.linspace(0, num_steps, even + 1)[:-1]
  near = np.round(np.geomspace(1, num_steps / even, g + 1)[:-1] if even
                  else np.geomspace(1, num_steps, g))
  # Distinct whole distances: each at least one more than the previous.
  near = np.maximum.accumulate(near - np.arange(g)) + np.arange(g)
  near = near[near <= num_steps]
  steps = np.concatenate([[0, num_steps], spaced, num_steps - near])
  return np.unique(np.round(steps).astype(np.int64))


def library_defaults() -> tuple:
  """``posthoc_ema``'s default tracked set, ``(ema_powers, stds)``."""
  parameters = inspect.signature(optax_bema.posthoc_ema).parameters
  return (tuple(parameters['ema_powers'].default),
          tuple(parameters['stds'].default))


def name_of(tracked) -> str:
  powers, stds = tracked
  parts = [f'ema_powers={powers}'] if powers else []
  return ', '.join(parts + ([f'stds={stds}'] if stds else []))


class Quadratic:
  """Closed-form mean and variance of sum_s v_s theta_s on the noisy
  quadratic: theta_s = a^s theta_0 - lr sum_{u <= s} a^(s - u) xi_u per
  direction, a = 1 - lr h."""

  def __init__(self, num_steps: int, curvatures: np.ndarray):
    self.decay = 1 - LEARNING_RATE * curvatures
    self.powers = self.decay[:, None] ** np.arange(num_steps + 1)

  def energy(self, v: np.ndarray) -> float:
    """E ||sum_s v_s theta_s||^2 over the noise, summed over directions."""
    total = START ** 2 * float(np.sum((self.powers @ v) ** 2))
    for a in self.decay:
      y = signal.lfilter([1.0], [1.0, -a], v[::-1])[::-1]
      total += (LEARNING_RATE * NOISE) ** 2 * float(np.sum(y[1:] ** 2))
    return total

  def iterate_energy(self, steps: np.ndarray) -> np.ndarray:
    """E ||theta_s||^2 at each step s."""
    a2 = self.decay[:, None] ** (2 * steps[None, :])
    var = ((LEARNING_RATE * NOISE) ** 2 * (1 - a2)
           / (1 - self.decay[:, None] ** 2))
    return (START ** 2 * a2 + var).sum(axis=0)


class ProfileStudy:
  """Expected synthesis errors at one run length and snapshot placement."""

  def __init__(self, ends: np.ndarray, quadratic: Quadratic, targets: dict):
    self.ends, self.q, self.targets = ends, quadratic, targets
    num_steps = int(ends[-1])
    self.dense = {k: optax_bema.profile(t, num_steps)
                  for k, t in targets.items()}
    self.scale = {}
    for k, w in self.dense.items():
      moved = w.copy()
      moved[-1] -= 1.0
      self.scale[k] = self.q.energy(moved)  # E ||online - theta_T||^2
    # E ||a||^2 of each stored array a: theta_s or an average saved at s
    # (about theta_s's), and theta_0.
    self.stored = self.q.iterate_energy(ends)
    self.initial = float(self.q.iterate_energy(np.array([0]))[0])

  def errors(self, tracked) -> dict:
    """{target: (float32 error, bfloat16 error, ||x||_2 at ridge 1e-3)}."""
    state = optax_bema.posthoc_ema(*tracked).init(jnp.zeros(1))
    out: dict = {k: [] for k in self.targets}
    for ridge in (F32_RIDGE, BF16_RIDGE):
      fit = optax_bema.synthesized_profile(self.targets, state, self.ends,
                                           ridge=ridge)
      for k in self.targets:
        # The synthesized model minus the online one is sum_s r_s theta_s.
        error = self.q.energy(fit.profile[k] - self.dense[k])
        if ridge == F32_RIDGE:
          out[k].append(np.sqrt(error / self.scale[k]))
          continue
        squares = {name: c ** 2 for name, c in fit.averages[k].items()}
        squares['params'] = fit.params[k] ** 2
        weighted = sum(np.sum(c * (self.initial if name == 'initial'
                                   else self.stored))
                       for name, c in squares.items())
        rounding = BF16_UNIT ** 2 / 3 * (weighted + self.stored[-1])
        out[k] += [np.sqrt((error + rounding) / self.scale[k]),
                   float(np.sqrt(sum(np.sum(c) for c in squares.values())))]
    return {k: tuple(v) for k, v in out.items()}


def screen(lengths, counts, candidates, curvatures) -> list:
  rows = []
  for num_steps in lengths:
    q = Quadratic(num_steps, curvatures)
    for fraction in FRACTIONS:
      for count in counts:
        t0 = time.time()
        study = ProfileStudy(placement(num_steps, count, fraction), q,
                             issue_targets())
        for tracked in candidates:
          errors = study.errors(tracked)
          rows.append(dict(
              steps=num_steps, snapshots=count, fraction=fraction,
              tracked=name_of(tracked), averages=sum(map(len, tracked)),
              f32=max(v[0] for v in errors.values()),
              f32_worst=max(errors, key=lambda k: errors[k][0]),
              bf16=max(v[1] for v in errors.values()),
              coef=max(v[2] for v in errors.values())))
          print(f'  T={num_steps:8d} near the end {fraction:.2f} n={count} '
                f'{rows[-1]["tracked"]}: float32 {pct(rows[-1]["f32"])} '
                f'({rows[-1]["f32_worst"]}), bfloat16 {pct(rows[-1]["bf16"])}',
                flush=True)
        print(f'  ({time.time() - t0:.0f}s)', flush=True)
  return rows


def choose(rows, candidates) -> tuple:
  """The rule: the (tracked set, placement) with the smallest worst-case
  float32 error over every screened length and the issue's targets at 40
  snapshots; among those within 10% of it, the smallest worst-case
  bfloat16 error; a tie left (within 10%) goes to fewer averages."""
  table = {}
  for r in rows:
    if r['snapshots'] == 40:
      key = (r['tracked'], r['fraction'])
      f32, bf16 = table.get(key, (0.0, 0.0))
      table[key] = (max(f32, r['f32']), max(bf16, r['bf16']))
  best = min(v[0] for v in table.values())
  near = {k: v for k, v in table.items() if v[0] <= 1.1 * best}
  best_bf16 = min(v[1] for v in near.values())
  near = {k: v for k, v in near.items() if v[1] <= 1.1 * best_bf16}
  size = {name_of(c): sum(map(len, c)) for c in candidates}
  key = min(near, key=lambda k: (size[k[0]], near[k][1]))
  tracked = next(c for c in candidates if name_of(c) == key[0])
  return tracked, key[1], table


def coverage(tracked, fraction, lengths, curvatures) -> dict:
  """{target: {T: (float32 error, bfloat16 error)}} over the wider grid, at
  40 snapshots: the range the default covers."""
  out: dict = {}
  for num_steps in lengths:
    study = ProfileStudy(placement(num_steps, 40, fraction),
                         Quadratic(num_steps, curvatures), wider_targets())
    for k, v in study.errors(tracked).items():
      out.setdefault(k, {})[num_steps] = (v[0], v[1])
  return out


def simulate(num_steps: int, dim: int, tracked, steps, seed: int = 0):
  """SGD on the quadratic with ``posthoc_ema(*tracked)`` (float32 and
  bfloat16 accumulators) and the issue's targets run online in the same
  chain; {accumulators: {step: (posthoc state, params)}} saved at
  ``steps`` (as NumPy), the online models and theta_T."""
  curvatures = jnp.asarray(np.logspace(0, -3, dim), jnp.float32)
  targets = issue_targets()
  tx = optax.chain(optax.sgd(LEARNING_RATE),
                   optax_bema.posthoc_ema(*tracked),
                   optax_bema.averages(**targets),
                   optax_bema.posthoc_ema(*tracked,
                                          accumulator_dtype=jnp.bfloat16))
  params = jnp.full(dim, START, jnp.float32)
  state = tx.init(params)
  slot = np.full(num_steps + 1, len(steps), np.int32)
  slot[np.asarray(steps)] = np.arange(len(steps))
  kept = lambda state, params: (state[1], state[3], params)
  saved = jax.tree.map(lambda x: jnp.zeros((len(steps),) + x.shape, x.dtype)
                       .at[0].set(x), kept(state, params))
  key = jax.random.key(seed)

  def body(carry, xs):
    params, state, saved = carry
    t, at = xs
    noise = NOISE * jax.random.normal(jax.random.fold_in(key, t), (dim,))
    updates, state = tx.update(curvatures * params + noise, state, params)
    params = optax.apply_updates(params, updates)
    saved = jax.tree.map(lambda b, x: b.at[at].set(x, mode='drop'), saved,
                         kept(state, params))
    return (params, state, saved), None

  run = jax.jit(lambda c, xs: jax.lax.scan(body, c, xs)[0])
  ts = np.arange(1, num_steps + 1, dtype=np.int32)
  params, state, saved = run((params, state, saved), (ts, slot[1:]))
  saved = jax.tree.map(np.asarray, saved)
  snapshots = {
      dtype: {int(s): jax.tree.map(lambda b, i=i: b[i], (saved[j], saved[2]))
              for i, s in enumerate(steps)}
      for j, dtype in enumerate(('float32', 'bfloat16'))}
  online = {k: np.asarray(optax_bema.averaged_params(state[2], params, name=k),
                          np.float64) for k in targets}
  return snapshots, online, np.asarray(params, np.float64)


def stored_in(snapshot, dtype):
  """A snapshot with its float arrays cast to ``dtype`` (None: as saved)."""
  if dtype is None:
    return snapshot
  return jax.tree.map(lambda x: x.astype(dtype) if np.issubdtype(
      x.dtype, np.floating) else x, snapshot)


# (name, accumulators, snapshots stored in, ridge). bfloat16 accumulators
# round stochastically at every step: a long average carries a random walk
# of about sqrt(t / 6) ulps of its deviation from the params (ema_power
# 0.95: 5% of its distance from theta_T at 2,000 steps), which the fit's
# coefficients amplify unless damped harder. Of the ridges 1e-6 to 0.3
# (10x, then 3x apart), 0.1 has the smallest worst error over the lengths
# at 40 snapshots (0.03 is better at 2,000 steps).
STORAGES = (('float32, ridge 1e-6', 'float32', np.float32, DEFAULT_RIDGE),
            ('float32, ridge 1e-4', 'float32', np.float32, F32_RIDGE),
            ('bfloat16, ridge 1e-3', 'float32', jnp.bfloat16, BF16_RIDGE),
            (f'bfloat16 accumulators, ridge {BF16_ACCUMULATOR_RIDGE:g}',
             'bfloat16', None, BF16_ACCUMULATOR_RIDGE))


def validate(lengths, counts, dim, tracked) -> list:
  rows = []
  for num_steps in lengths:
    steps = {n: optax_bema.snapshot_steps(num_steps, n) for n in counts}
    every = sorted(set().union(*steps.values()))
    t0 = time.time()
    snapshots, online, last = simulate(num_steps, dim, tracked, every)
    print(f'  simulated T={num_steps} d={dim}: {time.time() - t0:.1f}s',
          flush=True)
    for n in counts:
      for storage, accumulators, dtype, ridge in STORAGES:
        chosen = [stored_in(snapshots[accumulators][s], dtype)
                  for s in steps[n]]
        models, residuals, _ = optax_bema.synthesize(
            issue_targets(), chosen, ridge=ridge)
        for k, model in models.items():
          error = (np.linalg.norm(np.asarray(model, np.float64) - online[k])
                   / np.linalg.norm(online[k] - last))
          rows.append(dict(steps=num_steps, snapshots=n, storage=storage,
                           target=k, error=float(error),
                           residual=float(residuals[k])))
  return rows


def peak_memory_mb() -> float:
  """This process' peak resident memory. Linux keeps ``ru_maxrss`` across
  ``exec`` (a child would report its parent's peak); ``VmHWM`` is the new
  program's own."""
  try:
    with open('/proc/self/status') as f:
      line = next(x for x in f if x.startswith('VmHWM:'))
    return int(line.split()[1]) / 1024
  except (OSError, StopIteration):
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cost_child(num_steps: int, path: str):
  """In a fresh process: synthesize 3 targets from 41 snapshots of a run of
  ``num_steps`` steps with 8 parameters; prints wall time and peak RSS."""
  steps = optax_bema.snapshot_steps(num_steps, 40)
  data = np.load(path)
  state = optax.chain(optax.sgd(0.1), optax_bema.posthoc_ema()).init(
      jnp.zeros(8))[1]
  leaves, treedef = jax.tree.flatten(state)
  snapshots = []
  for i, step in enumerate(steps):
    # The values of a short run, the counts relabelled to the long run's
    # steps: synthesis' cost depends on the steps, not on the values.
    leaves_i = [data[f'{i % data["n"]}_{j}'] for j in range(len(leaves))]
    leaves_i = [np.asarray(step, x.dtype) if x.ndim == 0 and np.issubdtype(
        x.dtype, np.integer) and j in data['counts'] else x
                for j, x in enumerate(leaves_i)]
    snapshots.append((jax.tree.unflatten(treedef, leaves_i),
                      data[f'{i % data["n"]}_params']))
  targets = {'ema': optax_bema.ema(ema_power=0.4, update_freq=1),
             'dema': optax_bema.dema(ema_power=0.6, update_freq=1),
             'power': optax_bema.power_ema(0.02)}
  before = peak_memory_mb()
  t0 = time.perf_counter()
  optax_bema.synthesize(targets, snapshots)
  wall = time.perf_counter() - t0
  peak = peak_memory_mb()
  print(json.dumps(dict(steps=num_steps, snapshots=len(steps), seconds=wall,
                        peak_mb=peak, before_mb=before)))


def synthesis_cost(lengths, out_dir) -> list:
  """Runs ``cost_child`` per length on snapshots of a short real run."""
  steps = optax_bema.snapshot_steps(1000, 40)
  snaps = simulate(1000, 8, library_defaults(), steps)[0]['float32']
  arrays: dict = {'n': len(steps)}
  counts = set()
  for i, s in enumerate(steps):
    leaves, _ = jax.tree.flatten(snaps[s][0])
    for j, x in enumerate(leaves):
      arrays[f'{i}_{j}'] = x
      if (s and x.ndim == 0 and np.issubdtype(x.dtype, np.integer)
          and int(x) == s):
        counts.add(j)
    arrays[f'{i}_params'] = snaps[s][1]
  arrays['counts'] = np.array(sorted(counts))
  path = os.path.join(out_dir, 'cost_snapshots.npz')
  np.savez(path, **arrays)
  rows = []
  for num_steps in lengths:
    done = subprocess.run(
        [sys.executable, __file__, '--cost-child', str(num_steps), path],
        capture_output=True, text=True, check=True)
    rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f'  synthesis at T={num_steps}: {rows[-1]["seconds"]:.1f}s, peak '
          f'RSS {rows[-1]["peak_mb"]:.0f} MB (before it '
          f'{rows[-1]["before_mb"]:.0f} MB)', flush=True)
  os.remove(path)
  return rows


def pct(x: float) -> str:
  return f'{100 * x:.2f}%' if x < 0.1 else f'{100 * x:.0f}%'


def report(result: dict) -> str:
  """The markdown tables."""
  lines = ['# Post-hoc synthesis over long runs', '',
           f'Chosen: `posthoc_ema({result["chosen"]})`, '
           f'{result["fraction"]:g} of the snapshots at log-spaced distances '
           f'from the end. Rule: {choose.__doc__.split(": ", 1)[1]}', '',
           '## Screen (profile space, expected error, 40 snapshots, worst '
           'over the issue\'s targets and the lengths '
           f'{result["screen_lengths"]})', '',
           '| tracked | ' + ' | '.join(
               f'{f:g} near the end' for f in FRACTIONS) + ' |',
           '|---|' + '---|' * len(FRACTIONS)]
  table = result['table']
  for name in dict.fromkeys(k.split(' @ ')[0] for k in table):
    cells = [table.get(f'{name} @ {f}') for f in FRACTIONS]
    lines.append(f'| {name} | ' + ' | '.join(
        f'{pct(c[0])} / {pct(c[1])}' if c else '' for c in cells) + ' |')
  lines += ['', 'Cells: float32 (ridge 1e-4) / bfloat16 (ridge 1e-3) '
            'storage.', '',
            '## Range covered (profile space, 40 snapshots, worst over '
            f'lengths {result["coverage_lengths"]})', '',
            '| target | float32 | bfloat16 |', '|---|---|---|']
  for k, by_length in result['coverage'].items():
    f32 = max(v[0] for v in by_length.values())
    bf16 = max(v[1] for v in by_length.values())
    lines.append(f'| {k} | {pct(f32)}{" *" if f32 > GOAL else ""} | '
                 f'{pct(bf16)} |')
  lines += ['', '`*`: over 2% at some length.', '']
  for storage, *_ in STORAGES:
    rows = [r for r in result['validation'] if r['storage'] == storage]
    keys = sorted({(r['steps'], r['snapshots']) for r in rows})
    lines += [f'## On models, {storage} snapshots '
              f'(d = {result["dim"]}, one run per length)', '',
              '| target | ' + ' | '.join(f'T={t} n={n}' for t, n in keys)
              + ' |', '|---|' + '---|' * len(keys)]
    for k in dict.fromkeys(r['target'] for r in rows):
      cells = {(r['steps'], r['snapshots']): r['error'] for r in rows
               if r['target'] == k}
      lines.append(f'| {k} | ' + ' | '.join(pct(cells[c]) for c in keys)
                   + ' |')
    lines.append('| worst | ' + ' | '.join(pct(max(
        r['error'] for r in rows if (r['steps'], r['snapshots']) == c))
                                           for c in keys) + ' |')
    lines.append('')
  lines += residual_table(result['validation'])
  lines += ['## Synthesis\' own cost (41 snapshots, 3 targets, 8 '
            'parameters)', '', '| steps | seconds | peak RSS (MB) | RSS '
            'before (MB) |', '|---|---|---|---|']
  for r in result['cost']:
    lines.append(f'| {r["steps"]:.0e} | {r["seconds"]:.1f} | '
                 f'{r["peak_mb"]:.0f} | {r["before_mb"]:.0f} |')
  return '\n'.join(lines) + '\n'


def residual_table(validation: list) -> list:
  """What ``synthesize``'s residual says of the model error: per target, on
  40 float32 snapshots (ridge 1e-4) at each length."""
  rows = [r for r in validation
          if r['storage'] == STORAGES[1][0] and r['snapshots'] == 40]
  lengths = sorted({r['steps'] for r in rows})
  cells = {(r['target'], r['steps']): r for r in rows}
  lines = ['## Profile residual against model error (40 float32 snapshots, '
           'ridge 1e-4)', '',
           'A target updated every few hundred steps (`ema()`, `bema()`) has '
           'a comb-shaped profile that no smooth average matches step by '
           'step: its residual is large while its model error stays small, '
           'as the iterates change little between neighbouring steps.', '',
           '| target | ' + ' | '.join(f'T={t}' for t in lengths) + ' |',
           '|---|' + '---|' * len(lengths)]
  for k in dict.fromkeys(r['target'] for r in rows):
    lines.append(f'| {k} | ' + ' | '.join(
        f'{pct(cells[k, t]["error"])} / {pct(cells[k, t]["residual"])}'
        for t in lengths) + ' |')
  return lines + ['', 'Cells: model error / profile residual.', '']


def plot(result: dict, path: str):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
  rows = result['validation']
  for (storage, *_), style in zip(STORAGES, (':', '-', '--', '-.')):
    for color, n in enumerate(sorted({r['snapshots'] for r in rows})):
      lengths = sorted({r['steps'] for r in rows})
      worst = [max(r['error'] for r in rows if r['steps'] == t
                   and r['snapshots'] == n and r['storage'] == storage)
               for t in lengths]
      left.loglog(lengths, worst, style, marker='o', color=f'C{color}',
                  label=f'{n} snapshots, {storage}')
  left.axhline(GOAL, color='k', lw=0.8)
  left.set(xlabel='run length T', ylabel='worst error over the targets',
           title='On models: ||synth - online|| / ||online - theta_T||')
  left.legend(fontsize=7)
  table = result['table']
  for name in dict.fromkeys(k.split(' @ ')[0] for k in table):
    right.semilogy(FRACTIONS, [table[f'{name} @ {f}'][0] for f in FRACTIONS],
                   marker='.', label=name)
  right.axhline(GOAL, color='k', lw=0.8)
  right.set(xlabel='fraction of snapshots near the end (log-spaced)',
            ylabel='worst expected error (float32)',
            title=f'Screen: 40 snapshots, worst over T <= '
            f'{max(result["screen_lengths"]):.0e}')
  right.legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--quick', action='store_true')
  parser.add_argument('--out',
                      default='benchmarks/results/synthetic/posthoc_long_runs')
  parser.add_argument('--cost-child', nargs=2, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.cost_child:
    cost_child(int(float(args.cost_child[0])), args.cost_child[1])
    return
  os.makedirs(args.out, exist_ok=True)
  if args.quick:
    candidates, lengths, curvatures = QUICK_CANDIDATES, [2000, 20000], 4
    coverage_lengths, valid, counts, dim = [20000], [2000], (20, 40), 20
    cost_lengths = [100_000]
  else:
    candidates, lengths, curvatures = CANDIDATES, [
        1000, 2000, 20000, 200000], 6
    coverage_lengths = [1000, 10000, 100000, 1000000]
    valid, counts, dim = [2000, 20000, 200000], (20, 40, 80), 100
    cost_lengths = [1_000_000, 10_000_000]
  grid = np.logspace(0, -3, curvatures)
  t0 = time.time()
  print('Screen (profile space):', flush=True)
  rows = screen(lengths, [40], candidates, grid)
  tracked, fraction, table = choose(rows, candidates)
  powers, stds = tracked
  print(f'Chosen by the rule: posthoc_ema(ema_powers={powers}, stds={stds}),'
        f' fraction {fraction} of the snapshots near the end.')
  defaults = library_defaults()
  follows = all(
      optax_bema.snapshot_steps(t, n) == placement(t, n, fraction).tolist()
      for t in valid for n in counts)
  if tuple(map(tuple, defaults)) != tracked or not follows:
    print('NOTE: the library\'s defaults or snapshot_steps differ from this '
          'choice; the validation below uses the chosen set and '
          'optax_bema.snapshot_steps as it is.')
  print('Coverage of the wider grid:', flush=True)
  cover = coverage(tracked, fraction, coverage_lengths, grid)
  print('Validation on models:', flush=True)
  validation = validate(valid, counts, dim, tracked)
  print('Synthesis cost:', flush=True)
  cost = synthesis_cost(cost_lengths, args.out)
  result = dict(
      chosen=f'ema_powers={powers}, stds={stds}', tracked=[powers, stds],
      fraction=fraction, screen_lengths=lengths,
      coverage_lengths=coverage_lengths, dim=dim,
      table={f'{k[0]} @ {k[1]}': v for k, v in table.items()},
      screen=rows,
      coverage={k: {str(t): v for t, v in d.items()}
                for k, d in cover.items()},
      validation=validation, cost=cost,
      library_follows=tuple(map(tuple, defaults)) == tracked and follows,
      seconds=time.time() - t0)
  with open(os.path.join(args.out, 'results.json'), 'w') as f:
    json.dump(result, f, indent=1, default=float)
  text = report(result)
  with open(os.path.join(args.out, 'results.md'), 'w') as f:
    f.write(text)
  plot(result, os.path.join(args.out, 'errors.png'))
  print(text)
  print(f'{time.time() - t0:.0f}s; written to {args.out}')


if __name__ == '__main__':
  main()

"""Post-hoc synthesis: the model of any average, from a few tracked ones.

Training tracks a few averages (:func:`~optax_bema.posthoc_ema`) whose
values are saved at snapshot steps. A target's profile at the last snapshot
step T is matched, in least squares, by the profiles of the tracked
averages at every snapshot, the saved params and theta_0; the synthesized
model is the same combination of the saved arrays (EDM2's post-hoc EMA,
Karras et al. 2024, for every stabilizer and any linear average here).

The fit needs only inner products of profiles. Profiles are never
materialised one per snapshot: ``_profiles.Columns`` holds each average's
profiles at every snapshot as a few family vectors over the T + 1 steps and
coefficients per segment between snapshots, so the inner products cost one
pass over T per family (a matrix product per segment) and memory grows as
8 bytes x (families) x T, whatever the number of snapshots.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from optax_bema import _engine
from optax_bema import _posthoc
from optax_bema import _profiles
from optax_bema import _readout
from optax_bema import _tree


class Synthesized(NamedTuple):
  """What :func:`synthesize` returns."""
  model: Any     # the synthesized model (a dict of them for a dict)
  residual: Any  # ||fitted profile - target|| / ||target||, a float (dict)


def synthesize(target, snapshots: Iterable[tuple[Any, Any]], *,
               ridge: float = 1e-4) -> Synthesized:
  """The model any average would have returned, from post-hoc snapshots.

  Train once with :func:`posthoc_ema` (or any :func:`averages`) last in the
  chain and save ``(opt_state, params)`` at the steps
  :func:`snapshot_steps` names; only the averages' state is read, so a
  snapshot may hold just that state (without Adam's moments) and the
  params. The target's profile at the last snapshot's step T is matched in
  least squares by the profiles of the tracked averages at every snapshot,
  the saved params (theta_s exactly) and theta_0; the model is the same
  combination of the saved arrays. The relative residual of that fit says
  how far to trust it: near 0 the synthesis is exact; a target updated
  every few steps has a comb-shaped profile no smooth average matches step
  by step, yet the model error is far smaller than its residual suggests,
  since the iterates change slowly.

  ``snapshots`` is read twice (first to fit, then to sum the arrays), one
  snapshot on the device at a time: pass a list, or an object whose
  ``__iter__`` loads them lazily (from an Orbax ``CheckpointManager``,
  say). The second read must give the same snapshots as the first (their
  steps, shapes and a checksum of every array are compared), so a
  checkpoint written or deleted in between is an error, not a wrong model.

  Args:
    target: a stabilizer (``optax_bema.bema(...)``, ...), a profile (a
      NumPy array of T + 1 weights on theta_0..theta_T, e.g.
      :func:`uniform_profile`), or a dict of them, all in one pass.
    snapshots: ``(opt_state, params)`` pairs in increasing step order, each
      state holding one :func:`averages` state (restored with or without
      an Orbax target).
    ridge: relative Tikhonov weight of the fit; about the snapshots'
      relative precision: 1e-4 for float32 averages accumulated over long
      runs (their rounding drifts by about 6e-8 sqrt(t) of their size),
      1e-3 for snapshots stored in bfloat16.

  Returns:
    ``Synthesized(model, residual)``; dicts of both for a dict of targets.
    The model has the params' structure, dtypes and shardings.

  Raises:
    ValueError: no snapshots or targets, snapshots out of order, of another
      structure or shape, from different runs (another theta_0) or
      averages, with non-finite values, averages that skipped non-finite
      iterates (their profiles are then not the nominal ones), a second
      read unlike the first, a profile of the wrong length, or a negative
      or non-finite ridge.
    TypeError: a target that is neither a stabilizer nor a profile, or a
      one-shot iterator.
  """
  single, targets = _posthoc.as_targets(target, 'synthesize')
  if (isinstance(ridge, bool) or not isinstance(ridge, (int, float))
      or not math.isfinite(ridge) or ridge < 0):
    raise ValueError(f'synthesize: ridge must be a finite number >= 0, got '
                     f'{ridge!r}.')
  if iter(snapshots) is snapshots:
    raise TypeError('synthesize: snapshots are read twice; pass a list or a '
                    're-iterable object (whose __iter__ loads them lazily), '
                    'not a one-shot iterator or generator.')
  first = _read(snapshots)
  ends = np.array([s.step for s in first], np.int64)
  members = first[-1].members
  names = list(targets)
  basis, sources = [], []
  for name, (rule, schedule, _) in members.items():
    columns = rule.profile(schedule, ends)
    keep = [len(ends) - 1] if rule.name == 'initial' else range(len(ends))
    basis.append(_select(columns, keep))
    sources += [(i, name) for i in keep]
  basis.append(_units(ends))
  sources += [(i, None) for i in range(len(ends))]
  wanted = [_target_columns(targets[k], ends) for k in names]
  coefficients, residuals = _fit(basis, wanted, ridge)
  models = _combine(snapshots, first, sources, coefficients)
  params = first[-1].params_like
  out = {k: _tree.cast_like_params(m, params) for k, m in zip(names, models)}
  residual = {k: float(r) for k, r in zip(names, residuals)}
  if single:
    return Synthesized(out[None], residual[None])
  return Synthesized(out, residual)


class _Snapshot(NamedTuple):
  step: int
  members: dict        # name: (rule, schedule, state)
  layout: Any          # tree structure and leaf shapes of the params
  checksum: np.ndarray
  params_like: Any     # the params (read for their layout, at the end)


def _read(snapshots) -> list[_Snapshot]:
  """The first read: every snapshot checked, alone and against the others."""
  out: list[_Snapshot] = []
  layout, last = None, -1
  for opt_state, params in snapshots:
    snap = _snapshot(opt_state, params, layout, last)
    if out:
      _same_run(out[0], snap)
    out.append(snap)
    layout, last = snap.layout, snap.step
  if not out:
    raise ValueError('synthesize: no snapshots.')
  return out


def _snapshot(opt_state, params, layout, last) -> _Snapshot:
  members = _tracked(opt_state)
  counts = {k: int(np.asarray(state.count)) for k, (_, _, state)
            in members.items()}
  step = max(counts.values())
  if len(set(counts.values())) != 1:
    raise ValueError(f'synthesize: the averages of one snapshot have seen '
                     f'different numbers of steps ({counts}): not one state.')
  skipped = {k: int(np.asarray(s.nonfinite_count))
             for k, (_, _, s) in members.items()}
  if any(skipped.values()):
    raise ValueError(f'synthesize: the averages skipped non-finite iterates '
                     f'({skipped} by step {step}); their profiles are not '
                     'the nominal ones, so no synthesis can be trusted.')
  layout = _posthoc.check_next(layout, params, last, step, 'synthesize')
  models = {k: _readout.model(s, params) for k, (_, _, s) in members.items()}
  _posthoc.require_finite(params, f'synthesize: the params at step {step}')
  for k, model in models.items():
    _posthoc.require_finite(
        model, f'synthesize: the average {k!r} at step {step}')
  return _Snapshot(step, members, layout, _checksum(params, members), params)


def _checksum(params, members) -> np.ndarray:
  """Sums of every array a snapshot holds, to compare two reads of it and
  the theta_0 of two snapshots."""
  trees = [params] + [s for _, (_, _, s) in sorted(members.items())]
  return np.array([float(jnp.sum(x, dtype=jnp.float32))
                   for x in jax.tree.leaves(trees)
                   if _tree.is_float_leaf(x)])


def _same_run(first: _Snapshot, snap: _Snapshot):
  """Snapshots of one run track the same averages from the same theta_0."""
  what = {k: (r.name, s.settings()) for k, (r, s, _) in first.members.items()}
  now = {k: (r.name, s.settings()) for k, (r, s, _) in snap.members.items()}
  if what != now:
    raise ValueError(f'synthesize: the snapshot at step {snap.step} tracks '
                     f'{now}, the first one {what}: snapshots of one run.')
  for k, (_, schedule, state) in snap.members.items():
    initial = getattr(state, 'initial_params', None)
    earlier = getattr(first.members[k][2], 'initial_params', None)
    if (initial is None or first.step < schedule.update_after
        or snap.step < schedule.update_after):
      continue
    if not np.array_equal(_checksum(initial, {}), _checksum(earlier, {})):
      raise ValueError(
          f'synthesize: the snapshot at step {snap.step} has another theta_0 '
          f'(in {k!r}) than the one at step {first.step}: snapshots of '
          'different runs cannot be combined.')


def _is_averages(x) -> bool:
  return isinstance(x, _posthoc.AveragesState) or (
      isinstance(x, dict) and set(x) == {'members', 'settings'})


def _tracked(opt_state) -> dict:
  """``{name: (rule, schedule, state)}`` of the one averages state a
  snapshot holds, restored with or without a target."""
  leaves = jax.tree.leaves(opt_state, is_leaf=_is_averages)
  found = [x for x in leaves if _is_averages(x)]
  if len(found) != 1:
    holds = 'no averages state' if not found else (
        f'{len(found)} averages states')
    raise ValueError(
        f'synthesize: a snapshot\'s optimizer state holds {holds}; it must '
        'hold one. Train with optax_bema.posthoc_ema() (or '
        'optax_bema.averages(...)) last in the chain, and save the '
        'optimizer state, or just that state, with the params.')
  state = found[0]
  members, settings = ((state.members, state.settings)
                       if isinstance(state, _posthoc.AveragesState)
                       else (state['members'], state['settings']))
  out = {}
  for name, record in settings.items():
    rule, schedule = _posthoc.decode(record, f'synthesize: member {name!r}')
    member = members[name]
    if isinstance(member, dict):  # restored without a target
      fields = rule.state_cls._fields  # type: ignore[attr-defined]
      member = rule.state_cls(**{f: member.get(f) for f in fields})
    out[name] = (rule, schedule, member)
  return out


def _select(columns: _profiles.Columns, keep) -> _profiles.Columns:
  """The columns ``keep`` of ``columns``."""
  keep = list(keep)
  column, step, weight = columns.points
  mask = np.isin(column, keep)
  renumber = {old: new for new, old in enumerate(keep)}
  return columns._replace(
      coef=columns.coef[keep],
      points=(np.array([renumber[c] for c in column[mask]], np.int64),
              step[mask], weight[mask]))


def _units(ends) -> _profiles.Columns:
  """theta_s at each snapshot step: unit vectors, points alone."""
  n = len(ends)
  return _profiles.Columns(ends, np.zeros((0, int(ends[-1]) + 1)),
                           np.zeros((n, n, 0)),
                           (np.arange(n), ends.copy(), np.ones(n)))


def _target_columns(target, ends) -> _profiles.Columns:
  """A target's profile at T, as one column."""
  if isinstance(target, _engine.Stabilizer):
    return _select(target.rule.profile(target.schedule, ends),
                   [len(ends) - 1])
  w = _posthoc.check_profile(target, int(ends[-1]), 'synthesize')
  empty = np.zeros(0, np.int64)
  return _profiles.Columns(ends, w[None], np.ones((1, len(ends), 1)),
                           (empty, empty, np.zeros(0)))


def _stack(blocks: list[_profiles.Columns]):
  """Every column of ``blocks`` over one set of families: (families,
  coef (n, segments, A), points with global column numbers)."""
  families = np.concatenate([b.families for b in blocks])
  total = sum(b.coef.shape[0] for b in blocks)
  coef = np.zeros((total, blocks[0].coef.shape[1], len(families)))
  points: list = [[], [], []]
  row = fam = 0
  for b in blocks:
    n, _, a = b.coef.shape
    coef[row:row + n, :, fam:fam + a] = b.coef
    for k, x in enumerate((b.points[0] + row, b.points[1], b.points[2])):
      points[k].append(x)
    row, fam = row + n, fam + a
  return families, coef, tuple(np.concatenate(p) for p in points)


def _fit(basis, wanted, ridge):
  """Coefficients (targets x basis columns) and each target's relative
  residual, from the profiles' inner products."""
  families, coef, (column, step, weight) = _stack(basis + wanted)
  ends = basis[0].ends
  starts = np.concatenate([[0], ends[:-1] + 1])
  gram = np.zeros((coef.shape[0], coef.shape[0]))
  for j, (a, b) in enumerate(zip(starts, ends + 1)):
    block = families[:, a:b]
    c = coef[:, j, :]
    gram += c @ (block @ block.T) @ c.T
  # Point masses, against the dense parts and each other.
  at = np.unique(step)
  dense_at = np.einsum('cpa,ap->cp', coef[:, np.searchsorted(ends, at), :],
                       families[:, at])
  mass = np.zeros((coef.shape[0], len(at)))
  np.add.at(mass, (column, np.searchsorted(at, step)), weight)
  gram += mass @ dense_at.T + dense_at @ mass.T + mass @ mass.T
  n = sum(b.coef.shape[0] for b in basis)
  x = _profiles.fit_gram(gram[:n, :n], gram[:n, n:], ridge=ridge)
  residuals = []
  segment = np.searchsorted(ends, np.arange(families.shape[1]))
  for t in range(len(wanted)):
    d = np.concatenate([x[:, t], -np.eye(len(wanted))[t]])
    per_family = np.einsum('c,cja->ja', d, coef)
    r = np.zeros(families.shape[1])
    for a in np.flatnonzero(np.abs(per_family).sum(axis=0)):
      r += per_family[segment, a] * families[a]
    np.add.at(r, step, d[column] * weight)
    residuals.append(np.linalg.norm(r) / math.sqrt(gram[n + t, n + t]))
  return x.T, residuals


def _combine(snapshots, first: list[_Snapshot], sources, coefficients):
  """The second read: each target's weighted sum of the saved arrays, one
  snapshot at a time, checked against the first read."""
  sums = None
  count = 0
  for i, (opt_state, params) in enumerate(snapshots):
    if i >= len(first):
      raise ValueError(_REREAD.format(f'more than {len(first)} snapshots'))
    members = _tracked(opt_state)
    if not np.array_equal(_checksum(params, members), first[i].checksum):
      raise ValueError(_REREAD.format(
          f'snapshot {i} (step {first[i].step}) with other contents'))
    at = [j for j, (snap, _) in enumerate(sources) if snap == i]
    arrays = [_tree.as_accumulator(
        params if sources[j][1] is None
        else _readout.model(members[sources[j][1]][2], params), None)
              for j in at]
    sums = _accumulate(sums, arrays,
                       jnp.asarray(coefficients[:, at], jnp.float32))
    count += 1
  if count != len(first):
    raise ValueError(_REREAD.format(f'{count} of {len(first)} snapshots'))
  return sums


_REREAD = ('synthesize: the second read of the snapshots gave {}: they '
           'changed between the two reads (a checkpoint written or deleted '
           'meanwhile?). Pass a fixed list of steps to read.')


@jax.jit
def _accumulate(sums, arrays, weights):
  """``sums[m] + sum_j weights[m, j] arrays[j]``, leaf by leaf (``sums``
  None: no sums yet)."""
  def one(m):
    total = jax.tree.map(
        lambda *xs: sum(weights[m, j] * x for j, x in enumerate(xs)), *arrays)
    return total if sums is None else jax.tree.map(jnp.add, sums[m], total)
  return [one(m) for m in range(weights.shape[0])]


# The fraction of snapshots placed near the end: chosen, with the tracked
# set of posthoc_ema, by the rule of benchmarks/synthetic/posthoc_long_runs.py.
NEAR_END_FRACTION = 0.25


def snapshot_steps(num_steps: int, num_snapshots: int) -> list[int]:
  """The steps at which to save snapshots for :func:`synthesize`.

  Step 0 and ``num_steps`` = T; a quarter of the snapshots at distances
  from T spaced evenly in log scale, from 1 step up to the even spacing;
  the others evenly spaced from step 0. A short average's final model
  depends only on the last few iterates, which only snapshots inside its
  window see (a power-law EMA's window is about t ** ema_power steps: 130
  steps for ema_power 0.4 at 200,000 steps), while long averages and
  averages updated every few hundred steps are matched best from evenly
  spread snapshots. With :func:`posthoc_ema`'s defaults and 40 snapshots
  this synthesizes the final model of the targets listed there within 2%
  of its distance from theta_T on runs of 1e3 to 1e6 steps (SGD on a noisy
  quadratic); 40 evenly spaced snapshots miss short averages by 75% or more
  at 2e5 steps.

  If training stops early, at step S, save a snapshot at S too: only the
  evenly spaced snapshots lie before it, so averages wider than their
  spacing (about 4 T / (3 n) steps) are still recovered at S, shorter ones
  are not. If it runs longer, to T' > T, the saved steps stay valid and the
  model at T can still be synthesized from the snapshots up to T; for T'
  save the steps of ``snapshot_steps(T', n)`` after T as well (the last
  ones, near T', are what short averages need).

  Args:
    num_steps: T, the run's length, an integer >= 1.
    num_snapshots: n, how many snapshots besides step 0, an integer >= 1.

  Returns:
    At most ``num_snapshots + 1`` distinct increasing steps, the first 0,
    the last ``num_steps``.

  Raises:
    TypeError: an argument that is not an integer (``True`` is not one).
    ValueError: ``num_steps`` or ``num_snapshots`` below 1.

  Examples:
    >>> import optax_bema
    >>> optax_bema.snapshot_steps(1000, 8)
    [0, 167, 333, 500, 667, 833, 987, 999, 1000]
  """
  num_steps = _posthoc.whole_step(num_steps, 'snapshot_steps', 'num_steps')
  count = _posthoc.whole_step(num_snapshots, 'snapshot_steps',
                              'num_snapshots')
  if num_steps < 1 or count < 1:
    raise ValueError(f'snapshot_steps: need num_steps >= 1 and num_snapshots '
                     f'>= 1, got {num_steps} and {count}.')
  near = int(round(NEAR_END_FRACTION * count))
  even = count - near
  spaced = np.linspace(0, num_steps, even + 1)[:-1]
  distances = np.round(np.geomspace(1, num_steps / even, near + 1)[:-1]
                       if even else np.geomspace(1, num_steps, near))
  # Whole, distinct distances: each at least one more than the previous.
  distances = (np.maximum.accumulate(distances - np.arange(near))
               + np.arange(near))
  distances = distances[distances <= num_steps]
  steps = np.concatenate([[0, num_steps], spaced, num_steps - distances])
  return [int(s) for s in np.unique(np.round(steps).astype(np.int64))]

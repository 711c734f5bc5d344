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
import optax

from optax_bema import _averages
from optax_bema import _checks
from optax_bema import _fit
from optax_bema import _profiles
from optax_bema import _readout
from optax_bema import _snapshots
from optax_bema import _targets
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
      structure or shape, averages shaped unlike their params, from
      different runs (another theta_0) or averages, with non-finite values
      (refused, as :func:`replay` refuses them: no snapshot is skipped),
      averages that skipped non-finite iterates (their profiles are then
      not the nominal ones), a step count saved in a float dtype too
      narrow to hold it exactly, a second read unlike the first, a profile
      of the wrong length, or a negative or non-finite ridge.
    TypeError: a target that is neither a stabilizer nor a profile, or a
      one-shot iterator.
  """
  single, targets = _targets.as_targets(target, 'synthesize')
  _require_ridge(ridge, 'synthesize')
  if iter(snapshots) is snapshots:
    raise TypeError('synthesize: snapshots are read twice; pass a list or a '
                    're-iterable object (whose __iter__ loads them lazily), '
                    'not a one-shot iterator or generator.')
  first = _read(snapshots)
  ends = np.array([s.step for s in first], np.int64)
  members = first[-1].members
  names = list(targets)
  basis, sources = _basis(members, ends)
  wanted = [_targets.columns(targets[k], ends) for k in names]
  coefficients, residuals = _fit.solve(basis, wanted, ridge)
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
      _same_run(out, snap)
    out.append(snap)
    layout, last = snap.layout, snap.step
  if not out:
    raise ValueError('synthesize: no snapshots.')
  return out


def _snapshot(opt_state, params, layout, last) -> _Snapshot:
  members = _averages.tracked(opt_state, 'synthesize')
  counts = {k: _whole(state.count, k) for k, (_, _, state)
            in members.items()}
  step = max(counts.values())
  if len(set(counts.values())) != 1:
    raise ValueError(f'synthesize: the averages of one snapshot have seen '
                     f'different numbers of steps ({counts}): not one state.')
  skipped = {k: _whole(s.nonfinite_count, k)
             for k, (_, _, s) in members.items()}
  if any(skipped.values()):
    raise ValueError(f'synthesize: the averages skipped non-finite iterates '
                     f'({skipped} by step {step}); their profiles are not '
                     'the nominal ones, so no synthesis can be trusted.')
  layout = _snapshots.check_next(layout, params, last, step, 'synthesize')
  for k, (rule, _, state) in members.items():
    for field in rule.averages:
      if getattr(state, field) is not None:
        _tree.require_like_params(
            getattr(state, field), params,
            f'synthesize: the average {k!r} at step {step} ({field})')
  models = {k: _readout.model(s, params) for k, (_, _, s) in members.items()}
  _snapshots.require_finite(params, f'synthesize: the params at step {step}')
  for k, model in models.items():
    _snapshots.require_finite(
        model, f'synthesize: the values of the average {k!r} at step {step}')
  return _Snapshot(step, members, layout, _checksum(params, members), params)


def _whole(count, name: str) -> int:
  """A saved step count, refused where its dtype may have rounded it."""
  value = np.asarray(count)
  if not np.issubdtype(value.dtype, np.integer):
    # Every whole number below 2 ** (mantissa bits + 1) is exact; a count
    # above it may have been rounded to a neighbour when it was cast.
    exact_below = 2 ** (jnp.finfo(value.dtype).nmant + 1)
    if not (value == np.round(value) and 0 <= value < exact_below):
      raise ValueError(
          f'synthesize: the step count of {name!r} was saved as '
          f'{value.dtype}, which holds whole numbers exactly only below '
          f'{exact_below}; got {value}, perhaps rounded. Keep integer '
          'leaves integer when casting a checkpoint (cast only the '
          'floating ones).')
  return int(value)


def _checksum(params, members) -> np.ndarray:
  """Sums of every array a snapshot holds, to compare two reads of it and
  the theta_0 of two snapshots."""
  trees = [params] + [s for _, (_, _, s) in sorted(members.items())]
  return np.array([float(jnp.sum(x, dtype=jnp.float32))
                   for x in jax.tree.leaves(trees)
                   if _tree.is_float_leaf(x)])


def _same_run(earlier: list[_Snapshot], snap: _Snapshot):
  """Snapshots of one run track the same averages from the same theta_0
  (the weights at init, or at the end of the burn-in: compared from the
  first snapshot after it)."""
  first = earlier[0]
  what = {k: (r.name, s.settings()) for k, (r, s, _) in first.members.items()}
  now = {k: (r.name, s.settings()) for k, (r, s, _) in snap.members.items()}
  if what != now:
    raise ValueError(f'synthesize: the snapshot at step {snap.step} tracks '
                     f'{now}, the first one {what}: snapshots of one run.')
  for k, (_, schedule, state) in snap.members.items():
    initial = getattr(state, 'initial_params', None)
    after = [e for e in earlier if e.step >= int(schedule.update_after)]
    if initial is None or not after:
      continue
    reference = after[0]
    if not np.array_equal(
        _checksum(initial, {}),
        _checksum(reference.members[k][2].initial_params, {})):
      raise ValueError(
          f'synthesize: the snapshot at step {snap.step} has another theta_0 '
          f'(in {k!r}) than the one at step {reference.step}: snapshots of '
          'different runs cannot be combined.')


def _combine(snapshots, first: list[_Snapshot], sources, coefficients):
  """The second read: each target's weighted sum of the saved arrays, one
  snapshot at a time, checked against the first read."""
  sums = None
  count = 0
  for i, (opt_state, params) in enumerate(snapshots):
    if i >= len(first):
      raise ValueError(_REREAD.format(f'more than {len(first)} snapshots'))
    members = _averages.tracked(opt_state, 'synthesize')
    if not np.array_equal(_checksum(params, members), first[i].checksum):
      raise ValueError(_REREAD.format(
          f'snapshot {i} (step {first[i].step}) with other contents'))
    at = [j for j, (snap, _) in enumerate(sources) if snap == i]
    # Leaves the averages never track (optax.multi_transform masks them)
    # stay masked in the params too: the model keeps the last params there.
    rule, _, state = next(iter(members.values()))
    masked = jax.tree.map(
        lambda p, m: m if isinstance(m, optax.MaskedNode) else p, params,
        getattr(state, rule.averages[0]))
    arrays = [_tree.as_accumulator(
        masked if sources[j][1] is None
        else _readout.model(members[sources[j][1]][2], params), None)
              for j in at]
    sums = _accumulate(sums, arrays,
                       jnp.asarray(coefficients[:, at], jnp.float32))
    count += 1
  if count != len(first):
    raise ValueError(_REREAD.format(f'{count} of {len(first)} snapshots'))
  return _unstack(sums)


_REREAD = ('synthesize: the second read of the snapshots gave {}: they '
           'changed between the two reads (a checkpoint written or deleted '
           'meanwhile?). Pass a fixed list of steps to read.')


@jax.jit
def _accumulate(sums, arrays, weights):
  """``sums + weights @ arrays`` leaf by leaf, the targets stacked along a
  first axis (``sums`` None: no sums yet). One contraction per leaf, so the
  program's size does not grow with the number of targets and columns."""
  def leaf(total, *xs):
    stacked = jnp.stack(xs)
    new = jnp.tensordot(weights.astype(stacked.dtype), stacked, axes=1)
    return new if total is None else total + new
  if sums is None:
    return jax.tree.map(lambda *xs: leaf(None, *xs), *arrays)
  return jax.tree.map(leaf, sums, *arrays)


@jax.jit
def _unstack(sums):
  """The stacked sums as one tree per target."""
  count = jax.tree.leaves(sums)[0].shape[0]
  return [jax.tree.map(lambda s, i=i: s[i], sums) for i in range(count)]


def _require_ridge(ridge, caller: str):
  if (isinstance(ridge, bool) or not isinstance(ridge, (int, float))
      or not math.isfinite(ridge) or ridge < 0):
    raise ValueError(f'{caller}: ridge must be a finite number >= 0, got '
                     f'{ridge!r}.')


def _basis(members: dict, ends: np.ndarray):
  """The fit's columns: each tracked average's profile at every snapshot
  (theta_0's at the last), then the params' (unit vectors); and what each
  column weighs, ``(snapshot index, member name or None for the params)``."""
  basis, sources = [], []
  for name, (rule, schedule, _) in members.items():
    columns = rule.profile(schedule, ends)
    keep = [len(ends) - 1] if rule.name == 'initial' else range(len(ends))
    basis.append(_profiles.select(columns, keep))
    sources += [(i, name) for i in keep]
  basis.append(_profiles.units(ends))
  sources += [(i, None) for i in range(len(ends))]
  return basis, sources


class SynthesizedProfile(NamedTuple):
  """What :func:`synthesized_profile` returns."""
  profile: Any   # the synthesized model's weights on theta_0..theta_T
  residual: Any  # ||profile - target|| / ||target||, a float
  averages: Any  # {tracked name: its model's coefficient at each step}
  params: Any    # the saved params' coefficient at each step


def synthesized_profile(target, tracked, steps, *, ridge: float = 1e-4
                        ) -> SynthesizedProfile:
  r"""The weights on the iterates of the model :func:`synthesize` returns.

  Before training, or without its snapshots: what a target's synthesis
  from the averages ``tracked`` saved at ``steps`` will be, whatever the
  trajectory. :func:`synthesize` fits the target's profile :math:`w`
  (T the last step) in least squares by the profiles :math:`b_c` of the
  tracked averages at every saved step, of the saved params (unit vectors
  :math:`e_s`) and of theta_0, and returns
  :math:`\sum_c x_c a_c` for the saved arrays :math:`a_c`, whose weights on
  the iterates are

  .. math::
    \hat w = \sum_c x_c b_c, \qquad
    \text{residual} = \|\hat w - w\| / \|w\|.

  The synthesized model is :math:`\sum_s \hat w_s \theta_s` exactly
  (up to the saved arrays' rounding, which the coefficients x scale), so
  :math:`\hat w - w` says what a synthesis gets wrong on any trajectory:
  where snapshots are too sparse for short averages, and how large the
  coefficients grow.

  Args:
    target: a stabilizer, a profile (T + 1 weights), or a dict of them.
    tracked: an optimizer state holding one :func:`averages` state, as
      saved (e.g. ``posthoc_ema().init(params)``); only what it tracks is
      read, not its values.
    steps: the saved steps, increasing (e.g. :func:`snapshot_steps`); the
      last is T.
    ridge: :func:`synthesize`'s ridge.

  Returns:
    ``SynthesizedProfile(profile, residual, averages, params)``: the T + 1
    weights :math:`\hat w`, the relative residual, and the coefficients
    x, as ``{tracked name: one per step}`` for each tracked average's
    model (theta_0's only at the last step, where it is saved) and one per
    step for the params; dicts of all four for a dict of targets.

  Raises:
    ValueError: no steps, steps not increasing, no averages state, a
      profile of the wrong length, or a negative or non-finite ridge.
    TypeError: a step that is not an integer, or a target that is neither
      a stabilizer nor a profile.

  Examples:
    BEMA is its EMA plus alpha_T (theta_T - theta_0): tracking that EMA
    synthesizes it exactly, with alpha_100 = 110 ** -0.2 on theta_100.

    >>> import jax.numpy as jnp, optax_bema
    >>> tracked = optax_bema.averages(
    ...     ema=optax_bema.ema(update_freq=1)).init(jnp.zeros(2))
    >>> out = optax_bema.synthesized_profile(
    ...     optax_bema.bema(update_freq=1), tracked, [0, 50, 100])
    >>> bool(out.residual < 1e-6), round(float(out.params[-1]), 4)
    (True, 0.3906)

  References:
    Karras et al., `Analyzing and Improving the Training Dynamics of
    Diffusion Models <https://arxiv.org/abs/2312.02696>`_, 2024 (EDM2,
    the appendix on post-hoc EMA).
  """
  single, targets = _targets.as_targets(target, 'synthesized_profile')
  _require_ridge(ridge, 'synthesized_profile')
  ends = np.array([_checks.whole_step(s, 'synthesized_profile')
                   for s in steps], np.int64)
  if not ends.size or np.any(np.diff(ends) <= 0):
    raise ValueError(f'synthesized_profile: steps must be at least one, '
                     f'increasing; got {ends.tolist()}.')
  members = _averages.tracked(tracked, 'synthesized_profile')
  basis, sources = _basis(members, ends)
  names = list(targets)
  wanted = [_targets.columns(targets[k], ends) for k in names]
  coefficients, residuals = _fit.solve(basis, wanted, ridge)
  out = {}
  for k, x, residual in zip(names, coefficients, residuals):
    blocks = np.split(x, np.cumsum([b.coef.shape[0] for b in basis])[:-1])
    averages = {name: np.zeros(len(ends)) for name in members}
    params = np.zeros(len(ends))
    for (i, name), c in zip(sources, x):
      (params if name is None else averages[name])[i] = c
    out[k] = SynthesizedProfile(
        sum(_profiles.combine(b, c) for b, c in zip(basis, blocks)),
        float(residual), averages, params)
  if single:
    return out[None]
  return SynthesizedProfile(*({k: getattr(v, f) for k, v in out.items()}
                              for f in SynthesizedProfile._fields))

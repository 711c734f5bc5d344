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
from typing import Any, Iterable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_bema import _averages
from optax_bema import _fit
from optax_bema import _readout
from optax_bema import _snapshots
from optax_bema import _targets
from optax_bema import _tree
from optax_bema._placement import like_sharding


class Synthesized(NamedTuple):
  """What :func:`synthesize` returns (each a dict for a dict of targets).

  Attributes:
    model: the synthesized model, with the params' structure, dtypes and
      shardings.
    residual: ||fitted profile - target|| / ||target||: how far the fit is
      from the target's weights, every step weighed alike.
    error: the estimated model error ||synthesized - exact||, relative to
      the model's distance from the last snapshot's params,
      ||exact - theta_T||: the fit's residual weighed by how far the
      saved params moved where the residual lies (see :func:`synthesize`).
  """
  model: Any
  residual: Any
  error: Any


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
  combination of the saved arrays. The fit keeps the target's total
  weight, so weights that never move (a frozen layer, a constant offset)
  come back exactly, and a run shifted by a constant synthesizes the same
  model shifted.

  How far to trust it: the relative residual of the fit weighs every step
  alike, but a weight misplaced where the iterates barely move costs
  nothing, and one misplaced where they move a lot costs much. ``error``
  estimates the model error itself: the residual profile r moves the
  update that reached step s with weight R_s = sum_{t<s} r_t, and between
  two saved steps the size of those updates is read off the saved params
  (the distance between them, and the per-step movement at the closest
  pair of saved steps); see the docs for how it tracks the true error.

  ``snapshots`` is read twice (first to fit, then to sum the arrays), one
  snapshot on the device at a time: pass a list, or an object whose
  ``__iter__`` loads them lazily (:func:`orbax_snapshots` reads an Orbax
  ``CheckpointManager``). The second read must give the same snapshots as
  the first (their steps, shapes and a checksum of every array are
  compared), so a checkpoint written or deleted in between is an error,
  not a wrong model.

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
    ``Synthesized(model, residual, error)``; dicts for a dict of targets.

  Raises:
    ValueError: no snapshots or targets, snapshots out of order, of another
      structure or shape, averages shaped unlike their params, from
      different runs (another theta_0) or averages, with non-finite values
      (refused, as :func:`replay` refuses them: no snapshot is skipped),
      averages that skipped non-finite iterates (their profiles are then
      not the nominal ones), a step count saved in a float dtype too
      narrow to hold it exactly, a second read unlike the first, a step-0
      snapshot whose averages are not its params (weights loaded after
      ``tx.init``), a profile of the wrong length or not summing to 1, or
      a negative or non-finite ridge.
    TypeError: a target that is neither a stabilizer nor a profile (a list
      of targets: pass a dict), snapshots that are not ``(opt_state,
      params)`` pairs (a dict of them: pass its values), or a one-shot
      iterator.
  """
  single, targets = _targets.as_targets(target, 'synthesize')
  _fit.require_ridge(ridge, 'synthesize')
  if isinstance(snapshots, Mapping):
    raise TypeError('synthesize: snapshots must be (opt_state, params) '
                    'pairs in step order, not a dict; pass '
                    'list(snapshots.values()) if it maps steps to pairs.')
  if iter(snapshots) is snapshots:
    raise TypeError('synthesize: snapshots are read twice; pass a list or a '
                    're-iterable object (whose __iter__ loads them lazily), '
                    'not a one-shot iterator or generator.')
  prepared = prepare(snapshots)
  names = list(targets)
  solution = fit(prepared, [targets[k] for k in names], ridge)
  models = combine(snapshots, prepared, solution.coefficients)
  errors = model_errors(prepared, solution, models)
  out = dict(zip(names, models))
  residual = {k: float(r) for k, r in zip(names, solution.residual)}
  error = dict(zip(names, errors))
  if single:
    return Synthesized(out[None], residual[None], error[None])
  return Synthesized(out, residual, error)


class Prepared(NamedTuple):
  """The first read of the snapshots, and the fit's basis from it."""
  first: list       # _Snapshot per snapshot, checked
  ends: np.ndarray  # their steps
  basis: list       # _profiles.Columns per tracked average, and the units
  sources: list     # (snapshot index, average name or None) per column
  moved: np.ndarray  # ||theta_s - theta at the snapshot before||^2

  @property
  def num_steps(self) -> int:
    return int(self.ends[-1])


def prepare(snapshots) -> Prepared:
  """Reads the snapshots once (checked) and lays out the fit's basis."""
  first = _read(snapshots)
  ends = np.array([s.step for s in first], np.int64)
  basis, sources = _fit.basis(first[-1].members, ends)
  return Prepared(first, ends, basis, sources,
                  np.array([s.moved for s in first]))


def fit(prepared: Prepared, targets: list, ridge: float) -> _fit.Solution:
  """Each target's coefficients on the saved arrays (no array is read)."""
  return _fit.solve(prepared.basis,
                    [_targets.columns(t, prepared.ends) for t in targets],
                    ridge)


def combine(snapshots, prepared: Prepared, coefficients) -> list:
  """The second read: one model per row of ``coefficients``, with the
  params' structure, dtypes and shardings."""
  params = prepared.first[-1].params_like
  return [_tree.cast_like_params(m, params) for m in _combine(
      snapshots, prepared.first, prepared.sources, coefficients)]


def model_errors(prepared: Prepared, solution: _fit.Solution,
                 models: list, rows=None) -> list[float]:
  """Each model's estimated error relative to its distance from the last
  snapshot's params (``rows``: the solution's rows the models are)."""
  moved = _fit.path_error(solution, prepared.ends, prepared.moved)
  params = prepared.first[-1].params_like
  out = []
  for i, model in zip(range(len(models)) if rows is None else rows, models):
    distance = math.sqrt(float(_squared_distance(
        *(_tree.as_accumulator(x, None) for x in (model, params)))))
    out.append(float(moved[i] / distance) if distance else (
        0.0 if moved[i] == 0 else math.inf))
  return out


class _Snapshot(NamedTuple):
  step: int
  members: dict        # name: (rule, schedule, state: the last one's only)
  layout: Any          # tree structure and leaf shapes of the params
  checksum: np.ndarray
  params_like: Any     # the params; kept for the last snapshot only
  initial: dict        # name: checksum of the theta_0 it holds
  # ||theta_step - theta at the snapshot before||^2; for the first
  # snapshot, from theta_0 where an average holds it (0 otherwise).
  moved: float = 0.0


def _read(snapshots) -> list[_Snapshot]:
  """The first read: every snapshot checked, alone and against the others."""
  out: list[_Snapshot] = []
  layout, last, before = None, -1, None
  for pair in snapshots:
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
      raise TypeError(f'synthesize: each snapshot must be an (opt_state, '
                      f'params) pair, got {type(pair).__name__}.')
    opt_state, params = pair
    snap = _snapshot(opt_state, params, layout, last)
    if out:
      _same_run(out, snap)
      # Never every snapshot's arrays at once: only the last one's stay.
      out[-1] = out[-1]._replace(params_like=None, members={
          k: (rule, schedule, None)
          for k, (rule, schedule, _) in out[-1].members.items()})
      snap = snap._replace(moved=float(_squared_distance(
          _tree.as_accumulator(params, None), before)))
    else:
      snap = snap._replace(moved=_moved_from_start(snap, params))
    out.append(snap)
    layout, last = snap.layout, snap.step
    before = _tree.as_accumulator(params, None)
  if not out:
    raise ValueError('synthesize: no snapshots.')
  return out


def _moved_from_start(snap: _Snapshot, params) -> float:
  """||theta_s - theta_0||^2 for the first snapshot, where an average holds
  theta_0 and the snapshot is after it: how far the path before the first
  snapshot moved, which the error estimate must see when the early
  snapshots were deleted."""
  for _, schedule, state in snap.members.values():
    initial = getattr(state, 'initial_params', None)
    if initial is not None and snap.step > int(schedule.update_after):
      return float(_squared_distance(_tree.as_accumulator(params, None),
                                     _tree.as_accumulator(initial, None)))
  return 0.0


@jax.jit
def _squared_distance(a, b):
  """||a - b||^2 over every leaf, in float32 (b laid out as a)."""
  return _tree.tree_sum(jax.tree.map(
      lambda x, y: jnp.square(x - like_sharding(y, x).astype(x.dtype)),
      a, b))


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
    _require_reset(k, members[k][1], model, params, step)
  initial = {k: _checksum(s.initial_params, {})
             for k, (_, _, s) in members.items()
             if getattr(s, 'initial_params', None) is not None}
  return _Snapshot(step, members, layout, _checksum(params, members), params,
                   initial=initial)


def _require_reset(name, schedule, model, params, step):
  """Up to the end of the burn-in (step 0 without one) every average is the
  params themselves; one that is not was trained on other weights."""
  if step > int(schedule.update_after):
    return
  theta = jax.tree.map(lambda p, m: m if isinstance(m, optax.MaskedNode)
                       else jnp.asarray(p, m.dtype), params, model,
                       is_leaf=lambda x: isinstance(x, optax.MaskedNode))
  if float(_squared_distance(model, theta)) != 0.0:
    raise ValueError(
        f'synthesize: at step {step} the average {name!r} differs from the '
        'params saved with it, where it must equal them (it starts as a '
        'copy of the weights tx.init was given). Were the weights replaced '
        'after tx.init (pretrained weights loaded later)? Call tx.init on '
        'the weights training starts from.')


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
  for k, (_, schedule, _) in snap.members.items():
    after = [e for e in earlier if e.step >= int(schedule.update_after)]
    if k not in snap.initial or not after:
      continue
    reference = after[0]
    if not np.array_equal(snap.initial[k], reference.initial[k]):
      raise ValueError(
          f'synthesize: the snapshot at step {snap.step} has another theta_0 '
          f'(in {k!r}) than the one at step {reference.step}: snapshots of '
          'different runs cannot be combined.')


def _combine(snapshots, first: list[_Snapshot], sources, coefficients):
  """The second read: each target's weighted sum of the saved arrays, one
  snapshot at a time, checked against the first read."""
  sums = reference = None
  count = 0
  for i, (opt_state, params) in enumerate(snapshots):
    if i >= len(first):
      raise ValueError(_REREAD.format(f'more than {len(first)} snapshots'))
    members = _averages.tracked(opt_state, 'synthesize')
    step = _whole(next(iter(members.values()))[2].count, 'count')
    if (step != first[i].step
        or not np.array_equal(_checksum(params, members), first[i].checksum)):
      raise ValueError(_REREAD.format(
          f'snapshot {i} (step {first[i].step}) with other contents (step '
          f'{step} on this read)'))
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
    if reference is None:
      reference = _tree.as_accumulator(masked, None)
    sums = _accumulate(sums, arrays, reference,
                       jnp.asarray(coefficients[:, at], jnp.float32))
    count += 1
  if count != len(first):
    raise ValueError(_REREAD.format(f'{count} of {len(first)} snapshots'))
  return _unstack(sums, reference)


_REREAD = ('synthesize: the second read of the snapshots gave {}: they '
           'changed between the two reads (a checkpoint written or deleted '
           'meanwhile?). Pass a fixed list of steps to read.')


@jax.jit
def _accumulate(sums, arrays, reference, weights):
  """``sums + weights @ (arrays - reference)`` leaf by leaf, the targets
  stacked along a first axis (``sums`` None: no sums yet).

  Deviations from one snapshot's params, not the arrays: the coefficients
  sum to 1, so the model is the reference plus the weighted deviations,
  and a part that never moves comes back bit for bit rather than rounded
  through the sum. Each array is laid out as the reference first (averages
  may be sharded unlike the params). One contraction per leaf, so the
  program's size does not grow with the number of targets and columns."""
  def leaf(total, ref, *xs):
    stacked = jnp.stack([like_sharding(x, ref).astype(ref.dtype) - ref
                         for x in xs])
    new = jnp.tensordot(weights.astype(stacked.dtype), stacked, axes=1)
    return new if total is None else total + new
  if sums is None:
    return jax.tree.map(lambda ref, *xs: leaf(None, ref, *xs), reference,
                        *arrays)
  return jax.tree.map(leaf, sums, reference, *arrays)


@jax.jit
def _unstack(sums, reference):
  """The stacked sums as one model per target: the reference plus each
  target's weighted deviations."""
  count = jax.tree.leaves(sums)[0].shape[0]
  return [jax.tree.map(lambda s, ref, i=i: ref + s[i], sums, reference)
          for i in range(count)]

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
  first: list       # _snapshots.Snapshot per snapshot, checked
  ends: np.ndarray  # their steps
  basis: list       # _profiles.Columns per tracked average, and the units
  sources: list     # (snapshot index, average name or None) per column
  moved: np.ndarray  # ||theta_s - theta at the snapshot before||^2
  since: int         # the step moved[0] is measured from (a burn-in's end)

  @property
  def num_steps(self) -> int:
    return int(self.ends[-1])


def prepare(snapshots) -> Prepared:
  """Reads the snapshots once (checked) and lays out the fit's basis."""
  first = _snapshots.read(snapshots)
  ends = np.array([s.step for s in first], np.int64)
  basis, sources = _fit.basis(first[-1].members, ends)
  return Prepared(first, ends, basis, sources,
                  np.array([s.moved for s in first]), first[0].since)


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
  moved = _fit.path_error(solution, prepared.ends, prepared.moved,
                          prepared.since)
  params = prepared.first[-1].params_like
  out = []
  for i, model in zip(range(len(models)) if rows is None else rows, models):
    distance = math.sqrt(float(_snapshots.squared_distance(
        *(_tree.as_accumulator(x, None) for x in (model, params)))))
    out.append(float(moved[i] / distance) if distance else (
        0.0 if moved[i] == 0 else math.inf))
  return out


def _combine(snapshots, first: list[_snapshots.Snapshot], sources,
             coefficients):
  """The second read: each target's weighted sum of the saved arrays, one
  snapshot at a time, checked against the first read."""
  sums = reference = None
  count = 0
  for i, (opt_state, params) in enumerate(snapshots):
    if i >= len(first):
      raise ValueError(_REREAD.format(f'more than {len(first)} snapshots'))
    members = _averages.tracked(opt_state, 'synthesize')
    step = _snapshots.whole(next(iter(members.values()))[2].count, 'count')
    checksum = _snapshots.checksum(params, members)
    if step != first[i].step or not np.array_equal(checksum,
                                                   first[i].checksum):
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

"""Reading saved snapshots: the checks every reader makes (one layout,
increasing steps, finite values: replay and synthesis alike), and
synthesis' first read (:func:`read`), each snapshot checked alone and
against the others, with what the fit and the error estimate need of it."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_bema import _averages
from optax_bema import _readout
from optax_bema import _tree
from optax_bema._placement import like_sharding


def check_next(layout, params, last: int, step: int, caller: str):
  """The snapshots' tree structure and leaf shapes stay the same, and steps
  increase; returns the layout to compare the next snapshot with."""
  paths, structure = jax.tree_util.tree_flatten_with_path(params)
  now = (structure, [(jnp.shape(x), jnp.result_type(x)) for _, x in paths])
  if layout is not None and now[0] != layout[0]:
    raise ValueError(f'{caller}: the snapshot at step {step} has another '
                     f'tree structure than the earlier ones.')
  if layout is not None and now[1] != layout[1]:
    i = next(i for i, (a, b) in enumerate(zip(now[1], layout[1])) if a != b)
    (shape, dtype), (was, was_dtype) = now[1][i], layout[1][i]
    raise ValueError(
        f'{caller}: the snapshot at step {step} has leaf '
        f'{jax.tree_util.keystr(paths[i][0])} of shape {shape} and dtype '
        f'{dtype}, the earlier ones {was} and {was_dtype}: every snapshot '
        'must come from the same model.')
  if step <= last:
    # Two snapshots with one count: saved at loop steps that were not
    # optimizer updates.
    cause = (' Two snapshots carry the same count: under optax.MultiSteps '
             '(gradient accumulation) or apply_if_finite a loop step is not '
             'an optimizer update; save once per update, labelled with the '
             "stabilizer's count." if step == last else '')
    raise ValueError(f'{caller}: snapshots must be in increasing step order; '
                     f'step {step} came after step {last}.{cause}')
  return now


# Compiled once per layout: run eagerly, the test's branch is rebuilt on
# every call (a tenth of a second per snapshot and average).
_all_finite = jax.jit(lambda tree: _tree.all_finite(
    _tree.as_accumulator(tree, None)))


def require_finite(tree, what: str):
  """``ValueError`` naming ``what`` when a leaf of ``tree`` is not finite."""
  if not bool(_all_finite(tree)):
    raise ValueError(
        f'{what} are not all finite: this snapshot cannot give a finite '
        'model. Leave it out (and the steps it covers: save another '
        'checkpoint), or take an earlier one.')


class Snapshot(NamedTuple):
  step: int
  members: dict        # name: (rule, schedule, state: the last one's only)
  layout: Any          # tree structure and leaf shapes of the params
  checksum: np.ndarray
  params_like: Any     # the params; kept for the last snapshot only
  initial: dict        # name: checksum of the theta_0 it holds
  # ||theta_step - theta at the snapshot before||^2; for the first
  # snapshot, from theta_0 where an average holds it (0 otherwise), which
  # is the iterate at step ``since``, the end of its burn-in.
  moved: float = 0.0
  since: int = 0


def read(snapshots) -> list[Snapshot]:
  """The first read: every snapshot checked, alone and against the others."""
  out: list[Snapshot] = []
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
      snap = snap._replace(moved=float(squared_distance(
          _tree.as_accumulator(params, None), before)))
    else:
      moved, since = _moved_from_start(snap, params)
      snap = snap._replace(moved=moved, since=since)
    out.append(snap)
    layout, last = snap.layout, snap.step
    before = _tree.as_accumulator(params, None)
  if not out:
    raise ValueError('synthesize: no snapshots.')
  return out


def _moved_from_start(snap: Snapshot, params) -> tuple[float, int]:
  """``(||theta_s - theta_0||^2, the step theta_0 is from)`` for the first
  snapshot, where an average holds theta_0 (the iterate at the end of its
  burn-in) and the snapshot is after it: how far the path before the first
  snapshot moved, which the error estimate must see when the early
  snapshots were deleted."""
  for _, schedule, state in snap.members.values():
    initial = getattr(state, 'initial_params', None)
    since = int(schedule.update_after)
    if initial is not None and snap.step > since:
      moved = squared_distance(_tree.as_accumulator(params, None),
                               _tree.as_accumulator(initial, None))
      return float(moved), since
  return 0.0, 0


@jax.jit
def _within(a, b, eps):
  """Whether |a - b| <= eps |b| everywhere."""
  return jnp.all(jnp.abs(a - b) <= eps * jnp.abs(b))


@jax.jit
def squared_distance(a, b):
  """||a - b||^2 over every leaf, in float32 (b laid out as a)."""
  return _tree.tree_sum(jax.tree.map(
      lambda x, y: jnp.square(x - like_sharding(y, x).astype(x.dtype)),
      a, b))


def _snapshot(opt_state, params, layout, last) -> Snapshot:
  members = _averages.tracked(opt_state, 'synthesize')
  counts = {k: whole(state.count, k) for k, (_, _, state)
            in members.items()}
  step = max(counts.values())
  if len(set(counts.values())) != 1:
    raise ValueError(f'synthesize: the averages of one snapshot have seen '
                     f'different numbers of steps ({counts}): not one state.')
  skipped = {k: whole(s.nonfinite_count, k)
             for k, (_, _, s) in members.items()}
  if any(skipped.values()):
    raise ValueError(f'synthesize: the averages skipped non-finite iterates '
                     f'({skipped} by step {step}); their profiles are not '
                     'the nominal ones, so no synthesis can be trusted.')
  layout = check_next(layout, params, last, step, 'synthesize')
  for k, (rule, _, state) in members.items():
    for field in rule.averages:
      if getattr(state, field) is not None:
        _tree.require_like_params(
            getattr(state, field), params,
            f'synthesize: the average {k!r} at step {step} ({field})')
  models = {k: _readout.model(s, params) for k, (_, _, s) in members.items()}
  require_finite(params, f'synthesize: the params at step {step}')
  for k, model in models.items():
    require_finite(
        model, f'synthesize: the values of the average {k!r} at step {step}')
    _require_reset(k, members[k][1], members[k][2], model, params, step)
  initial = {k: checksum(s.initial_params, {})
             for k, (_, _, s) in members.items()
             if getattr(s, 'initial_params', None) is not None}
  return Snapshot(step, members, layout, checksum(params, members), params,
                   initial=initial)


def _require_reset(name, schedule, state, model, params, step):
  """Up to the end of the burn-in (step 0 without one) every average is the
  params themselves, rounded to its storage; one that is not was trained on
  other weights."""
  if step > int(schedule.update_after):
    return
  theta = jax.tree.map(lambda p, m: m if isinstance(m, optax.MaskedNode)
                       else jnp.asarray(p, m.dtype), params, model,
                       is_leaf=lambda x: isinstance(x, optax.MaskedNode))
  # A 16-bit average holds the params rounded: within its precision.
  eps = max((float(jnp.finfo(x.dtype).eps) for x in jax.tree.leaves(state)
             if _tree.is_float_leaf(x) and x.ndim), default=0.0)
  if not all(bool(_within(m, like_sharding(t, m), eps))
             for m, t in zip(jax.tree.leaves(model), jax.tree.leaves(theta))):
    raise ValueError(
        f'synthesize: at step {step} the average {name!r} differs from the '
        'params saved with it, where it must equal them (it starts as a '
        'copy of the weights tx.init was given). Were the weights replaced '
        'after tx.init (pretrained weights loaded later)? Call tx.init on '
        'the weights training starts from.')


def whole(count, name: str) -> int:
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


def checksum(params, members) -> np.ndarray:
  """Sums of every array a snapshot holds, to compare two reads of it and
  the theta_0 of two snapshots."""
  trees = [params] + [s for _, (_, _, s) in sorted(members.items())]
  return np.array([float(jnp.sum(x, dtype=jnp.float32))
                   for x in jax.tree.leaves(trees)
                   if _tree.is_float_leaf(x)])


def _same_run(earlier: list[Snapshot], snap: Snapshot):
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

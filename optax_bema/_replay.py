"""Profiles as targets, and exact replay from saved iterates.

Every stabilizer's model after step T is a fixed linear combination of the
iterates theta_0..theta_T (its *profile*, ``_profiles``); any such
combination, given as weights, is a target too. Replay runs a stabilizer's
own update on the saved iterates at the steps it reads, and sums a profile's
weighted iterates; the snapshot checks here serve synthesis as well.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_bema import _checks
from optax_bema import _engine
from optax_bema import _profiles
from optax_bema import _readout
from optax_bema import _tree


def require_stabilizer(transform, caller: str, what: str):
  """``TypeError`` unless ``transform`` is a stabilizer built from numbers."""
  if not isinstance(transform, _engine.Stabilizer):
    raise TypeError(
        f'{caller}: {what} must be a stabilizer (optax_bema.ema, bema, dema, '
        f'ouema or power_ema) or a profile (a NumPy array of weights), got '
        f'{type(transform).__name__}. PACE changes training, so it has no '
        'profile; optax.inject_hyperparams hides the settings.')
  if not all(isinstance(v, (int, float, np.number))
             for v in transform.schedule.settings().values()):
    raise TypeError(f'{caller}: {what} has array-valued settings; build it '
                    'with numbers.')


def profile(stabilizer: _engine.Stabilizer, num_steps: int) -> np.ndarray:
  """The weights of a stabilizer's model on the iterates theta_0..theta_T.

  After step T = ``num_steps`` the model a stabilizer returns is
  ``sum_s w[s] theta_s`` exactly, whatever the trajectory: EMA's weights
  decay into the past (its lag), BEMA adds alpha_T on theta_T and takes it
  from theta_0, DEMA's are partly negative on old iterates, a
  power-function EMA's are proportional to (s / T) ** gamma.

  Args:
    stabilizer: ``optax_bema.ema(...)``, ``bema``, ``dema``, ``ouema`` or
      ``power_ema``.
    num_steps: T, an integer >= 0.

  Returns:
    A float64 array of ``num_steps + 1`` weights; they sum to 1.

  Examples:
    >>> import optax_bema
    >>> w = optax_bema.profile(optax_bema.bema(update_freq=1), 100)
    >>> w.shape, round(float(w.sum()), 6), bool(w[0] < 0)
    ((101,), 1.0, True)
  """
  require_stabilizer(stabilizer, 'profile', 'stabilizer')
  num_steps = _checks.whole_step(num_steps, 'profile', 'num_steps')
  return _profiles.dense(stabilizer.rule.profile(
      stabilizer.schedule, np.array([num_steps])))


def uniform_profile(steps, num_steps: int) -> np.ndarray:
  """Equal weights on the iterates at ``steps``: a profile for any target.

  Checkpoint averaging as LLM pretraining does it is one: the mean of the
  last k saved checkpoints (LAWA, Kaddour 2022; ByteDance's PMA, Li et al.
  2025), ``uniform_profile(saved_steps[-k:], T)``; so is SWA's mean of every
  iterate from step s on (Izmailov et al. 2018),
  ``uniform_profile(range(s, T + 1), T)``. Pass the result to
  :func:`replay` (exact when every step it weighs was saved) or
  :func:`synthesize`.

  Args:
    steps: the steps to average, each in [0, num_steps], distinct.
    num_steps: T, the last step.

  Returns:
    A float64 array of ``num_steps + 1`` weights summing to 1.

  Examples:
    >>> import optax_bema
    >>> optax_bema.uniform_profile([2, 4], 4).tolist()
    [0.0, 0.0, 0.5, 0.0, 0.5]
  """
  num_steps = _checks.whole_step(num_steps, 'uniform_profile', 'num_steps')
  steps = [_checks.whole_step(s, 'uniform_profile') for s in steps]
  if not steps or len(set(steps)) != len(steps) or max(steps) > num_steps:
    raise ValueError(f'uniform_profile: steps must be distinct, at least one, '
                     f'and at most num_steps={num_steps}; got {steps}.')
  w = np.zeros(num_steps + 1)
  w[steps] = 1.0 / len(steps)
  return w


def check_profile(weights, num_steps: int, caller: str) -> np.ndarray:
  """A target given as a profile: finite float weights on 0..num_steps."""
  w = np.asarray(weights)
  if w.ndim != 1 or not np.issubdtype(w.dtype, np.number):
    raise TypeError(f'{caller}: a profile target must be a 1-d array of '
                    f'weights, got shape {w.shape}, dtype {w.dtype}.')
  if w.shape[0] != num_steps + 1:
    raise ValueError(
        f'{caller}: a profile target needs one weight per step 0..T, T = '
        f'{num_steps} the last snapshot\'s step: {num_steps + 1} weights, '
        f'got {w.shape[0]}.')
  if not np.isfinite(w).all() or not np.any(w):
    raise ValueError(f'{caller}: a profile target must be finite and not '
                     'all zero.')
  return w.astype(np.float64)


def as_targets(targets, caller: str):
  """``(single, {name: target})``; a target is a stabilizer or a profile."""
  single = not isinstance(targets, Mapping)
  targets = {None: targets} if single else dict(targets)
  if not targets:
    raise ValueError(f'{caller}: no targets; pass a stabilizer, a profile, '
                     'or a dict of them.')
  for name, t in targets.items():
    if (isinstance(t, optax.GradientTransformation)
        or not isinstance(t, (np.ndarray, list, tuple))):
      require_stabilizer(t, caller, 'a target' if single else f'{name!r}')
  return single, targets


def replay(stabilizers, snapshots: Iterable[tuple[int, Any]]):
  """The model a stabilizer returns, recomputed from saved iterates.

  Runs each stabilizer's own update on the saved params, at the steps it
  reads: the result equals the online ``optax.chain(optimizer, stabilizer)``
  at the last snapshot to float32 precision. A profile target (weights on
  the steps 0..T, e.g. :func:`uniform_profile`) is the weighted sum of the
  saved params, exact when every step it weighs was saved. Streams: one
  snapshot on the device at a time, every target in the same pass.

  Args:
    stabilizers: a stabilizer, a profile (a NumPy array of T + 1 weights,
      T the last snapshot's step), or a dict of them.
    snapshots: ``(step, params)`` pairs in increasing step order, from step
      0 (the weights at init); e.g. read lazily from an Orbax
      ``CheckpointManager``: ``((s, manager.restore(s)) for s in
      manager.all_steps())``. They must include every step a target reads:
      for a stabilizer the last burn-in step and every update step.

  Returns:
    The model at the last snapshot (a dict of models for a dict).

  Raises:
    ValueError: snapshots not starting at 0, out of order, of another tree
      structure or leaf shape, with non-finite values (a stabilizer online
      would skip that update; replay refuses rather than guess), missing a
      step a target reads (named), or a negative step.
    TypeError: a target that is neither a stabilizer nor a profile, or a
      step that is not an integer.
  """
  single, targets = as_targets(stabilizers, 'replay')
  profiles = {k: t for k, t in targets.items()
              if not isinstance(t, _engine.Stabilizer)}
  steps = {k: jax.jit(t.update) for k, t in targets.items()
           if k not in profiles}
  states, layout, last, params = None, None, -1, None
  sums: dict = {}
  seen = []
  for step, params in snapshots:
    step = _checks.whole_step(step, 'replay')
    layout = check_next(layout, params, last, step, 'replay')
    require_finite(params, f'replay: the params at step {step}')
    if states is None:
      if step != 0:
        raise ValueError(f'replay: the first snapshot must be step 0, the '
                         f'weights at init; got step {step}.')
      states = {k: targets[k].init(params) for k in steps}
    else:
      for k in steps:
        t = targets[k]
        missing = t.schedule.next_read_step(last)
        if missing < step:
          raise ValueError(
              f'replay: {t.kind}{"" if single else f" {k!r}"} reads step '
              f'{missing}, which has no snapshot (the last before it is step '
              f'{last}); save every update step and the last burn-in step.')
        zeros = jax.tree.map(jnp.zeros_like, params)
        states[k] = steps[k](zeros, states[k]._replace(
            count=jnp.asarray(step - 1, jnp.int32)), params)[1]
    seen.append(step)
    for k, w in profiles.items():
      weight = float(np.asarray(w)[step]) if step < len(w) else 0.0
      if weight:
        term = jax.tree.map(lambda x, weight=weight: x * weight,
                            _tree.as_accumulator(params, None))
        sums[k] = jax.tree.map(jnp.add, sums[k], term) if k in sums else term
    last = step
  if states is None:
    raise ValueError('replay: no snapshots.')
  models = {k: _readout.averaged_params(s, params) for k, s in states.items()}
  for k, w in profiles.items():
    w = check_profile(w, last, 'replay')
    unsaved = np.flatnonzero(w)[~np.isin(np.flatnonzero(w), seen)]
    if unsaved.size:
      raise ValueError(
          f'replay: the profile{"" if single else f" {k!r}"} weighs step '
          f'{unsaved[0]}, which has no snapshot; save it, or synthesize.')
    models[k] = _tree.cast_like_params(sums[k], params)
  return models[None] if single else models


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
    raise ValueError(f'{caller}: snapshots must be in increasing step order; '
                     f'step {step} came after step {last}.')
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

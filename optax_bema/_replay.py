"""Exact replay: a target's model recomputed from saved iterates."""

from __future__ import annotations

from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from optax_bema import _checks
from optax_bema import _engine
from optax_bema import _readout
from optax_bema import _snapshots
from optax_bema import _targets
from optax_bema import _tree


def _weighted(params, weight):
  return jax.tree.map(lambda x: (x * weight).astype(x.dtype),
                      _tree.as_accumulator(params, None))


# Fused and compiled once per layout, the running sum donated: a profile's
# sum holds one buffer per leaf, with no weighted copy of a snapshot beside it.
_first_term = jax.jit(_weighted)
_add_term = jax.jit(
    lambda total, params, weight: jax.tree.map(
        jnp.add, total, _weighted(params, weight)), donate_argnums=0)


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
      for a stabilizer the last burn-in step and every update step. A
      step is an optimizer update, the count a stabilizer keeps: under
      ``optax.MultiSteps`` or ``apply_if_finite`` label params with the
      updates so far, not the loop's step (replay cannot check the label;
      a micro-step gives a wrong model without an error).

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
  single, targets = _targets.as_targets(stabilizers, 'replay')
  profiles = {k: t for k, t in targets.items()
              if not isinstance(t, _engine.Stabilizer)}
  steps = {k: jax.jit(t.update) for k, t in targets.items()
           if k not in profiles}
  states, layout, last, params = None, None, -1, None
  sums: dict = {}
  seen = []
  for step, params in snapshots:
    step = _checks.whole_step(step, 'replay')
    layout = _snapshots.check_next(layout, params, last, step, 'replay')
    _snapshots.require_finite(params, f'replay: the params at step {step}')
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
        weight = jnp.float32(weight)
        sums[k] = (_add_term(sums[k], params, weight) if k in sums
                   else _first_term(params, weight))
    last = step
  if states is None:
    raise ValueError('replay: no snapshots.')
  models = {k: _readout.averaged_params(s, params) for k, s in states.items()}
  for k, w in profiles.items():
    w = _targets.check_profile(w, last, 'replay')
    unsaved = np.flatnonzero(w)[~np.isin(np.flatnonzero(w), seen)]
    if unsaved.size:
      raise ValueError(
          f'replay: the profile{"" if single else f" {k!r}"} weighs step '
          f'{unsaved[0]}, which has no snapshot; save it, or synthesize.')
    models[k] = _tree.cast_like_params(sums[k], params)
  return models[None] if single else models

"""Choosing the average after training: several averages in one pass, what a
saved state says it holds, profiles, and exact replay from saved iterates.

Every stabilizer's model after step T is a fixed linear combination of the
iterates theta_0..theta_T (its *profile*, ``_profiles``). Replay runs a
stabilizer's own update on the saved iterates at the steps it reads;
synthesis (``_synthesis``) matches a target's profile with the profiles of
averages tracked during training.
"""

from __future__ import annotations

import json
import numbers
from typing import Any, Iterable, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_bema import _engine
from optax_bema import _profiles
from optax_bema import _readout
from optax_bema import _schedule
from optax_bema import _stabilizers
from optax_bema import _tree

# What a saved state's record of a member looks like; bump on any change.
FORMAT_VERSION = 1
# Chosen, with snapshot_steps' placement, by the rule of
# benchmarks/synthetic/posthoc_long_runs.py.
DEFAULT_POSTHOC_POWERS = (0.25, 0.5, 0.75, 0.95)
DEFAULT_POSTHOC_STDS: tuple[float, ...] = ()


class AveragesState(NamedTuple):
  """State of :func:`averages`: each member's state, and what it computes.

  ``settings[name]`` records the member as UTF-8 JSON bytes (a uint8
  array): ``{"format": 1, "kind": "ema", "settings": {"ema_power": 0.5,
  ...}}``, the member's kind and its schedule by name, so that a saved
  state alone says which average each member is (:func:`synthesize` reads
  it). Bytes, not floats: a checkpoint cast to bfloat16 keeps them exact.
  """
  members: dict
  settings: dict


def encode(member: _engine.Stabilizer) -> jax.Array:
  """The record of a member, as saved in :class:`AveragesState`."""
  settings = {k: (int(v) if k.startswith('update_') else float(v))
              for k, v in member.schedule.settings().items()}
  text = json.dumps(dict(format=FORMAT_VERSION, kind=member.kind,
                         settings=settings), sort_keys=True)
  return jnp.asarray(np.frombuffer(text.encode(), np.uint8))


def decode(record, where: str) -> tuple[_engine.Rule, _schedule.Schedule]:
  """The rule and schedule a saved record names; ``ValueError`` if the
  record is not one this version can read exactly."""
  raw = np.asarray(record)
  try:
    if raw.ndim != 1 or not np.array_equal(raw, np.round(raw)):
      raise ValueError('not whole bytes')
    data = json.loads(bytes(raw.astype(np.uint8)).decode())
    version, kind = data['format'], data['kind']
    settings = data['settings']
  except (ValueError, TypeError, KeyError, UnicodeDecodeError) as e:
    raise ValueError(
        f'{where}: the saved record of this average cannot be read ({e}); '
        'it was not written by optax_bema.averages, or was altered (e.g. '
        'cast to another dtype as floats).') from None
  if version != FORMAT_VERSION or kind not in _stabilizers.RULES:
    raise ValueError(
        f'{where}: a record of format {version!r}, kind {kind!r}; this '
        f'version of optax_bema reads format {FORMAT_VERSION} of the kinds '
        f'{sorted(_stabilizers.RULES)}. Upgrade optax_bema to read it.')
  return _stabilizers.RULES[kind], _schedule.from_settings(settings)


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


def averages(**members: _engine.Stabilizer
             ) -> optax.GradientTransformationExtraArgs:
  """Several named stabilizers in one transform, all fed the same iterate.

  Goes last in the chain, like one stabilizer; each member sees exactly what
  it would see alone, and the iterate theta_t = params + updates is the same
  array for all (XLA computes it, and the non-finite test, once). Read a
  member with ``optax_bema.averaged_params(opt_state, params, name=...)``.

  Args:
    **members: the stabilizers by name, e.g. ``ema=optax_bema.ema(...)``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose update returns its
    input updates unchanged; its state is an :class:`AveragesState`.

  Examples:
    >>> import jax.numpy as jnp, optax, optax_bema
    >>> tx = optax.chain(optax.sgd(0.1), optax_bema.averages(
    ...     ema=optax_bema.ema(update_freq=1),
    ...     bema=optax_bema.bema(update_freq=1)))
    >>> params = jnp.ones(3)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(jnp.ones(3), state, params)
    >>> params = optax.apply_updates(params, updates)
    >>> optax_bema.averaged_params(state, params, name='bema').shape
    (3,)
  """
  if not members:
    raise ValueError('averages: give at least one stabilizer, e.g. '
                     'averages(ema=optax_bema.ema()).')
  for name, member in members.items():
    require_stabilizer(member, 'averages', f'member {name!r}')
  records = {k: encode(m) for k, m in members.items()}

  def init_fn(params):
    return AveragesState(
        members={k: m.init(params) for k, m in members.items()},
        settings={k: jnp.array(r) for k, r in records.items()})

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    _tree.require_params(params, 'averages')
    # One test of theta_t for every member that updates on every step.
    finite = _tree.all_finite(_tree.as_accumulator(
        optax.apply_updates(params, updates), None))
    return updates, state._replace(members={
        k: m.update_given_finite(updates, state.members[k], params, finite)[1]
        for k, m in members.items()})

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def posthoc_ema(ema_powers=DEFAULT_POSTHOC_POWERS,
                stds=DEFAULT_POSTHOC_STDS, *, lag: float = 10.0,
                multiplier: float = 1.0, update_after: int = 0,
                accumulator_dtype: Optional[jnp.dtype] = None,
                offload_to_host: bool = False,
                ) -> optax.GradientTransformationExtraArgs:
  r"""Tracks a few averages of different widths, to choose any average later.

  One power-law EMA per power in ``ema_powers`` (:math:`\beta_t = (\rho +
  \gamma t)^{-\kappa}`), one power-function EMA (:func:`power_ema`) per
  relative width in ``stds``, all updated every step, and theta_0. Save
  this transform's state and the params (not Adam's moments) at the steps
  :func:`snapshot_steps` names; after training, :func:`synthesize` returns
  the model any stabilizer (EMA, BEMA, DEMA, OUEMA, power-function EMA, any
  settings) or any linear average of the iterates would have returned, as
  in the post-hoc EMA of EDM2. Cost: one parameter-sized copy per tracked
  average, plus one for theta_0: five with the defaults.

  The defaults, four power-law EMAs of powers 0.25, 0.5, 0.75 and 0.95,
  were chosen with :func:`snapshot_steps`' placement as the tracked set
  (of up to four power-law and power-function EMAs) with the smallest
  worst-case error over runs of 1e3 to 2e5 steps with 40 snapshots, SGD on
  a noisy quadratic. There, with ``snapshot_steps(T, 40)``, the final model
  of EMA, BEMA (bias_power 0.2 to 0.4), DEMA and OUEMA at any ema_power
  from 0.3 to 0.9 (lag 10, updated every step; at 0.5 also every 10 to 400
  steps) and of power-function EMAs of std 0.01 to 0.28 is synthesized
  within 2% of its distance from theta_T, for T from 1e3 to 1e6, with
  :func:`synthesize`'s default ``ridge=1e-4``: a long average accumulated
  in float32 drifts by about 6e-8 sqrt(t) of its size, which larger
  coefficients would amplify (4% error on EMA 0.4 at 2e5 steps with
  ``ridge=1e-6``). Snapshots stored in bfloat16 (use
  ``ridge=1e-3``) add their rounding, amplified by the coefficients: long
  averages (ema_power 0.7 to 0.9 except DEMA, std 0.02 to 0.28) stay
  within 2%, short untracked ones (ema_power 0.3 to 0.6) are off by 10% to
  100%; store snapshots in float32.

  Args:
    ema_powers: kappa of each tracked power-law EMA.
    stds: sigma_rel of each tracked power-function EMA.
    lag: rho, the offset of every power-law EMA weight's base.
    multiplier: gamma, the step's factor in that base.
    update_after: the burn-in, as for every stabilizer.
    accumulator_dtype: dtype of the averages (float32 for low-precision
      weights by default).
    offload_to_host: keep the averages in host memory between steps.

  Returns:
    :func:`averages` of the EMAs (named ``'ema_power=<kappa>'`` and
    ``'std=<std>'``) and of theta_0 (named ``'initial'``).

  Examples:
    >>> import jax.numpy as jnp, optax, optax_bema
    >>> tx = optax.chain(optax.sgd(0.1), optax_bema.posthoc_ema(
    ...     ema_powers=(0.5,), stds=(0.05, 0.1)))
    >>> state = tx.init(jnp.ones(3))
    >>> sorted(optax.tree.get(state, 'members'))
    ['ema_power=0.5', 'initial', 'std=0.05', 'std=0.1']

  References:
    Karras et al., `Analyzing and Improving the Training Dynamics of
    Diffusion Models <https://arxiv.org/abs/2312.02696>`_, 2024 (EDM2,
    Section 3 and the appendix on post-hoc EMA).
  """
  shared: dict = dict(accumulator_dtype=accumulator_dtype,
                      offload_to_host=offload_to_host,
                      update_after=update_after)
  ema_powers, stds = tuple(ema_powers), tuple(stds)
  members = {f'ema_power={float(p):g}': _stabilizers.ema(
      ema_power=p, lag=lag, multiplier=multiplier, update_freq=1, **shared)
             for p in ema_powers}
  members.update({f'std={float(s):g}': _stabilizers.power_ema(s, **shared)
                  for s in stds})
  if len(members) != len(ema_powers) + len(stds) or not members:
    raise ValueError(f'posthoc_ema: ema_powers and stds must be distinct, '
                     f'and track at least one average; got ema_powers='
                     f'{ema_powers}, stds={stds}.')
  return averages(**members, initial=_stabilizers.initial_params(**shared))


def whole_step(value, caller: str, what: str = 'a step') -> int:
  """``value`` as an int >= 0: a whole number (Python, NumPy or a 0-d
  array); ``ValueError`` if fractional or negative, ``TypeError`` if not a
  number at all."""
  if isinstance(value, (jax.Array, np.ndarray)) and value.ndim == 0:
    value = value.item()
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise TypeError(f'{caller}: {what} must be an integer, got {value!r} '
                    f'({type(value).__name__}).')
  if not float(value).is_integer() or value < 0:
    raise ValueError(f'{caller}: {what} must be an integer >= 0, got '
                     f'{value!r}.')
  return int(value)


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
  num_steps = whole_step(num_steps, 'profile', 'num_steps')
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
  num_steps = whole_step(num_steps, 'uniform_profile', 'num_steps')
  steps = [whole_step(s, 'uniform_profile') for s in steps]
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
    step = whole_step(step, 'replay')
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
  now = (jax.tree.structure(params),
         [(jnp.shape(x), jnp.result_type(x)) for x in jax.tree.leaves(params)])
  if layout is not None and now[0] != layout[0]:
    raise ValueError(f'{caller}: the snapshot at step {step} has another '
                     f'tree structure than the earlier ones.')
  if layout is not None and now[1] != layout[1]:
    changed = next(i for i, (a, b) in enumerate(zip(now[1], layout[1]))
                   if a != b)
    raise ValueError(
        f'{caller}: the snapshot at step {step} has leaf {changed} of shape '
        f'and dtype {now[1][changed]}, the earlier ones {layout[1][changed]}:'
        ' every snapshot must come from the same model.')
  if step <= last:
    raise ValueError(f'{caller}: snapshots must be in increasing step order; '
                     f'step {step} came after step {last}.')
  return now


def require_finite(tree, what: str):
  """``ValueError`` naming ``what`` when a leaf of ``tree`` is not finite."""
  if not bool(_tree.all_finite(_tree.as_accumulator(tree, None))):
    raise ValueError(
        f'{what} are not all finite: this snapshot cannot give a finite '
        'model. Leave it out (and the steps it covers: save another '
        'checkpoint), or take an earlier one.')

"""Choosing the average after training: several averages in one pass, their
profiles, exact replay from saved iterates, and post-hoc synthesis.

Every stabilizer's model after step T is a fixed linear combination of the
iterates theta_0..theta_T (its *profile*, ``_profiles``). Replay runs a
stabilizer's own update on the saved iterates at the steps it reads;
synthesis matches a target's profile with the profiles of averages tracked
during training and combines their saved values with the same weights.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_bema import _engine
from optax_bema import _profiles
from optax_bema import _readout
from optax_bema import _stabilizers
from optax_bema import _tree

# The order of a member's settings in AveragesState.settings.
_SETTINGS = ('ema_power', 'bias_power', 'lag', 'multiplier', 'update_after',
             'update_freq', 'min_ema_multiplier', 'bias_multiplier')
_KINDS = _profiles.KINDS + ('initial',)
DEFAULT_POSTHOC_POWERS = (0.3, 0.5, 0.9)


class AveragesState(NamedTuple):
  """State of :func:`averages`: each member's state, and what it computes.

  ``settings[name]`` is a float32 vector: the member's kind (an index into
  ``('ema', 'bema', 'dema', 'ouema', 'initial')``), then its ema_power,
  bias_power, lag, multiplier, update_after, update_freq,
  min_ema_multiplier and bias_multiplier, so that a saved state alone says
  which average each member is (:func:`synthesize` reads it).
  """
  members: dict
  settings: dict


def _settings_vector(member: _engine.Stabilizer) -> jax.Array:
  hp = member.hyperparams
  return jnp.asarray([_KINDS.index(member.kind)]
                     + [float(hp[k]) for k in _SETTINGS], jnp.float32)


def _settings_of(vector) -> tuple[str, dict]:
  vector = np.asarray(vector, np.float64)
  kind = _KINDS[int(vector[0])]
  hp = dict(zip(_SETTINGS, vector[1:].tolist()))
  for key in ('update_after', 'update_freq'):
    hp[key] = int(round(hp[key]))
  return kind, hp


def _require_stabilizer(transform, caller: str, what: str):
  if not isinstance(transform, _engine.Stabilizer):
    raise TypeError(
        f'{caller}: {what} must be a stabilizer (optax_bema.ema, bema, dema '
        f'or ouema), got {type(transform).__name__}. PACE changes training, '
        'so it has no profile; optax.inject_hyperparams hides the settings.')
  if not all(isinstance(v, (int, float, np.number))
             for v in transform.hyperparams.values()):
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
    _require_stabilizer(member, 'averages', f'member {name!r}')

  def init_fn(params):
    return AveragesState(
        members={k: m.init(params) for k, m in members.items()},
        settings={k: _settings_vector(m) for k, m in members.items()})

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


def posthoc_ema(ema_powers=DEFAULT_POSTHOC_POWERS, lag: float = 10.0,
                multiplier: float = 1.0, update_after: int = 0,
                accumulator_dtype: Optional[jnp.dtype] = None,
                offload_to_host: bool = False,
                ) -> optax.GradientTransformationExtraArgs:
  r"""Tracks a few EMAs of different lengths, to choose any average later.

  One EMA per power in ``ema_powers``, each updated every step with
  :math:`\beta_t = (\rho + \gamma t)^{-\kappa}`, and theta_0. Save the
  optimizer state (and the params) with your ordinary checkpoints every k
  steps; after training, :func:`synthesize` returns the model any stabilizer
  (EMA, BEMA, DEMA, OUEMA, any settings) would have returned, as in the
  post-hoc EMA of EDM2. The defaults (0.3, 0.5, 0.9), with snapshots every
  20 steps of 2000 on a noisy quadratic, reproduce untracked EMA, BEMA,
  DEMA and OUEMA targets to within 0.02% of their distance from the last
  iterate (0.6% for BEMA updated every 5 steps); every 100 steps, to 5%.
  Cost: that many EMAs, plus one copy for theta_0.

  Args:
    ema_powers: kappa of each tracked EMA; 0.5 is the library's default EMA,
      which is then also returned exactly.
    lag: rho, the offset of every EMA weight's base.
    multiplier: gamma, the step's factor in that base.
    update_after: the burn-in, as for every stabilizer.
    accumulator_dtype: dtype of the averages (float32 for low-precision
      weights by default). Save snapshots in float32: bfloat16 rounding is
      amplified by the synthesis' coefficients.
    offload_to_host: keep the averages in host memory between steps.

  Returns:
    :func:`averages` of the EMAs (named ``'ema_power=<kappa>'``) and of
    theta_0 (named ``'initial'``).

  Examples:
    >>> import jax.numpy as jnp, optax, optax_bema
    >>> tx = optax.chain(optax.sgd(0.1), optax_bema.posthoc_ema())
    >>> state = tx.init(jnp.ones(3))
    >>> sorted(optax.tree.get(state, 'members'))
    ['ema_power=0.3', 'ema_power=0.5', 'ema_power=0.9', 'initial']

  References:
    Karras et al., `Analyzing and Improving the Training Dynamics of
    Diffusion Models <https://arxiv.org/abs/2312.02696>`_, 2024 (EDM2,
    Section 3 and the appendix on post-hoc EMA).
  """
  shared: dict = dict(accumulator_dtype=accumulator_dtype,
                      offload_to_host=offload_to_host,
                      update_after=update_after)
  members = {f'ema_power={float(p):g}': _stabilizers.ema(
      ema_power=p, lag=lag, multiplier=multiplier, update_freq=1, **shared)
             for p in ema_powers}
  if len(members) != len(tuple(ema_powers)) or not members:
    raise ValueError(f'posthoc_ema: ema_powers must be distinct and at least '
                     f'one, got {ema_powers}.')
  return averages(**members, initial=_stabilizers.initial_params(**shared))


def profile(stabilizer: _engine.Stabilizer, num_steps: int) -> np.ndarray:
  """The weights of a stabilizer's model on the iterates theta_0..theta_T.

  After step T = ``num_steps`` the model a stabilizer returns is
  ``sum_s w[s] theta_s`` exactly, whatever the trajectory: EMA's weights
  decay into the past (its lag), BEMA adds alpha_T on theta_T and takes it
  from theta_0, DEMA's are partly negative on old iterates.

  Args:
    stabilizer: ``optax_bema.ema(...)``, ``bema``, ``dema`` or ``ouema``.
    num_steps: T.

  Returns:
    A float64 array of ``num_steps + 1`` weights; they sum to 1.

  Examples:
    >>> import optax_bema
    >>> w = optax_bema.profile(optax_bema.bema(update_freq=1), 100)
    >>> w.shape, round(float(w.sum()), 6), bool(w[0] < 0)
    ((101,), 1.0, True)
  """
  _require_stabilizer(stabilizer, 'profile', 'stabilizer')
  return _profile(stabilizer.kind, stabilizer.hyperparams, num_steps)


def _profile(kind, hyperparams, num_steps) -> np.ndarray:
  if kind == 'initial':
    w = np.zeros(num_steps + 1)
    w[min(int(hyperparams['update_after']), num_steps)] = 1.0
    return w
  return _profiles.profile_weights(kind, hyperparams, num_steps)


def _as_dict(targets, caller):
  single = not isinstance(targets, Mapping)
  targets = {None: targets} if single else dict(targets)
  for name, t in targets.items():
    _require_stabilizer(t, caller, 'a target' if single else f'{name!r}')
  return single, targets


def replay(stabilizers, snapshots: Iterable[tuple[int, Any]]):
  """The model a stabilizer returns, recomputed from saved iterates.

  Runs each stabilizer's own update on the saved params, at the steps it
  reads: the result equals the online ``optax.chain(optimizer, stabilizer)``
  at the last snapshot to float32 precision. Streams: one snapshot on the
  device at a time, every stabilizer in the same pass.

  Args:
    stabilizers: one stabilizer, or a dict of them.
    snapshots: ``(step, params)`` pairs in increasing step order, from step
      0 (the weights at init); e.g. read lazily from an Orbax
      ``CheckpointManager``: ``((s, manager.restore(s)) for s in
      manager.all_steps())``. They must include every step a stabilizer
      reads: the last burn-in step and every update step.

  Returns:
    The model at the last snapshot (a dict of models for a dict).

  Raises:
    ValueError: snapshots not starting at 0, out of order, of another tree
      structure, or missing a step a stabilizer reads (named).
    TypeError: a target that is not a stabilizer.
  """
  single, targets = _as_dict(stabilizers, 'replay')
  steps = {k: jax.jit(t.update) for k, t in targets.items()}
  states, structure, last, params = None, None, -1, None
  for step, params in snapshots:
    step = int(step)
    structure = _check_next(structure, params, last, step, 'replay')
    if states is None:
      if step != 0:
        raise ValueError(f'replay: the first snapshot must be step 0, the '
                         f'weights at init; got step {step}.')
      states = {k: t.init(params) for k, t in targets.items()}
    else:
      for k, t in targets.items():
        missing = _first_read_step_between(t.hyperparams, last, step)
        if missing is not None:
          raise ValueError(
              f'replay: {t.kind}{"" if single else f" {k!r}"} reads step '
              f'{missing}, which has no snapshot (the last before it is step '
              f'{last}); save every update step and the last burn-in step.')
        zeros = jax.tree.map(jnp.zeros_like, params)
        states[k] = steps[k](zeros, states[k]._replace(
            count=jnp.asarray(step - 1, jnp.int32)), params)[1]
    last = step
  if states is None:
    raise ValueError('replay: no snapshots.')
  models = {k: _readout.averaged_params(s, params) for k, s in states.items()}
  return models[None] if single else models


def _first_read_step_between(hp, after: int, before: int) -> Optional[int]:
  """The first step in (after, before) a stabilizer reads, if any."""
  tau, freq = int(hp['update_after']), int(hp['update_freq'])
  if after < tau < before:
    return tau
  first = max(after + 1, tau + 1)
  first += (-(first - tau)) % freq  # the next update step
  return first if first < before else None


def _check_next(structure, params, last: int, step: int, caller: str):
  now = jax.tree.structure(params)
  if structure is not None and now != structure:
    raise ValueError(f'{caller}: the snapshot at step {step} has another '
                     f'tree structure than the earlier ones.')
  if step <= last:
    raise ValueError(f'{caller}: snapshots must be in increasing step order; '
                     f'step {step} came after step {last}.')
  return now


class Synthesized(NamedTuple):
  """What :func:`synthesize` returns."""
  model: Any     # the synthesized model (a dict of them for a dict)
  residual: Any  # ||fitted profile - target|| / ||target||, a float (dict)


def synthesize(target, snapshots: Iterable[tuple[Any, Any]],
               ridge: float = 1e-6) -> Synthesized:
  """The model any stabilizer would have returned, from post-hoc snapshots.

  Trains once with :func:`posthoc_ema` (or any :func:`averages`) last in the
  chain and saves ``(opt_state, params)`` every k steps. The target's
  profile at the last snapshot's step T is matched, in least squares, by the
  profiles of the tracked averages at every snapshot, the saved params
  (theta_s exactly) and theta_0; the model is the same combination of the
  saved arrays (EDM2's post-hoc EMA, extended to every stabilizer here).
  The relative residual of that fit says how far to trust it: near 0 the
  synthesis is exact; a target updated every few steps has a comb-shaped
  profile no smooth average matches step by step, yet the model error is
  far smaller than its residual suggests, since the iterates change slowly.

  ``snapshots`` is read twice (first the steps, then the arrays), one
  snapshot on the device at a time: pass a list, or an object whose
  ``__iter__`` loads them lazily (from an Orbax ``CheckpointManager``, say).

  Args:
    target: a stabilizer (``optax_bema.bema(...)``, ...), or a dict of them,
      all synthesized in one pass.
    snapshots: ``(opt_state, params)`` pairs in increasing step order, the
      states holding one :func:`averages` / :func:`posthoc_ema` state.
    ridge: relative Tikhonov weight of the fit; about the snapshots'
      relative precision (1e-6 for float32).

  Returns:
    ``Synthesized(model, residual)``; dicts of both for a dict of targets.

  Raises:
    ValueError: no snapshots, out of order, another tree structure, no
      averages state, or averages that skipped non-finite iterates (their
      profiles are then not the nominal ones).
    TypeError: a target that is not a stabilizer, or a one-shot iterator.
  """
  single, targets = _as_dict(target, 'synthesize')
  if iter(snapshots) is snapshots:
    raise TypeError('synthesize: snapshots are read twice; pass a list or a '
                    're-iterable object (whose __iter__ loads them lazily), '
                    'not a one-shot iterator or generator.')
  # Pass 1: the steps and the tracked averages' settings.
  layout, structure, last = [], None, -1
  for opt_state, params in snapshots:
    tracked = _tracked(opt_state)
    step = max(int(s.count) for s in tracked.members.values())
    skipped = {k: n for k, n in ((k, int(s.nonfinite_count))
                                 for k, s in tracked.members.items()) if n}
    if skipped:
      raise ValueError(f'synthesize: the averages skipped non-finite iterates '
                       f'({skipped} by step {step}); their profiles are not '
                       'the nominal ones, so no synthesis can be trusted.')
    structure = _check_next(structure, params, last, step, 'synthesize')
    layout.append((step, {k: _settings_of(v)
                          for k, v in tracked.settings.items()}))
    last = step
  if not layout:
    raise ValueError('synthesize: no snapshots.')
  num_steps = last
  # Columns: each member at each snapshot, theta_s; theta_0 once, the last
  # snapshot's (repeating an identical column only splits its coefficient).
  columns, sources = [], []
  for i, (step, members) in enumerate(layout):
    for k, (kind, hp) in members.items():
      if kind != 'initial' or i == len(layout) - 1:
        columns.append(_padded(_profile(kind, hp, step), num_steps))
        sources.append((i, k))
    unit = np.zeros(num_steps + 1)
    unit[step] = 1.0
    columns.append(unit)
    sources.append((i, None))
  names = list(targets)
  wanted = np.stack([profile(targets[k], num_steps) for k in names])
  coefficients, residuals = _profiles.fit(wanted, np.stack(columns),
                                          ridge=ridge)
  # Pass 2: one weighted sum per target, a snapshot at a time, each
  # snapshot's columns added to every target's sum in one compiled call.
  coefficients = np.atleast_2d(coefficients)
  sums: Any = None
  for i, (opt_state, params) in enumerate(snapshots):
    tracked = _tracked(opt_state)
    at = [j for j, (snapshot, _) in enumerate(sources) if snapshot == i]
    arrays = [jax.device_put(_tree.as_accumulator(
        params if sources[j][1] is None
        else _readout.model(tracked.members[sources[j][1]], params), None))
              for j in at]
    if sums is None:
      sums = [jax.tree.map(jnp.zeros_like, arrays[0]) for _ in names]
    sums = _accumulate(sums, arrays,
                       jnp.asarray(coefficients[:, at], jnp.float32))
  models = {k: _tree.cast_like_params(s, params) for k, s in zip(names, sums)}
  residual = {k: float(r) for k, r in zip(names, np.atleast_1d(residuals))}
  if single:
    return Synthesized(models[None], residual[None])
  return Synthesized(models, residual)


def _tracked(opt_state) -> AveragesState:
  """The one averages state a snapshot holds."""
  return _tree.find_state(
      opt_state, (AveragesState,), caller='synthesize',
      what='averages state', missing='Train with optax_bema.posthoc_ema() '
      '(or optax_bema.averages(...)) last in the chain and save its state.')


@jax.jit
def _accumulate(sums, arrays, weights):
  """``sums[m] + sum_j weights[m, j] arrays[j]``, leaf by leaf."""
  return [jax.tree.map(lambda acc, *xs, w=w: acc + sum(
      w[j] * x for j, x in enumerate(xs)), total, *arrays)
          for total, w in zip(sums, weights)]


def _padded(weights: np.ndarray, num_steps: int) -> np.ndarray:
  return np.pad(weights, (0, num_steps + 1 - len(weights)))

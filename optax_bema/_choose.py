"""Choosing the returned model in one call: every average the snapshots can
synthesize, scored, the best one returned (:func:`choose`).

EDM2's post-hoc EMA (Karras et al. 2024) reconstructs one average per call
and leaves the choice to the user; here the candidates span every family
the library reconstructs (EMA, BEMA, DEMA, OUEMA, EDM2's power EMA, the mean
of the last iterates as LAWA, Kaddour 2022, and PMA, arXiv 2505.12082, merge
checkpoints), each carries an estimate of its model error, and a candidate
the snapshots cannot support is flagged and never chosen.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator, Mapping, Optional
import warnings

import jax
import numpy as np

from optax_bema import _candidates
from optax_bema import _engine
from optax_bema import _fit
from optax_bema import _kinds
from optax_bema import _profiles
from optax_bema import _readout
from optax_bema import _synthesis
from optax_bema import _targets
from optax_bema import _tree
from optax_bema._choice import REFUSED
from optax_bema._choice import Choice
from optax_bema._choice import Row

# The largest estimated model error (relative to the model's distance from
# the last iterate) a synthesized candidate may have to be chosen. Measured
# on a small MLP trained with Adam for 300 and 1000 steps, the default
# candidates synthesized from snapshot_steps(T, 40), snapshot_steps(T, 10),
# the last three of the 40 (Orbax's max_to_keep=3), with and without step
# 0, and the first 60% of them (a truncated run): every candidate whose
# estimate was at most 0.02 had a true error of at most 0.018; at 0.05 the
# true error reached 0.052 (10 snapshots) and 0.030 (three).
DEFAULT_MAX_ERROR = 0.02

def choose(snapshots, score, *, candidates: Optional[Mapping] = None,
           metric: Optional[str] = None, maximize: bool = False,
           max_error: float = DEFAULT_MAX_ERROR, refine: bool = True,
           batch_size: int = 8, ridge: float = 1e-4,
           progress: bool = True) -> Choice:
  """The best average the snapshots support, by ``score``, in one call.

  Synthesizes every candidate (by default EMA, BEMA, DEMA and OUEMA at
  seven ``ema_power`` each, EDM2 power EMAs of std 0.01 to 0.25, means of
  the last 1% to 100% of the steps and merges of the last 3% to 100%
  shaped as a cosine or 1 - sqrt decay, :func:`decay_profile`), scores
  each with ``score`` beside the rows that need no synthesis (the last
  iterate, each tracked average), then refines the winning family's
  setting between its grid neighbours.
  A candidate whose estimated model error (:class:`~optax_bema.Synthesized`'s
  ``error``) exceeds ``max_error``, or a stabilizer that never updated by
  the last snapshot (its model would be theta_0), is flagged and never
  chosen; if no synthesized candidate is left, the choice is made among the
  exact rows, with a warning. At most ``batch_size`` candidate models are
  alive at once, besides the best.

  Args:
    snapshots: what :func:`~optax_bema.synthesize` takes (``(opt_state,
      params)`` pairs, re-iterable), or :func:`orbax_snapshots`' result.
    score: ``params -> scalar`` (lower is better unless ``maximize``) or
      ``params -> dict`` of metrics, chosen by ``metric``; jitted here
      unless it cannot be traced.
    candidates: a dict of targets (stabilizers or profiles) added to the
      defaults; a default's name replaces it, ``None`` removes it.
    metric: the metric to choose by when ``score`` returns a dict.
    maximize: higher scores are better.
    max_error: the largest estimated model error a synthesized candidate
      may have to be chosen.
    refine: search the winning family's setting between grid points.
    batch_size: candidate models synthesized and scored per read.
    ridge: as for :func:`~optax_bema.synthesize`.
    progress: show a progress bar (needs tqdm; on process 0 only).

  Returns:
    A :class:`Choice`; ``str(choice)`` is its table, sorted.

  Raises:
    ValueError: as :func:`~optax_bema.synthesize`, or a score that is not
      a scalar, or a dict without ``metric``.
    TypeError: snapshots as a dict or a one-shot iterator.
  Examples:
    SGD on a noisy quadratic, a snapshot at every step; any average beats
    the last iterate there:

    >>> import jax, jax.numpy as jnp, optax, optax_bema
    >>> tx = optax.chain(optax.sgd(0.1), optax_bema.posthoc_ema())
    >>> params = jnp.ones(4)
    >>> state = tx.init(params)
    >>> snapshots = [(state, params)]
    >>> for t in range(1, 101):
    ...   grads = params + jax.random.normal(jax.random.key(t), (4,))
    ...   updates, state = tx.update(grads, state, params)
    ...   params = optax.apply_updates(params, updates)
    ...   snapshots.append((state, params))
    >>> choice = optax_bema.choose(snapshots, lambda p: jnp.sum(p ** 2),
    ...                            progress=False)
    >>> choice.score < 0.5 * float(jnp.sum(params ** 2))
    True

  References:
    Karras et al., `Analyzing and Improving the Training Dynamics of
    Diffusion Models <https://arxiv.org/abs/2312.02696>`_, 2024 (EDM2,
    post-hoc EMA); Kaddour, `Stop Wasting My Time! Saving Days of ImageNet
    and BERT Training with Latest Weight Averaging
    <https://arxiv.org/abs/2209.14981>`_, 2022 (LAWA).
  """
  if isinstance(snapshots, (Mapping, Iterator)):
    raise TypeError('choose: snapshots are read several times; pass a list '
                    'or a re-iterable (orbax_snapshots(manager)), not a '
                    'dict or a one-shot iterator.')
  if not (isinstance(max_error, (int, float)) and max_error > 0):
    raise ValueError(f'choose: max_error must be > 0, got {max_error!r}.')
  _fit.require_ridge(ridge, 'choose')
  if not (isinstance(batch_size, int) and batch_size >= 1):
    raise ValueError(f'choose: batch_size must be an integer >= 1, got '
                     f'{batch_size!r}.')
  prepared = _synthesis.prepare(snapshots)
  run = _Run(snapshots, prepared, _Scorer(score, metric, maximize),
             max_error, batch_size, ridge, progress)
  last = prepared.first[-1]
  run.exact('last iterate', 'last iterate', last.params_like,
            _unit(prepared.num_steps))
  for name, (rule, schedule, state) in last.members.items():
    if rule.name != 'initial':
      # The public kind, in float32: a 16-bit member's rule stores
      # deviations, which replay would read as values.
      target = _engine.stabilizer(_kinds.RULES[rule.name], schedule)
      run.exact(f'tracked {name}', 'tracked',
                _tree.cast_like_params(_readout.model(state, last.params_like),
                                       last.params_like),
                target, _candidates.never_updated(target, prepared.num_steps))
  grid = _grid(prepared.num_steps, candidates)
  run.synthesize(grid)
  if refine:
    _refine(run, grid)
  run.close()
  return run.choice()


def _unit(num_steps):
  w = np.zeros(num_steps + 1)
  w[-1] = 1.0
  return w


def _grid(num_steps, candidates) -> dict:
  grid = _candidates.default_candidates(num_steps)
  for name, target in dict(candidates or {}).items():
    if target is None:
      grid.pop(name, None)
      continue
    _targets.as_targets({name: target}, 'choose')
    family = (target.kind if isinstance(target, _engine.Stabilizer)
              else 'profile')
    grid[name] = (target, family, None)
  return grid


class _Scorer:
  """``score`` jitted where it traces, its value read as one number."""

  def __init__(self, score, metric, maximize):
    self.score, self.metric, self.maximize = score, metric, maximize
    self.jitted: Optional[Callable] = jax.jit(score)

  def __call__(self, model) -> tuple[float, Optional[dict]]:
    if self.jitted is not None:
      try:
        value = self.jitted(model)
      except jax.errors.JAXTypeError:
        self.jitted = None  # needs concrete values: called as it is
    if self.jitted is None:
      value = self.score(model)
    if isinstance(value, Mapping):
      if self.metric not in value:
        raise ValueError(f'choose: score returned the metrics '
                         f'{sorted(value)}; name the one to choose by with '
                         f'metric= (got {self.metric!r}).')
      scores = {k: _scalar(v, k) for k, v in value.items()}
      return scores[self.metric], scores
    if self.metric is not None:
      raise ValueError(f'choose: metric={self.metric!r} names a metric, but '
                       'score returned one value, not a dict.')
    return _scalar(value, 'score'), None

  def key(self, value: float) -> float:
    return -value if self.maximize else value


def _scalar(value, what) -> float:
  array = np.asarray(value)
  if array.size != 1:
    raise ValueError(f'choose: {what} must be a scalar, got shape '
                     f'{array.shape}.')
  return float(array.reshape(()))


class _Run:
  """The rows scored so far, and the best model among the allowed ones."""

  def __init__(self, snapshots, prepared, scorer, max_error, batch_size,
               ridge, progress):
    self.snapshots, self.prepared, self.scorer = snapshots, prepared, scorer
    self.max_error, self.batch_size, self.ridge = max_error, batch_size, ridge
    self.rows: list[Row] = []
    self.targets: dict = {}
    self.best: Optional[tuple] = None  # (key, name, model)
    self.bar = _bar(progress)

  def exact(self, name, family, model, target, never=False):
    if self.bar is not None:
      self.bar.total += 1
    self._add(name, family, None, target, None if never else model, 0.0,
              0.0, ('exact',) + (('never updated',) if never else ()))

  def _add(self, name, family, setting, target, model, residual, error,
           flags):
    value, scores = (math.nan, None) if model is None else self.scorer(model)
    if model is not None and not math.isfinite(value):
      flags += ('not finite',)
    self.rows.append(Row(name, family, setting, self._length(target), value,
                         scores, residual, error, flags))
    self.targets[name] = target
    if self.bar is not None:
      self.bar.update()
    if not set(flags) & set(REFUSED):
      key = self.scorer.key(value)
      if self.best is None or key < self.best[0]:
        self.best = (key, name, model)

  def _length(self, target) -> float:
    t = self.prepared.num_steps
    if isinstance(target, _engine.Stabilizer):
      # A power-law family's length is its EMA's: BEMA's and OUEMA's
      # weight on theta_0 and DEMA's negative weights are not its length.
      rule = (_kinds.RULES['ema'] if target.schedule.ema_power is not None
              else target.rule)
      w = _profiles.dense(rule.profile(target.schedule, np.array([t])))
    else:
      w = np.asarray(target, np.float64)
    w = np.abs(w)
    steps = np.arange(w.size)
    mean = np.dot(w, steps) / w.sum()
    return float(math.sqrt(12 * np.dot(w, (steps - mean) ** 2) / w.sum()))

  def synthesize(self, grid: Mapping):
    """Scores ``grid``'s candidates (``{name: (target, family,
    setting)}``), ``batch_size`` models per read of the snapshots."""
    t = self.prepared.num_steps
    never = [k for k, (target, _, _) in grid.items()
             if _candidates.never_updated(target, t)]
    for k in never:
      target, family, setting = grid[k]
      if self.bar is not None:
        self.bar.total += 1
      self._add(k, family, setting, target, None, math.nan, math.nan,
                ('never updated',))
    names = [k for k in grid if k not in never]
    if not names:
      return
    if self.bar is not None:
      self.bar.total += len(names)
    solution = _synthesis.fit(self.prepared, [grid[k][0] for k in names],
                              self.ridge)
    for start in range(0, len(names), self.batch_size):
      rows = list(range(start, min(start + self.batch_size, len(names))))
      # Padded with zero rows: one compiled sum for every batch.
      coefficients = np.zeros((self.batch_size,
                               solution.coefficients.shape[1]))
      coefficients[:len(rows)] = solution.coefficients[rows]
      models = _synthesis.combine(self.snapshots, self.prepared,
                                  coefficients)[:len(rows)]
      errors = _synthesis.model_errors(self.prepared, solution, models, rows)
      for i, model, error in zip(rows, models, errors):
        target, family, setting = grid[names[i]]
        flags = ('unsupported',) if not error <= self.max_error else ()
        self._add(names[i], family, setting, target, model,
                  float(solution.residual[i]), error, flags)
      del models

  def close(self):
    if self.bar is not None:
      self.bar.close()

  def choice(self) -> Choice:
    if self.best is None:  # every row refused: no finite score at all
      last = next(r for r in self.rows if r.name == 'last iterate')
      raise ValueError(
          f'choose: the score is not finite for any model it could choose '
          f'(the last iterate scored {last.score!r}); check the score '
          'function and the validation data.')
    _, name, model = self.best
    note = ''
    synthesized = [r for r in self.rows if 'exact' not in r.flags]
    if synthesized and all(set(r.flags) & set(REFUSED) for r in synthesized):
      note = ('choose: no synthesized candidate is supported by these '
              f'snapshots (estimated model errors above max_error='
              f'{self.max_error:g}, or never updated); chosen among the '
              'exact rows (the last iterate and the tracked averages). Save '
              'the snapshots snapshot_steps names, all of them.')
      warnings.warn(note, stacklevel=3)
    row = next(r for r in self.rows if r.name == name)
    return Choice(model, name, self.targets[name], row.score,
                  list(self.rows), note, self.scorer.maximize)


def _bar(progress):
  if not progress or jax.process_index() != 0:
    return None
  try:
    import tqdm  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return tqdm.tqdm(total=0, desc='choose', leave=False)


def _refine(run: _Run, grid: Mapping):
  """Two rounds of midpoints between the winning family's best setting and
  its neighbours: the best length often lies between grid points."""
  if run.best is None:
    return
  winner = next(r for r in run.rows if r.name == run.best[1])
  family = _candidates.FAMILIES.get(winner.family)
  if family is None or winner.setting is None or grid.get(
      winner.name, (None, None, None))[2] is None:
    return
  t = run.prepared.num_steps
  for _ in range(2):
    settled: dict[float, Row] = {
        r.setting: r for r in run.rows
        if r.family == winner.family and r.setting is not None}
    ranked = sorted(settled)
    best = min((r for r in settled.values()
                if not set(r.flags) & set(REFUSED)),
               key=lambda r: run.scorer.key(r.score))
    a = next(k for k, r in settled.items() if r is best)
    i = ranked.index(a)
    low, high = family.limits(t)
    points = []
    for j, k in ((i - 1, i + 1), (i + 1, i - 1)):
      if 0 <= j < len(ranked):  # between the best and a neighbour
        b = ranked[j]
        mid = math.sqrt(a * b) if family.geometric else (a + b) / 2
      elif 0 <= k < len(ranked):  # past the grid's end, half a step
        b = ranked[k]
        mid = a * math.sqrt(a / b) if family.geometric else a + (a - b) / 2
        mid = min(max(mid, low), high)
      else:
        continue
      windowed = winner.family in _candidates.WINDOWS
      mid = round(mid) if windowed else round(mid, 4)
      if mid not in settled:
        points.append(mid)
    if not points:
      return
    run.synthesize({_candidates.name(winner.family, s): (family.build(s, t),
                                              winner.family, s)
                    for s in points})

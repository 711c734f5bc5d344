"""The least-squares fit of a target's profile by tracked profiles, and
the synthesized profile it gives (:func:`synthesized_profile`).

Synthesis needs only inner products of profiles: each average's profiles at
every snapshot come in segment form (``_profiles.Columns``), so the Gram
matrix costs one pass over the T + 1 steps per pair of families, and memory
grows as 8 bytes x (families) x T, whatever the number of snapshots.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from optax_bema import _averages
from optax_bema import _checks
from optax_bema import _profiles
from optax_bema import _targets


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


class Solution(NamedTuple):
  """What :func:`solve` gives for each target (one row per target)."""
  coefficients: np.ndarray  # (targets, basis columns)
  residual: np.ndarray      # ||fitted - target|| / ||target||
  # Per segment between snapshots (ends[j-1], ends[j]] (segment 0: the
  # steps up to ends[0]): sum and sum of squares over its steps s of
  # R_s = sum_{t < s} (fitted - target)_t, the weight the fit's error puts
  # on the update that reached step s.
  lag_sum: np.ndarray       # (targets, segments)
  lag_square: np.ndarray    # (targets, segments)


def solve(basis, wanted, ridge) -> Solution:
  """The fit of each column of ``wanted`` by the columns of ``basis``, from
  the profiles' inner products.

  The coefficients keep the fitted profile's total weight equal to the
  target's (see :func:`fit_gram`), so the weights that never move come back
  unchanged, and the residual profile is returned in the form the error
  estimate of synthesis reads (:class:`Solution`).
  """
  ends = basis[0].ends
  num_steps = int(ends[-1])
  ones = _profiles.Columns(ends, np.ones((1, num_steps + 1)),
                           np.ones((1, len(ends), 1)),
                           (np.zeros(0, np.int64), np.zeros(0, np.int64),
                            np.zeros(0)))
  families, coef, (column, step, weight) = _stack(basis + wanted + [ones])
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
  n, m = sum(b.coef.shape[0] for b in basis), len(wanted)
  totals = gram[-1, :-1]  # each column's total weight: its product with 1
  x = fit_gram(gram[:n, :n], gram[:n, n:n + m], ridge=ridge,
               sums=totals[:n], totals=totals[n:n + m])
  segment = np.searchsorted(ends, np.arange(num_steps + 1))
  residual, lag_sum, lag_square = [], [], []
  for t in range(m):
    d = np.concatenate([x[:, t], -np.eye(m)[t], [0.0]])
    per_family = np.einsum('c,cja->ja', d, coef)
    r = np.zeros(num_steps + 1)
    for a in np.flatnonzero(np.abs(per_family).sum(axis=0)):
      r += per_family[segment, a] * families[a]
    np.add.at(r, step, d[column] * weight)
    residual.append(np.linalg.norm(r) / math.sqrt(gram[n + t, n + t]))
    lag = np.concatenate([[0.0], np.cumsum(r)[:-1]])  # R_s, s = 0..T
    lag_sum.append(np.bincount(segment, lag, minlength=len(ends)))
    lag_square.append(np.bincount(segment, lag ** 2, minlength=len(ends)))
  return Solution(x.T, np.array(residual), np.array(lag_sum),
                  np.array(lag_square))


def path_error(solution: Solution, ends: np.ndarray,
               moved: np.ndarray, since: int = 0) -> np.ndarray:
  """Each target's estimated model error ||sum_t r_t theta_t||, absolute.

  With r the residual profile (summing to 0), the model error is
  -sum_s R_s u_s, u_s the update that reached step s and R_s the residual's
  weight before s (:class:`Solution`). Between two saved steps a < b the
  updates are unknown; their size is read off the saved params: ``moved``,
  ||theta_b - theta_a||^2 for each snapshot after the first, and for the
  first ||theta_{s_0} - theta_0||^2 (0 where theta_0 is unknown), theta_0
  being the iterate at step ``since`` (the end of a burn-in). Each segment
  contributes the larger of its two extremes, updates all alike (a drift:
  (sum R_s)^2 moved / (b - a)^2) and independent (noise: sum R_s^2 times a
  per-step energy), the per-step energy being moved / (b - a) or, where
  that is smaller, the one measured between the closest saved steps (a
  noisy path that returns on itself moves less between far snapshots than
  its steps add up to).
  """
  gaps = np.diff(ends).astype(np.float64)
  if not gaps.size:
    return np.zeros(solution.lag_sum.shape[0])
  per_step = moved[1:] / gaps
  closest = per_step[gaps == gaps.min()].max()
  # The steps up to the first snapshot: their movement is known where
  # ``moved[0]`` holds the distance from theta_0 (else only the closest
  # pair's per-step energy, the sole bound left).
  start = float(max(ends[0] - since, 1))
  energy = np.maximum(np.concatenate([[moved[0] / start], per_step]),
                      closest)
  drift = np.concatenate([[moved[0] / start ** 2], moved[1:] / gaps ** 2])
  squared = np.maximum(solution.lag_square * energy,
                       solution.lag_sum ** 2 * drift)
  return np.sqrt(squared.sum(axis=1))


def fit_gram(gram: np.ndarray, rhs: np.ndarray, *, ridge: float,
             sums=None, totals=None) -> np.ndarray:
  r"""Least-squares coefficients from inner products alone.

  Solves :math:`\min_x \|B^\top x - w\|^2 + \lambda^2 \|D x\|^2` given
  ``gram`` :math:`= B B^\top` and ``rhs`` :math:`= B w` (one column per
  target), D the basis rows' norms and :math:`\lambda` = ``ridge`` times
  the largest singular value of the row-normalised basis. The rows are
  scaled to unit norm first (unit vectors and long, flat averages differ in
  norm by orders of magnitude), then the eigendecomposition of the scaled
  Gram matrix gives the solution. Directions below float64's resolution of
  that matrix get no weight.

  Snapshots of one average at nearby steps, or of averages of similar
  width, are nearly collinear: exact least squares may need large
  coefficients of alternating sign, and the synthesized model, a sum of that
  many stored arrays, multiplies their rounding error by the coefficients'
  size. The ridge damps only the directions whose singular values fall
  below it, which the arrays' rounding hides anyway, so it should be about
  their relative precision: 1e-4 suits float32 averages accumulated over
  long runs, about 1e-3 bfloat16 snapshots.

  With ``sums`` (each basis row's total weight, :math:`B 1`) and ``totals``
  (each target's, :math:`w^\top 1`), the solution is constrained to
  :math:`x^\top B 1 = w^\top 1`: the fitted profile puts exactly the
  target's total weight on the iterates, so a part of the weights that never
  moves (a frozen layer, a constant offset) is reproduced, not scaled. It
  is the minimiser on that affine set, found with one Lagrange multiplier
  per target in the same eigenbasis; the residual barely changes.
  """
  norms = np.sqrt(np.maximum(np.diag(gram), 0.0))
  norms[norms == 0] = 1.0  # an all-zero row gets coefficient 0 either way
  scaled = gram / np.outer(norms, norms)
  s2, v = np.linalg.eigh(scaled)
  top = max(float(s2[-1]), 0.0)
  lam2 = (ridge ** 2) * top
  kept = s2 > top * np.finfo(np.float64).eps * 4 * len(s2)
  gain = np.where(kept, 1.0 / np.where(kept, s2 + lam2, 1.0), 0.0)
  inverse = lambda y: v @ (gain[:, None] * (v.T @ y))
  solved = inverse(rhs / norms[:, None])
  if sums is not None:
    c = (np.asarray(sums, np.float64) / norms)[:, None]
    direction = inverse(c)
    missing = np.asarray(totals, np.float64) - (c.T @ solved)[0]
    solved = solved + direction * (missing / (c.T @ direction).item())
  return solved / norms[:, None]


def fit(target: np.ndarray, basis: np.ndarray, *, ridge: float = 1e-6):
  """:func:`fit_gram` for dense profiles: ``(coefficients, residual)``.

  ``basis`` holds one profile per row, ``target`` one profile or several
  as rows; the fit keeps each target's total weight; the residual is
  ||basis.T @ x - target|| / ||target||, per target.

  Examples:
    BEMA is its EMA plus alpha_T (theta_T - theta_0), so it is synthesized
    exactly from that EMA, theta_T and theta_0 (alpha_100 = 110 ** -0.2):

    >>> import numpy as np
    >>> from optax_bema import _fit, _profiles
    >>> from optax_bema._schedule import Schedule
    >>> s = Schedule(ema_power=0.5, bias_power=0.2)
    >>> ends = np.array([100])
    >>> basis = np.stack([_profiles.dense(_profiles.ema(s, ends)),
    ...                   np.eye(101)[100], np.eye(101)[0]])
    >>> x, residual = _fit.fit(
    ...     _profiles.dense(_profiles.bema(s, ends)), basis)
    >>> np.round(x, 4).tolist(), bool(residual < 1e-6)
    ([1.0, 0.3906, -0.3906], True)
  """
  basis = np.atleast_2d(np.asarray(basis, np.float64))
  target = np.asarray(target, np.float64)
  if target.shape[-1] != basis.shape[1]:
    raise ValueError(f'fit: target has length {target.shape[-1]} but the '
                     f'basis profiles have length {basis.shape[1]}.')
  targets = np.atleast_2d(target)
  x = fit_gram(basis @ basis.T, basis @ targets.T, ridge=ridge,
               sums=basis.sum(axis=1), totals=targets.sum(axis=1)).T
  residual = (np.linalg.norm(x @ basis - targets, axis=-1)
              / np.linalg.norm(targets, axis=-1))
  return (x, residual) if target.ndim == 2 else (x[0], residual[0])


def require_ridge(ridge, caller: str):
  if (isinstance(ridge, bool) or not isinstance(ridge, (int, float))
      or not math.isfinite(ridge) or ridge < 0):
    raise ValueError(f'{caller}: ridge must be a finite number >= 0, got '
                     f'{ridge!r}.')


def basis(members: dict, ends: np.ndarray):
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
  require_ridge(ridge, 'synthesized_profile')
  ends = np.array([_checks.whole_step(s, 'synthesized_profile')
                   for s in steps], np.int64)
  if not ends.size or np.any(np.diff(ends) <= 0):
    raise ValueError(f'synthesized_profile: steps must be at least one, '
                     f'increasing; got {ends.tolist()}.')
  members = _averages.tracked(tracked, 'synthesized_profile')
  columns, sources = basis(members, ends)
  names = list(targets)
  wanted = [_targets.columns(targets[k], ends) for k in names]
  fit = solve(columns, wanted, ridge)
  out = {}
  for k, x, residual in zip(names, fit.coefficients, fit.residual):
    blocks = np.split(x, np.cumsum([b.coef.shape[0] for b in columns])[:-1])
    averages = {name: np.zeros(len(ends)) for name in members}
    params = np.zeros(len(ends))
    for (i, name), c in zip(sources, x):
      (params if name is None else averages[name])[i] = c
    out[k] = SynthesizedProfile(
        sum(_profiles.combine(b, c) for b, c in zip(columns, blocks)),
        float(residual), averages, params)
  if single:
    return out[None]
  return SynthesizedProfile(*({k: getattr(v, f) for k, v in out.items()}
                              for f in SynthesizedProfile._fields))

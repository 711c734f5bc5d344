"""The least-squares fit of a target's profile by tracked profiles.

Synthesis needs only inner products of profiles: each average's profiles at
every snapshot come in segment form (``_profiles.Columns``), so the Gram
matrix costs one pass over the T + 1 steps per pair of families, and memory
grows as 8 bytes x (families) x T, whatever the number of snapshots.
"""

from __future__ import annotations

import math

import numpy as np

from optax_bema import _profiles


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


def solve(basis, wanted, ridge):
  """Coefficients (targets x basis columns) and each target's relative
  residual, from the profiles' inner products."""
  families, coef, (column, step, weight) = _stack(basis + wanted)
  ends = basis[0].ends
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
  n = sum(b.coef.shape[0] for b in basis)
  x = fit_gram(gram[:n, :n], gram[:n, n:], ridge=ridge)
  residuals = []
  segment = np.searchsorted(ends, np.arange(families.shape[1]))
  for t in range(len(wanted)):
    d = np.concatenate([x[:, t], -np.eye(len(wanted))[t]])
    per_family = np.einsum('c,cja->ja', d, coef)
    r = np.zeros(families.shape[1])
    for a in np.flatnonzero(np.abs(per_family).sum(axis=0)):
      r += per_family[segment, a] * families[a]
    np.add.at(r, step, d[column] * weight)
    residuals.append(np.linalg.norm(r) / math.sqrt(gram[n + t, n + t]))
  return x.T, residuals


def fit_gram(gram: np.ndarray, rhs: np.ndarray, *, ridge: float
             ) -> np.ndarray:
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
  """
  norms = np.sqrt(np.maximum(np.diag(gram), 0.0))
  norms[norms == 0] = 1.0  # an all-zero row gets coefficient 0 either way
  scaled = gram / np.outer(norms, norms)
  s2, v = np.linalg.eigh(scaled)
  top = max(float(s2[-1]), 0.0)
  lam2 = (ridge ** 2) * top
  kept = s2 > top * np.finfo(np.float64).eps * 4 * len(s2)
  gain = np.where(kept, 1.0 / np.where(kept, s2 + lam2, 1.0), 0.0)
  solved = v @ (gain[:, None] * (v.T @ (rhs / norms[:, None])))
  return solved / norms[:, None]


def fit(target: np.ndarray, basis: np.ndarray, *, ridge: float = 1e-6):
  """:func:`fit_gram` for dense profiles: ``(coefficients, residual)``.

  ``basis`` holds one profile per row, ``target`` one profile or several
  as rows; the residual is ||basis.T @ x - target|| / ||target||, per
  target.

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
  x = fit_gram(basis @ basis.T, basis @ targets.T, ridge=ridge).T
  residual = (np.linalg.norm(x @ basis - targets, axis=-1)
              / np.linalg.norm(targets, axis=-1))
  return (x, residual) if target.ndim == 2 else (x[0], residual[0])

r"""Profiles: every stabilizer's model as fixed weights on the iterates.

After step T each stabilizer returns a fixed linear combination of the
iterates theta_0, ..., theta_T,

.. math::
  \hat\theta_T = \sum_{s=0}^{T} w_s \theta_s,

whose weight vector w, the *profile*, depends only on the schedule and T,
never on the iterates. Replay recovers a model exactly from the iterates it
reads; synthesis matches a target's profile with the profiles of averages
tracked during training (the post-hoc EMA of Karras et al. 2024).

With update steps :math:`u_1 < \dots < u_K \le T`, weights
:math:`\beta_k`, :math:`P_k = \prod_{j > k} (1 - \beta_j)`, a the last
burn-in step (0 without one) and :math:`e_s` the unit vector on theta_s,
unrolling each recursion of the BEMA paper (Algorithm 1, Appendix C) gives

* EMA: :math:`w = P_0 e_a + \sum_k \beta_k P_k e_{u_k}`;
* BEMA: the EMA's w plus :math:`\alpha_K (e_{u_K} - e_a)`;
* DEMA: :math:`w = P_0 (1 - S_0) e_a + \sum_k \beta_k P_k (2 - \beta_k -
  S_k) e_{u_k}`, :math:`S_k = \sum_{j > k} \beta_j` (the sensitivities of
  the model to the two averages after update k are :math:`P_k (2 - S_k)`
  and :math:`-P_k`);
* OUEMA, the EMA of :math:`x_k = (\theta_{u_k} - p_k \theta_a) / (1 - p_k)`:
  :math:`w = (P_0 - \sum_k \beta_k P_k p_k / (1 - p_k)) e_a + \sum_k
  \beta_k P_k / (1 - p_k) e_{u_k}`.

Every profile sums to 1; for T <= update_after it is :math:`e_T`.

The profiles of one average at many steps (every saved snapshot of a long
run) are never materialised as dense vectors: they share their shape. The
steps are cut into segments at the snapshot steps, and on each segment every
snapshot's profile is a multiple of one or two *family* vectors (the
products :math:`P_k` factor at the segment's end). :class:`Columns` holds
that form: O(T) memory per average, whatever the number of snapshots, and
inner products in O(T) per pair of families (``_synthesis``).

Pure NumPy in float64: the exact weights are the point.

References:
  Block and Zhang, `EMA Without the Lag: Bias-Corrected Iterate Averaging
  Schemes <https://arxiv.org/abs/2508.00180>`_, 2025.

  Karras et al., `Analyzing and Improving the Training Dynamics of Diffusion
  Models <https://arxiv.org/abs/2312.02696>`_, 2024 (EDM2; post-hoc EMA).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from optax_bema._schedule import Schedule


class Columns(NamedTuple):
  """Profiles of one average at the steps ``ends`` (increasing, T the last).

  Segment j holds the steps (ends[j-1], ends[j]] (segment 0 starts at step
  0). On segment j the profile at ends[i] is ``coef[i, j] @ families``
  restricted to that segment (zero for j > i), plus the weights ``points``
  puts on single steps.

  Attributes:
    ends: the steps, int64, shape (n,).
    families: float64, shape (A, T + 1).
    coef: float64, shape (n, n, A).
    points: (column, step, weight) arrays of equal length.
  """
  ends: np.ndarray
  families: np.ndarray
  coef: np.ndarray
  points: tuple[np.ndarray, np.ndarray, np.ndarray]


def _decays(keep: np.ndarray):
  """``decay(a, b)``: the product of keep over update indices (a, b].

  Logs are summed, factor by factor; a factor of exactly 0 (a weight
  beta = 1, which forgets everything before it) is counted apart, so the
  products it ends come out as exact zeros rather than 0/0.
  """
  zero = keep <= 0
  logs = np.concatenate([[0.0], np.cumsum(
      np.log(np.where(zero, 1.0, keep)))])
  zeros = np.concatenate([[0], np.cumsum(zero)])

  def decay(a, b):
    # A product of factors <= 1 for a <= b; pairs a > b (asked for in bulk,
    # then discarded) must not overflow.
    return np.where(zeros[b] == zeros[a],
                    np.exp(np.minimum(logs[b] - logs[a], 0.0)), 0.0)
  return decay


class _Ema(NamedTuple):
  """What every EMA-like profile shares at the steps ``ends``."""
  steps: np.ndarray    # update steps u_1..u_K <= T
  beta: np.ndarray     # their weights
  counts: np.ndarray   # K_i: updates up to ends[i]
  segment: np.ndarray  # the segment of each update
  tail: np.ndarray     # h_k: prod of (1 - beta) over (k, K_segment]
  carry: np.ndarray    # (n, n): prod of (1 - beta) over (K_j, K_i], j <= i
  before: np.ndarray   # P_0 at each end: prod over all updates
  anchors: np.ndarray  # the anchor step at each end


def _ema_like(schedule: Schedule, ends: np.ndarray) -> _Ema:
  steps = schedule.update_steps(int(ends[-1]))
  beta = schedule.beta(steps) if steps.size else np.zeros(0)
  decay = _decays(1.0 - beta)
  counts = np.searchsorted(steps, ends, side='right')
  segment = np.searchsorted(counts, np.arange(1, steps.size + 1))
  tail = decay(np.arange(1, steps.size + 1), counts[segment])
  carry = np.tril(decay(counts[None, :], counts[:, None]))
  anchors = np.array([schedule.anchor(int(e)) for e in ends], np.int64)
  return _Ema(steps, beta, counts, segment, tail, carry,
              decay(0, counts), anchors)


def _family(num_steps: int, steps: np.ndarray, values: np.ndarray):
  vector = np.zeros(num_steps + 1)
  vector[steps] = values
  return vector


def _columns(ends, families, coef, points) -> Columns:
  """``points`` as a list of (column, step, weight)."""
  column, step, weight = (np.array([p[k] for p in points], dtype)
                          for k, dtype in enumerate(
                              (np.int64, np.int64, np.float64)))
  return Columns(ends, np.stack(families), coef, (column, step, weight))


def _anchor_points(e: _Ema, weights) -> list:
  return [(i, e.anchors[i], weights[i]) for i in range(len(e.anchors))]


def ema(schedule: Schedule, ends: np.ndarray) -> Columns:
  """EMA (and the power-function EMA): beta_k P_k on each update step."""
  e = _ema_like(schedule, ends)
  family = _family(int(ends[-1]), e.steps, e.beta * e.tail)
  return _columns(ends, [family], e.carry[..., None],
                  _anchor_points(e, e.before))


def bema(schedule: Schedule, ends: np.ndarray) -> Columns:
  """EMA plus alpha_K (e_{u_K} - e_a), K the last update."""
  e = _ema_like(schedule, ends)
  family = _family(int(ends[-1]), e.steps, e.beta * e.tail)
  points = _anchor_points(e, e.before)
  for i, count in enumerate(e.counts):
    if count:
      alpha = float(schedule.alpha(e.steps[count - 1]))
      points += [(i, e.steps[count - 1], alpha), (i, e.anchors[i], -alpha)]
  return _columns(ends, [family], e.carry[..., None], points)


def dema(schedule: Schedule, ends: np.ndarray) -> Columns:
  """2 e1 - e2: two families per segment (see the module docstring)."""
  e = _ema_like(schedule, ends)
  total = np.concatenate([[0.0], np.cumsum(e.beta)])  # S at each count
  k = np.arange(1, e.steps.size + 1)
  at_end = total[e.counts[e.segment]]
  num_steps = int(ends[-1])
  families = [
      _family(num_steps, e.steps,
              e.beta * e.tail * (2 - e.beta + total[k] - at_end)),
      _family(num_steps, e.steps, e.beta * e.tail)]
  later = total[e.counts][:, None] - total[e.counts][None, :]
  coef = np.stack([e.carry, -e.carry * later], axis=-1)
  return _columns(ends, families, coef,
                  _anchor_points(e, e.before * (1 - total[e.counts])))


def ouema(schedule: Schedule, ends: np.ndarray) -> Columns:
  """The EMA of x_k = (theta_{u_k} - p_k theta_a) / (1 - p_k)."""
  e = _ema_like(schedule, ends)
  p = schedule.ou_weight(e.steps) if e.steps.size else np.zeros(0)
  family = e.beta * e.tail / (1 - p)
  # Per segment, the family's weight times p_k: what theta_a loses.
  lost = np.bincount(e.segment, family * p, minlength=len(ends))
  anchor = e.before - e.carry @ lost
  return _columns(ends, [_family(int(ends[-1]), e.steps, family)],
                  e.carry[..., None], _anchor_points(e, anchor))


def initial(schedule: Schedule, ends: np.ndarray) -> Columns:
  """theta_0 alone: the iterate at the last burn-in step."""
  n = len(ends)
  return _columns(ends, [np.zeros(int(ends[-1]) + 1)], np.zeros((n, n, 1)),
                  [(i, schedule.anchor(int(e)), 1.0)
                   for i, e in enumerate(ends)])


def dense(columns: Columns, i: int = -1) -> np.ndarray:
  """The profile at ``ends[i]`` as a vector of T + 1 weights."""
  i = i % len(columns.ends)
  unit = np.eye(len(columns.ends))[i]
  return combine(columns, unit)[:int(columns.ends[i]) + 1]


def combine(columns: Columns, x: np.ndarray) -> np.ndarray:
  """``sum_i x[i]`` (the profile at ``ends[i]``), as T + 1 weights: the
  coefficients are summed per segment first, so it costs one pass over the
  steps per family, whatever the number of columns."""
  num_steps = columns.families.shape[1] - 1
  segment = np.searchsorted(columns.ends, np.arange(num_steps + 1))
  per_segment = np.einsum('i,ija->ja', x, columns.coef)
  w = np.einsum('sa,as->s', per_segment[segment], columns.families)
  column, step, weight = columns.points
  np.add.at(w, step, x[column] * weight)
  return w


def select(columns: Columns, keep) -> Columns:
  """The columns ``keep`` of ``columns``."""
  keep = list(keep)
  column, step, weight = columns.points
  mask = np.isin(column, keep)
  renumber = {old: new for new, old in enumerate(keep)}
  return columns._replace(
      coef=columns.coef[keep],
      points=(np.array([renumber[c] for c in column[mask]], np.int64),
              step[mask], weight[mask]))


def units(ends) -> Columns:
  """theta_s at each snapshot step: unit vectors, points alone."""
  n = len(ends)
  return Columns(ends, np.zeros((0, int(ends[-1]) + 1)),
                           np.zeros((n, n, 0)),
                           (np.arange(n), ends.copy(), np.ones(n)))

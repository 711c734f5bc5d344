"""Checkpoint merging against a decayed rate, on the noisy quadratic.

SGD at a constant rate eta, its checkpoints saved over the last 20% of the
run and merged with ``optax_bema.decay_profile`` weights (through
``optax_bema.replay``), against SGD whose rate decays over those same steps
with the same shape w, on the same noise: eta_t = eta w((t - s_0) / (T -
s_0)) for the update at step t >= s_0 (WSM, arXiv 2507.17634). With a
constant rate the merge applies update t with the multiplier the decayed
run uses, held between checkpoints; the updates differ, because the
decayed run computes them at other params.

Both expected errors E||estimate - mu||^2 have exact discrete closed forms
(per eigenvalue a of A, with r = 1 - eta a, x = theta - mu):

* merge: the constant run's x_{s_i} = r^{s_i} x_0 + noise, so
  E[merge] = (sum_i c_i r^{s_i}) x_0 and
  Var = (sum_i c_i r^{s_i - s_0})^2 v_{s_0}
        + eta^2 sigma^2 sum_{s_0 <= t < T} (sum_{i: s_i > t} c_i
          r^{s_i - 1 - t})^2,
  v_{s_0} = eta^2 sigma^2 (1 - r^{2 s_0}) / (1 - r^2);
* decayed: m_{t+1} = (1 - eta_t a) m_t and
  v_{t+1} = (1 - eta_t a)^2 v_t + eta_t^2 sigma^2 from the constant run's
  mean and variance at s_0.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

import optax_bema

SHAPES = ('linear', 'cosine', '1-sqrt')
FRACTION = 0.2      # the window: the last 20% of the run, as wsd decays in
CHECKPOINTS = 20    # save intervals over the window


def window(steps: int) -> list[int]:
  """The saved steps s_0 < ... < s_k = T: every (window / CHECKPOINTS)
  steps back from the last, the window's start included."""
  length = round(FRACTION * steps)
  every = max(1, length // CHECKPOINTS)
  return list(range(steps, steps - length - 1, -every))[::-1]


# The decayed runs' shapes w(u) on the window's progress u in [0, 1],
# written here from their definitions (WSM, arXiv 2507.17634; 1-sqrt:
# Hagele et al. 2024), not read from the library: the decayed run is the
# reference the merges are held to.
DECAYS = {
    'linear': lambda u: 1.0 - u,
    'cosine': lambda u: (1.0 + math.cos(math.pi * u)) / 2.0,
    '1-sqrt': lambda u: 1.0 - math.sqrt(u),
}


def rates(eta: float, shape: str, steps: int) -> np.ndarray:
  """The decayed run's rate for the update at each step t = 0..T-1."""
  saved = window(steps)
  start, length = saved[0], steps - saved[0]
  decay = DECAYS[shape]
  return np.array([eta if t < start else eta * decay((t - start) / length)
                   for t in range(steps)])


def simulate(eigs, eta, sigma, start_offset, steps, seeds, rng) -> dict:
  """Per seed ||estimate - mu||^2: the constant run's last iterate, each
  shape's merge of its checkpoints, and each shape's decayed run, all on
  one noise sequence (float64; the merge in float32 through replay)."""
  eigs = np.asarray(eigs, np.float64)
  schedules = np.stack([np.full(steps, eta)]
                       + [rates(eta, shape, steps) for shape in SHAPES])
  x = np.full((len(schedules), seeds, eigs.size), start_offset)  # theta - mu
  saved = window(steps)
  checkpoints = [(0, jnp.asarray(x[0], jnp.float32))]
  for t in range(steps):
    noise = rng.normal(size=(seeds, eigs.size))
    x = x - schedules[:, t, None, None] * (eigs * x + sigma * noise)
    if t + 1 in saved:
      checkpoints.append((t + 1, jnp.asarray(x[0], jnp.float32)))
  merges = optax_bema.replay(
      {shape: optax_bema.decay_profile(saved, steps, shape)
       for shape in SHAPES}, checkpoints)
  out = {'last_iterate': np.sum(x[0] ** 2, -1)}
  for i, shape in enumerate(SHAPES):
    out[f'merge/{shape}'] = np.sum(
        np.asarray(merges[shape], np.float64) ** 2, -1)
    out[f'decayed/{shape}'] = np.sum(x[i + 1] ** 2, -1)
  return out


def merge_theory(eigs, eta, sigma, start_offset, shape, steps) -> float:
  saved = window(steps)
  weights = optax_bema.decay_profile(saved, steps, shape)[saved]
  r = 1.0 - eta * np.asarray(eigs, np.float64)[:, None]
  s = np.array(saved)
  start = s[0]
  mean = (weights * r ** s).sum(-1) * start_offset
  v_start = eta ** 2 * sigma ** 2 * (1 - r[:, 0] ** (2 * start)) / (
      1 - r[:, 0] ** 2)
  kernel = np.stack([(np.where(s > t, weights, 0.0)
                      * r ** np.maximum(s - 1 - t, 0)).sum(-1)
                     for t in range(start, steps)])
  variance = ((weights * r ** (s - start)).sum(-1) ** 2 * v_start
              + eta ** 2 * sigma ** 2 * (kernel ** 2).sum(0))
  return float(np.sum(mean ** 2 + variance))


def decayed_theory(eigs, eta, sigma, start_offset, shape, steps) -> float:
  eigs = np.asarray(eigs, np.float64)
  mean, variance = np.full(eigs.size, start_offset), np.zeros(eigs.size)
  for rate in rates(eta, shape, steps):
    mean = (1 - rate * eigs) * mean
    variance = (1 - rate * eigs) ** 2 * variance + rate ** 2 * sigma ** 2
  return float(np.sum(mean ** 2 + variance))


def theory(eigs, eta, sigma, start_offset, steps) -> dict:
  """``{'merge/<shape>' or 'decayed/<shape>': expected error}``."""
  out = {}
  for shape in SHAPES:
    args = (eigs, eta, sigma, start_offset, shape, steps)
    out[f'merge/{shape}'] = merge_theory(*args)
    out[f'decayed/{shape}'] = decayed_theory(*args)
  return out


def table(rows: dict, steps: int) -> str:
  """Per problem and shape: merged vs decayed vs the last iterate."""
  saved = window(steps)
  lines = [f'checkpoint merging over steps {saved[0]}..{steps} (checkpoints '
           f'every {saved[1] - saved[0]}) vs SGD decayed over them, the same '
           'noise: E||. - mu||^2 measured (theory)',
           f'{"problem":16s} {"shape":8s} {"merged":>18s} {"decayed":>18s} '
           f'{"merged/decayed":>14s} {"last iterate":>12s}']
  for problem, row in rows.items():
    for shape in SHAPES:
      merged, decayed = row[f'merge/{shape}'], row[f'decayed/{shape}']
      lines.append(
          f'{problem:16s} {shape:8s} '
          f'{merged["measured"]:8.4g} ({merged["theory"]:7.4g}) '
          f'{decayed["measured"]:8.4g} ({decayed["theory"]:7.4g}) '
          f'{merged["measured"] / decayed["measured"]:14.3f} '
          f'{row["last_iterate"]:12.4g}')
  return '\n'.join(lines)


def panel(ax, rows: dict):
  """Merged (solid) and decayed (hatched) per shape and problem, the last
  iterate as a line per problem."""
  for p, (problem, row) in enumerate(rows.items()):
    for i, shape in enumerate(SHAPES):
      x = p * (len(SHAPES) + 1) + i
      ax.bar(x - 0.2, row[f'merge/{shape}']['measured'], 0.4, color=f'C{i}',
             label=f'merge, {shape}' if p == 0 else None)
      ax.bar(x + 0.2, row[f'decayed/{shape}']['measured'], 0.4,
             color=f'C{i}', alpha=0.4, hatch='//',
             label=f'decayed, {shape}' if p == 0 else None)
    left = p * (len(SHAPES) + 1) - 0.5
    ax.hlines(row['last_iterate'], left, left + len(SHAPES), colors='k',
              linestyles='--', label='last iterate (constant rate)'
              if p == 0 else None)
  ax.set_xticks([p * (len(SHAPES) + 1) + 1 for p in range(len(rows))],
                list(rows))
  ax.set_yscale('log')
  ax.set_ylabel('E||estimate - mu||^2 at the last step')
  ax.set_title('constant-rate SGD merged over its last 20% vs decayed over '
               'it')
  ax.grid(alpha=0.3, axis='y')
  ax.legend(fontsize=7)

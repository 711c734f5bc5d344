"""What :func:`~optax_bema.choose` returns: one row per candidate, and the
choice with its table, printed sorted and drawn (matplotlib optional)."""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional

# Flags that keep a row from being chosen.
REFUSED = ('never updated', 'unsupported', 'not finite')


class Row(NamedTuple):
  """One candidate of :class:`Choice`'s table.

  Attributes:
    name: the candidate's name (``'ema 0.5'``, ``'last iterate'``, ...).
    family: ``'ema'``, ``'bema'``, ``'dema'``, ``'ouema'``, ``'power_ema'``,
      ``'mean'`` (of the last iterates over a window), ``'cosine'`` and
      ``'1-sqrt'`` (merges shaped as a decay over a window), ``'tracked'``,
      ``'last iterate'``, or the kind of a candidate passed in.
    setting: the family's knob: ``ema_power``, ``std``, the window in steps
      (None for the rest).
    length: the average's length in steps: sqrt(12) times the standard
      deviation of its weights' positions (a mean over W steps has W).
    score: the score chosen by (NaN where the row was not scored).
    scores: every metric, for a score that returns a dict; else None.
    residual: the fit's relative residual (0 for the exact rows).
    error: the estimated model error relative to ||model - last iterate||
      (0 for the exact rows).
    flags: why the row cannot be chosen (``'never updated'``,
      ``'unsupported'``, ``'not finite'``), or ``'exact'`` for the rows read
      off the snapshots without synthesis.
  """
  name: str
  family: str
  setting: Optional[float]
  length: float
  score: float
  scores: Optional[dict]
  residual: float
  error: float
  flags: tuple


class Choice(NamedTuple):
  """What :func:`choose` returns.

  Attributes:
    model: the chosen model, with the params' structure, dtypes and
      shardings; its score is ``score``.
    name: the chosen row's name.
    target: what reproduces it: a stabilizer or a profile for
      :func:`~optax_bema.replay` and :func:`~optax_bema.synthesize`.
    score: its score.
    table: one row per candidate, in the order scored, a named tuple of
      its name, family, setting (``ema_power``, ``std`` or a window in
      steps), length in steps, score, scores (every metric, for a score
      returning a dict), the fit's residual, the estimated model error and
      its flags (``'never updated'``, ``'unsupported'`` and ``'not
      finite'`` keep it from being chosen; ``'exact'`` marks the rows read
      off the snapshots without synthesis).
    note: why the choice was restricted, or ``''``.
    maximize: whether higher scores were better (``str`` lists the best
      first either way).
  """
  model: Any
  name: str
  target: Any
  score: float
  table: list
  note: str = ''
  maximize: bool = False

  def __str__(self):
    rows = sorted(self.table, key=lambda r: _order(r, self.maximize))
    lines = [f'{"":2}{"name":<26}{"family":<13}{"length":>9}{"score":>12}'
             f'{"residual":>10}{"error":>9}  flags']
    for r in rows:
      mark = '* ' if r.name == self.name else '  '
      lines.append(
          f'{mark}{r.name:<26}{r.family:<13}{r.length:>9.4g}'
          f'{r.score:>12.6g}{r.residual:>10.2g}{r.error:>9.2g}  '
          f'{", ".join(r.flags)}')
    return '\n'.join(lines + ([self.note] if self.note else []))

  def plot(self, path):
    """Score against length per family, the choice and the last iterate
    marked; saved to ``path`` (needs matplotlib)."""
    try:
      import matplotlib  # pylint: disable=g-import-not-at-top
      matplotlib.use('Agg')
      import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError('Choice.plot draws with matplotlib: pip install '
                        'matplotlib') from e
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for family in dict.fromkeys(r.family for r in self.table):
      rows = sorted((r for r in self.table if r.family == family
                     and math.isfinite(r.score) and r.length > 0),
                    key=lambda r: r.length)
      if not rows or family == 'last iterate':
        continue
      ok = [r for r in rows if not set(r.flags) & set(REFUSED)]
      line, = ax.plot([r.length for r in ok], [r.score for r in ok], 'o-',
                      label=family, ms=3)
      bad = [r for r in rows if set(r.flags) & set(REFUSED)]
      ax.plot([r.length for r in bad], [r.score for r in bad], 'x',
              color=line.get_color())
    last = [r for r in self.table if r.family == 'last iterate']
    if last:
      ax.axhline(last[0].score, color='gray', ls='--', label='last iterate')
    best = next(r for r in self.table if r.name == self.name)
    if best.length > 0:
      ax.plot([best.length], [best.score], '*', ms=14, color='k',
              label=f'chosen: {best.name}')
    ax.set_xscale('log')
    ax.set_xlabel('length of the average (steps)')
    ax.set_ylabel('score')
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _order(r: Row, maximize: bool):
  """Choosable rows first, best first; then refused and unscored ones."""
  refused = bool(set(r.flags) & set(REFUSED))
  return (refused, not math.isfinite(r.score),
          -r.score if maximize else r.score)

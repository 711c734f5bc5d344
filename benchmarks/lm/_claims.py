"""The papers' claims, each decided by a rule written here, never by hand.

Every comparison is paired: on seed s both methods saw the same batches in
the same order, so the per-seed difference d_s = a_s - b_s removes most of
the noise the two losses share. Its mean and sample standard deviation
(over the seeds) decide the verdict:

* ``reproduced``: the mean has the claimed sign and lies beyond one standard
  deviation of zero, every seed agrees, and there are at least two seeds;
* ``partly``: the mean has the claimed sign, but not beyond one standard
  deviation, or not on every seed, or with a single seed;
* ``not reproduced``: the mean has the other sign, or is zero;
* ``untested``: this run cannot test the claim (say, one learning rate for
  a claim about how a margin moves with the rate); never "not reproduced".

"Competitive with" is ``reproduced`` when the method is not worse beyond
one standard deviation (mean <= sd, two seeds or more), ``partly`` when it
is worse by at most ``COMPETITIVE_TOLERANCE`` beyond that, and ``not
reproduced`` otherwise.

A claim made of several comparisons is ``reproduced`` when every part is,
``not reproduced`` when every part is, and ``partly`` otherwise. Where a
claim needs a rival's "best schedule", the method must beat every schedule
the rival ran (the part's verdict is the worst of them), so no schedule is
picked on held-out data.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np

VERDICTS = ('reproduced', 'partly', 'not reproduced', 'untested')
# "Competitive": worse than the rival by at most this (nats/byte), beyond
# the spread, is still ``partly``; fixed before any result was seen.
COMPETITIVE_TOLERANCE = 0.01
BEMA_PAPER = 'Block & Zhang 2025, "EMA Without the Lag" (BEMA)'
PACE_PAPER = 'Au & Block 2026, "Training for the Model You Return" (PACE)'
ADEMAMIX_REPORT = 'Adaptive AdEMAMix report (26 Oct 2025)'
WSM_PAPER = ('Tian et al. 2025, "WSM: Decay-Free Learning Rate Schedule via '
             'Checkpoint Merging for LLM Pre-training" (arXiv 2507.17634)')
PMA_PAPER = ('Li et al. 2025, "Model Merging in Pre-training of Large '
             'Language Models" (PMA, arXiv 2505.12082)')


def steps_to_target(curve: Sequence, target: float) -> Optional[int]:
  """The first evaluated step whose loss is at or below ``target``."""
  return next((int(s) for s, v in curve if v <= target), None)


def censored(steps: Sequence[Optional[int]], never: int) -> np.ndarray:
  """Steps to target, ``never`` standing in for a target not reached."""
  return np.array([never if s is None else s for s in steps], np.float64)


def spread(diffs) -> tuple[float, float]:
  """Mean and sample standard deviation (0 for a single value)."""
  diffs = np.asarray(diffs, np.float64)
  sd = float(diffs.std(ddof=1)) if diffs.size > 1 else 0.0
  return float(diffs.mean()), sd


def sign_verdict(diffs, sign: int) -> str:
  """``sign`` -1 claims ``a < b`` (d negative), +1 claims ``a > b``."""
  diffs = sign * np.asarray(diffs, np.float64)
  mean, sd = spread(diffs)
  if mean <= 0:
    return 'not reproduced'
  if diffs.size > 1 and mean > sd and (diffs > 0).all():
    return 'reproduced'
  return 'partly'


def competitive_verdict(diffs) -> str:
  """Claims ``a`` is competitive with ``b``: d = a - b is not above zero
  beyond one standard deviation (``partly`` within the tolerance)."""
  mean, sd = spread(diffs)
  if mean <= sd and np.size(diffs) > 1:
    return 'reproduced'
  return 'partly' if mean - sd <= COMPETITIVE_TOLERANCE else 'not reproduced'


def combine(verdicts: Sequence[str]) -> str:
  if all(v == 'reproduced' for v in verdicts):
    return 'reproduced'
  if all(v == 'not reproduced' for v in verdicts):
    return 'not reproduced'
  return 'partly'


def describe(label: str, diffs, unit: str = '') -> str:
  mean, sd = spread(diffs)
  fmt = '{:+.0f}' if unit == ' steps' else '{:+.4f}'
  return (f'{label} = {fmt.format(mean)} +- {fmt.format(sd)[1:]}{unit} '
          f'(per seed {", ".join(fmt.format(d) for d in diffs)})')


class Evidence:
  """Paired per-seed numbers of one study, by learning rate and method.

  ``finals[lr][name]`` and ``steps[lr][name]`` are per-seed lists: the
  returned model's final loss and its steps to the target (None: never).
  """

  def __init__(self, finals: Mapping, steps: Mapping, base_lr: float,
               never: int):
    self.finals, self.steps = finals, steps
    self.base_lr, self.never = base_lr, never
    self.lrs = sorted(finals)

  def has(self, *names, lr=None) -> bool:
    return all(n in self.finals[lr or self.base_lr] for n in names)

  def loss_diff(self, a, b, lr=None):
    lr = lr or self.base_lr
    return np.subtract(self.finals[lr][a], self.finals[lr][b])

  def steps_diff(self, a, b, lr=None):
    lr = lr or self.base_lr
    return (censored(self.steps[lr][a], self.never)
            - censored(self.steps[lr][b], self.never))


def _claim(claim, source, parts) -> dict:
  """``parts``: (measured text, verdict) for each comparison."""
  return dict(claim=claim, source=source,
              measured='; '.join(text for text, _ in parts),
              verdict=combine([v for _, v in parts]))


def _versus(ev: Evidence, a, b, sign, lr=None, prefix=''):
  d = ev.loss_diff(a, b, lr)
  return describe(f'{prefix}{a} - {b}', d), sign_verdict(d, sign)


def pace_margins(finals: Mapping, baselines, pace: str = 'pace') -> dict:
  """Per lr and seed: the strongest baseline's loss minus ``pace``'s (> 0:
  PACE ahead of every baseline); ``finals[lr][name]`` per-seed losses."""
  return {lr: np.min([np.subtract(ms[b], ms[pace]) for b in baselines], 0)
          for lr, ms in finals.items()}


def claims(ev: Evidence, baselines: Sequence[str],
           paces: Sequence[tuple[str, str]] = (('pace', ''),)) -> list[dict]:
  """The claims this study can test, each with its measured numbers.

  PACE's three claims are judged for each ``(method, label)`` of ``paces``
  in turn, the first deciding them, the rest as rows of their own; the
  label (which PACE) heads each ``measured``.
  """
  seeds = len(ev.finals[ev.base_lr]['adamw'])
  at = f' (lr {ev.base_lr:g}, {seeds} seeds, paired)'
  out = []
  if ev.has('ema', 'bema', 'ouema'):
    out.append(_claim('BEMA returns a better model than EMA at the same '
                      'settings' + at, BEMA_PAPER,
                      [_versus(ev, 'bema', 'ema', -1)]))
    d = ev.steps_diff('bema', 'ema')
    out.append(_claim(
        "BEMA reaches the target (AdamW's final loss) in fewer steps than "
        f'EMA; never reaching it counts as {ev.never}' + at, BEMA_PAPER,
        [(describe('steps(bema) - steps(ema)', d, ' steps'),
          sign_verdict(d, -1))]))
    out.append(_claim('OUEMA beats EMA, and BEMA beats OUEMA' + at,
                      BEMA_PAPER, [_versus(ev, 'ouema', 'ema', -1),
                                   _versus(ev, 'bema', 'ouema', -1)]))
  for pace, label in paces:
    out.extend(_pace_claims(ev, baselines, pace, label))
  out.extend(_merge_claims(ev, at))
  if ev.has('adaptive_ademamix', 'adamw', 'ademamix'):
    out.append(_claim(
        'Adaptive AdEMAMix lands behind AdamW and ahead of plain AdEMAMix'
        + at, ADEMAMIX_REPORT,
        [_versus(ev, 'adaptive_ademamix', 'adamw', +1),
         _versus(ev, 'adaptive_ademamix', 'ademamix', -1)]))
  return out


def _merge_claims(ev: Evidence, at: str) -> list:
  """WSM's and PMA's claims on the merges of the constant-rate run's
  checkpoints over wsd's decay window (``merge/<shape>``, ``merge/mean``),
  at every rate that ran them (each rate a part of the claim)."""
  def parts(a, b, verdict):
    lrs = [lr for lr in ev.lrs if ev.has(a, b, lr=lr)]
    if lrs == [ev.base_lr]:   # one rate: named in the claim, as elsewhere
      d = ev.loss_diff(a, b)
      return at, [(describe(f'{a} - {b}', d), verdict(d))]
    seeds = len(ev.finals[ev.base_lr]['adamw'])
    return f' (at each rate, {seeds} seeds, paired)', [
        (describe(f'lr {lr:g}: {a} - {b}', ev.loss_diff(a, b, lr)),
         verdict(ev.loss_diff(a, b, lr))) for lr in lrs]

  out = []
  if ev.has('merge/linear', 'adamw/wsd'):
    where, measured = parts('merge/linear', 'adamw/wsd', competitive_verdict)
    out.append(_claim(
        "Merging a constant-rate run's checkpoints over the window wsd "
        'decays in, with the weights of its linear decay, matches or beats '
        'decaying the rate (wsd) at the same final step (not worse beyond '
        f'one sd; within {COMPETITIVE_TOLERANCE} nats/byte: partly)' + where,
        WSM_PAPER, measured))
  if ev.has('merge/mean', 'ema'):
    where, measured = parts('merge/mean', 'ema',
                            lambda d: sign_verdict(d, -1))
    out.append(_claim(
        'The plain mean of the last checkpoints beats the EMA of the same '
        'constant-rate run' + where, PMA_PAPER, measured))
  return out


def _pace_claims(ev: Evidence, baselines, pace: str, label: str) -> list:
  """PACE's three claims for the method ``pace``; ``label`` says which."""
  out = []
  if ev.has(pace, *baselines):
    parts = []
    for lr in ev.lrs:
      for family in dict.fromkeys(b.split('/')[0] for b in baselines):
        # Against the family's best schedule: every schedule must be beaten,
        # so the worst verdict counts and the binding comparison is shown.
        rivals = [b for b in baselines if b.split('/')[0] == family]
        worst = max(rivals,
                    key=lambda b, lr=lr: ev.loss_diff(pace, b, lr).mean())
        parts.append((describe(f'lr {lr:g}: {pace} - {worst} (best {family})',
                               ev.loss_diff(pace, worst, lr)),
                      max((sign_verdict(ev.loss_diff(pace, b, lr), -1)
                           for b in rivals), key=VERDICTS.index)))
    out.append(_claim(
        'PACE at a constant rate beats AdamW and EMA with their best '
        f'schedule (each of {", ".join(baselines)})', PACE_PAPER, parts))
    margins = pace_margins(ev.finals, baselines, pace)
    if len(ev.lrs) < 2:
      out.append(dict(
          claim="PACE's margin over the best-scheduled baselines grows "
                'with the learning rate', source=PACE_PAPER,
          measured='untested: this run has one learning rate; the full '
                   'study sweeps three', verdict='untested'))
    else:
      growth = margins[ev.lrs[-1]] - margins[ev.lrs[0]]
      means = [margins[lr].mean() for lr in ev.lrs]
      verdict = sign_verdict(growth, +1)
      if verdict == 'reproduced' and np.any(np.diff(means) < 0):
        verdict = 'partly'  # it must grow at every step of the sweep
      out.append(_claim(
          "PACE's margin over the best-scheduled baselines grows with the "
          'learning rate (margin = strongest baseline - PACE, per seed; '
          'must rise at every rate)', PACE_PAPER,
          [('margins ' + ', '.join(f'lr {lr:g}: {m:+.4f}' for lr, m in
                                   zip(ev.lrs, means)) + '; '
            + describe(f'margin({ev.lrs[-1]:g}) - margin({ev.lrs[0]:g})',
                       growth), verdict)]))
  if ev.has(pace, 'schedule_free'):
    parts = []
    for lr in ev.lrs:
      d = ev.loss_diff(pace, 'schedule_free', lr)
      parts.append((describe(f'lr {lr:g}: {pace} - schedule_free', d),
                    competitive_verdict(d)))
    out.append(_claim(
        'PACE is competitive with Schedule-Free AdamW (not worse beyond one '
        f'sd; within {COMPETITIVE_TOLERANCE} nats/byte: partly)',
        PACE_PAPER, parts))
  if label:
    for c in out:
      c['measured'] = f'[{label}] ' + c['measured']
  return out


def table(claims_list: Sequence[Mapping]) -> str:
  lines = []
  for i, c in enumerate(claims_list, 1):
    lines.append(f'({i}) [{c["verdict"]}] {c["claim"]}\n'
                 f'    source: {c["source"]}\n    measured: {c["measured"]}')
  return '\n'.join(lines)

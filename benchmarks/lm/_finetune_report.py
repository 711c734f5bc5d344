"""The fine-tuning study's tables and its figure, from its results.

The figure answers one question per panel: which returned model is best at
a constant rate; how update_freq and the pullback matter; what the decay
schedules and Schedule-Free give; how it all moves with the learning rate
(PACE's margin marked); and who reaches AdamW's final loss first.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np

import _claims
import _common

_YLABEL = 'held-out loss of returned model (nats/byte)'
_ACCELERATION = ('adamw', 'ema', 'bema', 'ouema', 'dema', 'pace',
                 'schedule_free')


def _pm(values, digits=4) -> str:
  """``mean +- sd`` over seeds (sample sd; nothing with one seed)."""
  mean, sd = _claims.spread(values)
  return f'{mean:.{digits}f}' + (f' +-{sd:.{digits}f}' if len(values) > 1
                                 else '')


def _steps(per_seed) -> str:
  return '/'.join('-' if s is None else str(s) for s in per_seed)


def table(methods: Mapping, never: int, baseline: str = 'adamw') -> str:
  """Final losses, best first. The difference to AdamW is paired by seed
  (the same batches), so its spread is much smaller than the losses'.
  "to target": per seed, the first evaluated step at AdamW's final loss
  (- never)."""
  base = np.array(methods[baseline]['final_eval_loss_per_seed'])
  lines = [f'{"method":22s} {"final eval loss":>17s} '
           f'{"vs adamw (paired)":>19s} {"best on curve":>13s}  to target '
           f'(per seed; - never, counted {never})']
  for name, m in sorted(methods.items(),
                        key=lambda kv: kv[1]['final_eval_loss']):
    finals = np.array(m['final_eval_loss_per_seed'])
    best = min(v for _, v in m['curve'])
    lines.append(f'{name:22s} {_pm(finals):>17s} {_pm(finals - base):>19s} '
                 f'{best:13.4f}  {_steps(m["steps_to_target_per_seed"])}')
  return '\n'.join(lines)


def _finals(sweep: Mapping) -> dict:
  return {lr: {k: m['final_eval_loss_per_seed'] for k, m in ms.items()}
          for lr, ms in sweep.items()}


def sweep_table(sweep: Mapping, names: Sequence[str],
                baselines: Sequence[str]) -> str:
  """Final loss (mean +- sd over seeds) of each method at each rate, and
  PACE's paired margin over the strongest baseline."""
  lrs = list(sweep)
  lines = [f'{"method":16s}' + ''.join(f'{"lr " + lr:>20s}' for lr in lrs)]
  for name in (n for n in names if n in sweep[lrs[0]]):
    lines.append(f'{name:16s}' + ''.join(
        f'{_pm(sweep[lr][name]["final_eval_loss_per_seed"]):>20s}'
        for lr in lrs))
  margins = _claims.pace_margins(_finals(sweep), baselines)
  lines.append(f'{"pace margin":16s}' + ''.join(
      f'{_pm(margins[lr]):>20s}' for lr in lrs))
  lines.append('(pace margin: per seed, the strongest of '
               f'{", ".join(baselines)} minus pace; > 0: pace ahead)')
  return '\n'.join(lines)


def _curves_panel(ax, methods, names, title):
  curves = {k: methods[k]['curve'] for k in names if k in methods}
  _common.plot_curves(ax, curves, title=title, ylabel=_YLABEL)
  # The first points (the pretrained model on new text) dwarf the rest.
  tail = ([v for c in curves.values() for _, v in c[2:]]
          or [v for c in curves.values() for _, v in c])
  ax.set_ylim(min(tail) - 0.02, max(tail) + 0.02)


def _learning_rate_panel(ax, sweep, names, baselines, title):
  lrs = [float(lr) for lr in sweep]
  for name in (n for n in names if n in next(iter(sweep.values()))):
    means = [sweep[lr][name]['final_eval_loss'] for lr in sweep]
    style = '-' if name.startswith('pace') else (
        ':' if name == 'schedule_free' else '--')
    ax.plot(lrs, means, style, marker='o', ms=3, label=name,
            lw=2.2 if name == 'pace' else 1.0)
  margins = _claims.pace_margins(_finals(sweep), baselines)
  for lr, key in zip(lrs, sweep):
    strongest = min(sweep[key][b]['final_eval_loss'] for b in baselines)
    pace = sweep[key]['pace']['final_eval_loss']
    ax.annotate('', xy=(lr, pace), xytext=(lr, strongest),
                arrowprops=dict(arrowstyle='<->', color='k', lw=1.2))
    ax.text(lr * 1.05, (pace + strongest) / 2,
            f'PACE margin\n{_pm(margins[key], 3)}', fontsize=7)
  ax.set_xscale('log')
  ax.set_xticks(lrs, [f'{lr:g}' for lr in lrs])
  ax.set_xticks([], minor=True)
  ax.set_xlabel('peak learning rate')
  ax.set_ylabel('final ' + _YLABEL)
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=6, loc='best')


def _acceleration_panel(ax, methods, title):
  target = methods['adamw']['final_eval_loss']
  names = [k for k in _ACCELERATION if k in methods]
  for name in names:
    steps, values = zip(*methods[name]['curve'])
    reached = methods[name]['steps_to_target_per_seed']
    ax.plot(steps, values, lw=1.2,
            label=f'{name}: reaches at {_steps(reached)}')
  ax.axhline(target, color='k', ls='--', lw=0.8,
             label="target: AdamW's final loss")
  tail = [v for k in names for _, v in methods[k]['curve'][2:]] or [target]
  ax.set_ylim(min(tail) - 0.02, max(tail) + 0.02)
  ax.set_title(title)
  ax.set_xlabel('step')
  ax.set_ylabel(_YLABEL)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=6)


def plot(results: Mapping, out_dir: str, title: str, swept: Sequence[str],
         baselines: Sequence[str]) -> str:
  methods, sweep = results['methods'], results['learning_rate_sweep']
  lr = results['config']['learning_rate']
  fig, axes = plt.subplots(2, 3, figsize=(17, 9.5))
  _curves_panel(axes[0, 0], methods, [k for k in methods if '/' not in k],
                f'{title}: methods, constant lr {lr:g}')
  _curves_panel(axes[0, 1], methods,
                sorted(k for k in methods if k.split('/')[0] in ('ema', 'bema')
                       and k.split('/')[-1] not in ('cosine', 'wsd')),
                'update_freq sweep (no suffix: f=10)')
  _curves_panel(axes[0, 2], methods,
                sorted(k for k in methods if k.startswith('pace')),
                'PACE: pullback sweep and wsd')
  _curves_panel(axes[1, 0], methods, swept,
                f'schedules vs PACE and Schedule-Free, peak lr {lr:g}')
  _learning_rate_panel(axes[1, 1], sweep, swept, baselines,
                       'final loss against the peak learning rate'
                       + (' (one rate; the full study sweeps three)'
                          if len(sweep) == 1 else ''))
  _acceleration_panel(axes[1, 2], methods,
                      f'acceleration: steps to AdamW\'s final loss, lr {lr:g}')
  return _common.save_figure(fig, out_dir, 'finetune.png')

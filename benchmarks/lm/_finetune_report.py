"""The fine-tuning study's tables and its figure, from its results.

The figure answers one question per panel: which returned model is best at
a constant rate; how update_freq and the pullback matter; what the decay
schedules and Schedule-Free give; how it all moves with the learning rate
(PACE's margin marked); who reaches AdamW's final loss first; with
PACE's EMA matched to the ema baseline's, what each pullback gives and how
much it clips; and what merging the constant-rate run's checkpoints gives
against decaying its rate, with the decay each merge stands for.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np

import _claims
import _common
import optax_bema

_YLABEL = 'held-out loss of returned model (nats/byte)'
_MERGE_RIVALS = ('adamw', 'adamw/wsd', 'adamw/cosine', 'ema', 'bema')
MERGE_MARGIN = 10   # steps drawn before the merge window, at the full rate
_ACCELERATION = ('adamw', 'ema', 'bema', 'ouema', 'dema', 'pace/matched',
                 'pace', 'schedule_free')


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


def matched_summary(by_lr: Mapping, matched: str) -> dict:
  """Per rate, for each swept pullback c of ``matched`` (``by_lr[lr]``:
  the study's methods): held-out and validation loss, the paper's
  telemetry at the last step, the chosen c, and how far the c = 0 row is
  from the ema baseline at lag 1 (PACE's EMA exactly) and at lag 10."""
  out = {}
  prefix = matched + '/pullback='
  for lr, methods in by_lr.items():
    rows = {}
    for name, m in methods.items():
      if name.startswith(prefix):
        rows[name[len(prefix):]] = dict(
            held_out_loss=m['final_eval_loss'],
            held_out_loss_per_seed=m['final_eval_loss_per_seed'],
            validation_loss=float(np.mean(
                m['final_validation_loss_per_seed'])),
            **m['telemetry_at_end'])
    if not rows:
      continue
    zero = methods.get(prefix + '0', {}).get('final_eval_loss_per_seed')
    entry = dict(chosen_pullback=methods[matched]['chosen_pullback'],
                 by_pullback=rows)
    if zero is not None:
      for rival in ('ema/lag=1', 'ema'):
        entry[f'pullback_0_minus_{rival}_per_seed'] = np.subtract(
            zero, methods[rival]['final_eval_loss_per_seed']).tolist()
    out[f'{lr:g}'] = entry
  return out


def matched_table(summary: Mapping, profiles: Mapping) -> str:
  """pace/matched per rate and pullback: losses and telemetry."""
  lines = [f'pace/matched (EMA profile vs the ema baseline at step '
           f'{profiles["steps"]}: total variation '
           f'{profiles["total_variation"]:.4f}, lag '
           f'{profiles["lag_matched"]:.1f} vs {profiles["lag_ema"]:.1f} '
           'steps)',
           f'{"lr":>7s} {"pullback":>9s} {"held-out":>9s} {"validation":>10s} '
           f'{"mean gain":>10s} {"clipped":>8s}']
  for lr, entry in summary.items():
    for c, row in sorted(entry['by_pullback'].items(),
                         key=lambda kv: float(kv[0])):
      mark = ' <- chosen' if float(c) == entry['chosen_pullback'] else ''
      lines.append(f'{lr:>7s} {c:>9s} {row["held_out_loss"]:9.4f} '
                   f'{row["validation_loss"]:10.4f} {row["mean_gain"]:10.3g} '
                   f'{row["clipped_fraction"]:8.3g}{mark}')
    for key in ('ema/lag=1', 'ema'):
      diffs = entry.get(f'pullback_0_minus_{key}_per_seed')
      if diffs is not None:
        lines.append(f'{lr:>7s} pullback 0 - {key}: max |d| over seeds '
                     f'{np.abs(diffs).max():.2g}')
  return '\n'.join(lines)


def _finals(sweep: Mapping) -> dict:
  return {lr: {k: m['final_eval_loss_per_seed'] for k, m in ms.items()}
          for lr, ms in sweep.items()}


def sweep_table(sweep: Mapping, names: Sequence[str],
                baselines: Sequence[str]) -> str:
  """Final loss (mean +- sd over seeds) of each method at each rate, and
  each PACE's paired margin over the strongest baseline."""
  lrs = list(sweep)
  lines = [f'{"method":16s}' + ''.join(f'{"lr " + lr:>20s}' for lr in lrs)]
  for name in _at_every_rate(sweep, names):
    lines.append(f'{name:16s}' + ''.join(
        f'{_pm(sweep[lr][name]["final_eval_loss_per_seed"]):>20s}'
        for lr in lrs))
  for pace in _paces(sweep):
    margins = _claims.pace_margins(_finals(sweep), baselines, pace)
    lines.append(f'{pace + " margin":16s}' + ''.join(
        f'{_pm(margins[lr]):>20s}' for lr in lrs))
  if _paces(sweep):
    lines.append('(margin: per seed, the strongest of '
                 f'{", ".join(baselines)} minus that PACE; > 0: PACE ahead)')
  return '\n'.join(lines)


def _at_every_rate(sweep: Mapping, names: Sequence[str]) -> list[str]:
  return [n for n in names if all(n in ms for ms in sweep.values())]


def _paces(sweep: Mapping) -> list[str]:
  return _at_every_rate(sweep, ('pace/matched', 'pace'))


def _curves_panel(ax, methods, names, title):
  curves = {k: methods[k]['curve'] for k in names if k in methods}
  if not curves:   # a partial run (--merge-only, --pace-only)
    ax.axis('off')
    ax.text(0.5, 0.5, f'{title}:\nnot in this run', ha='center',
            fontsize=9, transform=ax.transAxes)
    return
  _common.plot_curves(ax, curves, title=title, ylabel=_YLABEL)
  # The first points (the pretrained model on new text) dwarf the rest.
  tail = ([v for c in curves.values() for _, v in c[2:]]
          or [v for c in curves.values() for _, v in c])
  ax.set_ylim(min(tail) - 0.02, max(tail) + 0.02)


def _learning_rate_panel(ax, sweep, names, baselines, title):
  lrs = [float(lr) for lr in sweep]
  for name in _at_every_rate(sweep, names):
    means = [sweep[lr][name]['final_eval_loss'] for lr in sweep]
    style = '-' if name.startswith('pace') else (
        ':' if name == 'schedule_free' else '--')
    ax.plot(lrs, means, style, marker='o', ms=3, label=name,
            lw=2.2 if name in _paces(sweep) else 1.0)
  paces = _paces(sweep)
  margins = (_claims.pace_margins(_finals(sweep), baselines, paces[0])
             if paces else {})
  for lr, key in zip(lrs, sweep if paces else ()):
    strongest = min(sweep[key][b]['final_eval_loss'] for b in baselines)
    pace = sweep[key][paces[0]]['final_eval_loss']
    ax.annotate('', xy=(lr, pace), xytext=(lr, strongest),
                arrowprops=dict(arrowstyle='<->', color='k', lw=1.2))
    ax.text(lr * 1.05, (pace + strongest) / 2,
            f'{paces[0]} margin\n{_pm(margins[key], 3)}', fontsize=7)
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


def _pullback_ticks(entry) -> list[tuple[float, float]]:
  """(x position, c) of each swept pullback, c = 0 at the smallest c / 3."""
  cs = sorted(float(c) for c in entry['by_pullback'])
  zero_at = min([c for c in cs if c > 0], default=3.0) / 3
  return [(c or zero_at, c) for c in cs]


def _matched_panels(loss_ax, telemetry_ax, summary, methods):
  """Per rate, against the pullback c (c = 0 drawn at the sweep's smallest
  c / 3, labelled 0: a log axis has no 0): the returned model's held-out
  (solid) and
  validation (dotted) loss, the chosen c ringed, and the paper's telemetry
  at the last step, clipped fraction (solid) and mean gain (dashed)."""
  if not summary:   # a partial run (--merge-only)
    for ax in (loss_ax, telemetry_ax):
      ax.axis('off')
      ax.text(0.5, 0.5, 'pace/matched: not in this run', ha='center',
              transform=ax.transAxes)
    return
  for i, (lr, entry) in enumerate(summary.items()):
    cs = sorted(entry['by_pullback'], key=float)
    xs = [x for x, _ in _pullback_ticks(entry)]
    rows = [entry['by_pullback'][c] for c in cs]
    color = f'C{i}'
    loss_ax.plot(xs, [r['held_out_loss'] for r in rows], '-o', ms=3,
                 color=color, label=f'lr {lr} held-out')
    loss_ax.plot(xs, [r['validation_loss'] for r in rows], ':', color=color,
                 label=f'lr {lr} validation')
    chosen = [float(c) for c in cs].index(entry['chosen_pullback'])
    loss_ax.plot([xs[chosen]], [rows[chosen]['held_out_loss']], 'o', ms=10,
                 mfc='none', color=color)
    ema = methods.get('ema') if len(summary) == 1 else None
    if ema:
      loss_ax.axhline(ema['final_eval_loss'], color='k', ls='--', lw=0.8,
                      label='ema baseline (held-out)')
    telemetry_ax.plot(xs, [r['clipped_fraction'] for r in rows], '-o', ms=3,
                      color=color, label=f'lr {lr} clipped fraction')
    telemetry_ax.plot(xs, [r['mean_gain'] for r in rows], '--', color=color,
                      label=f'lr {lr} mean gain')
  ticks = sorted({(x, c) for entry in summary.values()
                  for x, c in _pullback_ticks(entry)})
  for ax, ylabel, title in (
      (loss_ax, 'final loss of the returned EMA (nats/byte)',
       'pace/matched: loss against the pullback (ringed: chosen on '
       'validation)'),
      (telemetry_ax, 'at the last step',
       'pace/matched: the paper\'s telemetry against the pullback')):
    ax.set_xscale('log')
    ax.set_xticks([x for x, _ in ticks], [f'{c:g}' for _, c in ticks])
    ax.set_xticks([], minor=True)
    ax.set_xlabel('pullback c')
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
  telemetry_ax.set_yscale('symlog', linthresh=1e-3)
  telemetry_ax.set_ylim(bottom=0)


def _merges_panel(ax, methods, title):
  """Final loss per seed (dots) and mean (bar) of each merge and the runs
  it stands in for."""
  names = [k for k in _MERGE_RIVALS if k in methods] + sorted(
      k for k in methods if k.startswith('merge/'))
  for i, name in enumerate(names):
    finals = methods[name]['final_eval_loss_per_seed']
    color = 'C1' if name.startswith('merge/') else 'C0'
    ax.bar(i, np.mean(finals), color=color, alpha=0.35)
    ax.plot([i] * len(finals), finals, 'o', ms=4, color=color)
  values = [v for k in names for v in methods[k]['final_eval_loss_per_seed']]
  ax.set_ylim(min(values) - 0.02, max(values) + 0.02)
  ax.set_xticks(range(len(names)), names, rotation=35, ha='right',
                fontsize=7)
  ax.set_ylabel('final ' + _YLABEL)
  ax.set_title(title, fontsize=9)
  ax.grid(alpha=0.3, axis='y')


def _merge_schedules_panel(ax, merges: Mapping, steps: int):
  """The rate multiplier m_t = sum_{s > t} c_s each merge applies to the
  constant-rate run's update t, beside wsd's decay over the same window."""
  saved = merges['steps']
  weights = {f'merge/{shape}': optax_bema.decay_profile(saved, steps, shape)
             for shape in merges['shapes']}
  weights['merge/mean'] = optax_bema.uniform_profile(saved, steps)
  t = np.arange(max(0, saved[0] - MERGE_MARGIN), steps)
  for name, w in weights.items():
    tail = np.cumsum(w[::-1])[::-1]       # tail[s] = sum of w from s on
    ax.step(t, tail[t + 1], where='post', label=name, lw=1.2)
  k = t + 1
  ax.plot(t, np.clip((steps - k) / (steps - saved[0]), 0, 1), 'k--', lw=0.8,
          label='wsd (decayed run)')
  ax.set_xlabel('update step t')
  ax.set_ylabel('rate multiplier')
  ax.set_title(f'the decay each merge stands for (checkpoints {saved[0]}..'
               f'{saved[-1]} every {saved[1] - saved[0]})', fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)


def plot(results: Mapping, out_dir: str, title: str, swept: Sequence[str],
         baselines: Sequence[str]) -> str:
  methods, sweep = results['methods'], results['learning_rate_sweep']
  lr = results['config']['learning_rate']
  fig, axes = plt.subplots(4, 3, figsize=(17, 18.5))
  _curves_panel(axes[0, 0], methods, [k for k in methods if '/' not in k
                                      or k == 'pace/matched'],
                f'{title}: methods, constant lr {lr:g}')
  _curves_panel(axes[0, 1], methods,
                sorted(k for k in methods if k.split('/')[0] in ('ema', 'bema')
                       and k.count('/') == (1 if '/f=' in k else 0)),
                'update_freq sweep (no suffix: f=10)')
  _curves_panel(axes[0, 2], methods,
                sorted(k for k in methods if k.startswith('pace')
                       and not k.startswith('pace/matched/')),
                'PACE: headline, its pullback sweep, wsd; pace/matched')
  # A merge exists at the last step only: it is a point, in the bottom row.
  _curves_panel(axes[1, 0], methods,
                [k for k in swept if not k.startswith('merge/')],
                f'schedules vs PACE and Schedule-Free, peak lr {lr:g}')
  _learning_rate_panel(axes[1, 1], sweep, swept, baselines,
                       'final loss against the peak learning rate'
                       + (' (one rate; the full study sweeps three)'
                          if len(sweep) == 1 else ''))
  _acceleration_panel(axes[1, 2], methods,
                      f'acceleration: steps to AdamW\'s final loss, lr {lr:g}')
  summary = results.get('pace_matched', {})
  _matched_panels(axes[2, 0], axes[2, 1], summary, methods)
  _curves_panel(axes[2, 2], methods,
                ['ema', 'ema/lag=1'] + sorted(
                    (k for k in methods if k.startswith('pace/matched/')),
                    key=lambda k: float(k.split('=')[1])),
                f'pace/matched pullback sweep and the ema baseline, lr {lr:g}')
  _merges_panel(axes[3, 0], methods, 'constant-rate run merged vs decayed '
                f'vs averaged, lr {lr:g}')
  if 'merges' in results['config']:
    _merge_schedules_panel(axes[3, 1], results['config']['merges'],
                           results['config']['steps'])
  else:   # a run from before the merges
    axes[3, 1].axis('off')
  axes[3, 2].axis('off')
  return _common.save_figure(fig, out_dir, 'finetune.png')

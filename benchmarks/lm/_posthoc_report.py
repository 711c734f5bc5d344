"""The post-hoc study's summary and table (``posthoc.py`` runs it)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

import _common
from optax_bema import catalog

# The table's rows: (label, where in a seed's result).
ROWS = (('last iterate (AdamW)', ('last_iterate',)),
        *((f'{k} {what}', where) for k in catalog.BEMA_PAPER
          for what, where in (
              ('default', ('defaults', k)),
              ('post-hoc choice', ('by_stabilizer', k, 'posthoc')),
              ('best in hindsight', ('by_stabilizer', k, 'hindsight')))),
        ('any: optax_bema.choose (synthesized)', ('posthoc',)),
        ('  same setting, exact model', ('posthoc', 'exact')),
        ('  choice by validation, exact models', ('exact_choice',)),
        ('any: best in hindsight (held-out)', ('hindsight',)))


# A choice refined between grid points has no exact model in the study.
_MISSING = dict(held_out_loss=float('nan'), name='(refined: no exact)')


def _at(result: dict, path) -> dict:
  for key in path:
    if isinstance(result, dict) and key not in result:
      return _MISSING
    result = result[key]
  return result


def summarize(per_seed: list[dict]) -> dict:
  """Each row's held-out loss (mean and per seed) and its settings per seed;
  the post-hoc choice's gap to the hindsight best, paired by seed, from
  each snapshot schedule (the first is the reported choice)."""
  rows = {}
  for label, path in ROWS:
    entries = [_at(seed, path) for seed in per_seed]
    held = [e['held_out_loss'] for e in entries]
    rows[label] = dict(held_out_loss=float(np.mean(held)),
                       held_out_loss_per_seed=held,
                       names=[e.get('name', '') for e in entries])
  by_schedule = [dict(num_snapshots=at[0]['num_snapshots'],
                      gap_to_hindsight=float(np.mean(
                          [a['gap_to_hindsight'] for a in at])),
                      gap_to_hindsight_per_seed=[a['gap_to_hindsight']
                                                 for a in at])
                 for at in zip(*(s['synthesis']['by_schedule']
                                 for s in per_seed))]
  return dict(rows=rows, **{k: v for k, v in by_schedule[0].items()
                            if k != 'num_snapshots'},
              gap_to_hindsight_by_schedule=by_schedule)


def report(results: dict, title: str) -> str:
  """The summary as a table, then the synthesis' own accuracy."""
  rows, per_seed = results['summary']['rows'], results['per_seed']
  last = np.array(rows[ROWS[0][0]]['held_out_loss_per_seed'])
  lines = [title, f'{"model":38s} {"held-out":>8s} {"vs last":>8s}  '
           'settings per seed']
  for label, row in rows.items():
    diff = np.array(row['held_out_loss_per_seed']) - last
    names = ' | '.join(dict.fromkeys(row['names']))  # unique, in order
    lines.append(f'{label:38s} {row["held_out_loss"]:8.4f} '
                 f'{diff.mean():+8.4f}  {names}')

  def each(path, key, fmt):
    return ', '.join(format(_at(s, path)[key], fmt) for s in per_seed)
  gap = results['summary']['gap_to_hindsight_per_seed']
  schedules = results['grid']['schedules']
  chosen, main = ('posthoc',), ('synthesis', 'by_schedule', 0)
  lines += [
      f'post-hoc minus hindsight best: {np.mean(gap):+.4f} (per seed '
      f'{", ".join(f"{g:+.4f}" for g in gap)}); held-out rank of the '
      f'choice among {results["grid"]["size"]}: '
      + each(chosen, 'held_out_rank', 'd'),
      f'synthesis of the choice: residual {each(chosen, "residual", ".3f")}'
      f'; model error estimated {each(chosen, "estimated_error", ".2%")}'
      ', measured ' + ', '.join(
          f'{s["posthoc"]["model_error"]:.2%}' if 'model_error'
          in s['posthoc'] else 'n/a' for s in per_seed),
      'cost of choose (seconds, candidates, refused, peak device bytes in '
      'models): ' + '; '.join(
          f'{c["seconds"]:.0f}s, {c["candidates"]}, {c["refused"]}, '
          f'{c["peak_models"]:.1f}' for s in per_seed
          for c in [s['synthesis']['by_schedule'][0]['cost']]),
      f'over the {results["grid"]["size"] - len(schedules[0]["exact"])} '
      'settings synthesized (the other '
      f'{len(schedules[0]["exact"])} weigh only saved steps): '
      '|validation loss synthesized - exact| median '
      f'{each(main, "median_validation_gap", ".1e")}, max '
      f'{each(main, "max_validation_gap", ".1e")} '
      f'({each(main, "max_validation_gap_at", "s")}); rank correlation '
      'over the whole grid ' + each(main, 'rank_correlation', '.4f'),
      'rank correlation of validation and held-out loss over the grid (exact '
      'models): ' + each((), 'validation_vs_held_out', '.3f'),
      'defaults online vs profile sums (model error): ' + ', '.join(
          f'{d["profile_check"]:.1e}' for s in per_seed
          for d in s['defaults'].values()),
      'by snapshot count n (saved at snapshot_steps(T, n)): the settings '
      'that weigh only saved steps (exact: their worst model error), the '
      'model error of the others, median / max over each stabilizer\'s '
      'settings (mean / worst over seeds), and the post-hoc choice made '
      'from them minus the hindsight best (mean over seeds):',
      f'{"n":>3s} {"saved":>5s} {"exact":>13s} '
      + ' '.join(f'{k:>16s}' for k in catalog.BEMA_PAPER)
      + f' {"vs best":>8s}',
  ]
  by_schedule = [s['synthesis']['by_schedule'] for s in per_seed]
  for i, (schedule, gaps) in enumerate(zip(
      schedules, results['summary']['gap_to_hindsight_by_schedule'])):
    at = [b[i] for b in by_schedule]
    cells = []
    for kind in catalog.BEMA_PAPER:
      errors = [a['model_error'][kind] for a in at if kind in a['model_error']]
      cells.append(f'{np.mean([e["median"] for e in errors]):7.2%} / '
                   f'{max(e["max"] for e in errors):6.2%}' if errors else '-')
    worst = [a['exact_settings_max_model_error'] for a in at]
    exact = (f'{len(schedule["exact"])} ({max(worst):.0e})'
             if schedule['exact'] else '0')
    lines.append(f'{schedule["num_snapshots"]:>3} {len(schedule["steps"]):>5} '
                 f'{exact:>13s} ' + ' '.join(f'{c:>16s}' for c in cells)
                 + f' {gaps["gap_to_hindsight"]:+8.4f}')
  return '\n'.join(lines)


def plot(results: dict, out_dir: str, title: str) -> str:
  """Every setting of every seed: validation loss synthesized against exact
  (the synthesis), and held-out against validation loss (the choice)."""
  fig, (synthesis, choice) = plt.subplots(1, 2, figsize=(12, 5))
  schedule = results['grid']['schedules'][0]
  for i, seed in enumerate(results['per_seed']):
    for kind, color in zip(catalog.BEMA_PAPER, ('C0', 'C1', 'C2', 'C3')):
      points = [v for k, v in seed['losses'].items()
                if k.split('/')[0] == kind]
      exact = [p['validation'] for p in points]
      for only_saved in (False, True):  # the exact ones drawn hollow
        these = [p for k, p in seed['losses'].items() if k.split('/')[0]
                 == kind and (k in schedule['exact']) == only_saved]
        synthesis.scatter(
            [p['validation'] for p in these],
            [p['validation_synthesized'] for p in these], s=8,
            facecolors='none' if only_saved else color, edgecolors=color,
            label=None if i or not these else
            f'{kind}, weighs only saved steps' if only_saved else kind)
      choice.scatter(exact, [p['held_out'] for p in points], s=8,
                     color=color, label=None if i else kind)
    for key, marker in (('posthoc', '*'), ('hindsight', 'x')):
      point = dict(validation=seed[key]['validation_loss'],
                   held_out=seed[key]['held_out_loss'])
      choice.scatter(point['validation'], point['held_out'], s=120,
                     marker=marker, color='k',
                     label=None if i else f'{key} (per seed)')
  def better_half(key):
    """The axis' range over the better half of the grid: the worst
    settings would hide the choice."""
    values = [p[key] for s in results['per_seed'] for p in s['losses'].values()]
    return min(values) - 0.005, float(np.median(values))
  low, high = better_half('validation')
  synthesis.plot([low, high], [low, high], 'k--', lw=0.8)
  for ax, ylabel in ((synthesis, 'validation loss, synthesized'),
                     (choice, 'held-out loss, exact')):
    ax.set_xlim(low, high)
    ax.set_xlabel('validation loss, exact (nats/byte)')
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  synthesis.set_ylim(low, high)
  choice.set_ylim(*better_half('held_out'))
  synthesis.set_title(f'{title}: synthesis from '
                      f'{len(schedule["steps"])} snapshots', fontsize=10)
  choice.set_title(f'{title}: choosing on validation', fontsize=10)
  return _common.save_figure(fig, out_dir, 'posthoc.png')

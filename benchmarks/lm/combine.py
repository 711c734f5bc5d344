"""Combines runs of ``finetune.py`` that split the seeds or the rates.

A full study takes hours on a small machine, so it may run in parts: say
``--seeds 2`` at two rates, then ``--first-seed 2 --seeds 1`` for the third
seed. Every comparison is paired by seed, so the parts join seed by seed:
each method's per-seed lists are concatenated in seed order, its curve is
the mean over all seeds, and what depends on every seed is decided again
from the joined numbers: ``pace/matched``'s pullback (the lowest mean
validation loss over all seeds) and every claim's verdict.

The parts must share their configuration except the seeds, the rates, the
machine and the wall time (a setting only some parts record is one the
others' code did not yet write); every rate must end with the same seeds, none
of them twice.

  python benchmarks/lm/combine.py PART_DIR [PART_DIR ...] --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import _runs
import finetune

# What may differ between the parts of one study.
_PER_PART = ('seeds', 'first_seed', 'learning_rate', 'learning_rates',
             'machine', 'wall_seconds')
# The pretrained model is the same one, evaluated on another machine.
_LOSS_TOLERANCE = 1e-5


def _load(path: str) -> dict:
  with open(os.path.join(path, 'results.json')) as f:
    results = json.load(f)
  config = results['config']
  if 'seeds_by_rate' in config:   # a joined result: its seeds may have gaps
    results['seed_ids'] = next(iter(config['seeds_by_rate'].values()))
  else:
    first = config.get('first_seed', 0)
    results['seed_ids'] = list(range(first, first + config['seeds']))
  return results


def _check_same(parts: list[dict], paths: list[str]) -> None:
  """Each setting equal in every part that records it (a setting only some
  parts record was added to the results after the others ran)."""
  def shared(config):
    out = {k: v for k, v in config.items() if k not in _PER_PART}
    out['pretrain'] = {k: v for k, v in config['pretrain'].items()
                       if k != 'held_out_loss'}
    return out
  configs = [shared(p['config']) for p in parts]
  for key in sorted({k for c in configs for k in c}):
    having = [(c[key], path) for c, path in zip(configs, paths) if key in c]
    for value, path in having[1:]:
      if value != having[0][0]:
        raise ValueError(f'{path} differs from {having[0][1]} in {key}: '
                         f'{value!r} vs {having[0][0]!r}')
  loss = parts[0]['config']['pretrain']['held_out_loss']
  for part, path in zip(parts[1:], paths[1:]):
    if abs(part['config']['pretrain']['held_out_loss'] - loss) > (
        _LOSS_TOLERANCE):
      raise ValueError(f'{path} starts from another pretrained model')


def _weighted(values, counts) -> float:
  return float(np.average(values, weights=counts))


def _joined(lists, order) -> list:
  """The parts' per-seed lists, one list in seed order."""
  flat = [v for values in lists for v in values]
  return [flat[i] for i in order]


def _join_rows(rows: list[dict], counts: list[int], order) -> dict:
  """One method at one rate, from the parts' rows; ``order`` puts their
  seeds in order."""
  out = {}
  for field in ('final_eval_loss_per_seed', 'steps_to_target_per_seed',
                'final_validation_loss_per_seed'):
    if all(field in r for r in rows):
      out[field] = _joined([r[field] for r in rows], order)
  finals = np.array(out['final_eval_loss_per_seed'])
  out.update(final_eval_loss=float(finals.mean()),
             final_eval_loss_std=float(finals.std()))
  if all('curve' in r for r in rows):
    curves = np.array([r['curve'] for r in rows])   # part, point, 2
    out['curve'] = [[int(s), float(v)] for s, v in zip(
        curves[0, :, 0], np.average(curves[:, :, 1], 0, weights=counts))]
  if all('telemetry_at_end' in r for r in rows):
    out['telemetry_at_end'] = {
        k: _weighted([r['telemetry_at_end'][k] for r in rows], counts)
        for k in rows[0]['telemetry_at_end']}
  return out


def _join_matched(entries: list[dict], counts: list[int], order) -> dict:
  """``pace_matched`` at one rate: each pullback's losses joined, and the
  pullback chosen again on the mean validation loss over every seed."""
  rows = {}
  for c in entries[0]['by_pullback']:
    parts = [e['by_pullback'][c] for e in entries]
    held = _joined([p['held_out_loss_per_seed'] for p in parts], order)
    rows[c] = dict(held_out_loss=float(np.mean(held)),
                   held_out_loss_per_seed=held)
    for k in parts[0]:
      if k not in rows[c]:
        rows[c][k] = _weighted([p[k] for p in parts], counts)
  chosen = finetune.lowest(
      {float(c): row['validation_loss'] for c, row in rows.items()})
  out = dict(chosen_pullback=chosen, by_pullback=rows)
  for key in entries[0]:
    if key.endswith('_per_seed'):
      out[key] = _joined([e[key] for e in entries], order)
  return out


def combine(paths: list[str]) -> dict:
  """The joined results, in ``finetune.py``'s format."""
  parts = [_load(p) for p in paths]
  _check_same(parts, paths)
  rates = sorted({float(lr) for p in parts for lr in p['learning_rate_sweep']})
  base = _runs.base_rate(rates)
  sweep, matched, seeds_by_rate = {}, {}, {}
  for lr in rates:
    key = f'{lr:g}'
    at = [p for p in parts if key in p['learning_rate_sweep']]
    ids = [i for p in at for i in p['seed_ids']]
    if len(set(ids)) != len(ids):
      raise ValueError(f'lr {key}: seeds {ids} appear twice')
    order = np.argsort(ids, kind='stable')
    seeds_by_rate[key] = sorted(ids)
    if seeds_by_rate[key] != next(iter(seeds_by_rate.values())):
      raise ValueError(f'lr {key} has seeds {sorted(ids)}, another rate '
                       f'{next(iter(seeds_by_rate.values()))}: every claim '
                       'pairs the rates seed by seed')
    counts = [len(p['seed_ids']) for p in at]
    names = [n for n in at[0]['learning_rate_sweep'][key]
             if all(n in p['learning_rate_sweep'][key] for p in at)]
    sweep[key] = {n: _join_rows([p['learning_rate_sweep'][key][n] for p in at],
                                counts, order) for n in names}
    summaries = [key in p.get('pace_matched', {}) for p in at]
    if _runs.MATCHED in names and not all(summaries):
      raise ValueError(f'lr {key}: a part has no pace_matched summary, so '
                       f'{_runs.MATCHED}\'s pullback cannot be chosen again '
                       'on every seed')
    if all(summaries) and _runs.MATCHED in names:
      matched[key] = _join_matched([p['pace_matched'][key] for p in at],
                                   counts, order)
      chosen = f'{_runs.MATCHED}/pullback={matched[key]["chosen_pullback"]:g}'
      sweep[key][_runs.MATCHED] = dict(sweep[key][chosen])
    if lr == base:
      if any(p['config']['learning_rate'] != lr for p in at):
        raise ValueError(f'lr {key} is the base rate, but a part ran it '
                         'beside another base rate: its details are missing')
      methods = {n: _join_rows([p['methods'][n] for p in at], counts, order)
                 for n in names if all(n in p['methods'] for p in at)}
      if key in matched:
        chosen = matched[key]['chosen_pullback']
        methods[_runs.MATCHED] = dict(
            methods[f'{_runs.MATCHED}/pullback={chosen:g}'],
            chosen_pullback=chosen)
  config = {}
  for part in reversed(parts):   # the union, the first part's values first
    config.update(part['config'])
  config.update(parts[0]['config'])
  never = finetune.never_reached(config)
  by_lr = {float(k): v for k, v in sweep.items()}
  ids = seeds_by_rate[f'{base:g}']
  config.update(
      seeds=len(ids), first_seed=min(ids),
      seeds_by_rate=seeds_by_rate, learning_rate=base,
      learning_rates=rates,
      machine='; '.join(dict.fromkeys(p['config']['machine'] for p in parts)),
      wall_seconds=round(sum(p['config']['wall_seconds'] for p in parts), 1),
      parts=[os.path.normpath(p) for p in paths])
  return dict(
      methods=methods,
      learning_rate_sweep={k: {n: {f: m[f] for f in finetune.SWEEP_FIELDS}
                               for n, m in ms.items()}
                           for k, ms in sweep.items()},
      claims=finetune.judge(by_lr, base, never),
      pace_matched=matched,
      matched_profiles=(parts[0].get('matched_profiles')
                        or finetune.matched_profiles(config['steps'])),
      config=config)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('parts', nargs='+', help='the parts\' output folders')
  parser.add_argument('--out', required=True, help='where to write')
  args = parser.parse_args(argv)
  try:
    results = combine(args.parts)
  except ValueError as e:
    parser.error(str(e))
  path = finetune.publish(results, args.out)
  print(f'wrote {path}: seeds by rate {results["config"]["seeds_by_rate"]}')


if __name__ == '__main__':
  main()

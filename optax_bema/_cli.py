"""The ``optax-bema`` command: inspect, merge and synthesize from a directory
of Orbax checkpoints.

Orbax and tqdm are imported by the subcommands that read checkpoints, so
``optax-bema --help`` and a malformed command line cost only the package's
own import.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from typing import Any, Sequence

from optax_bema import _candidates
from optax_bema._checkpoint_dir import CheckpointDir
from optax_bema._checkpoint_dir import describe_steps as _steps
from optax_bema._checkpoint_dir import save

# A target whose estimated model error (Synthesized.error) exceeds this is
# refused, as choose refuses it: the same measured threshold.
from optax_bema._choose import DEFAULT_MAX_ERROR as MAX_ERROR


class Refused(Exception):
  """Bad input: reported as one line, with a non-zero exit."""


class _Parser(argparse.ArgumentParser):

  def error(self, message):
    raise Refused(message)


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the command line ``argv`` (``sys.argv[1:]`` if None)."""
  parser = _parser()
  try:
    args = parser.parse_args(argv)
    return args.run(args)
  except (Refused, ValueError, OSError, ImportError) as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
    print(f'optax-bema: error: {first}', file=sys.stderr)
    return 2


def _parser() -> argparse.ArgumentParser:
  parser = _Parser(
      prog='optax-bema',
      description='Inspect, merge and synthesize weight averages from a '
      'directory of Orbax checkpoints (one step per checkpoint, saved as '
      "StandardSave({'params': params, 'opt_state': opt_state})).")
  sub = parser.add_subparsers(required=True, metavar='COMMAND',
                              parser_class=_Parser)

  def command(name, run, description):
    p = sub.add_parser(name, help=description, description=description)
    p.add_argument('ckpt_dir', metavar='CKPT_DIR')
    p.add_argument('--params-key', default='params',
                   help="the params' key in each checkpoint (default params)")
    p.set_defaults(run=run)
    return p

  p = command('inspect', _inspect, 'List the saved steps, what their '
              'averages track, and which default targets they support.')
  p.add_argument('--state-key', default='opt_state')
  p = command('merge', _merge, 'Merge the saved params of the last STEPS '
              'steps (decay_profile), exactly, one checkpoint in memory at a '
              'time; needs no averaging state.')
  p.add_argument('out_dir', metavar='OUT_DIR')
  p.add_argument('--window', type=int, required=True, metavar='STEPS')
  p.add_argument('--decay', default='linear',
                 choices=('linear', 'cosine', '1-sqrt'))
  p.add_argument('--every', type=int, metavar='N',
                 help='merge the steps T - STEPS, T - STEPS + N, ..., T '
                 '(each must be saved); default: every saved step')
  p.add_argument('--step', type=int, metavar='T',
                 help='the step the merge is taken at (default: the last)')
  p = command('synthesize', _synthesize, 'Synthesize the model of each '
              'target from the snapshots of posthoc_ema, one Orbax '
              'checkpoint per target.')
  p.add_argument('out_dir', metavar='OUT_DIR')
  p.add_argument('--target', action='append', required=True, metavar='SPEC',
                 help="a kind and its settings: 'power_ema:std=0.1', "
                 "'ema:ema_power=0.7,update_freq=1', "
                 "'merge:window=2000,decay=cosine'; repeat for several")
  p.add_argument('--state-key', default='opt_state')
  p.add_argument('--step', type=int, metavar='T',
                 help='synthesize at step T (default: the last saved)')
  p.add_argument('--force', action='store_true',
                 help=f'write targets whose estimated error exceeds '
                 f'{MAX_ERROR}')
  return parser


# --- Targets -----------------------------------------------------------------


def parse_spec(spec: str) -> tuple[str, dict]:
  """``'kind:key=value,...'`` as ``(kind, settings)``."""
  from optax_bema import catalog
  kind, _, rest = spec.partition(':')
  kinds = catalog.STABILIZERS + ('merge',)
  if kind not in kinds:
    raise Refused(f'target {spec!r}: unknown kind {kind!r}; one of '
                  f'{", ".join(kinds)}, as KIND:KEY=VALUE,...')
  settings: dict[str, Any] = {}
  for item in filter(None, rest.split(',')):
    key, eq, value = (part.strip() for part in item.partition('='))
    if not eq or not key or not value:
      raise Refused(f'target {spec!r}: {item!r} is not one KEY=VALUE '
                    '(settings are KEY=VALUE separated by commas)')
    if key in settings:
      raise Refused(f'target {spec!r}: {key!r} is given twice')
    settings[key] = _value(value)
  return kind, settings


def _value(text: str):
  for kind in (int, float):
    try:
      return kind(text)
    except ValueError:
      pass
  return {'true': True, 'false': False}.get(text.lower(), text)


def build_target(spec: str, saved: list[int], last: int):
  """A SPEC as a stabilizer, or a merge's profile over steps up to ``last``."""
  import optax_bema
  kind, settings = parse_spec(spec)
  if kind == 'merge':
    unknown = set(settings) - {'window', 'decay', 'every'}
    if unknown or 'window' not in settings:
      raise Refused(f'target {spec!r}: a merge takes window (required), '
                    'decay and every')
    steps = window_steps(saved, last, settings['window'],
                         settings.get('every'), need_saved=False)
    return optax_bema.decay_profile(steps, last,
                                    settings.get('decay', 'linear'))
  try:
    return getattr(optax_bema, kind)(**settings)
  except (TypeError, ValueError) as e:
    raise Refused(f'target {spec!r}: {e}') from None


def window_steps(saved: list[int], last: int, window, every,
                 need_saved: bool) -> list[int]:
  """The steps a merge of the last ``window`` steps up to ``last`` reads,
  its anchor first (the window's start, which carries no weight)."""
  if not isinstance(window, int) or not 1 <= window <= last:
    raise Refused(f'the window must be a whole number of steps from 1 to '
                  f'{last}, the merge\'s step; got {window!r}')
  if every is not None:
    if not isinstance(every, int) or every < 1 or window % every:
      raise Refused(f'every must divide the window ({window}); got {every!r}')
    steps = list(range(last - window, last + 1, every))
    missing = [s for s in steps if s not in saved] if need_saved else []
    if missing:
      raise Refused(f'step {missing[0]} was not saved (a merge every '
                    f'{every} steps reads {_steps(steps)}; saved: '
                    f'{_steps(saved)})')
    return steps
  start = [s for s in saved if s <= last - window]
  if not start:
    raise Refused(f'no checkpoint at or before step {last - window}, where '
                  f'a window of {window} steps ending at {last} starts; '
                  f'saved: {_steps(saved)}')
  return [start[-1]] + [s for s in saved if last - window < s <= last]


# --- Subcommands -------------------------------------------------------------


def _merge(args) -> int:
  import optax_bema
  _require_new(args.out_dir)
  with CheckpointDir(args.ckpt_dir) as ckpt:
    last = ckpt.end(args.step)
    steps = window_steps(ckpt.steps, last, args.window, args.every,
                         need_saved=True)
    # replay reads its snapshots from step 0, and a merge's weights depend
    # only on the steps' distances: the window is replayed from its anchor,
    # so a run need not have kept its step 0.
    anchor = steps[0]
    weights = optax_bema.decay_profile([s - anchor for s in steps],
                                       last - anchor, args.decay)
    read = (
        (s - anchor, ckpt.read(s, [args.params_key])[args.params_key])
        for s in _progress(steps, 'merge'))
    merged = optax_bema.replay(weights, read)
  save(args.out_dir, merged)
  print(f'merged {len(steps) - 1} checkpoints, steps {_steps(steps[1:])} '
        f'({args.decay} decay over steps {anchor} to {last}), into '
        f'{args.out_dir}')
  for s in steps[1:]:
    print(f'  step {s:>8}  weight {weights[s - anchor]:.6f}')
  return 0


def _synthesize(args) -> int:
  _require_new(args.out_dir)
  with CheckpointDir(args.ckpt_dir) as ckpt:
    last = ckpt.end(args.step)
    saved = [s for s in ckpt.steps if s <= last]
    targets = {spec: build_target(spec, saved, last) for spec in args.target}
    result = _synthesized(ckpt, saved, targets, args)
  rows, refused = [], []
  for spec, target in targets.items():
    why = _unsupported(target, result, spec, last)
    rows.append((spec, f'{result.residual[spec]:.4f}',
                 f'{result.error[spec]:.4f}',
                 why if why and not args.force else 'written'))
    if why:
      refused.append(f'{spec!r} ({why})')
  _table(('target', 'residual', 'error', ''), rows)
  if refused and not args.force:
    raise Refused(
        f'the snapshots cannot support {", ".join(refused)} '
        '(use --force to write anyway); nothing written')
  parent = os.path.dirname(os.path.abspath(args.out_dir))
  partial = tempfile.mkdtemp(prefix='.optax-bema-', dir=parent)
  try:
    for spec in targets:
      save(os.path.join(partial, directory_name(spec)), result.model[spec])
    os.rename(partial, args.out_dir)
  except BaseException:
    shutil.rmtree(partial, ignore_errors=True)
    raise
  print(f'wrote {len(targets)} checkpoints under {args.out_dir}')
  return 0


def _inspect(args) -> int:
  import optax_bema
  from optax_bema import _averages
  with CheckpointDir(args.ckpt_dir) as ckpt:
    print(f'{len(ckpt.steps)} checkpoints in {args.ckpt_dir}: steps '
          f'{_steps(ckpt.steps)}')
    print(f'{args.params_key}: {ckpt.describe(args.params_key)}')
    tracks: dict = {}
    for step in ckpt.steps:
      records = ckpt.records(step, args.state_key)
      described = tuple(
          (name, *_described(_averages.decode(r, f'step {step}, {name!r}')))
          for name, r in sorted(records.items()))
      tracks.setdefault(described, []).append(step)
    for described, steps in tracks.items():
      if not described:
        print(f'steps {_steps(steps)}: no averages state (merge only)')
        continue
      print(f'steps {_steps(steps)} track:')
      _table(('average', 'kind', 'settings'), described, indent='  ')
    if len(tracks) != 1 or not next(iter(tracks)):
      return 0
    last = ckpt.steps[-1]
    targets = {k: target for k, (target, _, _)
               in optax_bema.default_candidates(last).items()}
    result = _synthesized(ckpt, ckpt.steps, targets, args)
  print(f"choose's default candidates at step {last} (supported: estimated "
        f'error at most {MAX_ERROR}, as choose requires):')
  _table(('candidate', 'residual', 'error', 'supported'), [
      (k, f'{result.residual[k]:.4f}', f'{result.error[k]:.4f}',
       _unsupported(targets[k], result, k, last) or 'yes') for k in targets])
  return 0


def _unsupported(target, result, name, last) -> str:
  """Why the snapshots cannot support ``target`` ('' if they can): the
  reasons choose flags a candidate for."""
  if _candidates.never_updated(target, last):
    return 'never updated'
  if not result.error[name] <= MAX_ERROR:
    return f'estimated error above {MAX_ERROR}'
  return ''


def _described(decoded) -> tuple[str, str]:
  rule, schedule = decoded
  return rule.name, ', '.join(f'{k}={v}' for k, v
                              in sorted(schedule.settings().items()))


def _synthesized(ckpt, steps, targets, args):
  import optax_bema
  keys = [args.state_key, args.params_key]
  ckpt.metadata(steps[-1], keys)
  prefixes = ckpt.averages(steps[-1], args.state_key)
  if len(prefixes) != 1:
    raise Refused(f'the optimizer state at step {steps[-1]} holds '
                  f'{len(prefixes)} averages states; synthesis needs one '
                  '(train with optax_bema.posthoc_ema() last in the chain)')

  def wanted(names):  # the params and the averages, not Adam's moments
    return names[0] == args.params_key or names[:len(prefixes[0])] == (
        prefixes[0])

  class Snapshots:
    reads = 0

    def __iter__(self):
      self.reads += 1
      for step in _progress(steps, f'read {self.reads} of 2'):
        saved = ckpt.read(step, keys, keep=wanted)
        yield saved[args.state_key], saved[args.params_key]

  return optax_bema.synthesize(targets, Snapshots())


def directory_name(spec: str) -> str:
  """A target's checkpoint directory under OUT_DIR."""
  return spec.replace(':', '_').replace(',', '_').replace('/', '_')


# --- Output and progress ------------------------------------------------------


def _require_new(out_dir: str):
  if os.path.lexists(out_dir):
    raise Refused(f'{out_dir} exists; name a new directory for the output')


def _progress(steps, description):
  """``steps``, with a progress bar on stderr where tqdm is installed."""
  try:
    from tqdm import tqdm
  except ImportError:
    return steps
  return tqdm(steps, desc=description, unit='checkpoint', leave=False,
              disable=None)  # None: no bar where stderr is not a terminal


def _table(header, rows, indent=''):
  widths = [max(len(str(r[i])) for r in [header, *rows])
            for i in range(len(header))]
  for row in [header, *rows]:
    print(indent + '  '.join(str(c).ljust(w) for c, w in zip(row, widths))
          .rstrip())

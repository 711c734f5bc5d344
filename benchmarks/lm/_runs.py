"""The language-model runs both studies share: configurations, the methods'
optimizers, the command line and its setup (model, corpus, splits).

``finetune.py`` compares the methods; ``posthoc.py`` chooses the average
after training on the comparison's AdamW run. Both read this module, and
``finetune.py --posthoc`` runs ``posthoc.py``'s study, so the imports form a
tree: this module imports neither script.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any, Callable, NamedTuple, Optional

import numpy as np
import optax

import _common
import _lm
import _schedules
import optax_bema
from optax_bema import catalog

LEARNING_RATE = 1e-3   # PACE's headline lr and the AdEMAMix report's
WEIGHT_DECAY = 0.01    # the papers' and the report's
CLIP_NORM = 1.0        # the report's; applied to every method alike
# The BEMA paper's Table 2, except update_freq: its 400 would never fire in a
# few hundred steps. With update_freq f the EMA spans about f * sqrt(10 + t)
# steps: f = 10 spans ~170 steps at step 300 and ~320 at step 1000 (the
# paper's f = 400 over ~1e4 steps spans the whole run) and still updates
# 30 to 100 times.
STABILIZER = dict(ema_power=0.5, bias_power=0.2, lag=10.0, multiplier=1.0,
                  update_after=0)
UPDATE_FREQ = 10
SWEPT_STABILIZERS = ('ema', 'bema')
PACE = dict(pullback=0.15, ema_power=0.2)  # the PACE paper's headline
# PACE's EMA as the ``ema`` baseline's: the same power, multiplier and update
# steps. PACE's weight (1 + gamma max(0, t - delay))^-kappa would need
# delay = -(lag - 1) / gamma = -9 to reproduce the baseline's (lag + gamma
# t)^-kappa, and delay >= 0; delay 0 gives base 1 + t instead of 10 + t, the
# baseline at lag 1 (the row ``ema/lag=1``, which the pullback-0 row equals).
# The two profiles differ by a total variation of 0.013 at step 300 and 0.002
# at step 1000 (``matched_profiles``), and no multiplier does better.
PACE_MATCHED = dict(ema_power=STABILIZER['ema_power'], delay=0.0,
                    multiplier=STABILIZER['multiplier'],
                    update_freq=UPDATE_FREQ)
MATCHED = 'pace/matched'
MERGE_EVERY = 10   # steps between the checkpoints merged: 7 in a quick run
MERGE_SHAPES = ('linear', 'cosine', '1-sqrt')
ADEMAMIX_ALPHA = 4.0   # the report's alpha_base, so the baseline differs only
                       # by the adaptivity

# quick and full share the model and its pretraining, hence the cached
# checkpoint; full runs longer, on more seeds and rates, with a larger
# evaluation set, and adds pace/wsd (no claim needs it; quick stays within
# its budget without it). The sweeps of update_freq and the headline's
# pullback run at the base rate; the matched pullbacks at every rate, where
# the full study spans 100x around the paper's GPT-2 basin (c about 3e-3)
# and its headline (0.15), and quick three values.
_MODEL = _lm.ModelConfig(width=128, layers=2, heads=4, context=64)
_PRETRAIN = dict(corpus_bytes=2_000_000, steps=600, batch=32,
                 learning_rate=3e-3)
_PACE_BOTH = ('constant', 'wsd')
# What a command line may switch off or shift, the same in every mode.
_RUN_DEFAULTS = dict(first_seed=0, extras=True, schedule_free=True)
CONFIGS = {
    'full': dict(model=_MODEL, pretrain=_PRETRAIN, steps=1000, batch=8,
                 eval_every=50, eval_windows=128, seeds=3,
                 learning_rates=(3e-4, 1e-3, 3e-3), pace_schedules=_PACE_BOTH,
                 update_freqs=(1, 3, 10, 30), pullbacks=(0.0, 0.15),
                 matched_pullbacks=(0.0, 0.003, 0.01, 0.03, 0.1, 0.3)),
    'quick': dict(model=_MODEL, pretrain=_PRETRAIN, steps=300, batch=8,
                  eval_every=25, eval_windows=64, seeds=2,
                  learning_rates=(LEARNING_RATE,), pace_schedules=('constant',),
                  update_freqs=(1, 3, 10, 30), pullbacks=(0.15,),
                  matched_pullbacks=(0.0, 0.01, 0.1)),
    # For the tests: every code path in seconds, numbers meaningless.
    'smoke': dict(
        model=_lm.ModelConfig(width=32, layers=1, heads=2, context=16),
        pretrain=dict(corpus_bytes=50_000, steps=4, batch=4,
                      learning_rate=3e-3),
        steps=6, batch=2, eval_every=2, eval_windows=4, seeds=2,
        learning_rates=(1e-3, 3e-3), pace_schedules=_PACE_BOTH,
        update_freqs=(1, 10), pullbacks=(0.15,),
        matched_pullbacks=(0.0, 0.1)),
}


@dataclasses.dataclass
class Run:
  """One optimizer trajectory and the models it returns.

  ``readout(opt_state, params)`` is the model named ``name``; ``averaged``
  names the members of the ``optax_bema.averages`` last in ``tx``, each
  returning a model too;
  ``telemetry(opt_state)`` gives the scalars to report, by name.
  """
  name: str
  tx: optax.GradientTransformation
  readout: Callable[[Any, Any], Any]
  averaged: tuple[str, ...] = ()
  telemetry: Optional[Callable[[Any], dict]] = None
  merges: dict = dataclasses.field(default_factory=dict)


def base_rate(rates) -> float:
  """The rate that carries the sweeps, AdEMAMix and the one-rate claims:
  the papers' 1e-3 when run, else the lowest."""
  return LEARNING_RATE if LEARNING_RATE in rates else min(rates)


def merge_steps(steps: int) -> list[int]:
  """The checkpoints merged: every ``MERGE_EVERY`` steps back from the last
  step over wsd's decay window, its start included (the merge's anchor)."""
  window = steps - round((1 - _schedules.DECAY_FRACTION) * steps)
  every = max(1, min(MERGE_EVERY, window))
  return list(range(steps, steps - window - 1, -every))[::-1]


def merge_targets(steps: int) -> dict:
  """``{name: weights on steps 0..T}``: each decay shape over the window
  (``decay_profile``) and the plain mean of the same checkpoints."""
  saved = merge_steps(steps)
  targets = {f'merge/{shape}': optax_bema.decay_profile(saved, steps, shape)
             for shape in MERGE_SHAPES}
  targets['merge/mean'] = optax_bema.uniform_profile(saved, steps)
  return targets


def _live(state, params):
  del state
  return params


def _schedule_free_params(state, params):
  return optax.contrib.schedule_free_eval_params(state[1], params)


def _pace_telemetry(state):
  return optax_bema.pace_telemetry(state)._asdict()


def runs(config, learning_rate: float, base: bool) -> list[Run]:
  """Every run at ``learning_rate``; ``base`` adds the sweeps and AdEMAMix."""
  clip = optax.clip_by_global_norm(CLIP_NORM)

  def rate(schedule):
    return _schedules.learning_rate(learning_rate, schedule, config['steps'])

  def suffix(schedule):
    return '' if schedule == 'constant' else '/' + schedule

  out = []
  for schedule in _schedules.SCHEDULES:
    if schedule == 'constant':
      stabilizers = _common.make_stabilizers(
          catalog.BEMA_PAPER, update_freq=UPDATE_FREQ, **STABILIZER)
      # What pace/matched/pullback=0 must equal: PACE's EMA, lag 1.
      stabilizers.update(_common.make_stabilizers(
          ('ema',), suffix='/lag=1', update_freq=UPDATE_FREQ,
          **dict(STABILIZER, lag=1.0)))
      for f in config['update_freqs'] if base else ():
        if f != UPDATE_FREQ:
          stabilizers.update(_common.make_stabilizers(
              SWEPT_STABILIZERS, suffix=f'/f={f}', update_freq=f,
              **STABILIZER))
    else:
      stabilizers = _common.make_stabilizers(
          ('ema',), suffix=suffix(schedule), update_freq=UPDATE_FREQ,
          **STABILIZER)
    out.append(Run('adamw' + suffix(schedule), optax.chain(
        clip, optax.adamw(rate(schedule), weight_decay=WEIGHT_DECAY),
        optax_bema.averages(**stabilizers)), _live, tuple(stabilizers),
                   merges=merge_targets(config['steps'])
                   if schedule == 'constant' else {}))
  pace_runs = [('pace' + suffix(schedule), schedule, PACE['pullback'])
               for schedule in config['pace_schedules']]
  pace_runs += [(f'pace/pullback={c}', 'constant', c)
                for c in (config['pullbacks'] if base else ())
                if c != PACE['pullback']]
  pace_runs = [(name, schedule, dict(PACE, pullback=c))
               for name, schedule, c in pace_runs]
  pace_runs += [(f'{MATCHED}/pullback={c:g}', 'constant',
                 dict(PACE_MATCHED, pullback=c))
                for c in config['matched_pullbacks']]
  for name, schedule, settings in pace_runs:
    out.append(Run(name, optax.chain(clip, optax_bema.pace(
        rate(schedule), weight_decay=WEIGHT_DECAY, **settings)),
                   optax_bema.averaged_params, telemetry=_pace_telemetry))
  if config['schedule_free']:
    out.append(Run('schedule_free', optax.chain(
        clip, optax.contrib.schedule_free_adamw(
            rate('constant'), weight_decay=WEIGHT_DECAY)),
                   _schedule_free_params))
  if base:
    # adaptive_ademamix clips inside (its clip_norm), before measuring noise.
    out.append(Run('adaptive_ademamix', optax_bema.adaptive_ademamix(
        rate('constant'), alpha=ADEMAMIX_ALPHA, weight_decay=WEIGHT_DECAY,
        clip_norm=CLIP_NORM), _live, telemetry=lambda s: {
            k: optax.tree.get(s, k) for k in ('noise_fraction', 'alpha')}))
    out.append(Run('ademamix', optax.chain(clip, optax.contrib.ademamix(
        rate('constant'), alpha=ADEMAMIX_ALPHA,
        weight_decay=WEIGHT_DECAY)), _live))
  return out



class Setup(NamedTuple):
  """What both studies start from: the configuration, the pretrained model
  and the fine-tuning corpus, split."""
  mode: str                # 'smoke', 'quick' or 'full'
  config: dict             # CONFIGS[mode] with the command line's overrides
  model: _lm.Transformer
  params: Any              # the pretrained weights
  pretrained_loss: float   # their held-out loss on the stdlib source
  corpus_name: str
  corpus: bytes
  train_bytes: np.ndarray  # the corpus without its held-out tail
  eval_set: np.ndarray     # the held-out windows


def setup(argv, description: str,
          default_out: str = 'benchmarks/results/lm/finetune',
          ) -> tuple[argparse.Namespace, Setup]:
  """The command line of ``finetune.py`` (``posthoc.py`` takes the same),
  the configuration it names, the pretrained model (cached) and the
  corpus."""
  parser = argparse.ArgumentParser(description=description)
  _common.add_common_args(parser, default_out)
  parser.add_argument('--smoke', action='store_true',
                      help='a tiny configuration for tests (seconds)')
  parser.add_argument('--text', help='fine-tune on this text file instead of '
                      'pydoc_data.topics (its last 10%% is held out)')
  parser.add_argument('--seeds', type=int, help='seeds (override)')
  parser.add_argument('--first-seed', type=int, default=0, help='the first '
                      'seed\'s index: --first-seed 2 --seeds 1 runs the third '
                      'seed alone, to be combined with a run of the first two '
                      '(combine.py)')
  parser.add_argument('--steps', type=int, help='fine-tuning steps (override)')
  parser.add_argument('--lr', type=float, nargs='+', help='peak learning '
                      'rates instead of the configuration\'s (override)')
  parser.add_argument('--pace-only', action='store_true', help='only the '
                      'runs that PACE\'s claims need: no update_freq sweep, '
                      'AdEMAMix, pace/wsd or headline pullback sweep')
  parser.add_argument('--merge-only', action='store_true', help='only the '
                      'runs that the merge claims need: AdamW at each '
                      'schedule, with its averages and the merges of its '
                      'constant-rate checkpoints')
  parser.add_argument('--cache', default=os.path.join(
      os.path.expanduser('~'), '.cache', 'optax_bema'),
                      help='where the pretrained checkpoint is cached')
  parser.add_argument('--posthoc', action='store_true', help='instead of the '
                      'comparison, choose the average after training '
                      '(posthoc.py); writes OUT/posthoc.json')
  args = parser.parse_args(argv)
  mode = 'smoke' if args.smoke else 'quick' if args.quick else 'full'
  config = dict(_RUN_DEFAULTS, **CONFIGS[mode])
  config['seeds'] = args.seeds or config['seeds']
  config['steps'] = args.steps or config['steps']
  if args.first_seed < 0:
    parser.error('--first-seed must be 0 or more')
  config['first_seed'] = args.first_seed
  if args.lr:
    config['learning_rates'] = tuple(args.lr)
  if args.pace_only and args.merge_only:
    parser.error('--pace-only and --merge-only exclude each other')
  if args.pace_only:
    config.update(update_freqs=(), pullbacks=(), pace_schedules=('constant',),
                  extras=False)
  if args.merge_only:
    config.update(update_freqs=(), pullbacks=(), pace_schedules=(),
                  matched_pullbacks=(), extras=False, schedule_free=False)
  config['base_lr'] = base_rate(config['learning_rates'])

  model = _lm.Transformer(config['model'])
  params, pretrained_loss = _lm.pretrained(model, cache_dir=args.cache,
                                           **config['pretrain'])
  if args.text:
    with open(args.text, 'rb') as f:
      corpus, corpus_name = f.read(), os.path.basename(args.text)
  else:
    corpus, corpus_name = _lm.pydoc_topics(), 'pydoc_data.topics'
  train_bytes, held_out = _lm.split(corpus)
  context = config['model'].context
  eval_set = _lm.eval_windows(held_out, config['eval_windows'], context)
  if len(train_bytes) <= context + 1 or not len(eval_set):
    parser.error(f'{corpus_name} is too short for context {context}')
  return args, Setup(mode, config, model, params, pretrained_loss,
                     corpus_name, corpus, train_bytes, eval_set)


def validation_split(train_bytes, count: int, context: int):
  """``(train, validation)``: the last ``count`` windows of the training text
  become the validation set, and training batches sample only the rest."""
  size = count * (context + 1)
  if size > len(train_bytes) // 4:
    raise ValueError(f'{count} validation windows of {context + 1} bytes would '
                     f'take over a quarter of {len(train_bytes)} training '
                     'bytes.')
  return (train_bytes[:-size], train_bytes[-size:].reshape(
      count, context + 1).astype(np.int32))

"""The language-model comparison: which returned model fine-tunes best?

A small byte-level transformer (``_lm.py``) is pretrained on the standard
library's source (cached, so re-runs skip it), then fine-tuned on the text of
``pydoc_data.topics`` (or ``--text FILE``) with a small batch, the noisy
regime the averaging papers target. Every method is judged by the held-out
loss of the model it would RETURN:

* ``adamw``: the last iterate of AdamW at a constant rate, and
  ``adamw/cosine``, ``adamw/wsd`` with the PACE paper's decay schedules
  (``_schedules.py``; every run shares the same linear warmup).
* ``ema``, ``bema``, ``ouema``, ``dema``: the library's stabilizers over that
  SAME constant-rate AdamW trajectory (one run, all of them in one
  ``optax_bema.averages`` last in its chain), ``ema``/``bema`` at
  other ``update_freq`` values (``bema/f=1`` ...), and ``ema/cosine``,
  ``ema/wsd`` over the scheduled runs, all free on those trajectories.
* ``pace``: ``optax_bema.pace``'s EMA at a constant rate with the PACE
  paper's headline setting, ``pace/wsd``, and ``pace/pullback=c`` a sweep.
* ``pace/matched``: PACE whose EMA is the ``ema`` baseline's average (the
  PACE paper's ablation, its Fig. 2: the same EMA power, so the two differ
  only in the pullback), its pullback chosen per rate on a validation split
  from the sweep ``pace/matched/pullback=c`` (c = 0 included).
* ``merge/linear``, ``merge/cosine``, ``merge/1-sqrt``: checkpoint merging
  (WSM, arXiv 2507.17634): the constant-rate AdamW run's checkpoints, saved
  every ``MERGE_EVERY`` steps over the window wsd decays in (the last 20%),
  merged with ``optax_bema.decay_profile`` weights through
  ``optax_bema.replay``, so the merge decays the rate with that shape to
  first order; ``merge/mean``: the plain mean of the same checkpoints
  (PMA, arXiv 2505.12082). Free on the ``adamw`` trajectory, like ``ema``.
* ``schedule_free``: ``optax.contrib.schedule_free_adamw`` at the same peak
  rate and warmup, evaluated at ``schedule_free_eval_params``.
* ``adaptive_ademamix`` against the report's baselines, ``adamw`` and plain
  ``ademamix`` (``optax.contrib.ademamix``).

The full study repeats the schedules, PACE and Schedule-Free at three
learning rates. Every method sees the same batches (per seed), warmup and
global-norm clipping at 1.0, so each difference is the method's. Each
method's steps to reach AdamW's final loss measure acceleration, and the
papers' claims get a verdict by the rule in ``_claims.py``; PACE's are
decided with ``pace/matched``, the headline ``pace`` judged beside it.

The validation windows are the training text's last bytes, which training
batches never sample; the held-out windows (the corpus' tail) choose
nothing.

  python benchmarks/lm/finetune.py --quick --out benchmarks/results/lm/finetune
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import sys
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

import optax_bema

# The helpers every group shares (_common, _transforms) are one folder up.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import _claims
import _common
import _finetune_report
import _lm
import _schedules
from optax_bema import catalog
import posthoc

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
# What PACE at a constant rate must beat: AdamW and its EMA at every schedule.
BASELINES = tuple(f'{m}{"" if s == "constant" else "/" + s}'
                  for m in ('adamw', 'ema') for s in _schedules.SCHEDULES)
SWEPT_METHODS = BASELINES + (MATCHED, 'pace', 'pace/wsd', 'schedule_free')

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


def trainer(run: Run, model, eval_set, validation, eval_every):
  """Compiles ``run`` once; the returned function trains it on one seed.

  ``train(params, batches, bar)`` returns ``({model_name: [[step, loss]]},
  {field: value}, {model_name: loss})``: the curves on ``eval_set``, the
  telemetry at the last step and each model's final loss on
  ``validation``; step 0 of a curve is the pretrained model, shared by
  every method.
  """
  def loss(p, windows):
    return _lm.loss_fn(model, p, windows)

  # One program per seed, not one vmapped over seeds: under vmap the
  # stabilizers' update-step branches become selects that run both sides,
  # which compiles about 4x slower and steps slower on CPU.
  @jax.jit
  def step(params, state, windows):
    grads = jax.grad(loss)(params, windows)
    updates, state = run.tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  @jax.jit
  def evaluate(params, state, windows):
    models = {k: optax_bema.averaged_params(state, params, name=k)
              for k in run.averaged}
    models[run.name] = run.readout(state, params)
    # One evaluation mapped over the stacked models compiles once, not once
    # per model; lax.map holds one model's activations at a time, which on
    # CPU is about twice as fast as vmap.
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *models.values())
    losses = jax.lax.map(lambda p: loss(p, windows), stacked)
    return dict(zip(models, losses))

  @jax.jit
  def evaluate_models(models, windows):
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *models.values())
    return dict(zip(models, jax.lax.map(lambda p: loss(p, windows), stacked)))

  saves = sorted({int(s) for w in run.merges.values()
                  for s in np.flatnonzero(w)})

  def train(params, batches, bar):
    state = run.tx.init(params)
    curves = {}
    # The checkpoints a merge reads, kept on the host as a run saves them;
    # replay needs step 0 first, which no merge weighs.
    checkpoints = [(0, jax.device_get(params))] if saves else []
    for t in range(len(batches) + 1):
      if t:
        params, state = step(params, state, batches[t - 1])
        bar.update()
      if t in saves:
        checkpoints.append((t, jax.device_get(params)))
      if t % eval_every == 0 or t == len(batches):
        for k, v in evaluate(params, state, eval_set).items():
          curves.setdefault(k, []).append([t, float(v)])
    telemetry = run.telemetry(state) if run.telemetry else {}
    validated = evaluate(params, state, validation)
    if run.merges:   # a merge exists at the last step only: a one-point curve
      merged = optax_bema.replay(run.merges, checkpoints)
      for k, v in evaluate_models(merged, eval_set).items():
        curves[k] = [[len(batches), float(v)]]
      validated.update(evaluate_models(merged, validation))
    return (curves, {k: float(v) for k, v in telemetry.items()},
            {k: float(v) for k, v in validated.items()})
  return train


def aggregate(per_seed: list[dict], telemetry: dict,
              validated: list[dict]) -> dict:
  """Mean curve over seeds; final loss mean, std and per seed; steps to
  reach AdamW's final loss (per seed: that seed's AdamW); telemetry
  (``telemetry[name]``: one ``{field: value}`` per seed) averaged; the
  final validation loss per seed (``validated[seed][name]``)."""
  targets = [seed['adamw'][-1][1] for seed in per_seed]
  methods = {}
  for name in per_seed[0]:
    c = np.array([seed[name] for seed in per_seed])  # seed, point, 2
    finals = c[:, -1, 1]
    reached = [_claims.steps_to_target(seed, target)
               for seed, target in zip(c, targets)]
    methods[name] = dict(
        final_eval_loss=float(finals.mean()),
        final_eval_loss_std=float(finals.std()),
        final_eval_loss_per_seed=finals.tolist(),
        steps_to_target_per_seed=reached,
        final_validation_loss_per_seed=[seed[name] for seed in validated],
        curve=[[int(s), float(v)] for s, v in c.mean(0)])
    if name in telemetry:
      methods[name]['telemetry_at_end'] = {
          k: float(np.mean([seed[k] for seed in telemetry[name]]))
          for k in telemetry[name][0]}
  return methods


def choose_matched(methods: dict) -> dict:
  """Adds ``pace/matched``: the swept pullback whose returned model has the
  lowest mean validation loss over seeds (never the held-out loss)."""
  prefix = MATCHED + '/pullback='
  swept = {float(k[len(prefix):]): m for k, m in methods.items()
           if k.startswith(prefix)}
  if swept:
    chosen = min(swept, key=lambda c: np.mean(
        swept[c]['final_validation_loss_per_seed']))
    methods[MATCHED] = dict(swept[chosen], chosen_pullback=chosen)
  return methods


def study(config, params, model, eval_set, validation, seed_batches,
          desc) -> dict:
  """``{lr: {method: results}}`` over the configured learning rates."""
  base_lr = config['base_lr']
  plan = {lr: runs(config, lr, base=lr == base_lr
                  and config.get('extras', True))
          for lr in config['learning_rates']}
  total = sum(map(len, plan.values())) * config['seeds'] * config['steps']
  by_lr = {}
  with tqdm.tqdm(total=total, desc=desc) as bar:
    for lr, lr_runs in plan.items():
      per_seed, telemetry = [{} for _ in seed_batches], {}
      validated = [{} for _ in seed_batches]
      for run in lr_runs:
        train = trainer(run, model, eval_set, validation,
                        config['eval_every'])
        for seed, batches in enumerate(seed_batches):
          bar.set_postfix(lr=lr, method=run.name, seed=seed, refresh=False)
          curves, telemetry_at_end, losses = train(params, batches, bar)
          per_seed[seed].update(curves)
          validated[seed].update(losses)
          if run.telemetry:
            telemetry.setdefault(run.name, []).append(telemetry_at_end)
      by_lr[lr] = choose_matched(aggregate(per_seed, telemetry, validated))
  return by_lr


def matched_profiles(steps: int) -> dict:
  """How far pace/matched's EMA weights on the iterates are from the ema
  baseline's after ``steps``: total variation, and each one's lag."""
  def weights(lag):
    return optax_bema.profile(catalog.stabilizer(
        'ema', update_freq=UPDATE_FREQ, **dict(STABILIZER, lag=lag)), steps)
  baseline, matched = weights(STABILIZER['lag']), weights(1.0)
  s = np.arange(steps + 1)
  return dict(steps=steps,
              total_variation=float(np.abs(baseline - matched).sum() / 2),
              lag_ema=float(steps - s @ baseline),
              lag_matched=float(steps - s @ matched))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  _common.add_common_args(parser, 'benchmarks/results/lm/finetune')
  parser.add_argument('--smoke', action='store_true',
                      help='a tiny configuration for tests (seconds)')
  parser.add_argument('--text', help='fine-tune on this text file instead of '
                      'pydoc_data.topics (its last 10%% is held out)')
  parser.add_argument('--seeds', type=int, help='seeds (override)')
  parser.add_argument('--steps', type=int, help='fine-tuning steps (override)')
  parser.add_argument('--lr', type=float, nargs='+', help='peak learning '
                      'rates instead of the configuration\'s (override)')
  parser.add_argument('--pace-only', action='store_true', help='only the '
                      'runs that PACE\'s claims need: no update_freq sweep, '
                      'AdEMAMix, pace/wsd or headline pullback sweep')
  parser.add_argument('--cache', default=os.path.join(
      os.path.expanduser('~'), '.cache', 'optax_bema'),
                      help='where the pretrained checkpoint is cached')
  parser.add_argument('--posthoc', action='store_true', help='instead of the '
                      'comparison, choose the average after training '
                      '(posthoc.py); writes OUT/posthoc.json')
  args = parser.parse_args(argv)
  mode = 'smoke' if args.smoke else 'quick' if args.quick else 'full'
  config = dict(CONFIGS[mode])
  config['seeds'] = args.seeds or config['seeds']
  config['steps'] = args.steps or config['steps']
  if args.lr:
    config['learning_rates'] = tuple(args.lr)
  if args.pace_only:
    config.update(update_freqs=(), pullbacks=(), pace_schedules=('constant',),
                  extras=False)
  rates = config['learning_rates']
  # The base rate carries the sweeps and AdEMAMix: the papers' 1e-3 when run.
  config['base_lr'] = LEARNING_RATE if LEARNING_RATE in rates else rates[0]
  started = time.time()

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
  if args.posthoc:  # the AdamW run at the base rate, trained once per seed
    adamw = next(r.tx for r in runs(config, config['base_lr'], base=False)
                 if r.name == 'adamw')
    posthoc.main(
        args.out, mode, config, model, params, adamw, corpus, corpus_name,
        base=STABILIZER, update_freq=UPDATE_FREQ, training=dict(
            learning_rate=config['base_lr'], schedule='constant',
            warmup_steps=_schedules.warmup_steps(config['steps']),
            weight_decay=WEIGHT_DECAY, clip_norm=CLIP_NORM))
    return

  # Fixed per seed, so every method sees the same batches in the same order,
  # drawn from the training text without its validation windows.
  train_bytes, validation = posthoc.validation_split(
      train_bytes, config['eval_windows'], context)
  seed_batches = []
  for seed in range(config['seeds']):
    rng = np.random.default_rng(1000 + seed)
    seed_batches.append([
        _lm.sample_batch(rng, train_bytes, config['batch'], context)
        for _ in range(config['steps'])])
  by_lr = study(config, params, model, eval_set, validation, seed_batches,
                f'fine-tuning on {corpus_name}')

  base_lr = config['base_lr']
  methods = by_lr[base_lr]
  never = config['steps'] + config['eval_every']
  evidence = _claims.Evidence(
      {lr: {k: m['final_eval_loss_per_seed'] for k, m in ms.items()}
       for lr, ms in by_lr.items()},
      {lr: {k: m['steps_to_target_per_seed'] for k, m in ms.items()}
       for lr, ms in by_lr.items()}, base_lr, never)
  claims = _claims.claims(evidence, BASELINES, paces=(
      (MATCHED, 'pace/matched: the ema baseline\'s average, pullback chosen '
                'on validation at each rate'),
      ('pace', 'headline pace: pullback 0.15, ema_power 0.2, every step')))
  wall = time.time() - started
  results = dict(
      methods=methods,
      learning_rate_sweep={f'{lr:g}': {k: {f: m[f] for f in (
          'final_eval_loss', 'final_eval_loss_std',
          'final_eval_loss_per_seed', 'steps_to_target_per_seed')}
                                       for k, m in ms.items()}
                           for lr, ms in by_lr.items()},
      claims=claims,
      pace_matched=_finetune_report.matched_summary(by_lr, MATCHED),
      matched_profiles=matched_profiles(config['steps']),
      config=dict(
          mode=mode, model=dataclasses.asdict(config['model']),
          pretrain=dict(config['pretrain'], corpus='stdlib source',
                        held_out_loss=pretrained_loss),
          finetune_corpus=corpus_name, steps=config['steps'],
          batch=config['batch'], eval_every=config['eval_every'],
          eval_windows=len(eval_set), seeds=config['seeds'],
          learning_rate=base_lr, learning_rates=list(rates),
          schedules=dict(names=list(_schedules.SCHEDULES),
                         warmup_steps=_schedules.warmup_steps(config['steps']),
                         wsd_decay_fraction=_schedules.DECAY_FRACTION),
          acceleration_target='per seed, the final loss of adamw (constant '
                              f'rate) at the same lr; never = {never}',
          weight_decay=WEIGHT_DECAY, clip_norm=CLIP_NORM,
          stabilizer=dict(STABILIZER, update_freq=UPDATE_FREQ),
          update_freq_sweep=list(config['update_freqs']), pace=PACE,
          pullback_sweep=list(config['pullbacks']),
          pace_matched=dict(PACE_MATCHED,
                            pullback_sweep=list(config['matched_pullbacks']),
                            chosen_by='mean final validation loss over seeds, '
                            f'{len(validation)} windows of the training text'),
          merges=dict(steps=merge_steps(config['steps']),
                      shapes=list(MERGE_SHAPES), every=MERGE_EVERY,
                      how='optax_bema.decay_profile(steps, T, shape) for '
                          'each shape, uniform_profile(steps, T) for the '
                          'mean; optax_bema.replay on the adamw run\'s '
                          'params at those steps'),
          pace_only=args.pace_only,
          ademamix_alpha=ADEMAMIX_ALPHA, machine=_common.machine_line(),
          wall_seconds=round(wall, 1)))
  path = _common.write_results(args.out, results)
  _finetune_report.plot(results, args.out, f'{corpus_name}, {mode}',
                        SWEPT_METHODS, BASELINES)
  print(f'\npretrained model, held-out stdlib loss {pretrained_loss:.4f}; '
        f'{config["steps"]} fine-tuning steps, {config["seeds"]} seed(s), '
        f'lr {base_lr:g}')
  print(_finetune_report.table(methods, never))
  if len(rates) > 1:
    print('\n' + _finetune_report.sweep_table(results['learning_rate_sweep'],
                                              SWEPT_METHODS, BASELINES))
  for name, m in methods.items():
    if 'telemetry_at_end' in m:
      print(f'{name} at the last step: ' + ', '.join(
          f'{k} {v:.4g}' for k, v in m['telemetry_at_end'].items()))
  print('\n' + _finetune_report.matched_table(results['pace_matched'],
                                               results['matched_profiles']))
  print('\nclaims (verdict rule: benchmarks/lm/_claims.py)\n'
        + _claims.table(claims))
  print(f'wrote {path} in {wall:.0f}s ({_common.machine_line()})')


if __name__ == '__main__':
  main()

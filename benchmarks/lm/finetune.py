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

import dataclasses
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

import optax_bema

# The helpers every group shares (_common) are one folder up.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import _claims
import _common
import _finetune_report
import _lm
import _runs
import _schedules
from optax_bema import catalog
import posthoc

# What PACE at a constant rate must beat: AdamW and its EMA at every schedule.
BASELINES = tuple(f'{m}{"" if s == "constant" else "/" + s}'
                  for m in ('adamw', 'ema') for s in _schedules.SCHEDULES)
# What the results keep of each method at every rate.
SWEEP_FIELDS = ('final_eval_loss', 'final_eval_loss_std',
                'final_eval_loss_per_seed', 'steps_to_target_per_seed')
SWEPT_METHODS = BASELINES + (_runs.MATCHED, 'pace', 'pace/wsd',
                             'schedule_free', 'merge/linear', 'merge/mean')


def trainer(run: _runs.Run, model, eval_set, validation, eval_every):
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


def lowest(validation: dict) -> float:
  """The pullback whose returned model has the lowest mean validation
  loss over seeds (``validation[c]``; never the held-out loss)."""
  return min(validation, key=validation.get)


def choose_matched(methods: dict) -> dict:
  """Adds ``pace/matched``: the swept pullback ``lowest`` chooses."""
  prefix = _runs.MATCHED + '/pullback='
  swept = {float(k[len(prefix):]): m for k, m in methods.items()
           if k.startswith(prefix)}
  if swept:
    chosen = lowest({c: float(np.mean(m['final_validation_loss_per_seed']))
                     for c, m in swept.items()})
    methods[_runs.MATCHED] = dict(swept[chosen], chosen_pullback=chosen)
  return methods


def study(config, params, model, eval_set, validation, seed_batches,
          desc) -> dict:
  """``{lr: {method: results}}`` over the configured learning rates."""
  base_lr = config['base_lr']
  plan = {lr: _runs.runs(config, lr, base=lr == base_lr and config['extras'])
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
          bar.set_postfix(lr=lr, method=run.name,
                          seed=config['first_seed'] + seed, refresh=False)
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
        'ema', update_freq=_runs.UPDATE_FREQ,
        **dict(_runs.STABILIZER, lag=lag)), steps)
  baseline, matched = weights(_runs.STABILIZER['lag']), weights(1.0)
  s = np.arange(steps + 1)
  return dict(steps=steps,
              total_variation=float(np.abs(baseline - matched).sum() / 2),
              lag_ema=float(steps - s @ baseline),
              lag_matched=float(steps - s @ matched))


def never_reached(config: dict) -> int:
  """The steps counted for a model that never reaches AdamW's final loss:
  one evaluation past the last step."""
  return config['steps'] + config['eval_every']


def judge(by_lr: dict, base_lr: float, never: int) -> list[dict]:
  """The claims' verdicts from ``by_lr[lr][method]``'s per-seed final
  losses and steps to target; PACE's decided by ``pace/matched``."""
  evidence = _claims.Evidence(
      {lr: {k: m['final_eval_loss_per_seed'] for k, m in ms.items()}
       for lr, ms in by_lr.items()},
      {lr: {k: m['steps_to_target_per_seed'] for k, m in ms.items()}
       for lr, ms in by_lr.items()}, base_lr, never)
  return _claims.claims(evidence, BASELINES, paces=(
      (_runs.MATCHED, 'pace/matched: the ema baseline\'s average, pullback '
                      'chosen on validation at each rate'),
      ('pace', 'headline pace: pullback 0.15, ema_power 0.2, every step')))


def report(results: dict) -> str:
  """What a run prints: the base rate's table, the sweep over rates,
  telemetry, pace/matched and the claims."""
  methods, config = results['methods'], results['config']
  never = never_reached(config)
  lines = [f'pretrained model, held-out stdlib loss '
           f'{config["pretrain"]["held_out_loss"]:.4f}; {config["steps"]} '
           f'fine-tuning steps, {config["seeds"]} seed(s), lr '
           f'{config["learning_rate"]:g}',
           _finetune_report.table(methods, never)]
  if len(results['learning_rate_sweep']) > 1:
    lines.append('\n' + _finetune_report.sweep_table(
        results['learning_rate_sweep'], SWEPT_METHODS, BASELINES))
  for name, m in methods.items():
    if 'telemetry_at_end' in m:
      lines.append(f'{name} at the last step: ' + ', '.join(
          f'{k} {v:.4g}' for k, v in m['telemetry_at_end'].items()))
  if results['pace_matched']:
    lines.append('\n' + _finetune_report.matched_table(
        results['pace_matched'], results['matched_profiles']))
  lines.append('\nclaims (verdict rule: benchmarks/lm/_claims.py)\n'
               + _claims.table(results['claims']))
  return '\n'.join(lines)


def publish(results: dict, out_dir: str) -> str:
  """Writes ``results`` and their figure to ``out_dir`` and prints the
  report; returns the results' path."""
  config = results['config']
  path = _common.write_results(out_dir, results)
  _finetune_report.plot(results, out_dir,
                        f'{config["finetune_corpus"]}, {config["mode"]}',
                        SWEPT_METHODS, BASELINES)
  print('\n' + report(results))
  return path


def main(argv=None):
  started = time.time()
  args, setup = _runs.setup(argv, __doc__.splitlines()[0])
  if args.posthoc:  # the AdamW run at the base rate, trained once per seed
    posthoc.run(args.out, setup)
    return
  mode, config, model, params = (setup.mode, setup.config, setup.model,
                                 setup.params)
  pretrained_loss, corpus_name = setup.pretrained_loss, setup.corpus_name
  eval_set, context = setup.eval_set, config['model'].context
  rates = config['learning_rates']

  # Fixed per seed, so every method sees the same batches in the same order,
  # drawn from the training text without its validation windows.
  train_bytes, validation = _runs.validation_split(
      setup.train_bytes, config['eval_windows'], context)
  seed_batches = []
  first = config['first_seed']
  for seed in range(first, first + config['seeds']):
    rng = np.random.default_rng(1000 + seed)
    seed_batches.append([
        _lm.sample_batch(rng, train_bytes, config['batch'], context)
        for _ in range(config['steps'])])
  by_lr = study(config, params, model, eval_set, validation, seed_batches,
                f'fine-tuning on {corpus_name}')

  base_lr = config['base_lr']
  methods = by_lr[base_lr]
  never = never_reached(config)
  claims = judge(by_lr, base_lr, never)
  wall = time.time() - started
  results = dict(
      methods=methods,
      learning_rate_sweep={f'{lr:g}': {k: {f: m[f] for f in SWEEP_FIELDS}
                                       for k, m in ms.items()}
                           for lr, ms in by_lr.items()},
      claims=claims,
      pace_matched=_finetune_report.matched_summary(by_lr, _runs.MATCHED),
      matched_profiles=matched_profiles(config['steps']),
      config=dict(
          mode=mode, model=dataclasses.asdict(config['model']),
          pretrain=dict(config['pretrain'], corpus='stdlib source',
                        held_out_loss=pretrained_loss),
          finetune_corpus=corpus_name, steps=config['steps'],
          batch=config['batch'], eval_every=config['eval_every'],
          eval_windows=len(eval_set), seeds=config['seeds'],
          first_seed=config['first_seed'],
          learning_rate=base_lr, learning_rates=list(rates),
          schedules=dict(names=list(_schedules.SCHEDULES),
                         warmup_steps=_schedules.warmup_steps(config['steps']),
                         wsd_decay_fraction=_schedules.DECAY_FRACTION),
          acceleration_target='per seed, the final loss of adamw (constant '
                              f'rate) at the same lr; never = {never}',
          weight_decay=_runs.WEIGHT_DECAY, clip_norm=_runs.CLIP_NORM,
          stabilizer=dict(_runs.STABILIZER, update_freq=_runs.UPDATE_FREQ),
          update_freq_sweep=list(config['update_freqs']), pace=_runs.PACE,
          pullback_sweep=list(config['pullbacks']),
          pace_matched=dict(_runs.PACE_MATCHED,
                            pullback_sweep=list(config['matched_pullbacks']),
                            chosen_by='mean final validation loss over seeds, '
                            f'{len(validation)} windows of the training text'),
          merges=dict(steps=_runs.merge_steps(config['steps']),
                      shapes=list(_runs.MERGE_SHAPES),
                      every=_runs.MERGE_EVERY,
                      how='optax_bema.decay_profile(steps, T, shape) for '
                          'each shape, uniform_profile(steps, T) for the '
                          'mean; optax_bema.replay on the adamw run\'s '
                          'params at those steps'),
          pace_only=args.pace_only, merge_only=args.merge_only,
          ademamix_alpha=_runs.ADEMAMIX_ALPHA, machine=_common.machine_line(),
          wall_seconds=round(wall, 1)))
  path = publish(results, args.out)
  print(f'wrote {path} in {wall:.0f}s ({_common.machine_line()})')


if __name__ == '__main__':
  main()

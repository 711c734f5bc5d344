"""The language-model comparison: which returned model fine-tunes best?

A small byte-level transformer (``_lm.py``) is pretrained on the standard
library's source (cached, so re-runs skip it), then fine-tuned on the text of
``pydoc_data.topics`` (or ``--text FILE``) with a small batch and a constant
learning rate, the noisy regime the averaging papers target. Every method is
judged by the held-out loss of the model it would RETURN:

* ``adamw``: the last iterate of AdamW.
* ``ema``, ``bema``, ``ouema``, ``dema``: the library's stabilizers over that
  SAME AdamW trajectory (one run; each step's updates are handed to every
  stabilizer, see ``_common.Averages``), plus ``ema``/``bema`` at other
  ``update_freq`` values (``bema/f=1`` ...), free on the same trajectory.
* ``pace``: ``optax_bema.pace``'s EMA, and ``pace/pullback=c`` a sweep.
* ``adaptive_ademamix`` against the report's baselines, ``adamw`` and plain
  ``ademamix`` (``optax.contrib.ademamix``).

Every method sees the same batches (per seed), the same constant learning
rate and global-norm clipping at 1.0, so each difference is the method's.

  python benchmarks/finetune.py --quick --out benchmarks/results/finetune
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
import optax_bema
import tqdm

import _common
import _transforms
import _lm

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
ADEMAMIX_ALPHA = 4.0   # the report's alpha_base, so the baseline differs only
                       # by the adaptivity

# quick and full share the model and its pretraining, hence the cached
# checkpoint; full runs longer, on more seeds, with a larger evaluation set.
_MODEL = _lm.ModelConfig(width=128, layers=2, heads=4, context=64)
_PRETRAIN = dict(corpus_bytes=2_000_000, steps=600, batch=32,
                 learning_rate=3e-3)
_SWEEPS = dict(update_freqs=(1, 3, 10, 30), pullbacks=(0.0, 0.05, 0.15, 0.5))
CONFIGS = {
    'full': dict(model=_MODEL, pretrain=_PRETRAIN, steps=1000, batch=8,
                 eval_every=50, eval_windows=128, seeds=3, **_SWEEPS),
    'quick': dict(model=_MODEL, pretrain=_PRETRAIN, steps=300, batch=8,
                  eval_every=25, eval_windows=64, seeds=2, **_SWEEPS),
    # For the tests: every code path in seconds, numbers meaningless.
    'smoke': dict(
        model=_lm.ModelConfig(width=32, layers=1, heads=2, context=16),
        pretrain=dict(corpus_bytes=50_000, steps=4, batch=4,
                      learning_rate=3e-3),
        steps=4, batch=2, eval_every=2, eval_windows=4, seeds=1,
        update_freqs=(1, 10), pullbacks=(0.15,)),
}


@dataclasses.dataclass
class Run:
  """One optimizer trajectory and the models it returns.

  ``readout(opt_state, params)`` is the model named ``name``; ``averages``
  are stabilizers fed the same trajectory, each returning a model too;
  ``telemetry(opt_state)`` gives the scalars to report, by name.
  """
  name: str
  tx: optax.GradientTransformation
  readout: Callable[[Any, Any], Any]
  averages: _common.Averages = dataclasses.field(
      default_factory=lambda: _common.Averages({}))
  telemetry: Optional[Callable[[Any], dict]] = None


def _live(state, params):
  del state
  return params


def runs(config) -> list[Run]:
  clip = optax.clip_by_global_norm(CLIP_NORM)
  stabilizers = _common.make_stabilizers(_transforms.STABILIZERS,
                                       update_freq=UPDATE_FREQ, **STABILIZER)
  for f in config['update_freqs']:
    if f != UPDATE_FREQ:
      stabilizers.update(_common.make_stabilizers(
          SWEPT_STABILIZERS, suffix=f'/f={f}', update_freq=f, **STABILIZER))
  out = [Run('adamw', optax.chain(clip, optax.adamw(
      LEARNING_RATE, weight_decay=WEIGHT_DECAY)), _live,
             _common.Averages(stabilizers))]
  for c in config['pullbacks']:
    name = 'pace' if c == PACE['pullback'] else f'pace/pullback={c}'
    out.append(Run(name, optax.chain(clip, optax_bema.pace(
        LEARNING_RATE, weight_decay=WEIGHT_DECAY,
        **dict(PACE, pullback=c))), optax_bema.averaged_params,
                   telemetry=lambda s: optax_bema.pace_telemetry(s)._asdict()))
  # adaptive_ademamix clips inside (its clip_norm), before measuring noise.
  out.append(Run('adaptive_ademamix', optax_bema.adaptive_ademamix(
      LEARNING_RATE, alpha=ADEMAMIX_ALPHA, weight_decay=WEIGHT_DECAY,
      clip_norm=CLIP_NORM), _live, telemetry=lambda s: {
          k: optax.tree.get(s, k) for k in ('noise_fraction', 'alpha')}))
  out.append(Run('ademamix', optax.chain(clip, optax.contrib.ademamix(
      LEARNING_RATE, alpha=ADEMAMIX_ALPHA, weight_decay=WEIGHT_DECAY)), _live))
  return out


def trainer(run: Run, model, eval_set, eval_every):
  """Compiles ``run`` once; the returned function trains it on one seed.

  ``train(params, batches, bar)`` returns ``({model_name: [[step, loss]]},
  {field: value})``, the curves and the telemetry at the last step; step 0
  of a curve is the pretrained model, shared by every method.
  """
  def loss(p, windows):
    return _lm.loss_fn(model, p, windows)

  @jax.jit
  def step(params, state, average_states, windows):
    grads = jax.grad(loss)(params, windows)
    updates, state = run.tx.update(grads, state, params)
    average_states = run.averages.update(average_states, updates, params)
    return optax.apply_updates(params, updates), state, average_states

  @jax.jit
  def evaluate(params, state, average_states):
    models = run.averages.models(average_states, params)
    models[run.name] = run.readout(state, params)
    # One vmapped evaluation over the stacked models compiles once, not once
    # per model.
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *models.values())
    losses = jax.vmap(loss, in_axes=(0, None))(stacked, eval_set)
    return dict(zip(models, losses))

  def train(params, batches, bar):
    state, average_states = run.tx.init(params), run.averages.init(params)
    curves = {}
    for t in range(len(batches) + 1):
      if t:
        params, state, average_states = step(params, state, average_states,
                                             batches[t - 1])
        bar.update()
      if t % eval_every == 0 or t == len(batches):
        for k, v in evaluate(params, state, average_states).items():
          curves.setdefault(k, []).append([t, float(v)])
    telemetry = run.telemetry(state) if run.telemetry else {}
    return curves, {k: float(v) for k, v in telemetry.items()}
  return train


def aggregate(per_seed: list[dict], telemetry: dict) -> dict:
  """Mean curve over seeds; final loss mean, std and per seed; telemetry
  (``telemetry[name]``: one ``{field: value}`` per seed) averaged."""
  methods = {}
  for name in per_seed[0]:
    curves = np.array([seed[name] for seed in per_seed])  # seed, point, 2
    finals = curves[:, -1, 1]
    methods[name] = dict(
        final_eval_loss=float(finals.mean()),
        final_eval_loss_std=float(finals.std()),
        final_eval_loss_per_seed=finals.tolist(),
        curve=[[int(s), float(v)] for s, v in curves.mean(0)])
    if name in telemetry:
      methods[name]['telemetry_at_end'] = {
          k: float(np.mean([seed[k] for seed in telemetry[name]]))
          for k in telemetry[name][0]}
  return methods


def table(methods: dict, baseline: str = 'adamw') -> str:
  """Final losses, best first. The difference to AdamW is paired by seed
  (the same batches), so its spread is much smaller than the losses'."""
  base = np.array(methods[baseline]['final_eval_loss_per_seed'])

  def spread(values):
    return f'+-{np.std(values):.4f}' if len(values) > 1 else ''
  lines = [f'{"method":22s} {"final eval loss":>17s} '
           f'{"vs adamw (paired)":>19s} {"best on curve":>13s}']
  for name, m in sorted(methods.items(),
                        key=lambda kv: kv[1]['final_eval_loss']):
    finals = np.array(m['final_eval_loss_per_seed'])
    diff = finals - base
    best = min(v for _, v in m['curve'])
    lines.append(f'{name:22s} {finals.mean():8.4f} {spread(finals):>8s} '
                 f'{diff.mean():+10.4f} {spread(diff):>8s} {best:13.4f}')
  return '\n'.join(lines)


def plot(methods: dict, out_dir: str, title: str) -> str:
  curves = {k: v['curve'] for k, v in methods.items()}
  panels = {
      'methods': [k for k in curves if '/' not in k],
      'update_freq sweep': [k for k in curves if k.split('/')[0]
                            in SWEPT_STABILIZERS],
      'pullback sweep': [k for k in curves if k.split('/')[0] == 'pace'],
  }
  fig, axes = plt.subplots(1, len(panels), figsize=(16, 4.5))
  for ax, (what, names) in zip(axes, panels.items()):
    _common.plot_curves(ax, {k: curves[k] for k in sorted(names)},
                        title=f'{title}: {what}',
                        ylabel='held-out loss of returned model (nats/byte)')
    # The first points (the pretrained model on new text) dwarf the rest.
    tail = ([v for k in names for _, v in curves[k][2:]]
            or [v for k in names for _, v in curves[k]])
    ax.set_ylim(min(tail) - 0.02, max(tail) + 0.02)
  return _common.save_figure(fig, out_dir, 'finetune.png')


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  _common.add_common_args(parser, 'benchmarks/results/finetune')
  parser.add_argument('--smoke', action='store_true',
                      help='a tiny configuration for tests (seconds)')
  parser.add_argument('--text', help='fine-tune on this text file instead of '
                      'pydoc_data.topics (its last 10%% is held out)')
  parser.add_argument('--seeds', type=int, help='seeds (override)')
  parser.add_argument('--steps', type=int, help='fine-tuning steps (override)')
  parser.add_argument('--cache', default=os.path.join(
      os.path.expanduser('~'), '.cache', 'optax_bema'),
                      help='where the pretrained checkpoint is cached')
  args = parser.parse_args()
  mode = 'smoke' if args.smoke else 'quick' if args.quick else 'full'
  config = dict(CONFIGS[mode])
  config['seeds'] = args.seeds or config['seeds']
  config['steps'] = args.steps or config['steps']
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

  all_runs = runs(config)
  # Fixed per seed, so every method sees the same batches in the same order.
  seed_batches = []
  for seed in range(config['seeds']):
    rng = np.random.default_rng(1000 + seed)
    seed_batches.append([
        _lm.sample_batch(rng, train_bytes, config['batch'], context)
        for _ in range(config['steps'])])
  per_seed, telemetry = [{} for _ in seed_batches], {}
  with tqdm.tqdm(total=config['seeds'] * len(all_runs) * config['steps'],
                 desc=f'fine-tuning on {corpus_name}') as bar:
    for run in all_runs:
      train = trainer(run, model, eval_set, config['eval_every'])
      for seed, batches in enumerate(seed_batches):
        bar.set_postfix(method=run.name, seed=seed, refresh=False)
        curves, telemetry_at_end = train(params, batches, bar)
        per_seed[seed].update(curves)
        if run.telemetry:
          telemetry.setdefault(run.name, []).append(telemetry_at_end)

  methods = aggregate(per_seed, telemetry)
  wall = time.time() - started
  results = dict(methods=methods, config=dict(
      mode=mode, model=dataclasses.asdict(config['model']),
      pretrain=dict(config['pretrain'], corpus='stdlib source',
                    held_out_loss=pretrained_loss),
      finetune_corpus=corpus_name, steps=config['steps'],
      batch=config['batch'], eval_every=config['eval_every'],
      eval_windows=len(eval_set), seeds=config['seeds'],
      learning_rate=LEARNING_RATE, weight_decay=WEIGHT_DECAY,
      clip_norm=CLIP_NORM, stabilizer=dict(STABILIZER, update_freq=UPDATE_FREQ),
      update_freq_sweep=list(config['update_freqs']), pace=PACE,
      pullback_sweep=list(config['pullbacks']),
      ademamix_alpha=ADEMAMIX_ALPHA, machine=_common.machine_line(),
      wall_seconds=round(wall, 1)))
  path = _common.write_results(args.out, results)
  plot(methods, args.out, f'{corpus_name}, {mode}')
  print(f'\npretrained model, held-out stdlib loss {pretrained_loss:.4f}; '
        f'{config["steps"]} fine-tuning steps, {config["seeds"]} seed(s)')
  print(table(methods))
  for name, m in methods.items():
    if 'telemetry_at_end' in m:
      print(f'{name} at the last step: ' + ', '.join(
          f'{k} {v:.4g}' for k, v in m['telemetry_at_end'].items()))
  print(f'wrote {path} in {wall:.0f}s ({_common.machine_line()})')


if __name__ == '__main__':
  main()

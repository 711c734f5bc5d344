"""What does a bfloat16 average lose against a float32 one on a language model?

The language model of ``benchmarks/lm`` (pretrained and cached there),
fine-tuned with AdamW as in its study (clipped, constant rate 1e-3, weight
decay 0.01), each average run twice in the same chain: with float32
accumulators and with ``accumulator_dtype=jnp.bfloat16`` (rounded
stochastically; stored as deviations from the params when updated every
step, by value otherwise). Reports, per average, the distance ``||avg16 -
avg32|| / ||avg32 - theta_T||``, the held-out loss of each, and the bytes
per parameter of each state as measured on its arrays.

  python benchmarks/cost/low_precision.py --quick
"""

from __future__ import annotations

import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

import optax_bema

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / 'lm'))
# pylint: disable=g-import-not-at-top,wrong-import-position
import _common
import _lm
import _runs

DTYPES = {'float32': None, 'bfloat16': jnp.bfloat16}


def averages_by_name(accumulator_dtype) -> dict:
  b, kw = optax_bema, dict(accumulator_dtype=accumulator_dtype)
  return {'ema': b.ema(update_freq=1, **kw),
          'bema': b.bema(update_freq=1, **kw),
          'dema': b.dema(update_freq=1, **kw),
          'ouema': b.ouema(update_freq=1, **kw),
          'power_ema(0.1)': b.power_ema(0.1, **kw),
          'ema(update_freq=10), by value': b.ema(update_freq=10, **kw)}


def posthoc_members() -> tuple[str, ...]:
  state = optax_bema.posthoc_ema().init(jnp.zeros(1))
  return tuple(optax.tree.get(state, 'members'))


def state_bytes(tx, params) -> int:
  state = jax.eval_shape(tx.init, params)
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))


def main(argv=None):
  args, s = _runs.setup(argv, __doc__.split('\n')[0],
                        'benchmarks/results/cost/low_precision')
  config, context = s.config, s.config['model'].context
  t0 = time.time()
  tracked = {}
  for dtype, accumulator in DTYPES.items():
    tracked.update({f'{k} {dtype}': t for k, t in
                    averages_by_name(accumulator).items()})
  posthoc = {dtype: optax_bema.posthoc_ema(accumulator_dtype=accumulator)
             for dtype, accumulator in DTYPES.items()}
  tx = optax.chain(
      optax.clip_by_global_norm(_runs.CLIP_NORM),
      optax.adamw(_runs.LEARNING_RATE, weight_decay=_runs.WEIGHT_DECAY),
      optax_bema.averages(**tracked), *posthoc.values())
  size = sum(x.size for x in jax.tree.leaves(s.params))
  memory = {f'{k} {dtype}': state_bytes(t, s.params) / size
            for dtype, accumulator in DTYPES.items()
            for k, t in averages_by_name(accumulator).items()}
  memory.update({f'posthoc_ema() {dtype}': state_bytes(t, s.params) / size
                 for dtype, t in posthoc.items()})

  @jax.jit
  def step(params, state, windows):
    grads = jax.grad(lambda p: _lm.loss_fn(s.model, p, windows))(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  params, state = s.params, tx.init(s.params)
  rng = np.random.default_rng(0)
  for _ in tqdm.trange(config['steps'], desc='fine-tuning', leave=False):
    params, state = step(params, state, _lm.sample_batch(
        rng, s.train_bytes, config['batch'], context))
  evaluate = jax.jit(lambda p: _lm.loss_fn(s.model, p, s.eval_set))
  flat = lambda tree: np.concatenate([np.ravel(np.asarray(x, np.float64))
                                      for x in jax.tree.leaves(tree)])
  last = flat(params)
  models = {k: optax_bema.averaged_params(state[2], params, name=k)
            for k in tracked}
  for i, dtype in enumerate(DTYPES):
    models.update({f'posthoc_ema() {k} {dtype}': optax_bema.averaged_params(
        state[3 + i], params, name=k) for k in posthoc_members()})
  rows = []
  for name in dict.fromkeys(k.rsplit(' ', 1)[0] for k in models):
    wide, narrow = (models[f'{name} {d}'] for d in DTYPES)
    moved = np.linalg.norm(flat(wide) - last)
    rows.append(dict(
        average=name, distance=float(np.linalg.norm(flat(narrow) - flat(wide))
                                     / moved),
        moved=float(moved), loss_float32=float(evaluate(wide)),
        loss_bfloat16=float(evaluate(narrow))))
    print(f'{name:34s} ||avg16 - avg32|| / ||avg32 - theta_T|| '
          f'{rows[-1]["distance"]:.3%}; held-out loss float32 '
          f'{rows[-1]["loss_float32"]:.4f}, bfloat16 '
          f'{rows[-1]["loss_bfloat16"]:.4f}', flush=True)
  results = dict(
      mode=s.mode, steps=config['steps'], batch=config['batch'],
      learning_rate=_runs.LEARNING_RATE, corpus=s.corpus_name,
      parameters=size, final_loss=float(evaluate(params)), rows=rows,
      bytes_per_parameter=memory, machine=_common.machine(),
      seconds=time.time() - t0)
  print(f'theta_T held-out loss {results["final_loss"]:.4f}; bytes per '
        f'parameter: {memory}')
  print('written to', _common.write_results(args.out, results))


if __name__ == '__main__':
  main()

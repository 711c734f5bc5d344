"""Writes ``posthoc_v1/``: snapshots of a short run, as optax_bema 0.1.0
saved them (the averages' record format 1). Run once, from the repository
root, when a new format version is introduced; never rewrite an old one:
``tests/test_saved_format.py`` checks that it keeps restoring.

  python tests/data/make_posthoc_checkpoint.py
"""

import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

import optax_bema

HERE = pathlib.Path(__file__).resolve().parent / 'posthoc_v1'
STEPS, SAVED = 40, (0, 10, 20, 30, 35, 38, 39, 40)


def tracked():
  """The averages tracked in the saved run."""
  return optax_bema.posthoc_ema(ema_powers=(0.3, 0.9), stds=(0.1,))


def main():
  if HERE.exists():
    shutil.rmtree(HERE)
  tx = optax.chain(optax.sgd(0.1), tracked())
  curvature = jnp.asarray([1.0, 0.3, 0.1])
  params = {'w': jnp.full(3, 2.0), 'b': jnp.asarray(-1.0)}
  state = tx.init(params)
  iterates = [params]
  keys = jax.random.split(jax.random.key(0), STEPS)
  checkpointer = ocp.StandardCheckpointer()
  for step in range(STEPS + 1):
    if step:
      noise = jax.random.normal(keys[step - 1], (4,))
      grads = {'w': curvature * params['w'] + noise[:3],
               'b': params['b'] + noise[3]}
      updates, state = tx.update(grads, state, params)
      params = optax.apply_updates(params, updates)
      iterates.append(params)
    if step in SAVED:
      checkpointer.save(HERE / f'step_{step}',
                        {'opt_state': state[1], 'params': params})
  checkpointer.wait_until_finished()
  np.savez(HERE / 'iterates.npz',
           **{k: np.stack([np.asarray(p[k]) for p in iterates])
              for k in ('w', 'b')})


if __name__ == '__main__':
  main()

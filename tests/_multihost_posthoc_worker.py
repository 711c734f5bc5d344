"""One process of test_multihost_posthoc.py, or its one-process reference.

``python tests/_multihost_posthoc_worker.py OUT CKPT PROCESS_ID
NUM_PROCESSES PORT`` joins ``jax.distributed`` on 127.0.0.1:PORT with 2 CPU
devices of its own and trains ``chain(adamw, posthoc_ema)`` on a model whose
weight matrix is split over every device (rows over the processes, columns
over each process's devices), saving the averages' state and the params
with Orbax at every step under CKPT (each process writes its own shards).
It then restores them (each process reading its own shards) and runs
``synthesize``, ``replay`` and ``choose`` on the restored snapshots (choose
with its default candidates, scored by a jitted loss of the global
arrays, and the table's scores written out too); the models must
keep the params' shardings. Only then are they gathered, for the test to
compare, and written to OUT (.npz). NUM_PROCESSES=1 is the one-process run
on a single device, without ``jax.distributed``.
"""

import pathlib
import sys

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import orbax.checkpoint as ocp

import optax_bema

# The shared harness; importing it sets the devices per process (read when
# jax first starts its backend, after these imports).
import _multihost_worker

STEPS = 12
SYNTHESIS_STEPS = (0, 4, 8, 10, 11, 12)


def targets():
  return dict(
      synthesize={'bema': optax_bema.bema(update_freq=1),
                  'power': optax_bema.power_ema(0.05),
                  'last3': optax_bema.uniform_profile([10, 11, 12], STEPS)},
      replay={'ema': optax_bema.ema(update_freq=2, ema_power=0.7),
              'swa': optax_bema.uniform_profile(range(6, STEPS + 1), STEPS)})


def host_data():
  rng = np.random.default_rng(0)
  params = {'w': rng.normal(size=(8, 4)).astype(np.float32),
            'b': np.zeros((4,), np.float32)}
  grads = [{'w': rng.normal(size=(8, 4)).astype(np.float32),
            'b': rng.normal(size=(4,)).astype(np.float32)}
           for _ in range(STEPS)]
  return params, grads


def run(put, ckpt: pathlib.Path):
  """Trains, saves, restores, synthesizes and replays; the models."""
  host_params, host_grads = host_data()
  tx = optax.chain(optax.adamw(0.1), optax_bema.posthoc_ema(
      ema_powers=(0.5,), stds=(0.1,)))
  params = put(host_params)
  state = jax.jit(tx.init)(params)  # global arrays, scalars too
  step = jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u),
                                                s))(*tx.update(g, s, p)))
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(ckpt / '0', {'averages': state[1], 'params': params})
  for t, grads in enumerate(host_grads, start=1):
    params, state = step(params, state, put(grads))
    checkpointer.save(ckpt / str(t), {'averages': state[1], 'params': params})
  checkpointer.wait_until_finished()
  like = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      {'averages': state[1], 'params': params})

  def restore(t):
    saved = checkpointer.restore(ckpt / str(t), like)
    return saved['averages'], saved['params']

  chosen = targets()
  synthesized = optax_bema.synthesize(
      chosen['synthesize'], [restore(t) for t in SYNTHESIS_STEPS])
  replayed = optax_bema.replay(
      chosen['replay'], [(t, restore(t)[1]) for t in range(STEPS + 1)])
  choice = optax_bema.choose(
      [restore(t) for t in SYNTHESIS_STEPS],
      lambda p: jnp.sum(jnp.square(p['w'] - 0.5)) + jnp.sum(p['b'] ** 2),
      progress=False)
  scores = np.array([r.score for r in choice.table])
  models = {**synthesized.model, **replayed, 'choose': choice.model,
            'choose_table': {'scores': scores, 'chosen': np.array(
                [r.name == choice.name for r in choice.table])}}
  for name, model in models.items():
    if name == 'choose_table':
      continue
    for k in model:
      assert model[k].sharding.is_equivalent_to(params[k].sharding, 2), (
          name, k, model[k].sharding, params[k].sharding)
  return models, params


def main(out, ckpt, process_id, num_processes, port):
  ckpt = pathlib.Path(ckpt)
  if num_processes == 1:
    device = jax.devices()[0]
    models, params = run(lambda tree: jax.device_put(tree, device), ckpt)
    np.savez(out, **{f'{name}/{k}': np.asarray(v)
                     for name, model in {**models, 'params': params}.items()
                     for k, v in model.items()})
    return
  with _multihost_worker.joined(process_id, num_processes, port) as mesh:
    specs = {'w': P('data', 'model'), 'b': P('model')}

    def put(tree):
      return {k: jax.make_array_from_callback(
          v.shape, NamedSharding(mesh, specs[k]), lambda index, v=v: v[index])
              for k, v in tree.items()}

    models, params = run(put, ckpt)
    assert not params['w'].is_fully_addressable  # split over the processes
    table = models.pop('choose_table')
    gathered = multihost_utils.process_allgather(
        {**models, 'params': params}, tiled=True)
    gathered['choose_table'] = table
    np.savez(out, **{f'{name}/{k}': np.asarray(v)
                     for name, model in gathered.items()
                     for k, v in model.items()})


if __name__ == '__main__':
  main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]),
       int(sys.argv[5]))

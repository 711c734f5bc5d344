"""One process of the multi-host test (test_multihost.py), or its reference.

``python tests/_multihost_worker.py OUT PROCESS_ID NUM_PROCESSES PORT``
joins ``jax.distributed`` on 127.0.0.1:PORT with 2 CPU devices of its own,
trains one model sharded over every process's devices with
``chain(adamw, bema)`` and with PACE, and writes the params and averaged
model, gathered to every process, to OUT as .npz. NUM_PROCESSES=1 is the
one-process run on a single device, without ``jax.distributed``.
"""

import contextlib
import os
import sys

LOCAL_DEVICES = 2
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           f' --xla_force_host_platform_device_count='
                           f'{LOCAL_DEVICES}')

import jax  # pylint: disable=g-import-not-at-top
from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
from jax.sharding import NamedSharding  # pylint: disable=g-import-not-at-top
from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
import optax  # pylint: disable=g-import-not-at-top

import optax_bema  # pylint: disable=g-import-not-at-top

STEPS = 6
BATCH, DIM_IN, DIM_OUT = 16, 8, 4


def optimizers():
  return {
      'adamw_bema': optax.chain(optax.adamw(1e-2),
                                optax_bema.bema(update_freq=2,
                                                update_after=1)),
      'pace': optax_bema.pace(1e-2, pullback=0.15, ema_power=0.2),
  }


def host_data():
  rng = np.random.default_rng(0)
  params = {'w': rng.normal(size=(DIM_IN, DIM_OUT)).astype(np.float32),
            'b': np.zeros((DIM_OUT,), np.float32)}
  batches = [(rng.normal(size=(BATCH, DIM_IN)).astype(np.float32),
              rng.normal(size=(BATCH, DIM_OUT)).astype(np.float32))
             for _ in range(STEPS)]
  return params, batches


def loss_fn(params, x, y):
  return jnp.mean((jnp.tanh(x @ params['w'] + params['b']) - y) ** 2)


def train(tx, params, batches, put_batch):
  @jax.jit
  def step(params, state, x, y):
    grads = jax.grad(loss_fn)(params, x, y)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  for x, y in batches:
    params, state = step(params, state, *put_batch(x, y))
  return params, optax_bema.averaged_params(state, params)


@contextlib.contextmanager
def joined(process_id, num_processes, port):
  """This process in ``jax.distributed`` on loopback, for the block; yields
  the mesh of every process's devices: 'data' over the processes, 'model'
  over each one's own devices."""
  jax.distributed.initialize(coordinator_address=f'127.0.0.1:{port}',
                             num_processes=num_processes,
                             process_id=process_id,
                             initialization_timeout=60)
  try:
    assert jax.process_count() == num_processes
    assert jax.local_device_count() == LOCAL_DEVICES
    yield jax.make_mesh((num_processes, LOCAL_DEVICES), ('data', 'model'))
    multihost_utils.sync_global_devices('done')
  finally:
    jax.distributed.shutdown()


def main(out, process_id, num_processes, port):
  host_params, batches = host_data()
  results = {}
  if num_processes == 1:
    device = jax.devices()[0]
    for name, tx in optimizers().items():
      params, model = train(tx, jax.device_put(host_params, device), batches,
                            lambda x, y: (x, y))
      results.update({f'{name}/params/{k}': np.asarray(v)
                      for k, v in params.items()})
      results.update({f'{name}/averaged/{k}': np.asarray(v)
                      for k, v in model.items()})
    np.savez(out, **results)
    return

  with joined(process_id, num_processes, port) as mesh:
    # data parallel across the processes, the output units across each
    # process's own devices
    specs = {'w': P(None, 'model'), 'b': P('model')}

    def global_array(value, spec):
      sharding = NamedSharding(mesh, spec)
      return jax.make_array_from_callback(value.shape, sharding,
                                          lambda index: value[index])

    put_batch = lambda x, y: (global_array(x, P('data')),
                              global_array(y, P('data', 'model')))
    for name, tx in optimizers().items():
      params = {k: global_array(v, specs[k]) for k, v in host_params.items()}
      params, model = train(tx, params, batches, put_batch)
      for k in params:
        assert model[k].sharding == params[k].sharding, (name, k)
      gathered = multihost_utils.process_allgather(
          {'params': params, 'averaged': model}, tiled=True)
      for part, tree in gathered.items():
        results.update({f'{name}/{part}/{k}': np.asarray(v)
                        for k, v in tree.items()})
    np.savez(out, **results)


if __name__ == '__main__':
  main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))

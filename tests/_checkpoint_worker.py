"""One process of the kill-and-resume test (test_checkpoint.py).

``python tests/_checkpoint_worker.py MODE CKPT_DIR OUT`` with MODE
- ``straight``: train STEPS steps, never interrupted;
- ``killed``: train, save a checkpoint after step SAVE_AT, train one step
  more, print READY and wait for the SIGKILL that the test sends;
- ``resume``: restore the checkpoint into a target built from
  ``jax.eval_shape(tx.init, params)`` with shardings, and train to STEPS.
``straight`` and ``resume`` write the final params and averaged model to OUT
(.npz). Params are sharded over 2 CPU devices; with update_freq=3 and
update_after=1 the update steps are 1, 4, 7, 10, so the checkpoint (step 5)
and the kill (after step 6) land between two update steps.
"""

import os
import sys
import time

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '')
                           + ' --xla_force_host_platform_device_count=2')

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
from jax.sharding import AxisType  # pylint: disable=g-import-not-at-top
from jax.sharding import NamedSharding  # pylint: disable=g-import-not-at-top
from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
import optax  # pylint: disable=g-import-not-at-top
import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

import optax_bema  # pylint: disable=g-import-not-at-top

STEPS, SAVE_AT = 10, 5
HP = dict(update_freq=3, update_after=1)
FLOAT = {'w': True, 'b': True, 'seen': False}


def optimizers():
  adamw = lambda: optax.masked(optax.adamw(1e-2), FLOAT)
  return {
      # an integer leaf: MaskedNode in the state
      'bema': optax.chain(adamw(), optax_bema.bema(**HP)),
      # last_iterate=None in the state
      'bema_freq1': optax.chain(adamw(), optax_bema.bema(update_freq=1)),
      'ouema': optax.chain(adamw(), optax_bema.ouema(**HP)),
      'dema_offload': optax.chain(adamw(), optax_bema.dema(
          **HP, offload_to_host=True)),
      'pace': optax.masked(optax_bema.pace(1e-2, pullback=0.15,
                                           ema_power=0.2, update_freq=3),
                           FLOAT),
  }


def initial_params(mesh):
  rng = np.random.default_rng(0)
  values = {'w': rng.normal(size=(4, 3)).astype(np.float32),
            'b': np.zeros(3, np.float32),
            'seen': np.zeros(2, np.int32)}
  specs = {'w': P('data'), 'b': P(), 'seen': P('data')}
  return {k: jax.device_put(v, NamedSharding(mesh, specs[k]))
          for k, v in values.items()}


def batch(step):
  """The data of a step depends on the step alone, so a resumed run sees
  what the uninterrupted run saw."""
  rng = np.random.default_rng(1000 + step)
  return (rng.normal(size=(8, 4)).astype(np.float32),
          rng.normal(size=(8, 3)).astype(np.float32))


def make_step(tx):
  def loss_fn(params, x, y):
    return jnp.mean((jnp.tanh(x @ params['w'] + params['b']) - y) ** 2)

  @jax.jit
  def step(params, state, x, y):
    grads = jax.grad(loss_fn, allow_int=True)(params, x, y)
    grads['seen'] = jnp.zeros_like(params['seen'])
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    params['seen'] = params['seen'] + 1
    return params, state
  return step


def restore_target(tx, params, mesh):
  """Shapes, dtypes and shardings of {params, opt_state}, nothing computed."""
  def with_sharding(x):
    # eval_shape leaves the shardings of scalars unset: replicate them.
    spec = P() if x.sharding is None else x.sharding.spec
    return jax.ShapeDtypeStruct(x.shape, x.dtype,
                                sharding=NamedSharding(mesh, spec))
  abstract = {'params': jax.eval_shape(lambda p: p, params),
              'opt_state': jax.eval_shape(tx.init, params)}
  return jax.tree.map(with_sharding, abstract)


def main(mode, ckpt_dir, out):
  mesh = jax.make_mesh((2,), ('data',), axis_types=(AxisType.Explicit,))
  results = {}
  with jax.set_mesh(mesh):
    for name, tx in optimizers().items():
      step_fn = make_step(tx)
      params = initial_params(mesh)
      manager = ocp.CheckpointManager(os.path.join(ckpt_dir, name))
      if mode == 'resume':
        start = manager.latest_step()
        restored = manager.restore(start, args=ocp.args.StandardRestore(
            restore_target(tx, params, mesh)))
        params, state = restored['params'], restored['opt_state']
      else:
        start, state = 0, tx.init(params)
      last = SAVE_AT + 1 if mode == 'killed' else STEPS
      for step in range(start + 1, last + 1):
        params, state = step_fn(params, state, *batch(step))
        if mode == 'killed' and step == SAVE_AT:
          manager.save(step, args=ocp.args.StandardSave(
              {'params': params, 'opt_state': state}))
          manager.wait_until_finished()
      manager.close()
      model = optax_bema.averaged_params(state, params)
      results[f'{name}/memory_kinds'] = np.array(sorted(
          {leaf.sharding.memory_kind for leaf in jax.tree.leaves(state)}))
      results.update({f'{name}/params/{k}': np.asarray(v)
                      for k, v in params.items()})
      results.update({f'{name}/averaged/{k}': np.asarray(v)
                      for k, v in model.items()})
  if mode == 'killed':
    print('READY', flush=True)
    time.sleep(600)  # until the test's SIGKILL
  np.savez(out, **results)


if __name__ == '__main__':
  main(*sys.argv[1:])

"""Run by test_sharding.py in a subprocess with 8 CPU devices.

``python tests/_sharded_worker.py {explicit,auto}`` trains every stabilizer
(and PACE, when the package has it) on params sharded over a 4x2 mesh and
prints one JSON report: the shardings of every params-shaped state leaf and
of ``averaged_params`` after init and after each jitted update, and the
largest difference from the same run on one device.
"""

import json
import os
import sys

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '')
                           + ' --xla_force_host_platform_device_count=8')

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
from jax.sharding import AxisType  # pylint: disable=g-import-not-at-top
from jax.sharding import NamedSharding  # pylint: disable=g-import-not-at-top
from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
import optax  # pylint: disable=g-import-not-at-top

import optax_bema  # pylint: disable=g-import-not-at-top

STEPS = 7
SPECS = {'kernel': P('data', 'model'), 'bias': P('model'),
         'embed': P(None, 'data'), 'scale': P()}


def make_params():
  rng = np.random.default_rng(0)
  return {'kernel': rng.normal(size=(8, 8)).astype(np.float32),
          'bias': rng.normal(size=(8,)).astype(np.float32),
          'embed': rng.normal(size=(4, 8)).astype(np.float32),
          'scale': np.float32(1.5)}


def grads_at(params, step):
  """Elementwise, so the sharded run can match one device bit for bit."""
  return jax.tree.map(lambda p: jnp.sin(3.0 * p + 0.1 * step) + 0.2, params)


def optimizers():
  hp = dict(update_freq=2, update_after=1)
  txs = {
      'ema': optax_bema.ema(**hp),
      'bema': optax_bema.bema(**hp),
      'bema_freq1': optax_bema.bema(update_freq=1),
      'dema': optax_bema.dema(**hp),
      'ouema': optax_bema.ouema(**hp),
      'bema_offload': optax_bema.bema(**hp, offload_to_host=True),
  }
  txs = {k: optax.chain(optax.adamw(1e-2), v) for k, v in txs.items()}
  if hasattr(optax_bema, 'pace'):
    txs['pace'] = optax_bema.pace(1e-2, pullback=0.15, ema_power=0.2)
  return txs


def params_shaped(state, params):
  """(path, leaf, param) for every state leaf whose path ends in a param's."""
  by_key = {jax.tree_util.keystr(path): p for path, p in
            jax.tree_util.tree_flatten_with_path(params)[0]}
  found = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    key = jax.tree_util.keystr(path)
    for suffix, p in by_key.items():
      if key.endswith(suffix) and np.shape(leaf) == np.shape(p):
        found.append((key, leaf, p))
  return found


def same_layout(a, b, ndim):
  """Same devices, partitioning and memory kind (P() is P(None, None))."""
  return a.memory_kind == b.memory_kind and a.is_equivalent_to(b, ndim)


def sharding_errors(state, params, model, memory_kind_of):
  """Every mismatch between a leaf's sharding and its parameter's."""
  errors = []
  for key, leaf, p in params_shaped(state, params):
    want = p.sharding.with_memory_kind(memory_kind_of(key))
    if not same_layout(leaf.sharding, want, leaf.ndim):
      errors.append(f'state{key}: {leaf.sharding} != {want}')
  for (path, m), p in zip(jax.tree_util.tree_flatten_with_path(model)[0],
                          jax.tree.leaves(params)):
    if not same_layout(m.sharding, p.sharding, p.ndim):
      errors.append(f'averaged{jax.tree_util.keystr(path)}: {m.sharding} != '
                    f'{p.sharding}')
  return errors


def train(tx, params, check=None):
  """STEPS jitted steps from ``tx.init(params)``, called as users call it."""
  def step_fn(params, state, step):
    updates, state = tx.update(grads_at(params, step), state, params)
    return optax.apply_updates(params, updates), state
  step_fn = jax.jit(step_fn)
  readout = jax.jit(optax_bema.averaged_params)
  state = tx.init(params)
  if check:
    check('init', state, params, optax_bema.averaged_params(state, params))
  for step in range(1, STEPS + 1):
    params, state = step_fn(params, state, jnp.float32(step))
    if check and step in (1, 2, STEPS):
      check(f'step {step}', state, params, readout(state, params))
  return params, readout(state, params), state


def main(axis_type):
  kind = {'explicit': AxisType.Explicit, 'auto': AxisType.Auto}[axis_type]
  mesh = jax.make_mesh((4, 2), ('data', 'model'), axis_types=(kind, kind))
  host = make_params()
  report = {'devices': jax.device_count(), 'cases': {}}
  for name, tx in optimizers().items():
    offload = name.endswith('offload')
    errors = []

    def check(when, state, params, model, errors=errors, offload=offload):
      # the stabilizer is the chain's second element, state[1]
      kinds = lambda key: ('pinned_host' if offload and key.startswith('[1]')
                           else 'device')
      errors.extend(f'{when}: {e}'
                    for e in sharding_errors(state, params, model, kinds))

    with jax.set_mesh(mesh):
      sharded = {k: jax.device_put(v, NamedSharding(mesh, SPECS[k]))
                 for k, v in host.items()}
      params, model, _ = train(tx, sharded, check)
    one = jax.devices()[0]
    ref_params, ref_model, _ = train(tx, jax.device_put(host, one))
    report['cases'][name] = {
        'sharding_errors': errors[:5],
        'params_diff': max_diff(params, ref_params),
        'averaged_diff': max_diff(model, ref_model),
        'averaged_moved': max_diff(model, host),
    }
  report['zero'] = zero_style(mesh, axis_type)
  report['zero_synthesis'] = zero_synthesis(mesh)
  print(json.dumps(report))


def zero_style(mesh, axis_type):
  """The stabilizer's state sharded over the data axis too, params not."""
  host = make_params()
  param_specs = {'kernel': P(None, 'model'), 'bias': P('model'),
                 'embed': P(), 'scale': P()}
  state_specs = {'kernel': P('data', 'model'), 'bias': P(('data', 'model')),
                 'embed': P('data', None), 'scale': P()}
  hp = dict(update_freq=2, update_after=1)
  out = {}
  for name, stabilizer in (('bema', optax_bema.bema(**hp)),
                           ('bema_freq1', optax_bema.bema(update_freq=1)),
                           ('bema_offload', optax_bema.bema(
                               **hp, offload_to_host=True))):
    tx = optax.chain(optax.adamw(1e-2), stabilizer)
    errors = []
    with jax.set_mesh(mesh):
      params = {k: jax.device_put(v, NamedSharding(mesh, param_specs[k]))
                for k, v in host.items()}
      adam_state, ours = tx.init(params)
      ours = jax.tree.map(
          lambda sub: {k: jax.device_put(v, v.sharding.update(
              spec=state_specs[k])) for k, v in sub.items()}
          if isinstance(sub, dict) else sub,
          ours, is_leaf=lambda x: isinstance(x, dict))
      state = (adam_state, ours)
      want = jax.tree.map(lambda x: x.sharding, state)
      def step_fn(params, state, step):
        updates, state = tx.update(grads_at(params, step), state, params)
        return optax.apply_updates(params, updates), state
      step_fn = jax.jit(step_fn, out_shardings=(
          jax.tree.map(lambda x: x.sharding, params), want))
      for step in range(1, STEPS + 1):
        params, state = step_fn(params, state, jnp.float32(step))
        if not all(jax.tree.leaves(jax.tree.map(
            lambda x, s: same_layout(x.sharding, s, x.ndim), state, want))):
          errors.append(f'step {step}: the state left its layout')
      readouts = {'eager': optax_bema.averaged_params(state, params)}
      if axis_type == 'explicit':
        readouts['jit'] = jax.jit(optax_bema.averaged_params)(state, params)
      for how, model in readouts.items():
        errors += [f'{how} averaged[{k}]: {model[k].sharding} != '
                   f'{params[k].sharding}' for k in model
                   if not same_layout(model[k].sharding, params[k].sharding,
                                      params[k].ndim)]
    ref_params, ref_model, _ = train(tx, jax.device_put(host, jax.devices()[0]))
    out[name] = {'errors': errors[:5],
                 'averaged_diff': max_diff(readouts['eager'], ref_model),
                 'params_diff': max_diff(params, ref_params)}
  return out


def zero_synthesis(mesh):
  """posthoc_ema's averages sharded over the data axis too, params not:
  synthesize returns the params' layout and one device's numbers."""
  host = make_params()
  param_specs = {'kernel': P(None, 'model'), 'bias': P('model'),
                 'embed': P(), 'scale': P()}
  state_specs = {'kernel': P('data', 'model'), 'bias': P(('data', 'model')),
                 'embed': P('data', None), 'scale': P()}
  tx = optax.chain(optax.adamw(1e-2),
                   optax_bema.posthoc_ema(ema_powers=(0.5, 0.8)))
  step_fn = jax.jit(lambda params, state, step: (lambda u, s: (
      optax.apply_updates(params, u), s))(*tx.update(
          grads_at(params, step), state, params)))

  def snapshots(params):
    state = tx.init(params)
    out = [(state, params)]
    for step in range(1, STEPS + 1):
      params, state = step_fn(params, state, jnp.float32(step))
      out.append((state, params))
    return out

  target = optax_bema.ema(ema_power=0.6, update_freq=1)
  reference = optax_bema.synthesize(
      target, snapshots(jax.device_put(host, jax.devices()[0]))).model
  with jax.set_mesh(mesh):
    params = {k: jax.device_put(v, NamedSharding(mesh, param_specs[k]))
              for k, v in host.items()}
    saved = []
    for state, p in snapshots(params):
      members = {
          name: member._replace(**{
              field: {k: jax.device_put(v, v.sharding.update(
                  spec=state_specs[k])) for k, v in getattr(
                      member, field).items()}
              for field in member._fields[2:]
              if isinstance(getattr(member, field), dict)})
          for name, member in state[1].members.items()}
      saved.append(((state[0], state[1]._replace(members=members)), p))
    model = optax_bema.synthesize(target, saved).model
    errors = [f'synthesized[{k}]: {model[k].sharding} != {params[k].sharding}'
              for k in model if not same_layout(
                  model[k].sharding, params[k].sharding, params[k].ndim)]
  return {'errors': errors[:5], 'diff': max_diff(model, reference)}


def max_diff(a, b):
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


if __name__ == '__main__':
  main(sys.argv[1])

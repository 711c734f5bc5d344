"""offload_to_host: the parameter-sized state waits in host memory.

CPU has the memory kinds too (``device``, ``pinned_host``), so the placement
and the transfers are checked here; the memory saved and the step-time cost
on an accelerator are measured by benchmarks/offload.py.
"""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_bema

HP = dict(update_freq=3, update_after=2)
STABILIZERS = {
    'ema': lambda **kw: optax_bema.ema(**HP, **kw),
    'bema': lambda **kw: optax_bema.bema(**HP, **kw),
    'bema_freq1': lambda **kw: optax_bema.bema(update_freq=1, **kw),
    'dema': lambda **kw: optax_bema.dema(**HP, **kw),
    'ouema': lambda **kw: optax_bema.ouema(**HP, **kw),
}
PARAMS = {'w': jnp.linspace(-1.0, 1.0, 12, dtype=jnp.float32).reshape(3, 4),
          'b': jnp.zeros(4, jnp.bfloat16),
          'step': jnp.arange(2, dtype=jnp.int32)}


def train(stabilizer, steps=8):
  tx = optax.chain(optax.masked(optax.adam(0.1),
                                {'w': True, 'b': True, 'step': False}),
                   stabilizer)

  @jax.jit
  def step(params, state, i):
    grads = {'w': jnp.sin(params['w'] * i), 'b': jnp.cos(params['b'] + i),
             'step': jnp.zeros_like(params['step'])}
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  params, state = PARAMS, tx.init(PARAMS)
  states = [state]
  for i in range(1, steps + 1):
    params, state = step(params, state, jnp.float32(i))
    states.append(state)
  return params, states


def memory_kinds(state):
  return {jax.tree_util.keystr(path): leaf.sharding.memory_kind
          for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]}


@pytest.mark.parametrize('name', list(STABILIZERS))
def test_state_lives_in_host_memory_and_results_are_unchanged(name):
  params, states = train(STABILIZERS[name](offload_to_host=True))
  ref_params, ref_states = train(STABILIZERS[name]())

  for state in states:  # after init and after every step
    ours = state[1]
    for field, kind in memory_kinds(ours).items():
      scalar = field in ('.count', '.nonfinite_count', '.bias_weight')
      assert kind == ('device' if scalar else 'pinned_host'), field
  # the readout lands on the device, in the params' dtypes
  model = optax_bema.averaged_params(states[-1], params)
  ref_model = optax_bema.averaged_params(ref_states[-1], ref_params)
  for leaf, ref in zip(jax.tree.leaves(model), jax.tree.leaves(ref_model)):
    assert leaf.sharding.memory_kind == 'device'
    assert leaf.dtype == ref.dtype
    np.testing.assert_array_equal(leaf, ref)
  jax.tree.map(np.testing.assert_array_equal, params, ref_params)
  jax.tree.map(np.testing.assert_array_equal, states[-1][1],
               ref_states[-1][1])


def _transfers(jaxpr):
  """(top-level, inside branches) counts of memory-space transfers."""
  top, nested = 0, 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'device_put':
      top += 1
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      t, n = _transfers(sub)
      nested += t + n
  return top, nested


def test_transfers_happen_only_inside_the_update_step_branch():
  tx = optax_bema.bema(**HP, offload_to_host=True)
  state = tx.init(PARAMS)
  updates = jax.tree.map(jnp.zeros_like, PARAMS)
  jaxpr = jax.make_jaxpr(tx.update)(updates, state, PARAMS).jaxpr
  top, nested = _transfers(jaxpr)
  assert top == 0
  assert nested > 0


def test_abstract_init():
  tx = optax_bema.dema(**HP, offload_to_host=True)
  shapes = jax.eval_shape(tx.init, PARAMS)
  assert jax.tree.map(lambda s: (s.shape, s.dtype), shapes) == jax.tree.map(
      lambda s: (s.shape, s.dtype), tx.init(PARAMS))


def test_donating_the_state_with_explicit_shardings():
  """jit pairs donated buffers with outputs by shape and dtype alone unless
  in_shardings and out_shardings both name the memory kinds; a host buffer
  could then be aliased to a device output, which XLA aborts on. With both
  given, donation works and the state stays on the host."""
  tx = optax.chain(optax.adam(0.1), optax_bema.dema(**HP,
                                                    offload_to_host=True))

  def step(params, state):
    updates, state = tx.update(jax.tree.map(jnp.ones_like, params), state,
                               params)
    return optax.apply_updates(params, updates), state

  params = {'w': PARAMS['w'], 'b': PARAMS['b']}
  state = tx.init(params)
  shardings = jax.tree.map(lambda x: x.sharding, (params, state))
  step = jax.jit(step, donate_argnums=1, in_shardings=shardings,
                 out_shardings=shardings)
  for _ in range(4):
    old = state
    params, state = step(params, state)
  assert old[1].ema['w'].is_deleted()  # donated
  assert state[1].ema['w'].sharding.memory_kind == 'pinned_host'
  assert state[1].ema_of_ema['b'].sharding.memory_kind == 'pinned_host'


@pytest.mark.parametrize('name', ['bema', 'bema_freq1', 'dema'])
def test_non_finite_iterate_is_skipped_as_on_device(name):
  """The guard keeps old values on the host for fields set to theta_t."""
  def run(stabilizer):
    params = {'w': jnp.linspace(-1.0, 1.0, 6, dtype=jnp.float32)}
    state = stabilizer.init(params)
    update = jax.jit(stabilizer.update)
    for i in range(1, 10):
      grad = jnp.full(6, 0.1 * i)
      if i in (2, 5):  # one in the burn-in, one on an update step (HP)
        grad = grad.at[1].set(jnp.nan)
      updates, state = update({'w': grad}, state, params)
      if i not in (2, 5):
        params = optax.apply_updates(params, updates)
    return state, optax_bema.averaged_params(state, params)

  state, model = run(STABILIZERS[name](offload_to_host=True))
  ref_state, ref_model = run(STABILIZERS[name]())
  assert int(state.nonfinite_count) == int(ref_state.nonfinite_count) >= 1
  jax.tree.map(np.testing.assert_array_equal, state, ref_state)
  jax.tree.map(np.testing.assert_array_equal, model, ref_model)
  assert np.isfinite(model['w']).all()

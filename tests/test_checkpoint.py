"""Orbax checkpoints resume exactly, and the step counter never wraps."""

import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import optax_bema

WORKER = pathlib.Path(__file__).with_name('_checkpoint_worker.py')
TIMEOUT_S = 180
NAMES = ('bema', 'bema_freq1', 'ouema', 'dema_offload', 'pace')


def start(mode, ckpt_dir, out):
  env = dict(os.environ, XLA_FLAGS='', JAX_PLATFORMS='cpu',
             PYTHONPATH=str(WORKER.parents[1]))
  return subprocess.Popen([sys.executable, str(WORKER), mode, str(ckpt_dir),
                           str(out)], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def finish(proc, deadline):
  log = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))[0]
  assert proc.returncode == 0, log[-4000:]


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('checkpoint')
  deadline = time.monotonic() + TIMEOUT_S
  procs = []
  # reading the output until READY has no timeout of its own
  watchdog = threading.Timer(TIMEOUT_S, lambda: [
      p.kill() for p in procs if p.poll() is None])
  watchdog.start()
  try:
    straight = start('straight', tmp / 'unused', tmp / 'straight.npz')
    killed = start('killed', tmp / 'ckpt', tmp / 'never.npz')
    procs.extend([straight, killed])
    # READY comes after the checkpoint of step 5 and the step after it
    for line in killed.stdout:
      if line.strip() == 'READY':
        break
    else:
      pytest.fail(f'the run to kill ended early: {killed.wait()}')
    killed.send_signal(signal.SIGKILL)
    assert killed.wait(timeout=30) == -signal.SIGKILL
    resumed = start('resume', tmp / 'ckpt', tmp / 'resumed.npz')
    procs.append(resumed)
    finish(straight, deadline)
    finish(resumed, deadline)
  finally:
    watchdog.cancel()
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  assert not (tmp / 'never.npz').exists()
  return (dict(np.load(tmp / 'straight.npz')),
          dict(np.load(tmp / 'resumed.npz')))


@pytest.mark.parametrize('name', NAMES)
def test_killed_and_resumed_run_is_bit_identical(runs, name):
  straight, resumed = runs
  keys = [k for k in straight if k.startswith(name + '/')
          and not k.endswith('memory_kinds')]
  assert {k.split('/')[1] for k in keys} == {'params', 'averaged'}
  for key in keys:
    np.testing.assert_array_equal(resumed[key], straight[key], err_msg=key)
  assert not np.array_equal(straight[f'{name}/params/w'],
                            straight[f'{name}/averaged/w'])


def test_offloaded_state_returns_to_the_host_after_a_restore(runs):
  _, resumed = runs
  assert 'pinned_host' in resumed['dema_offload/memory_kinds'].tolist()


def test_masked_node_and_none_round_trip(tmp_path):
  """Integer leaves are MaskedNode, BEMA's last_iterate at update_freq=1 is
  None: both come back from Orbax as they went in."""
  params = {'w': jnp.arange(6.0).reshape(2, 3), 'n': jnp.arange(3)}
  tx = optax.chain(optax.masked(optax.adam(0.1), {'w': True, 'n': False}),
                   optax_bema.bema(update_freq=1))
  state = tx.init(params)
  _, state = tx.update({'w': jnp.ones((2, 3)), 'n': jnp.zeros(3, jnp.int32)},
                       state, params)
  assert isinstance(state[1].ema['n'], optax.MaskedNode)
  assert state[1].last_iterate is None
  with ocp.CheckpointManager(tmp_path) as manager:
    manager.save(1, args=ocp.args.StandardSave(state))
    manager.wait_until_finished()
    restored = manager.restore(1, args=ocp.args.StandardRestore(
        jax.eval_shape(tx.init, params)))
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  jax.tree.map(np.testing.assert_array_equal, restored, state)


# --- the step counter at the int32 maximum ---------------------------------

INT32_MAX = np.iinfo(np.int32).max


@pytest.mark.parametrize('name,kwargs', [
    ('ema', dict(update_freq=1)), ('bema', dict(update_freq=1)),
    # (INT32_MAX - 1) is a multiple of 3 and 2: an update on every step there
    ('bema', dict(update_freq=3, update_after=1)),
    ('dema', dict(update_freq=1)), ('ouema', dict(update_freq=1)),
    ('ouema', dict(update_freq=2, update_after=1))])
def test_step_counter_saturates_and_weights_stay_defined(name, kwargs):
  tx = getattr(optax_bema, name)(**kwargs)
  params = jnp.array([1.0, -2.0, 3.0])
  state = tx.init(params)._replace(count=jnp.asarray(INT32_MAX - 1,
                                                     jnp.int32))
  update = jax.jit(tx.update)
  iterates = [params]
  for _ in range(4):
    _, state = update(jnp.full(3, 0.01), state, params)
    params = params + 0.01
    iterates.append(params)
    assert int(state.count) == INT32_MAX
    model = optax_bema.averaged_params(state, params)
    assert np.isfinite(np.asarray(model)).all()
    for leaf in jax.tree.leaves(state):
      assert np.isfinite(np.asarray(leaf, np.float64)).all()
  # at t ~ 2**31 the EMA weight is ~2e-5: the average barely moves from
  # theta_0, and never outside the convex hull of the trajectory (EMA,
  # DEMA), or the bias-corrected readout stays within alpha ~ 0.014 of it.
  lo, hi = np.min(iterates, axis=0), np.max(iterates, axis=0)
  np.testing.assert_array_less(lo - 0.05, np.asarray(model))
  np.testing.assert_array_less(np.asarray(model), hi + 0.05)

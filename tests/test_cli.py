"""The ``optax-bema`` command, run in a subprocess on Orbax checkpoints that
a training loop wrote.

Two runs of AdamW on a noisy linear regression, 200 steps: one with
``posthoc_ema`` saving ``{'params', 'opt_state'}`` at ``snapshot_steps(200,
20)`` (the layout the docs use), one saving only its params, as NumPy
arrays, every 10 steps from step 10 (no averaging state, no step 0). The
command's models are compared with a mean computed here in NumPy and with
the library called in this process on the same snapshots.
"""

import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import optax_bema

NUM_STEPS = 200
SAVED = optax_bema.snapshot_steps(NUM_STEPS, 20)
PARAMS_EVERY = 10
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGETS = ('power_ema:std=0.1', 'ema:ema_power=0.7,update_freq=1',
           'merge:window=50,decay=cosine')


def train():
  """``{step: (opt_state, params)}`` at every step 0..NUM_STEPS."""
  key = jax.random.key(0)
  true_w = jax.random.normal(key, (8, 4))
  params = {'w': jnp.zeros((8, 4)), 'b': jnp.zeros(4)}
  tx = optax.chain(optax.adamw(3e-2), optax_bema.posthoc_ema())

  @jax.jit
  def step(params, state, i):
    x = jax.random.normal(jax.random.fold_in(key, i), (16, 8))
    y = x @ true_w + 0.5 * jax.random.normal(jax.random.fold_in(key, -i),
                                             (16, 4))
    loss = lambda p: jnp.mean((x @ p['w'] + p['b'] - y) ** 2)
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  history = {0: (state, params)}
  for i in range(1, NUM_STEPS + 1):
    params, state = step(params, state, i)
    history[i] = (state, params)
  return history


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """``(history, posthoc_dir, params_dir)``."""
  history = train()
  root = tmp_path_factory.mktemp('cli')
  with ocp.CheckpointManager(root / 'posthoc') as manager:
    for s in SAVED:
      state, params = history[s]
      manager.save(s, args=ocp.args.StandardSave(
          {'params': params, 'opt_state': state}))
  with ocp.CheckpointManager(root / 'params') as manager:
    for s in range(PARAMS_EVERY, NUM_STEPS + 1, PARAMS_EVERY):
      manager.save(s, args=ocp.args.StandardSave(
          {'params': jax.device_get(history[s][1])}))   # NumPy arrays
  return history, root / 'posthoc', root / 'params'


# The installed console script where the package is installed with it (CI
# reinstalls), else the same entry point through python -m.
SCRIPT = shutil.which('optax-bema', path=os.path.dirname(sys.executable))
COMMAND = [SCRIPT] if SCRIPT else [sys.executable, '-m', 'optax_bema']


def command(*args, **env):
  env = dict(os.environ, PYTHONPATH=ROOT, **env)
  return subprocess.run([*COMMAND, *map(str, args)], capture_output=True,
                        text=True, env=env, timeout=300)


def restored(directory):
  """A checkpoint the command wrote, onto this process's first device."""
  here = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with ocp.StandardCheckpointer() as checkpointer:
    path = os.path.abspath(directory)
    saved = checkpointer.metadata(path).item_metadata.tree
    return checkpointer.restore(path, jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here), saved))


def assert_close(a, b, tolerance=1e-6):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(
      np.asarray(x), np.asarray(y), rtol=tolerance, atol=tolerance), a, b)


def test_merge_of_params_only_checkpoints_is_their_mean(run, tmp_path):
  history, _, params_dir = run
  done = command('merge', params_dir, tmp_path / 'out', '--window', 50,
                 '--every', PARAMS_EVERY)
  assert done.returncode == 0, done.stderr
  merged = restored(tmp_path / 'out')
  steps = range(160, 201, PARAMS_EVERY)   # linear over 150..200: the mean
  mean = jax.tree.map(lambda *x: np.mean(np.stack(x), axis=0),
                      *[history[s][1] for s in steps])
  assert jax.tree.structure(merged) == jax.tree.structure(mean)
  assert_close(merged, mean)


def test_merge_equals_replay_of_the_same_decay_profile(run, tmp_path):
  history, posthoc_dir, _ = run
  done = command('merge', posthoc_dir, tmp_path / 'out', '--window', 30,
                 '--decay', '1-sqrt')
  assert done.returncode == 0, done.stderr
  window = [s for s in SAVED if s >= 160]   # 160 is the last at or before 170
  weights = optax_bema.decay_profile(window, NUM_STEPS, '1-sqrt')
  expected = optax_bema.replay(weights, [(s, history[s][1])
                                         for s in [0] + window])
  assert_close(restored(tmp_path / 'out'), expected)


def test_synthesize_equals_synthesize_in_python(run, tmp_path):
  history, posthoc_dir, _ = run
  done = command('synthesize', posthoc_dir, tmp_path / 'out',
                 *[a for t in TARGETS for a in ('--target', t)])
  assert done.returncode == 0, done.stderr
  targets = {
      TARGETS[0]: optax_bema.power_ema(std=0.1),
      TARGETS[1]: optax_bema.ema(ema_power=0.7, update_freq=1),
      TARGETS[2]: optax_bema.decay_profile(
          [s for s in SAVED if s >= 147], NUM_STEPS, 'cosine')}
  expected = optax_bema.synthesize(targets, [history[s] for s in SAVED])
  for spec in TARGETS:
    name = spec.replace(':', '_').replace(',', '_')
    assert_close(restored(tmp_path / 'out' / name), expected.model[spec])
    line = next(x for x in done.stdout.splitlines() if x.startswith(spec))
    assert f'{expected.error[spec]:.4f}' in line, done.stdout


def test_inspect_lists_what_was_saved(run):
  _, posthoc_dir, params_dir = run
  done = command('inspect', posthoc_dir)
  assert done.returncode == 0, done.stderr
  out = done.stdout
  assert f'{len(SAVED)} checkpoints' in out
  assert 'params: 2 arrays, 36 values (float32)' in out
  for member in ('ema_power=0.25', 'ema_power=0.95', 'initial'):
    assert member in out
  assert 'ema_power=0.75' in out and 'lag=10.0' in out
  # A row for each of choose's default candidates, judged by its threshold.
  rows = {cells[0]: cells[-1] for cells in (
      re.split(r'\s{2,}', line) for line in out.splitlines())}
  for name in optax_bema.default_candidates(SAVED[-1]):
    assert name in rows, out
  assert 'yes' in rows.values() and 'above' in out
  done = command('inspect', params_dir)
  assert done.returncode == 0, done.stderr
  assert 'no averages state (merge only)' in done.stdout


def test_a_target_the_snapshots_cannot_support_is_refused(run, tmp_path):
  _, posthoc_dir, _ = run
  spec = 'bema:update_freq=1,update_after=150'   # estimated error 0.08
  done = command('synthesize', posthoc_dir, tmp_path / 'out', '--target', spec)
  assert done.returncode != 0
  assert 'cannot support' in done.stderr and 'Traceback' not in done.stderr
  assert not (tmp_path / 'out').exists()
  done = command('synthesize', posthoc_dir, tmp_path / 'out', '--target', spec,
                 '--force')
  assert done.returncode == 0, done.stderr
  assert (tmp_path / 'out').exists()


def test_a_stabilizer_that_never_updated_is_refused(run, tmp_path):
  """bema()'s default update_freq=400 has no update step in a 200-step run:
  its model would be theta_0, so the command refuses it, naming why."""
  _, posthoc_dir, _ = run
  done = command('synthesize', posthoc_dir, tmp_path / 'out', '--target',
                 'bema:ema_power=0.5')
  assert done.returncode != 0
  assert 'never updated' in done.stderr, done.stderr
  assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('args, says', [
    (('merge', '{missing}', '{out}', '--window', 10), 'is not a directory'),
    (('merge', '{empty}', '{out}', '--window', 10), 'holds no Orbax'),
    (('merge', '{posthoc}', '{out}', '--window', 10, '--step', 150),
     'step 150 was not saved'),
    (('merge', '{posthoc}', '{out}', '--window', 30, '--every', 10),
     'step 170 was not saved'),
    (('merge', '{posthoc}', '{posthoc}', '--window', 10), 'exists'),
    (('synthesize', '{posthoc}', '{out}', '--target', 'ema:ema_power'),
     "'ema_power' is not one KEY=VALUE"),
    (('synthesize', '{posthoc}', '{out}', '--target', 'swa:window=3'),
     "unknown kind 'swa'"),
    (('synthesize', '{posthoc}', '{out}', '--target', 'ema:power=0.7'),
     "unexpected keyword argument 'power'"),
    (('synthesize', '{params}', '{out}', '--target', 'power_ema:std=0.1'),
     "has no 'opt_state'"),
])
def test_bad_input_is_one_line_and_a_nonzero_exit(run, tmp_path, args, says):
  _, posthoc_dir, params_dir = run
  (tmp_path / 'empty').mkdir()
  paths = dict(missing=tmp_path / 'missing', empty=tmp_path / 'empty',
               out=tmp_path / 'out', posthoc=posthoc_dir, params=params_dir)
  done = command(*[str(a).format(**paths) for a in args])
  assert done.returncode != 0
  assert done.stderr.strip().count('\n') == 0, done.stderr
  assert done.stderr.startswith('optax-bema: error:') and says in done.stderr
  assert not (tmp_path / 'out').exists()
  assert not (tmp_path / 'missing').exists()


SHARDED_RUN = '''
import sys, jax, jax.numpy as jnp, numpy as np, orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P
mesh = jax.make_mesh((8,), ('x',))
with ocp.CheckpointManager(sys.argv[1]) as manager:
  for step in (0, 1, 2):
    w = jnp.arange(32.0).reshape(8, 4) * (step + 1)
    manager.save(step, args=ocp.args.StandardSave({'params': {
        'w': jax.device_put(w, NamedSharding(mesh, P('x')))}}))
'''


@pytest.mark.parametrize('devices', [8, 1])
def test_merge_restores_a_sharded_checkpoint_on_the_devices_present(
    tmp_path, devices):
  flags = '--xla_force_host_platform_device_count='
  env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS=f'{flags}8',
             JAX_PLATFORMS='cpu')
  subprocess.run([sys.executable, '-c', SHARDED_RUN, str(tmp_path / 'ckpt')],
                 env=env, check=True, capture_output=True, timeout=300)
  done = command('merge', tmp_path / 'ckpt', tmp_path / 'out', '--window', 2,
                 XLA_FLAGS=f'{flags}{devices}', JAX_PLATFORMS='cpu')
  assert done.returncode == 0, done.stderr
  saved = ocp.StandardCheckpointer().metadata(tmp_path / 'out')
  sharding = saved.item_metadata.tree['w'].sharding
  assert (type(sharding).__name__ == 'NamedShardingMetadata') == (
      devices == 8), sharding
  merged = restored(tmp_path / 'out')
  np.testing.assert_array_equal(merged['w'],
                                np.arange(32.0).reshape(8, 4) * 2.5)


def test_without_orbax_the_command_names_the_extra(run):
  """The command installs with the package; orbax-checkpoint comes with the
  orbax extra. Without it: one line naming that extra, no traceback."""
  _, posthoc_dir, _ = run
  blocked = ("import sys; sys.modules['orbax'] = None; "
             "sys.modules['orbax.checkpoint'] = None; "
             "from optax_bema._cli import main; "
             f"sys.exit(main(['inspect', {str(posthoc_dir)!r}]))")
  done = subprocess.run([sys.executable, '-c', blocked], capture_output=True,
                        text=True, env=dict(os.environ, PYTHONPATH=ROOT),
                        timeout=300)
  assert done.returncode == 2
  assert 'optax-bema[orbax]' in done.stderr, done.stderr
  assert 'Traceback' not in done.stderr and len(
      done.stderr.strip().splitlines()) == 1

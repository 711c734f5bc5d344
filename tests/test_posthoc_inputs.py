"""Post-hoc inputs: never a wrong model without an error.

Every hostile input a user can hand to ``replay``, ``synthesize``,
``profile`` and ``averaged_params`` -- built as a user would build it,
through real Orbax checkpoints where one is involved -- gets a clear error
or the right model. "Right" is checked against the stabilizer run online
in the same training loop, never against the post-hoc tools' own output.

The run: SGD on a noisy 4-d quadratic, 200 steps, snapshots every 10, the
target ``ema(ema_power=0.7, update_freq=1)`` for synthesis and
``ema(ema_power=0.7, update_freq=10)`` for replay (which needs every step
its target reads).
"""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import optax_bema
from optax_bema import _averages

NUM_STEPS, EVERY = 200, 10
TRACKED = dict(ema_powers=(0.3, 0.5, 0.9), stds=())
CURVATURE = jnp.array([0.3, 1.0, 2.0, 5.0])
# With clean snapshots the synthesized model is within about 2e-6 of the
# online one; every accepted hostile input must stay as close.
CLEAN_TOLERANCE = 2e-5


def synthesis_target(update_after=0):
  return optax_bema.ema(ema_power=0.7, update_freq=1,
                        update_after=update_after)


def replay_target(update_after=0):
  return optax_bema.ema(ema_power=0.7, update_freq=EVERY,
                        update_after=update_after)


def train(theta_0=(2.0, -1.0, 0.5, 3.0), seed=0, wrap=None, update_after=0):
  """SGD on the quadratic, with ``posthoc_ema`` and, online, both targets.

  ``wrap`` builds the optimizer from an inner transform (as
  ``optax.multi_transform`` would); the params are then ``{'w': ..., 'b':
  ...}`` and the online models come from the same wrapping.

  Returns ``(snapshots, saved_params, online)``: ``(opt_state, params)``
  every EVERY steps from 0, ``(step, params)`` at the same steps, and the
  online models of the targets after the last step.
  """
  chain = lambda last: optax.chain(optax.sgd(0.1), last)
  make = (lambda last: chain(last)) if wrap is None else wrap
  tx = make(optax_bema.posthoc_ema(**TRACKED, update_after=update_after))
  online_tx = make(optax_bema.averages(
      synthesis=synthesis_target(update_after),
      replay=replay_target(update_after)))
  theta = jnp.asarray(theta_0, jnp.float32)
  params = {'w': theta} if wrap is None else {'w': theta, 'b': -theta}
  noise = jax.random.normal(jax.random.key(seed), (NUM_STEPS, 4))

  @jax.jit
  def step(params, state, online_state, noise):
    grads = jax.tree.map(lambda p: CURVATURE * (p - 1.0) + 0.3 * noise,
                         params)
    updates, state = tx.update(grads, state, params)
    _, online_state = online_tx.update(grads, online_state, params)
    return optax.apply_updates(params, updates), state, online_state

  state, online_state = tx.init(params), online_tx.init(params)
  snapshots, saved = [(state, params)], [(0, params)]
  for t in range(1, NUM_STEPS + 1):
    params, state, online_state = step(params, state, online_state,
                                       noise[t - 1])
    if t % EVERY == 0:
      snapshots.append((state, params))
      saved.append((t, params))
  online = {k: optax_bema.averaged_params(online_state, params, name=k)
            for k in ('synthesis', 'replay')}
  return snapshots, saved, online


@pytest.fixture(scope='module')
def run():
  return train()


def error(model, reference) -> float:
  return max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
      jax.tree.leaves(model), jax.tree.leaves(reference)))


def members(opt_state):
  return optax.tree.get(opt_state, 'members')


def with_members(opt_state, change):
  """``opt_state`` with its averages' members ``change(members)``."""
  state = opt_state[-1]
  return opt_state[:-1] + (state._replace(members=change(state.members)),)


def test_clean_input_gives_the_online_model(run):
  snapshots, saved, online = run
  model, residual, _ = optax_bema.synthesize(synthesis_target(), snapshots)
  assert error(model, online['synthesis']) < CLEAN_TOLERANCE, residual
  assert error(optax_bema.replay(replay_target(), saved),
               online['replay']) < 1e-6


# --- A re-iterable whose second read differs from the first ----------------


@pytest.fixture(scope='module')
def checkpoint_dir(run, tmp_path_factory):
  """The snapshots as an Orbax checkpoint directory, one step per item."""
  snapshots, saved, _ = run
  directory = tmp_path_factory.mktemp('snapshots') / 'ckpt'
  with ocp.CheckpointManager(directory) as manager:
    for (step, params), (opt_state, _) in zip(saved, snapshots):
      manager.save(step, args=ocp.args.StandardSave(
          {'params': params, 'opt_state': opt_state}))
  return directory


def abstract_target(run):
  snapshots, _, _ = run
  opt_state, params = snapshots[0]
  return {'params': jax.eval_shape(lambda p: p, params),
          'opt_state': jax.eval_shape(lambda s: s, opt_state)}


class Saved:
  """The docs' reader: restores each step ``manager.all_steps()`` lists.

  ``between_reads`` runs once, after the first full read, as a training
  job writing (or ``max_to_keep`` deleting) a checkpoint would.
  """

  def __init__(self, manager, target=None, between_reads=None):
    self.manager, self.target = manager, target
    self.between_reads, self.reads = between_reads, 0

  def __iter__(self):
    if self.reads == 1 and self.between_reads is not None:
      self.between_reads(self.manager)
    self.reads += 1
    for step in self.manager.all_steps():
      args = (None if self.target is None
              else ocp.args.StandardRestore(self.target))
      saved = self.manager.restore(step, args=args)
      yield saved['opt_state'], saved['params']


def copied(checkpoint_dir, tmp_path):
  shutil.copytree(checkpoint_dir, tmp_path / 'ckpt')
  return tmp_path / 'ckpt'


def test_orbax_snapshots_give_the_online_model(run, checkpoint_dir):
  with ocp.CheckpointManager(checkpoint_dir) as manager:
    model, _, _ = optax_bema.synthesize(
        synthesis_target(), Saved(manager, abstract_target(run)))
  assert error(model, run[2]['synthesis']) < CLEAN_TOLERANCE


def _save_another(manager):
  restored = manager.restore(NUM_STEPS)
  manager.save(NUM_STEPS + EVERY, args=ocp.args.StandardSave(restored))
  manager.wait_until_finished()


@pytest.mark.parametrize('change, max_to_keep, says', [
    # max_to_keep deletes step 0 as step 210 is written: as many snapshots.
    (_save_another, NUM_STEPS // EVERY + 1, 'snapshot 0 (step 0) with other'),
    (_save_another, None, 'more than 21 snapshots'),
    (lambda m: m.delete(100), None, 'snapshot 10 (step 100) with other'),
])
def test_a_checkpoint_written_or_deleted_between_the_reads_is_refused(
    run, checkpoint_dir, tmp_path, change, max_to_keep, says):
  directory = copied(checkpoint_dir, tmp_path)
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep)
  with ocp.CheckpointManager(directory, options=options) as manager:
    with pytest.raises(ValueError, match='changed between the two reads'
                       ) as refused:
      optax_bema.synthesize(synthesis_target(),
                            Saved(manager, abstract_target(run), change))
  assert says in str(refused.value)


# --- A leaf that changes shape midway --------------------------------------


def test_replay_refuses_a_leaf_that_changes_shape(run):
  _, saved, _ = run
  hostile = [(s, {'w': p['w'][:1]} if s >= 100 else p) for s, p in saved]
  with pytest.raises(ValueError, match=r"step 100 has leaf \['w'\] of shape"):
    optax_bema.replay(replay_target(), hostile)


def test_synthesize_refuses_a_leaf_that_changes_shape(run):
  snapshots, _, _ = run
  cut = lambda tree: jax.tree.map(
      lambda x: x[:1] if jnp.ndim(x) == 1 and x.dtype != jnp.uint8 else x,
      tree)
  resized = [(cut(s), cut(p)) if i >= 10 else (s, p)
             for i, (s, p) in enumerate(snapshots)]
  with pytest.raises(ValueError, match=r"step 100 has leaf \['w'\] of shape"):
    optax_bema.synthesize(synthesis_target(), resized)


def test_synthesize_refuses_an_average_shaped_unlike_its_params(run):
  snapshots, _, _ = run
  opt_state, params = snapshots[10]
  cut = with_members(opt_state, lambda m: jax.tree.map(
      lambda x: x[:1] if jnp.ndim(x) else x, m))
  hostile = snapshots[:10] + [(cut, params)] + snapshots[11:]
  with pytest.raises(ValueError, match='shape'):
    optax_bema.synthesize(synthesis_target(), hostile)


# --- Saved settings through a dtype cast of the whole checkpoint -----------


def bfloat16_round_trip(tree):
  """Every leaf cast to bfloat16 and back, as a whole-checkpoint cast does."""
  return jax.tree.map(
      lambda x: jnp.asarray(x).astype(jnp.bfloat16).astype(x.dtype), tree)


def schedules(opt_state):
  return {k: _averages.decode(v, k)[1].settings()
          for k, v in optax.tree.get(opt_state, 'settings').items()}


def test_settings_survive_a_bfloat16_round_trip(run):
  snapshots, _, online = run
  cast = [bfloat16_round_trip(s) for s in snapshots]
  assert schedules(cast[-1][0]) == schedules(snapshots[-1][0])
  assert schedules(cast[-1][0])['ema_power=0.3']['ema_power'] == 0.3
  model, _, _ = optax_bema.synthesize(synthesis_target(), cast)
  # The arrays themselves are rounded to bfloat16 (8 bits): |w| <= 3.
  assert error(model, online['synthesis']) < 3 * 2.0 ** -8


def test_settings_survive_an_orbax_checkpoint_saved_as_bfloat16(
    run, tmp_path):
  snapshots, saved, online = run
  with ocp.CheckpointManager(tmp_path / 'bf16') as manager:
    for (step, _), (opt_state, params) in zip(saved, snapshots):
      manager.save(step, args=ocp.args.StandardSave(jax.tree.map(
          lambda x: jnp.asarray(x).astype(jnp.bfloat16),
          {'params': params, 'opt_state': opt_state})))
    manager.wait_until_finished()
    restored = [(r['opt_state'], r['params']) for r in (
        manager.restore(s) for s in manager.all_steps())]
  assert schedules(restored[-1][0]) == schedules(snapshots[-1][0])
  model, _, _ = optax_bema.synthesize(synthesis_target(), restored)
  assert error(model, online['synthesis']) < 3 * 2.0 ** -8


def test_a_step_count_a_bfloat16_cast_may_have_rounded_is_refused(run):
  # Past 256, bfloat16 cannot hold every whole number: step 263 comes back
  # as 264. Restored without a target, the count is still bfloat16.
  snapshots, _, _ = run
  opt_state, params = bfloat16_round_trip(snapshots[-1])
  hostile = with_members(opt_state, lambda m: {
      k: s._replace(count=jnp.asarray(263, jnp.bfloat16))
      for k, s in m.items()})
  with pytest.raises(ValueError, match='saved as bfloat16, which holds whole '
                     'numbers exactly only below 256; got 264'):
    optax_bema.synthesize(synthesis_target(),
                          snapshots[:-1] + [(hostile, params)])


def test_a_record_that_lost_its_bytes_is_refused(run):
  snapshots, _, _ = run
  opt_state, params = snapshots[-1]
  state = opt_state[-1]
  record = np.asarray(state.settings['ema_power=0.5']).astype(np.float32)
  record[5] += 0.5  # a value no byte has
  hostile = opt_state[:-1] + (state._replace(settings={
      **state.settings, 'ema_power=0.5': record}),)
  with pytest.raises(ValueError, match='cannot be read'):
    optax_bema.synthesize(synthesis_target(),
                          snapshots[:-1] + [(hostile, params)])


# --- Snapshots of two runs mixed -------------------------------------------


@pytest.fixture(scope='module')
def other_run():
  return train(theta_0=(1.5, -0.5, 0.0, 2.0), seed=1)


@pytest.mark.parametrize('mix', ['halves', 'interleaved'])
def test_snapshots_of_two_runs_are_refused(run, other_run, mix):
  a, b = run[0], other_run[0]
  if mix == 'halves':
    mixed = a[:10] + b[10:]
  else:
    mixed = [(a if i % 2 else b)[i] for i in range(len(a))]
  with pytest.raises(ValueError, match='another theta_0'):
    optax_bema.synthesize(synthesis_target(), mixed)


def test_snapshots_of_two_runs_with_a_burn_in_are_refused():
  # theta_0 is the iterate at step 50: the snapshots before it hold others.
  a, _, online = train(update_after=50)
  model, _, _ = optax_bema.synthesize(synthesis_target(50), a)
  assert error(model, online['synthesis']) < CLEAN_TOLERANCE
  b = train(theta_0=(1.5, -0.5, 0.0, 2.0), seed=1, update_after=50)[0]
  with pytest.raises(ValueError, match='step 100 has another theta_0 .* '
                     'than the one at step 50'):
    optax_bema.synthesize(synthesis_target(), a[:10] + b[10:])


def test_a_snapshot_whose_averages_saw_different_steps_is_refused(run):
  snapshots, _, _ = run
  later = members(snapshots[11][0])
  opt_state, params = snapshots[10]
  hostile = with_members(opt_state, lambda m: {**m, 'ema_power=0.5':
                                               later['ema_power=0.5']})
  with pytest.raises(ValueError, match='different numbers of steps'):
    optax_bema.synthesize(synthesis_target(),
                          snapshots[:10] + [(hostile, params)])


def test_snapshots_saved_at_micro_steps_name_multisteps():
  """Under gradient accumulation a stabilizer counts optimizer updates:
  snapshots placed by micro-steps (every 4 make an update) repeat a count
  near the end, which the error traces to MultiSteps."""
  tx = optax.MultiSteps(optax.chain(optax.sgd(0.1),
                                    optax_bema.posthoc_ema(**TRACKED)),
                        every_k_schedule=4)
  params = jnp.asarray([2.0, -1.0, 0.5, 3.0])
  state = tx.init(params)
  update = jax.jit(tx.update)
  micro_steps = optax_bema.snapshot_steps(200, 20)
  snapshots = [(state, params)]
  for t in range(1, 201):
    updates, state = update(CURVATURE * (params - 1.0), state, params)
    params = optax.apply_updates(params, updates)
    if t in micro_steps:
      snapshots.append((state, params))
  with pytest.raises(ValueError,
                     match='step 48 came after step 48.*MultiSteps'):
    optax_bema.synthesize(synthesis_target(), snapshots)


def test_snapshots_tracking_other_averages_are_refused(run):
  snapshots, _, _ = run
  tx = optax.chain(optax.sgd(0.1), optax_bema.posthoc_ema(ema_powers=(0.4,)))
  params = snapshots[-1][1]
  other = with_members(tx.init(params), lambda m: {
      k: s._replace(count=jnp.asarray(NUM_STEPS)) for k, s in m.items()})
  with pytest.raises(ValueError, match='snapshots of one run'):
    optax_bema.synthesize(synthesis_target(),
                          snapshots[:1] + [(other, params)])


# --- Non-finite snapshots --------------------------------------------------


def nan_at(tree, where=0):
  return jax.tree.map(lambda x: x.at[where].set(jnp.nan)
                      if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def test_synthesize_refuses_a_nan_in_a_tracked_average(run):
  snapshots, _, _ = run
  opt_state, params = snapshots[7]
  hostile = with_members(opt_state, lambda m: {
      **m, 'ema_power=0.9': nan_at(m['ema_power=0.9'])})
  with pytest.raises(ValueError, match=r"values of the average "
                     r"'ema_power=0.9' at step 70 are not all finite"):
    optax_bema.synthesize(synthesis_target(),
                          snapshots[:7] + [(hostile, params)] + snapshots[8:])


def test_synthesize_refuses_a_nan_in_the_params(run):
  snapshots, _, _ = run
  opt_state, params = snapshots[7]
  hostile = snapshots[:7] + [(opt_state, nan_at(params))] + snapshots[8:]
  with pytest.raises(ValueError, match='params at step 70 are not all finite'):
    optax_bema.synthesize(synthesis_target(), hostile)


def test_synthesize_refuses_averages_that_skipped_an_iterate(run):
  snapshots, _, _ = run
  opt_state, params = snapshots[-1]
  hostile = with_members(opt_state, lambda m: {
      k: s._replace(nonfinite_count=jnp.ones_like(s.nonfinite_count))
      for k, s in m.items()})
  with pytest.raises(ValueError, match='skipped non-finite iterates'):
    optax_bema.synthesize(synthesis_target(),
                          snapshots[:-1] + [(hostile, params)])


def test_replay_refuses_a_nan_snapshot_as_synthesize_does(run):
  _, saved, _ = run
  hostile = [(s, nan_at(p) if s == 70 else p) for s, p in saved]
  with pytest.raises(ValueError, match='params at step 70 are not all finite'):
    optax_bema.replay(replay_target(), hostile)
  # A profile target reads the same snapshots: the same refusal.
  weights = optax_bema.uniform_profile([60, 70, 80], NUM_STEPS)
  with pytest.raises(ValueError, match='params at step 70 are not all finite'):
    optax_bema.replay(weights, hostile)


# --- Inside optax.multi_transform and optax.named_chain --------------------


def multi_transform(last):
  return optax.multi_transform(
      {'averaged': optax.chain(optax.sgd(0.1), last), 'plain': optax.sgd(0.1)},
      {'w': 'averaged', 'b': 'plain'})


def named_chain(last):
  return optax.named_chain(('sgd', optax.sgd(0.1)), ('averages', last))


@pytest.mark.parametrize('wrap', [multi_transform, named_chain])
def test_posthoc_ema_and_averages_inside_a_wrapper(wrap):
  snapshots, saved, online = train(wrap=wrap)
  model, _, _ = optax_bema.synthesize(synthesis_target(), snapshots)
  assert error(model, online['synthesis']) < CLEAN_TOLERANCE
  if wrap is multi_transform:  # 'b' is never averaged: its params
    np.testing.assert_array_equal(model['b'], snapshots[-1][1]['b'])
  final = snapshots[-1]
  tracked = optax_bema.averaged_params(final[0], final[1], name='ema_power=0.5')
  assert jax.tree.structure(tracked) == jax.tree.structure(final[1])


# --- A state restored without a target (plain dicts) -----------------------


def test_orbax_restore_without_a_target_gives_the_online_model(
    run, checkpoint_dir):
  with ocp.CheckpointManager(checkpoint_dir) as manager:
    saved = Saved(manager)
    model, _, _ = optax_bema.synthesize(synthesis_target(), saved)
    restored = next(iter(saved))[0]
  assert error(model, run[2]['synthesis']) < CLEAN_TOLERANCE
  assert isinstance(restored[-1], dict)  # what Orbax gives without one


def test_dict_members_inside_an_averages_state(run):
  snapshots, _, online = run
  as_dicts = [(with_members(s, lambda m: {
      k: v._asdict() for k, v in m.items()}), p) for s, p in snapshots]
  model, _, _ = optax_bema.synthesize(synthesis_target(), as_dicts)
  assert error(model, online['synthesis']) < CLEAN_TOLERANCE


def test_averaged_params_of_a_state_restored_without_a_target(
    run, checkpoint_dir):
  with ocp.CheckpointManager(checkpoint_dir) as manager:
    restored = manager.restore(NUM_STEPS)
  with pytest.raises(ValueError, match='restore it with a target'):
    optax_bema.averaged_params(restored['opt_state'], restored['params'],
                               name='ema_power=0.5')


# --- Arguments: ridge, targets, steps --------------------------------------


@pytest.mark.parametrize('ridge', [-1, float('nan'), float('inf'), '1e-6'])
def test_synthesize_refuses_a_bad_ridge(run, ridge):
  with pytest.raises(ValueError, match='ridge must be a finite number >= 0'):
    optax_bema.synthesize(synthesis_target(), run[0], ridge=ridge)


def test_no_targets_or_no_snapshots(run):
  with pytest.raises(ValueError, match='no targets'):
    optax_bema.synthesize({}, run[0])
  with pytest.raises(ValueError, match='no targets'):
    optax_bema.replay({}, run[1])
  with pytest.raises(ValueError, match='no snapshots'):
    optax_bema.synthesize(synthesis_target(), [])
  with pytest.raises(ValueError, match='no snapshots'):
    optax_bema.replay(replay_target(), [])
  with pytest.raises(TypeError, match='one-shot iterator'):
    optax_bema.synthesize(synthesis_target(), iter(run[0]))


@pytest.mark.parametrize('step', [10.7, 10.0, '10', True])
def test_replay_refuses_a_step_that_is_not_an_integer(run, step):
  _, saved, _ = run
  hostile = [(step if s == 10 else s, p) for s, p in saved]
  with pytest.raises(TypeError, match='a step must be an integer'):
    optax_bema.replay(replay_target(), hostile)


def test_replay_refuses_negative_steps(run):
  _, saved, _ = run
  hostile = [(-s - 1, p) for s, p in reversed(saved)]
  with pytest.raises(ValueError, match='a step must be >= 0, got -201'):
    optax_bema.replay(replay_target(), hostile)


def test_replay_takes_numpy_and_jax_integer_steps(run):
  _, saved, online = run
  steps = [(np.int64(s) if s % 20 else jnp.asarray(s), p) for s, p in saved]
  assert error(optax_bema.replay(replay_target(), steps),
               online['replay']) < 1e-6


# --- profile's num_steps, and schedules given as settings ------------------


def test_profile_takes_a_jax_integer():
  # EMA at ema_power=0.5, lag=10, every step: beta_t = (10 + t) ** -0.5.
  beta = (10.0 + np.arange(1, 6)) ** -0.5
  expected = np.zeros(6)
  expected[0] = np.prod(1 - beta)
  for t in range(1, 6):
    expected[t] = beta[t - 1] * np.prod(1 - beta[t:])
  got = optax_bema.profile(optax_bema.ema(update_freq=1), jnp.asarray(5))
  np.testing.assert_allclose(got, expected, rtol=1e-12)
  with pytest.raises(TypeError, match='num_steps must be an integer'):
    optax_bema.profile(optax_bema.ema(update_freq=1), jnp.asarray(5.0))


SETTINGS = {
    optax_bema.ema: ('ema_power', 'lag', 'multiplier', 'update_after',
                     'update_freq', 'min_ema_multiplier'),
    optax_bema.bema: ('ema_power', 'bias_power', 'lag', 'multiplier',
                      'update_after', 'update_freq', 'min_ema_multiplier',
                      'bias_multiplier'),
    optax_bema.dema: ('ema_power', 'lag', 'multiplier', 'update_after',
                      'update_freq', 'min_ema_multiplier'),
    optax_bema.ouema: ('ema_power', 'bias_power', 'lag', 'multiplier',
                       'update_after', 'update_freq', 'min_ema_multiplier',
                       'bias_multiplier'),
    optax_bema.power_ema: ('std', 'update_after', 'update_freq'),
}


NOT_NUMBERS = {'schedule': optax.constant_schedule(0.5), 'string': '0.5',
               'none': None}


@pytest.mark.parametrize('factory, name, value', [
    pytest.param(f, n, v, id=f'{f.__name__}-{n}-{kind}')
    for f, names in SETTINGS.items() for n in names
    for kind, v in NOT_NUMBERS.items()
    if not (n == 'bias_multiplier' and v is None)])  # None: multiplier's
def test_a_setting_that_is_not_a_number_is_refused_at_construction(
    factory, name, value):
  base = {'std': 0.1} if factory is optax_bema.power_ema else {}
  with pytest.raises(TypeError, match=f'{factory.__name__}: {name} must be '
                     'a number'):
    factory(**{**base, name: value})


# --- averaged_params with params of another shape --------------------------


def test_averaged_params_refuses_params_of_another_shape(run):
  snapshots, _, _ = run
  opt_state, params = snapshots[-1]
  with pytest.raises(ValueError, match=r"averaged_params: the average has "
                     r"leaf \['w'\] of shape \(4,\) where "
                     r'the params have \(3,\)'):
    optax_bema.averaged_params(opt_state, {'w': params['w'][:3]},
                               name='ema_power=0.5')
  with pytest.raises(ValueError, match='structure'):
    optax_bema.averaged_params(opt_state, {'v': params['w']},
                               name='ema_power=0.5')

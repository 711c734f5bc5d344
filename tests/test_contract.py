"""The contract every public transform keeps, checked the same way for each.

One battery, shaped like optax's own for its contributed optimizers
(``optax/contrib/_common_test.py``), run over every transform the package
exports: the stabilizers as a user trains with them, last in
``optax.chain(optax.adamw(lr), stabilizer)``, and the optimizers alone. The
files per transform test the math; this one tests what every transform owes
optax's machinery: extra arguments, one compilation, ``inject_hyperparams``,
``MultiSteps``, donation, dtypes, ``eval_shape``, clear errors for missing
params and bad hyperparameters, and a model that stays finite when one step
is not. The transforms that hold several averages (``averages``,
``posthoc_ema``) go last in the chain like a stabilizer, and every one of
their models is checked.
"""

import functools
import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax._src import test_utils
import pytest

import optax_bema
from optax_bema import catalog

import _oracle

LR = 1e-2
# Every transform, as (public name, hyperparameters), none at its default so
# that an injected value that is dropped shows. Stabilizers update every other
# step after a one-step burn-in: one compiled step holds the burn-in reset,
# the update and the branch between updates. BEMA updating every step keeps
# another state (no last iterate) and reads the current params.
CASES = {
    'ema': ('ema', dict(update_freq=2, update_after=1, lag=3.0,
                        ema_power=0.6)),
    'bema': ('bema', dict(update_freq=2, update_after=1, lag=3.0,
                          ema_power=0.6, bias_power=0.3)),
    'bema_every_step': ('bema', dict(update_freq=1, update_after=1, lag=3.0,
                                     ema_power=0.6, bias_power=0.3)),
    'dema': ('dema', dict(update_freq=2, update_after=1, lag=3.0,
                          ema_power=0.6)),
    'ouema': ('ouema', dict(update_freq=2, update_after=1, lag=3.0,
                            ema_power=0.6, bias_power=0.3)),
    'power_ema': ('power_ema', dict(std=0.15, update_freq=2,
                                    update_after=1)),
    'pace': ('pace', dict(pullback=0.4, ema_power=0.3, delay=1.0,
                          update_freq=2)),
    'adaptive_ademamix': ('adaptive_ademamix', dict(
        alpha=5.0, weight_decay=0.1, variance_decay=0.9)),
    # One member updating every step (they share one non-finite test), one
    # after a burn-in, every other step.
    'averages': ('averages', dict(
        ema=optax_bema.ema(update_freq=1, lag=3.0, ema_power=0.6),
        bema=optax_bema.bema(update_freq=2, update_after=1, lag=3.0,
                             ema_power=0.6, bias_power=0.3))),
    'posthoc_ema': ('posthoc_ema', dict(ema_powers=(0.4, 0.8), lag=3.0,
                                        multiplier=0.5, update_after=1)),
}
assert {name for name, _ in CASES.values()} == set(catalog.NAMES)
# Those with a model to read out: all but adaptive AdEMAMix.
AVERAGING = [c for c, (name, _) in CASES.items() if name != 'adaptive_ademamix']
COMBINED = [c for c, (name, _) in CASES.items() if name in catalog.COMBINED]


def test_the_battery_covers_every_exported_transform():
  """Every factory the package exports that returns a transform is in the
  catalog, and so in this battery (read from the factories' signatures, so
  a new export cannot be left out by forgetting it here)."""
  factories = {
      name for name in optax_bema.__all__
      if inspect.isfunction(getattr(optax_bema, name))
      and 'GradientTransformation' in
      str(inspect.signature(getattr(optax_bema, name)).return_annotation)}
  assert factories == set(catalog.NAMES)


def bare(case):
  """The transform itself: an average alone, or an optimizer."""
  name, hp = CASES[case]
  return catalog.transform(name, LR, **hp)


def training(case):
  """What a user trains with: an average goes last after AdamW."""
  name, hp = CASES[case]
  return catalog.training(name, LR, **hp)


def models(case, state, params):
  """Every model the transform returns: by member name for several
  averages, else under the key None."""
  if case in COMBINED:
    return {k: optax_bema.averaged_params(state, params, name=k)
            for k in optax.tree.get(state, 'members')}
  return {None: optax_bema.averaged_params(state, params)}


def assert_same_run(case, run, reference, *, rtol, atol):
  """The params of ``run``, ``(params, state)``, and every model the
  transform returns from it are the reference run's, and finite."""
  (params, state), (want, want_state) = run, reference
  assert_trees_close(params, want, rtol=rtol, atol=atol)
  if case in AVERAGING:
    model = models(case, state, params)
    assert all_finite(model)
    assert_trees_close(model, models(case, want_state, want), rtol=rtol,
                       atol=atol)


def make_params(dtype=jnp.float32):
  return {'w': jnp.linspace(-1.0, 1.0, 12, dtype=dtype).reshape(3, 4),
          'b': jnp.asarray([0.5, -0.25, 2.0, 0.0], dtype)}


ONES = jnp.ones((3, 4))
# One coordinate of the gradient NaN: AdamW's moments there turn NaN, and
# from then on that live weight is NaN for good.
POISON = ONES.at[1, 2].set(jnp.nan)


def gradient(params):
  """Of a quadratic: per coordinate, so a NaN stays in its coordinate."""
  return jax.grad(lambda p: sum(jnp.sum((x - 1.5) ** 2)
                                for x in jax.tree.leaves(p)))(params)


def train_step(tx, extra_args=None, **jit_kwargs):
  """A jitted training step; ``scale`` multiplies the gradient of ``w``."""
  @functools.partial(jax.jit, **jit_kwargs)
  def step(params, state, scale):
    grads = gradient(params)
    grads['w'] = grads['w'] * scale
    updates, state = tx.update(grads, state, params, **(extra_args or {}))
    return optax.apply_updates(params, updates), state
  return step


@functools.cache
def plain_run(case):
  """The plain transform and its compiled step, shared by the tests."""
  tx = training(case)
  return tx, train_step(tx)


def shapes_and_dtypes(tree):
  return jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)), tree)


def dtypes(tree):
  return jax.tree.map(jnp.result_type, tree)


def all_finite(tree) -> bool:
  return all(np.isfinite(np.asarray(x, np.float64)).all()
             for x in jax.tree.leaves(tree))


def assert_trees_equal(actual, desired):
  assert jax.tree.structure(actual) == jax.tree.structure(desired)
  jax.tree.map(np.testing.assert_array_equal, actual, desired)


def assert_trees_close(actual, desired, rtol=1e-6, atol=1e-7):
  assert jax.tree.structure(actual) == jax.tree.structure(desired)
  jax.tree.map(lambda a, d: np.testing.assert_allclose(
      np.asarray(a, np.float64), np.asarray(d, np.float64), rtol=rtol,
      atol=atol), actual, desired)


# --- what optax's machinery relies on ---------------------------------------


@pytest.mark.parametrize('case', CASES)
def test_extra_args_are_ignored_and_nothing_recompiles(case):
  # optax.chain hands extra arguments to every element that declares them.
  assert isinstance(bare(case), optax.GradientTransformationExtraArgs)
  tx = training(case)
  # Its own step: a shared one may have compiled both calls already.
  step = train_step(tx, extra_args=dict(unexpected_extra_arg=1,
                                        loss=jnp.ones(())))
  params = make_params()
  params, state = step(params, tx.init(params), ONES)
  with test_utils.log_compilations() as logs:
    params, state = step(params, state, ONES)
  assert not logs, 'the second update recompiled'
  tx, plain = plain_run(case)
  want = make_params()
  want, want_state = plain(want, tx.init(want), ONES)
  want, want_state = plain(want, want_state, ONES)
  jax.tree.map(np.testing.assert_array_equal, (params, state),
               (want, want_state))


# Where inject_hyperparams cannot wrap a transform, and why.
NOT_INJECTABLE = {
    'averages': 'optax.inject_hyperparams passes the members, given as '
                '**members, as one argument named "members"; and a member '
                'is a transform, not a number, so there is nothing to inject',
}


def injected(case):
  """The transform of ``case`` built by ``optax.inject_hyperparams``."""
  name, hp = CASES[case]
  factory = getattr(optax_bema, name)
  if name == 'posthoc_ema':
    # Its settings are recorded as numbers in the state, for synthesize: an
    # injected (traced) one is refused, see
    # test_posthoc_ema_refuses_injected_settings. Static, they wrap.
    return optax.chain(optax.adamw(LR), optax.inject_hyperparams(
        factory, static_args=('lag', 'multiplier', 'update_after'))(**hp))
  if name in catalog.STABILIZERS:
    # update_freq=1 stays static, or the every-step path would never be
    # taken; an injected update_freq is traced and the update gated.
    static = ('update_freq',) if hp['update_freq'] == 1 else ()
    # EDM2's exponent is solved from std when the transform is built.
    static += ('std',) if name == 'power_ema' else ()
    return optax.chain(optax.adamw(LR), optax.inject_hyperparams(
        factory, static_args=static)(**hp))
  # Injected betas are float32 arrays, so 1 - b would be rounded in float32;
  # static, they are rounded as in the plain optimizer.
  static = ('b1', 'b2') if name == 'pace' else ('b1', 'b2', 'b3')
  return optax.inject_hyperparams(factory, static_args=static)(
      learning_rate=LR, **hp)


@pytest.mark.parametrize('case', CASES)
def test_inject_hyperparams_gives_identical_results(case):
  if case in NOT_INJECTABLE:
    pytest.skip(NOT_INJECTABLE[case])
  tx, step = plain_run(case)
  params = make_params()
  p1, s1 = params, tx.init(params)
  tx = injected(case)
  p2, s2, step2 = params, tx.init(params), train_step(tx)
  for _ in range(6):
    p1, s1 = step(p1, s1, ONES)
    p2, s2 = step2(p2, s2, ONES)
  assert_trees_equal(p2, p1)
  if case in AVERAGING:
    assert_trees_equal(models(case, s2, p2), models(case, s1, p1))
  name, hp = CASES[case]
  if name not in catalog.OPTIMIZERS:  # injected inside the chain
    assert_trees_equal(s2[0], s1[0])
    s2, s1 = s2[1], s1[1]
  else:
    hp = dict(hp, learning_rate=LR)
  assert_trees_equal(s2.inner_state, s1)
  for arg, value in hp.items():
    if arg in s2.hyperparams:
      assert float(s2.hyperparams[arg]) == pytest.approx(value), arg


def test_posthoc_ema_refuses_injected_settings():
  _, hp = CASES['posthoc_ema']
  tx = optax.inject_hyperparams(optax_bema.posthoc_ema)(**hp)
  with pytest.raises(TypeError, match='array-valued settings'):
    tx.init(make_params())


@pytest.mark.parametrize('case', CASES)
def test_multi_steps_applies_the_mean_gradient(case):
  """MultiSteps(k=2) trains as the transform does on the mean of each pair."""
  rng = np.random.default_rng(0)
  scales = [jnp.asarray(rng.uniform(-1.0, 3.0, size=(3, 4)), jnp.float32)
            for _ in range(8)]
  params = make_params()
  multi = optax.MultiSteps(training(case), every_k_schedule=2)
  got, state, step = params, multi.init(params), train_step(multi)
  for scale in scales:
    got, state = step(got, state, scale)
  tx, plain = plain_run(case)
  want, want_state = params, tx.init(params)
  for s1, s2 in zip(scales[::2], scales[1::2]):
    want, want_state = plain(want, want_state, (s1 + s2) / 2)
  assert_same_run(case, (got, state), (want, want_state), rtol=1e-6,
                  atol=1e-7)


@pytest.mark.parametrize('case', CASES)
def test_params_and_state_can_be_donated(case):
  tx = training(case)
  params = make_params()
  state = tx.init(params)
  param_buffers = {x.unsafe_buffer_pointer() for x in jax.tree.leaves(params)}
  state_buffers = [x.unsafe_buffer_pointer() for x in jax.tree.leaves(state)]
  assert not param_buffers & set(state_buffers), 'state aliases the params'
  assert len(set(state_buffers)) == len(state_buffers), 'state aliases itself'
  step = train_step(tx, donate_argnums=(0, 1))
  for _ in range(4):
    params, state = step(params, state, ONES)
  assert all_finite(params)
  if case in AVERAGING:
    assert all_finite(models(case, state, params))


# --- dtypes and shapes --------------------------------------------------------


@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float16],
                         ids=lambda d: d.__name__)
@pytest.mark.parametrize('case', CASES)
def test_low_precision_params_keep_their_dtype(case, dtype):
  """Updates and model come in the params' dtype; the state keeps its own.

  optax's test_preserve_dtype, test_gradient_accumulation and
  test_state_shape_dtype_shard_stability: every state leaf keeps its shape
  and dtype across an update, so the update can sit in a ``lax.cond`` (as in
  MultiSteps, apply_if_finite, or any skipped step).
  """
  tx = training(case)
  params = make_params(dtype)
  state = tx.init(params)
  grads = gradient(params)
  updates, new_state = jax.eval_shape(tx.update, grads, state, params)
  assert dtypes(updates) == dtypes(params)
  assert shapes_and_dtypes(new_state) == shapes_and_dtypes(state)
  if case in AVERAGING:
    model = jax.eval_shape(functools.partial(models, case), new_state, params)
    assert all(dtypes(m) == dtypes(params) for m in model.values())
  multi = optax.MultiSteps(tx, every_k_schedule=2)
  jax.eval_shape(multi.update, grads, multi.init(params), params)

  @jax.jit
  def step(params, state, take):
    # A traced predicate: XLA cannot fold either branch away.
    updates, state = jax.lax.cond(
        take, lambda: tx.update(gradient(params), state, params),
        lambda: (jax.tree.map(jnp.zeros_like, params), state))
    return optax.apply_updates(params, updates), state

  for take in (True, False, True):
    params, new_state = step(params, state, take)
    assert dtypes(params) == dtypes(make_params(dtype))
    assert shapes_and_dtypes(new_state) == shapes_and_dtypes(state)
    state = new_state
  assert all_finite(params)


@pytest.mark.parametrize('case', CASES)
def test_eval_shape_of_init(case):
  tx = training(case)
  params = make_params()
  params['w'] = params['w'].astype(jnp.bfloat16)
  abstract = jax.eval_shape(
      tx.init, jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype),
                            params))
  assert shapes_and_dtypes(abstract) == shapes_and_dtypes(tx.init(params))


# --- clear errors -------------------------------------------------------------


@pytest.mark.parametrize('case', CASES)
def test_update_without_params_names_params(case):
  tx = bare(case)
  params = make_params()
  with pytest.raises(ValueError, match='params'):
    jax.eval_shape(lambda: tx.update(gradient(params), tx.init(params)))


_STABILIZER_ARGS = ('ema_power', 'lag', 'multiplier', 'min_ema_multiplier',
                    'update_after', 'update_freq')
HYPERPARAMETERS = {
    'ema': _STABILIZER_ARGS,
    'bema': _STABILIZER_ARGS + ('bias_power',),
    'dema': _STABILIZER_ARGS,
    'ouema': _STABILIZER_ARGS + ('bias_power',),
    'power_ema': ('std', 'update_after', 'update_freq'),
    'pace': ('learning_rate', 'b1', 'b2', 'eps', 'weight_decay', 'pullback',
             'ema_power', 'delay', 'multiplier', 'update_freq'),
    'adaptive_ademamix': ('learning_rate', 'b1', 'b2', 'b3', 'alpha', 'eps',
                          'weight_decay', 'variance_decay', 'clip_norm'),
    # Shared by every EMA it tracks; ema_powers is a tuple, below.
    'posthoc_ema': ('lag', 'multiplier', 'update_after'),
    # Its members are transforms, each checked by its own factory.
    'averages': (),
}
assert set(HYPERPARAMETERS) == set(catalog.NAMES)


def _bad_values(name, arg):
  # BEMA with bias_power = inf is EMA (alpha_t = 0): a meaningful infinity.
  if (name, arg) == ('bema', 'bias_power'):
    return [-1.0, math.nan]
  if (name, arg) == ('power_ema', 'std'):  # and above sqrt(1/12)
    return [-1.0, math.nan, math.inf, 0.0, 0.29]
  return [-1.0, math.nan, math.inf]


BAD = [
    *[(name, {arg: value}, arg) for name, args in HYPERPARAMETERS.items()
      for arg in args for value in _bad_values(name, arg)],
    *[(name, bad, match)
      for name in catalog.BEMA_PAPER + ('posthoc_ema',)
      for bad, match in [
          (dict(lag=0.0, multiplier=0.0), 'lag|multiplier'),
          # weight 2 at step 1: the average would extrapolate
          (dict(lag=0.0, multiplier=0.25), 'lag'),
      ]],
    *[(name, bad, match) for name in catalog.STABILIZERS
      for bad, match in [
          (dict(update_after=1.5), 'update_after'),
          (dict(update_freq=0), 'update_freq'),
          (dict(update_freq=2.5), 'update_freq'),
      ]],
    ('posthoc_ema', dict(update_after=1.5), 'update_after'),
    *[(name, dict(min_ema_multiplier=1.5), 'min_ema_multiplier')
      for name in catalog.BEMA_PAPER],
    *[('posthoc_ema', dict(ema_powers=(0.5, value)), 'ema_power')
      for value in (-1.0, math.nan, math.inf)],
    ('posthoc_ema', dict(ema_powers=()), 'ema_powers'),
    ('posthoc_ema', dict(ema_powers=(0.5, 0.5)), 'distinct'),
    ('averages', {}, 'at least one'),
    ('ouema', dict(bias_power=0.0), 'bias_power'),  # p_t = 1 for every t
    ('ouema', dict(multiplier=0.0), 'multiplier'),
    ('pace', dict(b1=1.0), 'b1'),
    ('pace', dict(b2=1.0), 'b2'),
    ('pace', dict(update_freq=0), 'update_freq'),
    ('pace', dict(update_freq=1.5), 'update_freq'),
    ('adaptive_ademamix', dict(b3=1.0), 'b3'),
    ('adaptive_ademamix', dict(variance_decay=1.0), 'variance_decay'),
    ('adaptive_ademamix', dict(clip_norm=0.0), 'clip_norm'),
]


def _bad_id(name, bad, match):
  del match
  return name + '-' + ','.join(f'{k}={v}' for k, v in bad.items())


@pytest.mark.parametrize('name, bad, match', BAD,
                         ids=[_bad_id(*b) for b in BAD])
def test_bad_hyperparameters_raise_at_construction(name, bad, match):
  with pytest.raises(ValueError, match=match):
    catalog.transform(name, **bad)


@pytest.mark.parametrize('member', [
    optax.sgd(0.1), optax.inject_hyperparams(optax_bema.ema)(update_freq=2),
    optax_bema.pace(LR, pullback=0.15, ema_power=0.2)])
def test_averages_members_must_be_stabilizers(member):
  with pytest.raises(TypeError, match='stabilizer'):
    optax_bema.averages(ema=optax_bema.ema(), other=member)


# --- one non-finite step ----------------------------------------------------
#
# No returned model is non-finite because one step was. Training goes on after
# one NaN gradient coordinate at step BAD_STEP, whose live weight is NaN from
# then on: each average keeps its last finite value.

STEPS, BAD_STEP = 10, 5


def train_with_one_bad_step(tx):
  """(live weights, state) after each step; step BAD_STEP's gradient is NaN."""
  step = train_step(tx)
  params = make_params()
  state = tx.init(params)
  history = []
  for t in range(1, STEPS + 1):
    params, state = step(params, state, POISON if t == BAD_STEP else ONES)
    history.append((params, state))
  return history


SETTINGS = [dict(update_freq=1, update_after=0),
            dict(update_freq=3, update_after=0),
            # the bad step falls in the burn-in: its reset is skipped too
            dict(update_freq=1, update_after=8)]


# Read at every step, before the first update too, where the warning is due.
@pytest.mark.filterwarnings('ignore::optax_bema.NeverUpdatedWarning')
@pytest.mark.parametrize('hp', SETTINGS, ids=lambda hp: '-'.join(
    f'{k}={v}' for k, v in hp.items()))
@pytest.mark.parametrize('name', catalog.STABILIZERS)
def test_stabilizer_model_stays_at_its_last_finite_value(name, hp):
  history = train_with_one_bad_step(catalog.training(name, LR, **hp))
  assert np.isnan(history[-1][0]['w'][1, 2]), 'training should have broken'
  returned = [optax_bema.averaged_params(s, p) for p, s in history]
  before = returned[BAD_STEP - 2]
  assert all_finite(before)
  finite_iterates = [p for p, _ in history[:BAD_STEP - 1]]
  for model, (_, state) in zip(returned[BAD_STEP - 1:],
                               history[BAD_STEP - 1:]):
    assert all_finite(model)
    if name == 'bema' and hp['update_freq'] == 1:
      # Its readout alpha_t (params - theta_0) + EMA reads the current
      # params; with those not all finite it is the EMA alone.
      jax.tree.map(np.testing.assert_array_equal, model,
                   jax.tree.map(lambda e, p: e.astype(p.dtype),
                                state[-1].ema, make_params()))
      assert_trees_close(model, _oracle.model_tree(
          'ema', make_params(), finite_iterates, **hp), rtol=1e-5, atol=1e-6)
    else:
      jax.tree.map(np.testing.assert_array_equal, model, before)
  skipped = [t for t in range(BAD_STEP, STEPS + 1) if t <= hp['update_after']
             or (t - hp['update_after']) % hp['update_freq'] == 0]
  assert int(history[-1][1][-1].nonfinite_count) == len(skipped)


# Read at every step, before the first update too, where the warning is due.
@pytest.mark.filterwarnings('ignore::optax_bema.NeverUpdatedWarning')
@pytest.mark.parametrize('case', COMBINED)
def test_combined_models_stay_at_their_last_finite_values(case):
  """Every member keeps its last finite model and counts what it skipped."""
  history = train_with_one_bad_step(training(case))
  assert np.isnan(history[-1][0]['w'][1, 2]), 'training should have broken'
  returned = [models(case, s, p) for p, s in history]
  before = returned[BAD_STEP - 2]
  assert all_finite(before)
  for model in returned[BAD_STEP - 1:]:
    jax.tree.map(np.testing.assert_array_equal, model, before)
  # posthoc_ema's holder of theta_0 reads no iterate after the burn-in.
  members = history[-1][1][-1].members
  assert all(int(m.nonfinite_count) > 0 for k, m in members.items()
             if k != 'initial')


def test_pace_ema_skips_non_finite_iterates():
  history = train_with_one_bad_step(
      optax_bema.pace(LR, pullback=0.15, ema_power=0.2))
  assert np.isnan(history[-1][0]['w'][1, 2]), 'training should have broken'
  returned = [optax_bema.averaged_params(s, p) for p, s in history]
  before = returned[BAD_STEP - 2]
  assert all_finite(before)
  for model in returned[BAD_STEP - 1:]:
    jax.tree.map(np.testing.assert_array_equal, model, before)
  # every EMA update from the bad step on
  assert int(history[-1][1].nonfinite_count) == STEPS - BAD_STEP + 1


# Near its dtype's largest value: two such elements sum past it.
BAD_ELEMENTS = [None, ('low', np.nan), ('low', np.inf), ('f32', -np.inf)]


@pytest.mark.parametrize('dtype', ['float16', 'bfloat16', 'float32'])
@pytest.mark.parametrize('name', ['ema', 'posthoc_ema', 'pace'])
def test_nonfinite_guard_reads_elements_not_their_sum(name, dtype):
  """Weights whose sum overflows are finite: their update is taken. One NaN
  or infinity in a leaf of either dtype is not: that update is skipped."""
  big = lambda d, shape: jnp.full(shape, 0.6 * float(jnp.finfo(d).max), d)
  params = {'low': big(dtype, (4, 40)), 'f32': big('float32', (40,))}
  with np.errstate(over='ignore'):
    assert not any(np.isfinite(np.sum(np.asarray(x))) for x in params.values())
  tx = catalog.transform(name, LR, **({'ema': dict(update_freq=1)}.get(
      name, {})))
  step = jax.jit(tx.update)
  for bad in BAD_ELEMENTS:
    inputs = jax.tree.map(jnp.zeros_like, params)
    if bad is not None:
      leaf, value = bad
      inputs[leaf] = inputs[leaf].at[(1,) * inputs[leaf].ndim].set(value)
    updates, state = step(inputs, tx.init(params), params)
    iterate = optax.apply_updates(params, updates)
    finite = all(np.isfinite(np.asarray(x, np.float64)).all()
                 for x in jax.tree.leaves(iterate))
    assert finite == (bad is None)
    counts = ([m.nonfinite_count for k, m in state.members.items()
               if k != 'initial'] if name == 'posthoc_ema'
              else [state.nonfinite_count])
    assert [int(c) for c in counts] == [int(not finite)] * len(counts), bad


def test_nonfinite_guard_tests_a_narrower_average_after_its_cast():
  """float32 weights of 1e5 are finite; in a float16 average they round to
  infinity, so that update is skipped."""
  params = jnp.full((8,), 1e5, jnp.float32)
  tx = optax_bema.ema(update_freq=1, accumulator_dtype=jnp.float16)
  updates, state = jax.jit(tx.update)(
      jnp.zeros_like(params), tx.init(params), params)
  iterate = np.asarray(optax.apply_updates(params, updates))
  assert np.isfinite(iterate).all()
  with np.errstate(over='ignore'):
    assert not np.isfinite(iterate.astype(jnp.float16)).all()
  assert int(state.nonfinite_count) == 1


@pytest.mark.parametrize('case', CASES)
def test_apply_if_finite_skips_the_bad_step(case):
  """Wrapped in optax.apply_if_finite, the run is the one without that step."""
  history = train_with_one_bad_step(
      optax.apply_if_finite(training(case), max_consecutive_errors=3))
  assert all(all_finite(p) for p, _ in history)
  params, state = history[-1]
  assert int(state.total_notfinite) == 1
  tx, step = plain_run(case)
  want, want_state = make_params(), tx.init(make_params())
  for _ in range(STEPS - 1):
    want, want_state = step(want, want_state, ONES)
  assert_same_run(case, (params, state), (want, want_state), rtol=1e-5,
                  atol=1e-6)
  if case == 'pace':
    telemetry = optax_bema.pace_telemetry(state)
    assert all_finite(telemetry)
    assert_trees_close(telemetry, optax_bema.pace_telemetry(want_state),
                       rtol=1e-5, atol=1e-6)

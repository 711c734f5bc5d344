"""Tree helpers every transform shares: dtypes, copies, the EMA step, finding
a state inside a chain.

Scalars are computed in float32; only the final product meets a leaf's dtype.
Integer and boolean leaves are never averaged: they become
``optax.MaskedNode()`` in a state and cost no memory.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from optax_bema._placement import like_sharding

SCALAR_DTYPE = jnp.float32


def is_float_leaf(x) -> bool:
  """Whether a leaf is averaged: integer and boolean leaves never are."""
  return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def accumulator_dtype_for(leaf, accumulator_dtype) -> jnp.dtype:
  """float32 at least: bfloat16 and float16 weights are averaged in float32."""
  if accumulator_dtype is not None:
    return jnp.dtype(accumulator_dtype)
  return jnp.promote_types(leaf.dtype, SCALAR_DTYPE)


def float_leaves(tree):
  """Float leaves as they are; the others ``MaskedNode``."""
  return jax.tree.map(
      lambda x: x if is_float_leaf(x) else optax.MaskedNode(), tree)


def as_accumulator(tree, accumulator_dtype):
  """Float leaves in the accumulator dtype; the others ``MaskedNode``."""
  return jax.tree.map(
      lambda x: x.astype(accumulator_dtype_for(x, accumulator_dtype)),
      float_leaves(tree))


def copy_tree(params, accumulator_dtype):
  """A params-shaped copy in the accumulator dtype, one that never aliases.

  ``jnp.array(copy=True)`` keeps the leaf's sharding and yields a new buffer,
  so params and state can both be donated.
  """
  def copy(p):
    if not is_float_leaf(p):
      return optax.MaskedNode()
    return jnp.array(p, dtype=accumulator_dtype_for(p, accumulator_dtype),
                     copy=True)
  return jax.tree.map(copy, params)


def zeros_tree(params, accumulator_dtype):
  """Params-shaped zeros in the accumulator dtype (optimizer moments)."""
  return jax.tree.map(
      lambda p: jnp.zeros_like(p, accumulator_dtype_for(p, accumulator_dtype)),
      params)


def ema_tree(beta, average, x):
  """(1 - beta) average + beta x per leaf, beta cast only at the end.

  Written average + beta (x - average): where x equals the average (a
  frozen weight) it stays exactly as it is, where the other form rounds it
  by an ulp now and then.
  """
  def step(a, v):
    b = beta.astype(a.dtype)
    return a + b * (v - a)
  return jax.tree.map(step, average, x)


def tree_equal(a, b) -> bool:
  """Whether two trees of arrays hold the same values (read on the host)."""
  return all(bool(jnp.array_equal(x, y)) for x, y
             in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def tree_sum(tree) -> jax.Array:
  """The sum of every element of every leaf, accumulated in float32."""
  return sum((jnp.sum(x, dtype=SCALAR_DTYPE) for x in jax.tree.leaves(tree)),
             jnp.zeros([], SCALAR_DTYPE))


def all_finite(tree, accumulator_dtype=None) -> jax.Array:
  """Whether every float leaf of ``tree``, in its accumulator dtype, is all
  finite, exactly.

  A widening cast (bfloat16 or float16 to float32, the default) keeps each
  element finite or not, so such a leaf is tested as it is, in its own
  dtype (bfloat16 weights: half the bytes); one that narrows may overflow,
  so its result is tested.

  On accelerators, ``isfinite(x).all()``: XLA fuses the reduction into one
  read, and a ``lax.cond`` there would stall the host on every step. On CPU
  that form writes a boolean temporary and reduces it in a tree, 2-3 times
  slower than a sum, so there a sum decides. For a float32 leaf, the sum of
  ``x * 0``: NaN exactly where an element is not finite and 0 elsewhere, so
  it cannot overflow and needs no fallback (whose branch XLA compiles and
  counts even when it is never taken). For other dtypes, the sum of ``x``,
  non-finite whenever an element is (NaN and infinities propagate through
  addition); only then -- a non-finite element, or finite ones whose sum
  overflowed -- does the element-wise test run. ``x * 0`` loses there:
  under bfloat16 weights XLA:CPU recomputes it from the donated params
  beside their in-place update, a parameter-sized copy. (``max(abs(x))``
  drops NaN on XLA:CPU's fast path.)
  """
  def tested(x):
    wanted = accumulator_dtype_for(x, accumulator_dtype)
    return x if jnp.promote_types(x.dtype, wanted) == wanted else (
        x.astype(wanted))
  leaves = [tested(x) for x in jax.tree.leaves(tree) if is_float_leaf(x)]
  if not leaves:
    return jnp.asarray(True)

  def elementwise(*xs):
    return jnp.stack([jnp.isfinite(x).all() for x in xs]).all()

  def summed(*xs):
    zeros = [jnp.sum(x * 0) for x in xs if x.dtype == jnp.float32]
    rest = [x for x in xs if x.dtype != jnp.float32]
    finite = jnp.isfinite(jnp.stack(zeros).sum()) if zeros else True
    if not rest:
      return finite
    total = jnp.stack([
        jnp.sum(x, dtype=jnp.promote_types(x.dtype, SCALAR_DTYPE))
        for x in rest]).sum()
    return finite & jax.lax.cond(
        jnp.isfinite(total), lambda *_: jnp.asarray(True), elementwise, *rest)
  return jax.lax.platform_dependent(*leaves, cpu=summed, default=elementwise)


def require_like_params(model, params, what: str):
  """``ValueError`` unless ``model`` has the params' tree structure and
  leaf shapes (leaves never averaged, ``MaskedNode``, match any)."""
  is_masked = lambda x: isinstance(x, optax.MaskedNode)
  flat, model_structure = jax.tree_util.tree_flatten_with_path(
      model, is_leaf=is_masked)
  paths, structure = jax.tree_util.tree_flatten_with_path(params)
  if model_structure != structure:  # type: ignore[operator]  # PyTreeDefs
    keys = lambda pairs: {jax.tree_util.keystr(path) for path, _ in pairs}
    differ = sorted(keys(flat) ^ keys(paths)) or ['a node type']
    raise ValueError(
        f'{what} has another tree structure than the params (first '
        f'difference: {differ[0]}): pass the params this state was trained '
        'on.')
  for (path, p), (_, m) in zip(paths, flat):
    if not is_masked(m) and jnp.shape(m) != jnp.shape(p):
      raise ValueError(
          f'{what} has leaf {jax.tree_util.keystr(path)} of shape '
          f'{jnp.shape(m)} where the params have {jnp.shape(p)}: pass the '
          'params this state was trained on.')


def cast_like_params(model, params, what: str = 'the average'):
  """The model in the params' dtypes and layout (a value past a narrower
  dtype's range clipped to it); non-float leaves are the params' own.
  ``ValueError`` if a leaf's shape differs from the params'."""
  require_like_params(model, params, what)
  def cast(p, m):
    if isinstance(m, optax.MaskedNode):
      return p
    return like_sharding(saturating_cast(m, p.dtype), p)
  return jax.tree.map(cast, params, model)


def saturating_cast(x, dtype):
  """``x`` in ``dtype``, a finite value beyond its range clipped to its
  largest: an average of float16 weights, taken in float32, may lie past
  float16's 65504 after a spike the weights themselves survived."""
  dtype = jnp.dtype(dtype)
  if (jnp.issubdtype(dtype, jnp.floating)
      and jnp.finfo(dtype).max < jnp.finfo(x.dtype).max):
    top = jnp.finfo(dtype).max.astype(x.dtype)
    x = jnp.clip(x, -top, top)
  return x.astype(dtype)


def find_state(opt_state, types, *, caller: str, what: str, missing: str,
               name=None):
  """The one state of a class in ``types`` anywhere inside ``opt_state``.

  With ``name``, only the states held under that dictionary key count (the
  members of ``optax_bema.averages``, the elements of ``optax.named_chain``).
  Raises ``ValueError`` when there is none (``missing`` says what to do) or
  several (the message names their paths and how to pick one).
  """
  is_ours = lambda x: type(x) in types  # pylint: disable=unidiomatic-typecheck
  leaves, _ = jax.tree_util.tree_flatten_with_path(opt_state, is_leaf=is_ours)
  found = [(path, x) for path, x in leaves if is_ours(x)]
  if name is not None:
    names = [path[-1].key for path, _ in found
             if path and isinstance(path[-1], jax.tree_util.DictKey)]
    found = [(path, x) for path, x in found if path
             and isinstance(path[-1], jax.tree_util.DictKey)
             and path[-1].key == name]
    if not found:
      raise ValueError(f'{caller}: opt_state holds no {what} named {name!r}; '
                       f'the named ones are {names}. '
                       f'{_restored_hint(opt_state)}'.rstrip())
  if len(found) == 1:
    return found[0][1]
  if not found:
    raise ValueError(f'{caller}: opt_state holds no {what}. '
                     f'{_restored_hint(opt_state) or missing}')
  where = ', '.join(f'opt_state{jax.tree_util.keystr(path)} '
                    f'({type(s).__name__})' for path, s in found)
  first = jax.tree_util.keystr(found[0][0])
  raise ValueError(
      f'{caller}: opt_state holds {len(found)} {what}s: {where}. Pass the '
      f'one to read, e.g. {caller}(opt_state{first}, ...), or its name= '
      'where it has one.')


def _restored_hint(opt_state) -> str:
  """What to do when a state came back from a checkpoint as plain dicts."""
  looks_saved = lambda x: isinstance(x, dict) and {
      'count', 'nonfinite_count'} <= set(x)
  if not any(looks_saved(x) for x in jax.tree.leaves(
      opt_state, is_leaf=looks_saved)):
    return ''
  return ('It holds plain dicts with the fields of one (count, '
          'nonfinite_count, ...), as Orbax restores a state without a '
          'target: restore it with a target, e.g. manager.restore(step, '
          'args=ocp.args.StandardRestore(jax.eval_shape(tx.init, params))) '
          'for the optimizer state, so that it comes back as its own types.')


def require_params(params, name: str):
  if params is None:
    raise ValueError(
        f'{name}: update needs `params`, the current weights, to track '
        'theta_t = params + updates. Call tx.update(updates, state, params).')

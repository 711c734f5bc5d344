"""A byte-level decoder-only transformer, its corpora, and cached pretraining.

Everything comes from what a Python installation ships, read
deterministically: pretraining on the standard library's own top-level
``.py`` files (sorted, concatenated, a fixed prefix), fine-tuning on the
text of ``pydoc_data.topics`` (sorted by topic). Each corpus is split once:
the last ``HELD_OUT`` fraction of its bytes is held out for evaluation.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import sysconfig

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

HELD_OUT = 0.1
VOCAB = 256


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  width: int = 128
  layers: int = 2
  heads: int = 4
  context: int = 128


def stdlib_source(max_bytes: int) -> bytes:
  """A fixed prefix of the standard library's top-level modules' source."""
  paths = sorted(glob.glob(os.path.join(sysconfig.get_paths()['stdlib'],
                                        '*.py')))
  chunks, size = [], 0
  for path in paths:
    with open(path, 'rb') as f:
      chunks.append(f.read())
    size += len(chunks[-1])
    if size >= max_bytes:
      break
  return b''.join(chunks)[:max_bytes]


def pydoc_topics() -> bytes:
  from pydoc_data.topics import topics  # pylint: disable=g-import-not-at-top
  return '\n\n'.join(topics[k] for k in sorted(topics)).encode('utf-8')


def split(data: bytes):
  """(train, held_out) uint8 arrays; the held-out part is the corpus' tail."""
  array = np.frombuffer(data, np.uint8)
  cut = int(len(array) * (1 - HELD_OUT))
  return array[:cut], array[cut:]


def sample_batch(rng: np.random.Generator, data, batch: int, context: int):
  """``batch`` random windows of context + 1 bytes (inputs and targets)."""
  starts = rng.integers(0, len(data) - context - 1, batch)
  return np.stack([data[s:s + context + 1] for s in starts]).astype(np.int32)


def eval_windows(data, count: int, context: int):
  """The first ``count`` non-overlapping windows: the fixed evaluation set."""
  count = min(count, (len(data) - 1) // (context + 1))
  usable = data[:count * (context + 1)]
  return usable.reshape(count, context + 1).astype(np.int32)


class Block(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x, mask):
    width = self.config.width
    h = nn.MultiHeadDotProductAttention(num_heads=self.config.heads)(
        nn.LayerNorm()(x), mask=mask)
    x = x + h
    h = nn.Dense(4 * width)(nn.LayerNorm()(x))
    return x + nn.Dense(width)(nn.gelu(h))


class Transformer(nn.Module):
  """Pre-LayerNorm GPT, learned positions, output tied to the embedding."""
  config: ModelConfig

  @nn.compact
  def __call__(self, tokens):
    embed = nn.Embed(VOCAB, self.config.width)
    positions = self.param('positions', nn.initializers.normal(0.02),
                           (self.config.context, self.config.width))
    x = embed(tokens) + positions[:tokens.shape[-1]]
    mask = nn.make_causal_mask(tokens)
    for _ in range(self.config.layers):
      x = Block(self.config)(x, mask)
    return embed.attend(nn.LayerNorm()(x))


def loss_fn(model: Transformer, params, windows):
  """Mean next-byte cross-entropy (nats) over every position."""
  logits = model.apply({'params': params}, windows[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(
      logits, windows[:, 1:]).mean()


def init_params(model: Transformer, seed: int = 0):
  tokens = jnp.zeros((1, model.config.context), jnp.int32)
  return model.init(jax.random.key(seed), tokens)['params']


def _cache_path(cache_dir: str, spec: dict) -> str:
  digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode())
  return os.path.join(cache_dir, f'pretrained-{digest.hexdigest()[:16]}.npz')


def pretrained(model: Transformer, *, corpus_bytes: int, steps: int,
               batch: int, learning_rate: float, cache_dir: str):
  """Pretrains on the stdlib source, or loads the cached result.

  Returns ``(params, held_out_loss)``. The cache key is every input that
  changes the weights, so a changed configuration never reads a stale file.
  """
  template = init_params(model)
  # The parameters' layout is in the key too: a Flax release that renames or
  # reshapes them must miss the cache, not fail to load it.
  spec = dict(model=dataclasses.asdict(model.config), corpus_bytes=corpus_bytes,
              steps=steps, batch=batch, learning_rate=learning_rate,
              python=sysconfig.get_python_version(),
              layout=str(jax.tree.map(jnp.shape, template)))
  path = _cache_path(cache_dir, spec)
  train, held_out = split(stdlib_source(corpus_bytes))
  evaluate = jax.jit(lambda p: loss_fn(model, p, eval_windows(
      held_out, 64, model.config.context)))
  if os.path.exists(path):
    with np.load(path) as stored:
      leaves = [jnp.asarray(stored[str(i)]) for i in range(len(stored.files))]
    params = jax.tree.unflatten(jax.tree.structure(template), leaves)
    return params, float(evaluate(params))

  schedule = optax.warmup_cosine_decay_schedule(
      0.0, learning_rate, steps // 10, steps, learning_rate / 10)
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optax.adamw(schedule, weight_decay=0.01))

  @jax.jit
  def step(params, state, windows):
    loss, grads = jax.value_and_grad(
        lambda p: loss_fn(model, p, windows))(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  params, state = template, tx.init(template)
  rng = np.random.default_rng(0)
  bar = tqdm.trange(steps, desc='pretraining on stdlib source', leave=False)
  for _ in bar:
    params, state, loss = step(
        params, state, sample_batch(rng, train, batch, model.config.context))
    bar.set_postfix(loss=f'{float(loss):.3f}', refresh=False)
  os.makedirs(cache_dir, exist_ok=True)
  # Written under a temporary name, then renamed: a run killed mid-write
  # never leaves a truncated cache behind.
  tmp = path + '.tmp.npz'
  np.savez(tmp, **{str(i): np.asarray(x)
                   for i, x in enumerate(jax.tree.leaves(params))})
  os.replace(tmp, path)
  return params, float(evaluate(params))

"""What a stabilizer costs per training step, as a multiple of plain AdamW.

Times one jitted, donated training step, ``optax.apply_updates`` fused in,
of ``optax.chain(optax.adamw(lr), X)`` for every stabilizer X at
``update_freq`` 1 and 400, and of ``optax_bema.pace``, each paired with plain
``optax.adamw`` in the same process: the two alternate round by round and
the reported ratio is the median of the per-round ratios, so a noisy,
shared machine slows both alike. Parameters are a GPT-like mix of leaves
(token and position embeddings, attention and MLP matrices, biases, layernorm
scales) at the sizes asked for.

These steps are bound by memory traffic: AdamW reads the gradient and reads
and writes params and both moments, about 7 parameter-sized transfers. The
``floor`` column is the ratio that traffic alone allows (an EMA updated
every step adds 3 transfers: 10/7 = 1.43); ``hlo`` is the same ratio read off
the compiled program's own byte count (XLA's cost analysis; it counts both
sides of a branch), which exposes any extra pass over memory. ``cpu`` is the
ratio of the process's CPU time, steadier than wall time on a loaded
machine; the ``adamw`` row times AdamW against itself, the noise floor.
``B/param`` is the state's extra bytes per parameter; ``+compile`` the extra
compile time. The JSON also gives the achieved bandwidth, against an
in-place copy's. ``--steps-per-call`` runs several steps in one call (a
``fori_loop``) to time the device without the host's per-call cost.

Usage:
  python benchmarks/overhead.py                      # 1M, 16M, 64M params
  python benchmarks/overhead.py --quick              # CI scale, seconds
  python benchmarks/overhead.py --sizes 125M,350M,1B --dtype bfloat16
  python benchmarks/overhead.py --peer               # TRL's BEMACallback too
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_bema

LEARNING_RATE = 1e-3
# Targets of issue 6 on CPU, as ratios to AdamW's step.
TARGETS = {('ema', 1): 1.5, ('bema', 1): 1.8, ('pace', 1): 1.35}
SLOW_FREQ_TARGET = 1.02
FLOOR_SLACK = 1.10  # DEMA and OUEMA: within 10% of their floors.

# name: (width, layers, vocabulary, context); about 12 w^2 per layer.
SIZES = {
    '1M': (128, 4, 2048, 256),
    '16M': (512, 4, 8192, 512),
    '64M': (768, 8, 8192, 1024),
    '125M': (768, 12, 50304, 1024),
    '350M': (1024, 24, 50304, 1024),
    '770M': (1280, 36, 50304, 1024),
    '1B': (2048, 18, 50304, 2048),
}


def transformer_shapes(size: str) -> dict:
  """Leaf shapes of a GPT-2-like model of the named size."""
  width, layers, vocab, context = SIZES[size]
  shapes = {'wte': (vocab, width), 'wpe': (context, width),
            'ln_f': {'scale': (width,), 'bias': (width,)}}
  for i in range(layers):
    shapes[f'block{i}'] = {
        'ln1': {'scale': (width,), 'bias': (width,)},
        'qkv': {'kernel': (width, 3 * width), 'bias': (3 * width,)},
        'proj': {'kernel': (width, width), 'bias': (width,)},
        'ln2': {'scale': (width,), 'bias': (width,)},
        'fc': {'kernel': (width, 4 * width), 'bias': (4 * width,)},
        'out': {'kernel': (4 * width, width), 'bias': (width,)},
    }
  return shapes


def random_tree(shapes, dtype, seed, scale):
  is_shape = lambda x: isinstance(x, tuple)
  leaves, treedef = jax.tree.flatten(shapes, is_leaf=is_shape)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return treedef.unflatten(
      [(scale * jax.random.normal(k, s, jnp.float32)).astype(dtype)
       for k, s in zip(keys, leaves)])


def configs(names=None):
  """(name, update_freq, optimizer, extra transfers) for every contender.

  The extra transfers are the fewest an update can make beyond AdamW's, as
  (reads of the iterate in the params' dtype, averages read or written in
  their float32 dtype).
  """
  # AdamW against itself: the ratio a shared, noisy machine reports for zero
  # overhead, the floor against which to read the others.
  out = [('adamw', 1, optax.adamw(LEARNING_RATE), (0, 0))]
  extras = {'ema': (1, 2), 'bema': (1, 2), 'dema': (1, 4), 'ouema': (1, 3)}
  for name, extra in extras.items():
    for freq in (1, 400):
      stab = getattr(optax_bema, name)(update_freq=freq)
      out.append((name, freq, optax.chain(optax.adamw(LEARNING_RATE), stab),
                  extra if freq == 1 else (0, 0)))
  if hasattr(optax_bema, 'pace'):
    out.append(('pace', 1, optax_bema.pace(LEARNING_RATE, pullback=0.15,
                                           ema_power=0.2), (0, 2)))
  if names:
    out = [c for c in out if c[0] in names or f'{c[0]}{c[1]}' in names]
  return out


def make_step(tx, steps_per_call=1):
  def step(params, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  def steps(params, opt_state, grads):
    # Several steps per call leave out the host's per-call cost (about a
    # microsecond or two per array) and time the device alone.
    return jax.lax.fori_loop(0, steps_per_call,
                             lambda _, c: step(*c, grads), (params, opt_state))
  return jax.jit(step if steps_per_call == 1 else steps,
                 donate_argnums=(0, 1))


class Contender:
  """One optimizer's compiled step and the buffers it runs on."""

  def __init__(self, tx, params, grads, dump=None, steps_per_call=1):
    state = tx.init(params)
    self.state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    self.carry = (jax.tree.map(jnp.copy, params), state)
    self.grads = grads
    start = time.perf_counter()
    self.steps_per_call = steps_per_call
    self.compiled = make_step(tx, steps_per_call).lower(
        *self.carry, grads).compile()
    self.compile_s = time.perf_counter() - start
    cost = self.compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    self.hlo_bytes = float(cost.get('bytes accessed', float('nan')))
    if dump:
      with open(dump, 'w') as f:
        f.write(self.compiled.as_text())
    self.run(2)

  def run(self, steps: int) -> tuple[float, float]:
    """Wall and process CPU seconds per step, synchronised at the end."""
    start, cpu = time.perf_counter(), time.process_time()
    carry = self.carry
    for _ in range(steps):
      carry = self.compiled(*carry, self.grads)
    jax.block_until_ready(carry)
    self.carry = carry
    steps *= self.steps_per_call
    return ((time.perf_counter() - start) / steps,
            (time.process_time() - cpu) / steps)

  def release(self):
    jax.tree.map(lambda x: x.delete(), self.carry)


def paired_rounds(base, other, rounds, steps):
  """Per-round (base, other) seconds per step, alternating who goes first."""
  times = []
  for r in range(rounds):
    if r % 2:
      t_other, t_base = other.run(steps), base.run(steps)
    else:
      t_base, t_other = base.run(steps), other.run(steps)
    times.append((t_base, t_other))
  return times


def quartiles(xs):
  q = np.percentile(xs, [25, 50, 75])
  return float(q[0]), float(q[1]), float(q[2])


def bench_size(size, dtype, args, log):
  shapes = transformer_shapes(size)
  params = random_tree(shapes, dtype, 0, 0.02)
  grads = random_tree(shapes, dtype, 1, 1e-3)
  n = sum(x.size for x in jax.tree.leaves(params))
  p_bytes = jnp.dtype(dtype).itemsize
  dump = (lambda tag: os.path.join(args.dump_hlo, f'{size}_{dtype}_{tag}.txt')
          ) if args.dump_hlo else (lambda tag: None)
  base = Contender(optax.adamw(LEARNING_RATE), params, grads, dump('adamw'),
                   args.steps_per_call)
  base_bytes = (p_bytes + 2 * p_bytes + base.state_bytes / n * 2)
  t, _ = base.run(3)
  steps = max(2, math.ceil(args.round_s / t / args.steps_per_call))
  log(f'{size} {dtype}: {n / 1e6:.1f}M params in '
      f'{len(jax.tree.leaves(params))} leaves; AdamW {1e3 * t:.2f} ms/step '
      f'({base_bytes:.0f} B/param: {base_bytes * n / t / 1e9:.0f} GB/s), '
      f'{steps} steps per round')
  rows = []
  for name, freq, tx, (theta_reads, avg_transfers) in configs(args.configs):
    other = Contender(tx, params, grads, dump(f'{name}{freq}'),
                      args.steps_per_call)
    times = paired_rounds(base, other, args.rounds, steps)
    other.release()
    ratios = [o[0] / b[0] for b, o in times]
    q1, ratio, q3 = quartiles(ratios)
    t_base = statistics.median(b[0] for b, _ in times)
    t_other = statistics.median(o[0] for _, o in times)
    cpu_ratio = statistics.median(o[1] / b[1] for b, o in times)
    extra = theta_reads * p_bytes + avg_transfers * 4
    if name == 'pace':  # its own moments and EMA, each read and written once
      extra = 3 * p_bytes + 2 * other.state_bytes / n - base_bytes
    floor = (base_bytes + extra) / base_bytes
    if name == 'adamw':
      target = None
    elif freq != 1:
      target = SLOW_FREQ_TARGET
    elif (name, freq) in TARGETS:
      target = TARGETS[(name, freq)]
    else:
      target = round(floor * FLOOR_SLACK, 3)
    rows.append(dict(
        size=size, params=n, dtype=str(jnp.dtype(dtype)), name=name,
        update_freq=freq, ratio=ratio, ratio_q1=q1, ratio_q3=q3,
        cpu_ratio=cpu_ratio,
        ms_step=1e3 * t_other, adamw_ms_step=1e3 * t_base,
        adamw_gb_s=base_bytes * n / t_base / 1e9,
        extra_gb_s=(extra * n / max(t_other - t_base, 1e-9) / 1e9
                    if extra else None),
        state_bytes_per_param=(other.state_bytes - base.state_bytes) / n,
        adamw_state_bytes_per_param=base.state_bytes / n,
        compile_s=other.compile_s, extra_compile_s=other.compile_s
        - base.compile_s, hlo_ratio=other.hlo_bytes / base.hlo_bytes,
        floor=floor, target=target,
        met=None if target is None else bool(ratio <= target),
        rounds=args.rounds, steps_per_round=steps,
        steps_per_call=args.steps_per_call))
    log(format_row(rows[-1]))
  base.release()
  return rows


HEADER = (f"{'size':>5} {'dtype':>8} {'optimizer':>9} {'freq':>4} "
          f"{'ratio':>6} {'[q1, q3]':>13} {'cpu':>5} {'ms/step':>8} "
          f"{'adamw':>8} {'floor':>5} {'hlo':>5} {'target':>7} "
          f"{'B/param':>7} {'+compile':>8}")


def format_row(r):
  target = ('control' if r['target'] is None else
            f"{r['target']:6.3f}{' ' if r['met'] else '!'}")
  return (f"{r['size']:>5} {r['dtype']:>8} {r['name']:>9} "
          f"{r['update_freq']:>4} {r['ratio']:6.3f} "
          f"[{r['ratio_q1']:5.3f},{r['ratio_q3']:5.3f}] "
          f"{r['cpu_ratio']:5.2f} "
          f"{r['ms_step']:8.3f} {r['adamw_ms_step']:8.3f} {r['floor']:5.2f} "
          f"{r['hlo_ratio']:5.2f} {target:>7} "
          f"{r['state_bytes_per_param']:7.1f} {r['extra_compile_s']:+7.2f}s")


# --- peer: TRL's BEMACallback against a torch AdamW step -------------------


def bench_peer(size, args, log):
  """TRL's BEMA update (every step) against torch.optim.AdamW's step."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  from trl.trainer.callbacks import BEMACallback  # pylint: disable=import-outside-toplevel

  class Config(transformers.PretrainedConfig):
    model_type = 'overhead_benchmark'

    def __init__(self, shapes=(), **kwargs):
      super().__init__(**kwargs)
      self.shapes = [list(s) for s in shapes]

  class Model(transformers.PreTrainedModel):
    """The same leaves as the JAX run; TRL copies the model by its config."""
    config_class = Config

    def __init__(self, config):
      super().__init__(config)
      self.weights = torch.nn.ParameterList(
          [torch.nn.Parameter(0.02 * torch.randn(s)) for s in config.shapes])

  torch.set_num_threads(os.cpu_count())
  is_shape = lambda x: isinstance(x, tuple)
  model = Model(Config(jax.tree.leaves(transformer_shapes(size),
                                       is_leaf=is_shape)))
  for p in model.parameters():
    p.grad = 1e-3 * torch.randn_like(p)
  n = sum(p.numel() for p in model.parameters())
  # fused: what Hugging Face Trainer runs by default (adamw_torch_fused).
  opt = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, fused=True)
  callback = BEMACallback(update_freq=1)
  state = types.SimpleNamespace(global_step=0)  # all the callback reads
  control = None
  targs = None
  callback.on_train_begin(targs, state, control, model=model)

  def adamw_step():
    with torch.no_grad():
      opt.step()

  def bema_step():
    with torch.no_grad():
      opt.step()
      state.global_step += 1
      callback.on_step_end(targs, state, control, model=model)

  def timed(fn, steps):
    start = time.perf_counter()
    for _ in range(steps):
      fn()
    return (time.perf_counter() - start) / steps

  for fn in (adamw_step, bema_step):
    timed(fn, 2)
  steps = max(2, math.ceil(args.round_s / timed(adamw_step, 2)))
  times = []
  for r in range(args.rounds):
    pair = (adamw_step, bema_step) if r % 2 == 0 else (bema_step, adamw_step)
    t = {fn.__name__: timed(fn, steps) for fn in pair}
    times.append((t['adamw_step'], t['bema_step']))
  q1, ratio, q3 = quartiles([o / b for b, o in times])
  row = dict(size=size, params=n, dtype='float32', name='trl.bema',
             update_freq=1, ratio=ratio, ratio_q1=q1, ratio_q3=q3,
             ms_step=1e3 * statistics.median(o for _, o in times),
             adamw_ms_step=1e3 * statistics.median(b for b, _ in times),
             torch=torch.__version__, threads=torch.get_num_threads())
  log(f"{size:>5} {'float32':>8} {'trl.bema':>9} {1:>4} {ratio:6.3f} "
      f'[{q1:5.3f},{q3:5.3f}] {row["ms_step"]:8.3f} '
      f'{row["adamw_ms_step"]:8.3f}   (torch {torch.__version__}, '
      f'{torch.get_num_threads()} threads)')
  return row


def copy_bandwidth(nbytes: int) -> float:
  """GB/s of an in-place scale of one large array, bytes read plus written."""
  f = jax.jit(lambda x: x * 1.0001, donate_argnums=0)
  x = f(jnp.ones(nbytes // 4, jnp.float32))
  times = []
  for _ in range(7):
    start = time.perf_counter()
    for _ in range(5):
      x = f(x)
    x.block_until_ready()
    times.append((time.perf_counter() - start) / 5)
  x.delete()
  return 2 * nbytes / statistics.median(times) / 1e9


def machine():
  dev = jax.devices()[0]
  return dict(platform=dev.platform, device=dev.device_kind,
              devices=jax.device_count(), cpu_count=os.cpu_count(),
              processor=platform.processor() or platform.machine(),
              python=platform.python_version(), jax=jax.__version__,
              optax=optax.__version__, optax_bema=optax_bema.__version__)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--sizes', default='1M,16M,64M',
                      help=f'comma-separated, of {", ".join(SIZES)}')
  parser.add_argument('--dtype', default='float32',
                      help='float32, bfloat16, or both comma-separated; '
                      'averages stay float32')
  parser.add_argument('--rounds', type=int, default=9)
  parser.add_argument('--round-s', type=float, default=0.3,
                      help='seconds each contender runs per round')
  parser.add_argument('--steps-per-call', type=int, default=1,
                      help='steps in one jitted call (a fori_loop); 1 '
                      'includes the host cost of a call, as training has')
  parser.add_argument('--configs', default='',
                      help='only these, e.g. ema,bema1,pace')
  parser.add_argument('--quick', action='store_true',
                      help='CI scale: 1M params, 3 short rounds')
  parser.add_argument('--peer', action='store_true',
                      help="also time TRL's BEMACallback against torch AdamW "
                      '(needs the `peers` extra: torch, trl)')
  parser.add_argument('--dump-hlo', default='',
                      help='write each optimized HLO module to this folder')
  parser.add_argument('--out', default='benchmarks/results')
  parser.add_argument('--name', default='overhead',
                      help='the JSON file is OUT/NAME.json')
  args = parser.parse_args(argv)
  if args.quick:
    args.sizes, args.rounds, args.round_s = '1M', 3, 0.05
  args.configs = [c for c in args.configs.split(',') if c]
  os.makedirs(args.out, exist_ok=True)
  if args.dump_hlo:
    os.makedirs(args.dump_hlo, exist_ok=True)
  lines = []

  def log(line):
    print(line, flush=True)
    lines.append(line)

  info = machine()
  info['copy_gb_s'] = copy_bandwidth(2**30 if info['platform'] == 'gpu'
                                     else 2**28)
  log(f"{info['device']} ({info['platform']}, {info['cpu_count']} CPUs), "
      f"jax {info['jax']}, optax {info['optax']}; an in-place copy moves "
      f"{info['copy_gb_s']:.0f} GB/s")
  log(HEADER)
  rows = []
  path = os.path.join(args.out, f'{args.name}.json')

  def save():  # after every size, so that a run cut short keeps its rows
    with open(path, 'w') as f:
      json.dump(dict(machine=info, args=vars(args), rows=rows, table=lines),
                f, indent=1)

  for dtype in args.dtype.split(','):
    for size in args.sizes.split(','):
      rows += bench_size(size, jnp.dtype(dtype), args, log)
      save()
  if args.peer:
    for size in args.sizes.split(','):
      rows.append(bench_peer(size, args, log))
      save()
  missed = [r for r in rows if r.get('met') is False]
  log(f'{len(missed)} of {sum(r.get("met") is not None for r in rows)} '
      'targets missed'
      + ''.join(f"\n  {r['size']} {r['dtype']} {r['name']}"
                f"@{r['update_freq']}: {r['ratio']:.3f} > {r['target']}"
                for r in missed))
  save()
  print(f'wrote {path}')


if __name__ == '__main__':
  main()

"""Host offload: the accelerator memory it saves, and what it costs per step.

Trains ``optax.chain(optax.adamw(lr), optax_bema.bema(update_freq=F))`` with
and without ``offload_to_host=True`` and reports, for each:

- the accelerator memory in use once the state exists, at its peak over
  the training steps, and at its peak once ``averaged_params`` has read the
  model out (``jax.devices()[0].memory_stats()``);
- the median time of a step between updates, and of an update step (where
  the offloaded state crosses to the device and back).

Each configuration runs in a fresh process, so the peaks do not mix. The
steps are jitted with params and state donated, and with ``in_shardings``
and ``out_shardings`` given: without both, ``jit`` pairs donated buffers with
outputs by shape alone and may alias a host buffer to a device output.

On an accelerator the model has about 1B float32 parameters (4 GiB a copy;
BEMA keeps 3 copies, 12 GiB); on CPU, where there is no memory to save, it is
tiny and the run only checks that everything works. The whole run takes well
under 3 minutes on an H200.

Usage:
  python benchmarks/cost/offload.py --out DIR
  python benchmarks/cost/offload.py --params 250M --update-freq 20 --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import optax

import optax_bema

# The helpers every group shares (_common) are one folder up.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import _common

COLUMNS = 4096
LEAVES = 8
GIB = 2 ** 30


def parse_count(text: str) -> int:
  scale = {'K': 10 ** 3, 'M': 10 ** 6, 'B': 10 ** 9}
  if text[-1].upper() in scale:
    return int(float(text[:-1]) * scale[text[-1].upper()])
  return int(text)


def memory(device) -> dict:
  stats = device.memory_stats() or {}
  return {'bytes_in_use': stats.get('bytes_in_use'),
          'peak_bytes_in_use': stats.get('peak_bytes_in_use')}


def run_one(offload: bool, n_params: int, update_freq: int,
            timed_steps: int) -> dict:
  """One configuration, in this process: memory and step times."""
  device = jax.devices()[0]
  rows = max(1, n_params // (LEAVES * COLUMNS))
  params = jax.jit(lambda: [jnp.full((rows, COLUMNS), 0.01 * (i + 1),
                                     jnp.float32) for i in range(LEAVES)])()
  tx = optax.chain(optax.adamw(1e-4),
                   optax_bema.bema(update_freq=update_freq,
                                   offload_to_host=offload))
  state = tx.init(params)
  jax.block_until_ready(state)
  after_init = memory(device)

  def step(params, state, i):
    grads = [1e-3 * jnp.cos(p + i) for p in params]  # cheap, elementwise
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  shardings = jax.tree.map(lambda x: x.sharding, (params, state))
  step = jax.jit(step, donate_argnums=(0, 1),
                 in_shardings=(*shardings, None), out_shardings=shardings)
  # warm-up: compile, and run one update step (t = update_freq)
  for t in range(1, update_freq + 1):
    params, state = step(params, state, jnp.float32(t))
  jax.block_until_ready((params, state))

  plain, update = [], []
  for t in range(update_freq + 1, update_freq + 1 + timed_steps):
    start = time.perf_counter()
    params, state = step(params, state, jnp.float32(t))
    jax.block_until_ready((params, state))
    (update if t % update_freq == 0 else plain).append(
        time.perf_counter() - start)
  after_steps = memory(device)  # before the readout, which has its own peak
  model = optax_bema.averaged_params(state, params)
  ok = all(bool(jnp.isfinite(m).all()) for m in model)
  del model
  kinds = sorted({leaf.sharding.memory_kind
                  for leaf in jax.tree.leaves(state[1])})
  return {
      'machine': _common.machine(), 'n_params': rows * COLUMNS * LEAVES,
      'offload_to_host': offload,
      'state_memory_kinds': kinds,
      'after_init': after_init,
      'after_steps': after_steps,
      'after_readout': memory(device),
      'step_s_median': statistics.median(plain),
      'update_step_s_median': statistics.median(update) if update else None,
      'steps_timed': len(plain), 'update_steps_timed': len(update),
      'averaged_finite': ok,
  }


def child(args) -> None:
  if args.n_params is None:
    on_cpu = jax.devices()[0].platform == 'cpu'
    args.n_params = 10 ** 6 if on_cpu else 10 ** 9
  print(json.dumps(run_one(args.config == 'host', args.n_params,
                           args.update_freq, args.timed_steps)))


def parent(args) -> None:
  # The parent never touches the accelerator: each child owns it in turn.
  runs = {}
  for config in ('device', 'host'):
    command = [sys.executable, os.path.abspath(__file__), '--config', config,
               '--update-freq', str(args.update_freq),
               '--timed-steps', str(args.timed_steps)]
    if args.n_params is not None:
      command += ['--params', str(args.n_params)]
    done = subprocess.run(command, capture_output=True, text=True,
                          timeout=args.timeout, check=False)
    if done.returncode != 0:
      sys.exit(f'{config} run failed:\n{done.stderr[-4000:]}')
    runs[config] = json.loads(done.stdout.strip().splitlines()[-1])

  device, host = runs['device'], runs['host']

  def saved(when, key):
    a, b = device[when][key], host[when][key]
    return None if a is None or b is None else a - b

  copy_bytes = 4 * device['n_params']
  summary = {
      'machine': device['machine'], 'n_params': device['n_params'],
      'update_freq': args.update_freq,
      'parameter_copy_bytes': copy_bytes,
      'saved_bytes_resident': saved('after_init', 'bytes_in_use'),
      'saved_bytes_peak': saved('after_steps', 'peak_bytes_in_use'),
      'saved_bytes_peak_with_readout': saved('after_readout',
                                             'peak_bytes_in_use'),
      'step_time_ratio': host['step_s_median'] / device['step_s_median'],
      'update_step_time_ratio': (
          host['update_step_s_median'] / device['update_step_s_median']
          if device['update_step_s_median'] else None),
      'runs': runs,
  }
  # the mean step over one update period, offloaded vs not
  freq = args.update_freq
  amortized = lambda r: ((freq - 1) * r['step_s_median']
                         + (r['update_step_s_median'] or 0)) / freq
  summary['amortized_step_time_ratio'] = amortized(host) / amortized(device)
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, 'offload.json')
  with open(path, 'w') as f:
    json.dump(summary, f, indent=2)

  def gib(x):
    return 'n/a' if x is None else f'{x / GIB:.2f} GiB'
  print(f"{summary['machine']['device']}: "
        f"{summary['n_params'] / 1e9:.3f}B float32 params, "
        f'bema(update_freq={args.update_freq})')
  for name, r in runs.items():
    print(f"  state on {name:6s}: resident "
          f"{gib(r['after_init']['bytes_in_use'])}, peak "
          f"{gib(r['after_steps']['peak_bytes_in_use'])}, step "
          f"{r['step_s_median'] * 1e3:.2f} ms, update step "
          f"{(r['update_step_s_median'] or 0) * 1e3:.2f} ms")
  print(f"  saved: {gib(summary['saved_bytes_resident'])} resident, "
        f"{gib(summary['saved_bytes_peak'])} at the training peak, "
        f"{gib(summary['saved_bytes_peak_with_readout'])} at the peak with "
        f"the readout (one parameter copy is {gib(copy_bytes)})")
  print(f"  cost: step x{summary['step_time_ratio']:.3f}, update step "
        f"x{summary['update_step_time_ratio'] or float('nan'):.3f}, mean "
        f"over {freq} steps x{summary['amortized_step_time_ratio']:.3f}")
  print(f'wrote {path}')


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', default='benchmarks/results/cost/offload')
  parser.add_argument('--params', dest='n_params', type=parse_count,
                      default=None,
                      help='parameter count, e.g. 1B, 250M (default: 1B on '
                      'an accelerator, 1M on CPU)')
  parser.add_argument('--update-freq', type=int, default=10)
  parser.add_argument('--timed-steps', type=int, default=20)
  parser.add_argument('--timeout', type=float, default=240,
                      help='seconds for each configuration')
  parser.add_argument('--config', choices=('device', 'host'),
                      help=argparse.SUPPRESS)  # one run, in a child process
  args = parser.parse_args()
  if args.config:
    child(args)
  else:
    parent(args)


if __name__ == '__main__':
  main()

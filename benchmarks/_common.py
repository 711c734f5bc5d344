"""What the benchmarks share: named stabilizers, the machine, output.

The benchmarks compare EMA, BEMA, OUEMA and DEMA on the SAME optimizer
trajectory: one run with ``optax_bema.averages(**make_stabilizers(...))``
last in its chain, each model read with ``averaged_params(..., name=...)``.
"""

from __future__ import annotations

import argparse
from importlib import metadata
import json
import os
import platform
from typing import Mapping

import jax
import matplotlib

matplotlib.use('Agg')  # benchmarks write PNGs; they never open a window
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import optax

from optax_bema import catalog


def make_stabilizers(names, *, suffix: str = '',
                     **hyperparams) -> dict[str, optax.GradientTransformation]:
  """``{name + suffix: transform}`` for the named stabilizers."""
  return {name + suffix: catalog.stabilizer(name, **hyperparams)
          for name in names}


def add_common_args(parser: argparse.ArgumentParser, default_out: str):
  parser.add_argument('--quick', action='store_true',
                      help='the small configuration (minutes on 2 CPU cores)')
  parser.add_argument('--out', default=default_out,
                      help='directory for results.json and the plot')


def machine() -> dict:
  """Where the numbers came from: device, host CPU and versions."""
  cpu = platform.processor() or platform.machine()
  if os.path.exists('/proc/cpuinfo'):
    with open('/proc/cpuinfo') as f:
      names = [line.split(':', 1)[1].strip() for line in f
               if line.startswith('model name')]
    cpu = names[0] if names else cpu
  device = jax.devices()[0]
  return dict(platform=device.platform, device=device.device_kind,
              devices=jax.device_count(), cpu_count=os.cpu_count(),
              processor=cpu, python=platform.python_version(),
              jax=jax.__version__, optax=optax.__version__,
              optax_bema=metadata.version('optax-bema'))


def machine_line(info: Mapping[str, object] | None = None) -> str:
  """``info``, by default ``machine()``, in one line for logs and results."""
  info = info or machine()
  return (f"{info['processor']}, {info['cpu_count']} CPU cores, jax "
          f"{info['jax']} on {info['platform']} ({info['devices']} "
          'device(s))')


def write_results(out_dir: str, results: dict,
                  name: str = 'results.json') -> str:
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, name)
  with open(path, 'w') as f:
    json.dump(results, f, indent=1)
  return path


def plot_curves(ax, curves: Mapping[str, list], *, title: str, ylabel: str,
                logy: bool = False):
  """One line per method: ``curves[name] = [[step, value], ...]``."""
  for name, curve in curves.items():
    steps, values = zip(*curve)
    ax.plot(steps, values, label=name, lw=1.2)
  ax.set_title(title)
  ax.set_xlabel('step')
  ax.set_ylabel(ylabel)
  if logy:
    ax.set_yscale('log')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)


def save_figure(fig, out_dir: str, name: str) -> str:
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, name)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path

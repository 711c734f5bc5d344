"""Draws the documentation's own figures into docs/images/.

    python docs/figures.py

Only the profiles figure is drawn here; the benchmark figures are the PNGs
the benchmarks write under benchmarks/results/. It needs matplotlib (the
``bench`` or ``test`` extra).
"""

import pathlib

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt
import numpy as np

import optax_bema

IMAGES = pathlib.Path(__file__).resolve().parent / 'images'
STEPS = 1000   # T: the model after this many steps
WINDOW = 200   # the recent iterates shown on the left
STABILIZERS = {
    'EMA': optax_bema.ema(update_freq=1),
    'BEMA': optax_bema.bema(update_freq=1),
    'DEMA': optax_bema.dema(update_freq=1),
    'OUEMA': optax_bema.ouema(update_freq=1),
}
COLORS = {'EMA': 'C0', 'BEMA': 'C1', 'DEMA': 'C2', 'OUEMA': 'C3'}


def profiles_figure(path: pathlib.Path) -> None:
  """Each stabilizer's weights on theta_0..theta_T (Table 2's defaults)."""
  weights = {name: optax_bema.profile(tx, STEPS)
             for name, tx in STABILIZERS.items()}
  steps = np.arange(STEPS + 1)
  fig, (recent, ends) = plt.subplots(
      1, 2, figsize=(11, 4), gridspec_kw={'width_ratios': [2, 1]})
  for name, w in weights.items():
    # Leave out the last iterate: BEMA's weight there is the bias correction.
    recent.plot(steps[-WINDOW:-1], w[-WINDOW:-1], color=COLORS[name],
                label=name)
    recent.plot(steps[-1], min(w[-1], 0.068), 'o', color=COLORS[name])
    if w[-1] > 0.07:  # BEMA's bias correction: off the scale, labelled
      recent.annotate(f'{name}: {w[-1]:.2f} on $\\theta_T$ \u2191',
                      (steps[-1], 0.066), ha='right', va='top',
                      color=COLORS[name])
  recent.axhline(0.0, color='0.6', lw=0.8)
  recent.set(xlabel='step s', ylabel='weight $w_s$ of $\\theta_s$',
             ylim=(-0.004, 0.07),
             title=f'Weights on the last {WINDOW} iterates (dots: '
             f'$\\theta_T$, T = {STEPS})')
  recent.legend()

  names = list(weights)
  x = np.arange(len(names))
  ends.bar(x - 0.2, [weights[n][0] for n in names], 0.4,
           label='on $\\theta_0$', color='0.5')
  ends.bar(x + 0.2, [weights[n][-1] for n in names], 0.4,
           label='on $\\theta_T$', color=[COLORS[n] for n in names])
  for i, n in enumerate(names):
    lag = STEPS - float(np.dot(weights[n], steps))
    ends.annotate(f'lag {lag:+.0f}', (i, 0.32), ha='center', fontsize=9)
  ends.axhline(0.0, color='0.6', lw=0.8)
  ends.set(xticks=x, xticklabels=names, ylim=(-0.4, 0.37),
           title='First and last weights; lag $T - \\sum_s s\\,w_s$')
  ends.legend(loc='lower right', fontsize=8)
  fig.suptitle('The model after T steps is $\\sum_s w_s \\theta_s$ '
               '(update_freq=1, the BEMA paper\'s Table 2 defaults)',
               fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


if __name__ == '__main__':
  IMAGES.mkdir(exist_ok=True)
  profiles_figure(IMAGES / 'profiles.png')
  print(f'wrote {IMAGES / "profiles.png"}')

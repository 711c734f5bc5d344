"""Every public transform of optax_bema by name: the tests' catalog.

The benchmarks build their transforms from ``tests/_catalog.py``, so a
benchmark, the contract tests and the performance pins all mean the same
thing by ``'bema'`` or ``'pace'`` (the tests never import from here).
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / 'tests'))
from _catalog import COMBINED  # noqa: E402
from _catalog import NAMES  # noqa: E402
from _catalog import OPTIMIZERS  # noqa: E402
from _catalog import PACE_DEFAULTS  # noqa: E402
from _catalog import STABILIZERS  # noqa: E402
from _catalog import optimizer  # noqa: E402
from _catalog import stabilizer  # noqa: E402
from _catalog import training  # noqa: E402

__all__ = ['COMBINED', 'NAMES', 'OPTIMIZERS', 'PACE_DEFAULTS', 'STABILIZERS',
           'optimizer', 'stabilizer', 'training']

"""``python -m optax_bema``: the ``optax-bema`` command."""

import sys

from optax_bema._cli import main

if __name__ == '__main__':
  sys.exit(main())

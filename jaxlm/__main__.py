"""`python -m jaxlm`: the same as the `jaxlm` console script."""

import sys

from jaxlm.cli import main

sys.exit(main())

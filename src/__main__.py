"""`python -m prefopt` / `accelerate launch -m prefopt STAGE CONFIG`."""

import sys

from prefopt.cli import main

sys.exit(main())

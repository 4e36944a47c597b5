"""`python -m worker.cli ARGS` is `ftw ARGS`."""

import sys

from worker.cli import main

sys.exit(main())

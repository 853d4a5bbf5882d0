"""`python -m knnlm ...` is the `knnlm` command."""

import sys

from knnlm.cli.main import main

sys.exit(main())

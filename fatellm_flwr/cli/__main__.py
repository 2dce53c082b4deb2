"""``python -m fatellm_flwr.cli`` = the ``fatellm`` command."""

import sys

from .main import main

sys.exit(main())

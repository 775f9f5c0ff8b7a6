"""``python -m bptvlm.cli``: the same as the ``bptvlm`` command."""

import sys

from . import main

sys.exit(main())

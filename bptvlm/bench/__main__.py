"""``python -m bptvlm.bench ...`` = ``bptvlm bench ...``."""

import sys

from bptvlm.cli import main

sys.exit(main(["bench", *sys.argv[1:]]))

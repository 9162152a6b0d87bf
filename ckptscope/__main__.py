"""``python -m ckptscope`` runs the CLI."""

import sys

from ckptscope.cli import main

sys.exit(main())

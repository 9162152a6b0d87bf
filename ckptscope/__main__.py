"""``python -m ckptscope`` runs the CLI."""

import sys

from ckptscope.cli import main

if __name__ == "__main__":
    sys.exit(main())

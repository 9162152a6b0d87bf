"""``python -m ckptscope`` runs the CLI."""

import sys

from ckptscope.cli import run

if __name__ == "__main__":
    sys.exit(run())

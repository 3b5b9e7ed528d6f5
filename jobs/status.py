"""spark-submit entry point: `spark-submit jobs/status.py [--conf FILE] [--set k=v]`."""

import sys

from microseg.cli import main

if __name__ == "__main__":
    sys.exit(main(["status", *sys.argv[1:]]))

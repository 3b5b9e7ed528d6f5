"""spark-submit entry point: `spark-submit jobs/stream.py [--available-now] [--conf FILE]`."""

import sys

from microseg.cli import main

if __name__ == "__main__":
    sys.exit(main(["stream", *sys.argv[1:]]))

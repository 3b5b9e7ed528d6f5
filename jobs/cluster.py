"""spark-submit entry point: `spark-submit jobs/cluster.py train|assign --as-of T [--conf FILE]`."""

import sys

from microseg.cli import main

if __name__ == "__main__":
    sys.exit(main(["cluster", *sys.argv[1:]]))

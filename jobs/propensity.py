"""spark-submit entry point: `spark-submit jobs/propensity.py train|score --target X --as-of T`."""

import sys

from microseg.cli import main

if __name__ == "__main__":
    sys.exit(main(["propensity", *sys.argv[1:]]))

"""spark-submit entry point: `spark-submit jobs/pipeline.py --as-of T [--conf FILE]`."""

import sys

from microseg.cli import main

if __name__ == "__main__":
    sys.exit(main(["pipeline", *sys.argv[1:]]))

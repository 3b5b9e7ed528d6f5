"""spark-submit entry point: `spark-submit jobs/batch.py STEPS [--conf FILE]`: the commands
in file STEPS (one per line), in one driver and one Spark application."""

import sys

from microseg.cli import main

if __name__ == "__main__":
    sys.exit(main(["batch", *sys.argv[1:]]))

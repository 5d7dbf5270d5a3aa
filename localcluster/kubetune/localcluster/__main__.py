"""``python -m kubetune.localcluster up|down|status`` (what ``kubetune local`` runs)."""

import argparse

from kubetune.localcluster.cli import add_arguments, main

parser = argparse.ArgumentParser(prog="python -m kubetune.localcluster")
add_arguments(parser)
raise SystemExit(main(parser.parse_args()))

import argparse
import sys

from kubetune.operator.main import add_arguments, main

parser = argparse.ArgumentParser(prog="python -m kubetune.operator", description="Run the kubetune operator.")
add_arguments(parser)
sys.exit(main(parser.parse_args()))

"""python -m mkfast.audit: the same command as ``mkfast audit``."""

import argparse

from mkfast.audit import add_arguments, run_from_arguments

parser = argparse.ArgumentParser(
    prog="python -m mkfast.audit", description="every kernel compiled for sm_90a, read from its machine code"
)
add_arguments(parser)
run_from_arguments(parser.parse_args())

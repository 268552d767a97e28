import sys

from payd_sandbox.cli import main

sys.exit(main(prog="python -m payd_sandbox"))

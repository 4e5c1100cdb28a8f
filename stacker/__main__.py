"""`python -m stacker` runs the command-line interface."""

from stacker.cli import main

main()

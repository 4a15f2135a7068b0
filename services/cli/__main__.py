"""`python -m services.cli ...` is the `edgeswarm` command."""

from services.cli import main

main()

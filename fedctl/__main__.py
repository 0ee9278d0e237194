"""``python -m fedctl``: the same as the ``fedctl`` console script."""

from fedctl.cli.main import main

main()

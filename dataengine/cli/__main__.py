"""``python -m dataengine.cli``: the same as the ``dataengine`` console script."""

from dataengine.cli import main

main()

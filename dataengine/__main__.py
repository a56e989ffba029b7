"""``python -m dataengine``: the same as the ``dataengine`` console script."""

from dataengine.app import main

main()

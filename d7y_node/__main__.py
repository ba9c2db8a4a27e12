"""`python -m d7y_node` runs the same command line as the `d7y-node` script."""

from d7y_node.cli import main

main()

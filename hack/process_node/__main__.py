import sys

from process_node.cli import main

sys.exit(main())

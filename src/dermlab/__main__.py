import sys

from dermlab.cli import main

sys.exit(main())

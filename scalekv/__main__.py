import sys

from scalekv.cli import main

sys.exit(main())

import sys

from vlpipe.cli import main

sys.exit(main())

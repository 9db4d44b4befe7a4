import sys

from padd.cli import main

sys.exit(main())

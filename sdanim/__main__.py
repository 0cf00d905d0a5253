import sys

from sdanim.cli import main

sys.exit(main())

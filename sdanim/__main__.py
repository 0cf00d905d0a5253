import sys

from sdanim.frontends.cli import main

sys.exit(main())

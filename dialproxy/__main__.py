import sys

from dialproxy.cli import main

sys.exit(main())

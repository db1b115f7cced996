import sys

from cache_server.cli import main

sys.exit(main())

import sys

from services.api.cli import main

sys.exit(main())

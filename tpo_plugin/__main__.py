import sys

from tpo_plugin.cli import main


sys.exit(main())

import sys

from tpo_plugin.commands.cli import main


sys.exit(main())

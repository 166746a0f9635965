import sys

from chat_cli.main import main

sys.exit(main())

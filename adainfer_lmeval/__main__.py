import sys

from adainfer_lmeval.cli.main import main

sys.exit(main())

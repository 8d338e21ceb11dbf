import sys

from llmkd.cli import main

sys.exit(main())

"""`python -m ui`: the same as the `rag-ui` console script."""

import sys

from ui.app import main

sys.exit(main())

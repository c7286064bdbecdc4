"""``python -m orthodiff_nnunet.cli``: the ``orthodiff`` command."""

import sys

from orthodiff_nnunet.cli import main

sys.exit(main())

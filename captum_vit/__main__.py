"""``python -m captum_vit``: the command line (also ``torchrun --nproc-per-node N -m captum_vit evaluate ...``)."""

import sys

from captum_vit.cli import main

sys.exit(main())

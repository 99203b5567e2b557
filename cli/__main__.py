"""``python -m comfyui_bfr.cli ...`` (the ``bfr`` command; usable under ``accelerate launch -m`` and torchrun)."""

import sys

from .main import main

sys.exit(main())

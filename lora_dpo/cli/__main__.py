"""``python -m lora_dpo.cli``: the same as the ``lora-dpo`` command (torchrun launches it this way)."""

import sys

from lora_dpo.cli.main import main

sys.exit(main())

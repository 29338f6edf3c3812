"""The ``lora-dpo`` command line."""

from lora_dpo.cli.main import main

__all__ = ["main"]

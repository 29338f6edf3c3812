"""The committed digits worlds by name: where each one's folder and recipes are, and how to rebuild it.

``digits`` (SD1.5 layout, :mod:`lora_dpo.world.build`) and ``digits-sd3`` (SD3 layout, :mod:`lora_dpo.world.flow`)
share the data, the scorer and the evaluation; ``lora-dpo demo --world NAME`` runs one of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lora_dpo.world.build import REPO_DIR, WORLD_DIR
from lora_dpo.world.flow import FLOW_WORLD_DIR

RECIPES_DIR = REPO_DIR / "recipes"


@dataclass(frozen=True)
class World:
    """A world folder (``pipeline/``, ``scorer/``, ``prefs/{train,heldout}.parquet``, ``world.json``) and its recipe
    folder (``lora_dpo.yaml``, ``sft.yaml``, ``iterate.yaml``)."""

    name: str
    folder: Path
    recipes: Path
    build_command: str

    @property
    def pipeline(self) -> Path:
        return self.folder / "pipeline"

    @property
    def scorer(self) -> Path:
        return self.folder / "scorer"

    def prefs(self, split: str) -> Path:
        """``prefs/<split>.parquet``: ``train`` or ``heldout``."""
        return self.folder / "prefs" / f"{split}.parquet"

    def recipe(self, name: str) -> Path:
        """``recipes/<world>/<name>.yaml``: ``lora_dpo``, ``sft`` or ``iterate``."""
        return self.recipes / f"{name}.yaml"

    def check(self) -> None:
        """Raises FileNotFoundError, naming the command that rebuilds it, when the world's pipeline is missing."""
        if not (self.pipeline / "model_index.json").is_file():
            raise FileNotFoundError(f"the {self.name} world is missing in {self.folder}; rebuild it with "
                                    f"`{self.build_command}`")


WORLDS = {
    "digits": World("digits", WORLD_DIR, RECIPES_DIR / "digits", "lora-dpo world build"),
    "digits-sd3": World("digits-sd3", FLOW_WORLD_DIR, RECIPES_DIR / "digits-sd3", "lora-dpo world build --family sd3"),
}
DEFAULT_WORLD = "digits"


def get_world(name: str) -> World:
    """The world called ``name``. Raises ValueError listing the known names."""
    if name not in WORLDS:
        raise ValueError(f"unknown world {name!r}: choose one of {', '.join(WORLDS)}")
    return WORLDS[name]

"""What a new user meets first (issue 16, rows 4, 13, 14): the known harmless library warnings are dropped at their
source and nothing else is; every output file has the mode of a plain file under the umask; model cards prompt with
the run's own captions and name a local base by its absolute path; grid labels keep their spaces."""

from __future__ import annotations

import json
import logging
import os
import re
from contextlib import contextmanager
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from huggingface_hub import ModelCard
from PIL import Image

from lora_dpo.cli.main import _setup_logging, main
from lora_dpo.config import load_config
from lora_dpo.data.pairs import PairDataset
from lora_dpo.data.sources import load_preference_dataset
from lora_dpo.export.artifacts import save_full_pipeline, training_caption, write_model_card
from lora_dpo.export.formats import export_adapter
from lora_dpo.export.merge import merge_adapter
from lora_dpo.inference.grids import LABEL_HEIGHT, layout_label, make_grid
from lora_dpo.library_noise import KNOWN_WARNINGS, KnownMessageFilter, quiet_known_warnings
from lora_dpo.models.lora_files import load_adapter, output_mode

ROOT = Path(__file__).resolve().parent.parent
STOCK_PROMPT = "a photo of a cat"
ROW = {row.logger: row for row in KNOWN_WARNINGS if row.logger}


# --- row 4: known library warnings -------------------------------------------------------------------------------

def _remove_known_filters() -> None:
    for name in ROW:
        logger = logging.getLogger(name)
        for f in [f for f in logger.filters if isinstance(f, KnownMessageFilter)]:
            logger.removeFilter(f)


@pytest.fixture
def no_known_filters():
    """Each test starts and ends without the table's filters (another test may have run the CLI set-up)."""
    _remove_known_filters()
    yield
    _remove_known_filters()


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@contextmanager
def _seen(name: str):
    """The messages that reach the handlers of logger ``name`` (after its own filters), as the library logs them."""
    handler, logger = _Collect(), logging.getLogger(name)
    logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)


@pytest.mark.parametrize("name", sorted(ROW))
def test_known_warning_is_dropped_and_other_warnings_of_its_logger_show(name, no_known_filters):
    quiet_known_warnings()
    quiet_known_warnings()  # idempotent: still one filter
    logger = logging.getLogger(name)
    assert sum(isinstance(f, KnownMessageFilter) for f in logger.filters) == 1
    assert logger.level == logging.NOTSET or logger.level <= logging.WARNING  # no level lowered to hide them
    with _seen(name) as seen:
        logger.warning(ROW[name].example)
        logger.warning("an unrelated warning: %s", "check the data")
    assert seen == ["an unrelated warning: check the data"]


@pytest.mark.parametrize("name, message", [
    ("diffusers.models.modeling_utils", "There are modules in UNet2DConditionModel that should be kept in float32: "
                                        "['conv_in']. Casting directly with `to()` can lead to inconsistent results"),
    ("diffusers.loaders.lora_base", "No LoRA keys associated to UNet2DConditionModel found with the prefix='unet'. "
                                    "This is safe to ignore if LoRA state dict didn't originally have any"),
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community: version 0.9 is "
                                      "too old. Please make sure you already `pip install kernels`"),
    ("transformers.utils.import_utils", "`CLIPImageProcessor` requires torchvision >= 0.27; install it"),
])
def test_near_misses_of_known_warnings_still_show(name, message, no_known_filters):
    quiet_known_warnings()
    with _seen(name) as seen:
        logging.getLogger(name).warning(message)
    assert seen == [message]


def test_bitsandbytes_warning_is_dropped_as_bitsandbytes_formats_it(no_known_filters):
    quiet_known_warnings()
    with _seen("bitsandbytes.backends.cpu.ops") as seen:  # bitsandbytes logs it with %-style arguments
        logging.getLogger("bitsandbytes.backends.cpu.ops").warning(
            "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already `pip "
            "install kernels` and the kernels >= 0.11.1", ModuleNotFoundError("No module named 'kernels'"))
    assert seen == []


def test_real_float32_cast_warning_is_dropped(no_known_filters):
    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                                cross_attention_dim=8, attention_head_dim=2,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    name = "diffusers.models.modeling_utils"
    with _seen(name) as seen:
        unet.to(torch.float16)
    assert any(re.search(ROW[name].pattern, m) for m in seen), seen  # the table matches what diffusers says
    quiet_known_warnings()
    with _seen(name) as seen:
        unet.to(torch.float32)
    assert seen == []


@pytest.mark.filterwarnings("ignore:.*multiple adapters")  # a second adapter on purpose
def test_real_text_encoder_no_keys_warning_is_dropped(tiny_sd15, lora_sd15, no_known_filters):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15)
    name = "diffusers.loaders.lora_base"
    with _seen(name) as seen:
        load_adapter(pipe, lora_sd15, "first")
    assert any(re.search(ROW[name].pattern, m) for m in seen), seen
    quiet_known_warnings()
    with _seen(name) as seen:
        load_adapter(pipe, lora_sd15, "second")
    assert seen == []


def test_cli_setup_installs_the_filters(no_known_filters):
    _setup_logging()
    for name in ROW:
        assert any(isinstance(f, KnownMessageFilter) for f in logging.getLogger(name).filters), name


# --- rows 13 and 14: a run, its exports and a merge, written under a set umask ---------------------------------

@pytest.fixture(scope="module")
def non_cat_pairs(photo_pairs, tmp_path_factory) -> Path:
    """The photo pairs without the cat photo's rows: a run whose card must not talk about cats."""
    table = pq.read_table(photo_pairs)
    out = tmp_path_factory.mktemp("data") / "no_cat.parquet"
    pq.write_table(table.filter(pc.not_equal(table["caption"], STOCK_PROMPT)), out)
    return out


@pytest.fixture(scope="module", params=[0o002, 0o022], ids=["umask002", "umask022"])
def outputs(request, tiny_sd15, non_cat_pairs, tmp_path_factory) -> dict:
    """Under the umask ``param``, from a working folder where the model is named by a relative path: a plain file,
    a one-step training run, its kohya / PEFT / diffusers exports and merges (full and UNet only)."""
    work = tmp_path_factory.mktemp("work")
    old_mask, old_cwd = os.umask(request.param), os.getcwd()
    try:
        os.chdir(work)
        model = os.path.relpath(tiny_sd15, work)
        (work / "plain.txt").write_text("x")
        assert main(["train", str(ROOT / "recipes" / "sd15" / "lora_dpo.yaml"),
                              f"model.pretrained_model_name_or_path={model}", f"data.dataset={non_cat_pairs}",
                              "data.resolution=32", "output.dir=run", "train.batch_size=2", "train.max_steps=1",
                              "train.gradient_accumulation_steps=1", "optim.name=adamw",
                              "output.tensorboard=false", "train.mixed_precision=no",
                              "train.gradient_checkpointing=false"]) == 0
        for fmt in ("kohya", "peft", "diffusers"):
            export_adapter("run", f"{fmt}_export", fmt, "sd15")
        merge_adapter(model, "run", "merged")
        merge_adapter(model, "run", "merged_unet", unet_only=True)
    finally:
        os.chdir(old_cwd)
        os.umask(old_mask)
    return {"work": work, "model": tiny_sd15, "mask": request.param}


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def test_every_output_has_the_mode_of_a_plain_file(outputs):
    work = outputs["work"]
    plain = _mode(work / "plain.txt")
    assert plain == 0o666 & ~outputs["mask"]
    checked = [p for folder in ("run", "kohya_export", "peft_export", "diffusers_export", "merged", "merged_unet")
               for p in _files(work / folder)
               if p.name != ".lock"  # the run's lock (run_folder.py opens it 0644 itself): not an output
               and "checkpoints" not in p.relative_to(work).parts]  # training/checkpoint.py: see the next test
    assert any(p.suffix == ".safetensors" for p in checked)
    assert {"pytorch_lora_weights.safetensors", "adapter_model.safetensors", "kohya_export.safetensors",
            "diffusion_pytorch_model.safetensors", "README.md"} <= {p.name for p in checked}
    wrong = {str(p.relative_to(work)): oct(_mode(p)) for p in checked if _mode(p) != plain}
    assert not wrong, f"expected {oct(plain)}: {wrong}"


def test_checkpoint_files_have_the_mode_of_a_plain_file(outputs):
    work = outputs["work"]
    files = _files(work / "run" / "checkpoints")
    assert files and all(_mode(p) == _mode(work / "plain.txt") for p in files)


def test_full_pipeline_export_has_the_mode_of_a_plain_file(tiny_sd15, non_cat_pairs, tmp_path):
    cfg = load_config(ROOT / "recipes" / "sd15" / "full_dpo.yaml",
                      [f"model.pretrained_model_name_or_path={tiny_sd15}", f"data.dataset={non_cat_pairs}"])
    unet = UNet2DConditionModel.from_pretrained(tiny_sd15, subfolder="unet")
    old = os.umask(0o002)
    try:
        (tmp_path / "plain.txt").write_text("x")
        save_full_pipeline(tmp_path / "full", unet, cfg.model, "sd15")
    finally:
        os.umask(old)
    files = _files(tmp_path / "full")
    assert any(p.suffix == ".safetensors" for p in files)
    assert {str(p.relative_to(tmp_path)): oct(_mode(p)) for p in files if _mode(p) != 0o664} == {}


def test_output_mode_follows_the_umask():
    old = os.umask(0o027)
    try:
        assert output_mode() == 0o640
    finally:
        os.umask(old)


def test_run_card_and_merged_card_name_the_local_base_by_its_absolute_path(outputs):
    work = outputs["work"]
    run_base = ModelCard.load(work / "run" / "README.md").data.base_model
    merged_base = ModelCard.load(work / "merged" / "README.md").data.base_model
    assert run_base == merged_base == os.path.abspath(outputs["model"])
    assert Path(run_base).is_absolute() and f"`{run_base}` with the LoRA" in (work / "merged" / "README.md").read_text()


def test_run_card_never_suggests_a_stock_prompt(outputs):
    assert STOCK_PROMPT not in (outputs["work"] / "run" / "README.md").read_text()


def test_run_card_prompts_with_a_training_caption(outputs, non_cat_pairs):
    captions = set(pq.read_table(non_cat_pairs, columns=["caption"])["caption"].to_pylist())
    text = (outputs["work"] / "run" / "README.md").read_text()
    assert any(f"pipe({json.dumps(c)})" in text for c in captions)


def test_card_prompts_with_the_first_training_caption(tiny_sd15, non_cat_pairs, tmp_path):
    cfg = load_config(ROOT / "recipes" / "sd15" / "lora_dpo.yaml",
                      [f"model.pretrained_model_name_or_path={tiny_sd15}", f"data.dataset={non_cat_pairs}",
                       f"output.dir={tmp_path / 'run'}"])
    dataset, report = load_preference_dataset(cfg.data)
    caption = training_caption(PairDataset(dataset, cfg.data, 0), cfg.data.caption_column)
    assert caption == dataset[0]["caption"] and caption != STOCK_PROMPT
    text = write_model_card(tmp_path, cfg, "sd15", {}, report, prompt=caption).read_text()
    assert f"image = pipe({json.dumps(caption)})" in text and STOCK_PROMPT not in text
    text = write_model_card(tmp_path, cfg, "sd15", {}, {**report, "example_caption": caption}).read_text()
    assert f"image = pipe({json.dumps(caption)})" in text
    text = write_model_card(tmp_path, cfg, "sd15", {}, report).read_text()  # no caption known: a placeholder
    assert "image = pipe(prompt)" in text and STOCK_PROMPT not in text
    assert training_caption(None) is None  # a streamed run


# --- row 14: grid labels ----------------------------------------------------------------------------------------

def test_label_layout_keeps_every_space():
    placed = layout_label("a handwritten digit seven  (seeds 0, 1)", 1000, len, 1)
    assert [w for _, w in placed] == ["a", "handwritten", "digit", "seven", "(seeds", "0,", "1)"]
    assert [x for x, _ in placed] == [0, 2, 14, 20, 27, 34, 37]  # two spaces before "(seeds": two gaps
    for (x0, w0), (x1, _) in zip(placed, placed[1:]):
        assert x1 >= x0 + len(w0) + 1  # never glued to the word before


def test_label_layout_cuts_a_long_label_after_a_whole_word():
    assert layout_label("a handwritten digit seven", 22, len, 1) == [
        (0, "a"), (2, "handwritten"), (14, "digit"), (19, "...")]
    assert layout_label("supercalifragilistic", 8, len, 1) == [(0, "super...")]
    assert layout_label("", 8, len, 1) == []


def test_grid_label_shows_a_visible_gap_between_words():
    tile = Image.new("RGB", (32, 32), "white")
    grid = make_grid(["digit seven"], [[tile]], [[tile]])
    strip = grid.crop((0, 0, grid.width, LABEL_HEIGHT)).convert("L")
    ink = [any(strip.getpixel((x, y)) < 160 for y in range(LABEL_HEIGHT)) for x in range(strip.width)]
    runs, start = [], None  # the blank runs between inked columns
    first, last = ink.index(True), len(ink) - 1 - ink[::-1].index(True)
    for x in range(first, last + 1):
        if not ink[x] and start is None:
            start = x
        elif ink[x] and start is not None:
            runs.append(x - start)
            start = None
    assert max(runs) >= 3, runs  # the space between "digit" and "seven"; letters are 1-2 px apart, and so were
    # the two words when the label was drawn as one string (the default font's space is 2 px wide at this size)

"""The side-by-side grid of images: per prompt, a label strip, the base row above the tuned (or adapter) row, one
column per seed. ``lora-dpo generate`` and ``lora-dpo eval`` draw it; the training curves are in
:mod:`lora_dpo.evaluation.figures`."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

# Grid layout, in pixels: a label strip above each prompt's two rows, a column of row names on the left.
LABEL_HEIGHT = 16
SIDE_WIDTH = 44
TILE_TARGET = 96  # small images are enlarged (NEAREST, by an integer factor) to about this size
MAX_TILE = 256  # large images are shrunk to this size


def tile_size(side: int) -> int:
    """Grid tile size for images of ``side`` pixels: small images grow by an integer factor to about
    :data:`TILE_TARGET` (32 -> 96), large ones shrink to :data:`MAX_TILE`, the rest keep their size."""
    if side < TILE_TARGET:
        return side * max(1, TILE_TARGET // side)
    return min(side, MAX_TILE)


def grid_size(n_prompts: int, n_cols: int, tile: int, label_height: int = LABEL_HEIGHT,
              side_width: int = SIDE_WIDTH) -> tuple[int, int]:
    """``(width, height)`` of :func:`make_grid`'s picture: ``side_width + n_cols·tile`` by
    ``n_prompts·(label_height + 2·tile)`` (per prompt: a label strip, the base row, the tuned row)."""
    return side_width + n_cols * tile, n_prompts * (label_height + 2 * tile)


def _fit_text(draw, text: str, font, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def make_grid(prompts: Sequence[str], base_rows: Sequence[Sequence[Image.Image]],
              tuned_rows: Sequence[Sequence[Image.Image]], *, tile: int | None = None) -> Image.Image:
    """Side-by-side picture: for each prompt, its text on a grey strip, then the base row, then the tuned row.

    Column j of both rows should come from the same seed. Tiles are resized to ``tile`` pixels (default
    :func:`tile_size` of the first image): NEAREST when enlarging (pixels stay crisp), LANCZOS when shrinking.
    The row names (``base``, ``tuned``) sit in a left column. Size: exactly :func:`grid_size` ``(len(prompts),
    longest row, tile)``.

    Raises:
        ValueError: the numbers of prompts, base rows and tuned rows differ, or the rows hold no image.
    """
    if not (len(prompts) == len(base_rows) == len(tuned_rows)) or not prompts:
        raise ValueError(f"{len(prompts)} prompts, {len(base_rows)} base rows, {len(tuned_rows)} tuned rows: "
                         "need one base and one tuned row per prompt")
    images = [im for row in (*base_rows, *tuned_rows) for im in row]
    if not images:
        raise ValueError("the rows hold no image")
    n_cols = max(len(row) for row in (*base_rows, *tuned_rows))
    tile = tile or tile_size(max(images[0].size))
    width, height = grid_size(len(prompts), n_cols, tile)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for i, prompt in enumerate(prompts):
        y0 = i * (LABEL_HEIGHT + 2 * tile)
        draw.rectangle((0, y0, width - 1, y0 + LABEL_HEIGHT - 1), fill=(228, 228, 228))
        draw.text((4, y0 + 2), _fit_text(draw, prompt, font, width - 8), fill=(0, 0, 0), font=font)
        for r, (name, row) in enumerate((("base", base_rows[i]), ("tuned", tuned_rows[i]))):
            y = y0 + LABEL_HEIGHT + r * tile
            draw.text((4, y + tile // 2 - 6), name, fill=(0, 0, 0), font=font)
            for j, im in enumerate(row):
                resample = Image.Resampling.NEAREST if tile >= max(im.size) else Image.Resampling.LANCZOS
                canvas.paste(im.convert("RGB").resize((tile, tile), resample), (SIDE_WIDTH + j * tile, y))
    return canvas

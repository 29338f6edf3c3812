"""The side-by-side grid of images: per prompt, a label strip, the base row above the tuned (or adapter) row, one
column per seed; optionally a coloured frame around chosen columns (``lora-dpo eval`` marks the comparisons the
tuning fixed, green, or broke, red). ``lora-dpo generate`` and ``lora-dpo eval`` draw it; the training curves are in
:mod:`lora_dpo.evaluation.figures`."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from PIL import Image, ImageDraw, ImageFont

# Grid layout, in pixels: a label strip above each prompt's two rows, a column of row names on the left.
LABEL_HEIGHT = 16
SIDE_WIDTH = 44
TILE_TARGET = 96  # small images are enlarged (NEAREST, by an integer factor) to about this size
MAX_TILE = 256  # large images are shrunk to this size
ELLIPSIS = "..."  # ends a label cut to the grid's width
# Column marks: a frame of FRAME_WIDTH pixels, drawn inside both tiles (base and tuned) of a marked column.
MARK_COLORS = {"fixed": (0, 170, 0), "broken": (220, 0, 0)}
FRAME_WIDTH = 3


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


def layout_label(text: str, width: float, measure: Callable[[str], float], gap: float) -> list[tuple[float, str]]:
    """Where each word of a one-line label goes: ``[(x, word), ...]``, x in pixels from the label's left edge.

    Every space of ``text`` stays a space ``gap`` pixels wide (two spaces, two gaps): the words are placed one by
    one rather than drawn as one string, because the default font's space glyph is about 2 px wide at the label's
    size and words drawn as one string run together ("a handwritten digitseven"). A label wider than ``width`` is
    cut after the last whole word that fits, followed by ``...``; a first word that alone does not fit is cut
    letter by letter.

    Args:
        text: the label. width: the room, in pixels. measure: a string's drawn width in pixels (e.g.
            ``lambda s: draw.textlength(s, font=font)``). gap: the width of one space, in pixels.
    """
    placed, x = [], 0.0
    for word in text.split(" "):
        if word:
            placed.append((x, word))
            x += measure(word)
        x += gap
    if not placed or placed[-1][0] + measure(placed[-1][1]) <= width:
        return placed
    dots = measure(ELLIPSIS)
    while placed and placed[-1][0] + measure(placed[-1][1]) + dots > width:
        placed.pop()
    if placed:
        x, word = placed[-1]
        return [*placed, (x + measure(word), ELLIPSIS)]
    first = text.strip(" ").split(" ")[0]
    while first and measure(first + ELLIPSIS) > width:
        first = first[:-1]
    return [(0.0, first + ELLIPSIS)]


def word_gap(measure: Callable[[str], float]) -> float:
    """The drawn width of a space in grid labels, in pixels: the font's own space, but at least 0.6 of an ``n``
    (the default font's 2 px space is not seen as a gap)."""
    return max(measure(" "), 0.6 * measure("n"))


def _check_marks(marks: Sequence[Sequence[str | None]], n_prompts: int) -> None:
    """Raise ValueError unless ``marks`` holds one sequence per prompt of :data:`MARK_COLORS` keys or None."""
    if len(marks) != n_prompts:
        raise ValueError(f"{len(marks)} rows of marks for {n_prompts} prompts: need one per prompt")
    unknown = {m for row in marks for m in row if m is not None and m not in MARK_COLORS}
    if unknown:
        raise ValueError(f"unknown marks {sorted(unknown)}: use {sorted(MARK_COLORS)} or None")


def _draw_marks(draw: ImageDraw.ImageDraw, row_marks: Sequence[str | None], y0: int, tile: int) -> None:
    """Frame both tiles (base row at ``y0``, tuned row below) of each marked column: :data:`FRAME_WIDTH` pixels of
    the mark's colour along the tiles' inner edges."""
    for j, mark in enumerate(row_marks):
        if mark is None:
            continue
        x = SIDE_WIDTH + j * tile
        for y in (y0, y0 + tile):
            draw.rectangle((x, y, x + tile - 1, y + tile - 1), outline=MARK_COLORS[mark], width=FRAME_WIDTH)


def make_grid(prompts: Sequence[str], base_rows: Sequence[Sequence[Image.Image]],
              tuned_rows: Sequence[Sequence[Image.Image]], *, tile: int | None = None,
              marks: Sequence[Sequence[str | None]] | None = None, min_cols: int = 0) -> Image.Image:
    """Side-by-side picture: for each prompt, its text on a grey strip, then the base row, then the tuned row.

    Column j of both rows should come from the same seed. Tiles are resized to ``tile`` pixels (default
    :func:`tile_size` of the first image): NEAREST when enlarging (pixels stay crisp), LANCZOS when shrinking.
    The row names (``base``, ``tuned``) sit in a left column. Each prompt is one line, its spaces kept and a prompt
    too long for the grid's width cut after a whole word (:func:`layout_label`). Size: exactly :func:`grid_size`
    ``(len(prompts), max(longest row, min_cols), tile)``.

    ``marks`` (optional; per prompt, per column: ``"fixed"``, ``"broken"`` or None, a row may be shorter than its
    images) frames both tiles of a marked column, base and tuned, :data:`FRAME_WIDTH` pixels wide inside the
    tiles (the grid keeps its size): caption: "green frame: the tuning fixed this comparison (tuned read as the
    prompted digit, base not); red frame: it broke it (the reverse); no frame: unchanged". ``min_cols``: at least
    this many columns wide (room for long labels); missing tiles stay white.

    Raises:
        ValueError: the numbers of prompts, base rows and tuned rows (and rows of ``marks``) differ, the rows hold
            no image, or a mark is not one of :data:`MARK_COLORS`.
    """
    if not (len(prompts) == len(base_rows) == len(tuned_rows)) or not prompts:
        raise ValueError(f"{len(prompts)} prompts, {len(base_rows)} base rows, {len(tuned_rows)} tuned rows: "
                         "need one base and one tuned row per prompt")
    if marks is not None:
        _check_marks(marks, len(prompts))
    images = [im for row in (*base_rows, *tuned_rows) for im in row]
    if not images:
        raise ValueError("the rows hold no image")
    n_cols = max(min_cols, *(len(row) for row in (*base_rows, *tuned_rows)))
    tile = tile or tile_size(max(images[0].size))
    width, height = grid_size(len(prompts), n_cols, tile)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    measure = lambda s: draw.textlength(s, font=font)  # noqa: E731
    for i, prompt in enumerate(prompts):
        y0 = i * (LABEL_HEIGHT + 2 * tile)
        draw.rectangle((0, y0, width - 1, y0 + LABEL_HEIGHT - 1), fill=(228, 228, 228))
        for x, word in layout_label(prompt, width - 8, measure, word_gap(measure)):
            draw.text((4 + x, y0 + 2), word, fill=(0, 0, 0), font=font)
        for r, (name, row) in enumerate((("base", base_rows[i]), ("tuned", tuned_rows[i]))):
            y = y0 + LABEL_HEIGHT + r * tile
            draw.text((4, y + tile // 2 - 6), name, fill=(0, 0, 0), font=font)
            for j, im in enumerate(row):
                resample = Image.Resampling.NEAREST if tile >= max(im.size) else Image.Resampling.LANCZOS
                canvas.paste(im.convert("RGB").resize((tile, tile), resample), (SIDE_WIDTH + j * tile, y))
        if marks is not None:
            _draw_marks(draw, marks[i], y0 + LABEL_HEIGHT, tile)
    return canvas

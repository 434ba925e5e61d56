"""Cutting large images into non-overlapping HR tiles, so one big scan gives many examples."""

from __future__ import annotations

import dataclasses

from medsr.data import MedImage


def tile_image(image: MedImage, tile: int) -> list[tuple[int, int, MedImage]]:
    """Non-overlapping ``tile`` x ``tile`` tiles as ``(y, x, tile_image)``; the ragged edge is dropped.

    A side shorter than ``tile`` is kept whole, so a 233x197 MRI slice stays one image while a
    1955x1841 radiograph gives 7x7 tiles.
    """
    _, h, w = image.pixels.shape
    th, tw = min(tile, h), min(tile, w)
    out = []
    for y in range(0, h - th + 1, th):
        for x in range(0, w - tw + 1, tw):
            pixels = image.pixels[:, y:y + th, x:x + tw].copy()
            out.append((y, x, dataclasses.replace(image, pixels=pixels)))
    return out

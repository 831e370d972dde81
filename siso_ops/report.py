"""A small loss-curve picture of an optimisation run (PIL only, no plotting library)."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"loss": (230, 230, 230), "dino": (90, 170, 255), "ir": (255, 150, 60)}


def loss_curve(history: list, best_iteration: int, width: int = 512, height: int = 256) -> np.ndarray:
    """history: one dict of terms per iteration -> HxWx3 float image in [0, 1]."""
    image = Image.new("RGB", (width, height), (24, 24, 24))
    draw = ImageDraw.Draw(image)
    margin = 28
    names = [n for n in ("loss", "dino", "ir") if history and n in history[0]]
    values = [h[n] for h in history for n in names]
    if values:
        low, high = min(values), max(values)
        span = (high - low) or 1.0
        count = max(len(history) - 1, 1)

        def point(i, v):
            x = margin + (width - 2 * margin) * i / count
            y = height - margin - (height - 2 * margin) * (v - low) / span
            return x, y

        for name in names:
            pts = [point(i, h[name]) for i, h in enumerate(history)]
            if len(pts) > 1:
                draw.line(pts, fill=COLOURS[name], width=2)
            else:
                x, y = pts[0]
                draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=COLOURS[name])
        bx, by = point(best_iteration, history[best_iteration]["loss"])
        draw.ellipse([bx - 4, by - 4, bx + 4, by + 4], outline=(120, 255, 120), width=2)
        draw.text((margin, 6), f"max {high:.4f}", fill=(200, 200, 200))
        draw.text((margin, height - margin + 8), f"min {low:.4f}   iterations {len(history)}", fill=(200, 200, 200))
        for k, name in enumerate(names):
            draw.text((width - margin - 40, 6 + 12 * k), name, fill=COLOURS[name])
    return np.asarray(image, dtype=np.float32) / 255.0

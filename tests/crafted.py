"""Crafted, unmistakable photos of each class: yellow flower heads on green, or green blades only.

The pretrained backbone separates them at a small working resolution, so tests can check the label order
end to end quickly.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def crafted(label: str, seed: int, size: tuple[int, int] = (160, 120)) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = np.zeros((size[1], size[0], 3), np.float32)
    base[..., 1] = rng.uniform(90, 170, (size[1], size[0]))
    base[..., 0] = base[..., 1] * rng.uniform(0.2, 0.45)
    base[..., 2] = base[..., 1] * rng.uniform(0.1, 0.3)
    img = Image.fromarray(base.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(6, 14))):  # darker blades in both classes
        x = int(rng.integers(0, size[0]))
        draw.line(
            [(x, size[1]), (x + int(rng.integers(-15, 15)), int(rng.integers(0, size[1] // 2)))],
            fill=(20, 90, 20),
            width=2,
        )
    if label == "dandelion":
        for _ in range(int(rng.integers(2, 5))):
            r = int(rng.integers(10, 22))
            x, y = int(rng.integers(r, size[0] - r)), int(rng.integers(r, size[1] - r))
            draw.ellipse([x - r, y - r, x + r, y + r], fill=(250, int(rng.integers(200, 235)), 20))
    elif label in FLOWERS:  # another flower: petals of its colour around a small centre
        petals, centre = FLOWERS[label]
        for _ in range(int(rng.integers(2, 4))):
            r = int(rng.integers(14, 24))
            x, y = int(rng.integers(r, size[0] - r)), int(rng.integers(r, size[1] - r))
            draw.ellipse([x - r, y - r, x + r, y + r], fill=petals)
            draw.ellipse([x - r // 3, y - r // 3, x + r // 3, y + r // 3], fill=centre)
    return img


FLOWERS = {"daisy": ((245, 245, 240), (240, 200, 30)), "rose": ((200, 20, 50), (120, 10, 30))}
"""Crafted kinds of photo the model learns to refuse: white daisies, red roses."""


def crafted_jpeg(label: str, seed: int) -> bytes:
    buffer = io.BytesIO()
    crafted(label, seed).save(buffer, "JPEG", quality=92)
    return buffer.getvalue()


def write_crafted_folder(root: Path, per_class: int, offset: int = 0, refused: dict[str, int] | None = None) -> Path:
    """``per_class`` photos in ``dandelion/`` and ``grass/``, and ``refused[kind]`` in a subfolder per refused kind
    (photos of neither)."""
    counts = {"dandelion": per_class, "grass": per_class, **(refused or {})}
    for index, (label, n) in enumerate(counts.items()):
        folder = root / label
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            (folder / f"{i:08d}.jpg").write_bytes(crafted_jpeg(label, 10_000 * index + i + offset))
    return root


FAST_TRAINING = {"resolution": 128, "cv_folds": 3, "cv_repeats": 1, "embed_workers": 1}
"""The production recipe at a fifth of its pixels and with one shuffle of three folds: seconds, not a minute."""


def crafted_training(
    stack_settings, registry_settings, folder: Path, per_class: int, floor: float, refused: dict[str, int] | None = None
):
    """Trainer settings on the real stack, with a crafted data set ingested and its feature set built."""
    import asyncio

    from services.trainer.features import build_features
    from services.trainer.ingest import ingest

    write_crafted_folder(folder, per_class=per_class, refused=refused)
    settings = stack_settings.model_copy(
        update={"registry": registry_settings, "data_source": str(folder), "promotion_floor": floor, **FAST_TRAINING}
    )
    asyncio.run(ingest(settings, progress=False))
    asyncio.run(build_features(settings, progress=False))
    return settings

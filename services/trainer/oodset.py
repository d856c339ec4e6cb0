"""An out-of-domain image set, made reproducibly from what installed packages ship plus generated images.

Used to measure how well the in-domain score (:mod:`services.trainer.indomain`) catches images that are
neither dandelions nor grass. Nothing here is committed: the images come from the sample data that
scikit-learn, matplotlib and scikit-image ship (photos of people, a cat, coffee, a rocket, a flower,
buildings, microscopy, astronomy, maps, logos, documents; each with two random crops), from headless
Chromium's screenshots of our own upload page (when Chromium is installed), and from code: flat colours,
noise, gradients and shapes, charts, rendered text. Each file's source is in ``manifest.json``. Every
training run builds it once into ``TRAINER_OOD_SET`` (``var/ood-set``) and reuses it.

scikit-image's ``grass.png`` is left out on purpose: it is a photo of grass.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

SKIMAGE_SKIPPED = {"grass.png", "chessboard_GRAY.png", "lbpcascade_frontalface_opencv.xml"}
"""Not out of domain (a grass photo), or duplicates/not images."""
WORDS = (
    "invoice total amount due payment receipt order number quantity price subtotal tax thank you for your "
    "purchase meeting notes agenda project deadline report summary dashboard settings account password "
    "login email address phone street city country weather forecast temperature recipe flour sugar"
)
"""Rendered as documents and receipts."""


def _package_images() -> Iterator[tuple[str, Image.Image, str]]:
    """(name, image, source) of the sample images installed packages ship."""
    sklearn = resources.files("sklearn.datasets").joinpath("images")
    for name in ("china.jpg", "flower.jpg"):
        yield f"sklearn-{Path(name).stem}", Image.open(io.BytesIO(sklearn.joinpath(name).read_bytes())), "scikit-learn"
    mpl = resources.files("matplotlib").joinpath("mpl-data", "sample_data")
    for name in ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png", "logo2.png"):
        yield f"matplotlib-{Path(name).stem}", Image.open(io.BytesIO(mpl.joinpath(name).read_bytes())), "matplotlib"
    for name in ("jacksboro_fault_dem.npz", "topobathy.npz"):
        with np.load(io.BytesIO(mpl.joinpath(name).read_bytes())) as data:
            field = np.asarray(data[data.files[0]], dtype=np.float64)
        yield f"matplotlib-{Path(name).stem}", _colormapped(field, "terrain"), "matplotlib (elevation data, rendered)"
    try:
        skimage = resources.files("skimage").joinpath("data")
    except ModuleNotFoundError:
        return
    for entry in sorted(skimage.iterdir(), key=lambda e: e.name):
        if entry.name in SKIMAGE_SKIPPED or not entry.name.endswith((".png", ".jpg", ".gif", ".tif")):
            continue
        try:
            image = Image.open(io.BytesIO(entry.read_bytes()))
            image.seek(0)
            image.load()
        except (OSError, ValueError):  # a format this Pillow does not read: one sample image fewer
            continue
        yield f"skimage-{Path(entry.name).stem}", image.copy(), "scikit-image"
    faces = np.load(io.BytesIO(skimage.joinpath("lfw_subset.npy").read_bytes()))
    for i in range(0, min(len(faces), 100), 10):  # faces: the selfies people send
        face = Image.fromarray((np.clip(faces[i], 0, 1) * 255).astype(np.uint8)).resize((200, 200))
        yield f"skimage-lfw-face-{i:03d}", face, "scikit-image (Labeled Faces in the Wild subset)"


def _colormapped(field: np.ndarray, cmap: str) -> Image.Image:
    import matplotlib

    low, high = np.nanpercentile(field, [1, 99])
    scaled = np.clip((field - low) / max(high - low, 1e-9), 0, 1)
    rgba = matplotlib.colormaps[cmap](np.nan_to_num(scaled))
    return Image.fromarray((rgba[..., :3] * 255).astype(np.uint8))


def _crops(name: str, image: Image.Image, rng: np.random.Generator) -> Iterator[tuple[str, Image.Image]]:
    """The image and two random crops of it (more views of real photos of other things)."""
    image = image.convert("RGB")
    yield name, image
    width, height = image.size
    if min(width, height) < 128:
        return
    for k in range(2):
        side = int(min(width, height) * rng.uniform(0.45, 0.8))
        left, top = int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
        yield f"{name}-crop{k}", image.crop((left, top, left + side, top + side))


def _generated(rng: np.random.Generator) -> Iterator[tuple[str, Image.Image, str]]:
    size = (320, 240)
    colours = {
        "white": (255, 255, 255), "black": (0, 0, 0), "grey": (128, 128, 128), "red": (220, 30, 30),
        "blue": (30, 60, 200), "sky": (135, 190, 235), "green": (40, 150, 40), "dark-green": (20, 70, 25),
        "lime": (150, 220, 60), "yellow": (250, 220, 30), "orange": (245, 150, 30), "brown": (120, 80, 40),
    }  # fmt: skip
    for name, rgb in colours.items():
        yield f"flat-{name}", Image.new("RGB", size, rgb), "generated: flat colour"
    for k in range(4):
        noise = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        yield f"noise-uniform-{k}", Image.fromarray(noise), "generated: uniform noise"
        gauss = np.clip(rng.normal(128, 50, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
        blurred = Image.fromarray(gauss).filter(ImageFilter.GaussianBlur(float(rng.uniform(1, 6))))
        yield f"noise-blurred-{k}", blurred, "generated: blurred Gaussian noise"
    for k in range(4):
        a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        t = np.linspace(0, 1, size[0])[None, :, None]
        gradient = np.broadcast_to(a + (b - a) * t, (size[1], size[0], 3)).astype(np.uint8)
        yield f"gradient-{k}", Image.fromarray(gradient), "generated: gradient"
        shapes = Image.new("RGB", size, tuple(int(v) for v in rng.integers(0, 256, 3)))
        draw = ImageDraw.Draw(shapes)
        for _ in range(8):
            x0, y0 = int(rng.integers(0, size[0])), int(rng.integers(0, size[1]))
            x1, y1 = x0 + int(rng.integers(10, 120)), y0 + int(rng.integers(10, 120))
            fill = tuple(int(v) for v in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=fill)
        yield f"shapes-{k}", shapes, "generated: shapes"
    yield from _charts(rng)
    yield from _texts(rng)


def _charts(rng: np.random.Generator) -> Iterator[tuple[str, Image.Image, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = ("line", "bar", "scatter", "pie", "hist", "heatmap")
    for k in range(12):
        kind = kinds[k % len(kinds)]
        fig, ax = plt.subplots(figsize=(4, 3), dpi=80)
        x = np.arange(20)
        colour = ("tab:green", "gold", "tab:blue", "tab:red")[k % 4]
        if kind == "line":
            ax.plot(x, np.cumsum(rng.normal(size=20)), color=colour)
        elif kind == "bar":
            ax.bar(x[:8], rng.random(8), color=colour)
        elif kind == "scatter":
            ax.scatter(rng.random(60), rng.random(60), color=colour)
        elif kind == "pie":
            ax.pie(rng.random(5) + 0.1)
        elif kind == "hist":
            ax.hist(rng.normal(size=300), bins=20, color=colour)
        else:
            ax.imshow(rng.random((12, 12)), cmap=("viridis", "YlGn", "magma", "summer")[k % 4])
        ax.set_title(f"{kind} {k}")
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
        plt.close(fig)
        yield f"chart-{kind}-{k}", Image.open(buffer).convert("RGB"), "generated: matplotlib chart"


def _texts(rng: np.random.Generator) -> Iterator[tuple[str, Image.Image, str]]:
    font = ImageFont.load_default()
    backgrounds = ((255, 255, 255), (250, 245, 230), (30, 30, 30), (220, 235, 250), (235, 250, 220))
    for k in range(10):
        background = backgrounds[k % len(backgrounds)]
        ink = (240, 240, 240) if sum(background) < 200 else (20, 20, 20)
        image = Image.new("RGB", (300, 400), background)
        draw = ImageDraw.Draw(image)
        for line in range(int(rng.integers(8, 24))):
            words = " ".join(rng.choice(WORDS.split(), int(rng.integers(2, 7))))
            draw.text((12, 12 + line * 16), words, fill=ink, font=font)
        yield f"text-{k}", image, "generated: rendered text (documents, receipts)"


def _page_screenshots(work: Path) -> Iterator[tuple[str, Image.Image, str]]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    page = Path(__file__).resolve().parents[1] / "api" / "static" / "index.html"
    if chromium is None or not page.exists():
        return
    for width, height in ((1280, 800), (390, 844)):
        target = work / f"page-{width}.png"
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", f"--user-data-dir={work / 'chromium'}"]  # fmt: skip
        command = [chromium, *flags, f"--window-size={width},{height}", f"--screenshot={target}", page.as_uri()]
        done = subprocess.run(command, capture_output=True, timeout=60, check=False)
        if done.returncode == 0 and target.exists():
            yield f"screenshot-upload-page-{width}", Image.open(target).convert("RGB"), "generated: our page"


VERSION = 1
"""Bump when the set's recipe changes: a cached set of another version is rebuilt."""


def build(out: Path, seed: int = 7) -> list[dict[str, str]]:
    """Write the set to ``out`` (emptied first) with its ``manifest.json``; returns the manifest's entries."""
    rng = np.random.default_rng(seed)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    entries = []

    def save(name: str, image: Image.Image, source: str) -> None:
        path = out / f"{name}.png"
        image.convert("RGB").save(path)
        entries.append({"file": path.name, "source": source})

    for name, image, source in _package_images():
        for crop_name, crop in _crops(name, image, rng):
            save(crop_name, crop, source)
    for name, image, source in _generated(rng):
        save(name, image, source)
    with tempfile.TemporaryDirectory() as work:
        for name, image, source in _page_screenshots(Path(work)):
            save(name, image, source)
    (out / "manifest.json").write_text(json.dumps({"version": VERSION, "seed": seed, "images": entries}, indent=1))
    return entries


def load(folder: Path) -> tuple[list[str], list[bytes], list[str]]:
    """``(names, file bytes, sources)`` of a set written by :func:`build`."""
    entries = json.loads((folder / "manifest.json").read_text())["images"]
    return (
        [entry["file"] for entry in entries],
        [(folder / entry["file"]).read_bytes() for entry in entries],
        [entry["source"] for entry in entries],
    )


def ensure(folder: Path) -> tuple[list[str], list[bytes], list[str]]:
    """The set at ``folder``, built first if it is missing or of another :data:`VERSION`."""
    try:
        current = json.loads((folder / "manifest.json").read_text()).get("version") == VERSION
    except (OSError, ValueError, AttributeError):
        current = False
    if not current:
        build(folder)
    return load(folder)

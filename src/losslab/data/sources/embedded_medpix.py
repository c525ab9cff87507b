"""``embedded_medpix``: a synthetic image + caption dataset with two tasks, in the ``manifest`` layout.

Modelled on MedPix-2.0 (each image has a caption, a *modality* and a body *location*). Written
offline, small (300 samples of 64×64 by default), read back by the ``manifest`` source::

    manifest.csv        path,label,text,modality,location,patient_id   (label = modality, the main task)
    images/<id>.png     8-bit grey 64×64 (or .npy float32 with image_format="npy")

The two tasks are built so that fusing text and image beats either alone:

* **modality** (``CT``, ``MRI``, ``XRAY``) is *clear from the image* (CT: uniform body with a bright
  bony rim; MRI: smooth bias field, no rim, more noise; XRAY: a bright spine line and rib-like
  horizontal stripes) but *named in the caption only sometimes* (``modality_text_rate``, 0.35),
  with synonyms ("computed tomography", "MR image", "plain film", ...).
* **location** (``head``, ``chest``, ``abdomen``) is *named in the caption* most of the time
  (``location_text_rate``, 0.85) through synonyms ("skull", "thoracic", "liver", ...), and the
  named location is wrong with probability ``location_text_noise`` (0.1); in the image it is only
  *weakly visible* (the body outline's aspect ratio and faint internal structures, with jitter that
  makes the classes overlap).

Classes are imbalanced (modality 45/35/20 %, location 40/35/25 %). About a third of the patients
have two images (patient-level splits keep them together).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from losslab.data.sources.base import register_generator

MODALITIES = ("CT", "MRI", "XRAY")
LOCATIONS = ("head", "chest", "abdomen")
MODALITY_PRIORS = (0.45, 0.35, 0.20)
LOCATION_PRIORS = (0.40, 0.35, 0.25)

MODALITY_WORDS = {
    "CT": ("CT", "computed tomography", "CT scan", "contrast-enhanced CT"),
    "MRI": ("MRI", "MR image", "T2-weighted MRI", "magnetic resonance"),
    "XRAY": ("radiograph", "X-ray", "plain film", "AP radiograph"),
}
GENERIC_WORDS = ("image", "study", "axial image", "scan", "examination")
LOCATION_WORDS = {
    "head": ("brain", "head", "skull", "cranial", "intracranial"),
    "chest": ("chest", "thorax", "lung", "thoracic", "pulmonary"),
    "abdomen": ("abdomen", "abdominal", "liver", "bowel", "upper abdomen"),
}
FINDINGS = (
    "shows a small mass", "demonstrates no acute abnormality", "with a well-defined lesion",
    "showing a subtle opacity", "with post-operative changes", "reveals a cystic lesion",
    "with mild degenerative changes", "showing a calcified nodule",
)
TEMPLATES = (
    "{Prefix} of the {location} {finding}.",
    "{Prefix} {finding}, {location} region.",
    "{Prefix}: {location}, {finding}.",
    "{Prefix} {finding}.",
)

__all__ = ["MODALITIES", "LOCATIONS", "generate_embedded_medpix", "render_image", "write_caption"]


def _outline(size: int, location: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Body mask ``(H, W)`` bool, normalised radial distance ``(H, W)``, and grid ``(yy, xx)`` in [-1, 1]."""
    # aspect ratio carries the (weak) location signal: head round, chest wide, abdomen in between
    half_width, half_height = {"head": (0.58, 0.62), "chest": (0.80, 0.56), "abdomen": (0.70, 0.62)}[location]
    half_width *= rng.uniform(0.82, 1.18)
    half_height *= rng.uniform(0.82, 1.18)
    centre = rng.uniform(-0.08, 0.08, 2)
    axis = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
    yy, xx = np.meshgrid(axis, axis, indexing="ij")
    radial = np.sqrt(((xx - centre[1]) / half_width) ** 2 + ((yy - centre[0]) / half_height) ** 2)
    return radial <= 1.0, radial, np.stack([yy - centre[0], xx - centre[1]])


def render_image(modality: str, location: str, rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """One ``float32 (size, size)`` image in ``[0, 1]`` for ``modality`` and ``location``."""
    body, radial, (yy, xx) = _outline(size, location, rng)
    image = np.zeros((size, size), dtype=np.float32)
    # faint internal structure: lungs (chest), a round organ (abdomen), ventricles (head)
    internal = np.zeros_like(image)
    if location == "chest":
        for side in (-1, 1):
            internal += (((xx - side * 0.33) / 0.22) ** 2 + (yy / 0.35) ** 2 <= 1.0)
        internal *= -1.0
    elif location == "abdomen":
        internal += (((xx + 0.2) / 0.3) ** 2 + ((yy + 0.1) / 0.25) ** 2 <= 1.0)
    else:
        internal += ((xx / 0.12) ** 2 + (yy / 0.22) ** 2 <= 1.0) * -0.7
    internal_contrast = rng.uniform(0.02, 0.08)

    if modality == "CT":
        image[body] = rng.uniform(0.38, 0.48)
        image[(radial > 0.86) & body] = rng.uniform(0.85, 0.95)  # bony rim
        noise = 0.03
    elif modality == "MRI":
        bias = 0.45 + 0.22 * (xx * np.cos(rng.uniform(0, 2 * np.pi)) + yy * np.sin(rng.uniform(0, 2 * np.pi)))
        image[body] = bias[body]
        image[(radial > 0.9) & body] *= 0.5  # dark edge, no bright rim
        image[~body] = 0.06
        noise = 0.07
    else:  # XRAY: projection: spine line and rib-like horizontal stripes over a dim body
        image[body] = rng.uniform(0.22, 0.32)
        stripes = (np.sin((yy * rng.uniform(9.0, 12.0) + rng.uniform(0, np.pi)) * np.pi) > 0.6) & body
        image[stripes] += 0.25
        image[(np.abs(xx) < 0.06) & body] = 0.85
        noise = 0.04
    image += internal_contrast * internal * body
    image += rng.normal(0.0, noise, image.shape).astype(np.float32)
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def write_caption(modality: str, location: str, rng: np.random.Generator, modality_text_rate: float = 0.35,
                  location_text_rate: float = 0.85, location_text_noise: float = 0.1) -> str:
    """A caption whose words carry partial, noisy information about ``modality`` and ``location``."""
    if rng.uniform() < modality_text_rate:
        prefix = str(rng.choice(MODALITY_WORDS[modality]))
    else:
        prefix = str(rng.choice(GENERIC_WORDS))
    template = str(rng.choice(TEMPLATES[:3]))
    if rng.uniform() < location_text_rate:
        named = location
        if rng.uniform() < location_text_noise:
            named = str(rng.choice([loc for loc in LOCATIONS if loc != location]))
        location_word = str(rng.choice(LOCATION_WORDS[named]))
    else:
        template, location_word = TEMPLATES[3], ""
    text = template.format(Prefix=prefix[0].upper() + prefix[1:], location=location_word,
                           finding=str(rng.choice(FINDINGS)))
    return " ".join(text.split())


@register_generator("embedded_medpix")
def generate_embedded_medpix(root: str, seed: int = 0, num_samples: int = 300, image_size: int = 64,
                             image_format: str = "png", modality_text_rate: float = 0.35,
                             location_text_rate: float = 0.85, location_text_noise: float = 0.1) -> None:
    """Write ``num_samples`` image + caption samples and ``manifest.csv`` under ``root``.

    Args:
        root: output folder (created).
        seed: RNG seed; the same seed writes the same files.
        num_samples: number of images, ≥ 6.
        image_size: images are ``image_size × image_size``, ≥ 16.
        image_format: ``png`` (8-bit) or ``npy`` (float32).
        modality_text_rate: probability that the caption names the modality.
        location_text_rate: probability that the caption names a location.
        location_text_noise: probability that a named location is the wrong one.

    Raises:
        ValueError: a value out of range or an unknown ``image_format``.
    """
    if num_samples < 6:
        raise ValueError(f"embedded_medpix: num_samples must be >= 6, got {num_samples}")
    if image_size < 16:
        raise ValueError(f"embedded_medpix: image_size must be >= 16, got {image_size}")
    if image_format not in ("png", "npy"):
        raise ValueError(f"embedded_medpix: image_format must be 'png' or 'npy', got {image_format!r}")
    for name, rate in (("modality_text_rate", modality_text_rate), ("location_text_rate", location_text_rate),
                       ("location_text_noise", location_text_noise)):
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"embedded_medpix: {name} must be in [0, 1], got {rate}")
    rng = np.random.default_rng(seed)
    out = Path(root)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    patient = 0
    for i in range(num_samples):
        if i == 0 or rng.uniform() > 0.25:  # about a third of patients get a second image
            patient += 1
        modality = str(rng.choice(MODALITIES, p=MODALITY_PRIORS))
        location = str(rng.choice(LOCATIONS, p=LOCATION_PRIORS))
        image = render_image(modality, location, rng, image_size)
        name = f"images/img_{i:04d}.{image_format}"
        if image_format == "png":
            from PIL import Image

            Image.fromarray(np.round(image * 255).astype(np.uint8)).save(out / name)
        else:
            np.save(out / name, image)
        text = write_caption(modality, location, rng, modality_text_rate, location_text_rate, location_text_noise)
        rows.append({"path": name, "label": modality, "text": text, "modality": modality, "location": location,
                     "patient_id": f"P{patient:04d}"})
    with open(out / "manifest.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "label", "text", "modality", "location", "patient_id"])
        writer.writeheader()
        writer.writerows(rows)

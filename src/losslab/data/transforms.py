"""Augmentation chains built from a config dict (MONAI array transforms underneath).

``build_transforms(augment, train)`` returns a callable on ``float32 (N, C, H, W)`` arrays (a bag,
a 2.5D stack or a single image ``N = 1``) that returns an array of the same shape and dtype.

Config keys (all optional; an empty dict, or ``train=False``, is the exact identity)::

    rotation:   15          # degrees; angle ~ U(-15, 15)
    shift:      0.1         # fraction of H and W; translation ~ U(-0.1, 0.1) * size
    scale:      0.1         # zoom factor ~ 1 + U(-0.1, 0.1)
    brightness: 0.1         # additive intensity offset ~ U(-0.1, 0.1); or [low, high]
    gamma:      [0.7, 1.5]  # contrast gamma ~ U(low, high) (a number g means [1 - g, 1 + g])
    hflip:      0.0         # probability of a horizontal flip; off by default (laterality matters)
    prob:       0.5         # probability of applying each of the transforms above (not hflip)
    per_instance: false     # see below
    padding_mode: border    # MONAI padding for the affine (border, zeros, reflection)

Order: affine (rotation + shift + scale in one resampling), brightness, gamma, flip.

Random parameters: with ``per_instance: false`` (default) one draw is shared by every instance
and channel of the array — the ``N * C`` planes are transformed as one multi-channel image, so
the slices of a 2.5D stack stay aligned and the windows of an image keep matching. With
``per_instance: true`` each instance draws its own parameters (more diversity for MIL bags). In
both cases the channels of one instance share their parameters.

Segmentation (:func:`segmentation_train_transforms`, MONAI dictionary transforms on ``image``, ``label``
and ``dist`` of :class:`losslab.data.datasets.SegVolumeDataset`): ``seg.samples_per_case`` patches per
case with ``RandCropByPosNegLabeld`` (foreground = any region / any non-background class, ``seg.pos`` :
``seg.neg``), a flip of each spatial axis with ``seg.flip_prob`` and intensity jitter
(``RandScaleIntensityd`` / ``RandShiftIntensityd``); in 2D (``model.spatial_dims: 2``) a patch is
``(h, w, 1)`` and the last axis is squeezed. :func:`check_patch_fits` refuses a patch larger than the
smallest cached volume.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np

ALLOWED_KEYS = ("rotation", "shift", "scale", "brightness", "gamma", "hflip", "prob", "per_instance",
                "padding_mode")


def _range(value: Any, key: str, centre: float = 0.0) -> tuple[float, float]:
    if isinstance(value, (int, float)):
        value = float(value)
        if value < 0:
            raise ValueError(f"augment.{key} must be >= 0, got {value}")
        return centre - value, centre + value
    if isinstance(value, (list, tuple)) and len(value) == 2:
        low, high = float(value[0]), float(value[1])
        if low > high:
            raise ValueError(f"augment.{key}: low {low} > high {high}")
        return low, high
    raise TypeError(f"augment.{key} must be a number or a [low, high] pair, got {value!r}")


class Augment:
    """The augmentation callable (see the module docstring); ``set_random_state(seed)`` for tests."""

    def __init__(self, augment: Mapping[str, Any]) -> None:
        unknown = sorted(set(augment) - set(ALLOWED_KEYS))
        if unknown:
            raise ValueError(f"augment: unknown key(s) {unknown}; allowed: {list(ALLOWED_KEYS)}")
        self.config = dict(augment)
        self.prob = float(augment.get("prob", 0.5))
        if not 0.0 <= self.prob <= 1.0:
            raise ValueError(f"augment.prob must be in [0, 1], got {self.prob}")
        self.per_instance = bool(augment.get("per_instance", False))
        self.rotation = np.deg2rad(_range(augment["rotation"], "rotation")) if "rotation" in augment else None
        self.shift = _range(augment["shift"], "shift") if "shift" in augment else None
        self.scale = _range(augment["scale"], "scale") if "scale" in augment else None
        self.brightness = _range(augment["brightness"], "brightness") if "brightness" in augment else None
        gamma = augment.get("gamma")
        self.gamma = None if gamma is None else _range(gamma, "gamma", centre=1.0)
        if self.gamma is not None and self.gamma[0] <= 0:
            self.gamma = (0.01, self.gamma[1])
        self.hflip = float(augment.get("hflip", 0.0))
        self.padding_mode = str(augment.get("padding_mode", "border"))
        self._seed: int | None = None
        self._chains: dict[tuple[int, int], Any] = {}

    def set_random_state(self, seed: int) -> "Augment":
        self._seed = int(seed)
        for chain in self._chains.values():
            chain.set_random_state(seed=self._seed)
        return self

    def _chain(self, height: int, width: int) -> Any:
        key = (height, width)
        if key in self._chains:
            return self._chains[key]
        from monai.transforms import Compose, RandAdjustContrast, RandAffine, RandFlip, RandShiftIntensity

        transforms: list[Any] = []
        if self.rotation is not None or self.shift is not None or self.scale is not None:
            transforms.append(RandAffine(
                prob=self.prob,
                rotate_range=[tuple(self.rotation)] if self.rotation is not None else None,
                translate_range=[(self.shift[0] * height, self.shift[1] * height),
                                 (self.shift[0] * width, self.shift[1] * width)] if self.shift is not None else None,
                scale_range=[tuple(self.scale)] * 2 if self.scale is not None else None,
                padding_mode=self.padding_mode,
            ))
        if self.brightness is not None:
            transforms.append(RandShiftIntensity(offsets=self.brightness, prob=self.prob))
        if self.gamma is not None:
            transforms.append(RandAdjustContrast(gamma=self.gamma, prob=self.prob))
        if self.hflip > 0:
            transforms.append(RandFlip(prob=self.hflip, spatial_axis=1))
        chain = Compose(transforms)
        if self._seed is not None:
            chain.set_random_state(seed=self._seed)
        self._chains[key] = chain
        return chain

    def __call__(self, array: np.ndarray) -> np.ndarray:
        array = np.asarray(array, dtype=np.float32)
        if array.ndim != 4:
            raise ValueError(f"augment expects (N, C, H, W), got shape {array.shape}")
        n, c, h, w = array.shape
        chain = self._chain(h, w)
        if self.per_instance:
            out = np.stack([_to_numpy(chain(array[i])) for i in range(n)])
        else:
            out = _to_numpy(chain(array.reshape(n * c, h, w))).reshape(n, c, h, w)
        return np.ascontiguousarray(out, dtype=np.float32)


def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    return value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)


def _identity(array: np.ndarray) -> np.ndarray:
    return np.asarray(array, dtype=np.float32)


def build_transforms(augment: Mapping[str, Any] | None, train: bool, seed: int | None = None
                     ) -> Callable[[np.ndarray], np.ndarray]:
    """The augmentation for ``float32 (N, C, H, W)`` arrays; identity for eval or an empty config.

    Args:
        augment: the config dict (keys in the module docstring); ``None`` or ``{}`` is identity.
        train: augment only when True (evaluation is always the identity).
        seed: seed for the random draws (default: MONAI's global state).

    Raises:
        ValueError: unknown key or bad range. TypeError: a value of the wrong type.
    """
    if not augment:
        return _identity
    pipeline = Augment(augment)  # validate even when not training
    if not train:
        return _identity
    if seed is not None:
        pipeline.set_random_state(seed)
    return pipeline


#: the keys of a segmentation item that the spatial transforms move together
SEGMENTATION_KEYS = ("image", "label", "dist")


def segmentation_train_transforms(seg_cfg: Any, spatial_dims: int):
    """The MONAI ``Compose`` of random crops by label, flips and intensity jitter (module docstring)."""
    from monai import transforms as T

    keys = SEGMENTATION_KEYS
    size = list(seg_cfg.patch_size) + ([1] if spatial_dims == 2 else [])
    chain = [
        T.RandCropByPosNegLabeld(keys=keys, label_key="label", spatial_size=size, pos=seg_cfg.pos, neg=seg_cfg.neg,
                                 num_samples=seg_cfg.samples_per_case, allow_smaller=False),
    ]
    if spatial_dims == 2:
        chain.append(T.SqueezeDimd(keys=keys, dim=-1))
    chain += [T.RandFlipd(keys=keys, prob=seg_cfg.flip_prob, spatial_axis=axis) for axis in range(spatial_dims)
              if seg_cfg.flip_prob > 0]
    if seg_cfg.intensity_scale > 0:
        chain.append(T.RandScaleIntensityd(keys="image", factors=seg_cfg.intensity_scale, prob=seg_cfg.intensity_prob))
    if seg_cfg.intensity_shift > 0:
        chain.append(T.RandShiftIntensityd(keys="image", offsets=seg_cfg.intensity_shift, prob=seg_cfg.intensity_prob))
    chain.append(T.EnsureTyped(keys=keys, track_meta=False))
    return T.Compose(chain)


def check_patch_fits(patch_size: list[int], spatial_dims: int, info: Any) -> None:
    """Refuse a training patch larger than the smallest volume of the segmentation cache ``info``
    (``RandCropByPosNegLabeld`` would fail mid-epoch): compared per axis with the smallest extent among
    the cached cases; in 2D the patch is ``(h, w)`` of the first two axes.

    Raises:
        ValueError: names ``seg.patch_size``, the smallest extents and the cache.
    """
    shapes = np.array([row["shape"] for row in info.index], dtype=np.int64)
    smallest = shapes.min(axis=0)[: len(patch_size)] if len(shapes) else None
    if smallest is None or all(int(p) <= int(s) for p, s in zip(patch_size, smallest)):
        return
    fitting = [min(int(p), int(s)) for p, s in zip(patch_size, smallest)]
    raise ValueError(f"seg.patch_size={list(patch_size)} is larger than the smallest volume in the segmentation "
                     f"cache {info.cache_dir} ({' x '.join(str(int(s)) for s in shapes.min(axis=0))} voxels per "
                     f"axis, over {len(shapes)} cases); set seg.patch_size to at most {fitting}")

"""Two global views of one image, each patch tagged with its centre in original-image pixels.

CrIBo (Sec. 3.2.1, App. B) clusters the patch tokens of BOTH views jointly and biases the clustering
with positional cues: every patch of a view carries the (x, y) coordinate of its centre in the frame
of the ORIGINAL image, so the two views share one frame (CrOC Fig. 4). The reference implementation
obtains these by resampling a 10000 x 10000 coordinate grid with each crop (~800 MB per worker); here
they are computed analytically from the crop box and the flip (:func:`patch_centres`).

Augmentations follow DINO's two global crops (method reference, "Data"):

- RandomResizedCrop(img_size, scale, ratio=(3/4, 4/3), bicubic), horizontal flip p=0.5;
- colour jitter (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1) p=0.8, random order;
- grayscale p=0.2;
- gaussian blur, sigma ~ U(0.1, 2.0), p=1.0 on view 1 and p=0.1 on view 2;
- solarize (threshold 128) p=0.2 on view 2 only;
- ImageNet normalisation.

Asymmetric views (``student_augs``, ``train.py --student-augment``; not in the paper): each view is
also returned with a second, independent photometric draw on the same crop and flip, for the student,
while the teacher (clustering, targets, bank) sees the first. With ``--augment mild --student-augment
colour`` the teacher clusters and describes views in their true colours, so the two views' objects
still match by colour, while the student must predict those targets from hue-shifted views: colour
alone no longer answers, and texture and shape must.

Rotated views (``rotate``, ``train.py --rotate DEG``; not in the paper): each view's crop window is
also turned about its centre by an angle drawn uniformly in +-DEG, for data whose objects appear at
any orientation (the generated scenes' things do), so that matching two views of an object rewards
features that do not change with its orientation. Pixels the turned window takes from outside the
image are the image mirrored at its border. The patch coordinates follow the turn
(:func:`patch_centres`), so the positional cue of the clustering stays exact. With ``rotate=0`` (the
default) no angle is drawn and the views are exactly CrIBo's.

All randomness is drawn from torch: the global RNG by default (so ``DataLoader`` worker seeding makes
a run reproducible) or an explicit ``torch.Generator`` (:meth:`TwoViewTransform.sample`, used by the
app to show the views of a given seed). Every random parameter of a view is drawn up front, in a fixed
order, into a :class:`ViewParams` record, then applied; the record is returned so the views can be
redrawn or explained.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from cribo.crops import CropBox, resized_crop_box
from cribo.pixels import normalise


# (i, j, h, w): top row, left column, height, width of a crop, in original-image pixels.


@dataclass(frozen=True)
class ViewAugmentation:
    """Probabilities and ranges of one view's photometric augmentations (DINO defaults)."""

    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: float = 1.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0
    recolour_p: float = 0.0
    recolour_shared: bool = False  # second view only: repainted exactly as the first (or not at all)


#: DINO's first and second global views.
VIEW1_AUG = ViewAugmentation(blur_p=1.0, solarize_p=0.0)
VIEW2_AUG = ViewAugmentation(blur_p=0.1, solarize_p=0.2)

#: Named view pairs (``TrainConfig.augment``; the name is part of the run identity, so a pair is never
#: changed once named: add a new one). "dino": DINO's two global views. "texture": the same colour
#: jitter, grayscale and solarisation, but a weak, occasional blur (sigma <= 0.6 on half of the first
#: views, none on the second), so that fine textures (periods of 2-10 px, the cue that identifies
#: many classes of the generated scenes) survive in both views. "mild": "texture"'s blur, and
#: photometric changes that keep a scene's class identity: brightness and contrast as DINO, saturation
#: 0.2, a hue shift of at most 0.02 of the colour wheel (DINO's 0.1 moves a colour into a neighbouring
#: colour family), grayscale 5 %, no solarisation (which inverts the bright half of a texture).
#: "colour": "mild"'s blur and geometry, but a hue shift drawn over the whole colour wheel on every
#: view (jitter always applied, hue up to 0.5), saturation 0.4, grayscale 20 %: the two views of an
#: object disagree in colour, so matching them across views needs texture and shape. (The generated
#: scenes' classes share colour families, so colour is a weak class cue there, and the cheapest one
#: for the object losses to match.) "grey": "mild" with grayscale on half of the views (p = 0.5 each):
#: half of the pairs match a grey view to a coloured one and a quarter two grey views, so colour
#: alone answers for only a quarter of the pairs, while no view's colours are changed.
#: "grey-all": "mild" with every view grey; meant for the teacher of asymmetric views
#: (``--augment grey-all --student-augment grey``): the teacher's clustering and targets carry no colour
#: at all, so no target can be predicted from an instance's colours, while the student (and so the
#: EMA teacher that is evaluated) still sees coloured views half of the time.
#: "recolour": "mild", and with p = 0.5 each view is first repainted (:class:`Recolour`): its luma is
#: inverted with p 0.5, bent by a random gamma and mapped onto a random dark-to-light colour pair.
#: The generated scenes paint every instance as ``c2 + (c1 - c2) t`` with a random colour pair, which
#: may be darker or lighter than the other: the class is the pattern ``t``, up to an affine map of
#: either sign. Repainting keeps the pattern and takes away the instance's colours and polarity, the
#: cues that "grey" leaves in (lightness) and that let the objects of two views match without texture.
#: "recolour-pair": both views of an image repainted with ONE draw, with p = 0.8: the two views agree
#: (so the joint clustering still finds the same objects in both), while across images, where the
#: prototypes and the bank's neighbours are shared, an object's colours say nothing of its class.
_MILD = dict(hue=0.02, grayscale_p=0.05, solarize_p=0.0, blur_sigma=(0.1, 0.6))
_COLOUR = dict(jitter_p=1.0, hue=0.5, saturation=0.4, grayscale_p=0.2, solarize_p=0.0, blur_sigma=(0.1, 0.6))
AUGMENTATIONS: dict[str, tuple[ViewAugmentation, ViewAugmentation]] = {
    "dino": (VIEW1_AUG, VIEW2_AUG),
    "texture": (ViewAugmentation(blur_p=0.5, blur_sigma=(0.1, 0.6)), ViewAugmentation(blur_p=0.0, solarize_p=0.2)),
    "mild": (ViewAugmentation(blur_p=0.5, **_MILD), ViewAugmentation(blur_p=0.0, **_MILD)),
    "colour": (ViewAugmentation(blur_p=0.5, **_COLOUR), ViewAugmentation(blur_p=0.0, **_COLOUR)),
    "grey": (ViewAugmentation(blur_p=0.5, **{**_MILD, "grayscale_p": 0.5}),
             ViewAugmentation(blur_p=0.0, **{**_MILD, "grayscale_p": 0.5})),
    "grey-all": (ViewAugmentation(blur_p=0.5, **{**_MILD, "grayscale_p": 1.0}),
                 ViewAugmentation(blur_p=0.0, **{**_MILD, "grayscale_p": 1.0})),
    "recolour": (ViewAugmentation(blur_p=0.5, recolour_p=0.5, **_MILD),
                 ViewAugmentation(blur_p=0.0, recolour_p=0.5, **_MILD)),
    "recolour-pair": (ViewAugmentation(blur_p=0.5, recolour_p=0.8, **_MILD),
                      ViewAugmentation(blur_p=0.0, recolour_p=0.8, recolour_shared=True, **_MILD)),
}

#: Ranges of a repainting (:class:`Recolour`): gamma log-uniform in [1/GAMMA, GAMMA]; the dark end's
#: channels uniform in [0, 128), the light end's in [128, 256), so the pair always has contrast.
RECOLOUR_GAMMA = 2.0


@dataclass(frozen=True)
class Recolour:
    """One view's repainting: ``luma`` (ITU-R 601, in [0, 1]) -> ``1 - luma`` if ``invert`` ->
    ``** gamma`` -> ``dark + (light - dark) * value``, per pixel (``dark``, ``light``: RGB in [0, 255])."""

    invert: bool
    gamma: float
    dark: tuple[float, float, float]
    light: tuple[float, float, float]

    def apply(self, img: Image.Image) -> Image.Image:
        luma = np.asarray(img.convert("L"), dtype=np.float32) / 255.0  # (H, W)
        value = (1.0 - luma if self.invert else luma) ** self.gamma
        dark, light = np.asarray(self.dark, np.float32), np.asarray(self.light, np.float32)
        rgb = dark + (light - dark) * value[..., None]  # (H, W, 3)
        return Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8), "RGB")


def draw_recolour(generator: torch.Generator | None = None) -> Recolour:
    """Draw a :class:`Recolour`: inversion p 0.5, gamma, then the dark and the light colour."""
    invert = _bernoulli(0.5, generator)
    gamma = math.exp(_uniform(-math.log(RECOLOUR_GAMMA), math.log(RECOLOUR_GAMMA), generator))
    dark = tuple(_uniform(0.0, 128.0, generator) for _ in range(3))
    light = tuple(_uniform(128.0, 256.0, generator) for _ in range(3))
    return Recolour(invert, gamma, dark, light)  # type: ignore[arg-type]


@dataclass(frozen=True)
class ViewParams:
    """Every random decision behind one view (drawn by :func:`draw_view_params`).

    ``jitter_order`` is a permutation of (brightness, contrast, saturation, hue) = (0, 1, 2, 3);
    the factors are those of ``torchvision.transforms.functional.adjust_*``. ``blur_sigma`` is
    ``None`` when no blur is applied. ``angle``: the turn of the crop window about its centre, in
    degrees (0: CrIBo's axis-aligned crop; drawn only when the transform has ``rotate > 0``).
    ``recolour``: the view's repainting, applied before the jitter, or None (drawn only when the
    augmentation has ``recolour_p > 0``, so the other augmentations' draws are unchanged).
    """

    box: CropBox
    flip: bool
    jitter: bool
    jitter_order: tuple[int, int, int, int]
    brightness: float
    contrast: float
    saturation: float
    hue: float
    grayscale: bool
    blur_sigma: float | None
    solarize: bool
    angle: float = 0.0
    recolour: Recolour | None = None


@dataclass(frozen=True)
class TwoViews:
    """Output of :meth:`TwoViewTransform.sample`.

    view1, view2: (3, S, S) float32, ImageNet-normalised.
    coords1, coords2: (N, 2) float32, N = (S/p)^2, the (x, y) centre of each patch in original-image
        pixels, patches in row-major order (the ViT token order).
    params1, params2: the random decisions (crop box, flip, photometric) of each view.
    image_size: (width, height) of the original image.
    student_view1, student_view2: with ``student_augs``, the student's versions of the two views: the
        same crop and flip, the student's own photometric changes (``student_params1/2``); else None.
    """

    view1: torch.Tensor
    view2: torch.Tensor
    coords1: torch.Tensor
    coords2: torch.Tensor
    params1: ViewParams
    params2: ViewParams
    image_size: tuple[int, int]
    student_view1: torch.Tensor | None = None
    student_view2: torch.Tensor | None = None
    student_params1: ViewParams | None = None
    student_params2: ViewParams | None = None

    @property
    def boxes(self) -> tuple[CropBox, CropBox]:
        return self.params1.box, self.params2.box

    @property
    def flips(self) -> tuple[bool, bool]:
        return self.params1.flip, self.params2.flip

    def as_tuple(self) -> tuple[torch.Tensor, ...]:
        """(view1, view2, coords1, coords2), plus (student_view1, student_view2) when drawn."""
        out = (self.view1, self.view2, self.coords1, self.coords2)
        if self.student_view1 is not None:
            out += (self.student_view1, self.student_view2)
        return out


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return float(torch.empty(1).uniform_(low, high, generator=generator))


def _bernoulli(p: float, generator: torch.Generator | None) -> bool:
    # Always consume one draw, whatever p, so the stream of draws has a fixed layout.
    return bool(torch.rand(1, generator=generator).item() < p)


def random_resized_crop_params(
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
    generator: torch.Generator | None = None,
) -> CropBox:
    """``torchvision.transforms.RandomResizedCrop.get_params`` with an optional generator.

    Same algorithm and the same sequence of draws as torchvision's (10 tries of area ~ U(scale) and
    log-aspect ~ U(log ratio), then the central-crop fallback), so with ``generator=None`` it returns
    exactly what ``get_params`` returns from the same global RNG state (tested). torchvision's
    version cannot take a generator, which the app needs for seeded, side-effect-free previews.
    """
    log_ratio = torch.log(torch.tensor(ratio))
    return resized_crop_box(
        height, width, ratio,
        area_fraction=lambda: torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item(),
        aspect=lambda: torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator)).item(),
        integer=lambda n: torch.randint(0, n, size=(1,), generator=generator).item())


def draw_view_params(
    height: int,
    width: int,
    scale: tuple[float, float],
    aug: ViewAugmentation,
    generator: torch.Generator | None = None,
) -> ViewParams:
    """Draw every random decision of one view, in a fixed order (crop, flip, jitter, gray, blur, solarize,
    then the repainting where ``aug.recolour_p > 0``)."""
    box = random_resized_crop_params(height, width, scale, generator=generator)
    flip = _bernoulli(0.5, generator)
    jitter = _bernoulli(aug.jitter_p, generator)
    order = tuple(int(v) for v in torch.randperm(4, generator=generator))
    brightness = _uniform(max(0.0, 1 - aug.brightness), 1 + aug.brightness, generator)
    contrast = _uniform(max(0.0, 1 - aug.contrast), 1 + aug.contrast, generator)
    saturation = _uniform(max(0.0, 1 - aug.saturation), 1 + aug.saturation, generator)
    hue = _uniform(-aug.hue, aug.hue, generator)
    grayscale = _bernoulli(aug.grayscale_p, generator)
    blur = _bernoulli(aug.blur_p, generator)
    sigma = _uniform(aug.blur_sigma[0], aug.blur_sigma[1], generator)
    solarize = _bernoulli(aug.solarize_p, generator)
    recolour = None
    if aug.recolour_p > 0:
        recolour_drawn = _bernoulli(aug.recolour_p, generator)
        repaint = draw_recolour(generator)  # drawn whatever the coin says: a fixed layout of draws
        recolour = repaint if recolour_drawn else None
    return ViewParams(
        box=box, flip=flip, jitter=jitter, jitter_order=order,  # type: ignore[arg-type]
        brightness=brightness, contrast=contrast, saturation=saturation, hue=hue,
        grayscale=grayscale, blur_sigma=sigma if blur else None, solarize=solarize, recolour=recolour,
    )


def patch_centres(box: CropBox, flip: bool, img_size: int, patch_size: int, angle: float = 0.0) -> torch.Tensor:
    """(x, y) centre of every patch of a resized crop, in original-image pixels: (N, 2) float32.

    The crop ``box = (i, j, h, w)`` (rows i..i+h, columns j..j+w of the original image, continuous
    pixel frame with the image's top-left corner at 0) is resized to ``img_size`` x ``img_size``
    and cut into ``img_size/patch_size`` patches per side, flattened row-major like ViT tokens.
    Patch (row, col) has its centre at ``p*col + p/2`` view pixels from the left, hence

        x = j + (p*col + p/2) * w / S          (x = j + w - (p*col + p/2) * w / S when flipped)
        y = i + (p*row + p/2) * h / S

    which replaces the reference's resampled 10000 x 10000 coordinate grid. With ``angle`` (degrees)
    the crop window is turned about its centre (c_x, c_y) = (j + w/2, i + h/2): every point's offset
    (dx, dy) from the centre becomes (cos a dx - sin a dy, sin a dx + cos a dy) (see :func:`view_to_image`).
    """
    if img_size % patch_size:
        raise ValueError(f"img_size={img_size} must be a multiple of patch_size={patch_size}")
    g = img_size // patch_size
    centre = torch.arange(g, dtype=torch.float64) * patch_size + patch_size / 2  # view pixels
    if angle == 0.0:  # CrIBo's crops: the formula above, as before --rotate, so such runs stay bitwise the same
        i, j, h, w = box
        xs = j + w - centre * (w / img_size) if flip else j + centre * (w / img_size)
        yy, xx = torch.meshgrid(i + centre * (h / img_size), xs, indexing="ij")  # (g, g): row index first
        return torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1).float()
    vv, uu = torch.meshgrid(centre, centre, indexing="ij")
    view_points = torch.stack([uu.reshape(-1), vv.reshape(-1)], dim=1)  # (N, 2) (u, v) in view pixels
    affine = torch.from_numpy(view_to_image(box, flip, img_size, angle))  # (2, 3)
    return (view_points @ affine[:, :2].T + affine[:, 2]).float()


def view_to_image(box: CropBox, flip: bool, img_size: int, angle: float = 0.0) -> np.ndarray:
    """The affine map (2, 3) float64 from a view's continuous pixel frame (u, v) to the original image's.

    ``[x, y] = A @ [u, v] + t`` with ``[A | t]`` returned: the view point (u, v), mirrored to
    (S - u, v) when ``flip``, is scaled to the crop's size, (du, dv) = ((u - S/2) w/S, (v - S/2) h/S)
    from the crop's centre, turned by ``angle`` degrees, and moved to the centre (j + w/2, i + h/2).
    """
    i, j, h, w = box
    a = math.radians(angle)
    cos, sin = math.cos(a), math.sin(a)
    fx = -1.0 if flip else 1.0
    lin = np.array([[cos, -sin], [sin, cos]]) @ np.diag([fx * w / img_size, h / img_size])
    centre = np.array([j + w / 2, i + h / 2])
    return np.concatenate([lin, (centre - lin @ [img_size / 2, img_size / 2])[:, None]], axis=1)


def apply_geometry(img: Image.Image, box: CropBox, flip: bool, img_size: int, angle: float = 0.0) -> Image.Image:
    """Crop ``box`` from ``img``, resize it to ``img_size`` (bicubic, as DINO) and flip it if asked.

    With ``angle`` != 0 the crop window is turned about its centre (:func:`view_to_image`); the view
    is sampled bicubically, the image mirrored beyond its border. A window larger than the view is
    first brought to the view's scale by an antialiased (PIL bicubic) resize of the whole image, so
    a turned view is no more aliased than an axis-aligned one.
    """
    i, j, h, w = box
    if angle == 0.0:
        out = TF.resized_crop(img, i, j, h, w, [img_size, img_size], InterpolationMode.BICUBIC)
        return TF.hflip(out) if flip else out
    affine = view_to_image(box, flip, img_size, angle)
    width, height = img.size
    shrink = max(w, h) / img_size
    if shrink > 1.0:  # prefilter: resize the image so the window is about view-sized
        size = (max(1, round(width / shrink)), max(1, round(height / shrink)))
        affine = np.diag([size[0] / width, size[1] / height]) @ affine
        img = img.resize(size, Image.BICUBIC)
    # cv2 indexes pixel centres at integers: source index = continuous - 0.5, at view index + 0.5.
    m = affine.copy()
    m[:, 2] += affine[:, :2] @ [0.5, 0.5] - 0.5
    out = cv2.warpAffine(np.asarray(img), m, (img_size, img_size), flags=cv2.INTER_CUBIC | cv2.WARP_INVERSE_MAP,
                         borderMode=cv2.BORDER_REFLECT_101)
    return Image.fromarray(out)


def apply_photometric(img: Image.Image, params: ViewParams) -> Image.Image:
    """Repainting (where drawn), then colour jitter (random order), grayscale, gaussian blur, solarize:
    DINO's order."""
    if params.recolour is not None:
        img = params.recolour.apply(img)
    if params.jitter:
        for fn_id in params.jitter_order:
            if fn_id == 0:
                img = TF.adjust_brightness(img, params.brightness)
            elif fn_id == 1:
                img = TF.adjust_contrast(img, params.contrast)
            elif fn_id == 2:
                img = TF.adjust_saturation(img, params.saturation)
            else:
                img = TF.adjust_hue(img, params.hue)
    if params.grayscale:
        img = TF.rgb_to_grayscale(img, num_output_channels=3)
    if params.blur_sigma is not None:
        img = img.filter(ImageFilter.GaussianBlur(radius=params.blur_sigma))
    if params.solarize:
        img = ImageOps.solarize(img, threshold=128)
    return img


def to_normalized_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> (3, S, S) float32 normalised with the ImageNet mean and std."""
    return normalise(TF.to_tensor(img))




class TwoViewTransform:
    """PIL image -> ``(view1 (3,S,S), view2 (3,S,S), coords1 (N,2), coords2 (N,2))``, plus
    ``(student_view1, student_view2)`` when ``student_augs`` is given.

    Args:
        img_size: side S of both (square) global views; a multiple of ``patch_size``.
        scale: RandomResizedCrop area range, as a fraction of the image (CrIBo: (0.25, 1.0)).
        patch_size: ViT patch size p; N = (S/p)^2 coordinates per view.
        photometric: apply DINO's photometric augmentations (default). ``False`` keeps only the
            crop and flip (for visualisation and tests of the geometry).
        view1_aug, view2_aug: the photometric changes of view 1 and view 2 (:data:`AUGMENTATIONS`).
        student_augs: asymmetric views (``train.py --student-augment``): each view is also returned
            with these photometric changes, drawn independently, on the SAME crop and flip, for the
            student; the teacher (clustering, targets) sees ``view1/view2``. None: one set of views.
        rotate: turn each view's crop window by an angle drawn uniformly in +-``rotate`` degrees
            (``train.py --rotate``; 0: CrIBo's axis-aligned crops, and no angle is drawn).
    """

    def __init__(
        self,
        img_size: int = 224,
        scale: tuple[float, float] = (0.25, 1.0),
        patch_size: int = 16,
        *,
        photometric: bool = True,
        view1_aug: ViewAugmentation = VIEW1_AUG,
        view2_aug: ViewAugmentation = VIEW2_AUG,
        student_augs: tuple[ViewAugmentation, ViewAugmentation] | None = None,
        rotate: float = 0.0,
    ) -> None:
        if img_size <= 0 or patch_size <= 0 or img_size % patch_size:
            raise ValueError(
                f"img_size={img_size} must be a positive multiple of patch_size={patch_size}"
            )
        if not (0.0 < scale[0] <= scale[1] <= 1.0):
            raise ValueError(f"scale={scale} must satisfy 0 < min <= max <= 1")
        if not 0.0 <= rotate <= 180.0:
            raise ValueError(f"rotate={rotate} must be an angle in degrees in [0, 180]")
        self.img_size = img_size
        self.patch_size = patch_size
        self.scale = (float(scale[0]), float(scale[1]))
        self.photometric = photometric
        self.view_augs = (view1_aug, view2_aug)
        self.student_augs = student_augs
        self.rotate = float(rotate)

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    def sample(self, img: Image.Image, generator: torch.Generator | None = None) -> TwoViews:
        """Draw two views of ``img``; all randomness from ``generator`` (global torch RNG if None)."""
        if not isinstance(img, Image.Image):
            raise TypeError(f"TwoViewTransform expects a PIL image, got {type(img).__name__}")
        if img.mode != "RGB":
            img = img.convert("RGB")
        width, height = img.size
        views, coords, params, s_views, s_params = [], [], [], [], []
        for k, aug in enumerate(self.view_augs):
            p = draw_view_params(height, width, self.scale, aug, generator)
            if self.rotate > 0:
                p = dataclasses.replace(p, angle=_uniform(-self.rotate, self.rotate, generator))
            if aug.recolour_shared and params:  # the second view repainted as the first
                p = dataclasses.replace(p, recolour=params[0].recolour)
            geo = apply_geometry(img, p.box, p.flip, self.img_size, p.angle)
            views.append(to_normalized_tensor(apply_photometric(geo, p) if self.photometric else geo))
            coords.append(patch_centres(p.box, p.flip, self.img_size, self.patch_size, p.angle))
            params.append(p)
            if self.student_augs is not None:
                # The student's photometric draw; its crop, flip and turn are replaced by the teacher's.
                ps = dataclasses.replace(draw_view_params(height, width, self.scale, self.student_augs[k], generator),
                                         box=p.box, flip=p.flip, angle=p.angle)
                s_views.append(to_normalized_tensor(apply_photometric(geo, ps) if self.photometric else geo))
                s_params.append(ps)
        student = dict(student_view1=s_views[0], student_view2=s_views[1],
                       student_params1=s_params[0], student_params2=s_params[1]) if s_views else {}
        return TwoViews(
            view1=views[0], view2=views[1], coords1=coords[0], coords2=coords[1],
            params1=params[0], params2=params[1], image_size=(width, height), **student,
        )

    def __call__(self, img: Image.Image) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.sample(img).as_tuple()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(img_size={self.img_size}, scale={self.scale}, "
            f"patch_size={self.patch_size}, photometric={self.photometric}, "
            f"asymmetric={self.student_augs is not None}, rotate={self.rotate})"
        )

"""Data for samnorm: pseudo-OOD generation and offline image sets.

Submodules load lazily (PEP 562), so ``import samnorm.data`` costs nothing until a name is used:

* :mod:`samnorm.data.pseudo_ood`: :class:`PseudoOOD` and its transforms, ``save_example_grid``.
* :mod:`samnorm.data.folders`: ``ImageFolder`` (PIL only; skips and counts unreadable files) and
  ``ImageTransform`` / ``transform_for_model`` (resize, centre crop, normalise).
* :mod:`samnorm.data.offline`: real image sets shipped inside Python packages (MNIST digits as ID;
  textures, photos, faces and noise as OOD), for the demo and tests.

Example:
    >>> import torch, samnorm.data
    >>> samnorm.data.PseudoOOD(seed=0)(torch.rand(2, 1, 28, 28)).shape
    torch.Size([2, 1, 28, 28])
"""

from __future__ import annotations

from samnorm.utils.lazy import lazy_exports

# name -> submodule that defines it
_EXPORTS: dict[str, str] = {
    **{
        name: "pseudo_ood"
        for name in (
            "PseudoOOD",
            "Jigsaw",
            "PatchMix",
            "Rotate",
            "Blur",
            "Noise",
            "FourierMix",
            "TRANSFORMS",
            "default_transforms",
            "pick_partners",
            "partner_images",
            "save_example_grid",
        )
    },
    **{name: "folders" for name in ("IMG_EXTENSIONS", "ImageFolder", "ImageTransform", "transform_for_model")},
    **{
        name: "offline"
        for name in (
            "MNIST_SPLITS",
            "OOD_SETS",
            "heldout_patches",
            "lfw_faces",
            "load_ood_sets",
            "mnist_digits",
            "noise_images",
            "photo_patches",
            "texture_patches",
        )
    },
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

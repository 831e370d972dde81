"""Notices new model classes: every model class of the running ComfyUI (each subclass of
comfy.model_base.BaseModel, and each class a model config of comfy.supported_models builds) must
be a row of the family table, refused with a reason, listed as video / audio / 3D, or listed as an
image class of the self-checked path (siso_ops/families.py). Run against a newer ComfyUI
(``make test COMFYUI_DIR=...``), a failure here names the classes it added."""
import inspect
import re

import comfy.model_base
import comfy.supported_models
from conftest import siso

families = siso("siso_ops.families")


def _comfyui_model_classes() -> set:
    found, stack = set(), [comfy.model_base.BaseModel]
    while stack:
        cls = stack.pop()
        if cls.__module__.startswith("comfy.") and cls.__name__ not in found:
            found.add(cls.__name__)
        stack.extend(cls.__subclasses__())
    return {name for name in found}


def _config_model_classes() -> dict:
    """{config name: the model_base classes its get_model builds}, read from its source."""
    out = {}
    for config in comfy.supported_models.models:
        get_model = next(vars(c)["get_model"] for c in config.__mro__ if "get_model" in vars(c))
        out[config.__name__] = set(re.findall(r"model_base\.(\w+)\(", inspect.getsource(get_model)))
    return out


def _listed() -> dict:
    table = {c for f in families.FAMILIES for c in f.model_classes}
    not_image = {c for names in families.NOT_IMAGE.values() for c in names}
    return {"table": table, "refused": set(families.REFUSED), "video/audio/3D": not_image,
            "self-checked": set(families.SELF_CHECKED)}


def test_every_model_class_of_this_comfyui_is_supported_self_checked_or_refused_with_a_reason():
    listed = set().union(*_listed().values())
    configs = _config_model_classes()
    assert all(configs.values()), [name for name, classes in configs.items() if not classes]
    classes = _comfyui_model_classes() | set().union(*configs.values())
    new = sorted(classes - listed)
    assert not new, (f"ComfyUI has model classes siso_ops/families.py does not know: {new}. Give each a row (with a "
                     "tiny-model test), a REFUSED reason, a NOT_IMAGE entry or a SELF_CHECKED entry")


def test_each_class_is_in_one_list_only_and_every_refusal_says_why():
    lists = _listed()
    names = list(lists)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not lists[a] & lists[b], (a, b, lists[a] & lists[b])
    assert all(len(reason) > 20 for reason in families.REFUSED.values())
    assert all(len(what) > 20 for what in families.SELF_CHECKED.values())
    # a listed subclass names its row's class, and its words say which (test_self_checked holds the
    # ancestry to the host's on tiny models of the classes)
    for name, parent in families.SELF_CHECKED_ROWS.items():
        assert name in families.SELF_CHECKED and families.family_of(parent) is not None, (name, parent)
        assert families.SELF_CHECKED[name].startswith(f"subclass of {parent}:"), (name, families.SELF_CHECKED[name])
    for name, what in families.SELF_CHECKED.items():
        parent = what.split(":")[0].removeprefix("subclass of ") if what.startswith("subclass of ") else None
        if parent is not None and families.family_of(parent) is not None:
            assert families.SELF_CHECKED_ROWS.get(name) == parent, (name, what)


def test_configs_of_the_video_audio_and_3d_classes_make_no_image_latents_unless_named_here():
    """NOT_IMAGE is refused by name whatever the latent; most of its configs also have a latent
    that is not an image's (the run-time rule for unlisted classes). The exceptions make 2-D
    latents of something else: stacks of video frames (SVD, SV3D), 3D structure latents
    (Trellis 2, TripoSplat) and ACE-Step's audio spectrogram latent."""
    not_image = {c for names in families.NOT_IMAGE.values() for c in names}
    two_d = set()
    for config in comfy.supported_models.models:
        get_model = next(vars(c)["get_model"] for c in config.__mro__ if "get_model" in vars(c))
        built = set(re.findall(r"model_base\.(\w+)\(", inspect.getsource(get_model)))
        if built & not_image and getattr(config.latent_format, "latent_dimensions", 2) == 2:
            two_d |= built & not_image
    assert two_d <= {"SVD_img2vid", "SV3D_u", "SV3D_p", "Trellis2", "TripoSplat", "ACEStep"}, two_d


def test_a_class_missing_from_the_lists_is_noticed(monkeypatch):
    """The check can fail: with LongCat-Image (0.33) or HunyuanDiT (0.3.75) taken out of every list, it names it."""
    classes = _comfyui_model_classes()
    assert len(classes) >= 40 and {"Flux", "SDXL", "WAN21"} <= classes, sorted(classes)
    gone = "LongCatImage" if "LongCatImage" in classes else "HunyuanDiT"
    # a copy without it (deleting and putting back would move it in the dict, and docs/models.md's table with it)
    monkeypatch.setattr(families, "SELF_CHECKED", {k: v for k, v in families.SELF_CHECKED.items() if k != gone})
    try:
        test_every_model_class_of_this_comfyui_is_supported_self_checked_or_refused_with_a_reason()
    except AssertionError as error:
        assert f"['{gone}']" in str(error)
    else:
        raise AssertionError("a class in no list went unnoticed")

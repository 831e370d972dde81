"""SISO Optimize's ``auto`` settings: width, height, steps, grad_steps and learning_rate at 0
take the loaded model's family row (families.py), and the run says which values it used and
where each came from (the report and the log).

0 stands for auto because ComfyUI's INT / FLOAT widgets hold numbers only, and 0 is never a
valid value of these inputs (a 0-pixel image, 0 steps, a 0 learning rate), so it cannot collide
with a value someone set; a saved workflow or an API prompt with a number keeps that number."""
from __future__ import annotations

from dataclasses import replace

from .families import EDIT_LEARNING_RATE, Family

AUTO = 0


def _source(family: Family) -> str:
    """Where a family's auto values come from, in the user's words."""
    variant = f", {family.variant}" if family.variant else ""   # families.for_config: what the file showed
    if not family.checked:
        return f"auto: the {family.name} family row{variant}"
    if family.checked.startswith("a subclass"):     # inherited_family: its parent's row
        return f"auto: {family.checked}{variant}"
    return f"auto: the generic default for a class with no table row ({family.model_classes[0]})"


def resolve(settings, family: Family, inversion=None):
    """(the settings with every auto value replaced, the report's words for the values used).

    ``settings``: a GenerationSettings. When editing (``inversion``: a PhotoInversion), size and
    steps come from the inversion whatever the inputs say (as before auto existed), grad_steps'
    auto is the row's capped at those steps, and learning_rate's auto is the paper's editing rate."""
    row = _source(family)
    used = []
    if inversion is not None:
        height, width = inversion.size
        steps = len(inversion.sigmas) - 1
        used += [(f"{width}x{height} px", "from the inversion"), (f"steps {steps}", "from the inversion")]
    else:
        width, height = (family.size if settings.width == AUTO else settings.width,
                         family.size if settings.height == AUTO else settings.height)
        if settings.width == AUTO and settings.height == AUTO:
            used.append((f"{width}x{height} px", row))
        else:
            used += [(f"width {width}", row if settings.width == AUTO else "set"),
                     (f"height {height}", row if settings.height == AUTO else "set")]
        steps = family.steps if settings.steps == AUTO else settings.steps
        used.append((f"steps {steps}", row if settings.steps == AUTO else "set"))
    grad_steps = settings.grad_steps
    if grad_steps == AUTO:
        grad_steps = min(family.grad_steps, steps)
        capped = f", capped at the {steps} steps" if grad_steps < family.grad_steps else ""
        used.append((f"grad_steps {grad_steps}", row + capped))
    else:
        used.append((f"grad_steps {grad_steps}", "set"))
    rate = settings.optimization.learning_rate
    if rate == AUTO:
        editing = inversion is not None
        rate = EDIT_LEARNING_RATE if editing else family.learning_rate
        used.append((f"learning_rate {rate:g}", "auto: the paper's editing rate" if editing else row))
    else:
        used.append((f"learning_rate {rate:g}", "set"))
    resolved = replace(settings, width=width, height=height, steps=steps, grad_steps=grad_steps,
                       optimization=replace(settings.optimization, learning_rate=rate))
    return resolved, describe(used)


def describe(used: list) -> str:
    """"768x768 px, steps 8, grad_steps 1, learning_rate 0.0002 (auto: the ... family row)":
    (value, source) pairs, neighbours of the same source under one note."""
    groups = []
    for value, source in used:
        if groups and groups[-1][1] == source:
            groups[-1][0].append(value)
        else:
            groups.append(([value], source))
    return "; ".join(f"{', '.join(values)} ({source})" for values, source in groups)


def size_off_block(name: str, value: int, block: int, why: str = "", auto: bool = False) -> str | None:
    """The refusal of a width or height ``value`` that is not a multiple of the VAE's ``block``
    (pixels per latent cell), with the two nearest sizes that are; None when it is one. ``why``:
    whose block it is; ``auto``: also offer 0 (auto: the family's size)."""
    if value % block == 0:
        return None
    lower = value - value % block
    because = f"{why}; " if why else ""
    return (f"{name} {value} is not a multiple of {block}: {because}use {lower} or {lower + block}"
            + (", or 0 (auto)" if auto else ""))

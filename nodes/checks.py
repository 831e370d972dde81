"""One place that checks every input of the pack's nodes against what their schema declares.

Why the pack checks what ComfyUI could: ComfyUI 0.3.75 skips its own min/max and dropdown
checks for every input of a node whose ``validate_inputs`` takes ``**kwargs`` (the V3 path),
does not check V3 dropdowns at all, lets NaN through every limit (NaN < min and NaN > max are
both false), and never validates a value that arrives through a link. So each node here:

- declares its limits once, in its schema (min, max, options); ``schema_problem`` reads them
  back from ``define_schema()`` at check time, so the check and the widgets cannot drift apart;
- adds what the schema cannot say in ``check_values`` (width a multiple of 8, start < end...);
- runs both at queue time on the prompt as it arrived (``queue_check``, before ComfyUI casts
  ``"false"`` to True), and again when it executes (``@checked``), where linked values arrive and
  IMAGE / MASK tensors are checked for NaN and infinite values, before any work.

The queue-time half (the prompt as it arrives, rewritten) is in queue_checks.py.
"""
from __future__ import annotations

import functools
import inspect
import math
import numbers

import torch
from comfy_api.v0_0_2 import io

from ..siso_ops import host


class InputError(ValueError):
    """A node input is out of its limits, not a number, or not one of its choices."""


def _number_text(value) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value) if isinstance(value, float) else str(value)


def _limits_text(spec) -> str:
    low, high = getattr(spec, "min", None), getattr(spec, "max", None)
    if low is not None and high is not None:
        return f"between {_number_text(low)} and {_number_text(high)}"
    return f"at least {_number_text(low)}" if low is not None else f"at most {_number_text(high)}"


def _number_problem(name: str, spec, value, integer: bool) -> str | None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return f"{name} must be a number, got {value!r} ({type(value).__name__})"
    if integer and not float(value).is_integer():
        return f"{name} must be a whole number, got {value!r}"
    if not math.isfinite(float(value)):
        return f"{name} is {value!r}, not a number: use a value {_limits_text(spec)}"
    low, high = getattr(spec, "min", None), getattr(spec, "max", None)
    if low is not None and value < low:
        return f"{name} = {_number_text(value)} is below its minimum {_number_text(low)}: use a value {_limits_text(spec)}"
    if high is not None and value > high:
        return f"{name} = {_number_text(value)} is above its maximum {_number_text(high)}: use a value {_limits_text(spec)}"
    return None


def _choice_problem(name: str, options, value) -> str | None:
    if value in options:
        return None
    shown = list(options) if len(options) <= 12 else list(options[:12]) + ["..."]
    return f"{name}: {value!r} is not one of its choices {shown}"


def _tensor_problem(name: str, value) -> str | None:
    if isinstance(value, torch.Tensor) and value.dim() >= 3 and value.shape[0] == 0:
        return (f"{name} is an empty batch (0 images or masks): the node that made it gave nothing; "
                "connect at least one")
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel():
        finite = torch.isfinite(value)
        if not bool(finite.all()):
            bad = int((~finite).sum())
            return (f"{name} holds {bad} NaN or infinite value{'s' if bad != 1 else ''} (of {value.numel()}): "
                    "the node that made it went wrong; fix or replace that input")
    return None


class _Linked:
    """What a connected input holds before it runs (at queue time and in ComfyUI's validation,
    which hands a linked input on as None): known to be connected, its value not yet made."""

    def __repr__(self):
        return "<linked>"


LINKED = _Linked()


def schema_inputs(node) -> dict:
    """Input id -> its schema entry, read from the node's schema now (file dropdowns included)."""
    return {spec.id: spec for spec in node.define_schema().inputs}


def schema_problem(node, values: dict, linked=()) -> str | None:
    """The first input of ``values`` that breaks its schema, as a message naming it; None if all
    hold. Inputs absent from ``values`` (linked, or optional and unset) are not checked."""
    return next((problem for _, problem in schema_problems(node, values, linked)), None)


def _boolean_problem(name: str, value) -> str | None:
    # JSON true / false only: ComfyUI's own cast makes bool("false") and bool("no") True, and a
    # boolean such as overwrite guards files.
    if isinstance(value, bool):
        return None
    return (f"{name} must be true or false (a JSON boolean), got {value!r} ({type(value).__name__}): "
            "send true or false without quotes")


def schema_problems(node, values: dict, linked=()):
    """(input, message) for each input of ``values`` that breaks its schema. ``linked``: the
    inputs known to be connected, which a ``CHOICE_CHECKS`` entry sees as ``LINKED``."""
    seen = dict(values, **{name: LINKED for name in linked})
    for name, spec in schema_inputs(node).items():
        if name not in values or values[name] is None:
            continue
        value = values[name]
        legacy = getattr(node, "LEGACY_CHOICES", {}).get(name, {})
        if isinstance(spec, io.Combo.Input):
            if isinstance(value, (str, bool, int)) and not isinstance(value, float) and value in legacy:
                continue
            custom = getattr(node, "CHOICE_CHECKS", {}).get(name)
            problem = custom(value, seen) if custom is not None else _choice_problem(name, spec.options, value)
        elif isinstance(spec, io.Int.Input):
            problem = _number_problem(name, spec, value, integer=True)
        elif isinstance(spec, io.Float.Input):
            problem = _number_problem(name, spec, value, integer=False)
        elif isinstance(spec, io.Boolean.Input):
            problem = _boolean_problem(name, value)
        elif isinstance(spec, io.String.Input):
            problem = None if isinstance(value, str) else f"{name} must be text, got {type(value).__name__}"
        else:
            problem = _tensor_problem(name, value)
        if problem:
            yield name, problem


def _bound_values(execute, cls, args, kwargs) -> dict:
    bound = inspect.signature(execute).bind(cls, *args, **kwargs)
    bound.apply_defaults()
    values = dict(bound.arguments)
    values.pop("cls", None)
    return values


def problem_for(node, values: dict, linked=()) -> str | None:
    return schema_problem(node, values, linked) or node.check_values(**dict(values, **{n: LINKED for n in linked}))


def file_choice(name: str, resolve, unused_when=None):
    """A ``CHOICE_CHECKS`` entry for a file dropdown: ``resolve(value)``'s own message (which
    folder, which file name is expected) in place of "not one of its choices". ``unused_when(
    values)`` true: the file is not used with these values, so it is not asked for."""
    def check(value, values):
        if unused_when is not None and unused_when(values):
            return None
        if not isinstance(value, str):
            return f"{name} must be a file name, got {value!r}"
        try:
            resolve(value)
        except ValueError as error:
            return f"{name}: {error}"
        return None
    return check


class CheckedNode(io.ComfyNode):
    """Base of the pack's nodes: ``validate_inputs`` runs the schema check plus the node's own
    ``check_values``; decorate ``execute`` with ``@checked`` to run both again on the values
    it really receives."""

    # input id -> {legacy value: what it means}: values of workflows saved before an input
    # became a dropdown (e.g. low_memory true/false), accepted as they were
    LEGACY_CHOICES: dict = {}
    # input id -> function(value, all values) -> message or None, in place of "not one of its
    # choices" (file dropdowns say which folder and which file name is expected)
    CHOICE_CHECKS: dict = {}

    @classmethod
    def check_values(cls, **values) -> str | None:
        """What the schema cannot declare; values may be missing (linked) or None (unset)."""
        return None

    @classmethod
    def check_prompt(cls, prompt: dict, node_id: str) -> dict:
        """{input: message} for what only the whole prompt shows at queue time (e.g. the sizes of
        the images two links come from); checked again when the node runs."""
        return {}

    @classmethod
    def validate_inputs(cls, **values):
        # values queue_check refused are reported by ComfyUI under their input already
        values = {k: v for k, v in values.items() if not isinstance(v, host.RefusedValue)}
        # ComfyUI hands a connected input on as None here; an unconnected optional one is absent
        linked = [k for k, v in values.items() if v is None]
        return problem_for(cls, values, linked) or True


def checked(execute):
    """``execute`` wrapper: refuses what ``validate_inputs`` would refuse, for linked values
    too, and NaN / infinite IMAGE and MASK tensors, before the node does any work."""
    @functools.wraps(execute)
    def run(cls, *args, **kwargs):
        values = _bound_values(execute, cls, args, kwargs)
        problem = problem_for(cls, values)
        if problem:
            raise InputError(f"{cls.define_schema().display_name or cls.__name__}: {problem}")
        return execute(cls, *args, **kwargs)
    return run

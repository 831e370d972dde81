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

One refusal, under the input it is about, once: ComfyUI reports whatever ``validate_inputs``
returns under EVERY input the function receives (with ``**kwargs``, all of them). So the pack
checks each prompt in an on-prompt handler (``PromptServer.add_on_prompt_handler``, which runs
before validation) and puts a ``RefusedValue`` in place of each refused value: ComfyUI's own
per-input unwrapping of a widget value (``"__value__" in value``, both 0.3.75 and 0.33) raises
our message, which ComfyUI reports once, under that input ("Failed to convert an input value").
A value from a stock Primitive node is a constant and is checked there too.
"""
from __future__ import annotations

import functools
import inspect
import math
import numbers

import torch
from comfy_api.v0_0_2 import io


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


def schema_inputs(node) -> dict:
    """Input id -> its schema entry, read from the node's schema now (file dropdowns included)."""
    return {spec.id: spec for spec in node.define_schema().inputs}


def schema_problem(node, values: dict) -> str | None:
    """The first input of ``values`` that breaks its schema, as a message naming it; None if all
    hold. Inputs absent from ``values`` (linked, or optional and unset) are not checked."""
    return next((problem for _, problem in schema_problems(node, values)), None)


def _boolean_problem(name: str, value) -> str | None:
    # JSON true / false only: ComfyUI's own cast makes bool("false") and bool("no") True, and a
    # boolean such as overwrite guards files.
    if isinstance(value, bool):
        return None
    return (f"{name} must be true or false (a JSON boolean), got {value!r} ({type(value).__name__}): "
            "send true or false without quotes")


def schema_problems(node, values: dict):
    """(input, message) for each input of ``values`` that breaks its schema."""
    for name, spec in schema_inputs(node).items():
        if name not in values or values[name] is None:
            continue
        value = values[name]
        legacy = getattr(node, "LEGACY_CHOICES", {}).get(name, {})
        if isinstance(spec, io.Combo.Input):
            if isinstance(value, (str, bool, int)) and not isinstance(value, float) and value in legacy:
                continue
            custom = getattr(node, "CHOICE_CHECKS", {}).get(name)
            problem = custom(value, values) if custom is not None else _choice_problem(name, spec.options, value)
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


def problem_for(node, values: dict) -> str | None:
    return schema_problem(node, values) or node.check_values(**values)


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
        values = {k: v for k, v in values.items() if not isinstance(v, RefusedValue)}
        return problem_for(cls, values) or True


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


# ----------------------------------------------------------------------------- queue time, once per input
class RefusedValue(dict):
    """Stands in the prompt for a widget value the pack refused at queue time. ComfyUI's
    validation asks every widget value ``"__value__" in value`` inside its per-input
    try/except; here that raises the pack's message, which ComfyUI reports once, under this
    input. A dict, so the 400 answer (which echoes the value) stays JSON."""

    def __init__(self, value=None, message=""):
        super().__init__(value=value, refused=message)

    def __contains__(self, key):
        raise InputError(dict.__getitem__(self, "refused"))

    def __repr__(self):
        return repr(dict.get(self, "value"))

    __str__ = __repr__

    def __format__(self, spec):
        return repr(self)


# Stock nodes whose output is their own widget ``value``: a constant, known at queue time.
PRIMITIVES = {"PrimitiveInt", "PrimitiveFloat", "PrimitiveString", "PrimitiveStringMultiline", "PrimitiveBoolean"}


def _as_comfyui_casts(spec, value):
    """The widget value as ComfyUI's validation hands it on (int(), float(), str()); booleans
    are kept as sent, to be checked strictly. Raises what ComfyUI's own cast would."""
    if isinstance(value, dict) and "__value__" in value:
        value = value["__value__"]
    if isinstance(spec, io.Int.Input):
        return int(value)
    if isinstance(spec, io.Float.Input):
        return float(value)
    if isinstance(spec, io.String.Input):
        return str(value)
    return value


def _constant(prompt: dict, value):
    """(True, value) for a widget value or a link from a stock Primitive node; (False, None) else."""
    if not isinstance(value, list):
        return True, value
    source = prompt.get(value[0]) if len(value) == 2 and isinstance(value[0], str) else None
    if isinstance(source, dict) and source.get("class_type") in PRIMITIVES:
        inner = source.get("inputs", {}).get("value")
        if inner is not None and not isinstance(inner, list):
            return True, inner
    return False, None


def _input_named_by(message: str, names) -> str | None:
    """The input a ``check_values`` message is about: the one it starts with, else the first it names."""
    starting = [n for n in names if message.startswith(n)]
    if starting:
        return max(starting, key=len)
    return next((n for n in names if f"{n} " in message or f"{n}:" in message), None)


def node_refusals(node, prompt: dict, inputs: dict) -> dict:
    """{input: message} for the constant inputs of one node of a prompt that the pack refuses."""
    specs = schema_inputs(node)
    values, sent = {}, {}
    for name, raw in inputs.items():
        if name not in specs:
            continue
        known, value = _constant(prompt, raw)
        if not known:
            continue
        try:
            values[name] = _as_comfyui_casts(specs[name], value)
        except Exception:
            continue   # ComfyUI refuses it itself ("Failed to convert an input value")
        sent[name] = value
    refusals = dict(schema_problems(node, values))
    remaining = {k: v for k, v in values.items() if k not in refusals}
    problem = node.check_values(**remaining)
    if problem:
        name = _input_named_by(problem, list(remaining)) or next(iter(remaining), None)
        if name is not None:
            refusals[name] = problem
    return {name: (message, sent[name]) for name, message in refusals.items()}


def linked_image_size(prompt: dict, link, size_of_file) -> tuple | None:
    """(width, height) of the IMAGE or MASK a link carries, where the prompt tells it before it runs:
    LoadImage's image or mask (its file's size), SISO Subject Mask's masks (its photo's); else None."""
    if not (isinstance(link, list) and len(link) == 2 and isinstance(prompt.get(link[0]), dict)):
        return None
    source = prompt[link[0]]
    inputs = source.get("inputs", {})
    if source.get("class_type") == "LoadImage" and link[1] in (0, 1) and isinstance(inputs.get("image"), str):
        return size_of_file(inputs["image"])
    if source.get("class_type") == "SubjectMask" and link[1] == 0:
        return linked_image_size(prompt, inputs.get("image"), size_of_file)
    return None


def queue_check(pack_nodes):
    """An on-prompt handler: marks each refused constant input of the pack's nodes (see the module
    docstring). Never raises: ComfyUI would only log it and queue the prompt unchecked."""
    by_id = {node.define_schema().node_id: node for node in pack_nodes}

    def check(json_data):
        try:
            prompt = json_data.get("prompt") if isinstance(json_data, dict) else None
            if not isinstance(prompt, dict):
                return json_data
            for key, entry in prompt.items():
                node = by_id.get(entry.get("class_type")) if isinstance(entry, dict) else None
                if node is None or not isinstance(entry.get("inputs"), dict):
                    continue
                refusals = node_refusals(node, prompt, entry["inputs"])
                for name, message in node.check_prompt(prompt, key).items():
                    refusals.setdefault(name, (message, entry["inputs"].get(name)))
                for name, (message, value) in refusals.items():
                    entry["inputs"][name] = RefusedValue(value, message)
        except Exception:   # a check that fails must not stop the prompt: execute checks again
            import logging
            logging.getLogger(__name__).exception("SISO: the queue-time input check failed")
        return json_data
    return check


def register_queue_check(pack_nodes):
    """Adds ``queue_check`` to the running server once (no server: in-process tests)."""
    from ..siso_ops import host
    host.add_prompt_check(queue_check(pack_nodes))

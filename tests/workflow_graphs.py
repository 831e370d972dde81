"""The example workflows, described once in Python, and the two conversions the tests and
`make workflows` need:

- ``build_ui(workflow, object_info)``: the UI-format JSON (what users drag into ComfyUI and what
  the template browser lists), with widgets in the order the server's /object_info defines;
- ``ui_to_api(ui, object_info)``: what the frontend's "Save (API)" produces from it; the API
  twin under tests/workflows is that plus ``test_overrides`` (tiny files and sizes).

The server tests rebuild both from the running server's /object_info and compare them with
the committed files, so a workflow can never drift from the nodes it uses."""
from __future__ import annotations

import copy
import importlib.util
import pathlib
import sys
import uuid
from dataclasses import dataclass, field, replace


def _families():
    """siso_ops/families.py on its own (torch only), so `make workflows` needs no ComfyUI for it."""
    name = "siso_families_for_workflows"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, pathlib.Path(__file__).parents[1] / "siso_ops" / "families.py")
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}


@dataclass
class Node:
    id: int
    type: str
    pos: tuple
    size: tuple = (320, 120)
    widgets: dict = field(default_factory=dict)        # widget name -> value (others: server defaults)
    links: dict = field(default_factory=dict)          # input name -> (source node id, output slot)
    title: str | None = None
    color: str | None = None                           # "#232" green (positive), "#322" red (negative)
    mode: int = 0                                      # litegraph's mode: 0 always, 2 never (muted), 4 bypass


@dataclass
class Workflow:
    name: str                     # file stem in example_workflows/
    note: str                     # the "Read me" note: which file goes where
    nodes: list
    groups: list = field(default_factory=list)           # (title, x, y, w, h, color)
    test_overrides: dict = field(default_factory=dict)   # node id -> {input: value} for the API twin
    note_size: tuple = (780, 300)


# ----------------------------------------------------------------------------- widgets
def widget_slots(info: dict) -> list:
    """(name, kind, options) in widgets_values order, with the entries the frontend adds
    (a seed's control_after_generate, an image's upload button)."""
    out = []
    for category in ("required", "optional"):
        for name in info.get("input_order", {}).get(category, []):
            spec = info["input"][category][name]
            kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
            if isinstance(kind, list):
                kind, options = "COMBO", dict(options, options=kind)
            if kind not in WIDGET_TYPES or options.get("forceInput"):
                continue
            out.append((name, kind, options))
            if options.get("control_after_generate"):
                out.append((f"{name}:control_after_generate", "CONTROL", {}))
            if options.get("image_upload") or options.get("upload"):
                out.append((f"{name}:upload", "UPLOAD", {}))
    return out


def _default(name, kind, options):
    if kind == "CONTROL":
        return "fixed"
    if kind == "UPLOAD":
        return "image"
    if "default" in options:
        return options["default"]
    if kind == "COMBO":
        return options["options"][0] if options.get("options") else ""
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}[kind]


def _socket_inputs(info: dict) -> list:
    """(name, type) of the inputs that are sockets (not widgets), required then optional."""
    out = []
    for category in ("required", "optional"):
        for name in info.get("input_order", {}).get(category, []):
            spec = info["input"][category][name]
            kind = spec[0]
            options = spec[1] if len(spec) > 1 else {}
            if isinstance(kind, list) or (kind in WIDGET_TYPES and not options.get("forceInput")):
                continue
            out.append((name, kind))
    return out


# ----------------------------------------------------------------------------- UI format
def build_ui(workflow: Workflow, object_info: dict) -> dict:
    nodes, links = [], []
    by_id = {n.id: n for n in workflow.nodes}
    outgoing = {}
    for node in workflow.nodes:
        info = object_info[node.type]
        sockets = dict(_socket_inputs(info))
        # a widget fed by a link (the frontend's widget input: a socket named after the widget)
        sockets.update({name: kind for name, kind, _ in widget_slots(info) if name in node.links and name not in sockets})
        for name, (src, slot) in node.links.items():
            if name not in sockets:
                raise ValueError(f"{workflow.name}: node {node.id} {node.type} has no socket input '{name}'")
            kind = object_info[by_id[src].type]["output"][slot]
            if kind != sockets[name] and sockets[name] != "*":
                raise ValueError(f"{workflow.name}: {by_id[src].type} output {slot} is {kind}, {node.type}.{name} wants {sockets[name]}")
            links.append([len(links) + 1, src, slot, node.id, name, kind])
            outgoing.setdefault((src, slot), []).append(len(links))
    order = _topological_order(workflow)
    for node in workflow.nodes:
        info = object_info[node.type]
        unknown = set(node.widgets) - {w[0] for w in widget_slots(info)}
        if unknown:
            raise ValueError(f"{workflow.name}: node {node.id} {node.type} has no widgets {sorted(unknown)}")
        values = [node.widgets.get(name, _default(name, kind, options)) for name, kind, options in widget_slots(info)]
        inputs = []
        for name, kind in _socket_inputs(info):
            link = next((l[0] for l in links if l[3] == node.id and l[4] == name), None)
            inputs.append({"name": name, "type": kind, "link": link})
        for name, kind, _ in widget_slots(info):
            link = next((l[0] for l in links if l[3] == node.id and l[4] == name), None)
            if link is not None:      # its value still has its place in widgets_values
                inputs.append({"name": name, "type": kind, "widget": {"name": name}, "link": link})
        outputs = []
        for slot, (kind, name) in enumerate(zip(info["output"], info.get("output_name", info["output"]))):
            outputs.append({"name": name, "type": kind, "slot_index": slot, "links": outgoing.get((node.id, slot))})
        entry = {"id": node.id, "type": node.type, "pos": list(node.pos), "size": list(node.size), "flags": {},
                 "order": order[node.id], "mode": node.mode, "inputs": inputs, "outputs": outputs,
                 "properties": {"Node name for S&R": node.type}, "widgets_values": values}
        if node.title:
            entry["title"] = node.title
        if node.color:
            entry["color"], entry["bgcolor"] = node.color, {"#232": "#353", "#322": "#533"}.get(node.color, node.color)
        models = model_downloads(node, workflow.name)
        if models:
            entry["properties"]["models"] = models
        nodes.append(entry)
    note_id = max(by_id) + 1
    nodes.append({"id": note_id, "type": "Note", "pos": [min(n.pos[0] for n in workflow.nodes), min(n.pos[1] for n in workflow.nodes) - workflow.note_size[1] - 80],
                  "size": list(workflow.note_size), "flags": {}, "order": len(workflow.nodes), "mode": 0, "inputs": [],
                  "outputs": [], "properties": {"text": ""}, "widgets_values": [workflow.note],
                  "title": "Read me: files and how it works", "color": "#432", "bgcolor": "#653"})
    # links in UI format carry the input's slot index, not its name
    slot_of = {n["id"]: {i["name"]: k for k, i in enumerate(n["inputs"])} for n in nodes}
    ui_links = [[lid, src, slot, dst, slot_of[dst][name], kind] for lid, src, slot, dst, name, kind in links]
    groups = [{"id": k + 1, "title": title, "bounding": [x, y, w, h], "color": color, "font_size": 24, "flags": {}}
              for k, (title, x, y, w, h, color) in enumerate(workflow.groups)]
    return {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"siso/{workflow.name}")), "revision": 0,
            "last_node_id": note_id, "last_link_id": len(ui_links), "nodes": nodes, "links": ui_links,
            "groups": groups, "config": {}, "extra": {"ds": {"scale": 0.7, "offset": [500, 400]}}, "version": 0.4}


# ----------------------------------------------------------------------------- model downloads
# What ComfyUI's frontend reads for its missing-models dialog (1.32 and 1.49 alike): a node's
# properties.models, a list of {name, url, directory}, of which it keeps the entries whose name is
# one of the node's widget values; a file not found in models/<directory> is listed with its
# folder and a download button (offered for https://huggingface.co/ URLs of .safetensors files).
# Only the official public files: the publishers' own repositories or Comfy-Org's repackaging.
HF = "https://huggingface.co/"
MODEL_FILES = {
    # name: (folder under models/, URL)
    "sd_turbo.safetensors": ("checkpoints", HF + "stabilityai/sd-turbo/resolve/main/sd_turbo.safetensors"),
    # timm's DINOv2 ViT-L/14 (model.safetensors), saved under the name SISO's dropdown expects
    "dinov2_vitl14.safetensors": ("siso", HF + "timm/vit_large_patch14_dinov2.lvd142m/resolve/main/model.safetensors"),
    "z_image_turbo_bf16.safetensors": ("diffusion_models", HF + "Comfy-Org/z_image_turbo/resolve/main/split_files/diffusion_models/z_image_turbo_bf16.safetensors"),
    "qwen_3_4b.safetensors": ("text_encoders", HF + "Comfy-Org/z_image_turbo/resolve/main/split_files/text_encoders/qwen_3_4b.safetensors"),
    "ae.safetensors": ("vae", HF + "Comfy-Org/z_image_turbo/resolve/main/split_files/vae/ae.safetensors"),
    "flux-2-klein-4b.safetensors": ("diffusion_models", HF + "Comfy-Org/flux2-klein/resolve/main/split_files/diffusion_models/flux-2-klein-4b.safetensors"),
    "flux2-vae.safetensors": ("vae", HF + "Comfy-Org/flux2-dev/resolve/main/split_files/vae/flux2-vae.safetensors"),
    "qwen_image_edit_2509_fp8_e4m3fn.safetensors": ("diffusion_models", HF + "Comfy-Org/Qwen-Image-Edit_ComfyUI/resolve/main/split_files/diffusion_models/qwen_image_edit_2509_fp8_e4m3fn.safetensors"),
    "qwen_2.5_vl_7b_fp8_scaled.safetensors": ("text_encoders", HF + "Comfy-Org/Qwen-Image_ComfyUI/resolve/main/split_files/text_encoders/qwen_2.5_vl_7b_fp8_scaled.safetensors"),
    "qwen_image_vae.safetensors": ("vae", HF + "Comfy-Org/Qwen-Image_ComfyUI/resolve/main/split_files/vae/qwen_image_vae.safetensors"),
    "Qwen-Image-Edit-2509-Lightning-4steps-V1.0-bf16.safetensors": ("loras", HF + "lightx2v/Qwen-Image-Lightning/resolve/main/Qwen-Image-Edit-2509/Qwen-Image-Edit-2509-Lightning-4steps-V1.0-bf16.safetensors"),
}
# SISO Subject Mask's checkpoints, from their publishers (Meta's download server, IDEA-Research's
# GitHub release). The frontend lists them with their folder and URL when they are absent but
# offers no download (it downloads only .safetensors files from Hugging Face or Civitai); Grounding
# DINO's config file and its BERT folder are not single files of a node's widget: the notes name them.
SEGMENTATION_DOWNLOADS = {
    "sam_vit_b_01ec64.pth": ("sams", "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth"),
    "groundingdino_swint_ogc.pth": ("grounding-dino", "https://github.com/IDEA-Research/GroundingDINO/releases/download/"
                                                      "v0.1.0-alpha/groundingdino_swint_ogc.pth"),
}
MODEL_FILES.update(SEGMENTATION_DOWNLOADS)
# ComfyUI's own SAM3 (0.22 and later), read by the stock Load Checkpoint: Comfy-Org's repackaging,
# the file ComfyUI's own "Image Segmentation (SAM3)" blueprint names
SAM3_FILE = "sam3.1_multiplex_fp16.safetensors"
MODEL_FILES[SAM3_FILE] = ("checkpoints", HF + "Comfy-Org/sam3.1/resolve/main/checkpoints/" + SAM3_FILE)
# The loaders' file widgets: every one must name a file of MODEL_FILES. SISO's weight inputs carry
# the entry where a public URL exists (DINOv2); the IR file needs a login and is named in the note.
LOADER_WIDGETS = {"CheckpointLoaderSimple": ("ckpt_name",), "UNETLoader": ("unet_name",), "CLIPLoader": ("clip_name",),
                  "VAELoader": ("vae_name",), "LoraLoaderModelOnly": ("lora_name",)}
WEIGHT_WIDGETS = {"SISOOptimize": ("dino_weights",), "SISOSubjectScore": ("dino_weights",)}
SEGMENTATION_WIDGETS = {"SubjectMask": ("sam_model", "grounding_dino_model")}


def model_downloads(node: Node, workflow_name: str = "") -> list:
    """properties.models of a node: one {name, url, directory} per model file its widgets name."""
    out = []
    for name in LOADER_WIDGETS.get(node.type, ()) + WEIGHT_WIDGETS.get(node.type, ()) + SEGMENTATION_WIDGETS.get(node.type, ()):
        value = node.widgets.get(name)
        if value not in MODEL_FILES:
            if node.type in LOADER_WIDGETS:
                raise ValueError(f"{workflow_name}: node {node.id} {node.type}.{name} = {value!r} has no public URL in MODEL_FILES")
            continue
        directory, url = MODEL_FILES[value]
        out.append({"name": value, "url": url, "directory": directory})
    return out


def _topological_order(workflow: Workflow) -> dict:
    done, order = set(), {}
    pending = list(workflow.nodes)
    while pending:
        ready = [n for n in pending if all(src in done for src, _ in n.links.values())]
        if not ready:
            raise ValueError(f"{workflow.name}: the graph has a cycle")
        for n in ready:
            order[n.id] = len(order)
            done.add(n.id)
            pending.remove(n)
    return order


# ----------------------------------------------------------------------------- API format
NEVER, BYPASS = 2, 4     # litegraph's modes the frontend leaves out of the prompt


def _connects(a: str, b: str) -> bool:
    """LiteGraph.isValidConnection for socket types: equal, a wildcard, or a shared type of a list."""
    a, b = str(a), str(b)
    if a == b or a in ("*", "") or b in ("*", ""):
        return True
    return bool(set(a.upper().split(",")) & set(b.upper().split(",")))


def _bypass_input(node: dict, slot: int, wanted: str) -> int:
    """The input of a bypassed node whose upstream value stands in for its output ``slot``, for an
    input of type ``wanted`` (the frontends' rule, ExecutableNodeDTO's bypass slot index in 1.32
    and 1.49): the same-numbered input when its type fits both, else the first input of the wanted
    type, else the first that fits both; -1: none (the input then gets no value). Only socket
    inputs are listed in these files; a widget's input (INT, COMBO, ...) fits no socket type."""
    inputs, out_type = node["inputs"], node["outputs"][slot]["type"]
    if wanted in ("*", ""):
        return slot if len(inputs) > slot else 0
    if slot < len(inputs) and _connects(inputs[slot]["type"], out_type) and _connects(inputs[slot]["type"], wanted):
        return slot
    same = next((k for k, i in enumerate(inputs) if i["type"] == wanted), -1)
    if same != -1:
        return same
    return next((k for k, i in enumerate(inputs) if _connects(i["type"], out_type) and _connects(i["type"], wanted)), -1)


def resolve_link(ui: dict, link_id: int, wanted: str):
    """(source node id, output slot) that an input linked by ``link_id`` gets in the prompt the
    frontend makes (app.graphToPrompt), or None: a muted node gives nothing, a bypassed one hands
    on the value of its matching input (``_bypass_input``) or nothing."""
    nodes = {n["id"]: n for n in ui["nodes"]}
    links = {l[0]: l for l in ui["links"]}
    seen = set()
    while link_id is not None and link_id not in seen:
        seen.add(link_id)
        _, src, slot = links[link_id][:3]
        node = nodes[src]
        mode = node.get("mode", 0)
        if mode == NEVER:
            return None
        if mode != BYPASS:
            return src, slot
        index = _bypass_input(node, slot, wanted)
        if index == -1:
            return None
        link_id, wanted = node["inputs"][index].get("link"), node["inputs"][index]["type"]
    return None


def active_nodes(ui: dict) -> dict:
    """The nodes the frontend puts into the prompt: not frontend-only, not muted, not bypassed."""
    return {n["id"]: n for n in ui["nodes"] if n["type"] not in FRONTEND_ONLY and n.get("mode", 0) not in (NEVER, BYPASS)}


def ui_to_api(ui: dict, object_info: dict, overrides: dict | None = None) -> dict:
    """What the frontend's graphToPrompt makes of the graph: the active nodes, each input linked to
    where its value comes from after muted and bypassed nodes are left out (an input left with no
    source is omitted, as the frontend omits it)."""
    nodes = active_nodes(ui)
    api = {}
    for node_id, node in nodes.items():
        info = object_info[node["type"]]
        inputs = {}
        for (name, kind, _), value in zip(widget_slots(info), node["widgets_values"]):
            if kind not in ("CONTROL", "UPLOAD"):
                inputs[name] = value
        for socket in node["inputs"]:
            if socket.get("link") is not None:
                source = resolve_link(ui, socket["link"], socket["type"])
                if source is not None and source[0] in nodes:
                    inputs[socket["name"]] = [str(source[0]), source[1]]
        api[str(node_id)] = {"class_type": node["type"], "_meta": {"title": node.get("title") or info.get("display_name", node["type"])},
                             "inputs": inputs}
    for node_id, values in (overrides or {}).items():
        api[str(node_id)]["inputs"].update(copy.deepcopy(values))
    return api


# ----------------------------------------------------------------------------- the workflows
TURBO = "sd_turbo.safetensors"
# Without the IR file: ir_weight 0 (the pack's refusal says the same, with the paper's figures)
IR_WAY_OUT = ("Without it, set ir_weight to 0 on the SISO nodes: DINOv2 alone then judges the subject (the paper's "
              "ablation, Table 5: identity kept a little less well, background a little better).\n")
FILES_NOTE = (
    "- models/checkpoints/sd_turbo.safetensors: a turbo checkpoint (SD-Turbo; SDXL-Turbo or Flux schnell also work).\n"
    "- models/siso/dinov2_vitl14.safetensors: DINOv2 ViT-L/14 weights (dinov2_vitl14_pretrain.pth also works).\n"
    "- models/siso/ir_features.pth: the image-retrieval network weights (placed by hand, see the README). " + IR_WAY_OUT)
TINY = {"ckpt_name": "siso_tiny_sd15.safetensors"}
WEIGHTS = {"dino_weights": "dinov2_vitl14.safetensors", "ir_weights": "ir_features.pth"}
# SISO Optimize's size, steps, grad_steps and learning rate are explicit in every template (not 0 =
# auto): each template is made for a named model and its note describes these numbers, and the
# refine templates must match their zero-shot KSampler's size and steps, which auto (the family's
# optimisation size) would not. SD-Turbo's: its family row's values.
SD_TURBO = {"width": 512, "height": 512, "steps": 1, "grad_steps": 1, "learning_rate": 2e-4}
NEGATIVE = "#322"
POSITIVE = "#232"


def subject_lora_nodes(prompt_title: str) -> list:
    """Nodes 1-5 of every generation workflow: checkpoint, simple prompt, subject photo, SISO."""
    return [
        Node(1, "CheckpointLoaderSimple", (-420, 0), (320, 98), {"ckpt_name": TURBO}),
        Node(2, "CLIPTextEncode", (-40, 0), (400, 120), {"text": "a photo of a dog"}, {"clip": (1, 1)}, prompt_title, POSITIVE),
        Node(3, "LoadImage", (-420, 160), (320, 330), {"image": "subject.png"}, title="Subject photo"),
        Node(4, "LoadSubject", (-40, 180), (400, 102), {}, {"image": (3, 0)}),
        Node(5, "SISOOptimize", (420, 0), (400, 740), dict(WEIGHTS, **SD_TURBO), {"model": (1, 0), "vae": (1, 2), "positive": (2, 0), "subject": (4, 0)}),
    ]


def swap_input_nodes(photo_title: str) -> list:
    """Nodes 1-5 of the subject-swap workflows: checkpoint, class prompt, YOUR subject, the photo."""
    return [
        Node(1, "CheckpointLoaderSimple", (-420, 0), (320, 98), {"ckpt_name": TURBO}),
        Node(2, "CLIPTextEncode", (-40, 0), (400, 120), {"text": "a photo of a cat"}, {"clip": (1, 1)},
             "Class prompt (inversion and optimisation)", POSITIVE),
        Node(3, "LoadImage", (-420, 160), (320, 330), {"image": "subject.png"}, title="YOUR subject (reference photo)"),
        Node(4, "LoadSubject", (-40, 180), (400, 102), {}, {"image": (3, 0)}),
        Node(5, "LoadImage", (-420, 540), (320, 330), {"image": "photo.png"}, title=photo_title),
    ]

TWO_STAGE = Workflow(
    name="siso_two_stage",
    note=("SISO two-stage workflow (Single Image Subject Optimization)\n\n"
          "Files to place before running (names are what the dropdowns list):\n" + FILES_NOTE +
          "- input/: your ONE subject photo (upload it in Load Image).\n\n"
          "Stage 1 (top): SISO Optimize learns a small LoRA on the loaded model from the simple prompt (\"a photo of a dog\") "
          "until the 1-step image looks like your subject. Watch the progress preview; Cancel stops within one iteration.\n"
          "Stage 2 (bottom): SISO Apply LoRA + a stock KSampler (4 steps, cfg 1.0 for turbo) render the subject with any prompt.\n"
          "SISO Save LoRA writes models/loras/<name>.safetensors so LoraLoader can reuse it later.\n\n"
          "The settings above are SD-Turbo's / SDXL-Turbo's. Per model family (steps and grad_steps of SISO Optimize, "
          "steps and cfg of the stage-2 KSampler), the pack's advice and where it comes from:\n"
          + _families().settings_note()),
    nodes=[
        *subject_lora_nodes("Simple prompt (stage 1)"),
        Node(6, "ApplySISOLoRA", (420, 1040), (320, 78), {}, {"model": (1, 0), "subject_lora": (5, 0)}),
        Node(7, "CLIPTextEncode", (-40, 1040), (400, 140),
             {"text": "a watercolor painting of a dog wearing a red scarf, sitting on a wooden pier at sunset"}, {"clip": (1, 1)},
             "Any prompt (stage 2)", POSITIVE),
        Node(8, "CLIPTextEncode", (-40, 1220), (400, 100), {"text": ""}, {"clip": (1, 1)}, "Negative prompt", NEGATIVE),
        Node(9, "EmptyLatentImage", (420, 1160), (320, 106), {"width": 512, "height": 512}),
        Node(10, "KSampler", (880, 1040), (320, 262), {"steps": 4, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple"},
             {"model": (6, 0), "positive": (7, 0), "negative": (8, 0), "latent_image": (9, 0)}),
        Node(11, "VAEDecode", (1240, 1040), (210, 46), {}, {"samples": (10, 0), "vae": (1, 2)}),
        Node(12, "SaveImage", (1240, 1140), (420, 400), {"filename_prefix": "siso_two_stage"}, {"images": (11, 0)}),
        Node(13, "SaveSISOLoRA", (880, 0), (320, 106), {"name": "siso_subject"}, {"subject_lora": (5, 0)}),
        Node(14, "SaveImage", (880, 160), (320, 300), {"filename_prefix": "siso_best"}, {"images": (5, 1)}, "Best optimisation image"),
    ],
    groups=[("Stage 1: optimise the subject LoRA (simple prompt, 1 step)", -440, -60, 1680, 1040, "#3f789e"),
            ("Stage 2: generate with any prompt", -60, 1000, 1760, 580, "#8A8")],
    test_overrides={1: TINY, 5: {"width": 64, "height": 64, "max_iterations": 3}, 9: {"width": 64, "height": 64},
                    13: {"name": "siso_test_lora", "overwrite": True}},
    note_size=(1100, 560),
)

WORKFLOWS = [TWO_STAGE]

SWAP_NOTE_TAIL = (
    "How it works: SISO ReNoise Invert turns the photo into the model's noise (its reconstruction output should look "
    "like the photo). SISO Optimize then learns a LoRA while denoising that inversion: DINOv2 + IR pull the masked "
    "region toward YOUR subject, and background_weight x the squared error outside the mask keeps the rest of the "
    "photo. Keep the same prompt for both, a turbo model, 4 steps at strength 0.75 and learning rate 3e-4 (paper). "
    "The photo's sides must be multiples of 8.")

SWAP_DRAWN = Workflow(
    name="siso_subject_swap_drawn_mask",
    note=("SISO subject swap with a hand-drawn mask\n\nFiles:\n" + FILES_NOTE +
          "- input/: the reference photo of YOUR subject, and the photo to edit.\n\n"
          "Draw the mask: right-click the 'Photo to edit' node > Open in MaskEditor, paint over the subject to replace, "
          "save. The painted area is the MASK (1 = replace).\n\n" + SWAP_NOTE_TAIL),
    nodes=[
        *swap_input_nodes("Photo to edit (draw the mask on it)"),
        Node(6, "ReNoiseInvert", (-40, 340), (400, 520), {}, {"model": (1, 0), "vae": (1, 2), "image": (5, 0), "positive": (2, 0)}),
        Node(7, "SISOOptimize", (420, 0), (400, 740), dict(WEIGHTS, **dict(SD_TURBO, learning_rate=3e-4)),
             {"model": (1, 0), "vae": (1, 2), "positive": (2, 0), "subject": (4, 0), "inversion": (6, 0), "mask": (5, 1)}),
        Node(8, "SaveImage", (880, 0), (420, 420), {"filename_prefix": "siso_swap"}, {"images": (7, 1)}, "Edited photo"),
        Node(9, "PreviewImage", (880, 480), (420, 380), {}, {"images": (6, 1)}, "Inversion check: reconstruction"),
    ],
    test_overrides={1: TINY, 5: {"image": "photo_masked.png"}, 6: {"renoise_iterations": 2, "first_step_iterations": 2,
                                                                  "average_start": 1, "average_end": 3},
                    7: {"max_iterations": 2}},
)

WORKFLOWS.append(SWAP_DRAWN)

LAYOUT_THEN_APPEARANCE = Workflow(
    name="siso_layout_then_appearance",
    note=("Layout first, then your subject's appearance (the decoupled, iterative route of EZIGen)\n\nFiles:\n" + FILES_NOTE +
          "- input/: the ONE photo of your subject.\n\n"
          "1. SISO Optimize learns the subject LoRA (simple prompt, 1 step).\n"
          "2. The BASE model (no LoRA) draws the scene: composition, pose and background come from the prompt alone.\n"
          "3. Three passes with the LoRA re-noise that image partly (denoise 0.5) and denoise it again: each pass moves "
          "the subject's appearance toward yours while the layout stays. More passes = more identity, less of the "
          "original detail; lower denoise = more layout kept."),
    nodes=[
        *subject_lora_nodes("Simple prompt (LoRA)"),
        Node(6, "ApplySISOLoRA", (880, 0), (320, 78), {}, {"model": (1, 0), "subject_lora": (5, 0)}),
        Node(7, "CLIPTextEncode", (-40, 1120), (400, 140), {"text": "a dog playing with a ball in a sunny garden, photo"},
             {"clip": (1, 1)}, "Scene prompt", POSITIVE),
        Node(8, "CLIPTextEncode", (-40, 1300), (400, 100), {"text": ""}, {"clip": (1, 1)}, "Negative prompt", NEGATIVE),
        Node(9, "EmptyLatentImage", (-40, 1440), (320, 106), {"width": 512, "height": 512}),
        Node(10, "KSampler", (420, 1120), (320, 262), {"steps": 4, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple"},
             {"model": (1, 0), "positive": (7, 0), "negative": (8, 0), "latent_image": (9, 0)}, "1. Layout (base model)"),
        Node(11, "KSampler", (780, 1120), (320, 262), {"seed": 1, "steps": 4, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 0.5},
             {"model": (6, 0), "positive": (7, 0), "negative": (8, 0), "latent_image": (10, 0)}, "2. Appearance pass 1 (LoRA)"),
        Node(12, "KSampler", (1140, 1120), (320, 262), {"seed": 2, "steps": 4, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 0.5},
             {"model": (6, 0), "positive": (7, 0), "negative": (8, 0), "latent_image": (11, 0)}, "3. Appearance pass 2 (LoRA)"),
        Node(13, "KSampler", (1500, 1120), (320, 262), {"seed": 3, "steps": 4, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 0.5},
             {"model": (6, 0), "positive": (7, 0), "negative": (8, 0), "latent_image": (12, 0)}, "4. Appearance pass 3 (LoRA)"),
        Node(14, "VAEDecode", (1140, 1440), (210, 46), {}, {"samples": (10, 0), "vae": (1, 2)}, "Decode layout"),
        Node(15, "SaveImage", (1140, 1540), (320, 360), {"filename_prefix": "siso_layout"}, {"images": (14, 0)}, "Layout only"),
        Node(16, "VAEDecode", (1500, 1440), (210, 46), {}, {"samples": (13, 0), "vae": (1, 2)}, "Decode final"),
        Node(17, "SaveImage", (1500, 1540), (420, 420), {"filename_prefix": "siso_layout_then_appearance"}, {"images": (16, 0)}, "Your subject in the layout"),
    ],
    groups=[("Subject LoRA", -440, -60, 1680, 1080, "#3f789e"), ("Layout, then appearance", -60, 1060, 2000, 940, "#8A8")],
    test_overrides={1: TINY, 5: {"width": 64, "height": 64, "max_iterations": 2}, 9: {"width": 64, "height": 64}},
)

WORKFLOWS.append(LAYOUT_THEN_APPEARANCE)

SEGMENTATION_FILES = (
    "- models/sams/sam_vit_b_01ec64.pth (or sam_vit_l_0b3195.pth / sam_vit_h_4b8939.pth): Segment Anything.\n"
    "- models/grounding-dino/groundingdino_swint_ogc.pth with GroundingDINO_SwinT_OGC.cfg.py beside it, and the folder "
    "models/grounding-dino/bert-base-uncased/ (config.json, vocab.txt, model.safetensors, tokenizer files of "
    "google-bert/bert-base-uncased): Grounding DINO, with its package: pip install -r "
    "custom_nodes/<this pack>/requirements-subject-mask.txt in ComfyUI's Python (not in requirements.txt). "
    "Nothing is downloaded.\n")
SEGMENTATION = {"sam_model": "sam_vit_b_01ec64.pth", "grounding_dino_model": "groundingdino_swint_ogc.pth"}
# random test weights detect nothing at the real thresholds
ANY_DETECTION = {"box_threshold": 0.0, "text_threshold": 0.0}

SWAP = Workflow(
    name="siso_subject_swap",
    note=("SISO subject swap: the cat in the photo becomes YOUR cat\n\nFiles:\n" + FILES_NOTE + SEGMENTATION_FILES +
          "- input/: the reference photo of YOUR subject, and the photo to edit.\n\n"
          "SISO Subject Mask finds the subject to replace (Grounding DINO with the class word, then SAM); check its "
          "preview, and use the hand-drawn-mask workflow when it misses.\n\n" + SWAP_NOTE_TAIL),
    nodes=[
        *swap_input_nodes("Photo to edit"),
        Node(6, "SubjectMask", (-40, 340), (400, 260), dict(SEGMENTATION, text="cat"), {"image": (5, 0)}),
        Node(7, "ReNoiseInvert", (-40, 660), (400, 520), {}, {"model": (1, 0), "vae": (1, 2), "image": (5, 0), "positive": (2, 0)}),
        Node(8, "SISOOptimize", (420, 0), (400, 740), dict(WEIGHTS, **dict(SD_TURBO, learning_rate=3e-4)),
             {"model": (1, 0), "vae": (1, 2), "positive": (2, 0), "subject": (4, 0), "inversion": (7, 0), "mask": (6, 0)}),
        Node(9, "SaveImage", (880, 0), (420, 420), {"filename_prefix": "siso_swap"}, {"images": (8, 1)}, "Edited photo"),
        Node(10, "PreviewImage", (880, 480), (420, 380), {}, {"images": (6, 1)}, "Mask check"),
        Node(11, "PreviewImage", (880, 920), (420, 380), {}, {"images": (7, 1)}, "Inversion check: reconstruction"),
    ],
    test_overrides={1: TINY, 5: {"image": "photo_masked.png"}, 6: dict(ANY_DETECTION, keep="most confident"),
                    7: {"renoise_iterations": 2, "first_step_iterations": 2, "average_start": 1, "average_end": 3},
                    8: {"max_iterations": 2}},
)

INSERTION = Workflow(
    name="siso_insert_into_scene",
    note=("Insert YOUR subject into a generated scene (the two-stage insertion route of Image-Alchemy, with the SISO LoRA)\n\n"
          "Files:\n" + FILES_NOTE + SEGMENTATION_FILES + "- input/: the ONE photo of your subject.\n\n"
          "1. SISO Optimize learns the subject LoRA.\n"
          "2. The base model draws the scene with the class word (\"a dog on a beach at sunset\"): some dog stands in.\n"
          "3. SISO Subject Mask finds the stand-in (grown a little for the seams).\n"
          "4. An inpaint pass (Set Latent Noise Mask + KSampler with the LoRA, denoise 0.75) repaints only the masked "
          "region with your subject, and Image Composite Masked pastes it back so every pixel outside the mask is the "
          "original scene."),
    nodes=[
        *subject_lora_nodes("Simple prompt (LoRA)"),
        Node(6, "ApplySISOLoRA", (880, 0), (320, 78), {}, {"model": (1, 0), "subject_lora": (5, 0)}),
        Node(7, "CLIPTextEncode", (-40, 1120), (400, 140), {"text": "a dog on a beach at sunset, photo"}, {"clip": (1, 1)},
             "Scene prompt (with the class word)", POSITIVE),
        Node(8, "CLIPTextEncode", (-40, 1300), (400, 100), {"text": ""}, {"clip": (1, 1)}, "Negative prompt", NEGATIVE),
        Node(9, "EmptyLatentImage", (-40, 1440), (320, 106), {"width": 512, "height": 512}),
        Node(10, "KSampler", (420, 1120), (320, 262), {"steps": 4, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple"},
             {"model": (1, 0), "positive": (7, 0), "negative": (8, 0), "latent_image": (9, 0)}, "1. Scene (base model)"),
        Node(11, "VAEDecode", (780, 1120), (210, 46), {}, {"samples": (10, 0), "vae": (1, 2)}),
        Node(12, "SubjectMask", (780, 1220), (400, 260), dict(SEGMENTATION, text="dog", grow_pixels=16), {"image": (11, 0)},
             "2. Find the stand-in"),
        Node(13, "VAEEncode", (1220, 1120), (210, 46), {}, {"pixels": (11, 0), "vae": (1, 2)}),
        Node(14, "SetLatentNoiseMask", (1220, 1220), (260, 46), {}, {"samples": (13, 0), "mask": (12, 0)}),
        Node(15, "KSampler", (1220, 1320), (320, 262),
             {"seed": 1, "steps": 4, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 0.75},
             {"model": (6, 0), "positive": (7, 0), "negative": (8, 0), "latent_image": (14, 0)}, "3. Repaint the stand-in (LoRA)"),
        Node(16, "VAEDecode", (1580, 1120), (210, 46), {}, {"samples": (15, 0), "vae": (1, 2)}),
        Node(17, "ImageCompositeMasked", (1580, 1220), (320, 140), {}, {"destination": (11, 0), "source": (16, 0), "mask": (12, 0)},
             "4. Keep every pixel outside the mask"),
        Node(18, "SaveImage", (1580, 1420), (420, 420), {"filename_prefix": "siso_inserted"}, {"images": (17, 0)}, "Your subject in the scene"),
        Node(19, "PreviewImage", (780, 1540), (400, 380), {}, {"images": (12, 1)}, "Mask check"),
    ],
    groups=[("Subject LoRA", -440, -60, 1680, 1080, "#3f789e"), ("Scene, stand-in, repaint", -60, 1060, 2100, 900, "#8A8")],
    test_overrides={1: TINY, 5: {"width": 64, "height": 64, "max_iterations": 2}, 9: {"width": 64, "height": 64},
                    12: dict(ANY_DETECTION, keep="most confident")},
)

SEVERAL_PHOTOS_BEST_OF_FOUR = Workflow(
    name="siso_several_photos_best_of_four",
    note=("SISO from several photos of your subject, then the best of four seeds\n\n"
          "Files:\n" + FILES_NOTE +
          "- input/: two (or more) photos of the SAME subject: other angles or other light.\n\n"
          "1. Each SISO Load Subject takes photos (a batch, or one photo); chained through 'add_to' they make one "
          "subject, so photos may differ in size and each may have its own mask. SISO's loss is then the mean "
          "similarity over all photos (the live chart draws each photo's as a faint line).\n"
          "2. Stage 2 renders four images at once (batch_size 4: four seeds).\n"
          "3. SISO Subject Score ranks them by DINOv2 and image-retrieval similarity to the same photos (its table shows "
          "the scores); the best one is saved. Score other tools' outputs the same way to compare methods on your own "
          "subject."),
    nodes=[
        *subject_lora_nodes("Simple prompt (stage 1)")[:4],
        Node(15, "LoadImage", (-420, 540), (320, 330), {"image": "subject_2.png"}, title="Another photo of the subject"),
        Node(16, "LoadSubject", (-40, 560), (400, 122), {}, {"image": (15, 0), "add_to": (4, 0)}, "Add the second photo"),
        Node(5, "SISOOptimize", (420, 0), (400, 740), dict(WEIGHTS, **SD_TURBO), {"model": (1, 0), "vae": (1, 2), "positive": (2, 0), "subject": (16, 0)}),
        Node(6, "ApplySISOLoRA", (420, 1040), (320, 78), {}, {"model": (1, 0), "subject_lora": (5, 0)}),
        Node(7, "CLIPTextEncode", (-40, 1040), (400, 140), {"text": "a photo of a dog in a red raincoat on a city street"},
             {"clip": (1, 1)}, "Any prompt (stage 2)", POSITIVE),
        Node(8, "CLIPTextEncode", (-40, 1220), (400, 100), {"text": ""}, {"clip": (1, 1)}, "Negative prompt", NEGATIVE),
        Node(9, "EmptyLatentImage", (420, 1160), (320, 106), {"width": 512, "height": 512, "batch_size": 4}, title="Four seeds"),
        Node(10, "KSampler", (880, 1040), (320, 262), {"steps": 4, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple"},
             {"model": (6, 0), "positive": (7, 0), "negative": (8, 0), "latent_image": (9, 0)}),
        Node(11, "VAEDecode", (1240, 1040), (210, 46), {}, {"samples": (10, 0), "vae": (1, 2)}),
        Node(12, "SISOSubjectScore", (1240, 1140), (400, 300), WEIGHTS, {"images": (11, 0), "subject": (16, 0)}),
        Node(13, "ImageFromBatch", (1680, 1040), (320, 82), {"batch_index": 0, "length": 1}, {"image": (12, 3)}, "The best one"),
        Node(14, "SaveImage", (1680, 1160), (420, 420), {"filename_prefix": "siso_best_of_four"}, {"images": (13, 0)}),
        Node(17, "PreviewImage", (1240, 1500), (420, 380), {}, {"images": (12, 3)}, "All four, best first"),
    ],
    groups=[("Subject LoRA from several photos", -440, -60, 1680, 1040, "#3f789e"),
            ("Four seeds, scored, the best saved", -60, 1000, 2200, 920, "#8A8")],
    test_overrides={1: TINY, 5: {"width": 64, "height": 64, "max_iterations": 2}, 9: {"width": 64, "height": 64}},
)

WORKFLOWS[1:1] = [SWAP]
WORKFLOWS.append(INSERTION)
WORKFLOWS.append(SEVERAL_PHOTOS_BEST_OF_FOUR)


# ----------------------------------------------------------------------------- templates for today's models
# Split-file models (UNETLoader + CLIPLoader + VAELoader), with each file's download in the node
# (properties.models). They are not in WORKFLOWS: the suite's server holds tiny SD1.5 files, not
# these; tests/test_today_templates.py validates them and runs the refine route on tiny files.
IR_NOTE = ("- models/siso/ir_features.pth: the image-retrieval network weights. NOT downloadable here: the SISO authors' "
           "file sits in a Kaggle dataset (needs a Kaggle login), linked from github.com/yairshp/SISO; place it by hand. "
           + IR_WAY_OUT)
DOWNLOADS_NOTE = ("These files are offered for download by ComfyUI's missing-models dialog, which opens when one is "
                  "absent (each listed with its folder and its Hugging Face URL):\n")


def _files_note(*names) -> str:
    lines = [f"- models/{MODEL_FILES[n][0]}/{n}  ({MODEL_FILES[n][1]})" for n in names]
    return DOWNLOADS_NOTE + "\n".join(lines) + "\n" + IR_NOTE


def split_loaders(unet: str, clip: str, clip_type: str, vae: str) -> list:
    """Nodes 1-3: the diffusion model, its text encoder and its VAE, each from its own file."""
    return [
        Node(1, "UNETLoader", (-420, 0), (320, 82), {"unet_name": unet}),
        Node(2, "CLIPLoader", (-420, 120), (320, 106), {"clip_name": clip, "type": clip_type}),
        Node(3, "VAELoader", (-420, 270), (320, 58), {"vae_name": vae}),
    ]


def split_two_stage(name, title, loaders, latent_type, size, steps, extra_note, tiny) -> Workflow:
    """The two-stage workflow on a split-file model: SISO Optimize learns the LoRA from the simple
    prompt at ``steps`` steps (grad_steps 1: a distilled model), then the stock KSampler renders
    any prompt with it at the same steps and cfg 1.0."""
    return Workflow(
        name=name,
        note=(f"SISO two-stage workflow on {title}\n\nFiles:\n" + _files_note(*[n.widgets[k] for n in loaders
                                                                                for k in LOADER_WIDGETS[n.type]], "dinov2_vitl14.safetensors") +
              "- input/: your ONE subject photo (upload it in Load Image).\n\n"
              f"Stage 1: SISO Optimize learns a LoRA on {title} from the simple prompt until the image looks like your "
              f"subject ({steps} steps per iteration, gradients through the last one: the model is distilled).\n"
              f"Stage 2: SISO Apply LoRA + the stock KSampler ({steps} steps, cfg 1.0) render the subject with any prompt; "
              "SISO Save LoRA writes models/loras/<name>.safetensors for LoraLoader.\n\n" + extra_note +
              "\nSettings: the pack's family table (README, 'Supported models'): the model authors' sampling advice, "
              "SISO's steps not measured on this model."),
        nodes=[
            *loaders,
            Node(4, "CLIPTextEncode", (-40, 0), (400, 120), {"text": "a photo of a dog"}, {"clip": (2, 0)},
                 "Simple prompt (stage 1)", POSITIVE),
            Node(5, "LoadImage", (-420, 380), (320, 330), {"image": "subject.png"}, title="Subject photo"),
            Node(6, "LoadSubject", (-40, 180), (400, 102), {}, {"image": (5, 0)}),
            Node(7, "SISOOptimize", (420, 0), (400, 740),
                 dict(WEIGHTS, width=size[0], height=size[1], steps=steps, grad_steps=1, learning_rate=2e-4),
                 {"model": (1, 0), "vae": (3, 0), "positive": (4, 0), "subject": (6, 0)}),
            Node(8, "SaveSISOLoRA", (880, 0), (320, 106), {"name": "siso_subject"}, {"subject_lora": (7, 0)}),
            Node(9, "SaveImage", (880, 160), (320, 300), {"filename_prefix": "siso_best"}, {"images": (7, 1)}, "Best optimisation image"),
            Node(10, "ApplySISOLoRA", (420, 1040), (320, 78), {}, {"model": (1, 0), "subject_lora": (7, 0)}),
            Node(11, "CLIPTextEncode", (-40, 1040), (400, 140),
                 {"text": "a watercolor painting of a dog wearing a red scarf, sitting on a wooden pier at sunset"},
                 {"clip": (2, 0)}, "Any prompt (stage 2)", POSITIVE),
            Node(12, "CLIPTextEncode", (-40, 1220), (400, 100), {"text": ""}, {"clip": (2, 0)}, "Negative prompt (unused at cfg 1.0)", NEGATIVE),
            Node(13, latent_type, (420, 1160), (320, 106), {"width": 1024, "height": 1024}),
            Node(14, "KSampler", (880, 1040), (320, 262), {"steps": steps, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple"},
                 {"model": (10, 0), "positive": (11, 0), "negative": (12, 0), "latent_image": (13, 0)}),
            Node(15, "VAEDecode", (1240, 1040), (210, 46), {}, {"samples": (14, 0), "vae": (3, 0)}),
            Node(16, "SaveImage", (1240, 1140), (420, 400), {"filename_prefix": name}, {"images": (15, 0)}),
        ],
        groups=[("Stage 1: optimise the subject LoRA (simple prompt)", -440, -60, 1680, 1040, "#3f789e"),
                ("Stage 2: generate with any prompt", -60, 1000, 1760, 580, "#8A8")],
        test_overrides={**tiny, 7: {"width": 64, "height": 64, "max_iterations": 2, "steps": 1},
                        8: {"name": f"{name}_test", "overwrite": True}, 13: {"width": 64, "height": 64}, 14: {"steps": 1}},
        note_size=(1100, 520),
    )


Z_IMAGE_TWO_STAGE = split_two_stage(
    "siso_two_stage_z_image_turbo", "Z-Image-Turbo",
    split_loaders("z_image_turbo_bf16.safetensors", "qwen_3_4b.safetensors", "lumina2", "ae.safetensors"),
    "EmptySD3LatentImage", (768, 768), 8,
    "Z-Image-Turbo's text encoder is Qwen3-4B (CLIPLoader type lumina2); its VAE is Flux.1's ae.safetensors. "
    "Optimising at 768 px keeps memory down; stage 2 renders at 1024 px.\n",
    {1: {"unet_name": "siso_tiny_z_image.safetensors"}, 2: {"clip_name": "siso_tiny_qwen3.safetensors"},
     3: {"vae_name": "siso_tiny_ae.safetensors"}})

FLUX2_KLEIN_TWO_STAGE = split_two_stage(
    "siso_two_stage_flux2_klein", "Flux.2 [klein] 4B",
    split_loaders("flux-2-klein-4b.safetensors", "qwen_3_4b.safetensors", "flux2", "flux2-vae.safetensors"),
    "EmptyFlux2LatentImage", (768, 768), 4,
    "Flux.2 [klein] needs a ComfyUI that knows its Qwen3 text encoder (CLIPLoader type flux2 with qwen_3_4b: "
    "ComfyUI 0.33 does, 0.3.75 loads only Flux.2 [dev]). The text encoder file is the same as Z-Image-Turbo's.\n",
    {1: {"unet_name": "siso_tiny_flux2.safetensors"}, 2: {"clip_name": "siso_tiny_qwen3.safetensors"},
     3: {"vae_name": "siso_tiny_flux2_vae.safetensors"}})


KEEP_BACKGROUND_NOTE = (
    "Keep the zero-shot picture's background (optional): 'SISO Subject Mask' and 'Mask check' are bypassed (purple), "
    "so SISO Optimize gets no mask and may change the whole picture. Select both and press Ctrl+B: SISO Subject Mask "
    "finds the subject (its text: your subject's class word) in the zero-shot picture, and SISO Optimize's loss adds "
    "background_weight (10) x the squared error outside that mask against its iteration 0 (the zero-shot picture), so "
    "mostly the subject changes; grow_pixels leaves its outline room to change. The mask must be the size SISO "
    "Optimize makes (width x height, as KSampler's latent). Its files (not offered for download by ComfyUI):\n"
    + "".join(f"- models/{folder}/{name}  ({url})\n" for name, (folder, url) in SEGMENTATION_DOWNLOADS.items()) +
    "- the folder models/grounding-dino/bert-base-uncased/: config.json, vocab.txt, tokenizer.json, "
    "tokenizer_config.json and model.safetensors of https://huggingface.co/google-bert/bert-base-uncased (Grounding "
    "DINO's text encoder); optionally GroundingDINO_SwinT_OGC.cfg.py beside the checkpoint. Grounding DINO's package: "
    "pip install -r custom_nodes/<this pack>/requirements-subject-mask.txt in ComfyUI's Python.\n")


def refine_workflow(name, title, loaders, model_nodes, model_id, encode_nodes, positive, negative, latent_type,
                    steps, extra_note, tiny, stage2_nodes, stage2_positive) -> Workflow:
    """The refine route: the reference model makes its zero-shot picture of the subject (the subject
    photo as its reference, the scene prompt); SISO Optimize learns a LoRA on the same model and the
    same conditioning, seed and steps, so its iteration 0 is that picture, until the result matches
    the subject photo by DINOv2 and IR; SISO Subject Score shows both pictures with their
    similarities; the LoRA then renders other prompts and seeds on the reference model."""
    optimise = 30
    return Workflow(
        name=name,
        note=(f"Refine a zero-shot {title} result with SISO\n\nFiles:\n" +
              _files_note(*[n.widgets[k] for n in loaders + model_nodes for k in LOADER_WIDGETS.get(n.type, ())],
                          "dinov2_vitl14.safetensors") +
              "- input/: your ONE subject photo (about 1 megapixel: it is encoded as the reference as it is).\n\n"
              f"1. {title} draws the scene with your photo as its reference (the zero-shot picture, seed 0, {steps} steps, "
              "cfg 1.0). Its usual problem: the subject's identity drifts (face or object details change).\n"
              "2. SISO Optimize learns a LoRA on the SAME model with the SAME conditioning (reference included), seed, "
              "size and steps, so its iteration 0 is the zero-shot picture; each iteration moves the picture toward your "
              "photo by DINOv2 and image-retrieval similarity. Watch the live chart; Cancel stops within one iteration.\n"
              "3. SISO Subject Score scores both pictures against your photo: image 0 is the zero-shot one, image 1 the "
              "refined one (its table: DINO, IR and score; higher is closer).\n"
              "4. Stage 2: the LoRA on the reference model renders another prompt and seed, with the same reference.\n\n"
              + KEEP_BACKGROUND_NOTE + "\n" + extra_note),
        nodes=[
            *loaders, *model_nodes,
            Node(5, "LoadImage", (-420, 380), (320, 330), {"image": "subject.png"}, title="Subject photo (the reference)"),
            Node(6, "LoadSubject", (-40, 580), (400, 102), {}, {"image": (5, 0)}),
            *encode_nodes,
            Node(11, latent_type, (-40, 740), (320, 106), {"width": 1024, "height": 1024}),
            Node(12, "KSampler", (420, 0), (320, 262), {"steps": steps, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple"},
                 {"model": (model_id, 0), "positive": positive, "negative": negative, "latent_image": (11, 0)},
                 "1. Zero-shot picture (reference model)"),
            Node(13, "VAEDecode", (420, 300), (210, 46), {}, {"samples": (12, 0), "vae": (3, 0)}),
            # optional, bypassed: the subject's mask in the zero-shot picture keeps its background
            Node(29, "SubjectMask", (420, 444), (340, 290), dict(SEGMENTATION, text="dog", grow_pixels=16),
                 {"image": (13, 0)}, "Keep the background: the subject in the zero-shot picture", mode=BYPASS),
            Node(30, "PreviewImage", (420, 770), (340, 200), {}, {"images": (29, 1)}, "Mask check", mode=BYPASS),
            Node(14, "SISOOptimize", (780, 0), (400, 740),
                 dict(WEIGHTS, width=1024, height=1024, steps=steps, grad_steps=1, learning_rate=2e-4, max_iterations=optimise),
                 {"model": (model_id, 0), "vae": (3, 0), "positive": positive, "subject": (6, 0), "mask": (29, 0)},
                 "2. SISO Optimize (same model, conditioning, seed, steps)"),
            Node(15, "ImageBatch", (1220, 0), (210, 46), {}, {"image1": (13, 0), "image2": (14, 1)}, "zero-shot, refined"),
            Node(16, "SISOSubjectScore", (1220, 100), (400, 300), WEIGHTS, {"images": (15, 0), "subject": (6, 0)},
                 "3. Similarity to your photo: 0 zero-shot, 1 refined"),
            Node(17, "PreviewImage", (1660, 0), (520, 320), {}, {"images": (15, 0)}, "Zero-shot (left) and refined (right)"),
            Node(28, "PreviewImage", (1220, 620), (400, 320), {}, {"images": (16, 3)}, "Both, the closer one first"),
            Node(18, "SaveImage", (1660, 380), (420, 420), {"filename_prefix": f"{name}_refined"}, {"images": (14, 1)}, "Refined picture"),
            Node(19, "SaveSISOLoRA", (1660, 860), (320, 106), {"name": "siso_refined_subject"}, {"subject_lora": (14, 0)}),
            Node(20, "ApplySISOLoRA", (420, 1040), (320, 78), {}, {"model": (model_id, 0), "subject_lora": (14, 0)}),
            *stage2_nodes,
            Node(24, "KSampler", (880, 1040), (320, 262), {"seed": 1, "steps": steps, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple"},
                 {"model": (20, 0), "positive": stage2_positive, "negative": negative, "latent_image": (11, 0)}, "4. Another prompt and seed, with the LoRA"),
            Node(25, "VAEDecode", (1240, 1040), (210, 46), {}, {"samples": (24, 0), "vae": (3, 0)}),
            Node(26, "SaveImage", (1240, 1140), (420, 420), {"filename_prefix": f"{name}_stage2"}, {"images": (25, 0)}),
        ],
        groups=[("Zero-shot picture, refined by SISO, scored", -440, -60, 2660, 1060, "#3f789e"),
                ("Optional: keep the background (select both, Ctrl+B)", 400, 370, 380, 615, "#a1309b"),
                ("Stage 2: the LoRA with another prompt and seed", -60, 1000, 1760, 600, "#8A8")],
        test_overrides={**tiny, 11: {"width": 64, "height": 64}, 12: {"steps": 2},
                        14: {"width": 64, "height": 64, "steps": 2, "max_iterations": 3},
                        19: {"name": f"{name}_test", "overwrite": True}, 24: {"steps": 2}},
        note_size=(1300, 700),
    )


FLUX2_KLEIN_REFINE = refine_workflow(
    "siso_refine_flux2_klein", "Flux.2 [klein] 4B",
    split_loaders("flux-2-klein-4b.safetensors", "qwen_3_4b.safetensors", "flux2", "flux2-vae.safetensors"),
    [], 1,
    [Node(7, "VAEEncode", (-40, 0), (210, 46), {}, {"pixels": (5, 0), "vae": (3, 0)}, "Encode the reference"),
     Node(8, "CLIPTextEncode", (-40, 100), (400, 140), {"text": "the dog from the reference photo sitting on a wooden pier at sunset, photo"},
          {"clip": (2, 0)}, "Scene prompt", POSITIVE),
     Node(9, "ReferenceLatent", (-40, 310), (260, 46), {}, {"conditioning": (8, 0), "latent": (7, 0)}, "Subject photo as the reference"),
     Node(10, "CLIPTextEncode", (-40, 420), (400, 100), {"text": ""}, {"clip": (2, 0)}, "Negative prompt (unused at cfg 1.0)", NEGATIVE)],
    (9, 0), (10, 0), "EmptyFlux2LatentImage", 4,
    "Flux.2 [klein]: ReferenceLatent puts the encoded photo into the conditioning (chain another ReferenceLatent "
    "for a second photo). It needs a ComfyUI that knows klein's Qwen3 text encoder (0.33 does; 0.3.75 loads only "
    "Flux.2 [dev], whose files work in the same graph with CLIPLoader's mistral text encoder and 20+ steps).",
    {1: {"unet_name": "siso_tiny_flux2.safetensors"}, 2: {"clip_name": "siso_tiny_qwen3.safetensors"},
     3: {"vae_name": "siso_tiny_flux2_vae.safetensors"}},
    [Node(21, "CLIPTextEncode", (-40, 1040), (400, 140), {"text": "the dog from the reference photo in a red raincoat on a city street, photo"},
          {"clip": (2, 0)}, "Another prompt (stage 2)", POSITIVE),
     Node(22, "ReferenceLatent", (420, 1160), (260, 46), {}, {"conditioning": (21, 0), "latent": (7, 0)}, "Same reference")],
    (22, 0))

QWEN_EDIT_REFINE = refine_workflow(
    "siso_refine_qwen_image_edit", "Qwen-Image-Edit-2509",
    split_loaders("qwen_image_edit_2509_fp8_e4m3fn.safetensors", "qwen_2.5_vl_7b_fp8_scaled.safetensors", "qwen_image",
                  "qwen_image_vae.safetensors"),
    [Node(4, "LoraLoaderModelOnly", (-420, 760), (320, 82),
          {"lora_name": "Qwen-Image-Edit-2509-Lightning-4steps-V1.0-bf16.safetensors", "strength_model": 1.0},
          {"model": (1, 0)}, "Lightning LoRA (4 steps)"),
     Node(27, "ModelSamplingAuraFlow", (-420, 880), (320, 58), {"shift": 3.0}, {"model": (4, 0)})],
    27,
    [Node(8, "TextEncodeQwenImageEditPlus", (-40, 0), (400, 200),
          {"prompt": "the dog from the picture sitting on a wooden pier at sunset, photo"},
          {"clip": (2, 0), "vae": (3, 0), "image1": (5, 0)}, "Scene prompt with the subject photo", POSITIVE),
     Node(10, "TextEncodeQwenImageEditPlus", (-40, 280), (400, 200), {"prompt": ""},
          {"clip": (2, 0), "vae": (3, 0), "image1": (5, 0)}, "Negative (unused at cfg 1.0)", NEGATIVE)],
    (8, 0), (10, 0), "EmptySD3LatentImage", 4,
    "Qwen-Image-Edit-2509 (2511 works the same): TextEncodeQwenImageEditPlus gives the text encoder the photo and "
    "puts its latent into the conditioning as the reference (image2 / image3 take more photos). The Lightning LoRA "
    "makes it a 4-step model at cfg 1.0; SISO's LoRA learns on top of it.",
    {1: {"unet_name": "siso_tiny_qwen_image_edit.safetensors"}, 2: {"clip_name": "siso_tiny_qwen25vl.safetensors"},
     3: {"vae_name": "siso_tiny_qwen_image_vae.safetensors"}},
    [Node(21, "TextEncodeQwenImageEditPlus", (-40, 1040), (400, 200),
          {"prompt": "the dog from the picture in a red raincoat on a city street, photo"},
          {"clip": (2, 0), "vae": (3, 0), "image1": (5, 0)}, "Another prompt (stage 2)", POSITIVE)],
    (21, 0))

TODAY_WORKFLOWS = [Z_IMAGE_TWO_STAGE, FLUX2_KLEIN_TWO_STAGE, FLUX2_KLEIN_REFINE, QWEN_EDIT_REFINE]


# ----------------------------------------------------------------------------- SISO or DreamBooth
# Single-image DreamBooth with prior preservation (../shared/seeds/004; the SISO paper's Table 2
# baseline, run with Diffusers' DreamBooth script): Train LoRA's steps and learning rate are the
# Diffusers DreamBooth LoRA example's (500 steps at 1e-4); seed 004 gives no figures of its own.
DREAMBOOTH_STEPS, DREAMBOOTH_LR, CLASS_IMAGES = 500, 1e-4, 8
COMPARE_PROMPTS = ("wearing a red scarf, sitting on a wooden pier at sunset, watercolor painting",
                   "in an astronaut suit floating above the moon, photo")
# The Train LoRA widgets this template is made with (ComfyUI 0.33's node); 0.3.75's node lacks
# these, and a UI workflow's widget values are positional, so the template is 0.33's.
TRAIN_LORA_033 = ("quantized_backward", "checkpoint_depth", "offloading", "bucket_mode", "bypass_mode")


def _compare_renders(first_id: int, model: tuple, subject_word: str, route: str, x: int, y: int) -> list:
    """Two prompts x two images (one seed, a batch of 2), decoded and put in one batch: ids
    first_id .. first_id + 8; the batch is output 0 of node first_id + 8."""
    i = first_id
    nodes = []
    for k, text in enumerate(COMPARE_PROMPTS):
        nodes += [
            Node(i + 4 * k, "CLIPTextEncode", (x, y + 260 * k), (400, 120), {"text": f"{subject_word} {text}"},
                 {"clip": (1, 1)}, f"{route}: prompt {k + 1}", POSITIVE),
            Node(i + 4 * k + 1, "KSampler", (x + 440, y + 260 * k), (320, 262),
                 {"seed": 1, "steps": 4, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple"},
                 {"model": model, "positive": (i + 4 * k, 0), "negative": (11, 0), "latent_image": (40, 0)}),
            Node(i + 4 * k + 2, "VAEDecode", (x + 800, y + 260 * k), (210, 46), {}, {"samples": (i + 4 * k + 1, 0), "vae": (1, 2)}),
        ]
    nodes.append(Node(i + 8, "ImageBatch", (x + 800, y + 120), (210, 46), {}, {"image1": (i + 2, 0), "image2": (i + 6, 0)},
                      f"{route}: its 4 renders"))
    return nodes


SISO_OR_DREAMBOOTH = Workflow(
    name="siso_or_dreambooth",
    note=("SISO or DreamBooth for this subject?\n\nFiles:\n" + FILES_NOTE +
          "- input/: your ONE subject photo (upload it in Load Image).\n"
          "Needs ComfyUI 0.33 or newer (its Train LoRA node; the DreamBooth route itself also runs on 0.3.75's).\n\n"
          "The same checkpoint and the same photo go through both routes, and each route renders the same two prompts "
          "(2 images each, seed 1, 4 steps): images 0-3 are SISO's, 4-7 DreamBooth's.\n"
          "- SISO (top): SISO Optimize learns a LoRA from the simple prompt until its image looks like your photo by "
          "DINOv2 and IR (early stop); the prompts say 'a dog'.\n"
          f"- DreamBooth (middle): the model first draws {CLASS_IMAGES} class images from 'a photo of a dog' (seed 0); "
          "DreamBooth Training Set pairs your photo with 'a photo of sks dog' and each class image with 'a photo of a "
          "dog' (prior preservation, weight 1: as many subject copies as class images); ComfyUI's Train LoRA learns a "
          f"LoRA ({DREAMBOOTH_STEPS} steps, learning rate {DREAMBOOTH_LR:g}, batch size 1 so each image keeps its own "
          "prompt, 2 draws per step); the prompts say 'sks dog'. Save LoRA Weights writes output/loras/: move the file "
          "to models/loras/ to load it in LoraLoaderModelOnly.\n\n"
          "How to read the result (SISO Subject Score's table, best first):\n"
          "- DINO sim and IR sim: how much a render looks like your subject (higher is closer). SISO optimises exactly "
          "these, so compare the routes by their images too, not by the numbers alone.\n"
          "- MSE to subject (diversity): how far a render is from the photo itself. Near 0 means the route copies the "
          "photo (pose, background): overfitting, the single-image DreamBooth failure the SISO paper reports "
          "(0.05 vs SISO's 0.11 on SDXL-Turbo). Prefer the route whose renders score high on DINO/IR with a diversity "
          "not far below the other's, and which follow the prompts (astronaut, watercolor).\n"
          "- Cost: SISO stops by itself (about a minute on a GPU); DreamBooth runs its steps plus the class images. "
          "BENCHMARKS.md gives the figures measured for SD-Turbo."),
    nodes=[
        Node(1, "CheckpointLoaderSimple", (-420, 0), (320, 98), {"ckpt_name": TURBO}),
        Node(2, "LoadImage", (-420, 160), (320, 330), {"image": "subject.png"}, title="Subject photo"),
        Node(3, "LoadSubject", (-420, 540), (320, 102), {}, {"image": (2, 0)}),
        Node(11, "CLIPTextEncode", (-420, 700), (320, 100), {"text": ""}, {"clip": (1, 1)}, "Negative prompt (unused at cfg 1.0)", NEGATIVE),
        Node(40, "EmptyLatentImage", (-420, 860), (320, 106), {"width": 512, "height": 512, "batch_size": 2}, title="Renders: size, 2 per prompt"),
        # SISO
        Node(4, "CLIPTextEncode", (-40, 0), (400, 120), {"text": "a photo of a dog"}, {"clip": (1, 1)}, "SISO: simple prompt", POSITIVE),
        Node(5, "SISOOptimize", (420, 0), (400, 740), dict(WEIGHTS, **SD_TURBO), {"model": (1, 0), "vae": (1, 2), "positive": (4, 0), "subject": (3, 0)}),
        Node(6, "ApplySISOLoRA", (880, 0), (320, 78), {}, {"model": (1, 0), "subject_lora": (5, 0)}),
        *_compare_renders(50, (6, 0), "a dog", "SISO", 1240, 0),
        # DreamBooth
        Node(7, "CLIPTextEncode", (-40, 1000), (400, 120), {"text": "a photo of sks dog"}, {"clip": (1, 1)},
             "DreamBooth: your subject's rare-token prompt", POSITIVE),
        Node(8, "CLIPTextEncode", (-40, 1160), (400, 120), {"text": "a photo of a dog"}, {"clip": (1, 1)},
             "DreamBooth: class prompt", POSITIVE),
        Node(9, "EmptyLatentImage", (-40, 1320), (400, 106), {"width": 512, "height": 512, "batch_size": CLASS_IMAGES},
             title="Class images: size and how many"),
        Node(10, "KSampler", (-40, 1470), (400, 262), {"seed": 0, "steps": 1, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple"},
             {"model": (1, 0), "positive": (8, 0), "negative": (11, 0), "latent_image": (9, 0)}, "Class images (the model's own)"),
        Node(12, "ImageScale", (420, 1000), (320, 130), {"upscale_method": "bilinear", "width": 512, "height": 512, "crop": "center"},
             {"image": (2, 0)}, "Photo at the class images' size"),
        Node(13, "VAEEncode", (420, 1170), (210, 46), {}, {"pixels": (12, 0), "vae": (1, 2)}),
        Node(14, "DreamBoothTrainingSet", (420, 1260), (400, 170), {"prior_weight": 1.0},
             {"subject": (13, 0), "subject_prompt": (7, 0), "class_images": (10, 0), "class_prompt": (8, 0)}),
        Node(15, "TrainLoraNode", (880, 1000), (320, 560),
             {"batch_size": 1, "grad_accumulation_steps": 2, "steps": DREAMBOOTH_STEPS, "learning_rate": DREAMBOOTH_LR, "rank": 8,
              "seed": 0},
             {"model": (1, 0), "latents": (14, 0), "positive": (14, 1)}, "Train LoRA (DreamBooth)"),
        # Save LoRA Weights names the file by its steps (its widget's 0 would write "_0_steps_"): Train LoRA's
        Node(16, "SaveLoRA", (880, 1600), (320, 106), {"prefix": "loras/dreambooth_subject", "steps": DREAMBOOTH_STEPS},
             {"lora": (15, 0), "steps": (15, 2)}),
        Node(17, "LoraModelLoader", (880, 1740), (320, 106), {}, {"model": (1, 0), "lora": (15, 0)}),
        Node(18, "VAEDecode", (420, 1480), (210, 46), {}, {"samples": (10, 0), "vae": (1, 2)}),
        Node(19, "PreviewImage", (420, 1570), (400, 300), {}, {"images": (18, 0)}, "Class images (check them: they are the prior)"),
        *_compare_renders(60, (17, 0), "a sks dog", "DreamBooth", 1240, 1000),
        # comparison
        Node(70, "ImageBatch", (2300, 600), (210, 46), {}, {"image1": (58, 0), "image2": (68, 0)}, "0-3 SISO, 4-7 DreamBooth"),
        Node(71, "SISOSubjectScore", (2300, 700), (400, 300), WEIGHTS, {"images": (70, 0), "subject": (3, 0)},
             "Scores and diversity: 0-3 SISO, 4-7 DreamBooth"),
        Node(72, "PreviewImage", (2740, 0), (520, 420), {}, {"images": (58, 0)}, "SISO renders"),
        Node(73, "PreviewImage", (2740, 1000), (520, 420), {}, {"images": (68, 0)}, "DreamBooth renders"),
        Node(74, "PreviewImage", (2300, 1100), (400, 320), {}, {"images": (71, 3)}, "All renders, best score first"),
    ],
    groups=[("SISO: optimise until the image matches the photo", -60, -60, 2260, 580, "#3f789e"),
            ("DreamBooth: class images, training set, Train LoRA", -60, 940, 2260, 960, "#b58b2a"),
            ("Compare: SISO Subject Score ranks all 8 renders", 2280, -60, 1000, 1520, "#8A8")],
    test_overrides={1: TINY, 5: {"width": 64, "height": 64, "max_iterations": 2}, 9: {"width": 64, "height": 64, "batch_size": 2},
                    12: {"width": 64, "height": 64}, 15: {"steps": 1, "learning_rate": 0.05, "training_dtype": "fp32", "gradient_checkpointing": False},
                    16: {"prefix": "loras/siso_or_dreambooth_test"}, 40: {"width": 64, "height": 64},
                    **{k: {"steps": 1} for k in (51, 55, 61, 65)}},
    note_size=(1300, 620),
)

TRAINING_WORKFLOWS = [SISO_OR_DREAMBOOTH]


def version_gap(workflow: Workflow, object_info: dict) -> str | None:
    """Why this ComfyUI cannot make the template (its node lacks widgets the template sets), or None."""
    if workflow in TRAINING_WORKFLOWS:
        info = object_info.get("TrainLoraNode")
        missing = [w for w in TRAIN_LORA_033 if info is None or w not in {s[0] for s in widget_slots(info)}]
        if missing:
            return (f"{workflow.name} is made with ComfyUI 0.33's Train LoRA node (this ComfyUI's lacks "
                    f"{', '.join(missing)}; a UI workflow's widget values are positional)")
    return None


# ----------------------------------------------------------------------------- SISO Subject Mask on SAM3
# The subject-swap and refine templates with ComfyUI's own SAM3 (0.22 and later) in place of SAM +
# Grounding DINO: one file, read by the stock Load Checkpoint, whose MODEL and CLIP go into SISO
# Subject Mask's sam3_model and sam3_clip. Not in WORKFLOWS / TODAY_WORKFLOWS: ComfyUI 0.3.75 has no
# SAM3; tests/test_today_templates.py checks them on every ComfyUI (every node type exists on
# 0.3.75 too, so they open there) and validates them where SAM3 exists.
UNUSED_WITH_SAM3 = "(unused with SAM3)"      # SISO Subject Mask's SAM / Grounding DINO dropdowns here
SAM3_LOADER_TITLE = "SAM3 (Load Checkpoint)"
SAM3_FILES_NOTE = (
    f"- models/checkpoints/{SAM3_FILE}: SAM3 ({MODEL_FILES[SAM3_FILE][1]}; ComfyUI offers the download), read by "
    f"the stock Load Checkpoint '{SAM3_LOADER_TITLE}'. It replaces the SAM, Grounding DINO and BERT files: SISO "
    "Subject Mask's sam_model and grounding_dino_model are unused while its sam3_model and sam3_clip are connected, "
    "and its box_threshold is SAM3's score threshold (0.5, as SAM3's own node).\n")


def with_sam3(workflow: Workflow, loader_pos: tuple, note_changes: list, group_changes: dict | None = None) -> Workflow:
    """``workflow`` with SISO Subject Mask on SAM3: a Load Checkpoint of the SAM3 file (bypassed
    where the mask is) into each SISO Subject Mask's sam3_model / sam3_clip; ``note_changes``
    (old, new) rewrite the note's file list, each ``old`` must be there."""
    loader_id = max(n.id for n in workflow.nodes) + 1
    nodes, mode = [], None
    for node in workflow.nodes:
        if node.type == "SubjectMask":
            node = replace(node, widgets=dict(node.widgets, sam_model=UNUSED_WITH_SAM3,
                                              grounding_dino_model=UNUSED_WITH_SAM3, box_threshold=0.5),
                           links=dict(node.links, sam3_model=(loader_id, 0), sam3_clip=(loader_id, 1)))
            mode = node.mode
        nodes.append(node)
    nodes.append(Node(loader_id, "CheckpointLoaderSimple", loader_pos, (320, 98), {"ckpt_name": SAM3_FILE},
                      title=SAM3_LOADER_TITLE, mode=mode))
    note = workflow.note
    for old, new in note_changes:
        if old not in note:
            raise ValueError(f"{workflow.name}: its note has no {old[:60]!r}")
        note = note.replace(old, new)
    note = (f"Uses ComfyUI's own SAM3 for the mask: needs a ComfyUI with SAM3 (0.22 and later). On an older ComfyUI "
            f"open {workflow.name} (SAM + Grounding DINO) instead.\n\n" + note)
    groups = [((group_changes or {}).get(g[0], g[0]), *g[1:]) for g in workflow.groups]
    overrides = copy.deepcopy(workflow.test_overrides)
    for node in nodes:
        if node.type == "SubjectMask" and node.id in overrides:
            overrides[node.id].pop("text_threshold", None)
    return Workflow(name=f"{workflow.name}_sam3", note=note, nodes=nodes, groups=groups, test_overrides=overrides,
                    note_size=workflow.note_size)


SWAP_SAM3 = with_sam3(SWAP, (-420, 920), [
    (SEGMENTATION_FILES, SAM3_FILES_NOTE),
    ("SISO Subject Mask finds the subject to replace (Grounding DINO with the class word, then SAM)",
     "SISO Subject Mask finds the subject to replace (SAM3, with the class word)")])
KEEP_BACKGROUND_FILES = KEEP_BACKGROUND_NOTE[KEEP_BACKGROUND_NOTE.index(" Its files (not offered"):]
REFINE_SAM3_CHANGES = [
    ("'SISO Subject Mask' and 'Mask check' are bypassed (purple)",
     f"'{SAM3_LOADER_TITLE}', 'SISO Subject Mask' and 'Mask check' are bypassed (purple)"),
    ("Select both and press Ctrl+B", "Select the three and press Ctrl+B"),
    (KEEP_BACKGROUND_FILES, " Its file:\n" + SAM3_FILES_NOTE.replace(
        "ComfyUI offers the download", "the missing-models list of ComfyUI's frontend 1.49 leaves out the files of "
        "bypassed nodes: download it by hand"))]
REFINE_SAM3_GROUPS = {"Optional: keep the background (select both, Ctrl+B)":
                      "Optional: keep the background (select the three, Ctrl+B)"}
FLUX2_KLEIN_REFINE_SAM3 = with_sam3(FLUX2_KLEIN_REFINE, (-40, 880), REFINE_SAM3_CHANGES, REFINE_SAM3_GROUPS)
QWEN_EDIT_REFINE_SAM3 = with_sam3(QWEN_EDIT_REFINE, (-40, 880), REFINE_SAM3_CHANGES, REFINE_SAM3_GROUPS)
SAM3_WORKFLOWS = [SWAP_SAM3, FLUX2_KLEIN_REFINE_SAM3, QWEN_EDIT_REFINE_SAM3]

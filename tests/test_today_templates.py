"""The templates for today's models (Z-Image-Turbo, Flux.2 [klein], Qwen-Image-Edit) and the model
downloads every template names for ComfyUI's missing-models dialog.

- Every loader node of every template carries ``properties.models`` ({name, url, directory}, as the
  frontend reads it): the names are the node's file widget values, the URLs Hugging Face resolve
  URLs, the folders ComfyUI's model folders. SISO Optimize / Subject Score carry DINOv2's.
- Each new template is what the running server's node definitions make of its description (the
  same checks as the SD-Turbo templates, tests/test_server.py), and the server's own prompt
  validation accepts its API form except for the model files this test server lacks.
- The refine route for Flux.2 [klein] runs through the real server from its API twin, with a tiny
  random Flux.2 diffusion model read by the stock UNETLoader and a Flux.2-layout VAE read by the
  stock VAELoader (tests/family_files.py). ComfyUI 0.3.75 fixes Flux.2's heads at 48 x 128 channels,
  so no tiny file is detected there: that test runs on 0.33. The text encoder is the CLIP-L of the
  suite's tiny SD1.5 checkpoint (klein's Qwen3-4B is 8 GB; nothing tiny loads through CLIPLoader
  type flux2), so CLIPLoader is swapped for that checkpoint's CLIP in the prompt. It runs as the
  template is (SISO Subject Mask bypassed: no mask) and with the mask turned on. Qwen-Image-Edit's
  route is checked by validation only: CLIPLoader type qwen_image builds Qwen2.5-VL 7B from the
  fixed widths of ``Qwen25_7BVLI_Config`` (comfy/text_encoders/llama.py; qwen_image.py passes an
  empty config, and only the dtype and quantisation come from the file), so a file with the real
  key names at tiny shapes fails load_state_dict's size check; the Qwen-Image diffusion model reads
  only its input channels and depth from the file.
- The refine templates' optional mask: SISO Subject Mask on the zero-shot picture, bypassed, its
  MASK into SISO Optimize's mask; the default prompt (and the API twin) has no mask.
"""
from __future__ import annotations

import json
import pathlib
import time

import pytest

import workflow_graphs as graphs
from comfy_server import CKPT_NAME
from conftest import REPO

ALL = graphs.WORKFLOWS + graphs.TODAY_WORKFLOWS + graphs.SAM3_WORKFLOWS
TODAY = graphs.TODAY_WORKFLOWS
SAM3 = graphs.SAM3_WORKFLOWS
FILE_WIDGETS = {**graphs.LOADER_WIDGETS, **graphs.WEIGHT_WIDGETS}


def committed(spec) -> dict:
    return json.loads((REPO / "example_workflows" / f"{spec.name}.json").read_text())


def api_twin(spec) -> dict:
    return json.loads((REPO / "tests" / "workflows" / f"{spec.name}_api.json").read_text())


# ----------------------------------------------------------------------------- model downloads
@pytest.mark.parametrize("spec", ALL, ids=[w.name for w in ALL])
def test_every_loader_names_its_file_with_folder_and_public_url(spec):
    import folder_paths
    ui = committed(spec)
    described = {n.id: n for n in spec.nodes}
    loaders = 0
    for node in ui["nodes"]:
        if node["type"] not in FILE_WIDGETS:
            continue
        files = [described[node["id"]].widgets[w] for w in FILE_WIDGETS[node["type"]]]
        models = node["properties"].get("models")
        if node["type"] in graphs.LOADER_WIDGETS:
            loaders += 1
            assert models, f"{spec.name}: loader {node['id']} {node['type']} has no properties.models"
        else:   # SISO's weight inputs: DINOv2 has a public file, the IR file does not
            assert files[0] == "dinov2_vitl14.safetensors" and models, (node["id"], files, models)
        # the frontend keeps the entries whose name is one of the node's widget values
        assert [m["name"] for m in models] == files, (node["id"], models, files)
        assert all(m["name"] in node["widgets_values"] for m in models)
        for m in models:
            assert set(m) == {"name", "url", "directory"}, m
            # the dialog offers the download only from huggingface.co (or civitai) and for .safetensors
            assert m["url"].startswith("https://huggingface.co/") and "/resolve/main/" in m["url"], m
            assert m["name"].endswith(".safetensors") and m["url"].endswith(".safetensors"), m
            assert m["directory"] in folder_paths.folder_names_and_paths, m
            if node["type"] in graphs.LOADER_WIDGETS and m["directory"] != "loras":
                # the repackaged file keeps its name: the URL ends with it
                assert m["url"].rsplit("/", 1)[1] == m["name"], m
    assert loaders, f"{spec.name} has no loader node"
    note = next(n for n in ui["nodes"] if n["type"] == "Note")["widgets_values"][0]
    assert "ir_features.pth" in note, "the note must name the IR file, which has no download"
    # SISO Subject Mask's checkpoints: their folders and their publishers' URLs (.pth files the
    # frontend lists but does not download; the BERT folder is named in the notes)
    for node in ui["nodes"]:
        if node["type"] in graphs.SEGMENTATION_WIDGETS and not on_sam3(node):
            files = [described[node["id"]].widgets[w] for w in graphs.SEGMENTATION_WIDGETS[node["type"]]]
            models = node["properties"].get("models")
            assert [m["name"] for m in models] == files == list(graphs.SEGMENTATION_DOWNLOADS), (node["id"], models)
            for m in models:
                assert (m["directory"], m["url"]) == graphs.SEGMENTATION_DOWNLOADS[m["name"]], m
                assert m["directory"] in folder_paths.folder_names_and_paths and m["url"].endswith("/" + m["name"]), m


def comfyui_template_downloads() -> dict:
    """{file name: {(directory, url)}} over every template of ComfyUI's own template packages
    installed beside the ComfyUI under test (comfyui-workflow-templates and its parts)."""
    import importlib.metadata
    found = {}

    def walk(value):
        if isinstance(value, dict):
            if {"name", "url", "directory"} <= set(value) and isinstance(value["url"], str):
                found.setdefault(value["name"], set()).add((value["directory"], value["url"]))
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    for dist in importlib.metadata.distributions():
        if not (dist.metadata["Name"] or "").lower().replace("_", "-").startswith("comfyui-workflow-templates"):
            continue
        for file in dist.files or ():
            if file.suffix == ".json" and "templates" in file.parts:
                try:
                    walk(json.loads(pathlib.Path(dist.locate_file(file)).read_text(encoding="utf-8")))
                except (OSError, ValueError):
                    continue
    return found


def test_a_file_comfyuis_own_templates_offer_is_offered_from_where_they_offer_it():
    """The missing-models dialog downloads from the URL a template names; ComfyUI's own templates
    (checked by Comfy-Org) name where Comfy-Org's repackaged files are. A file name both offer comes
    from one of their (folder, URL) pairs: the Flux.2 [klein] model and VAE were named under a
    repository none of their templates uses."""
    theirs = comfyui_template_downloads()
    assert theirs, "no ComfyUI template package found (ComfyUI's requirements install one)"
    shared = {name: entry for name, entry in graphs.MODEL_FILES.items() if name in theirs}
    assert shared, "no file of these templates is in ComfyUI's own: nothing was compared"
    wrong = {name: (entry, sorted(theirs[name])) for name, entry in shared.items() if entry not in theirs[name]}
    assert not wrong, wrong


def on_sam3(node: dict) -> bool:
    """A SISO Subject Mask whose sam3_model is connected (its SAM / Grounding DINO files are unused)."""
    return any(i["name"] == "sam3_model" and i.get("link") is not None for i in node["inputs"])


@pytest.mark.parametrize("spec", TODAY, ids=[w.name for w in TODAY])
def test_the_note_names_every_file_and_where_to_get_it(spec):
    note = spec.note
    for node in spec.nodes:
        for widget in graphs.LOADER_WIDGETS.get(node.type, ()):
            name = node.widgets[widget]
            directory, url = graphs.MODEL_FILES[name]
            assert f"models/{directory}/{name}" in note and url in note, name
    assert "Kaggle" in note and "yairshp/SISO" in note


REFINE = [graphs.FLUX2_KLEIN_REFINE, graphs.QWEN_EDIT_REFINE]
REFINE_AND_SAM3 = REFINE + [graphs.FLUX2_KLEIN_REFINE_SAM3, graphs.QWEN_EDIT_REFINE_SAM3]
MASK_NODE, MASK_PREVIEW, DECODE, OPTIMIZE = 29, 30, 13, 14


@pytest.mark.parametrize("spec", REFINE_AND_SAM3, ids=[w.name for w in REFINE_AND_SAM3])
def test_the_refine_template_keeps_the_background_only_when_the_mask_is_turned_on(spec, object_info):
    """SISO Subject Mask on the zero-shot picture, its MASK into SISO Optimize's mask, bypassed (mode
    4) with its preview: the default route (and the API twin) has no mask; Ctrl+B on both gives
    SISO Optimize the mask. The frontends (1.32 and 1.49) hand a bypassed node's output on only from
    an input of the same type; SISO Subject Mask has no MASK input, so its MASK gives no value and
    the optional input is left out of the prompt (graphs.resolve_link; tests/test_browser.py
    compares graphs.ui_to_api with the frontend's own graphToPrompt)."""
    ui = committed(spec)
    nodes = {n["id"]: n for n in ui["nodes"]}
    assert nodes[MASK_NODE]["type"] == "SubjectMask" and nodes[MASK_NODE]["mode"] == graphs.BYPASS
    assert nodes[MASK_PREVIEW]["type"] == "PreviewImage" and nodes[MASK_PREVIEW]["mode"] == graphs.BYPASS
    links = {l[0]: l for l in ui["links"]}
    image = next(i for i in nodes[MASK_NODE]["inputs"] if i["name"] == "image")
    assert links[image["link"]][1:3] == [DECODE, 0]                      # the zero-shot picture
    mask = next(i for i in nodes[OPTIMIZE]["inputs"] if i["name"] == "mask")
    assert links[mask["link"]][1:3] == [MASK_NODE, 0]
    assert graphs.resolve_link(ui, mask["link"], "MASK") is None          # no MASK input to hand on
    default = graphs.ui_to_api(ui, object_info)
    assert "mask" not in default[str(OPTIMIZE)]["inputs"] and str(MASK_NODE) not in default
    assert api_twin(spec).keys() == default.keys()      # the API twin (test settings) has the same nodes
    assert "Ctrl+B" in spec.note and "ReNoise" not in spec.note
    bypassed = {n["id"] for n in nodes.values() if n["mode"] == graphs.BYPASS}
    # the SAM3 variants: the SAM3 loader is bypassed with the mask, and turned on with it
    assert bypassed == {MASK_NODE, MASK_PREVIEW} | ({max(n.id for n in spec.nodes)} if spec in graphs.SAM3_WORKFLOWS else set())
    for node in nodes.values():
        if node["id"] in bypassed:
            node["mode"] = 0
    turned_on = graphs.ui_to_api(ui, object_info)
    assert turned_on[str(OPTIMIZE)]["inputs"]["mask"] == [str(MASK_NODE), 0]
    assert turned_on[str(MASK_NODE)]["inputs"]["image"] == [str(DECODE), 0]
    # the mask is made at the size SISO Optimize makes its picture (KSampler's latent)
    latent = default["11"]["inputs"]
    assert (latent["width"], latent["height"]) == (default[str(OPTIMIZE)]["inputs"]["width"],
                                                   default[str(OPTIMIZE)]["inputs"]["height"])


# ----------------------------------------------------------------------------- against the server's nodes
@pytest.mark.parametrize("spec", TODAY, ids=[w.name for w in TODAY])
def test_today_template_is_what_the_server_nodes_make_of_it(spec, object_info, monkeypatch):
    import test_server
    test_server.test_committed_workflows_are_what_the_server_nodes_make_of_their_description(spec, object_info)
    # the model files are the user's to place: their dropdowns may name files this server lacks
    monkeypatch.setattr(test_server, "USER_FILE_COMBOS",
                        test_server.USER_FILE_COMBOS | {"unet_name", "clip_name", "vae_name", "lora_name"})
    test_server.test_ui_example_workflow_matches_server(spec, object_info)


@pytest.mark.parametrize("spec", TODAY, ids=[w.name for w in TODAY])
def test_the_server_validates_the_template_up_to_its_absent_model_files(spec, server, object_info):
    """POST /prompt with the template as the frontend would send it (no test overrides): ComfyUI's
    own validation refuses it only for the model files that this test server does not hold, each
    reported on its loader's file input; every other input, link and type is accepted."""
    import uuid
    prompt = graphs.ui_to_api(committed(spec), object_info)
    code, body = server.post("/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex})
    assert code == 400, (code, body)
    expected = {str(n.id): set(graphs.LOADER_WIDGETS[n.type]) for n in spec.nodes if n.type in graphs.LOADER_WIDGETS}
    errors = body.get("node_errors", {})
    got = {}
    for node_id, entry in errors.items():
        for error in entry["errors"]:
            assert error["type"] == "value_not_in_list", (node_id, error)
            got.setdefault(node_id, set()).add(error["extra_info"]["input_name"])
    assert got == expected, json.dumps(errors, indent=1)[:3000]


# ----------------------------------------------------------------------------- the refine route, run
TINY_UNET, TINY_VAE = "siso_tiny_flux2.safetensors", "siso_tiny_flux2_vae.safetensors"


@pytest.fixture(scope="module")
def flux2_files(server):
    import family_files
    try:
        family_files.tiny_flux2_state_dict()
    except AssertionError as error:
        pytest.skip(f"no tiny Flux.2 file is detected by this ComfyUI: {error}")
    started = time.monotonic()
    family_files.write_tiny_flux2_files(server.base / "models" / "diffusion_models" / TINY_UNET,
                                        server.base / "models" / "vae" / TINY_VAE)
    print(f"\nwrote the tiny Flux.2 files in {time.monotonic() - started:.1f} s")


def with_the_tiny_text_encoder(prompt: dict) -> dict:
    """The tiny files in the prompt, and the tiny SD1.5 checkpoint's CLIP-L (output 1) as the text
    encoder instead of CLIPLoader's (output 0)."""
    assert prompt["1"]["inputs"]["unet_name"] == TINY_UNET and prompt["3"]["inputs"]["vae_name"] == TINY_VAE
    assert prompt["2"]["class_type"] == "CLIPLoader"
    prompt["2"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT_NAME}}
    for node in prompt.values():
        for name, value in node["inputs"].items():
            if value == ["2", 0]:
                node["inputs"][name] = ["2", 1]
    return prompt


def test_refine_flux2_klein_route_runs_through_the_server(server, flux2_files):
    from PIL import Image

    from test_server import run_prompt
    prompt = with_the_tiny_text_encoder(api_twin(graphs.FLUX2_KLEIN_REFINE))
    assert "mask" not in prompt[str(OPTIMIZE)]["inputs"]     # the default route: the mask is bypassed
    started = time.monotonic()
    entry = run_prompt(server, prompt)
    outputs = entry["outputs"]

    report = outputs.get("14", {}).get("text", [])
    assert report and "iteration cap reached after 3 iterations" in report[0], outputs.get("14")
    assert outputs.get("19", {}).get("text") == ["siso_refine_flux2_klein_test.safetensors"], outputs.get("19")
    lora = server.base / "models" / "loras" / "siso_refine_flux2_klein_test.safetensors"
    import safetensors
    with safetensors.safe_open(str(lora), "pt") as f:
        keys = list(f.keys())
        metadata = f.metadata() or {}
    assert keys and all(k.startswith("diffusion_model.") for k in keys), keys[:4]
    assert metadata.get("siso.model", "").startswith("Flux2"), metadata

    # SISO Subject Score: the zero-shot picture (0) and the refined one (1), side by side
    table = outputs.get("16", {}).get("text", [])
    assert table and table[0].count("\n") >= 2, outputs.get("16")
    for key in ("17", "28"):   # zero-shot | refined, and the two best first (28 makes the score run)
        assert len(outputs.get(key, {}).get("images", [])) == 2, (key, outputs.get(key))
    for key, count in (("18", 1), ("26", 1)):
        images = outputs.get(key, {}).get("images", [])
        assert len(images) == count, (key, outputs.get(key))
        with Image.open(server.base / images[0]["type"] / images[0].get("subfolder", "") / images[0]["filename"]) as png:
            assert png.size == (64, 64), png.size
    print(f"\nrefine route (Flux.2 klein, tiny) through the server: {time.monotonic() - started:.1f} s; {report[0]}\n{table[0]}")


def test_refine_flux2_klein_route_with_the_mask_turned_on_keeps_the_background(server, flux2_files, object_info):
    """The template with SISO Subject Mask and its preview turned on (what Ctrl+B does: mode 0), as
    the frontend sends it: the mask of the zero-shot picture (the tiny random Grounding DINO and
    SAM of the test server, thresholds 0 so they find something) reaches SISO Optimize, whose
    report gives the background error of its best iteration."""
    from test_server import run_prompt
    ui = committed(graphs.FLUX2_KLEIN_REFINE)
    for node in ui["nodes"]:
        if node["id"] in (MASK_NODE, MASK_PREVIEW):
            node["mode"] = 0
    overrides = dict(graphs.FLUX2_KLEIN_REFINE.test_overrides)
    overrides[MASK_NODE] = dict(graphs.ANY_DETECTION, keep="most confident", grow_pixels=0)
    prompt = with_the_tiny_text_encoder(graphs.ui_to_api(ui, object_info, overrides))
    assert prompt[str(OPTIMIZE)]["inputs"]["mask"] == [str(MASK_NODE), 0]
    started = time.monotonic()
    outputs = run_prompt(server, prompt)["outputs"]
    report = outputs.get(str(OPTIMIZE), {}).get("text", [])
    assert report and "iteration cap reached after 3 iterations" in report[0], outputs.get(str(OPTIMIZE))
    assert "background error" in report[0], report[0]
    assert len(outputs.get(str(MASK_PREVIEW), {}).get("images", [])) == 1, outputs.get(str(MASK_PREVIEW))
    print(f"\nrefine route with the mask (Flux.2 klein, tiny) through the server: {time.monotonic() - started:.1f} s; "
          f"{report[0]}")


# ----------------------------------------------------------------------------- SAM3 (ComfyUI 0.22 and later)
@pytest.mark.parametrize("spec", SAM3, ids=[w.name for w in SAM3])
def test_the_sam3_template_needs_one_mask_file_read_by_the_stock_loader(spec, object_info, monkeypatch):
    """SISO Subject Mask's sam3_model and sam3_clip come from one stock Load Checkpoint of the SAM3
    file, which carries its download; no SAM, Grounding DINO or BERT file is named anywhere. Every
    node type exists on ComfyUI 0.3.75 too, so the file opens there (its SAM3 file does not load)."""
    from conftest import siso
    host = siso("siso_ops.host")
    assert graphs.SAM3_FILE == host.SAM3_FILE and graphs.MODEL_FILES[host.SAM3_FILE] == ("checkpoints", host.SAM3_URL)
    assert graphs.UNUSED_WITH_SAM3 == siso("nodes.mask").UNUSED_WITH_SAM3
    ui = committed(spec)
    nodes = {n["id"]: n for n in ui["nodes"]}
    links = {l[0]: l for l in ui["links"]}
    masks = [n for n in nodes.values() if n["type"] == "SubjectMask"]
    assert masks and all(on_sam3(n) for n in masks)
    for mask in masks:
        linked = {i["name"]: links[i["link"]] for i in mask["inputs"] if i.get("link") is not None}
        loader = nodes[linked["sam3_model"][1]]
        assert loader["type"] == "CheckpointLoaderSimple" and loader["widgets_values"][0] == host.SAM3_FILE
        assert linked["sam3_model"][1:3] == [loader["id"], 0] and linked["sam3_clip"][1:3] == [loader["id"], 1]
        assert loader["properties"]["models"] == [{"name": host.SAM3_FILE, "url": host.SAM3_URL, "directory": "checkpoints"}]
        assert not mask["properties"].get("models")
    text = json.dumps(ui)
    for name in list(graphs.SEGMENTATION_DOWNLOADS) + ["bert-base-uncased", "GroundingDINO_SwinT_OGC"]:
        assert name not in text, name
    assert host.SAM3_FILE in spec.note and host.SAM3_URL in spec.note and "0.22" in spec.note
    import test_server
    test_server.test_committed_workflows_are_what_the_server_nodes_make_of_their_description(spec, object_info)
    monkeypatch.setattr(test_server, "USER_FILE_COMBOS",
                        test_server.USER_FILE_COMBOS | {"unet_name", "clip_name", "vae_name", "lora_name"})
    test_server.test_ui_example_workflow_matches_server(spec, object_info)


def outputs_needing(prompt: dict, class_type: str) -> set:
    """The nodes of an API prompt that need (through links) a node of ``class_type``."""
    needing = {key for key, node in prompt.items() if node["class_type"] == class_type}
    while True:
        more = {key for key, node in prompt.items() if key not in needing and any(
            isinstance(v, list) and len(v) == 2 and v[0] in needing for v in node["inputs"].values())}
        if not more:
            return needing
        needing |= more


@pytest.mark.parametrize("spec", SAM3, ids=[w.name for w in SAM3])
def test_the_server_validates_the_sam3_template_up_to_its_absent_model_files(spec, server, object_info):
    """Where ComfyUI has SAM3, POST /prompt refuses the template only for the model files this
    test server lacks (the SAM3 file; the turbo checkpoint where absent); SISO Subject Mask's unused
    SAM / Grounding DINO dropdowns are not refused, as sam3_model and sam3_clip are connected.
    ComfyUI would queue the outputs that do not depend on a refused node (the inversion check):
    the prompt names the outputs that need the mask as its targets, so nothing is queued."""
    import uuid
    if "SAM3_Detect" not in object_info:
        from conftest import siso
        pytest.skip(f"SAM3 needs ComfyUI >= {siso('siso_ops.host').SAM3_SINCE} (its stock SAM3_Detect node); "
                    "this test server has none")
    ui = committed(spec)
    for node in ui["nodes"]:     # the refine templates' optional mask, turned on (Ctrl+B)
        node["mode"] = 0 if node["mode"] == graphs.BYPASS else node["mode"]
    prompt = graphs.ui_to_api(ui, object_info)
    masked = [key for key in outputs_needing(prompt, "SubjectMask") if object_info[prompt[key]["class_type"]].get("output_node")]
    assert masked
    code, body = server.post("/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex,
                                         "partial_execution_targets": masked})
    assert code == 400, (code, body)
    needed = set(masked)
    while True:      # the nodes the targets need
        more = {v[0] for key in needed for v in prompt[key]["inputs"].values()
                if isinstance(v, list) and len(v) == 2 and isinstance(v[0], str)} - needed
        if not more:
            break
        needed |= more
    expected = {}
    for key in needed:
        node = prompt[key]
        for widget in graphs.LOADER_WIDGETS.get(node["class_type"], ()):
            spec_of_files = object_info[node["class_type"]]["input"]["required"][widget]
            held = spec_of_files[0] if isinstance(spec_of_files[0], list) else spec_of_files[1]["options"]
            if node["inputs"][widget] not in held:
                expected.setdefault(key, set()).add(widget)
    sam3_loader = next(n for n in spec.nodes if n.type == "CheckpointLoaderSimple" and n.widgets["ckpt_name"] == graphs.SAM3_FILE)
    assert str(sam3_loader.id) in expected
    got = {}
    for node_id, entry in body.get("node_errors", {}).items():
        for error in entry["errors"]:
            assert error["type"] == "value_not_in_list", (node_id, error)
            got.setdefault(node_id, set()).add(error["extra_info"]["input_name"])
    assert got == expected, json.dumps(body, indent=1)[:3000]

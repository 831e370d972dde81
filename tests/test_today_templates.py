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
  type flux2), so CLIPLoader is swapped for that checkpoint's CLIP in the prompt. Qwen-Image-Edit's
  route is checked by validation only: its text encoder (Qwen2.5-VL 7B, widths fixed in ComfyUI's
  code) has no tiny file either.
"""
from __future__ import annotations

import json
import time

import pytest

import workflow_graphs as graphs
from comfy_server import CKPT_NAME
from conftest import REPO

ALL = graphs.WORKFLOWS + graphs.TODAY_WORKFLOWS
TODAY = graphs.TODAY_WORKFLOWS
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


@pytest.mark.parametrize("spec", TODAY, ids=[w.name for w in TODAY])
def test_the_note_names_every_file_and_where_to_get_it(spec):
    note = spec.note
    for node in spec.nodes:
        for widget in graphs.LOADER_WIDGETS.get(node.type, ()):
            name = node.widgets[widget]
            directory, url = graphs.MODEL_FILES[name]
            assert f"models/{directory}/{name}" in note and url in note, name
    assert "Kaggle" in note and "yairshp/SISO" in note


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


def test_refine_flux2_klein_route_runs_through_the_server(server, flux2_files):
    from PIL import Image

    from test_server import run_prompt
    prompt = api_twin(graphs.FLUX2_KLEIN_REFINE)
    assert prompt["1"]["inputs"]["unet_name"] == TINY_UNET and prompt["3"]["inputs"]["vae_name"] == TINY_VAE
    # the text encoder: the tiny SD1.5 checkpoint's CLIP-L (output 1) instead of CLIPLoader's (output 0)
    assert prompt["2"]["class_type"] == "CLIPLoader"
    prompt["2"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT_NAME}}
    for node in prompt.values():
        for name, value in node["inputs"].items():
            if value == ["2", 0]:
                node["inputs"][name] = ["2", 1]
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

"""Single-image DreamBooth beside SISO: the template "SISO or DreamBooth for this subject?"
(example_workflows/siso_or_dreambooth.json) through the real server on the tiny SD1.5.

- The template is made with ComfyUI 0.33's Train LoRA node (TrainLoraNode): a UI workflow's widget
  values are positional and 0.3.75's node lacks five of 0.33's widgets, so the template checks
  skip on 0.3.75 with that reason. The route itself needs only what both have: Train LoRA takes a
  LATENT list and a CONDITIONING list and, at batch size 1, pairs each sample with its own prompt
  (``fwd_bwd``: ``conds["positive"] = [cond[i] for i in indices]``). So the API twin runs on both:
  0.3.75 ignores the 0.33-only inputs, and its Train LoRA gives the trained MODEL before the LoRA,
  so the links from it move by one slot there (``for_this_train_lora``).
- Both routes render the same two prompts at the same seed; SISO Subject Score ranks all eight
  renders with DINO, IR and the diversity figure (MSE to the subject photo).
- The DreamBooth LoRA, saved by the stock Save LoRA Weights (to output/loras), moved to
  models/loras and loaded by the stock LoraLoaderModelOnly, renders what the in-graph LoRA did.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import workflow_graphs as graphs
from conftest import REPO

SPEC = graphs.SISO_OR_DREAMBOOTH
SCORE, SISO_RENDERS, DB_RENDERS, ALL_RENDERS, TRAINING_SET, OPTIMIZE, CLASS_PREVIEW = "71", "72", "73", "74", "14", "5", "19"


def api_twin() -> dict:
    return json.loads((REPO / "tests" / "workflows" / f"{SPEC.name}_api.json").read_text())


@pytest.fixture(scope="module")
def made_for_this_comfyui(object_info):
    gap = graphs.version_gap(SPEC, object_info)
    if gap:
        pytest.skip(gap)


def test_the_template_is_what_the_server_nodes_make_of_it(object_info, made_for_this_comfyui):
    import test_server
    test_server.test_committed_workflows_are_what_the_server_nodes_make_of_their_description(SPEC, object_info)
    test_server.test_ui_example_workflow_matches_server(SPEC, object_info)


def test_both_routes_take_the_same_model_photo_prompts_and_seeds(object_info, made_for_this_comfyui):
    """What makes the comparison fair, read from the prompt the frontend makes of the template."""
    prompt = graphs.ui_to_api(json.loads((REPO / "example_workflows" / f"{SPEC.name}.json").read_text()), object_info)
    samplers = {k: v["inputs"] for k, v in prompt.items() if v["class_type"] == "KSampler" and k != "10"}
    siso = [s for s in samplers.values() if s["model"] == ["6", 0]]
    dreambooth = [s for s in samplers.values() if s["model"] == ["17", 0]]
    assert len(siso) == len(dreambooth) == len(graphs.COMPARE_PROMPTS)
    texts = lambda group: [prompt[s["positive"][0]]["inputs"]["text"] for s in group]  # noqa: E731
    assert [t.replace("a dog ", "") for t in texts(siso)] == [t.replace("a sks dog ", "") for t in texts(dreambooth)]
    settings = lambda s: {k: v for k, v in s.items() if k not in ("model", "positive")}  # noqa: E731
    assert [settings(s) for s in siso] == [settings(s) for s in dreambooth]
    # one checkpoint, one photo: SISO's model and subject, DreamBooth's model, photo and class images
    assert prompt["6"]["inputs"]["model"] == prompt["15"]["inputs"]["model"] == prompt["10"]["inputs"]["model"] == ["1", 0]
    assert prompt["3"]["inputs"]["image"] == prompt["12"]["inputs"]["image"] == ["2", 0]
    assert prompt["15"]["inputs"]["batch_size"] == 1     # a prompt pairs with its own image only at batch size 1
    assert prompt[SCORE]["inputs"]["images"] == ["70", 0]


def run_long_prompt(server, prompt: dict) -> dict:
    """test_server.run_prompt with a longer wait: eight renders, two trainings and the class
    images take minutes on a shared CPU."""
    import uuid
    from comfy_server import _execution_errors, wait_for_history
    code, body = server.post("/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex})
    assert code == 200 and not body.get("node_errors"), f"POST /prompt answered {code}: {json.dumps(body, indent=1)[:4000]}"
    entry = wait_for_history(server, body["prompt_id"], timeout=1800)
    assert entry["status"].get("status_str") == "success", f"prompt failed\n{_execution_errors(entry)}\n{server.log_tail()}"
    return entry


def for_this_train_lora(prompt: dict, object_info: dict | None = None) -> dict:
    """The API form as this ComfyUI's Train LoRA is wired: 0.3.75's gives the trained MODEL first
    (model, lora, loss_map, steps), 0.33's starts with the LoRA (lora, loss_map, steps). Without
    the server's object_info, the in-process ComfyUI's node says (the same ComfyUI)."""
    if object_info is None:
        from comfy_extras.nodes_train import TrainLoraNode
        outputs = [o.io_type for o in TrainLoraNode.define_schema().outputs]
    else:
        outputs = object_info["TrainLoraNode"]["output"]
    shift = outputs.index("LORA_MODEL")
    for node in prompt.values():
        for name, value in node["inputs"].items():
            if isinstance(value, list) and len(value) == 2 and value[0] == "15":
                node["inputs"][name] = ["15", value[1] + shift]
    return prompt


@pytest.fixture(scope="module")
def comparison(server, object_info):
    return run_long_prompt(server, for_this_train_lora(api_twin(), object_info))


def _images(server, output: dict) -> list:
    from PIL import Image
    out = []
    for image in output.get("images", []):
        with Image.open(server.base / image["type"] / image.get("subfolder", "") / image["filename"]) as png:
            out.append(np.asarray(png.convert("RGB")))
    return out


def test_both_routes_run_through_the_server_and_are_scored_with_the_diversity(server, comparison):
    outputs = comparison["outputs"]
    summary = outputs.get(TRAINING_SET, {}).get("text", [""])[0]
    assert "2 subject photo(s)" not in summary and "prior weight 1 " in summary, summary
    assert len(outputs.get(CLASS_PREVIEW, {}).get("images", [])) == 2       # the class images the model drew
    report = outputs.get(OPTIMIZE, {}).get("text", [""])[0]
    assert "iteration cap reached after 2 iterations" in report, report
    for key, count in ((SISO_RENDERS, 4), (DB_RENDERS, 4), (ALL_RENDERS, 8)):
        assert len(_images(server, outputs.get(key, {}))) == count, (key, outputs.get(key))
    table = outputs.get(SCORE, {}).get("text", [""])[0].splitlines()
    assert table[0] == "rank | image | DINO sim | IR sim | score | MSE to subject (diversity)", table[0]
    rows = [line.split(" | ") for line in table[1:]]
    assert sorted(int(r[1]) for r in rows) == list(range(8))
    assert all(len(r) == 6 and 0 < float(r[5]) < 1 for r in rows), table
    # the diversity column is each render's MSE to the subject photo (the photo as LoadImage reads it)
    from PIL import Image
    with Image.open(server.base / "input" / "subject.png") as png:
        photo = np.asarray(png.convert("RGB"), dtype=np.float64) / 255
    renders = _images(server, outputs[SISO_RENDERS]) + _images(server, outputs[DB_RENDERS])
    by_index = {int(r[1]): float(r[5]) for r in rows}
    for i, render in enumerate(renders):     # 64 px renders and photo: no resizing
        assert by_index[i] == pytest.approx(float(((render / 255 - photo) ** 2).mean()), abs=2e-3), i
    print("\nSISO or DreamBooth (tiny SD1.5, random weights):\n" + summary + "\n" + "\n".join(table))


def test_the_dreambooth_lora_loads_in_the_stock_lora_loader(server, comparison):
    """Save LoRA Weights writes output/loras/; moved to models/loras/ the file is listed by
    LoraLoaderModelOnly, and the model it gives renders prompt 1 as the in-graph LoRA did."""
    import safetensors.torch
    saved = sorted((server.base / "output" / "loras").glob("siso_or_dreambooth_test_*.safetensors"))
    assert saved, list((server.base / "output").rglob("*.safetensors"))
    # the file is named by the steps Train LoRA ran (its steps output linked to Save LoRA Weights)
    trained = api_twin()["15"]["inputs"]["steps"]
    assert saved[-1].name.startswith(f"siso_or_dreambooth_test_{trained}_steps_"), saved[-1].name
    tensors = safetensors.torch.load_file(str(saved[-1]))
    assert any(k.startswith("diffusion_model.") for k in tensors), list(tensors)[:4]
    ups = [t for k, t in tensors.items() if "lora_up" in k or k.endswith(".lora.up.weight")]
    assert ups and any(float(t.float().abs().max()) > 0 for t in ups), "the DreamBooth LoRA did not train"
    target = server.base / "models" / "loras" / "dreambooth_subject_test.safetensors"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(saved[-1], target)
    assert "dreambooth_subject_test.safetensors" in server.get("/object_info/LoraLoaderModelOnly")[
        "LoraLoaderModelOnly"]["input"]["required"]["lora_name"][0]

    twin = api_twin()
    keep = {"1", "11", "40", "60", "61", "62"}
    prompt = {k: v for k, v in twin.items() if k in keep}
    prompt["17"] = {"class_type": "LoraLoaderModelOnly",
                    "inputs": {"model": ["1", 0], "lora_name": target.name, "strength_model": 1.0}}
    prompt["80"] = {"class_type": "PreviewImage", "inputs": {"images": ["62", 0]}}
    # the same prompt on the checkpoint alone: the LoRA must change the render
    prompt["81"] = dict(twin["61"], inputs=dict(twin["61"]["inputs"], model=["1", 0]))
    prompt["82"] = {"class_type": "VAEDecode", "inputs": {"samples": ["81", 0], "vae": ["1", 2]}}
    prompt["83"] = {"class_type": "PreviewImage", "inputs": {"images": ["82", 0]}}
    outputs = run_long_prompt(server, prompt)["outputs"]
    loaded, base = _images(server, outputs["80"]), _images(server, outputs["83"])
    in_graph = _images(server, comparison["outputs"][DB_RENDERS])[:2]
    assert len(loaded) == 2 and all(np.array_equal(a, b) for a, b in zip(loaded, in_graph))
    assert any(not np.array_equal(a, b) for a, b in zip(loaded, base)), "the LoRA changes nothing"


def test_searching_siso_finds_every_node_of_the_pack(object_info):
    """The node search reads a node's name, display name and (0.33) search aliases: every other
    node of the pack says SISO in its display name, DreamBooth Training Set (the paper's baseline)
    through its aliases where this ComfyUI's Schema takes them, detected, not assumed."""
    import dataclasses
    from comfy_api.v0_0_2 import io
    from conftest import pack_node_ids
    info = object_info["DreamBoothTrainingSet"]
    if "search_aliases" in {f.name for f in dataclasses.fields(io.Schema)}:
        assert "SISO DreamBooth" in info["search_aliases"], info.get("search_aliases")
    else:
        assert not info.get("search_aliases")
    others = [n for n in pack_node_ids() if n != "DreamBoothTrainingSet"]
    assert len(others) == 8 and all("SISO" in object_info[n]["display_name"] for n in others)

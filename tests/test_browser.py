"""The pack in a real browser: headless Debian Chromium, driven by Playwright, on the frontend
the test server serves. Each example workflow is opened from ComfyUI's template browser, the
two-stage one is queued from the page, and the live chart is read back from screenshots, with the
classic canvas renderer and with Nodes 2.0 (the Vue node renderer).

Chromium comes from Debian (`make test` installs it with apt-get, as root), or SISO_CHROMIUM
names another Chromium or Chrome executable. Where none is found these tests skip, saying how to
get one (tests/pytest.ini prints every skip's reason), as a missing optional pack does; under CI
(CI=true) they FAIL: a skip there would hide that the browser path was never checked.
SISO_SCREENSHOTS=<folder> (`make screenshots`) also writes the README's screenshots and the
template thumbnails."""
from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import time

import pytest

import workflow_graphs as graphs
from conftest import REPO

CHROMIUM = "/usr/bin/chromium"     # Debian's, which `make test` installs
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PACK = "comfyui_siso"
SHOTS = os.environ.get("SISO_SCREENSHOTS")
BLUE, ORANGE, WHITE = (0x4D, 0xA3, 0xFF), (0xFF, 0x9F, 0x40), (0xF0, 0xF0, 0xF0)


def chromium_or_skip() -> str:
    """The browser to drive: SISO_CHROMIUM if set, else Debian's chromium, else a Chromium or Chrome
    on the PATH. Where there is none, third_party's rule for anything optional a test needs: a
    skip that says how to get one, or under CI a failure."""
    import third_party
    chosen = os.environ.get("SISO_CHROMIUM", "").strip()
    if chosen:
        if os.path.isfile(chosen) or shutil.which(chosen):
            return chosen
        missing = f"SISO_CHROMIUM={chosen!r} names no file"
    else:
        if os.path.exists(CHROMIUM):
            return CHROMIUM
        found = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
        if found:
            return found
        missing = f"no Chromium: {CHROMIUM} is missing and there is no chromium, chromium-browser or google-chrome on the PATH"
    third_party.skip_or_fail(missing + ". To run the browser tests, install Debian's chromium (`make test` does, as root: "
                             "apt-get install chromium) or set SISO_CHROMIUM to a Chromium or Chrome executable")


def test_a_missing_chromium_skips_saying_how_and_fails_under_ci(monkeypatch, tmp_path):
    from _pytest.outcomes import Failed, Skipped
    monkeypatch.setenv("SISO_CHROMIUM", str(tmp_path / "no-such-browser"))
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(Skipped, match="SISO_CHROMIUM=.*no-such-browser.* names no file.*apt-get install chromium"):
        chromium_or_skip()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(Failed, match="names no file"):
        chromium_or_skip()
    browser = tmp_path / "my-chromium"
    browser.write_text("")
    monkeypatch.setenv("SISO_CHROMIUM", str(browser))
    assert chromium_or_skip() == str(browser)


@pytest.fixture(scope="module")
def chromium():
    return chromium_or_skip()


@pytest.fixture(scope="module")
def page(chromium, server, tmp_path_factory):     # the browser first: no server is started without one
    from playwright.sync_api import sync_playwright
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=chromium, args=FLAGS, headless=True,
            viewport={"width": 1600, "height": 1000})
        page = context.new_page()
        page.console_messages = []
        page.on("console", lambda m: page.console_messages.append((m.type, m.text)))
        page.goto(server.url)
        page.wait_for_function("() => window.app && window.app.graph && window.LiteGraph", timeout=180_000)
        yield page
        context.close()


def close_restored_dialogs(page):
    """1.32 reopens the last workflow on reload, and with it its missing-models dialog (after a
    template whose files this server lacks): close it, as a user does, before the next click."""
    for _ in range(3):
        if page.locator(".p-dialog-mask").count():
            page.keyboard.press("Escape")
            page.wait_for_timeout(700)
    page.locator(".p-dialog-mask").first.wait_for(state="detached", timeout=30_000)


def open_template(page, name: str):
    """Through the template browser, as a user does: Templates > the pack's entry > the card."""
    page.locator(".p-dialog-mask.p-overlay-mask-leave").first.wait_for(state="detached", timeout=60_000)
    # frontend 1.32 (ComfyUI 0.3.75): a PrimeVue .p-dialog; 1.49 (0.33): its own role="dialog"
    dialog = page.locator(".p-dialog, [role=dialog]")
    entry = dialog.get_by_text(PACK, exact=True).first
    try:   # on a first visit ComfyUI opens the template browser by itself
        entry.wait_for(state="visible", timeout=15_000)
    except Exception:
        close_restored_dialogs(page)
        page.get_by_text("Templates", exact=True).first.click()
        entry.wait_for(state="visible", timeout=30_000)
    page.wait_for_timeout(500)   # the dialog's opening animation
    entry.click()
    dialog.get_by_text(name, exact=True).first.click()
    # the dialog closes with an animation whose mask would swallow the next click
    page.locator(".p-dialog-mask").first.wait_for(state="detached", timeout=60_000)
    page.wait_for_function(f"() => app.graph.nodes.some(n => n.type === 'SISOOptimize' || n.type === 'ReNoiseInvert')"
                           f" && document.title.includes('{name}')", timeout=60_000)
    time.sleep(1.0)


def graph_problems(page) -> list:
    return page.evaluate("""() => app.graph.nodes.flatMap(n => {
        const problems = [];
        if (!LiteGraph.registered_node_types[n.type]) problems.push(`${n.id} ${n.type}: node type not registered`);
        if (n.has_errors) problems.push(`${n.id} ${n.type}: has errors`);
        for (const w of n.widgets || []) if (w.value === undefined) problems.push(`${n.id} ${n.type}.${w.name}: no value`);
        return problems;
    })""")


def save_shot(page, name: str, clip=None):
    if SHOTS:
        pathlib.Path(SHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(pathlib.Path(SHOTS) / name), clip=clip)


@pytest.mark.parametrize("spec", graphs.WORKFLOWS + graphs.TRAINING_WORKFLOWS,
                         ids=[w.name for w in graphs.WORKFLOWS + graphs.TRAINING_WORKFLOWS])
def test_each_example_workflow_opens_from_the_template_browser_without_warnings(page, object_info, spec):
    """Also the comparison template "SISO or DreamBooth", on the ComfyUI it is made with (0.33's
    Train LoRA: its widget values are positional, so on 0.3.75 this skips with the reason)."""
    gap = graphs.version_gap(spec, object_info)
    if gap:
        pytest.skip(gap)
    before = len(page.console_messages)
    open_template(page, spec.name)
    assert graph_problems(page) == []
    # node ids are numbers in frontend 1.32 and strings in 1.49
    loaded = page.evaluate("() => app.graph.nodes.map(n => [Number(n.id), n.type])")
    expected = [[n.id, n.type] for n in spec.nodes] + [[max(n.id for n in spec.nodes) + 1, "Note"]]
    assert sorted(loaded) == sorted(expected)
    # the values the user sees are the saved ones (no widget shifted or dropped)
    widgets = page.evaluate("() => Object.fromEntries(app.graph.nodes.map(n => [n.id, (n.widgets || []).map(w => [w.name, w.value])]))")
    for node in spec.nodes:
        shown = dict(widgets[str(node.id)])
        for name, value in node.widgets.items():
            assert shown.get(name) == value, (node.id, node.type, name, shown.get(name), value)
    text = page.inner_text("body").lower()
    assert "missing" not in text, "the page shows a missing-node/model warning"
    warnings = [m for m in page.console_messages[before:] if "missing" in m[1].lower() or "widget" in m[1].lower()]
    assert warnings == [], warnings
    page.screenshot(path=str(pathlib.Path(os.environ.get("TMPDIR", "/tmp")) / f"siso-{spec.name}.png"))
    if SHOTS:
        save_shot(page, f"workflow_{spec.name}.png")
        page.screenshot(path=str(REPO / "example_workflows" / f"{spec.name}.jpg"), type="jpeg", quality=70,
                        clip={"x": 60, "y": 80, "width": 1200, "height": 900})


def set_widgets(page, overrides: dict):
    """Type values into the loaded workflow's widgets, as a user would (test files, small sizes)."""
    page.evaluate("""(overrides) => {
        for (const [id, values] of Object.entries(overrides)) {
            const node = app.graph.getNodeById(Number(id));
            for (const [name, value] of Object.entries(values)) node.widgets.find(w => w.name === name).value = value;
        }
    }""", {str(k): v for k, v in overrides.items()})


def chart_element(page, node_id: int):
    """The chart's own <canvas> (a DOM widget), brought into view on the graph canvas."""
    page.evaluate("""(id) => {
        const node = app.graph.getNodeById(id);
        const ds = app.canvas?.ds;
        if (ds) { ds.scale = 1.0; ds.offset = [80 - node.pos[0], 120 - node.pos[1]]; }
        app.canvas?.setDirty(true, true);
    }""", node_id)
    chart = page.locator(f"canvas.siso-chart[data-node='{node_id}']")
    chart.wait_for(state="visible", timeout=60_000)
    page.wait_for_timeout(300)   # the frontend places DOM widgets on its next frame
    # A tall node (Nodes 2.0 cards are) can end below the window: move the graph up until the
    # chart's bottom edge is inside it (the page itself does not scroll).
    page.evaluate("""(id) => {
        const rect = document.querySelector(`canvas.siso-chart[data-node='${id}']`).getBoundingClientRect();
        const below = rect.bottom - (window.innerHeight - 20);
        const ds = app.canvas?.ds;
        if (ds && below > 0) { ds.offset[1] -= below / ds.scale; app.canvas.setDirty(true, true); }
    }""", node_id)
    page.wait_for_timeout(300)
    return chart


def colour_pixels(png: bytes, colour, tolerance=40) -> int:
    import io
    import numpy as np
    from PIL import Image
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    return int((np.abs(pixels - np.array(colour)).sum(-1) < tolerance).sum())


def queue_two_stage(page, iterations: int, lora_name: str, seed: int = 0):
    """Open the two-stage template, point it at the test files and queue it from the page.
    (Another seed per run: ComfyUI would answer an identical SISO Optimize from its cache.)"""
    spec = graphs.TWO_STAGE
    open_template(page, spec.name)
    overrides = dict(spec.test_overrides)
    overrides[5] = dict(overrides[5], max_iterations=iterations, early_stop_patience=max(50, iterations), seed=seed)
    overrides[13] = dict(overrides[13], name=lora_name)
    set_widgets(page, overrides)
    page.evaluate("() => app.queuePrompt(0, 1)")


RENDERERS = {"classic canvas": False, "Nodes 2.0 (Vue)": True}


def use_renderer(page, vue: bool):
    """Switch ComfyUI's node renderer (setting Comfy.VueNodes.Enabled, in ComfyUI's frontend
    1.32 and 1.49 alike) and reload the page, as a user does from the settings dialog."""
    page.evaluate("""async (on) => {
        const settings = app.extensionManager?.setting;
        if (settings?.set) await settings.set('Comfy.VueNodes.Enabled', on);
        else await app.ui.settings.setSettingValueAsync('Comfy.VueNodes.Enabled', on);
    }""", vue)
    page.reload()
    page.wait_for_function("() => window.app && window.app.graph && window.LiteGraph", timeout=180_000)


def assert_renderer(page, vue: bool):
    # Nodes 2.0 draws each node as a DOM element carrying data-node-id; the classic canvas does not.
    assert page.evaluate("() => app.extensionManager?.setting?.get?.('Comfy.VueNodes.Enabled') ?? "
                         "app.ui.settings.getSettingValue('Comfy.VueNodes.Enabled')") is vue
    assert (page.locator("[data-node-id]").count() > 0) is vue


@pytest.mark.parametrize("renderer", list(RENDERERS))
def test_queued_from_the_page_the_live_chart_updates_every_iteration(page, renderer):
    vue = RENDERERS[renderer]
    use_renderer(page, vue)
    page.evaluate("""() => {
        window.__sisoSeen = [];
        window.comfyAPI.api.api.addEventListener('siso.progress', e => window.__sisoSeen.push([e.detail.state, e.detail.iteration]));
    }""")
    queue_two_stage(page, iterations=5, lora_name=f"browser_lora_{int(vue)}", seed=int(vue))
    assert_renderer(page, vue)
    page.wait_for_function("() => (window.__sisoSeen || []).some(([s, i]) => s === 'running' && i >= 2)", timeout=300_000)
    mid = chart_element(page, 5).screenshot()
    page.wait_for_function("() => window.__sisoSeen.some(([s]) => s === 'done')", timeout=300_000)
    time.sleep(0.5)
    chart = chart_element(page, 5)
    final = chart.screenshot()
    seen = page.evaluate("() => window.__sisoSeen")
    assert [i for s, i in seen if s == "running"] == [1, 2, 3, 4, 5], seen
    state = page.evaluate("() => app.graph.getNodeById(5).sisoState")
    assert state["state"] == "done" and "iteration cap reached after 5 iterations" in state["reason"]
    # the chart really is drawn on the page: the loss (white) and both similarity lines (blue, orange)
    for colour in (WHITE, BLUE, ORANGE):
        assert colour_pixels(final, colour) > 15, colour
    assert final != mid, "the chart did not change between iteration 2 and the end"
    report = page.evaluate("() => app.graph.getNodeById(5).widgets.find(w => w.name === 'siso_report')?.value")
    assert report and "iteration cap reached" in report
    # The stop report is drawn at the chart's top in both renderers (the report text widget is
    # not refreshed by Nodes 2.0 of frontend 1.32 when its value changes from code).
    assert "iteration cap reached after 5 iterations" in chart.get_attribute("data-status")
    if SHOTS and not vue:
        box = chart.bounding_box()
        save_shot(page, "live_chart.png", clip={"x": box["x"] - 20, "y": max(box["y"] - 560, 0),
                                                "width": box["width"] + 40, "height": min(box["height"] + 600, 1000)})
    if SHOTS and vue:
        save_shot(page, "live_chart_nodes2.png")


@pytest.mark.parametrize("renderer", list(RENDERERS))
def test_a_page_reloaded_mid_run_redraws_the_whole_chart_and_cancel_is_shown(page, server, renderer):
    vue = RENDERERS[renderer]
    use_renderer(page, vue)
    queue_two_stage(page, iterations=400, lora_name=f"reload_lora_{int(vue)}", seed=10 + int(vue))
    page.wait_for_function("() => (app.graph.getNodeById(5)?.sisoState?.iteration ?? 0) >= 2", timeout=300_000)
    page.reload()
    page.wait_for_function("() => window.app && window.app.graph && app.graph.getNodeById(5)", timeout=180_000)
    # the restored page knows nothing until the next event, which carries the whole history
    page.wait_for_function("() => (app.graph.getNodeById(5)?.sisoState?.iteration ?? 0) >= 4", timeout=300_000)
    assert_renderer(page, vue)
    state = page.evaluate("() => app.graph.getNodeById(5).sisoState")
    assert len(state["history"]["loss"]) == state["iteration"] >= 4
    drawn = chart_element(page, 5).screenshot()
    assert colour_pixels(drawn, WHITE) > 15, "the reloaded page did not draw the history"
    assert server.post("/interrupt", {})[0] == 200
    page.wait_for_function("() => app.graph.getNodeById(5).sisoState.state === 'cancelled'", timeout=120_000)
    report = page.evaluate("() => app.graph.getNodeById(5).widgets.find(w => w.name === 'siso_report')?.value")
    assert report and report.startswith("cancelled: cancelled after"), report
    assert chart_element(page, 5).get_attribute("data-status").startswith("cancelled: cancelled after")
    use_renderer(page, False)   # leave the page as the other tests expect it


# ----------------------------------------------------------------------------- templates for today's models
def open_template_with_absent_models(page, name: str):
    """Templates > the pack's entry > the card, for a template whose model files this server lacks:
    the missing-models dialog (1.32) or panel (1.49) then opens over the graph."""
    page.locator(".p-dialog-mask.p-overlay-mask-leave").first.wait_for(state="detached", timeout=60_000)
    dialog = page.locator(".p-dialog, [role=dialog]")
    entry = dialog.get_by_text(PACK, exact=True).first
    try:
        entry.wait_for(state="visible", timeout=15_000)
    except Exception:
        close_restored_dialogs(page)
        page.get_by_text("Templates", exact=True).first.click()
        entry.wait_for(state="visible", timeout=30_000)
    page.wait_for_timeout(500)
    entry.click()
    dialog.get_by_text(name, exact=True).first.click()
    page.wait_for_function(f"() => app.graph.nodes.some(n => n.type === 'SISOOptimize') && document.title.includes('{name}')",
                           timeout=60_000)
    page.wait_for_timeout(1500)


@pytest.mark.parametrize("spec", graphs.TODAY_WORKFLOWS, ids=[w.name for w in graphs.TODAY_WORKFLOWS])
def test_a_today_template_opens_lists_its_absent_models_and_queues(page, server, object_info, spec):
    """The template's model files are absent from this server: the frontend lists each one with
    its folder, its Download goes to the file's URL (the request is caught, nothing is fetched),
    the graph is intact, and queued from the page the server refuses it for those files only."""
    expected = {m["name"]: m for n in spec.nodes for m in graphs.model_downloads(n) if n.type in graphs.LOADER_WIDGETS}
    page.reload()
    page.wait_for_function("() => window.app && window.app.graph && window.LiteGraph", timeout=180_000)
    open_template_with_absent_models(page, spec.name)
    # 1.49 marks the loaders of absent files (only those); 1.32 marks nothing
    absent = {f"{n.id} {n.type}: has errors" for n in spec.nodes if n.type in graphs.LOADER_WIDGETS}
    assert set(graph_problems(page)) <= absent, graph_problems(page)
    details = page.get_by_text("View details", exact=True)     # 1.49: an error overlay, then a side panel
    if details.count():
        details.first.click()
    page.get_by_text("Missing Models", exact=True).first.wait_for(state="visible", timeout=30_000)
    page.wait_for_timeout(500)
    text = page.inner_text("body")
    page.screenshot(path=str(pathlib.Path(os.environ.get("TMPDIR", "/tmp")) / f"siso-missing-{spec.name}.png"))
    for name, model in expected.items():
        # 1.32: "folder / name" lines; 1.49: the name with its folder under it
        assert f"{model['directory']} / {name}" in text or f"{name}\n{model['directory']}" in text, (name, text[-2000:])
    assert "dinov2_vitl14.safetensors" not in text and "sd_turbo" not in text   # present files are not listed
    # each row's Download asks for the file's URL
    # the frontend starts a download with an anchor's click, window.open or fetch: record, fetch nothing
    page.evaluate("""() => {
        window.__sisoAsked = [];
        HTMLAnchorElement.prototype.click = function () { window.__sisoAsked.push(this.href); };
        window.open = (url) => { window.__sisoAsked.push(String(url)); return null; };
        const fetch = window.fetch;
        window.fetch = (input, init) => {
            const url = String(input?.url ?? input);
            if (url.includes('huggingface.co')) { window.__sisoAsked.push(url); return Promise.reject(new Error('offline')); }
            return fetch(input, init);
        };
    }""")
    buttons = page.get_by_text(re.compile(r"^\s*Download( \(.*\))?\s*$"))   # 1.32: "Download (size)"
    assert buttons.count() >= len(expected), buttons.count()
    for k in range(buttons.count()):
        buttons.nth(k).click()
        page.wait_for_timeout(300)
    # 1.49 asks for the file's URL; 1.32 shows it as the Download button's title (its click opens
    # the repository page when the file's size could not be read, as here, offline)
    asked = {u for u in page.evaluate("() => window.__sisoAsked") if "huggingface.co" in u}
    titles = set(page.evaluate("() => Array.from(document.querySelectorAll('[title]')).map(e => e.title)"))
    urls = {m["url"] for m in expected.values()}
    assert urls <= asked | titles and asked <= urls | {m["url"].split("/resolve/")[0] for m in expected.values()}, (asked, titles)
    page.keyboard.press("Escape")
    if SHOTS:   # the template browser's thumbnail (make screenshots), with the dialog closed
        page.locator(".p-dialog-mask").first.wait_for(state="detached", timeout=30_000)
        page.wait_for_timeout(500)
        page.screenshot(path=str(REPO / "example_workflows" / f"{spec.name}.jpg"), type="jpeg", quality=70,
                        clip={"x": 60, "y": 80, "width": 1200, "height": 900})

    # the prompt the frontend makes of the graph is the API form of the committed template
    prompt = page.evaluate("async () => (await app.graphToPrompt()).output")
    want = graphs.ui_to_api(json.loads((REPO / "example_workflows" / f"{spec.name}.json").read_text()), object_info)
    assert {k: (v["class_type"], v["inputs"]) for k, v in prompt.items()} == \
        {k: (v["class_type"], v["inputs"]) for k, v in want.items()}
    # queued from the page: the server's validation answers for the absent files only
    answer = page.evaluate("""async () => {
        try { await window.comfyAPI.api.api.queuePrompt(0, await app.graphToPrompt()); return null; }
        catch (error) { return error.response ?? String(error); }
    }""")
    assert isinstance(answer, dict), answer
    files = {str(n.id): set(graphs.LOADER_WIDGETS[n.type]) for n in spec.nodes if n.type in graphs.LOADER_WIDGETS}
    got = {k: {e["extra_info"]["input_name"] for e in v["errors"] if e["type"] == "value_not_in_list"}
           for k, v in answer.get("node_errors", {}).items()}
    assert got == files, answer

    # the refine templates' optional mask (bypassed above: no mask in the prompt), turned on as
    # Ctrl+B does (mode 0): the frontend's prompt then carries SISO Subject Mask and its MASK
    bypassed = [n.id for n in spec.nodes if n.mode == graphs.BYPASS]
    if bypassed:
        assert "mask" not in prompt["14"]["inputs"] and not set(map(str, bypassed)) & set(prompt)
        turned_on = page.evaluate("""async (ids) => {
            for (const id of ids) app.graph.getNodeById(id).mode = 0;
            try { return (await app.graphToPrompt()).output; }
            finally { for (const id of ids) app.graph.getNodeById(id).mode = 4; }
        }""", bypassed)
        ui = json.loads((REPO / "example_workflows" / f"{spec.name}.json").read_text())
        for node in ui["nodes"]:
            if node["id"] in bypassed:
                node["mode"] = 0
        want = graphs.ui_to_api(ui, object_info)
        assert turned_on["14"]["inputs"]["mask"] == ["29", 0]
        assert {k: (v["class_type"], v["inputs"]) for k, v in turned_on.items()} == \
            {k: (v["class_type"], v["inputs"]) for k, v in want.items()}


# ----------------------------------------------------------------------------- SISO Optimize's advanced inputs
# The inputs a typical user never touches: marked advanced=True where the V3 API has the flag
# (ComfyUI 0.33), plain where it has not (0.3.75; nodes/graph_types.py ADVANCED).
ADVANCED = {"lora_rank", "lora_alpha", "lora_target", "dino_weight", "ir_weight", "early_stop_percent",
            "early_stop_patience", "low_memory", "precision", "scheduler", "compile"}


def flagged_inputs(object_info) -> set:
    spec = object_info["SISOOptimize"]["input"]
    return {name for group in ("required", "optional") for name, entry in spec.get(group, {}).items()
            if len(entry) > 1 and isinstance(entry[1], dict) and entry[1].get("advanced")}


def optimize_widgets(page) -> dict:
    """SISO Optimize (node 5) on the classic canvas: each widget's name -> [advanced, drawn]."""
    return page.evaluate("""() => {
        const n = app.graph.getNodeById(5);
        return Object.fromEntries(n.widgets.map(w => [w.name, [
            !!(w.advanced ?? w.options?.advanced),
            typeof n.isWidgetVisible === 'function' ? n.isWidgetVisible(w) : !w.hidden]]));
    }""")


def test_advanced_inputs_fold_away_on_a_frontend_that_honours_the_flag(page, object_info):
    """ComfyUI 0.33 (frontend 1.49): the schema's advanced=True reaches each widget's options. Nodes
    2.0 (the Vue renderer) honours it: SISO Optimize's card leaves those inputs out and its footer
    has a "Show advanced inputs" button that brings them (NodeFooter's advanced-inputs-button; the
    card reads ``widget.options.advanced``). The classic canvas of 1.49 draws them all: its
    LGraphNode.isWidgetVisible and hasAdvancedWidgets read ``widget.advanced``, which
    addInputWidget leaves unset (it writes ``widget.options.advanced``)."""
    if not flagged_inputs(object_info):
        pytest.skip("this ComfyUI's V3 inputs have no advanced flag (0.3.75): see the plain-inputs test")
    assert flagged_inputs(object_info) == ADVANCED
    use_renderer(page, False)
    open_template(page, graphs.TWO_STAGE.name)
    widgets = optimize_widgets(page)
    assert {name for name, (advanced, _) in widgets.items() if advanced} == ADVANCED, widgets
    assert all(drawn for _, drawn in widgets.values()), widgets   # the classic canvas: all drawn
    use_renderer(page, True)
    try:
        open_template(page, graphs.TWO_STAGE.name)
        card = page.locator("[data-node-id='5']")
        card.wait_for(state="visible", timeout=60_000)
        shown = set(card.inner_text().split("\n"))
        assert not ADVANCED & shown and {"width", "steps", "learning_rate", "max_iterations"} <= shown, shown
        button = card.locator("[data-testid=advanced-inputs-button]")
        assert button.count() == 1
        button.click()
        page.wait_for_timeout(500)
        shown = set(card.inner_text().split("\n"))
        assert ADVANCED <= shown, shown
        save_shot(page, "advanced_inputs_nodes2.png")
    finally:
        use_renderer(page, False)


def test_advanced_inputs_stay_plain_where_the_api_has_no_flag(page, object_info):
    """ComfyUI 0.3.75 (frontend 1.32): no advanced flag in the schema; every SISO Optimize widget
    is drawn on the node as before."""
    if flagged_inputs(object_info):
        pytest.skip("this ComfyUI marks advanced inputs (0.33): see the fold-away test")
    use_renderer(page, False)
    open_template(page, graphs.TWO_STAGE.name)
    widgets = optimize_widgets(page)
    assert ADVANCED <= set(widgets), widgets
    assert not any(advanced for advanced, _ in widgets.values()) and all(drawn for _, drawn in widgets.values()), widgets


def test_a_new_siso_node_keeps_its_seed_where_the_frontend_would_randomize_it(page, object_info):
    """Dragged in fresh, as a user does: the frontend gives every INT input named "seed" a control
    widget starting at "randomize" (KSampler's, the stock case), so every queue would start a new
    inversion or optimisation. ReNoise Invert has no control (its seed stays as set); SISO
    Optimize's starts at "fixed" where the API can say so (0.33's ControlAfterGenerate; 0.3.75's
    frontend takes only true / false and starts it at "randomize")."""
    started = page.evaluate("""() => Object.fromEntries(['SISOOptimize', 'ReNoiseInvert', 'KSampler'].map(type => {
        const node = LiteGraph.createNode(type);
        app.graph.add(node);
        const widgets = node.widgets.map(w => [w.name, w.value, (w.options?.values || []).includes('randomize')]);
        app.graph.remove(node);
        return [type, widgets.filter(([, , control]) => control).map(([, value]) => value)];
    }))""")
    fixed = object_info["SISOOptimize"]["input"]["required"]["seed"][1].get("control_after_generate") == "fixed"
    assert started == {"SISOOptimize": ["fixed" if fixed else "randomize"], "ReNoiseInvert": [],
                       "KSampler": ["randomize"]}, started
    from comfy_api.v0_0_2 import io
    assert fixed == hasattr(io, "ControlAfterGenerate")     # detected, on the ComfyUI that has it


@pytest.mark.parametrize("spec", graphs.SAM3_WORKFLOWS, ids=[w.name for w in graphs.SAM3_WORKFLOWS])
def test_a_sam3_template_opens_keeps_its_unused_dropdowns_lists_the_sam3_file_and_makes_its_prompt(page, server, object_info, spec):
    """The SAM3 templates open on both frontends (every node type exists on 0.3.75 too): SISO
    Subject Mask's SAM / Grounding DINO dropdowns keep their '(unused with SAM3)' value although no
    such file is listed, sam3_model / sam3_clip stay linked to the SAM3 loader, the missing-models
    dialog lists the SAM3 file (absent here) with its folder, and the prompt the frontend makes is
    the API form of the committed template, with the optional mask turned on too."""
    page.reload()
    page.wait_for_function("() => window.app && window.app.graph && window.LiteGraph", timeout=180_000)
    open_template_with_absent_models(page, spec.name)
    widgets = page.evaluate("() => Object.fromEntries(app.graph.nodes.map(n => [n.id, (n.widgets || []).map(w => [w.name, w.value])]))")
    masks = [n for n in spec.nodes if n.type == "SubjectMask"]
    for node in masks:
        shown = dict(widgets[str(node.id)])
        assert shown["sam_model"] == shown["grounding_dino_model"] == graphs.UNUSED_WITH_SAM3, shown
        links = page.evaluate("""(id) => { const n = app.graph.getNodeById(id);
            return n.inputs.filter(i => i.link != null).map(i => [i.name, app.graph.links[i.link]?.origin_id ?? app.graph.links.get?.(i.link)?.origin_id]); }""",
                              node.id)
        origins = {name: int(origin) for name, origin in links}
        assert origins["sam3_model"] == origins["sam3_clip"] == node.links["sam3_model"][0], origins
    details = page.get_by_text("View details", exact=True)     # 1.49: an error overlay, then a side panel
    if details.count():
        details.first.click()
    page.get_by_text("Missing Models", exact=True).first.wait_for(state="visible", timeout=30_000)
    text = page.inner_text("body")
    name = graphs.SAM3_FILE
    listed = f"checkpoints / {name}" in text or f"{name}\ncheckpoints" in text
    loader = next(n for n in spec.nodes if n.type == "CheckpointLoaderSimple" and n.widgets["ckpt_name"] == name)
    # 1.49 lists no file of a bypassed node (the refine templates' note says so): checked where active
    if loader.mode != graphs.BYPASS:
        assert listed, text[-2000:]
    assert graphs.UNUSED_WITH_SAM3 not in text.split("Missing Models", 1)[1][:2000]
    page.keyboard.press("Escape")
    if SHOTS:
        page.locator(".p-dialog-mask").first.wait_for(state="detached", timeout=30_000)
        page.wait_for_timeout(500)
        page.screenshot(path=str(REPO / "example_workflows" / f"{spec.name}.jpg"), type="jpeg", quality=70,
                        clip={"x": 60, "y": 80, "width": 1200, "height": 900})
    prompt = page.evaluate("async () => (await app.graphToPrompt()).output")
    committed = json.loads((REPO / "example_workflows" / f"{spec.name}.json").read_text())
    want = graphs.ui_to_api(committed, object_info)
    assert {k: (v["class_type"], v["inputs"]) for k, v in prompt.items()} == \
        {k: (v["class_type"], v["inputs"]) for k, v in want.items()}
    bypassed = [n.id for n in spec.nodes if n.mode == graphs.BYPASS]
    if bypassed:     # the refine templates' optional mask, with its SAM3 loader, turned on (Ctrl+B)
        turned_on = page.evaluate("""async (ids) => {
            for (const id of ids) app.graph.getNodeById(id).mode = 0;
            try { return (await app.graphToPrompt()).output; }
            finally { for (const id of ids) app.graph.getNodeById(id).mode = 4; }
        }""", bypassed)
        for node in committed["nodes"]:
            if node["id"] in bypassed:
                node["mode"] = 0
        want = graphs.ui_to_api(committed, object_info)
        mask = str(masks[0].id)
        assert turned_on[mask]["inputs"]["sam3_model"] == [str(masks[0].links["sam3_model"][0]), 0]
        assert {k: (v["class_type"], v["inputs"]) for k, v in turned_on.items()} == \
            {k: (v["class_type"], v["inputs"]) for k, v in want.items()}

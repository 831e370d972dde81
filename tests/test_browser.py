"""The pack in a real browser: headless Debian Chromium, driven by Playwright, on the frontend
the test server serves. Each example workflow is opened from ComfyUI's template browser, the
two-stage one is queued from the page, and the live chart is read back from screenshots.

Chromium comes from Debian (`make test` installs it); if it is missing these tests FAIL: a
silent skip would hide that the browser path was never checked. SISO_SCREENSHOTS=<folder>
(`make screenshots`) also writes the README's screenshots and the template thumbnails."""
from __future__ import annotations

import os
import pathlib
import shutil
import time

import pytest

import workflow_graphs as graphs
from conftest import REPO

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PACK = "comfyui_siso"
SHOTS = os.environ.get("SISO_SCREENSHOTS")
BLUE, ORANGE, WHITE = (0x4D, 0xA3, 0xFF), (0xFF, 0x9F, 0x40), (0xF0, 0xF0, 0xF0)


@pytest.fixture(scope="module")
def page(server, tmp_path_factory):
    assert shutil.which(CHROMIUM) or os.path.exists(CHROMIUM), (
        f"{CHROMIUM} is missing: install Debian's chromium (make test does: apt-get install chromium)")
    from playwright.sync_api import sync_playwright
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=CHROMIUM, args=FLAGS, headless=True,
            viewport={"width": 1600, "height": 1000})
        page = context.new_page()
        page.console_messages = []
        page.on("console", lambda m: page.console_messages.append((m.type, m.text)))
        page.goto(server.url)
        page.wait_for_function("() => window.app && window.app.graph && window.LiteGraph", timeout=180_000)
        yield page
        context.close()


def open_template(page, name: str):
    """Through the template browser, as a user does: Templates > the pack's entry > the card."""
    page.locator(".p-dialog-mask.p-overlay-mask-leave").first.wait_for(state="detached", timeout=60_000)
    dialog = page.locator(".p-dialog")
    entry = dialog.get_by_text(PACK, exact=True).first
    try:   # on a first visit ComfyUI opens the template browser by itself
        entry.wait_for(state="visible", timeout=15_000)
    except Exception:
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


@pytest.mark.parametrize("spec", graphs.WORKFLOWS, ids=[w.name for w in graphs.WORKFLOWS])
def test_each_example_workflow_opens_from_the_template_browser_without_warnings(page, spec):
    before = len(page.console_messages)
    open_template(page, spec.name)
    assert graph_problems(page) == []
    loaded = page.evaluate("() => app.graph.nodes.map(n => [n.id, n.type])")
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


def chart_clip(page, node_id: int) -> dict:
    """The chart widget's rectangle in page pixels."""
    return page.evaluate("""(id) => {
        const node = app.graph.getNodeById(id);
        app.canvas.bringToFront?.(node);   // nothing drawn over the chart
        app.canvas.ds.scale = 1.0;
        app.canvas.ds.offset = [80 - node.pos[0], 120 - node.pos[1]];
        app.canvas.setDirty(true, true);
        app.canvas.draw(true, true);
        const w = node.widgets.find(w => w.name === 'siso_chart');
        const y = w.last_y ?? w.y;
        const [cx, cy] = app.canvas.ds.convertOffsetToCanvas([node.pos[0] + 10, node.pos[1] + y + 4]);
        const rect = app.canvas.canvas.getBoundingClientRect();
        const scale = app.canvas.ds.scale;
        return {x: rect.left + cx, y: rect.top + cy, width: (node.size[0] - 20) * scale, height: 162 * scale};
    }""", node_id)


def colour_pixels(png: bytes, colour, tolerance=40) -> int:
    import io
    import numpy as np
    from PIL import Image
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    return int((np.abs(pixels - np.array(colour)).sum(-1) < tolerance).sum())


def queue_two_stage(page, iterations: int, lora_name: str):
    """Open the two-stage template, point it at the test files and queue it from the page."""
    spec = graphs.TWO_STAGE
    open_template(page, spec.name)
    overrides = dict(spec.test_overrides)
    overrides[5] = dict(overrides[5], max_iterations=iterations, early_stop_patience=max(50, iterations))
    overrides[13] = dict(overrides[13], name=lora_name)
    set_widgets(page, overrides)
    page.evaluate("() => app.queuePrompt(0, 1)")


def test_queued_from_the_page_the_live_chart_updates_every_iteration(page):
    page.evaluate("""() => {
        window.__sisoSeen = [];
        window.comfyAPI.api.api.addEventListener('siso.progress', e => window.__sisoSeen.push([e.detail.state, e.detail.iteration]));
    }""")
    queue_two_stage(page, iterations=5, lora_name="browser_lora")
    page.wait_for_function("() => (window.__sisoSeen || []).some(([s, i]) => s === 'running' && i >= 2)", timeout=300_000)
    mid = page.screenshot(clip=chart_clip(page, 5))
    page.wait_for_function("() => window.__sisoSeen.some(([s]) => s === 'done')", timeout=300_000)
    time.sleep(0.5)
    clip = chart_clip(page, 5)
    final = page.screenshot(clip=clip)
    seen = page.evaluate("() => window.__sisoSeen")
    assert [i for s, i in seen if s == "running"] == [1, 2, 3, 4, 5], seen
    state = page.evaluate("() => app.graph.getNodeById(5).sisoState")
    assert state["state"] == "done" and "iteration cap reached after 5 iterations" in state["reason"]
    # the chart really is drawn: the loss (white) and both similarity lines (blue, orange)
    for colour in (WHITE, BLUE, ORANGE):
        assert colour_pixels(final, colour) > 15, colour
    assert final != mid, "the chart did not change between iteration 2 and the end"
    report = page.evaluate("() => app.graph.getNodeById(5).widgets.find(w => w.name === 'siso_report')?.value")
    assert report and "iteration cap reached" in report
    if SHOTS:
        save_shot(page, "live_chart.png", clip={"x": clip["x"] - 20, "y": max(clip["y"] - 560, 0),
                                                "width": clip["width"] + 40, "height": min(clip["height"] + 600, 1000)})


def test_a_page_reloaded_mid_run_redraws_the_whole_chart_and_cancel_is_shown(page, server):
    queue_two_stage(page, iterations=400, lora_name="reload_lora")
    page.wait_for_function("() => (app.graph.getNodeById(5)?.sisoState?.iteration ?? 0) >= 2", timeout=300_000)
    page.reload()
    page.wait_for_function("() => window.app && window.app.graph && app.graph.getNodeById(5)", timeout=180_000)
    # the restored page knows nothing until the next event, which carries the whole history
    page.wait_for_function("() => (app.graph.getNodeById(5)?.sisoState?.iteration ?? 0) >= 4", timeout=300_000)
    state = page.evaluate("() => app.graph.getNodeById(5).sisoState")
    assert len(state["history"]["loss"]) == state["iteration"] >= 4
    assert page.evaluate("() => !!app.graph.getNodeById(5).widgets.find(w => w.name === 'siso_chart')")
    assert server.post("/interrupt", {})[0] == 200
    page.wait_for_function("() => app.graph.getNodeById(5).sisoState.state === 'cancelled'", timeout=120_000)
    report = page.evaluate("() => app.graph.getNodeById(5).widgets.find(w => w.name === 'siso_report')?.value")
    assert report and report.startswith("cancelled: cancelled after"), report

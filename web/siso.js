// SISO Optimize, live: a chart of the loss and of the DINO / IR similarities in the node, the
// iteration against the cap, the best iteration, and why the run ended.
// Data: the node's "siso.progress" websocket events. Each carries the whole history so far, so a
// page reloaded mid-run redraws everything from the next event; with no page open nothing runs.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const NODE_TYPE = "SISOOptimize";
const CHART_HEIGHT = 170;
const COLORS = { loss: "#f0f0f0", dino: "#4da3ff", ir: "#ff9f40", background: "#7bd88f" };
const LABELS = { loss: "loss", dino: "DINO sim", ir: "IR sim", background: "background" };

function statusLine(state) {
  if (!state) return "waiting for the first iteration";
  if (state.state === "running") return `iteration ${state.iteration} / ${state.max} · best ${state.best}`;
  return `${state.state}: ${state.reason}`;
}

function seriesRange(values) {
  const finite = values.filter((v) => typeof v === "number" && Number.isFinite(v));
  if (!finite.length) return null;
  let lo = Math.min(...finite);
  let hi = Math.max(...finite);
  if (hi - lo < 1e-9) { lo -= 0.5; hi += 0.5; }
  return [lo, hi];
}

function drawLine(ctx, values, range, x, y, w, h, count, color) {
  if (!range) return;
  const [lo, hi] = range;
  ctx.strokeStyle = color;
  ctx.lineWidth = 1.5;
  ctx.beginPath();
  let started = false;
  values.forEach((v, i) => {
    if (typeof v !== "number" || !Number.isFinite(v)) return;
    const px = x + (count <= 1 ? w / 2 : (i / (count - 1)) * w);
    const py = y + h - ((v - lo) / (hi - lo)) * h;
    if (started) ctx.lineTo(px, py); else ctx.moveTo(px, py);
    started = true;
  });
  ctx.stroke();
}

function drawChart(ctx, state, x, y, w, h) {
  ctx.save();
  ctx.fillStyle = "#1b1b1b";
  ctx.fillRect(x, y, w, h);
  ctx.strokeStyle = "#444";
  ctx.strokeRect(x, y, w, h);
  ctx.font = "11px sans-serif";
  ctx.fillStyle = state?.state === "failed" ? "#ff6b6b" : "#ddd";
  ctx.fillText(statusLine(state), x + 6, y + 13, w - 12);
  const plot = { x: x + 6, y: y + 22, w: w - 12, h: h - 42 };
  const history = state?.history;
  const count = history?.loss?.length ?? 0;
  if (count) {
    // the loss on its own scale; both similarities on one shared scale (comparable)
    drawLine(ctx, history.loss, seriesRange(history.loss), plot.x, plot.y, plot.w, plot.h, count, COLORS.loss);
    // several reference photos: each photo's similarity as a faint line under the mean
    const perPhoto = (key) => {
      const rows = history[`${key}_per_photo`] ?? [];
      const photos = rows.reduce((n, row) => Math.max(n, row?.length ?? 0), 0);
      return Array.from({ length: photos }, (_, p) => rows.map((row) => row?.[p]));
    };
    const photoLines = { dino: perPhoto("dino"), ir: perPhoto("ir") };
    const sims = seriesRange([...(history.dino ?? []), ...(history.ir ?? []),
                              ...photoLines.dino.flat(), ...photoLines.ir.flat()]);
    ctx.save();
    ctx.globalAlpha = 0.35;
    for (const key of ["dino", "ir"]) {
      for (const line of photoLines[key]) drawLine(ctx, line, sims, plot.x, plot.y, plot.w, plot.h, count, COLORS[key]);
    }
    ctx.restore();
    drawLine(ctx, history.dino ?? [], sims, plot.x, plot.y, plot.w, plot.h, count, COLORS.dino);
    drawLine(ctx, history.ir ?? [], sims, plot.x, plot.y, plot.w, plot.h, count, COLORS.ir);
    if (state.editing) {
      const bg = history.background ?? [];
      drawLine(ctx, bg, seriesRange(bg), plot.x, plot.y, plot.w, plot.h, count, COLORS.background);
    }
    if (state.best >= 1 && count > 1) {
      const bx = plot.x + ((state.best - 1) / (count - 1)) * plot.w;
      ctx.setLineDash([3, 3]);
      ctx.strokeStyle = "#888";
      ctx.beginPath(); ctx.moveTo(bx, plot.y); ctx.lineTo(bx, plot.y + plot.h); ctx.stroke();
      ctx.setLineDash([]);
    }
  }
  let lx = x + 6;
  for (const key of ["loss", "dino", "ir", ...(state?.editing ? ["background"] : [])]) {
    ctx.fillStyle = COLORS[key];
    ctx.fillRect(lx, y + h - 12, 8, 8);
    ctx.fillStyle = "#bbb";
    ctx.fillText(LABELS[key], lx + 11, y + h - 4);
    lx += ctx.measureText(LABELS[key]).width + 24;
  }
  ctx.restore();
}

// The chart is a DOM widget holding its own <canvas>: the classic LiteGraph canvas positions it
// over the node, and the Nodes 2.0 (Vue) renderer puts it inside the node's card. A canvas
// widget drawn with addCustomWidget + draw() is not rendered by Nodes 2.0.
function paintChart(node) {
  const canvas = node.sisoChartCanvas;
  if (!canvas) return;
  canvas.dataset.node = String(node.id);   // a node gets its id when it joins the graph
  canvas.dataset.status = statusLine(node.sisoState);   // the line drawn at the chart's top, readable by tests
  const ratio = window.devicePixelRatio || 1;
  const width = Math.max(canvas.clientWidth, 40);
  const height = Math.max(canvas.clientHeight, 40);
  if (canvas.width !== Math.round(width * ratio) || canvas.height !== Math.round(height * ratio)) {
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);
  drawChart(ctx, node.sisoState, 0, 0, width, height);
}

function chartWidget(node) {
  let widget = node.widgets?.find((w) => w.name === "siso_chart");
  if (widget) return widget;
  const canvas = document.createElement("canvas");
  canvas.className = "siso-chart";
  // The renderer sizes the widget (Nodes 2.0 gives it what the node's card has left): fill that
  // and draw for the size actually shown (paintChart reads it back).
  canvas.style.width = "100%";
  canvas.style.height = "100%";
  canvas.style.display = "block";
  node.sisoChartCanvas = canvas;
  widget = node.addDOMWidget("siso_chart", "siso_chart", canvas, {
    serialize: false,            // never part of widgets_values: workflows stay as saved
    hideOnZoom: false,
    getValue: () => "",
    setValue: () => {},
    getMinHeight: () => CHART_HEIGHT,
    getMaxHeight: () => CHART_HEIGHT,
  });
  widget.serialize = false;
  if (typeof ResizeObserver !== "undefined") new ResizeObserver(() => paintChart(node)).observe(canvas);
  return widget;
}

// A node saved smaller than the chart (an older workflow) grows to show it once a run reports.
function fitNode(node) {
  const wanted = node.computeSize();
  if (wanted[0] > node.size[0] || wanted[1] > node.size[1]) {
    node.setSize([Math.max(node.size[0], wanted[0]), Math.max(node.size[1], wanted[1])]);
  }
}

function reportWidget(node) {
  let widget = node.widgets?.find((w) => w.name === "siso_report");
  if (!widget) {
    widget = node.addWidget("text", "siso_report", "", () => {}, { serialize: false });
    widget.serialize = false;
  }
  return widget;
}

function showReport(node, text) {
  reportWidget(node).value = text;
}

app.registerExtension({
  name: "siso.live",
  setup() {
    api.addEventListener("siso.progress", ({ detail }) => {
      const node = app.graph?.getNodeById?.(Number(detail?.node));
      if (!node || node.type !== NODE_TYPE) return;
      node.sisoState = detail;
      chartWidget(node);
      fitNode(node);
      paintChart(node);
      if (detail.state !== "running") showReport(node, statusLine(detail));
      node.setDirtyCanvas(true, true);
    });
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== NODE_TYPE) return;
    // The chart and the report exist from the node's creation: Nodes 2.0 (frontend 1.32) builds
    // a node's card from the widgets it has then and does not show one added later by an event.
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      chartWidget(this);
      reportWidget(this);
      return result;
    };
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = message?.text?.join("\n");
      if (text) showReport(this, text);
      this.setDirtyCanvas(true, true);
    };
  },
});

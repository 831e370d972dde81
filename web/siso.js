// SISO Optimize, live: a chart of the loss and of the DINO / IR similarities drawn in the node's
// widget area, the iteration against the cap, the best iteration, and why the run ended.
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
    const sims = seriesRange([...(history.dino ?? []), ...(history.ir ?? [])]);
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

function chartWidget(node) {
  let widget = node.widgets?.find((w) => w.name === "siso_chart");
  if (widget) return widget;
  widget = {
    name: "siso_chart",
    type: "siso_chart",
    value: "",
    serialize: false,            // never part of widgets_values: workflows stay as saved
    options: { serialize: false },
    computeSize: (width) => [width, CHART_HEIGHT],
    draw(ctx, owner, width, y) {
      drawChart(ctx, owner.sisoState, 10, y + 4, width - 20, CHART_HEIGHT - 8);
    },
  };
  node.addCustomWidget(widget);
  const wanted = node.computeSize();
  node.setSize([Math.max(node.size[0], wanted[0]), Math.max(node.size[1], wanted[1])]);
  return widget;
}

function showReport(node, text) {
  let widget = node.widgets?.find((w) => w.name === "siso_report");
  if (!widget) {
    widget = node.addWidget("text", "siso_report", "", () => {}, { serialize: false });
    widget.serialize = false;
  }
  widget.value = text;
}

app.registerExtension({
  name: "siso.live",
  setup() {
    api.addEventListener("siso.progress", ({ detail }) => {
      const node = app.graph?.getNodeById?.(Number(detail?.node));
      if (!node || node.type !== NODE_TYPE) return;
      node.sisoState = detail;
      chartWidget(node);
      if (detail.state !== "running") showReport(node, statusLine(detail));
      node.setDirtyCanvas(true, true);
    });
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== NODE_TYPE) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = message?.text?.join("\n");
      if (text) showReport(this, text);
      this.setDirtyCanvas(true, true);
    };
  },
});

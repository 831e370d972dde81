// Shows SISO Optimize's stop report (why it stopped, best iteration) on the node after a run.
import { app } from "../../scripts/app.js";

app.registerExtension({
  name: "siso.report",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== "SISOOptimize") return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = message?.text?.join("\n");
      if (!text) return;
      let widget = this.widgets?.find((w) => w.name === "siso_report");
      if (!widget) {
        widget = this.addWidget("text", "siso_report", "", () => {}, { serialize: false });
      }
      widget.value = text;
      this.setDirtyCanvas(true, true);
    };
  },
});

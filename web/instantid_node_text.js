// Shows what an InstantID node reports (its notes, the face similarity scores) as read-only text on the
// node after it runs, as "show text" nodes do. The frontend draws `ui.text` only on its own nodes, so a
// skipped Apply would otherwise look like a normal success. Plain JavaScript, loaded by ComfyUI from the
// pack's WEB_DIRECTORY; no build step.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const TEXT_WIDGET = "instantid_text";
const CATEGORY = "InstantID";

function textWidget(node) {
  const existing = node.widgets?.find((w) => w.name === TEXT_WIDGET);
  if (existing) return existing;
  const textarea = document.createElement("textarea");
  textarea.className = "comfy-multiline-input"; // the frontend's own look for multiline text
  textarea.readOnly = true;
  textarea.style.opacity = "0.85";
  const widget = node.addDOMWidget(TEXT_WIDGET, "customtext", textarea, {
    getValue: () => textarea.value,
    setValue: (value) => { textarea.value = value; },
    serialize: false, // not sent as an input with the prompt
  });
  widget.serialize = false; // not saved: saved widget values go by position
  widget.inputEl = textarea;
  return widget;
}

function showText(node, lines) {
  const text = lines.map(String).join("\n");
  textWidget(node).value = text;
  if (text) console.info(`[InstantID] ${node.title} (#${node.id}):\n${text}`);
  // Grow the node (never shrink it) so that the text fits without scrolling, wrapped at the node's width.
  const wanted = node.computeSize();
  const charsPerLine = Math.max(10, Math.floor((node.size[0] - 30) / 7));
  const rows = text.split("\n").reduce((sum, line) => sum + Math.max(1, Math.ceil(line.length / charsPerLine)), 0);
  node.setSize([Math.max(node.size[0], wanted[0]), Math.max(node.size[1], wanted[1] + 14 * Math.max(0, rows - 3))]);
  node.setDirtyCanvas(true, true);
}

app.registerExtension({
  name: "InstantID.NodeText",
  setup() {
    // A re-run replaces the text; a node that reports nothing this time must not keep the old text.
    api.addEventListener("execution_start", () => {
      for (const node of app.graph?.nodes ?? []) {
        if (node.widgets?.some((w) => w.name === TEXT_WIDGET)) showText(node, []);
      }
    });
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!String(nodeData.category ?? "").startsWith(CATEGORY)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      if (Array.isArray(message?.text)) showText(this, message.text);
    };
  },
});

// The pack's frontend extension (plain JavaScript, loaded by ComfyUI from the pack's WEB_DIRECTORY; no
// build step):
// - what an InstantID node reports (its notes, the face similarity scores) shows as read-only text on the
//   node after it runs, as "show text" nodes do; the frontend draws `ui.text` only on its own nodes, so a
//   skipped Apply would otherwise look like a normal success;
// - options marked advanced in the node definition hide behind the node menu's "Show Advanced";
// - Load Identity gets an upload button for identity files, and its list refreshes after an upload and
//   after Save Identity runs, without reloading the page.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const TEXT_WIDGET = "instantid_text";
const CATEGORY = "InstantID";
const LOAD_IDENTITY = "InstantIDLoadFaceEmbeds";
const SAVE_IDENTITY = "InstantIDSaveFaceEmbeds";
const IDENTITY_WIDGET = "face_embeds_file";
const IDENTITY_FOLDER = "instantid_faces";
const UPLOAD_WIDGET = "upload identity file (.safetensors)";

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

// Grow the node (never shrink it) until the text box shows all of its text: the box's own scroll height
// says what the wrapped text needs, whatever the font and the line breaks.
function growToFit(node, textarea, framesLeft = 8) {
  requestAnimationFrame(() => {
    const missing = textarea.scrollHeight - textarea.clientHeight;
    if (missing > 1 && framesLeft > 0 && textarea.isConnected) {
      node.setSize([node.size[0], node.size[1] + missing + 4]);
      node.setDirtyCanvas(true, true);
      growToFit(node, textarea, framesLeft - 1);
    }
  });
}

function showText(node, lines) {
  const text = lines.map(String).join("\n");
  const widget = textWidget(node);
  widget.value = text;
  if (text) console.info(`[InstantID] ${node.title} (#${node.id}):\n${text}`);
  const wanted = node.computeSize();
  node.setSize([Math.max(node.size[0], wanted[0]), Math.max(node.size[1], wanted[1])]);
  node.setDirtyCanvas(true, true);
  if (text) growToFit(node, widget.inputEl);
}

// The identity files the server lists now (the node definition is re-read: it scans both folders).
async function identityChoices() {
  const response = await api.fetchApi(`/object_info/${LOAD_IDENTITY}`);
  const info = (await response.json())[LOAD_IDENTITY];
  const spec = info.input.required[IDENTITY_WIDGET];
  return Array.isArray(spec[0]) ? spec[0] : spec[1]?.options ?? [];
}

async function refreshIdentityLists(select) {
  const choices = await identityChoices();
  for (const node of app.graph?.nodes ?? []) {
    if (node.type !== LOAD_IDENTITY) continue;
    const widget = node.widgets?.find((w) => w.name === IDENTITY_WIDGET);
    if (!widget) continue;
    widget.options.values = choices;
    // A node still showing "none yet" (or a file that is gone) gets the new file; others keep theirs.
    if (!choices.includes(widget.value) && choices.length) {
      widget.value = select && choices.includes(select) ? select : choices[0];
    }
    node.setDirtyCanvas(true, true);
  }
  return choices;
}

async function uploadIdentity(node, file) {
  const body = new FormData();
  body.append("image", file);
  body.append("subfolder", IDENTITY_FOLDER);
  body.append("type", "input");
  const response = await api.fetchApi("/upload/image", { method: "POST", body });
  if (response.status !== 200) {
    throw new Error(`upload of ${file.name} failed: ${response.status} ${response.statusText}`);
  }
  const saved = await response.json(); // {name, subfolder, type}: the name as the list shows it
  const choices = await refreshIdentityLists();
  const widget = node.widgets.find((w) => w.name === IDENTITY_WIDGET);
  if (choices.includes(saved.name)) widget.value = saved.name;
  node.setDirtyCanvas(true, true);
  return saved.name;
}

// Frontend 1.35.9 copies an input's `advanced` flag into the widget's options only, and its widget layout
// skips only hidden widgets; so the flag is applied here: an advanced widget is hidden until the node
// menu's "Show Advanced" (the node's showAdvanced, saved with the workflow). The options added after the
// earlier pack's inputs then stay out of the way, and the earlier pack's workflows open at their sizes.
function syncAdvanced(node) {
  let found = false;
  for (const widget of node.widgets ?? []) {
    if (widget.options?.advanced) {
      widget.advanced = true;
      widget.hidden = !node.showAdvanced;
      found = true;
    }
  }
  return found;
}

function fitHeight(node) {
  const wanted = node.computeSize();
  node.setSize([Math.max(node.size[0], wanted[0]), wanted[1]]);
  node.setDirtyCanvas(true, true);
}

function wireAdvanced(nodeType) {
  const toggleAdvanced = nodeType.prototype.toggleAdvanced;
  nodeType.prototype.toggleAdvanced = function () {
    toggleAdvanced?.apply(this, arguments);
    if (syncAdvanced(this)) fitHeight(this);
  };
  const onConfigure = nodeType.prototype.onConfigure;
  nodeType.prototype.onConfigure = function () {
    const result = onConfigure?.apply(this, arguments);
    syncAdvanced(this); // a loaded node keeps its saved size and "Show Advanced" state
    return result;
  };
}

function addUploadButton(node) {
  const picker = document.createElement("input");
  picker.type = "file";
  picker.accept = ".safetensors";
  picker.style.display = "none";
  document.body.append(picker);
  picker.addEventListener("change", async () => {
    const file = picker.files?.[0];
    picker.value = "";
    if (!file) return;
    try {
      await uploadIdentity(node, file);
    } catch (error) {
      console.error(`[InstantID] ${error.message}`);
      showText(node, [`Upload failed: ${error.message}`]);
    }
  });
  const button = node.addWidget("button", UPLOAD_WIDGET, null, () => picker.click());
  button.serialize = false; // not saved and not sent: saved widget values go by position
  button.options.serialize = false;
  const onRemoved = node.onRemoved;
  node.onRemoved = function () {
    picker.remove();
    return onRemoved?.apply(this, arguments);
  };
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
      if (nodeData.name === SAVE_IDENTITY && Array.isArray(message?.face_embeds)) {
        refreshIdentityLists(message.face_embeds[0]?.choice).catch((error) => console.error(error));
      }
    };
    wireAdvanced(nodeType);
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      if (syncAdvanced(this)) fitHeight(this);
      if (nodeData.name === LOAD_IDENTITY) addUploadButton(this);
      return result;
    };
  },
});

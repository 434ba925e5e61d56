// MedSR web page: pick an image, degrade it with the sliders, compare LR | bicubic | model.
// Plain JavaScript, no build step and no external resources (the page works offline).
"use strict";

const $ = (id) => document.getElementById(id);
const PANELS = ["panel-lr", "panel-bicubic", "panel-model", "panel-original"];
const state = { blob: null, name: "", busy: false, rerun: false, result: null, syncing: false, timer: null };

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

async function errorText(response) {
  // Every service error is JSON {error, fix, request_id}; show all three.
  try {
    const body = await response.json();
    return `${body.error}\nFix: ${body.fix}\n(request ${body.request_id}, HTTP ${response.status})`;
  } catch (_) {
    return `HTTP ${response.status} ${response.statusText}`;
  }
}

async function loadInfo() {
  try {
    const response = await fetch("/info");
    const info = await response.json();
    const models = Object.values(info.models).map((m) => `${m.registered_name} v${m.version} (${m.architecture})`);
    $("service-status").textContent = info.ready
      ? `Ready on ${info.device}: ${models.join(", ")}`
      : `Not ready: ${info.load_error || "loading the model"}`;
    const scale = $("scale");
    scale.innerHTML = "";
    for (const value of info.scales) {
      const option = document.createElement("option");
      option.value = value;
      option.textContent = `x${value}`;
      scale.appendChild(option);
    }
    const select = $("sample-select");
    for (const sample of info.samples) {
      const option = document.createElement("option");
      option.value = sample.id;
      option.textContent = `${sample.modality}: ${sample.description}`;
      option.dataset.fileName = sample.file_name;
      select.appendChild(option);
    }
  } catch (err) {
    $("service-status").textContent = `Service unreachable: ${err}`;
  }
}

function setInput(blob, name) {
  state.blob = blob;
  state.name = name;
  $("input-name").textContent = `${name} (${(blob.size / 1024).toFixed(0)} KiB)`;
  $("run").disabled = false;
  $("download-original-link").hidden = true;
}

function formData(extra) {
  const data = new FormData();
  data.append("file", state.blob, state.name);
  data.append("scale", $("scale").value);
  const frame = $("frame").value;
  if (frame !== "") data.append("frame", frame);
  for (const [key, value] of Object.entries(extra || {})) data.append(key, value);
  return data;
}

async function run() {
  if (!state.blob) return;
  if (state.busy) { state.rerun = true; return; }
  state.busy = true;
  document.body.dataset.state = "busy";
  $("progress").hidden = false;
  $("run").disabled = true;
  showError("");
  try {
    const response = await fetch("/demo", {
      method: "POST",
      body: formData({ noise: $("noise").value, blur: $("blur").value, known_original: $("known-original").checked }),
    });
    if (!response.ok) {
      showError(await errorText(response));
      document.body.dataset.state = "error";
      return;
    }
    render(await response.json());
    document.body.dataset.state = "done";
  } catch (err) {
    showError(`Request failed: ${err}`);
    document.body.dataset.state = "error";
  } finally {
    state.busy = false;
    $("progress").hidden = true;
    $("run").disabled = false;
    if (state.rerun) { state.rerun = false; run(); }
  }
}

function render(result) {
  state.result = result;
  $("results").hidden = false;
  const images = result.images;
  $("panel-lr").querySelector("img").src = images.lr;
  $("panel-bicubic").querySelector("img").src = images.bicubic;
  $("panel-model").querySelector("img").src = images.model;
  $("panel-original").hidden = !images.original;
  if (images.original) $("panel-original").querySelector("img").src = images.original;

  const known = Object.keys(result.scores).length > 0;
  $("scores").hidden = !known;
  $("no-scores").hidden = known;
  for (const name of ["bicubic", "model"]) {
    const row = $(`score-${name}`);
    const score = result.scores[name] || {};
    row.querySelector(".psnr").textContent = score.psnr !== undefined ? score.psnr.toFixed(2) : "";
    row.querySelector(".ssim").textContent = score.ssim !== undefined ? score.ssim.toFixed(4) : "";
  }
  $("consistency").textContent = `${result.consistency_psnr.toFixed(2)} dB`;
  $("consistency-warning").hidden = !result.consistency_warning;

  const [h, w] = result.sizes.lr;
  const [H, W] = result.sizes.output;
  const m = result.model;
  $("result-info").textContent =
    `${result.modality}, ${result.format}, frame ${result.frame + 1} of ${result.frames}; ` +
    `LR ${w}x${h} -> ${W}x${H}; ${m.registered_name} v${m.version} (${m.architecture}); ` +
    `${result.seconds.toFixed(2)} s${result.cropped ? "; central crop" : ""}`;
  const link = $("download-png");
  link.href = result.download.png16;
  link.download = result.download.filename;
  applyZoom();
}

function applyZoom() {
  const zoom = parseFloat($("zoom").value);
  $("zoom-value").textContent = `${zoom}x`;
  if (!state.result) return;
  const [H, W] = state.result.sizes.output;
  // Every panel shows the same field of view at the same size; LR is enlarged pixel by pixel.
  const base = $("panel-model").querySelector(".viewport").clientWidth || 400;
  const width = Math.round(base * zoom);
  for (const id of PANELS) {
    const img = $(id).querySelector("img");
    img.style.width = `${width}px`;
    img.style.height = `${Math.round((width * H) / W)}px`;
  }
}

function syncScroll(source) {
  if (state.syncing) return;
  state.syncing = true;
  for (const id of PANELS) {
    const viewport = $(id).querySelector(".viewport");
    if (viewport !== source) {
      viewport.scrollLeft = source.scrollLeft;
      viewport.scrollTop = source.scrollTop;
    }
  }
  state.syncing = false;
}

async function upscaleWholeFile() {
  if (!state.blob) return;
  const button = $("download-original");
  button.disabled = true;
  showError("");
  try {
    const response = await fetch("/upscale", { method: "POST", body: formData() });
    if (!response.ok) {
      showError(await errorText(response));
      return;
    }
    const blob = await response.blob();
    const disposition = response.headers.get("Content-Disposition") || "";
    const match = /filename="?([^";]+)"?/.exec(disposition);
    const link = $("download-original-link");
    link.href = URL.createObjectURL(blob);
    link.download = match ? match[1] : "medsr_result";
    link.textContent = `Download ${link.download} (consistency ${response.headers.get("X-MedSR-Consistency-PSNR")} dB)`;
    link.hidden = false;
  } catch (err) {
    showError(`Request failed: ${err}`);
  } finally {
    button.disabled = false;
  }
}

function scheduleRun() {
  // Slider moves re-run the comparison once the user pauses.
  if (!state.result) return;
  clearTimeout(state.timer);
  state.timer = setTimeout(run, 400);
}

$("file-input").addEventListener("change", (event) => {
  const file = event.target.files[0];
  if (file) { $("sample-select").value = ""; setInput(file, file.name); }
});
$("sample-select").addEventListener("change", async (event) => {
  const option = event.target.selectedOptions[0];
  if (!option || !option.value) return;
  const response = await fetch(`/samples/${encodeURIComponent(option.value)}`);
  if (!response.ok) { showError(await errorText(response)); return; }
  $("file-input").value = "";
  setInput(await response.blob(), option.dataset.fileName || option.value);
});
$("noise").addEventListener("input", () => { $("noise-value").textContent = parseFloat($("noise").value).toFixed(3); scheduleRun(); });
$("blur").addEventListener("input", () => { $("blur-value").textContent = parseFloat($("blur").value).toFixed(1); scheduleRun(); });
$("known-original").addEventListener("change", scheduleRun);
$("scale").addEventListener("change", scheduleRun);
$("zoom").addEventListener("input", applyZoom);
$("run").addEventListener("click", run);
$("download-original").addEventListener("click", upscaleWholeFile);
for (const id of PANELS) {
  const viewport = $(id).querySelector(".viewport");
  viewport.addEventListener("scroll", () => syncScroll(viewport));
}
document.body.dataset.state = "idle";
loadInfo();

// Chester page: image → loader-exact pixels → OOD gate → ensemble → calibrated probabilities + CAM.
// Everything runs here, in the browser (onnxruntime-web, wasm, one thread); the only requests
// are this site's own files. ?image=NAME loads a same-origin image through the same path as the
// file input (used by tests/test_web.py).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { pre: null, thr: null, cal: null, model: null, ood: null };

function setStatus(kind, text) {
  const el = $("status");
  el.dataset.state = kind;
  el.textContent = text;
}

async function loadJson(name) {
  const r = await fetch(name);
  if (!r.ok) throw new Error(`${name}: HTTP ${r.status}`);
  return r.json();
}

async function init() {
  ort.env.wasm.numThreads = 1;           // no SharedArrayBuffer needed (no cross-origin isolation)
  ort.env.wasm.wasmPaths = "./";          // the vendored wasm next to this page, never a CDN
  [state.pre, state.thr] = await Promise.all([loadJson("preprocess.json"), loadJson("thresholds.json")]);
  state.cal = await loadMapping(state.thr);
  const opts = { executionProviders: ["wasm"] };
  [state.model, state.ood] = await Promise.all([ort.InferenceSession.create("model.onnx", opts),
                                               ort.InferenceSession.create("ood.onnx", opts)]);
  setStatus("ready", "Ready: choose or drop a PNG/JPEG or DICOM chest X-ray. Nothing leaves this computer.");
}

// The package's calibration.json when its thresholds.json says the page shows calibrated probabilities
// (calibrate.js applies the maps); the legend says which numbers the bars are.
async function loadMapping(thr) {
  const cal = thr.probabilities === "calibrated" ? await loadJson("calibration.json") : null;
  showLegend(CxrCalibration.mapping(thr, cal));
  return cal;
}

function showLegend(mapping) {
  const el = $("legend");
  el.dataset.mapping = mapping.kind;
  el.textContent = mapping.kind === "calibrated"
    ? `Bars: calibrated probability of each finding (${mapping.note}). The black mark is the label's `
      + "operating point (its tuned threshold, mapped the same way); bold = at or above it."
    : `Bars: the operating-point scale, not a calibrated probability (${mapping.note}). The black mark is `
      + "the operating point (0.5); bold = at or above it.";
}

async function decodeGrey(blob) {
  const bitmap = await createImageBitmap(blob, { colorSpaceConversion: "none", premultiplyAlpha: "none" });
  const canvas = new OffscreenCanvas(bitmap.width, bitmap.height);
  const ctx = canvas.getContext("2d", { colorSpace: "srgb" });
  ctx.drawImage(bitmap, 0, 0);
  const data = ctx.getImageData(0, 0, bitmap.width, bitmap.height).data;
  return { grey: CxrPixels.toGrey(data, bitmap.width * bitmap.height), w: bitmap.width, h: bitmap.height };
}

// A dropped or fetched file → { grey, w, h }: a DICOM (preamble or .dcm name) through dicom.js (shards/dicom.py's
// VOI and MONOCHROME1 steps), any other image through the browser's decoder and PIL's grey conversion.
async function decodeFile(blob, name) {
  const bytes = new Uint8Array(await blob.arrayBuffer());
  if (CxrDicom.isDicom(bytes, name)) return CxrDicom.toGrey(bytes, name);
  return decodeGrey(blob);
}

function tensorAt(img, spec) {
  // preprocess.json's resize_filter: lanczos (the loader's); packages exported before it named one: bilinear
  const filter = state.pre.resize_filter || "bilinear";
  const px = CxrPixels.resizeGrey(img.grey, img.w, img.h, spec.resolution, spec.resolution, filter);
  const data = CxrPixels.normalise(px, spec.mean, spec.std);
  return { px, tensor: new ort.Tensor("float32", data, [1, 1, spec.resolution, spec.resolution]) };
}

function drawGrey(canvas, px, res) {
  canvas.width = canvas.height = res;
  const ctx = canvas.getContext("2d");
  const im = ctx.createImageData(res, res);
  for (let i = 0; i < px.length; i++) {
    im.data[4 * i] = im.data[4 * i + 1] = im.data[4 * i + 2] = px[i];
    im.data[4 * i + 3] = 255;
  }
  ctx.putImageData(im, 0, 0);
}

// Class activation map of one label drawn over the image (bilinear upsampling by the canvas), at the
// levels of CxrPixels.camLevels: clipped at 0 and scaled by its maximum, as `python -m cxr.explain`.
// Returns false, drawing nothing, when the map is zero everywhere after the clip (no positive evidence).
function drawCam(canvas, cam, dims, label) {
  const [, , h, w] = dims;
  const { levels, empty } = CxrPixels.camLevels(cam.subarray(label * h * w, (label + 1) * h * w));
  if (empty) return false;
  const off = new OffscreenCanvas(w, h);
  const ctx = off.getContext("2d");
  const im = ctx.createImageData(w, h);
  for (let i = 0; i < h * w; i++) {
    const t = levels[i];
    im.data[4 * i] = Math.round(255 * Math.min(1, 2 * t));
    im.data[4 * i + 1] = Math.round(255 * Math.max(0, 2 * t - 1));
    im.data[4 * i + 2] = 0;
    im.data[4 * i + 3] = Math.round(150 * t);
  }
  ctx.putImageData(im, 0, 0);
  const c = canvas.getContext("2d");
  c.imageSmoothingEnabled = true;
  c.drawImage(off, 0, 0, canvas.width, canvas.height);
  return true;
}

// data-prob: the model's probability; data-calibrated: the number shown (data-mapping says which kind).
function showResults(probs, labels) {
  const rows = CxrCalibration.rows(probs, labels, state.thr, state.cal);
  rows.sort((a, b) => b.shown - a.shown);
  const list = $("results");
  list.innerHTML = "";
  for (const r of rows) {
    const li = document.createElement("li");
    li.className = "row" + (r.positive ? " positive" : "");
    li.dataset.label = r.name;
    li.dataset.prob = r.p.toPrecision(9);
    li.dataset.calibrated = r.shown.toPrecision(9);
    li.dataset.mapping = r.kind;
    li.dataset.operatingPoint = String(r.o);
    li.dataset.mark = r.mark.toPrecision(9);
    li.dataset.positive = String(r.positive);
    li.innerHTML = `<span class="name">${r.name}</span>
      <span class="bar"><span class="fill" style="width:${(100 * r.shown).toFixed(1)}%"></span>
      <span class="op" style="left:${(100 * r.mark).toFixed(1)}%" title="operating point"></span></span>
      <span class="value">${(100 * r.shown).toFixed(1)}%</span>`;
    list.appendChild(li);
  }
  return rows;
}

async function predict(blob, name) {
  try {
    setStatus("busy", `Reading ${name} …`);
    $("results").innerHTML = "";
    const img = await decodeFile(blob, name);
    const gate = tensorAt(img, state.pre.ood);
    const score = (await state.ood.run({ image: gate.tensor })).score.data[0];
    $("ood").dataset.score = score.toPrecision(9);
    $("ood").textContent = `OOD score ${score.toFixed(4)} (threshold ${state.pre.ood.threshold.toFixed(4)}): distance of `
      + "the autoencoder's 1 − SSIM and the image's intensity and layout statistics from the training X-rays";
    const view = tensorAt(img, state.pre.model);
    drawGrey($("image"), view.px, state.pre.model.resolution);
    if (score > state.pre.ood.threshold) {
      setStatus("rejected", `Rejected: ${name} does not look like a chest X-ray the models were trained on `
        + `(OOD score ${score.toFixed(3)} > ${state.pre.ood.threshold.toFixed(3)}). No prediction made.`);
      return;
    }
    const out = await state.model.run({ image: view.tensor });
    const rows = showResults(out.probs.data, state.pre.labels);
    if (out.cam) {
      const top = state.pre.labels.indexOf(rows[0].name);
      const drawn = drawCam($("image"), out.cam.data, out.cam.dims, top);
      $("camlabel").dataset.empty = String(!drawn);
      $("camlabel").textContent = drawn
        ? `CAM of ${rows[0].name}: positive evidence only (clipped at 0), scaled by its maximum.`
        : `CAM of ${rows[0].name}: zero everywhere once clipped at 0 — no positive evidence for it `
          + "anywhere in this image, so no overlay is drawn.";
    }
    setStatus("done", `${name}: 14 findings, ` + (state.thr.probabilities === "calibrated"
      ? "as calibrated probabilities (the mark is each label's operating point)."
      : "on the operating-point scale (0.5 is each label's operating point)."));
  } catch (err) {
    setStatus("error", `Error: ${err.message || err}`);
  }
}

function wire() {
  $("file").addEventListener("change", (e) => { const f = e.target.files[0]; if (f) predict(f, f.name); });
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault(); drop.classList.remove("over");
    const f = e.dataTransfer.files[0]; if (f) predict(f, f.name);
  });
}

window.addEventListener("load", async () => {
  wire();
  try {
    await init();
  } catch (err) {
    setStatus("error", `Could not load the models: ${err.message || err}`);
    return;
  }
  const name = new URLSearchParams(location.search).get("image");
  if (name) {  // test hook: a same-origin file, through the same predict() as the file input
    const r = await fetch(name);
    if (!r.ok) { setStatus("error", `${name}: HTTP ${r.status}`); return; }
    await predict(await r.blob(), name);
  }
});

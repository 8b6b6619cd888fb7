// DICOM file → the 8-bit grey master, the steps of shards/dicom.py in the same order and float64 arithmetic:
// stored values (bit depth and sign from the header) → modality LUT (RescaleSlope/Intercept) → VOI (the first
// item of a VOI LUT Sequence, else the first WindowCenter/WindowWidth pair with VOILUTFunction LINEAR,
// LINEAR_EXACT or SIGMOID per PS3.3 C.11.2.1.2 straight onto 0…255, else the image's min…max) → MONOCHROME1
// inverted → rounded half to even (numpy's rint) and clipped to 0…255.
// Header parsing: dicom-parser (npm, copied next to this page by `cxr.export --web`). Pixel data must be
// uncompressed little endian (the page has no JPEG-lossless/RLE decoder): compressed files are refused with
// the command that reads them (cxr-predict). Nothing from the header but the pixels' description is read.
"use strict";

(function () {
  const UNCOMPRESSED = new Set(["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"]); // implicit / explicit VR little endian

  function hasPreamble(bytes) {
    return bytes.length >= 132 && bytes[128] === 0x44 && bytes[129] === 0x49 && bytes[130] === 0x43 && bytes[131] === 0x4d;
  }

  function isDicom(bytes, name) {
    return hasPreamble(bytes) || /\.(dcm|dicom)$/i.test(name || "");
  }

  function rint(x) { // numpy's round half to even
    const f = Math.floor(x), d = x - f;
    if (d > 0.5) return f + 1;
    if (d < 0.5) return f;
    return f % 2 === 0 ? f : f + 1;
  }

  function window_(x, center, width, fn) {
    if (fn === "LINEAR_EXACT") {
      if (width <= 0) throw new Error(`window width ${width} must be > 0 for LINEAR_EXACT`);
      return Math.min(Math.max((x - center) / width + 0.5, 0), 1) * 255;
    }
    if (fn === "SIGMOID") {
      if (width <= 0) throw new Error(`window width ${width} must be > 0 for SIGMOID`);
      return 255 / (1 + Math.exp(-4 * (x - center) / width));
    }
    if (width < 1) throw new Error(`window width ${width} must be ≥ 1 for LINEAR`);
    if (width === 1) return x <= center - 0.5 ? 0 : 255;
    return Math.min(Math.max((x - (center - 0.5)) / (width - 1) + 0.5, 0), 1) * 255;
  }

  function storedValues(ds, bytes, rows, cols) {
    const el = ds.elements.x7fe00010;
    const allocated = ds.uint16("x00280100"), bits = ds.uint16("x00280101");
    const signed = ds.uint16("x00280103") === 1;
    const n = rows * cols, step = allocated / 8;
    if (allocated !== 8 && allocated !== 16) throw new Error(`${allocated} bits allocated — the page reads 8 or 16`);
    if (el.length < n * step) throw new Error(`pixel data of ${el.length} bytes, ${n * step} expected — the file is cut short`);
    const view = new DataView(bytes.buffer, bytes.byteOffset + el.dataOffset, n * step);
    const out = new Float64Array(n), mask = 2 ** bits - 1, sign = 2 ** (bits - 1);
    for (let i = 0; i < n; i++) {
      let v = (step === 2 ? view.getUint16(2 * i, true) : view.getUint8(i)) & mask; // bits above BitsStored dropped
      if (signed && v >= sign) v -= 2 ** bits;
      out[i] = v;
    }
    return out;
  }

  function voiLut(item, values) {
    const desc = item.elements.x00283002;
    const count = item.uint16("x00283002", 0) || 65536;
    const first = desc.vr === "SS" ? item.int16("x00283002", 1) : item.uint16("x00283002", 1);
    const bits = item.uint16("x00283002", 2);
    const data = item.elements.x00283006;
    const wide = data.length >= 2 * count;
    const lut = new Float64Array(count);
    const view = new DataView(item.byteArray.buffer, item.byteArray.byteOffset + data.dataOffset, data.length);
    for (let i = 0; i < count; i++) lut[i] = wide ? view.getUint16(2 * i, true) : view.getUint8(i);
    const scale = 255 / (2 ** bits - 1);
    return values.map((x) => lut[Math.min(Math.max(Math.trunc(x) - first, 0), count - 1)] * scale);
  }

  // bytes: Uint8Array of the whole file → { grey: Uint8Array [h*w], w, h, voi }
  function toGrey(bytes, name) {
    if (!hasPreamble(bytes)) {
      throw new Error(`${name}: no DICOM preamble ('DICM' at byte 128) — not a DICOM Part 10 file; export it from the PACS as a DICOM file (or convert it to PNG)`);
    }
    let ds;
    try {
      ds = dicomParser.parseDicom(bytes);
    } catch (err) {
      throw new Error(`${name}: unreadable DICOM (${err.exception || err.message || err}) — re-export the file`);
    }
    if (!ds.elements.x7fe00010) {
      throw new Error(`${name}: not an image (modality ${ds.string("x00080060") || "?"}: no pixel data) — open the study's radiograph, not its report`);
    }
    const frames = parseInt(ds.string("x00280008") || "1", 10);
    if (frames > 1) throw new Error(`${name}: a multi-frame object (${frames} frames) — export the frame you want as its own file`);
    const photometric = (ds.string("x00280004") || "").trim().toUpperCase();
    const samples = ds.uint16("x00280002") ?? 1;
    if (samples !== 1 || (photometric !== "MONOCHROME1" && photometric !== "MONOCHROME2")) {
      throw new Error(`${name}: photometric interpretation ${photometric || "?"} with ${samples} samples per pixel — the page reads grey radiographs (MONOCHROME1/2)`);
    }
    const syntax = (ds.string("x00020010") || "").replace(/\0/g, "").trim();
    if (!UNCOMPRESSED.has(syntax)) {
      throw new Error(`${name}: compressed or big-endian DICOM (transfer syntax ${syntax}) — the page reads uncompressed DICOM; score it with cxr-predict, or export it uncompressed`);
    }
    if (ds.elements.x00283000) throw new Error(`${name}: a Modality LUT Sequence — the page applies RescaleSlope/Intercept only; score it with cxr-predict`);
    const rows = ds.uint16("x00280010"), cols = ds.uint16("x00280011");
    const stored = storedValues(ds, bytes, rows, cols);
    const slope = ds.elements.x00281053 ? ds.floatString("x00281053") : 1;
    const intercept = ds.elements.x00281052 ? ds.floatString("x00281052") : 0;
    const values = slope !== 1 || intercept !== 0 ? stored.map((v) => v * slope + intercept) : stored;
    let out, voi;
    const seq = ds.elements.x00283010;
    if (seq && seq.items && seq.items.length) {
      out = voiLut(seq.items[0].dataSet, values);
      voi = "VOI LUT sequence (first item)";
    } else if (ds.elements.x00281050 && ds.elements.x00281051) {
      const c = ds.floatString("x00281050", 0), w = ds.floatString("x00281051", 0);
      const fn = (ds.string("x00281056") || "LINEAR").trim().toUpperCase();
      out = values.map((x) => window_(x, c, w, fn));
      voi = `window C=${c} W=${w} ${fn}`;
    } else {
      let lo = Infinity, hi = -Infinity;
      for (const v of values) { if (v < lo) lo = v; if (v > hi) hi = v; }
      out = hi === lo ? values.map(() => 0) : values.map((v) => (v - lo) * (255 / (hi - lo)));
      voi = "min–max of the image (no window in the header)";
    }
    const grey = new Uint8Array(rows * cols);
    const invert = photometric === "MONOCHROME1";
    for (let i = 0; i < grey.length; i++) grey[i] = Math.min(Math.max(rint(invert ? 255 - out[i] : out[i]), 0), 255);
    return { grey, w: cols, h: rows, voi };
  }

  window.CxrDicom = { isDicom, hasPreamble, toGrey };
})();

// Pixels exactly as cxr's loader makes them (cxr/data/shard_index.py to_resolution):
//   PIL Image.convert("L") then Image.resize((R, R), Image.LANCZOS), then (x - mean*255) / (std*255).
// A port of Pillow's 8-bit resampling (libImaging/Resample.c): Lanczos (a=3; packages exported
// before preprocess.json named resize_filter: the triangle filter) whose support grows
// with the downscale factor (antialiasing), coefficients in fixed point with 22 fractional bits,
// a horizontal pass into an 8-bit image, then a vertical pass. Integer-exact with Pillow's bilinear;
// Lanczos's sin() may differ from the C library's in the last bit, which can move a coefficient by
// one fixed-point step (the tests compare pixels within one grey level).
"use strict";

const PRECISION_BITS = 32 - 8 - 2;

function bilinearFilter(x) {
  if (x < 0) x = -x;
  return x < 1 ? 1 - x : 0;
}

function sincFilter(x) {
  if (x === 0.0) return 1.0;
  x = x * Math.PI;
  return Math.sin(x) / x;
}

function lanczosFilter(x) {
  return -3.0 <= x && x < 3.0 ? sincFilter(x) * sincFilter(x / 3) : 0.0;
}

// Pillow's filters: (function, support)
const FILTERS = { bilinear: [bilinearFilter, 1.0], lanczos: [lanczosFilter, 3.0] };

// Per output pixel: first input index, count, and fixed-point weights (Pillow's precompute_coeffs
// followed by normalize_coeffs_8bpc).
function coefficients(inSize, outSize, filter) {
  const [fn, filterSupport] = FILTERS[filter];
  const scale = inSize / outSize;
  const filterscale = Math.max(scale, 1.0);
  const support = filterSupport * filterscale;
  const ksize = Math.ceil(support) * 2 + 1;
  const bounds = new Int32Array(outSize * 2);
  const kk = new Int32Array(outSize * ksize);
  const k = new Float64Array(ksize);
  for (let xx = 0; xx < outSize; xx++) {
    const center = (xx + 0.5) * scale;
    const ss = 1.0 / filterscale;
    let xmin = Math.trunc(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    let xmax = Math.trunc(center + support + 0.5);
    if (xmax > inSize) xmax = inSize;
    xmax -= xmin;
    let ww = 0.0;
    for (let x = 0; x < xmax; x++) {
      const w = fn((x + xmin - center + 0.5) * ss);
      k[x] = w;
      ww += w;
    }
    for (let x = 0; x < xmax; x++) {
      const w = ww !== 0.0 ? k[x] / ww : k[x];
      kk[xx * ksize + x] = w < 0 ? Math.trunc(-0.5 + w * (1 << PRECISION_BITS))
                                 : Math.trunc(0.5 + w * (1 << PRECISION_BITS));
    }
    bounds[xx * 2] = xmin;
    bounds[xx * 2 + 1] = xmax;
  }
  return { ksize, bounds, kk };
}

function clip8(v) {
  if (v >= (1 << PRECISION_BITS) * 256) return 255;
  if (v <= 0) return 0;
  return Math.floor(v / (1 << PRECISION_BITS));
}

// grey: Uint8Array [h*w] → Uint8Array [outH*outW]; filter "lanczos" (the loader's) or "bilinear"
function resizeGrey(grey, w, h, outW, outH, filter = "lanczos") {
  if (!(filter in FILTERS)) throw new Error(`resize filter ${filter}: unknown (lanczos or bilinear)`);
  let src = grey, sw = w;
  if (outW !== w) {
    const c = coefficients(w, outW, filter);
    const dst = new Uint8Array(outW * h);
    for (let y = 0; y < h; y++) {
      for (let xx = 0; xx < outW; xx++) {
        const xmin = c.bounds[xx * 2], n = c.bounds[xx * 2 + 1];
        let ss = 1 << (PRECISION_BITS - 1);
        for (let x = 0; x < n; x++) ss += src[y * sw + x + xmin] * c.kk[xx * c.ksize + x];
        dst[y * outW + xx] = clip8(ss);
      }
    }
    src = dst; sw = outW;
  }
  if (outH !== h) {
    const c = coefficients(h, outH, filter);
    const dst = new Uint8Array(sw * outH);
    for (let yy = 0; yy < outH; yy++) {
      const ymin = c.bounds[yy * 2], n = c.bounds[yy * 2 + 1];
      for (let x = 0; x < sw; x++) {
        let ss = 1 << (PRECISION_BITS - 1);
        for (let y = 0; y < n; y++) ss += src[(y + ymin) * sw + x] * c.kk[yy * c.ksize + y];
        dst[yy * sw + x] = clip8(ss);
      }
    }
    src = dst;
  }
  return src;
}

// RGBA ImageData → grey uint8 as PIL convert("L") (ITU-R 601-2 luma, Pillow's fixed-point L24).
function toGrey(rgba, n) {
  const out = new Uint8Array(n);
  for (let i = 0; i < n; i++) {
    const r = rgba[4 * i], g = rgba[4 * i + 1], b = rgba[4 * i + 2];
    out[i] = (r * 19595 + g * 38470 + b * 7471 + 0x8000) >>> 16;
  }
  return out;
}

// uint8 [n] → Float32Array normalised as the loader (float32 (x - mean*255) / (std*255)).
function normalise(pixels, mean, std) {
  const out = new Float32Array(pixels.length);
  const m = Math.fround(mean * 255), s = Math.fround(std * 255);
  for (let i = 0; i < pixels.length; i++) out[i] = Math.fround(Math.fround(pixels[i] - m) / s);
  return out;
}

// CAM overlay levels in [0, 1], the convention of `python -m cxr.explain` (its overlay_levels):
// ReLU — negative evidence is not drawn — then divided by the map's maximum; a map that is ≤ 0
// everywhere is empty (no positive evidence for the label): no overlay. (Min–max scaling of the
// signed map would draw a hot spot wherever the map is least negative, even when it is all negative.)
function camLevels(values) {
  let hi = 0;
  for (const v of values) if (v > hi) hi = v;
  const levels = new Float32Array(values.length);
  if (!(hi > 0) || !Number.isFinite(hi)) return { levels, empty: true };
  for (let i = 0; i < values.length; i++) levels[i] = values[i] > 0 ? values[i] / hi : 0;
  return { levels, empty: false };
}

window.CxrPixels = { resizeGrey, toGrey, normalise, camLevels };

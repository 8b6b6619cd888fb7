// Which number the page shows per finding, from the package's thresholds.json ("probabilities") and,
// when "calibrated", its calibration.json — the evaluator's post-hoc maps in cxr.calibration's format
// (that Python module owns it; apply_map there is the reference these functions follow):
//   none         p
//   temperature  sigmoid(logit(p) / temperature)
//   platt        sigmoid(a * logit(p) + b)          logit(p) = log(p / (1 - p)), p clipped to [clip, 1 - clip]
// "operating-point" (exported with --no-calibration, or a package from before calibration): the scale
// f(x) = x/(2o) for x <= o, else 1 - (1-x)/(2(1-o)) (cxr.metrics.calibrate), which puts every label's
// operating point o at 0.5. Either way a finding is positive when its model probability is at or above o;
// both maps are increasing, so the mark drawn at map(o) separates the same findings.
// tests/test_calibrated_deploy.py runs these functions in node against the Python maps.
"use strict";

(function (root) {
  const DEFAULT_CLIP = 1e-7;  // cxr.calibration.EPS; calibration.json carries it as "clip"

  function logit(p, clip) {
    const q = Math.min(Math.max(p, clip), 1 - clip);
    return Math.log(q) - Math.log1p(-q);
  }

  function sigmoid(z) {  // scipy.special.expit, without overflow for large |z|
    if (z >= 0) return 1 / (1 + Math.exp(-z));
    const e = Math.exp(z);
    return e / (1 + e);
  }

  // One label's map (a calibration.json "labels" entry) applied to a probability p.
  function applyMap(p, entry, clip = DEFAULT_CLIP) {
    switch (entry.method) {
      case "none": return p;
      case "temperature": return sigmoid(logit(p, clip) / entry.temperature);
      case "platt": return sigmoid(entry.a * logit(p, clip) + entry.b);
      default: throw new Error(`calibration.json: unknown method ${JSON.stringify(entry.method)}`);
    }
  }

  function operatingScale(x, o) {
    return x <= o ? x / (2 * o) : 1 - (1 - x) / (2 * (1 - o));
  }

  // The package's mapping: { kind: "calibrated" | "operating-point", note, map(p, i, label) } where
  // thr is thresholds.json and cal calibration.json (or null).
  function mapping(thr, cal) {
    if (thr.probabilities === "calibrated") {
      if (!cal || !cal.labels) throw new Error("thresholds.json says calibrated but calibration.json is missing");
      const clip = typeof cal.clip === "number" ? cal.clip : DEFAULT_CLIP;
      return {
        kind: "calibrated",
        note: thr.probabilities_note || "calibrated",
        map: (p, i, label) => {
          const entry = cal.labels[label];
          if (!entry) throw new Error(`calibration.json: no map for ${label}`);
          return applyMap(p, entry, clip);
        },
      };
    }
    const ops = thr.operating_points;
    return {
      kind: "operating-point",
      note: thr.probabilities_note || "operating-point scale: 0.5 is each label's operating point",
      map: (p, i) => operatingScale(p, ops[i]),
    };
  }

  // Rows of the result list: model probability p, operating point o, shown value, where the mark goes.
  function rows(probs, labels, thr, cal) {
    const m = mapping(thr, cal);
    const ops = thr.operating_points;
    return labels.map((name, i) => ({
      name, p: probs[i], o: ops[i], shown: m.map(probs[i], i, name), mark: m.map(ops[i], i, name),
      positive: probs[i] >= ops[i], kind: m.kind,
    }));
  }

  root.CxrCalibration = { applyMap, operatingScale, mapping, rows };
})(typeof window !== "undefined" ? window : globalThis);

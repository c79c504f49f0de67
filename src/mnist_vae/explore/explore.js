// The explore page's logic: the VAE's forward pass over the inlined weights, the latent map,
// decoding under the cursor, drawing and encoding, walks and the class picker.
// Plain JavaScript with no library, so the page runs from disk with no request.
"use strict";
(function () {
  const DATA = JSON.parse(document.getElementById("explore-data").textContent);
  const WEIGHTS = decodeFloats(document.getElementById("explore-weights").textContent);
  const NET = DATA.network;
  const DIM_Z = NET.dim_z;
  const N_CLASSES = DATA.classes.length;
  const COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
                   "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];
  const WALK_STEPS = 10;

  function decodeFloats(text) {
    const binary = atob(text.trim());
    const bytes = new Uint8Array(binary.length);
    for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
    return new Float32Array(bytes.buffer);  // little-endian, as written by the exporter
  }

  function floats(offset, length) {
    return WEIGHTS.subarray(offset, offset + length);
  }

  // ------------------------------------------------------------ the network

  // Each linear layer keeps views of its weights (row-major, out x in, as torch stores them).
  for (const layer of NET.encoder.concat(NET.decoder)) {
    if (layer.op === "linear") {
      layer.w = floats(layer.weight, layer.in * layer.out);
      layer.b = floats(layer.bias, layer.out);
    }
  }

  // torch's softplus: linear above its threshold, where log1p(exp(x)) == x in float32 anyway.
  function softplus(x, beta = 1, threshold = 20) {
    return beta * x > threshold ? x : Math.log1p(Math.exp(beta * x)) / beta;
  }

  // The forward pass in float64 over the float32 weights: closer to the exact result than
  // torch's float32, so the two differ by torch's rounding only (about 1e-6 on a pixel).
  function forward(layers, input) {
    let x = input;
    for (const layer of layers) {
      switch (layer.op) {
        case "linear": {
          const out = new Float64Array(layer.out), w = layer.w, n = layer.in;
          // Row by row: each output reads one contiguous row of the weights (cache-friendly).
          for (let o = 0; o < layer.out; o++) {
            let sum = 0;
            for (let i = 0, k = o * n; i < n; i++, k++) sum += w[k] * x[i];
            out[o] = sum + layer.b[o];
          }
          x = out;
          break;
        }
        case "elu": x = x.map(v => (v > 0 ? v : layer.alpha * Math.expm1(v))); break;
        case "tanh": x = x.map(Math.tanh); break;
        case "relu": x = x.map(v => (v > 0 ? v : 0)); break;
        case "sigmoid": x = x.map(v => 1 / (1 + Math.exp(-v))); break;
        case "leaky_relu": x = x.map(v => (v > 0 ? v : layer.slope * v)); break;
        case "softplus": x = x.map(v => softplus(v, layer.beta, layer.threshold)); break;
        default: throw new Error("unknown layer " + layer.op);
      }
    }
    return x;
  }

  // A conditional model reads the one-hot class after the image (encoder) or z (decoder).
  function withClass(values, cls) {
    if (!NET.conditional) return Float64Array.from(values);
    const out = new Float64Array(values.length + NET.n_classes);
    out.set(values);
    out[values.length + cls] = 1;
    return out;
  }

  // The expected image under p(x|z), as the model's mean_image computes it.
  function meanImage(logits) {
    const pixels = new Float64Array(logits.length);
    for (let i = 0; i < logits.length; i++) {
      const l = logits[i];
      if (NET.likelihood === "bernoulli") pixels[i] = 1 / (1 + Math.exp(-l));
      // continuous Bernoulli: 1/(1 - exp(-l)) - 1/l, and its Taylor series near 0.
      else pixels[i] = Math.abs(l) < 1e-2 ? 0.5 + l / 12 : -1 / Math.expm1(-l) - 1 / l;
    }
    return pixels;
  }

  function decode(z, cls) {
    return meanImage(forward(NET.decoder, withClass(z, cls)));
  }

  function encode(x, cls) {
    const out = forward(NET.encoder, withClass(x, cls));
    const mu = out.slice(0, DIM_Z), std = new Float64Array(DIM_Z);
    for (let i = 0; i < DIM_Z; i++) std[i] = softplus(out[DIM_Z + i]) + 1e-6;
    return { mu, std };
  }

  // ------------------------------------------------------------ preparing a drawing

  // The steps of data.prepare_digit, in the same order and precision: float32 up to the
  // crop (as read_user_image gives the image), float64 after; a test holds the two equal.
  const F32_0_2 = Math.fround(0.2);

  function roundHalfEven(x) {  // Python's round()
    const f = Math.floor(x), d = x - f;
    if (d > 0.5) return f + 1;
    if (d < 0.5) return f;
    return f % 2 === 0 ? f : f + 1;
  }

  function median(values) {  // numpy's median of float32 values
    const sorted = Float32Array.from(values).sort();
    const n = sorted.length, mid = n >> 1;
    return n % 2 ? sorted[mid] : Math.fround(Math.fround(sorted[mid - 1] + sorted[mid]) / 2);
  }

  function areaWeights(nOut, nIn) {  // data.area_weights
    const w = new Float64Array(nOut * nIn);
    for (let i = 0; i < nOut; i++) {
      const low = i * nIn / nOut, high = (i + 1) * nIn / nOut;
      for (let j = Math.floor(low); j < Math.min(nIn, Math.ceil(high)); j++) {
        w[i * nIn + j] = (Math.min(high, j + 1) - Math.max(low, j)) * nOut / nIn;
      }
    }
    return w;
  }

  // RGBA pixels as Pillow's convert("L") makes grey (ITU-R 601-2 luma, rounded), then / 255.
  function greyOf(imageData) {
    const { data, width, height } = imageData;
    const grey = new Float32Array(width * height);
    for (let i = 0; i < width * height; i++) {
      const luma = (data[4 * i] * 19595 + data[4 * i + 1] * 38470 + data[4 * i + 2] * 7471 + 0x8000) >> 16;
      grey[i] = luma / 255;  // a Float32Array rounds as numpy's float32 division does
    }
    return grey;
  }

  // 784 pixels prepared like MNIST's digits, or null for a blank image.
  function prepare(grey, width, height) {
    const border = [];
    for (let x = 0; x < width; x++) border.push(grey[x], grey[(height - 1) * width + x]);
    for (let y = 0; y < height; y++) border.push(grey[y * width], grey[y * width + width - 1]);
    const g = Float32Array.from(grey);
    if (median(border) > 0.5) for (let i = 0; i < g.length; i++) g[i] = 1 - g[i];
    let low = Infinity;
    for (const v of g) low = Math.min(low, v);
    let high = 0;
    for (let i = 0; i < g.length; i++) { g[i] = g[i] - low; high = Math.max(high, g[i]); }
    if (!(high > 0)) return null;
    let top = height, bottom = -1, left = width, right = -1;
    for (let y = 0; y < height; y++) {
      for (let x = 0; x < width; x++) {
        const i = y * width + x;
        g[i] = g[i] / high;
        if (g[i] > F32_0_2) {
          top = Math.min(top, y); bottom = Math.max(bottom, y);
          left = Math.min(left, x); right = Math.max(right, x);
        }
      }
    }
    const h = bottom - top + 1, w = right - left + 1;
    const scale = 20 / Math.max(h, w);
    const outH = Math.max(1, roundHalfEven(h * scale)), outW = Math.max(1, roundHalfEven(w * scale));
    const rows = areaWeights(outH, h), cols = areaWeights(outW, w);
    // ink = rows @ crop @ cols^T, the first product first, as numpy evaluates it.
    const half = new Float64Array(outH * w);
    for (let i = 0; i < outH; i++) {
      for (let j = 0; j < h; j++) {
        const r = rows[i * h + j];
        if (r === 0) continue;
        for (let x = 0; x < w; x++) half[i * w + x] += r * g[(top + j) * width + left + x];
      }
    }
    const ink = new Float64Array(outH * outW);
    for (let i = 0; i < outH; i++) {
      for (let k = 0; k < outW; k++) {
        let sum = 0;
        for (let x = 0; x < w; x++) sum += half[i * w + x] * cols[k * w + x];
        ink[i * outW + k] = sum;
      }
    }
    let total = 0, sumY = 0, sumX = 0;
    for (let i = 0; i < outH; i++) {
      for (let k = 0; k < outW; k++) {
        const v = ink[i * outW + k];
        total += v; sumY += i * v; sumX += k * v;
      }
    }
    const centreY = total > 0 ? sumY / total : outH / 2, centreX = total > 0 ? sumX / total : outW / 2;
    const clip = (v, lo, hi) => Math.min(Math.max(v, lo), hi);
    const frameTop = clip(roundHalfEven(14 - centreY), 0, 28 - outH);
    const frameLeft = clip(roundHalfEven(14 - centreX), 0, 28 - outW);
    const frame = new Float32Array(784);
    for (let i = 0; i < outH; i++) {
      for (let k = 0; k < outW; k++) frame[(frameTop + i) * 28 + frameLeft + k] = ink[i * outW + k];
    }
    return frame;
  }

  // ------------------------------------------------------------ the latent map's plane

  const ORIGIN = floats(DATA.plane.origin, DIM_Z);
  const AXES = [floats(DATA.plane.axes, DIM_Z), floats(DATA.plane.axes + DIM_Z, DIM_Z)];
  const VIEW = DATA.view;  // [u0, u1, v0, v1]
  const POINT_COORDS = floats(DATA.points.coords, 2 * DATA.points.n);

  function project(z) {  // (u, v) of a latent point on the map's plane
    const uv = [0, 0];
    for (let a = 0; a < 2; a++) for (let i = 0; i < DIM_Z; i++) uv[a] += (z[i] - ORIGIN[i]) * AXES[a][i];
    return uv;
  }

  // The point at (u, v) on the map, keeping the part of `z` off the plane (what the sliders set).
  function onPlane(z, u, v) {
    const [u0, v0] = project(z);
    const out = Float64Array.from(z);
    for (let i = 0; i < DIM_Z; i++) out[i] += (u - u0) * AXES[0][i] + (v - v0) * AXES[1][i];
    if (DIM_Z <= 2) {  // the plane is the latent space itself: set it exactly
      out[0] = u;
      if (DIM_Z === 2) out[1] = v;
    }
    return out;
  }

  const mapCanvas = document.getElementById("map");
  const MAP_W = mapCanvas.width, MAP_H = mapCanvas.height;
  const toX = u => (u - VIEW[0]) / (VIEW[1] - VIEW[0]) * MAP_W;
  const toY = v => (VIEW[3] - v) / (VIEW[3] - VIEW[2]) * MAP_H;

  // The map's (u, v) under a pointer event, from where it is in the canvas as displayed.
  function pointerUV(event) {
    const rect = mapCanvas.getBoundingClientRect();
    const u = VIEW[0] + (event.clientX - rect.left) / rect.width * (VIEW[1] - VIEW[0]);
    const v = VIEW[3] - (event.clientY - rect.top) / rect.height * (VIEW[3] - VIEW[2]);
    return [u, v];
  }

  // ------------------------------------------------------------ state

  const state = {
    z: Float64Array.from(ORIGIN),  // the pinned point: clicked, set by sliders or by a drawing
    preview: null,                 // the point under the pointer while it is over the map
    cls: 0,                        // the class a conditional model decodes and encodes with
    shown: null, decoded: null,    // the point on screen and its decoded pixels (784, in [0, 1])
    drawing: null,                 // {prepared, input, mu, std, reconstruction} of the drawing
    noise: 0,
    walkA: null, walkB: null, walk: null,  // the walk's ends and its decoded images
    classStrip: null,              // the shown point decoded in every class
    renders: 0,
  };

  // ------------------------------------------------------------ drawing pixels

  function putPixels(canvas, images) {  // images: arrays of 784 values in [0, 1], side by side
    const ctx = canvas.getContext("2d");
    const image = ctx.createImageData(28 * images.length, 28);
    images.forEach((pixels, n) => {
      for (let y = 0; y < 28; y++) {
        for (let x = 0; x < 28; x++) {
          const value = Math.round(Math.min(1, Math.max(0, pixels[y * 28 + x])) * 255);
          const at = 4 * (y * 28 * images.length + n * 28 + x);
          image.data[at] = image.data[at + 1] = image.data[at + 2] = value;
          image.data[at + 3] = 255;
        }
      }
    });
    ctx.putImageData(image, 0, 0);
  }

  // The test set's means, drawn once into a canvas the map copies every frame.
  const pointsLayer = document.createElement("canvas");
  pointsLayer.width = MAP_W; pointsLayer.height = MAP_H;
  (function drawPoints() {
    const ctx = pointsLayer.getContext("2d");
    ctx.fillStyle = "#fff";
    ctx.fillRect(0, 0, MAP_W, MAP_H);
    // Axes through the latent origin's projection, for orientation.
    const [u0, v0] = project(new Float64Array(DIM_Z));
    ctx.strokeStyle = "#ddd";
    ctx.beginPath();
    ctx.moveTo(toX(u0), 0); ctx.lineTo(toX(u0), MAP_H); ctx.moveTo(0, toY(v0)); ctx.lineTo(MAP_W, toY(v0));
    ctx.stroke();
    ctx.globalAlpha = 0.6;
    for (let n = 0; n < DATA.points.n; n++) {
      ctx.fillStyle = COLOURS[DATA.points.labels[n] % COLOURS.length];
      ctx.fillRect(toX(POINT_COORDS[2 * n]) - 1, toY(POINT_COORDS[2 * n + 1]) - 1, 2.5, 2.5);
    }
    ctx.globalAlpha = 1;
    ctx.fillStyle = "#555";
    ctx.font = "11px sans-serif";
    ctx.fillText(`${DIM_Z > 2 ? "PC1" : "z1"} [${VIEW[0].toFixed(1)}, ${VIEW[1].toFixed(1)}] \u2192`, 6, MAP_H - 6);
    if (DIM_Z >= 2) {
      ctx.save(); ctx.translate(12, MAP_H - 90); ctx.rotate(-Math.PI / 2);
      ctx.fillText(`${DIM_Z > 2 ? "PC2" : "z2"} [${VIEW[2].toFixed(1)}, ${VIEW[3].toFixed(1)}] \u2192`, 0, 0);
      ctx.restore();
    }
  })();

  function cross(ctx, z, colour, size) {
    const [u, v] = project(z);
    const x = toX(u), y = toY(v);
    ctx.strokeStyle = colour; ctx.lineWidth = 2;
    ctx.beginPath(); ctx.moveTo(x - size, y); ctx.lineTo(x + size, y); ctx.moveTo(x, y - size); ctx.lineTo(x, y + size);
    ctx.stroke();
  }

  function label(ctx, z, text) {
    const [u, v] = project(z);
    ctx.fillStyle = "#000"; ctx.font = "bold 13px sans-serif";
    ctx.fillText(text, toX(u) + 6, toY(v) - 6);
  }

  // The drawing's q(z|x) on the map: the mean, and the 1- and 2-sd ellipses of its covariance
  // diag(std^2) projected onto the plane, in screen pixels.
  function ellipse(ctx, mu, std) {
    const sx = MAP_W / (VIEW[1] - VIEW[0]), sy = -MAP_H / (VIEW[3] - VIEW[2]);  // screen y runs down
    let a = 0, b = 0, c = 0;
    for (let i = 0; i < DIM_Z; i++) {
      const s2 = std[i] * std[i];
      a += AXES[0][i] * AXES[0][i] * s2; b += AXES[0][i] * AXES[1][i] * s2; c += AXES[1][i] * AXES[1][i] * s2;
    }
    a *= sx * sx; b *= sx * sy; c *= sy * sy;
    const mean = (a + c) / 2, spread = Math.sqrt(((a - c) / 2) ** 2 + b * b);
    const angle = 0.5 * Math.atan2(2 * b, a - c);
    const [u, v] = project(mu);
    for (const k of [1, 2]) {
      ctx.beginPath();
      ctx.ellipse(toX(u), toY(v), k * Math.sqrt(mean + spread), k * Math.sqrt(Math.max(0, mean - spread)),
                  angle, 0, 2 * Math.PI);
      ctx.strokeStyle = "#000"; ctx.lineWidth = k === 1 ? 2 : 1; ctx.setLineDash(k === 1 ? [] : [4, 3]);
      ctx.stroke();
    }
    ctx.setLineDash([]);
    cross(ctx, mu, "#000", 7);
  }

  // ------------------------------------------------------------ rendering, once per frame

  const decodedCanvas = document.getElementById("decoded");
  const pointText = document.getElementById("point-text");
  let renderPending = false, lastShownKey = null;
  const afterRender = [];

  function requestRender() {
    if (!renderPending) {
      renderPending = true;
      requestAnimationFrame(render);
    }
  }

  function render() {
    renderPending = false;
    if (drawingDirty) updateDrawing();
    const shown = state.preview || state.z;
    const key = Array.from(shown).join(",") + "|" + state.cls;
    if (key !== lastShownKey) {
      lastShownKey = key;
      state.shown = Float64Array.from(shown);
      state.decoded = decode(shown, state.cls);
      putPixels(decodedCanvas, [state.decoded]);
      pointText.textContent = "z = [" + Array.from(shown, v => v.toFixed(2)).join(", ") + "]";
      updateSliders(shown);
      if (NET.conditional) {
        state.classStrip = DATA.classes.map((_, c) => decode(shown, c));
        putPixels(document.getElementById("class-strip"), state.classStrip);
      }
    }
    if (walkDirty) updateWalk();
    const ctx = mapCanvas.getContext("2d");
    ctx.drawImage(pointsLayer, 0, 0);
    if (state.walkA && state.walkB) {
      const [ua, va] = project(state.walkA), [ub, vb] = project(state.walkB);
      ctx.strokeStyle = "#000"; ctx.lineWidth = 1.5; ctx.setLineDash([5, 4]);
      ctx.beginPath(); ctx.moveTo(toX(ua), toY(va)); ctx.lineTo(toX(ub), toY(vb)); ctx.stroke();
      ctx.setLineDash([]);
    }
    if (state.walkA) { cross(ctx, state.walkA, "#444", 5); label(ctx, state.walkA, "A"); }
    if (state.walkB) { cross(ctx, state.walkB, "#444", 5); label(ctx, state.walkB, "B"); }
    if (state.drawing) ellipse(ctx, state.drawing.mu, state.drawing.std);
    cross(ctx, state.z, "#d00", 9);
    if (state.preview) cross(ctx, state.preview, "#06c", 6);
    state.renders++;
    afterRender.splice(0).forEach(resolve => resolve());
  }

  // ------------------------------------------------------------ the map

  mapCanvas.addEventListener("pointermove", event => {
    const [u, v] = pointerUV(event);
    state.preview = onPlane(state.z, u, v);
    requestRender();
  });
  mapCanvas.addEventListener("pointerleave", () => { state.preview = null; requestRender(); });
  mapCanvas.addEventListener("pointerdown", event => {
    const [u, v] = pointerUV(event);
    state.z = onPlane(state.z, u, v);
    state.preview = null;
    requestRender();
  });

  // ------------------------------------------------------------ sliders

  const sliders = [];
  (function makeSliders() {
    const box = document.getElementById("sliders");
    const count = Math.min(DIM_Z, DATA.max_sliders);
    for (let i = 0; i < count; i++) {
      const name = document.createElement("span");
      name.textContent = "z" + (i + 1);
      const input = document.createElement("input");
      Object.assign(input, { type: "range", min: -DATA.slider_range, max: DATA.slider_range, step: 0.01, value: 0 });
      input.id = "slider-" + i;
      input.setAttribute("aria-label", "latent dimension " + (i + 1));
      const readout = document.createElement("output");
      input.addEventListener("input", () => {
        const z = Float64Array.from(state.preview || state.z);
        z[i] = Number(input.value);
        state.z = z;
        state.preview = null;
        requestRender();
      });
      box.append(name, input, readout);
      sliders.push({ input, readout });
    }
    document.getElementById("slider-note").textContent = DIM_Z > count
      ? `The first ${count} of ${DIM_Z} dimensions; the others stay where the map or a drawing puts them.`
      : "Each slider shows and sets one coordinate of the current point.";
  })();

  function updateSliders(z) {
    sliders.forEach(({ input, readout }, i) => {
      if (document.activeElement !== input || Number(input.value) !== z[i]) input.value = z[i];
      readout.textContent = z[i].toFixed(2);
    });
  }

  // ------------------------------------------------------------ drawing

  const drawCanvas = document.getElementById("draw");
  const drawCtx = drawCanvas.getContext("2d", { willReadFrequently: true });
  let drawingDirty = false, lastPoint = null;
  const noiseField = gaussians(784, 1234);

  function clearDrawing() {
    drawCtx.fillStyle = "#fff";
    drawCtx.fillRect(0, 0, drawCanvas.width, drawCanvas.height);
    state.drawing = null;
    for (const id of ["prepared", "reconstruction"]) putPixels(document.getElementById(id), [new Float64Array(784)]);
    document.getElementById("drawing-text").textContent = "";
    requestRender();
  }

  function canvasPoint(event) {
    const rect = drawCanvas.getBoundingClientRect();
    return [(event.clientX - rect.left) * drawCanvas.width / rect.width,
            (event.clientY - rect.top) * drawCanvas.height / rect.height];
  }

  function strokeTo(point) {
    drawCtx.strokeStyle = "#000"; drawCtx.fillStyle = "#000";
    drawCtx.lineWidth = 18; drawCtx.lineCap = "round"; drawCtx.lineJoin = "round";
    drawCtx.beginPath();
    if (lastPoint) { drawCtx.moveTo(...lastPoint); drawCtx.lineTo(...point); drawCtx.stroke(); }
    else { drawCtx.arc(point[0], point[1], 9, 0, 2 * Math.PI); drawCtx.fill(); }
    lastPoint = point;
    drawingDirty = true;
    requestRender();
  }

  drawCanvas.addEventListener("pointerdown", event => {
    drawCanvas.setPointerCapture(event.pointerId);
    lastPoint = null;
    strokeTo(canvasPoint(event));
  });
  drawCanvas.addEventListener("pointermove", event => { if (lastPoint) strokeTo(canvasPoint(event)); });
  for (const type of ["pointerup", "pointercancel"]) {
    drawCanvas.addEventListener(type, () => { lastPoint = null; drawingDirty = true; requestRender(); });
  }
  document.getElementById("clear").addEventListener("click", clearDrawing);

  // A fixed field of N(0, 1) draws (mulberry32, Box-Muller): the noise does not flicker as you draw.
  function gaussians(n, seed) {
    let s = seed >>> 0;
    const uniform = () => {
      s = (s + 0x6d2b79f5) >>> 0;
      let t = s;
      t = Math.imul(t ^ (t >>> 15), t | 1);
      t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
      return (((t ^ (t >>> 14)) >>> 0) + 0.5) / 4294967296;
    };
    const out = new Float64Array(n);
    for (let i = 0; i < n; i += 2) {
      const r = Math.sqrt(-2 * Math.log(uniform())), angle = 2 * Math.PI * uniform();
      out[i] = r * Math.cos(angle);
      if (i + 1 < n) out[i + 1] = r * Math.sin(angle);
    }
    return out;
  }

  function updateDrawing() {
    drawingDirty = false;
    const image = drawCtx.getImageData(0, 0, drawCanvas.width, drawCanvas.height);
    const prepared = prepare(greyOf(image), image.width, image.height);
    if (!prepared) { state.drawing = null; return; }
    // Denoising runs: the noise of training, x + s N(0, 1) clipped to [0, 1], at the slider's s.
    const input = Float64Array.from(prepared, (v, i) => Math.min(1, Math.max(0, v + state.noise * noiseField[i])));
    const { mu, std } = encode(input, state.cls);
    const reconstruction = decode(mu, state.cls);
    state.drawing = { prepared, input, mu, std, reconstruction };
    state.z = Float64Array.from(mu);
    state.preview = null;
    putPixels(document.getElementById("prepared"), [input]);
    putPixels(document.getElementById("reconstruction"), [reconstruction]);
    document.getElementById("drawing-text").textContent =
      "mean [" + Array.from(mu, v => v.toFixed(2)).join(", ") + "]\nsd [" + Array.from(std, v => v.toFixed(2)).join(", ") + "]";
  }

  if (DATA.summary.add_noise) {
    const control = document.getElementById("noise-control"), slider = document.getElementById("noise");
    control.hidden = false;
    slider.addEventListener("input", () => {
      state.noise = Number(slider.value);
      document.getElementById("noise-value").textContent = slider.value;
      drawingDirty = state.drawing !== null;
      requestRender();
    });
  }

  // ------------------------------------------------------------ walk

  let walkDirty = false;

  function updateWalk() {
    walkDirty = false;
    if (!state.walkA || !state.walkB) return;
    state.walk = [];
    for (let s = 0; s < WALK_STEPS; s++) {
      const t = s / (WALK_STEPS - 1);
      state.walk.push(decode(state.walkA.map((a, i) => (1 - t) * a + t * state.walkB[i]), state.cls));
    }
    putPixels(document.getElementById("walk"), state.walk);
  }

  document.getElementById("walk-a").addEventListener("click", () => {
    state.walkA = Float64Array.from(state.z); walkDirty = true; requestRender();
  });
  document.getElementById("walk-b").addEventListener("click", () => {
    state.walkB = Float64Array.from(state.z); walkDirty = true; requestRender();
  });

  // ------------------------------------------------------------ classes, legend, header

  if (NET.conditional) {
    document.getElementById("class-panel").hidden = false;
    const picker = document.getElementById("class-picker");
    DATA.classes.forEach((name, c) => {
      const button = document.createElement("button");
      button.type = "button";
      button.textContent = name;
      button.dataset.cls = c;
      button.addEventListener("click", () => {
        state.cls = c;
        picker.querySelectorAll("button").forEach(b => b.classList.toggle("selected", Number(b.dataset.cls) === c));
        drawingDirty = state.drawing !== null;
        walkDirty = true;
        requestRender();
      });
      if (c === 0) button.classList.add("selected");
      picker.append(button);
    });
  }

  (function legendAndHeader() {
    const legend = document.getElementById("legend");
    DATA.classes.forEach((name, c) => {
      const item = document.createElement("span");
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      swatch.style.background = COLOURS[c % COLOURS.length];
      item.append(swatch, name);
      legend.append(item);
    });
    document.getElementById("map-title").textContent = DIM_Z === 2
      ? `Latent map: ${DATA.points.n} test images' means in the z plane`
      : DIM_Z === 1 ? `Latent map: ${DATA.points.n} test images' means on the z line (spread by class)`
        : `Latent map: ${DATA.points.n} test images' means on their first two principal axes`;
    const s = DATA.summary;
    const parts = [s.run, s.dataset, `dim_z ${s.dim_z}`, `${s.n_hidden} hidden`, s.likelihood,
                   `binarize ${s.binarize}`];
    if (s.add_noise) parts.push(`denoising (noise ${s.noise_factor})`);
    if (s.conditional) parts.push("conditional");
    if (s.beta !== undefined && s.beta !== 1) parts.push(`\u03b2 ${s.beta}`);
    if (s.objective && s.objective !== "elbo") parts.push(s.objective);
    parts.push(`${s.epochs} epochs`);
    const given = s.given_y ? "(x|y)" : "";  // a conditional run's numbers bound log p(x|y)
    if (s.test_neg_elbo !== undefined) parts.push(`test \u2212ELBO${given} ${s.test_neg_elbo.toFixed(2)}`);
    if (s.nll) {
      const stderr = s.nll.stderr === null ? "" : ` \u00b1 ${s.nll.stderr.toFixed(2)}`;
      parts.push(`test NLL${given} ${s.nll.nll.toFixed(2)}${stderr} (k=${s.nll.k})`);
    }
    document.getElementById("summary").textContent = parts.join(" \u00b7 ");
  })();

  clearDrawing();

  // For the tests and the curious: the page's state and its computations, read-only in spirit.
  window.explore = {
    data: DATA, state, decode, encode, prepare, greyOf, project,
    drawingPNG: () => drawCanvas.toDataURL("image/png"),
    // A promise resolved once the page has drawn a frame after everything done so far.
    settled: () => new Promise(resolve => { afterRender.push(resolve); requestRender(); }),
    ready: false,
  };
  window.explore.settled().then(() => {
    window.explore.ready = true;
    window.explore.loadMs = performance.now();
  });
})();

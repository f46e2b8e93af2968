// vlm-steer playground: plain JS, no build step, no CDN. It speaks the public HTTP API only, with
// URLs relative to the page (so a Ray Serve route prefix just works), and shows the exact request
// body it sent so users can copy it into code.
"use strict";

const $ = (sel) => document.querySelector(sel);
const API_BASE = new URL("../", window.location.href); // the page lives at {service}/ui/
const KEY_STORAGE = "vlm-steer-api-key";
const state = { image: null, lastRequest: null, tab: "json", report: null };

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("#api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

// Errors read exactly as the API words them: "<status> <type>: <message> (param <field>)".
function apiError(status, err) {
  return new Error(`${status} ${err.type}: ${err.message}` + (err.param ? ` (param ${err.param})` : ""));
}

async function api(method, path, body) {
  const resp = await fetch(new URL(path, API_BASE), {
    method, headers: headers(), body: body === undefined ? undefined : JSON.stringify(body),
  });
  let data = null;
  try { data = await resp.json(); } catch (_) { data = null; }
  if (!resp.ok) {
    throw apiError(resp.status, data && data.error ? data.error : { type: "http_error", message: resp.statusText || "no JSON body" });
  }
  return data;
}

// POST /v1/steer with "stream": true: onDelta({type, text}) per server-sent delta, then the result event's body.
async function steerStreamed(req, onDelta) {
  const resp = await fetch(new URL("v1/steer", API_BASE), {
    method: "POST", headers: headers(), body: JSON.stringify({ ...req, stream: true }),
  });
  if (!resp.ok) {
    let data = null;
    try { data = await resp.json(); } catch (_) { data = null; }
    throw apiError(resp.status, data && data.error ? data.error : { type: "http_error", message: resp.statusText || "no JSON body" });
  }
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    for (let cut = buffer.indexOf("\n\n"); cut >= 0; cut = buffer.indexOf("\n\n")) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let event = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) event = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      const payload = JSON.parse(data);
      if (event === "delta") onDelta(payload);
      else if (event === "error") throw apiError(resp.status, payload.error);
      else if (event === "result") return payload;
    }
  }
  throw new Error("the answer stream ended without a result");
}

const fmt = (x, digits) => (x === null || x === undefined ? "n/a" : Number(x).toFixed(digits));

function el(tag, props = {}, children = []) {
  const node = Object.assign(document.createElement(tag), props);
  for (const child of children) node.append(child);
  return node;
}

function showError(message) {
  const box = $("#error");
  box.textContent = message || "";
  box.hidden = !message;
}

function blobToDataUrl(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}

async function selectImage(dataUrl) {
  state.image = dataUrl;
  $("#preview").src = dataUrl;
  $("#preview").hidden = false;
  await refreshLatents();
}

async function loadExamples() {
  const resp = await fetch("examples.json");
  const examples = resp.ok ? await resp.json() : [];
  const box = $("#examples");
  box.replaceChildren();
  $("#no-examples").hidden = examples.length > 0;
  for (const ex of examples) {
    const btn = el("button", { type: "button", title: ex.name }, [el("img", { alt: ex.name, src: ex.url })]);
    btn.dataset.name = ex.name;
    btn.addEventListener("click", async () => {
      box.querySelectorAll("button").forEach((b) => b.classList.remove("selected"));
      btn.classList.add("selected");
      await selectImage(await blobToDataUrl(await (await fetch(ex.url)).blob()));
    });
    box.append(btn);
  }
}

async function loadSaes() {
  const body = await api("GET", "v1/saes");
  const select = $("#sae");
  const previous = select.value;
  select.replaceChildren();
  for (const sae of body.data) {
    const opt = el("option", { value: sae.id, textContent: `${sae.id} (layer ${sae.layer}, ${sae.n_latents} latents, ${sae.architecture})` });
    opt.selected = previous ? sae.id === previous : sae.default;
    select.append(opt);
  }
}

// The latent browser's latents.json (written by `vlm-steer evaluate`), when the service mounts a report.
async function loadReport() {
  const resp = await fetch("report/latents.json");
  if (!resp.ok) return;
  const data = await resp.json();
  state.report = new Map(data.latents.map((card) => [card.latent, card]));
  $("#report-link").hidden = false;
}

function addIntervention(spec = {}) {
  const row = $("#intervention-row").content.firstElementChild.cloneNode(true);
  const value = spec.value ?? 20;
  const slider = row.querySelector(".value-slider");
  const number = row.querySelector(".value");
  row.querySelector(".latent").value = spec.latent ?? 0;
  row.querySelector(".mode").value = spec.mode ?? "pin";
  row.querySelector(".tokens").value = spec.tokens ?? "all";
  row.querySelector(".unit").value = spec.unit ?? "raw";
  const bound = Math.max(50, Math.ceil(Math.abs(value) * 2));
  slider.min = -bound;
  slider.max = bound;
  slider.value = value;
  number.value = value;
  slider.addEventListener("input", () => { number.value = slider.value; });
  number.addEventListener("input", () => { slider.value = number.value; });
  row.querySelector(".remove").addEventListener("click", () => row.remove());
  $("#interventions").append(row);
  watchInterventionRow(row);  // dictionary.js: slider range from the latent's statistics
}

function interventions() {
  return [...document.querySelectorAll("#interventions .intervention")].map((row) => ({
    latent: Number(row.querySelector(".latent").value),
    mode: row.querySelector(".mode").value,
    value: Number(row.querySelector(".value").value),
    ...(row.querySelector(".unit").value === "raw" ? {} : { unit: row.querySelector(".unit").value }),
    tokens: row.querySelector(".tokens").value,
  }));
}

// A strong pin: twice the latent's largest value in the report, else four times its value here.
function suggestedPin(latent, value) {
  const card = state.report && state.report.get(latent);
  const strong = card && card.max > 0 ? 2 * card.max : 4 * value;
  return Math.max(1, Math.round(strong * 2) / 2);
}

async function refreshLatents() {
  if (!state.image) return;
  const list = $("#latents");
  list.replaceChildren();
  $("#latents-hint").textContent = "Encoding…";
  try {
    const res = await api("POST", "v1/encode", {
      image: state.image, sae: $("#sae").value || null, top_k: Number($("#top-k").value),
      tokens: $("#encode-tokens").value, reduce: $("#encode-reduce").value,
    });
    $("#latents-hint").textContent = `SAE ${res.sae}: L0 ${fmt(res.l0, 1)} active latents per token, FVU ${fmt(res.fvu, 3)}.`;
    for (const { latent, value } of res.latents) {
      const pin = el("button", { type: "button", className: "pin", textContent: "pin" });
      pin.addEventListener("click", () => addIntervention({ latent, mode: "pin", value: suggestedPin(latent, value) }));
      const li = el("li", {}, [el("span", { className: "latent-id", textContent: `latent ${latent}` }), ` = ${fmt(value, 3)}`, pin]);
      li.dataset.latent = latent;
      const card = state.report && state.report.get(latent);
      if (card && card.grid) {
        const ms = card.ms === null ? "" : `, MS ${fmt(card.ms, 2)}`;
        li.append(el("img", { className: "tops", src: "report/" + card.grid, alt: `top images of latent ${latent}`,
          title: `top images of latent ${latent} (${card.level}${ms})` }));
      }
      list.append(li);
    }
    await labelEncodedLatents(list);  // dictionary.js: each latent's label
  } catch (e) {
    $("#latents-hint").textContent = e.message;
  }
}

function buildRequest() {
  return {
    prompt: $("#prompt").value,
    image: state.image,
    sae: $("#sae").value || null,
    interventions: interventions(),
    types: ["STEERED", "DEFAULT"],
    use_error_term: document.querySelector("input[name=edit-mode]:checked").value === "error",
    pre_zero: $("#pre-zero").checked,
    max_tokens: Number($("#max-tokens").value),
  };
}

// A Python literal for a JSON value (JSON strings are valid Python strings).
function toPython(value, indent = "") {
  if (value === null) return "None";
  if (value === true) return "True";
  if (value === false) return "False";
  if (typeof value !== "object") return JSON.stringify(value);
  const inner = indent + "    ";
  if (Array.isArray(value)) {
    if (!value.length) return "[]";
    return "[\n" + value.map((v) => inner + toPython(v, inner)).join(",\n") + ",\n" + indent + "]";
  }
  const items = Object.entries(value).map(([k, v]) => `${inner}${JSON.stringify(k)}: ${toPython(v, inner)}`);
  return items.length ? "{\n" + items.join(",\n") + ",\n" + indent + "}" : "{}";
}

function renderRequest() {
  const req = state.lastRequest;
  const pre = $("#request-code");
  $("#copy").hidden = !req;
  if (!req) { pre.textContent = ""; return; }
  const json = JSON.stringify(req, null, 2);
  const url = new URL("v1/steer", API_BASE).href;
  const keyed = Boolean($("#api-key").value.trim());
  if (state.tab === "json") pre.textContent = json;
  if (state.tab === "curl") {
    const auth = keyed ? ' \\\n  -H "Authorization: Bearer $VLM_STEER_KEY"' : "";
    pre.textContent = `curl -s ${url} -H "Content-Type: application/json"${auth} \\\n  -d @- <<'JSON'\n${json}\nJSON`;
  }
  if (state.tab === "python") {
    const auth = keyed ? '{"Authorization": "Bearer " + os.environ["VLM_STEER_KEY"]}' : "{}";
    pre.textContent = `import os\n\nimport httpx\n\nrequest = ${toPython(req)}\n` +
      `response = httpx.post(${JSON.stringify(url)}, json=request, headers=${auth}, timeout=120)\n` +
      `print(response.json())`;
  }
}

function metricRows(res) {
  const m = res.metrics;
  const rows = [["model / SAE", `${res.model} / ${res.sae}`], ["L0 (active latents per token)", fmt(m.sae.l0, 2)],
    ["FVU", fmt(m.sae.fvu, 4)]];
  if (m.embed_cosine !== null && m.embed_cosine !== undefined) rows.push(["embedding cosine, steered vs default", fmt(m.embed_cosine, 4)]);
  for (const l of m.sae.latents) rows.push([`latent ${l.latent} before → after`, `${fmt(l.before, 3)} → ${fmt(l.after, 3)}`]);
  for (const out of res.outputs) rows.push([`${out.type} tokens (prompt + completion)`, `${out.usage.prompt_tokens} + ${out.usage.completion_tokens}, ${out.finish_reason}`]);
  for (const [stage, s] of Object.entries(m.timings_s)) rows.push([`${stage} time`, `${(s * 1000).toFixed(1)} ms`]);
  return rows;
}

function renderResults(res) {
  for (const out of res.outputs) (out.type === "STEERED" ? $("#out-steered") : $("#out-default")).textContent = out.text;
  $("#metrics").replaceChildren(...metricRows(res).map(([k, v]) => el("tr", {}, [el("th", { textContent: k }), el("td", { textContent: v })])));
}

async function run() {
  showError("");
  if (!state.image) { showError("Pick an example or drop an image first."); return; }
  const req = buildRequest();
  state.lastRequest = req;
  renderRequest();
  const outputs = { STEERED: $("#out-steered"), DEFAULT: $("#out-default") };
  for (const pre of Object.values(outputs)) { pre.textContent = "…"; pre.dataset.streamed = ""; }
  $("#metrics").replaceChildren();
  $("#run").disabled = true;
  try {
    renderResults(await steerStreamed(req, ({ type, text }) => {
      const pre = outputs[type];
      pre.dataset.streamed += text;
      pre.textContent = pre.dataset.streamed;  // the answer grows as its tokens are made
    }));
  } catch (e) {
    $("#out-steered").textContent = "—";
    $("#out-default").textContent = "—";
    showError(e.message);
  } finally {
    $("#run").disabled = false;
  }
}

async function connect() {
  try {
    await loadSaes();
    showError("");
    await refreshLatents();
  } catch (e) {
    showError(e.message + (e.message.startsWith("401") ? " — enter the API key at the top." : ""));
  }
}

function wire() {
  const key = $("#api-key");
  key.value = sessionStorage.getItem(KEY_STORAGE) || "";
  key.addEventListener("change", () => {
    sessionStorage.setItem(KEY_STORAGE, key.value.trim());
    renderRequest();
    connect();
  });
  $("#add-intervention").addEventListener("click", () => addIntervention());
  $("#run").addEventListener("click", run);
  for (const id of ["#sae", "#top-k", "#encode-tokens", "#encode-reduce"]) $(id).addEventListener("change", refreshLatents);
  $("#file").addEventListener("change", async (e) => { if (e.target.files[0]) await selectImage(await blobToDataUrl(e.target.files[0])); });
  const drop = $("#drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", async (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files[0]) await selectImage(await blobToDataUrl(e.dataTransfer.files[0]));
  });
  document.querySelectorAll(".tabs button[data-tab]").forEach((b) => b.addEventListener("click", () => {
    document.querySelectorAll(".tabs button[data-tab]").forEach((x) => x.classList.toggle("active", x === b));
    state.tab = b.dataset.tab;
    renderRequest();
  }));
  $("#copy").addEventListener("click", async () => {
    const text = $("#request-code").textContent;
    try { await navigator.clipboard.writeText(text); $("#copy").textContent = "copied"; } catch (_) {
      window.getSelection().selectAllChildren($("#request-code"));
      $("#copy").textContent = "selected: press Ctrl+C";
    }
    setTimeout(() => { $("#copy").textContent = "copy"; }, 1500);
  });
}

async function main() {
  wire();
  const latent = new URLSearchParams(window.location.search).get("latent");
  if (latent !== null && /^\d+$/.test(latent)) addIntervention({ latent: Number(latent), mode: "pin", value: 20 });
  const loaded = await Promise.allSettled([loadExamples(), loadReport(), connect()]);
  const failed = loaded.find((r) => r.status === "rejected");
  if (failed) showError(String(failed.reason && failed.reason.message || failed.reason));
  document.body.dataset.ready = "1";
}

main();

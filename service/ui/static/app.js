// vlm-steer playground: plain JS, no build step, no CDN. It speaks the public HTTP API only,
// and shows the exact request it sent so users can copy it into code.
"use strict";

const $ = (sel) => document.querySelector(sel);
const state = { image: null, saes: [], lastRequest: null, tab: "json", report: null };

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("#api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function api(method, path, body) {
  const resp = await fetch(path, { method, headers: headers(), body: body === undefined ? undefined : JSON.stringify(body) });
  let data = null;
  try { data = await resp.json(); } catch (_) { /* non-JSON body: reported below */ }
  if (!resp.ok) {
    const err = data && data.error ? data.error : { message: `HTTP ${resp.status}`, type: "http_error" };
    const where = err.param ? ` (${err.param})` : "";
    throw new Error(`${resp.status} ${err.type}: ${err.message}${where}`);
  }
  return data;
}

function showError(message) {
  const el = $("#error");
  el.textContent = message || "";
  el.hidden = !message;
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
  const preview = $("#preview");
  preview.src = dataUrl;
  preview.hidden = false;
  await refreshLatents();
}

async function loadExamples() {
  const examples = await api("GET", "/ui/examples.json");
  const box = $("#examples");
  for (const ex of examples) {
    const btn = document.createElement("button");
    btn.type = "button";
    btn.title = ex.name;
    btn.dataset.name = ex.name;
    btn.innerHTML = `<img alt="${ex.name}" src="${ex.url}">`;
    btn.addEventListener("click", async () => {
      box.querySelectorAll("button").forEach((b) => b.classList.remove("selected"));
      btn.classList.add("selected");
      const blob = await (await fetch(ex.url)).blob();
      await selectImage(await blobToDataUrl(blob));
    });
    box.appendChild(btn);
  }
}

async function loadSaes() {
  const body = await api("GET", "/v1/saes");
  state.saes = body.data;
  const select = $("#sae");
  select.innerHTML = "";
  for (const sae of state.saes) {
    const opt = document.createElement("option");
    opt.value = sae.id;
    opt.textContent = `${sae.id} (layer ${sae.layer}, ${sae.n_latents} latents)`;
    if (sae.default) opt.selected = true;
    select.appendChild(opt);
  }
}

async function loadReport() {
  try { state.report = await api("GET", "/ui/report/latents.json"); } catch (_) { state.report = null; }
}

function addIntervention(spec = {}) {
  const row = $("#intervention-row").content.firstElementChild.cloneNode(true);
  row.querySelector(".latent").value = spec.latent ?? 0;
  row.querySelector(".mode").value = spec.mode ?? "pin";
  row.querySelector(".value").value = spec.value ?? 20;
  row.querySelector(".value-slider").value = spec.value ?? 20;
  row.querySelector(".tokens").value = spec.tokens ?? "all";
  row.querySelector(".value-slider").addEventListener("input", (e) => { row.querySelector(".value").value = e.target.value; });
  row.querySelector(".value").addEventListener("input", (e) => { row.querySelector(".value-slider").value = e.target.value; });
  row.querySelector(".remove").addEventListener("click", () => row.remove());
  $("#interventions").appendChild(row);
}

function interventions() {
  return [...document.querySelectorAll("#interventions .intervention")].map((row) => ({
    latent: Number(row.querySelector(".latent").value),
    mode: row.querySelector(".mode").value,
    value: Number(row.querySelector(".value").value),
    tokens: row.querySelector(".tokens").value,
  }));
}

async function refreshLatents() {
  if (!state.image) return;
  const list = $("#latents");
  list.innerHTML = "";
  $("#latents-hint").textContent = "Encoding…";
  try {
    const res = await api("POST", "/v1/encode", {
      image: state.image, sae: $("#sae").value, top_k: 10,
      tokens: $("#encode-tokens").value, reduce: $("#encode-reduce").value,
    });
    $("#latents-hint").textContent = `L0 ${res.l0.toFixed(1)} per token, FVU ${res.fvu.toFixed(3)}. Click "pin" to steer with a latent.`;
    for (const { latent, value } of res.latents) {
      const li = document.createElement("li");
      li.innerHTML = `latent <b>${latent}</b> = ${value.toFixed(3)}`;
      const pin = document.createElement("button");
      pin.type = "button";
      pin.textContent = "pin";
      pin.addEventListener("click", () => addIntervention({ latent, mode: "pin", value: Math.max(10, Math.round(value * 4)) }));
      li.appendChild(pin);
      const tops = state.report && state.report.latents && state.report.latents[String(latent)];
      if (tops && tops.grid) {
        const img = document.createElement("img");
        img.className = "tops";
        img.alt = `top images of latent ${latent}`;
        img.src = "/ui/report/" + tops.grid;
        li.appendChild(img);
      }
      list.appendChild(li);
    }
  } catch (e) {
    $("#latents-hint").textContent = e.message;
  }
}

function buildRequest() {
  return {
    prompt: $("#prompt").value,
    image: state.image,
    sae: $("#sae").value,
    interventions: interventions(),
    types: ["STEERED", "DEFAULT"],
    use_error_term: document.querySelector("input[name=edit-mode]:checked").value === "error",
    pre_zero: $("#pre-zero").checked,
    max_tokens: Number($("#max-tokens").value),
  };
}

function renderRequest() {
  const req = state.lastRequest;
  const pre = $("#request-json");
  if (!req) { pre.textContent = ""; return; }
  const json = JSON.stringify(req, null, 2);
  const origin = window.location.origin;
  const auth = $("#api-key").value.trim() ? ` \\\n  -H "Authorization: Bearer $VLM_STEER_API_KEY"` : "";
  if (state.tab === "json") pre.textContent = json;
  if (state.tab === "curl") pre.textContent = `curl -s ${origin}/v1/steer -H "Content-Type: application/json"${auth} \\\n  -d @- <<'JSON'\n${json}\nJSON`;
  if (state.tab === "python") pre.textContent =
    `import httpx\n\nrequest = ${json.replace(/\btrue\b/g, "True").replace(/\bfalse\b/g, "False").replace(/\bnull\b/g, "None")}\n` +
    `headers = {${auth ? '"Authorization": "Bearer " + API_KEY' : ""}}\n` +
    `response = httpx.post("${origin}/v1/steer", json=request, headers=headers, timeout=120)\nprint(response.json())`;
  pre.dataset.request = json;
}

function renderResults(res) {
  for (const out of res.outputs) {
    const el = out.type === "STEERED" ? $("#out-steered") : $("#out-default");
    el.textContent = out.text;
  }
  const m = res.metrics;
  const rows = [["L0 (per token)", m.sae.l0.toFixed(2)], ["FVU", m.sae.fvu.toFixed(4)]];
  if (m.embed_cosine !== null && m.embed_cosine !== undefined) rows.push(["embedding cosine (steered vs default)", m.embed_cosine.toFixed(4)]);
  for (const l of m.sae.latents) rows.push([`latent ${l.latent} before → after`, `${l.before.toFixed(3)} → ${l.after.toFixed(3)}`]);
  for (const [stage, s] of Object.entries(m.timings_s)) rows.push([`${stage} (s)`, s.toFixed(4)]);
  $("#metrics").innerHTML = rows.map(([k, v]) => `<tr><th>${k}</th><td>${v}</td></tr>`).join("");
}

async function run() {
  showError("");
  if (!state.image) { showError("Pick an example or drop an image first."); return; }
  const req = buildRequest();
  state.lastRequest = req;
  renderRequest();
  $("#out-steered").textContent = "…";
  $("#out-default").textContent = "…";
  try {
    renderResults(await api("POST", "/v1/steer", req));
  } catch (e) {
    $("#out-steered").textContent = "—";
    $("#out-default").textContent = "—";
    showError(e.message);
  }
}

function wire() {
  $("#api-key").value = localStorage.getItem("vlm-steer-api-key") || "";
  $("#api-key").addEventListener("change", (e) => {
    localStorage.setItem("vlm-steer-api-key", e.target.value);
    showError("");
    loadSaes().then(refreshLatents).catch((err) => showError(err.message));
  });
  $("#add-intervention").addEventListener("click", () => addIntervention());
  $("#run").addEventListener("click", run);
  $("#sae").addEventListener("change", refreshLatents);
  $("#encode-tokens").addEventListener("change", refreshLatents);
  $("#encode-reduce").addEventListener("change", refreshLatents);
  $("#file").addEventListener("change", async (e) => { if (e.target.files[0]) await selectImage(await blobToDataUrl(e.target.files[0])); });
  const drop = $("#drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", async (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files[0]) await selectImage(await blobToDataUrl(e.dataTransfer.files[0]));
  });
  document.querySelectorAll(".tabs button").forEach((b) => b.addEventListener("click", () => {
    document.querySelectorAll(".tabs button").forEach((x) => x.classList.remove("active"));
    b.classList.add("active");
    state.tab = b.dataset.tab;
    renderRequest();
  }));
}

async function main() {
  wire();
  const latent = new URLSearchParams(window.location.search).get("latent");
  if (latent !== null && /^\d+$/.test(latent)) addIntervention({ latent: Number(latent), mode: "pin", value: 20 });
  try {
    await Promise.all([loadSaes(), loadExamples(), loadReport()]);
  } catch (e) {
    showError(e.message + (e.message.startsWith("401") ? " — enter the API key above." : ""));
  }
  document.body.dataset.ready = "1";
}

main();

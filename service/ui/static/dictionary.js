// The latent dictionary in the playground: search latents by label, slider ranges from each latent's
// statistics, the label beside each latent of the encode view. Loaded before app.js; it uses app.js's
// helpers ($, el, fmt, api, addIntervention) only when called, and speaks GET /v1/saes/{sae}/latents[/{k}].
"use strict";

const DEFAULT_RELATIVE_PIN = { value: 5, unit: "max" }; // the README's documented default
const RELATIVE_SLIDER_MAX = 10;                       // relative values: 0..10 x the latent's figure
const RAW_SLIDER_SPAN = 10;                           // raw values: up to 10 x the latent's max activation
const latentDetails = new Map();                      // "sae/latent" -> Promise<detail | null>

function dictionarySae() { return $("#sae").value; }

// One latent's statistics and label (cached per SAE); null when the SAE has no dictionary.
function latentDetail(latent) {
  const key = `${dictionarySae()}/${latent}`;
  if (!latentDetails.has(key)) {
    latentDetails.set(key, api("GET", `v1/saes/${encodeURIComponent(dictionarySae())}/latents/${latent}`).catch(() => null));
  }
  return latentDetails.get(key);
}

function labelText(label) {
  return label ? `${label.label} (${fmt(label.score, 2)})` : "no label";
}

async function searchLatents() {
  const query = $("#latent-query").value.trim();
  const list = $("#latent-results");
  const hint = $("#latent-search-hint");
  list.replaceChildren();
  hint.textContent = "Searching…";
  const params = new URLSearchParams({ top_k: "10" });
  if (query) params.set("query", query);
  try {
    const res = await api("GET", `v1/saes/${encodeURIComponent(dictionarySae())}/latents?${params}`);
    const vocab = res.vocabulary ? ` labelled from the ${res.vocabulary.name} vocabulary` : "";
    hint.textContent = res.data.length
      ? `${res.data.length} latents${vocab}, strongest first; "pin" adds one at ${DEFAULT_RELATIVE_PIN.value} × its max activation.`
      : `No latent's label contains “${query}”.`;
    for (const row of res.data) {
      const pin = el("button", { type: "button", className: "pin", textContent: "pin" });
      pin.addEventListener("click", () => addIntervention({ latent: row.latent, mode: "pin", ...DEFAULT_RELATIVE_PIN }));
      const li = el("li", {}, [
        el("span", { className: "latent-id", textContent: `latent ${row.latent}` }), " ",
        el("span", { className: "latent-label", textContent: labelText(row.label) }),
        el("span", { className: "latent-stats", textContent: ` max ${fmt(row.max, 2)}, fires on ${fmt(100 * row.frequency, 2)} % of tokens` }),
        pin,
      ]);
      li.dataset.latent = row.latent;
      list.append(li);
    }
  } catch (e) {
    hint.textContent = e.message;
  }
}

// The encode view: each listed latent gets its label (called by app.js after it fills the list).
async function labelEncodedLatents(list) {
  await Promise.all([...list.querySelectorAll("li[data-latent]")].map(async (li) => {
    const detail = await latentDetail(Number(li.dataset.latent));
    if (detail) li.querySelector(".latent-id").after(el("span", { className: "latent-label", textContent: " " + labelText(detail.label) }));
  }));
}

// An intervention row's slider spans what makes sense for its latent: 0..10 for a relative unit, else up to
// 10 x the latent's max activation (both signs for nudge); the hint shows the latent's figures.
async function fitInterventionRange(row) {
  const slider = row.querySelector(".value-slider");
  const unit = row.querySelector(".unit").value;
  const mode = row.querySelector(".mode").value;
  const hint = row.querySelector(".range-hint");
  const detail = mode === "mul" ? null : await latentDetail(Number(row.querySelector(".latent").value));
  hint.textContent = detail && detail.max !== null
    ? `${labelText(detail.label)}; max ${fmt(detail.max, 2)}, p99 ${fmt(detail.p99, 2)}, mean ${fmt(detail.mean, 2)}` : "";
  let bound = null;
  if (unit !== "raw") bound = RELATIVE_SLIDER_MAX;
  else if (detail && detail.max) bound = Math.ceil(RAW_SLIDER_SPAN * detail.max);
  if (bound === null) return;
  slider.min = mode === "nudge" ? -bound : 0;
  slider.max = bound;
  slider.step = bound / 200;
  slider.value = row.querySelector(".value").value;
}

function watchInterventionRow(row) {
  for (const cls of [".latent", ".unit", ".mode"]) row.querySelector(cls).addEventListener("change", () => fitInterventionRange(row));
  fitInterventionRange(row);
}

document.getElementById("latent-search").addEventListener("click", searchLatents);
document.getElementById("latent-query").addEventListener("keydown", (e) => { if (e.key === "Enter") searchLatents(); });

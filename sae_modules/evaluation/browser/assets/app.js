// Renders the latent cards from the JSON embedded in index.html (fetch() is blocked on file://).
"use strict";
(function () {
  const data = JSON.parse(document.getElementById("data").textContent);
  const grid = document.getElementById("grid");
  const controls = ["ms-min", "ms-max", "level", "sort", "latent", "unscored"].map((id) => document.getElementById(id));
  const [msMin, msMax, level, sort, latentBox, unscored] = controls;
  const fmt = (x, digits) => (x === null ? "n/a" : x.toFixed(digits));

  document.getElementById("meta").textContent = data.meta.summary;
  for (const name of data.levels) {
    const option = document.createElement("option");
    option.value = name;
    option.textContent = name;
    level.appendChild(option);
  }

  function card(latent) {
    const el = document.createElement("article");
    el.className = "card";
    el.id = "latent-" + latent.latent;
    const title = document.createElement("h2");
    title.textContent = "Latent " + latent.latent;
    el.appendChild(title);
    const img = document.createElement("img");
    img.src = latent.grid;
    img.alt = "Top images of latent " + latent.latent;
    el.appendChild(img);
    const facts = document.createElement("dl");
    const rows = [["MS", fmt(latent.ms, 3)], ["density", fmt(latent.density, 4)], ["level", latent.level],
                  ["max act.", fmt(latent.max, 3)]];
    if (latent.depth !== null && latent.depth !== undefined) rows.push(["LCA depth", fmt(latent.depth, 2)]);
    for (const [key, value] of rows) {
      const dt = document.createElement("dt");
      dt.textContent = key;
      const dd = document.createElement("dd");
      dd.textContent = value;
      facts.append(dt, dd);
    }
    el.appendChild(facts);
    if (data.meta.service_url) {
      const link = document.createElement("a");
      link.href = data.meta.service_url.replace(/\/$/, "") + "/ui?latent=" + latent.latent;
      link.textContent = "Try steering with it";
      link.target = "_blank";
      link.rel = "noopener";
      el.appendChild(link);
    }
    return el;
  }

  function render() {
    const lo = parseFloat(msMin.value), hi = parseFloat(msMax.value);
    const wanted = latentBox.value === "" ? null : parseInt(latentBox.value, 10);
    let shown = data.latents.filter((l) =>
      (wanted === null || l.latent === wanted) &&
      (level.value === "" || l.level === level.value) &&
      (l.ms === null ? unscored.checked : (isNaN(lo) || l.ms >= lo) && (isNaN(hi) || l.ms <= hi)));
    const key = { "ms-desc": (a, b) => (b.ms ?? -2) - (a.ms ?? -2), "ms-asc": (a, b) => (a.ms ?? 2) - (b.ms ?? 2),
                  "density-desc": (a, b) => b.density - a.density, "latent": (a, b) => a.latent - b.latent };
    shown = shown.slice().sort(key[sort.value]);
    grid.replaceChildren(...shown.map(card));
    document.getElementById("count").textContent = shown.length + " of " + data.latents.length + " latents";
  }

  for (const control of controls) control.addEventListener("input", render);
  render();
})();

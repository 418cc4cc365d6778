// mlx-blip2 photo search: live search while typing, keyboard navigation, "more like this" without reloading.
// The page works without this script: the server renders /?q=... itself, and this builds the same markup.
"use strict";
(function () {
  const DEBOUNCE_MS = 250;
  const box = document.getElementById("q");
  const form = document.getElementById("search");
  const grid = document.getElementById("results");
  const status = document.getElementById("status");
  if (!box || !form || !grid) return;
  const k = grid.dataset.k || "60";
  let timer = 0, controller = null, seq = 0, shown = box.value.trim();

  function el(tag, attrs, children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, value);
    for (const child of children || []) node.append(child);
    return node;
  }

  function card(hit, rank) {
    const img = el("img", {src: hit.thumb, alt: hit.caption || hit.name, decoding: "async",
                           loading: rank < 12 ? "eager" : "lazy"});
    const open = el("a", {class: "open", href: hit.image, title: hit.path}, [img]);
    const meta = el("span", {class: "meta"}, [
      el("span", {class: "score", title: "similarity"}, [hit.score.toFixed(3)]),
      el("a", {class: "like", href: hit.like}, ["more like this"])]);
    const caption = el("figcaption", {}, [el("span", {class: "caption"}, [hit.caption || hit.name]), meta]);
    return el("figure", {class: "hit", "data-id": String(hit.id)}, [open, caption]);
  }

  function render(data) {
    grid.replaceChildren(...data.results.map(card));
    status.textContent = data.status;
    document.title = data.query ? data.query + " \u2013 photo search" : "Photo search";
  }

  async function run(params, url) {
    const mine = ++seq;
    if (controller) controller.abort();
    controller = new AbortController();
    document.body.classList.add("loading");
    try {
      const response = await fetch("/api/search?" + params.toString(), {signal: controller.signal,
                                                                       credentials: "same-origin"});
      const data = await response.json();
      if (mine !== seq) return;
      if (!response.ok) {
        status.textContent = (data.error && data.error.message) || ("error " + response.status);
        return;
      }
      render(data);
      history.replaceState(null, "", url);
    } catch (e) {
      if (e.name !== "AbortError" && mine === seq) status.textContent = "search failed: " + e.message;
    } finally {
      if (mine === seq) document.body.classList.remove("loading");
    }
  }

  function searchNow() {
    clearTimeout(timer);
    const q = box.value.trim().replace(/\s+/g, " ");
    if (q === shown) return;
    shown = q;
    if (!q) {
      seq++;
      if (controller) controller.abort();
      grid.replaceChildren();
      status.textContent = "Type what you are looking for.";
      history.replaceState(null, "", "/");
      return;
    }
    const params = new URLSearchParams({q: q, k: k});
    run(params, "/?" + params.toString());
  }

  box.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(searchNow, DEBOUNCE_MS); });
  form.addEventListener("submit", (event) => { event.preventDefault(); shown = null; searchNow(); });

  grid.addEventListener("click", (event) => {
    const link = event.target.closest("a.like");
    if (!link || event.ctrlKey || event.metaKey || event.shiftKey) return;
    event.preventDefault();
    const like = new URL(link.href).searchParams.get("like");
    const params = new URLSearchParams({like: like, k: k});
    box.value = ""; shown = "";
    run(params, "/?" + params.toString()).then(() => focusHit(0));
  });

  // --- keyboard: "/" to the box, arrows between results, Enter opens, "m" more like this, Esc back ---
  function hits() { return Array.from(grid.querySelectorAll(".hit")); }
  function current() { return document.activeElement && document.activeElement.closest(".hit"); }
  function focusHit(i) {
    const all = hits();
    if (!all.length) return;
    const hit = all[Math.max(0, Math.min(all.length - 1, i))];
    for (const h of all) h.classList.toggle("selected", h === hit);
    hit.querySelector("a.open").focus();
    hit.scrollIntoView({block: "nearest"});
  }
  function columns(all) {
    const top = all[0].offsetTop;
    let n = 0;
    while (n < all.length && all[n].offsetTop === top) n++;
    return Math.max(1, n);
  }

  document.addEventListener("keydown", (event) => {
    if (event.altKey || event.ctrlKey || event.metaKey) return;
    const inBox = document.activeElement === box;
    if (event.key === "/" && !inBox) { event.preventDefault(); box.focus(); box.select(); return; }
    if (inBox) {
      if (event.key === "ArrowDown" && hits().length) { event.preventDefault(); focusHit(0); }
      return;
    }
    const hit = current();
    if (!hit) return;
    const all = hits(), i = all.indexOf(hit), cols = columns(all);
    const moves = {ArrowRight: 1, ArrowLeft: -1, ArrowDown: cols, ArrowUp: -cols};
    if (event.key in moves) {
      event.preventDefault();
      if (event.key === "ArrowUp" && i < cols) { box.focus(); return; }
      focusHit(i + moves[event.key]);
    } else if (event.key === "m") {
      hit.querySelector("a.like").click();
    } else if (event.key === "Escape") {
      box.focus();
    }
  });
})();

// mlx-blip2 photo search: live search while typing, filters, keyboard navigation, "more like this" without
// reloading, and (when the server allows edits) correcting a caption in place.
// The page works without this script: the server renders /?q=... itself, and this builds the same markup.
"use strict";
(function () {
  const DEBOUNCE_MS = 250;
  const FILTERS = ["mode", "folder", "from", "to", "corrected"];
  const box = document.getElementById("q");
  const form = document.getElementById("search");
  const grid = document.getElementById("results");
  const status = document.getElementById("status");
  if (!box || !form || !grid) return;
  const k = grid.dataset.k || "60";
  const edits = grid.dataset.edits === "1";
  const csrfMeta = document.querySelector('meta[name="csrf-token"]');
  let timer = 0, controller = null, seq = 0, shown = null;

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
    const metaParts = [el("span", {class: "score", title: "similarity"}, [hit.score.toFixed(3)])];
    if (hit.corrected) metaParts.push(" ", el("span", {class: "corrected", title: "corrected by hand"}, ["corrected"]));
    metaParts.push(el("a", {class: "like", href: hit.like}, ["more like this"]));
    if (edits) {
      metaParts.push(el("button", {type: "button", class: "edit",
                                   "aria-label": "Correct the caption of " + hit.name}, ["edit"]));
    }
    const caption = el("figcaption", {}, [el("span", {class: "caption"}, [hit.caption || hit.name]),
                                          el("span", {class: "meta"}, metaParts)]);
    return el("figure", {class: "hit" + (hit.corrected ? " is-corrected" : ""), "data-id": String(hit.id)},
              [open, caption]);
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

  // The address: the query, k, then the mode and the filters that are set (the server's own order).
  function currentParams() {
    const params = new URLSearchParams();
    const q = box.value.trim().replace(/\s+/g, " ");
    if (q) params.set("q", q);
    params.set("k", k);
    for (const name of FILTERS) {
      const field = form.elements.namedItem(name);
      if (!field || !field.value) continue;
      if (name === "mode" && field.value === "hybrid") continue;
      params.set(name, field.value);
    }
    return params;
  }
  function filtered() {
    return FILTERS.some((name) => name !== "mode" && form.elements.namedItem(name) &&
                                  form.elements.namedItem(name).value);
  }

  function searchNow() {
    clearTimeout(timer);
    const params = currentParams();
    const key = params.toString();
    if (key === shown) return;
    shown = key;
    if (!params.get("q") && !filtered()) {
      seq++;
      if (controller) controller.abort();
      grid.replaceChildren();
      status.textContent = "Type what you are looking for.";
      history.replaceState(null, "", "/");
      return;
    }
    run(params, "/?" + key);
  }
  shown = currentParams().toString();

  box.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(searchNow, DEBOUNCE_MS); });
  form.addEventListener("submit", (event) => { event.preventDefault(); shown = null; searchNow(); });
  for (const name of FILTERS) {
    const field = form.elements.namedItem(name);
    if (field) field.addEventListener("change", searchNow);
  }

  grid.addEventListener("click", (event) => {
    const edit = event.target.closest("button.edit");
    if (edit) { openEditor(edit.closest(".hit")); return; }
    const link = event.target.closest("a.like");
    if (!link || event.ctrlKey || event.metaKey || event.shiftKey) return;
    event.preventDefault();
    const like = new URL(link.href).searchParams.get("like");
    const params = new URLSearchParams({like: like, k: k});
    box.value = ""; shown = "";
    run(params, "/?" + params.toString()).then(() => focusHit(0));
  });

  // --- corrections: an editor in place of the caption; Enter saves, Esc cancels ---
  function openEditor(hit) {
    if (!edits || !hit || hit.querySelector("form.editor")) return;
    const caption = hit.querySelector(".caption");
    const input = el("input", {type: "text", class: "edit-input", maxlength: "1000", "aria-label": "Caption"});
    input.value = caption.textContent;
    const editor = el("form", {class: "editor"}, [
      input, el("button", {type: "submit", class: "save"}, ["save"]),
      el("button", {type: "button", class: "cancel"}, ["cancel"])]);
    caption.hidden = true;
    caption.after(editor);
    const close = () => { editor.remove(); caption.hidden = false; hit.querySelector("a.open").focus(); };
    editor.querySelector(".cancel").addEventListener("click", close);
    input.addEventListener("keydown", (event) => {
      if (event.key === "Escape") { event.preventDefault(); event.stopPropagation(); close(); }
    });
    editor.addEventListener("submit", async (event) => {
      event.preventDefault();
      const text = input.value.trim();
      if (!text) { status.textContent = "a caption cannot be empty"; return; }
      editor.classList.add("saving");
      try {
        const response = await fetch("/api/caption/" + hit.dataset.id, {
          method: "POST", credentials: "same-origin",
          headers: {"Content-Type": "application/json", "X-CSRF-Token": csrfMeta ? csrfMeta.content : ""},
          body: JSON.stringify({caption: text})});
        const data = await response.json();
        if (!response.ok) {
          status.textContent = "not saved: " + ((data.error && data.error.message) || ("error " + response.status));
          return;
        }
        caption.textContent = data.caption;
        hit.querySelector("img").alt = data.caption;
        hit.classList.add("is-corrected");
        if (!hit.querySelector(".corrected")) {
          hit.querySelector(".score").after(" ", el("span", {class: "corrected", title: "corrected by hand"},
                                                    ["corrected"]));
        }
        status.textContent = "caption saved";
        close();
      } catch (e) {
        status.textContent = "not saved: " + e.message;
      } finally {
        editor.classList.remove("saving");
      }
    });
    input.focus();
    input.select();
  }

  // --- keyboard: "/" to the box, arrows between results, Enter opens, "m" more like this, "e" edit, Esc back ---
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
    const active = document.activeElement;
    const inBox = active === box;
    if (!inBox && active && active.matches("input, select, textarea")) return;  // typing in a field
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
    } else if (event.key === "e" && edits) {
      event.preventDefault();
      openEditor(hit);
    } else if (event.key === "Escape") {
      box.focus();
    }
  });
})();

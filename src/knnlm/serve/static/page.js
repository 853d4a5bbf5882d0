// knnlm inspector: plain JavaScript, no dependencies.  Served by `knnlm serve` at / (it calls
// /v1/models, /v1/score and /v1/completions) or written with its data embedded by
// `knnlm explain --html` (no server).  p_kNN and the mixture are recomputed here from each
// token's k neighbours (distances, which ones predict the token): the same formulas as
// knnlm.core.scoring.knn_target_logprobs and knnlm.core.adapt.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const DATA = JSON.parse($("knnlm-data").textContent || "null");
  const FILE = DATA !== null;
  const KS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096];
  const NEIGHBORS = 8;  // neighbours with their text per token
  const SCALE = 2;  // nats at the ends of the colour scale
  const state = {
    score: null, k: 0, kMax: 0, lam: 0.25, T: 1, mode: "fixed", sel: -1, pinned: null,
    lk: null, mix: null, lams: null, key: sessionStorage.getItem("knnlm-key") || "",
    datastore: null, model: "",
  };

  // ---- maths (float64, as numpy) ---------------------------------------------------
  function logaddexp(a, b) {
    if (a === -Infinity) return b;
    if (b === -Infinity) return a;
    const m = Math.max(a, b);
    return m + Math.log(Math.exp(a - m) + Math.exp(b - m));
  }
  // log p_kNN(token) from its first k neighbours at temperature T (null: no search here); a
  // distance comes as the shortest decimal of a float32: Math.fround gives that float32 back
  function knnLogprob(knn, k, T) {
    if (!knn) return null;
    const d = knn.distances, c = knn.counts, n = Math.min(k, d.length);
    let top = -Infinity;
    const logits = new Float64Array(n);
    for (let j = 0; j < n; j++) {
      logits[j] = d[j] === null ? -Infinity : -Math.fround(d[j]) / T + (c ? Math.log(c[j]) : 0);
      if (logits[j] > top) top = logits[j];
    }
    if (!isFinite(top)) top = 0;
    let all = 0, hit = 0;
    for (let j = 0; j < n; j++) all += Math.exp(logits[j] - top);
    for (const j of knn.hits) if (j < n) hit += Math.exp(logits[j] - top);
    return hit > 0 ? Math.log(hit) - Math.log(all) : -Infinity;
  }
  // λ_t per position: fixed, or adapting from lam0 as the text is read (knnlm.core.mix); with
  // a λ-by-distance table (knnlm.core.neighbor) each position's base λ is read from its
  // nearest neighbour's distance (and, when the table was tuned with it, the LM's log max p
  // there), the adaptive candidates being {0, base, hi(base)} there
  const hiOf = (b) => Math.min(2 * b, (1 + b) / 2);
  function baseLambda(table, knn) {
    if (!knn || knn.distances[0] === null) return 0;
    const d = Math.fround(knn.distances[0]);
    let b = 0;
    while (b < table.edges.length && table.edges[b] <= d) b++;
    const conf = table.confidence_edges;
    if (!conf) return table.lambdas[b];
    const c = Math.fround(knn.lm_max ?? 0);
    let j = 0;
    while (j < conf.length && conf[j] <= c) j++;
    return table.lambdas[b][j];
  }
  function lambdas(ll, lk, lam0, mode, table, knns) {
    const n = ll.length, out = new Float64Array(n), base = new Float64Array(n);
    for (let t = 0; t < n; t++) base[t] = table ? baseLambda(table, knns[t]) : lam0;
    if (mode !== "adaptive" || lam0 <= 0 || lam0 >= 1) { out.set(base); return out; }
    const wHi = 0.5 * lam0 / hiOf(lam0), logw = [Math.log(0.5 - wHi), Math.log(0.5), Math.log(wHi)];
    for (let t = 0; t < n; t++) {
      const grid = [0, base[t], hiOf(base[t])], m = Math.max(...logw);
      let num = 0, den = 0;
      for (let g = 0; g < 3; g++) { const w = Math.exp(logw[g] - m); num += w * grid[g]; den += w; }
      out[t] = num / den;
      if (lk[t] === null) continue;  // no search: no evidence
      for (let g = 0; g < 3; g++) {
        const mix = grid[g] === 0 ? ll[t] : logaddexp(Math.log(grid[g]) + lk[t], Math.log1p(-grid[g]) + ll[t]);
        logw[g] += mix - ll[t];
      }
      const m2 = Math.max(...logw);
      for (let g = 0; g < 3; g++) logw[g] -= m2;
    }
    return out;
  }
  function mixOne(ll, lk, lam) {
    if (lk === null || lam === 0) return ll;
    return logaddexp(Math.log(lam) + lk, Math.log1p(-lam) + ll);
  }
  function perplexity(lps) {
    if (!lps.length) return NaN;
    let s = 0;
    for (const x of lps) s += x;
    return Math.exp(-s / lps.length);
  }
  const fmtP = (lp) => lp === null ? "–" : lp === -Infinity ? "0" : Math.exp(lp).toPrecision(4);
  const fmtPpl = (x) => !isFinite(x) ? "∞" : x >= 1000 ? x.toFixed(0) : x.toFixed(3);

  // ---- colours: a diverging orange–blue scale (readable with red–green colour blindness)
  const STOPS = [[179, 88, 6], [241, 163, 64], [254, 224, 182], [247, 247, 247], [209, 229, 240], [103, 169, 207], [33, 102, 172]];
  const PALETTE = [];
  for (let i = 0; i <= 64; i++) {
    const x = i / 64 * (STOPS.length - 1), a = Math.floor(Math.min(x, STOPS.length - 2)), f = x - a;
    const c = STOPS[a].map((v, j) => Math.round(v + (STOPS[a + 1][j] - v) * f));
    PALETTE.push(`rgb(${c[0]},${c[1]},${c[2]})`);
  }
  function colourOf(delta) {
    const x = Math.max(-1, Math.min(1, delta / SCALE));
    return [PALETTE[Math.round((x + 1) * 32)], Math.abs(x) > 0.65 ? "#fff" : ""];
  }

  // ---- the API -----------------------------------------------------------------------
  async function api(path, body) {
    const headers = {"content-type": "application/json"};
    if (state.key) headers.authorization = "Bearer " + state.key;
    const resp = await fetch(path, body === undefined ? {headers} : {method: "POST", headers, body: JSON.stringify(body)});
    if (!resp.ok) throw await apiError(resp);
    return resp;
  }
  async function apiError(resp) {
    let msg = `${resp.status} ${resp.statusText}`;
    try { const j = await resp.json(); if (j.error && j.error.message) msg = j.error.message; } catch (e) { /* not JSON */ }
    if (resp.status === 401) { $("key-form").hidden = false; $("api-key").focus(); }
    const err = new Error(msg); err.status = resp.status; return err;
  }
  function showError(msg) { const e = $("error"); e.textContent = msg ? "error: " + msg : ""; e.hidden = !msg; }

  // ---- the text view -------------------------------------------------------------------
  function load(score) {
    state.score = score;
    const toks = score.tokens;
    state.kMax = 0;
    for (const t of toks) if (t.knn) state.kMax = Math.max(state.kMax, t.knn.distances.length);
    state.k = state.kMax;
    if (score.lambda !== undefined) state.lam = score.lambda;
    if (score.knn_temperature !== undefined) state.T = score.knn_temperature;
    if (score.lambda_mode) state.mode = score.lambda_mode;
    state.byDistance = !!score.lambda_by_distance;
    $("by-distance-row").hidden = !score.lambda_by_distance;
    $("by-distance").checked = state.byDistance;
    state.sel = -1; state.pinned = null;
    const ks = KS.filter((k) => k < state.kMax).concat(state.kMax ? [state.kMax] : []);
    const kSel = $("k");
    kSel.replaceChildren(...ks.map((k) => new Option(String(k), String(k), false, k === state.k)));
    if (!FILE && state.kMax) for (const k of KS.filter((k) => k > state.kMax)) kSel.add(new Option(k + " (fetch)", String(k)));
    $("knobs").hidden = !state.kMax;
    $("scored").hidden = false;
    $("lambda").value = state.lam; $("lambda-mode").value = state.mode;
    $("temperature").value = Math.log2(state.T);
    const box = $("tokens"), frag = document.createDocumentFragment();
    for (let i = 0; i < toks.length; i++) {
      if (toks[i].new_document) frag.appendChild(Object.assign(document.createElement("span"), {className: "docbreak"}));
      const s = document.createElement("span");
      s.className = "tok"; s.id = "t" + i; s.dataset.i = i; s.setAttribute("role", "option");
      s.textContent = toks[i].token;
      frag.appendChild(s);
    }
    box.replaceChildren(frag);
    box.removeAttribute("aria-activedescendant");
    $("n-tokens").textContent = `${toks.length} tokens` + (score.datastore ? ` · datastore ${score.datastore}` : " · no datastore");
    $("detail").innerHTML = '<p class="muted">Click a token (or focus the text and use the arrow keys) to see its memories.</p>';
    recompute();
  }

  function recompute() {
    const s = state.score;
    if (!s) return;
    const toks = s.tokens, n = toks.length;
    const ll = new Float64Array(n), mix = new Float64Array(n);
    for (let i = 0; i < n; i++) ll[i] = toks[i].logprob_lm;
    const key = `${state.k}|${state.T}`;  // p_kNN depends on k and T only: a λ move reuses it
    if (state.lkKey !== key || state.lkFor !== s) {
      state.lkAll = new Array(n);
      for (let i = 0; i < n; i++) state.lkAll[i] = state.kMax ? knnLogprob(toks[i].knn, state.k, state.T) : null;
      state.lkKey = key; state.lkFor = s;
    }
    const lk = state.lkAll;
    const table = state.byDistance ? s.lambda_by_distance : null;
    const lams = lambdas(ll, lk, state.lam, state.mode, table, toks.map((t) => t.knn));
    for (let i = 0; i < n; i++) mix[i] = state.kMax ? mixOne(ll[i], lk[i], lams[i]) : (toks[i].logprob ?? -Infinity);
    state.lk = lk; state.mix = mix; state.lams = lams;
    const box = $("tokens"), spans = box.getElementsByClassName("tok");
    for (let i = 0; i < n; i++) {
      const [bg, fg] = colourOf(mix[i] - ll[i]);
      const st = spans[i].style;
      st.backgroundColor = bg; st.color = fg;
    }
    const pplLm = perplexity(ll), pplMix = perplexity(mix);
    $("ppl-lm").textContent = fmtPpl(pplLm);
    $("ppl-knnlm").textContent = fmtPpl(pplMix);
    $("ppl-knnlm").dataset.value = String(pplMix);
    $("ppl-lm").dataset.value = String(pplLm);
    $("ppl-change").textContent = isFinite(pplMix) && isFinite(pplLm) ? `(${((pplMix / pplLm - 1) * 100).toFixed(2)}%)` : "";
    $("lambda-val").textContent = state.lam.toFixed(2);
    $("temperature-val").textContent = state.T < 10 ? state.T.toPrecision(3) : state.T.toFixed(0);
    if (state.sel >= 0) showToken(state.sel);
    renderDocuments();
  }
  let pending = false;
  function recomputeSoon() {
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => { pending = false; recompute(); });
  }

  // weights of a token's first k neighbours at T (softmax(-d/T), merged entries counted)
  function weights(knn, k, T) {
    const d = knn.distances, c = knn.counts, n = Math.min(k, d.length);
    const lg = [];
    for (let j = 0; j < n; j++) lg.push(d[j] === null ? -Infinity : -Math.fround(d[j]) / T + (c ? Math.log(c[j]) : 0));
    const top = Math.max(...lg.filter(isFinite), 0);
    const w = lg.map((x) => Math.exp(x - top)), sum = w.reduce((a, b) => a + b, 0);
    return w.map((x) => sum > 0 ? x / sum : 0);
  }
  function neighbourWeights(tok) {
    // the shown neighbours' weights at the current T and k (the server's when not recomputable)
    if (!tok.knn) return (tok.neighbors || []).map((nb) => nb.weight);
    const w = weights(tok.knn, state.k, state.T);
    return (tok.neighbors || []).map((nb, j) => j < w.length ? w[j] : 0);
  }

  function el(tag, attrs, ...kids) {
    const e = document.createElement(tag);
    for (const [a, v] of Object.entries(attrs || {})) if (a === "className") e.className = v; else e.setAttribute(a, v);
    for (const k of kids) e.append(k);
    return e;
  }
  function neighbourTable(tok, ws) {
    const table = el("table", {className: "neighbours"},
      el("thead", {}, el("tr", {}, el("th", {className: "num"}, "#"), el("th", {className: "num"}, "weight"),
        el("th", {className: "num"}, "distance"), el("th", {}, "memory: document, context → next token"))));
    const body = el("tbody");
    (tok.neighbors || []).forEach((nb, j) => {
      const hit = nb.token_id === tok.id;
      const ctx = el("div", {className: "ctx"}, "…" + nb.context,
        el("mark", {className: hit ? "hit" : "miss", title: hit ? "the same token as here" : "another token"}, nb.token),
        el("span", {className: "after"}, nb.after + "…"));
      const pin = el("a", {href: "#", className: "pin", "data-doc": String(nb.document)}, state.pinned === nb.document ? "unpin" : "pin");
      pin.addEventListener("click", (ev) => { ev.preventDefault(); pinDocument(nb.document); });
      const title = el("div", {}, el("b", {}, nb.title || `document ${nb.document}`), ` @${nb.offset} `, pin);
      const tr = el("tr", {className: state.pinned === nb.document ? "nb pinned" : "nb"},
        el("td", {className: "num"}, String(j + 1) + (hit ? " ✓" : "")), el("td", {className: "num weight"}, ws[j].toFixed(4)),
        el("td", {className: "num distance"}, nb.distance === null ? "–" : nb.distance.toFixed(3)), el("td", {}, title, ctx));
      if (hit) tr.cells[0].className = "num hit";
      body.append(tr);
    });
    table.append(body);
    return table;
  }
  function probsTable(rows) {
    return el("table", {className: "probs"}, ...rows.map(([k, v, cls]) =>
      el("tr", {}, el("td", {}, k), el("td", {className: "num " + cls}, v))));
  }

  function showToken(i) {
    const s = state.score, tok = s.tokens[i];
    const ll = tok.logprob_lm, lk = state.lk[i], mix = state.mix[i];
    const d = el("div", {},
      el("h3", {}, "token ", el("code", {}, JSON.stringify(tok.token)), ` #${i + 1}`),
      probsTable([["p_LM", fmtP(ll), "p-lm"], ["p_kNN", fmtP(lk), "p-knn"], ["p_kNN-LM", fmtP(mix), "p-knnlm"],
        ["λ here", state.lams[i].toFixed(3) + (state.mode === "adaptive" ? " (adaptive)" : "") +
          (state.byDistance ? " (by distance)" : ""), "lam"],
        ["log p_kNN-LM − log p_LM", (mix - ll).toFixed(3), "gain"], ["k · T", `${state.k} · ${+state.T.toPrecision(4)}`, "kt"]]));
    if (tok.neighbors && tok.neighbors.length) {
      d.append(el("h3", {}, `nearest ${tok.neighbors.length} of ${state.k} memories`), neighbourTable(tok, neighbourWeights(tok)));
    } else if (s.datastore) {
      d.append(el("p", {className: "muted"}, tok.knn ? "no neighbours with text for this token" : "no search at this token"));
    }
    $("detail").replaceChildren(d);
  }

  function select(i, focus) {
    const s = state.score;
    if (!s || !s.tokens.length) return;
    i = Math.max(0, Math.min(s.tokens.length - 1, i));
    const box = $("tokens");
    if (state.sel >= 0) { const old = $("t" + state.sel); if (old) { old.classList.remove("sel"); old.removeAttribute("aria-selected"); } }
    state.sel = i;
    const span = $("t" + i);
    span.classList.add("sel"); span.setAttribute("aria-selected", "true");
    box.setAttribute("aria-activedescendant", span.id);
    span.scrollIntoView({block: "nearest"});
    if (focus) box.focus({preventScroll: true});
    showToken(i);
  }

  function pinDocument(doc) {
    state.pinned = state.pinned === doc ? null : doc;
    if (state.sel >= 0) showToken(state.sel);
    renderDocuments();
  }

  // ---- documents ---------------------------------------------------------------------
  function renderDocuments() {
    const s = state.score, list = $("documents");
    if ($("view-docs").hidden || !s) return;  // rendered when shown
    // each document's tokens: where it is among the shown neighbours, with their weight now
    const perDoc = new Map();
    s.tokens.forEach((tok, i) => {
      const ws = neighbourWeights(tok);
      (tok.neighbors || []).forEach((nb, j) => {
        let d = perDoc.get(nb.document);
        if (!d) perDoc.set(nb.document, d = {document: nb.document, title: nb.title, weight: 0, toks: new Map()});
        d.weight += ws[j];
        d.toks.set(i, (d.toks.get(i) || 0) + ws[j]);
      });
    });
    // the server's (or the file's) attribution, over all k neighbours at the settings scored;
    // without it, the shown neighbours' kNN weight at the current settings
    const summary = s.documents || [...perDoc.values()].sort((a, b) => b.weight - a.weight).slice(0, 100)
      .map((d) => ({document: d.document, title: d.title, knn_weight: d.weight, tokens: d.toks.size}));
    $("docs-note").textContent = s.documents
      ? `Documents whose memories carried the most probability over this text: λ·w summed over all ${s.k} neighbours of every token, at the settings scored (λ ${s.lambda}${s.lambda_mode === "adaptive" ? " adaptive" : ""}, T ${s.knn_temperature}, k ${s.k}). Open one for its tokens (their weight at the current settings).`
      : "Documents whose memories carried the most kNN weight over this text (the shown neighbours' weights, at the current settings).";
    list.replaceChildren(...summary.map((d) => {
      const mine = perDoc.get(d.document);
      const toks = mine ? [...mine.toks.entries()].sort((a, b) => b[1] - a[1]).slice(0, 80) : [];
      const btns = toks.map(([i, w]) => {
        const b = el("button", {type: "button", title: `kNN weight ${w.toFixed(4)}`}, JSON.stringify(s.tokens[i].token));
        b.addEventListener("click", () => { showTab("tab-text"); select(i, true); });
        return b;
      });
      const pin = el("a", {href: "#", className: "pin"}, state.pinned === d.document ? "unpin" : "pin");
      pin.addEventListener("click", (ev) => { ev.preventDefault(); pinDocument(d.document); });
      const nums = d.weight !== undefined
        ? ` — carried ${d.weight.toFixed(3)} (to the text's tokens ${d.target_weight.toFixed(3)}) over ${d.tokens} tokens `
        : ` — kNN weight ${d.knn_weight.toFixed(3)} over ${d.tokens} tokens `;
      return el("li", {className: state.pinned === d.document ? "doc pinned" : "doc"}, el("details", {},
        el("summary", {}, el("b", {}, d.title || `document ${d.document}`), nums, pin),
        el("div", {className: "toks"}, ...(btns.length ? btns : [el("span", {className: "muted"}, "not among the tokens' nearest shown neighbours")]))));
    }));
    if (!summary.length) list.replaceChildren(el("li", {className: "muted"}, "no memories (score a text with a datastore)"));
  }

  // ---- tabs ----------------------------------------------------------------------------
  const TABS = ["tab-text", "tab-docs", "tab-gen"];
  function showTab(id) {
    for (const t of TABS) {
      const on = t === id, b = $(t);
      b.setAttribute("aria-selected", String(on)); b.tabIndex = on ? 0 : -1;
      $(b.getAttribute("aria-controls")).hidden = !on;
    }
    if (id === "tab-docs") renderDocuments();
  }
  for (const t of TABS) {
    $(t).addEventListener("click", () => showTab(t));
    $(t).addEventListener("keydown", (ev) => {
      const j = TABS.indexOf(t) + (ev.key === "ArrowRight" ? 1 : ev.key === "ArrowLeft" ? -1 : 0);
      if (j !== TABS.indexOf(t)) { const n = TABS[(j + TABS.length) % TABS.length]; showTab(n); $(n).focus(); }
    });
  }

  // ---- events --------------------------------------------------------------------------
  $("tokens").addEventListener("click", (ev) => { const t = ev.target.closest(".tok"); if (t) select(+t.dataset.i, false); });
  $("tokens").addEventListener("keydown", (ev) => {
    const s = state.score;
    if (!s) return;
    const step = {ArrowRight: 1, ArrowDown: 1, ArrowLeft: -1, ArrowUp: -1, PageDown: 50, PageUp: -50}[ev.key];
    if (step) { select(state.sel < 0 ? 0 : state.sel + step, false); ev.preventDefault(); }
    else if (ev.key === "Home") { select(0, false); ev.preventDefault(); }
    else if (ev.key === "End") { select(s.tokens.length - 1, false); ev.preventDefault(); }
  });
  $("tokens").addEventListener("mouseover", (ev) => {
    const t = ev.target.closest(".tok");
    if (!t || t.title || !state.mix) return;
    const i = +t.dataset.i, tok = state.score.tokens[i];
    t.title = `p_LM ${fmtP(tok.logprob_lm)} · p_kNN ${fmtP(state.lk[i])} · p_kNN-LM ${fmtP(state.mix[i])}`;
  });
  const clearTitles = () => { for (const t of $("tokens").querySelectorAll(".tok[title]")) t.removeAttribute("title"); };
  $("lambda").addEventListener("input", (ev) => {
    state.lam = +ev.target.value;
    state.byDistance = $("by-distance").checked = false;  // a λ given: one λ for every position
    clearTitles(); recomputeSoon();
  });
  $("by-distance").addEventListener("change", (ev) => { state.byDistance = ev.target.checked; clearTitles(); recompute(); });
  $("temperature").addEventListener("input", (ev) => { state.T = Math.pow(2, +ev.target.value); clearTitles(); recomputeSoon(); });
  $("lambda-mode").addEventListener("change", (ev) => { state.mode = ev.target.value; clearTitles(); recompute(); });
  $("k").addEventListener("change", (ev) => {
    const k = +ev.target.value;
    if (k > state.kMax) { scoreText(k); return; }
    state.k = k; clearTitles(); recompute();
  });

  async function scoreText(k) {
    showError("");
    // plain retrieval, no memory decoder, whatever the server's defaults: what the page recomputes
    const body = {text: $("text").value, datastore: $("datastore").value || null, return_neighbors: NEIGHBORS,
                  return_knn: true, pointer_threshold: 0, adaptive_threshold: 0, memory: null};
    if (k) body.k = k;
    $("busy").textContent = "scoring…"; $("score-btn").disabled = true;
    try {
      const r = await (await api("/v1/score", body)).json();
      load(r);
    } catch (e) {
      showError(e.message);
    } finally {
      $("busy").textContent = ""; $("score-btn").disabled = false;
    }
  }
  $("score-form").addEventListener("submit", (ev) => { ev.preventDefault(); scoreText(0); });

  // ---- generation, side by side (server-sent events) -----------------------------------
  async function stream(box, body, onToken) {
    const resp = await api("/v1/completions", body);
    const reader = resp.body.getReader(), dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buf += dec.decode(value, {stream: true});
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const line = buf.slice(0, cut).trim();
        buf = buf.slice(cut + 2);
        if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
        const msg = JSON.parse(line.slice(6));
        if (msg.error) throw new Error(msg.error.message);
        const ch = msg.choices[0];
        onToken(ch.text, ch.knnlm ? ch.knnlm.token : null);
      }
    }
    box.dataset.done = "true";
  }
  function showGenerated(tok) {
    const d = el("div", {}, el("h3", {}, "generated token ", el("code", {}, JSON.stringify(tok.token))),
      probsTable([["p_LM", fmtP(tok.logprob_lm), "p-lm"], ["p_kNN", fmtP(tok.logprob_knn), "p-knn"],
        ["p_kNN-LM", fmtP(tok.logprob), "p-knnlm"]]));
    if (tok.neighbors && tok.neighbors.length) {
      d.append(el("h3", {}, `nearest ${tok.neighbors.length} memories`), neighbourTable(tok, tok.neighbors.map((n) => n.weight)));
    }
    $("gen-detail").replaceChildren(d);
  }
  $("gen-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    showError("");
    const prompt = $("prompt").value, ds = $("datastore").value || null;
    const base = {prompt, max_tokens: +$("max-tokens").value, temperature: +$("gen-temperature").value, stream: true};
    const boxes = [$("gen-lm"), $("gen-knn")];
    for (const b of boxes) { b.replaceChildren(el("span", {className: "prompt"}, prompt)); delete b.dataset.done; }
    $("gen-ds").textContent = ds ? `(${ds})` : "";
    $("gen-detail").replaceChildren();
    $("gen-btn").disabled = true;
    const add = (box) => (text, tok) => {
      if (!text && !tok) return;
      const s = el("span", {className: tok ? "tok gtok" : "gtok"}, text);
      if (tok) {
        const [bg, fg] = colourOf((tok.logprob ?? -Infinity) - (tok.logprob_lm ?? -Infinity));
        s.style.backgroundColor = bg; s.style.color = fg; s.tabIndex = 0;
        const show = () => showGenerated(tok);
        s.addEventListener("click", show);
        s.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); show(); } });
      }
      box.append(s);
    };
    try {
      await Promise.all([
        stream(boxes[0], {...base, datastore: null}, add(boxes[0])),
        stream(boxes[1], {...base, datastore: ds, return_neighbors: NEIGHBORS}, add(boxes[1])),
      ]);
    } catch (e) {
      showError(e.message);
    } finally {
      $("gen-btn").disabled = false;
    }
  });

  // ---- start ---------------------------------------------------------------------------
  async function connect() {
    try {
      const r = await (await api("/v1/models")).json();
      const m = r.data[0];
      state.model = m.id;
      $("key-form").hidden = true;
      showError("");
      const sel = $("datastore");
      sel.replaceChildren(...Object.keys(m.datastores).map((n) => new Option(n, n, false, n === m.default_datastore)));
      sel.add(new Option("none (the LM alone)", ""));
      $("model-line").textContent = `model ${m.id} · ${Object.keys(m.datastores).length} datastore(s)`;
      document.body.dataset.ready = "true";
    } catch (e) {
      showError(e.message);
    }
  }
  $("key-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    state.key = $("api-key").value.trim();
    sessionStorage.setItem("knnlm-key", state.key);
    connect();
  });

  if (FILE) {
    document.body.classList.add("file");
    $("model-line").textContent = `model ${DATA.model}` + (DATA.source ? ` · ${DATA.source}` : "") + " · saved by knnlm explain --html";
    load(DATA.score);
    document.body.dataset.ready = "true";
  } else {
    connect();
  }
})();

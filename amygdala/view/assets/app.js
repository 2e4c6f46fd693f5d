// amygdala's live page: chat with the served model and watch its readout token by token.
// Plain browser JavaScript with no dependencies: the file ships inside the Python package and
// runs offline (served by the vLLM plugin, or inlined into an exported snapshot).
(function () {
  "use strict";

  const PANEL_K = 8;          // concepts listed per layer
  // A concept enters the list at this z (and among the top K) ... With "emotional" statistics z is
  // already "X rather than another feeling"; with "neutral" statistics every concept rises on any
  // emotional token, so the rule applies to z minus the layer's median concept z (what it shares).
  const ENTER_Z = 1.0;
  const EXIT_Z = 0.5;         // ... and stays until it falls below this z (or out of the top 2K)
  const STEER_STDS = 4;       // slider range: this many neutral-text stds of the readout
  const FORMAT = "amygdala-conversation", VERSION = 1;

  // ------------------------------------------------------------------ pure functions
  /** Indices of ``values`` sorted by value, largest first. */
  function argsortDesc(values) {
    const idx = Array.from(values, (_, i) => i);
    idx.sort((a, b) => values[b] - values[a]);
    return idx;
  }

  /**
   * One step of the panel's hysteresis. ``listed``: the concepts listed after the previous
   * token; ``values``: this token's values. A concept enters when it ranks in the top ``k`` with
   * a value >= ``enter``; a listed one stays while it ranks in the top ``keep`` (default 2k) with
   * a value >= ``exit``. Returns the new list, largest value first. Without thresholds (raw
   * projections) only the ranks apply.
   */
  function hysteresisStep(listed, values, opts) {
    const k = opts.k, keep = opts.keep == null ? 2 * k : opts.keep;
    const enter = opts.enter == null ? -Infinity : opts.enter;
    const exit = opts.exit == null ? -Infinity : opts.exit;
    const prev = new Set(listed);
    const order = argsortDesc(values);
    const out = [];
    for (let r = 0; r < order.length; r++) {
      const c = order[r], v = values[c];
      if ((r < k && v >= enter) || (prev.has(c) && r < keep && v >= exit)) out.push(c);
    }
    return out;
  }

  /** Levenshtein distance (names are short; no need for anything cleverer). */
  function editDistance(a, b) {
    const d = Array.from({ length: b.length + 1 }, (_, j) => j);
    for (let i = 1; i <= a.length; i++) {
      let prev = d[0];
      d[0] = i;
      for (let j = 1; j <= b.length; j++) {
        const tmp = d[j];
        d[j] = Math.min(d[j] + 1, d[j - 1] + 1, prev + (a[i - 1] === b[j - 1] ? 0 : 1));
        prev = tmp;
      }
    }
    return d[b.length];
  }

  /** The ``n`` concept names closest to ``query`` by edit distance. */
  function nearestNames(query, names, n) {
    const q = query.trim().toLowerCase();
    return names.map((name) => [editDistance(q, name.toLowerCase()), name])
      .sort((a, b) => a[0] - b[0] || a[1].localeCompare(b[1])).slice(0, n).map((x) => x[1]);
  }

  /** Concepts matching ``query``: names first (prefix, then substring), then descriptions. */
  function searchConcepts(query, names, descriptions, limit) {
    const q = query.trim().toLowerCase().replace(/\s+/g, "_");
    const qd = query.trim().toLowerCase();
    if (!q) return [];
    const prefix = [], inner = [], desc = [];
    names.forEach((name, i) => {
      const low = name.toLowerCase();
      if (low.startsWith(q)) prefix.push(i);
      else if (low.includes(q)) inner.push(i);
      else if (descriptions && descriptions[i] && descriptions[i].toLowerCase().includes(qd)) desc.push(i);
    });
    return prefix.concat(inner, desc).slice(0, limit);
  }

  /**
   * A token's valence: per layer, the weighted mean of its concept values
   * (sum_c w_c x_c / sum_c |w_c|, weights from :func:`valenceWeights`), averaged over layers.
   * With z-scores this is "how far toward the pleasant concepts and away from the unpleasant
   * ones" in neutral-text standard deviations. null without weights or a row.
   */
  function tokenValence(row, weights, nLayers, nConcepts) {
    if (!row || !weights) return null;
    let norm = 0;
    for (let c = 0; c < nConcepts; c++) norm += Math.abs(weights[c]);
    if (norm === 0) return null;
    let total = 0;
    for (let l = 0; l < nLayers; l++) {
      let s = 0;
      const base = l * nConcepts;
      for (let c = 0; c < nConcepts; c++) s += weights[c] * row[base + c];
      total += s / norm;
    }
    return total / nLayers;
  }

  /**
   * Per-concept weights for :func:`tokenValence`: each concept's valence minus the mean valence
   * of the concepts that have one (those without weigh 0). Centred weights sum to zero, so a
   * rise of every concept at once (any emotional text lifts them all) does not read as pleasant
   * or unpleasant. null when the readout records no valence.
   */
  function valenceWeights(valence) {
    if (!Array.isArray(valence)) return null;
    const known = valence.filter((v) => v != null && isFinite(v));
    if (known.length < 2) return null;
    const mean = known.reduce((a, b) => a + b, 0) / known.length;
    const w = Float32Array.from(valence, (v) => (v == null || !isFinite(v) ? 0 : v - mean));
    return w.some((x) => x !== 0) ? w : null;
  }

  /** Background colour of a token with valence ``v`` (green pleasant, red unpleasant). */
  function valenceColour(v) {
    if (v == null || !isFinite(v)) return "";
    const t = Math.max(-1, Math.min(1, v / 1.5));
    if (Math.abs(t) < 0.04) return "";
    const alpha = (0.08 + 0.55 * Math.abs(t)).toFixed(3);
    return `rgba(var(${t > 0 ? "--pos" : "--neg"}), ${alpha})`;
  }

  /**
   * Split a chunk's ``content`` into one piece per token, given each token's own string (from
   * the logprobs). A token's string can lack the spaces the detokenizer puts between tokens, so
   * each piece runs up to the end of its string's next occurrence and the last takes the rest:
   * the pieces always join to exactly ``content``.
   */
  function splitText(content, strings) {
    const out = [];
    let at = 0;
    strings.forEach((piece, i) => {
      if (i === strings.length - 1) { out.push(content.slice(at)); return; }
      const found = piece ? content.indexOf(piece, at) : -1;
      const end = found < 0 ? at : found + piece.length;
      out.push(content.slice(at, end));
      at = end;
    });
    return out;
  }

  /**
   * One token's z-scores with statistics ``from`` as z-scores with statistics ``to`` (the page's
   * statistics switch): raw = z * std_from + mean_from, z' = (raw - mean_to) / std_to, per layer
   * and concept, stds floored at 1e-6 as the server and ``Readout.zscore`` floor them. ``sets``:
   * the manifest's ``statistics_sets``. The row itself when there is nothing to convert.
   */
  function convertRow(row, sets, from, to, nLayers, nConcepts) {
    if (!row || !sets || from === to || !sets[from] || !sets[to]) return row;
    const a = sets[from], b = sets[to];
    const out = new Float32Array(nLayers * nConcepts);
    for (let l = 0; l < nLayers; l++) {
      for (let c = 0; c < nConcepts; c++) {
        const raw = row[l * nConcepts + c] * Math.max(a.std[l][c], 1e-6) + a.mean[l][c];
        out[l * nConcepts + c] = (raw - b.mean[l][c]) / Math.max(b.std[l][c], 1e-6);
      }
    }
    return out;
  }

  /**
   * The causal moving average ``amygdala read --smooth`` computes (``smooth_causal``): the mean of
   * ``rows`` over the last ``n`` entries, the last one included. Entries that are null (the
   * attention sink, a token without a readout) are in no window. ``rows`` are arrays of equal length.
   */
  function smoothLast(rows, n) {
    const take = [];
    for (let j = rows.length - 1; j >= 0 && take.length < n; j--) if (rows[j]) take.push(rows[j]);
    if (!take.length) return null;
    const out = new Float32Array(take[0].length);
    for (const r of take) for (let i = 0; i < out.length; i++) out[i] += r[i];
    for (let i = 0; i < out.length; i++) out[i] /= take.length;
    return out;
  }

  function fmt(v) { return v == null || !isFinite(v) ? "–" : (v >= 0 ? " " : "") + v.toFixed(2); }

  // ------------------------------------------------------------------ state
  const S = {
    manifest: null,     // /v1/readout/manifest (or a snapshot's)
    L: 0, C: 0,
    weights: null,      // Float32Array of valence per concept, or null
    clusterIndex: null, // [[cluster name, [concept indices]]]
    zscore: false,
    model: null,        // served model id
    snapshot: null,     // the embedded conversation in a snapshot
    messages: [],       // {role, content, steer, tokens: [token index], el, body}
    tokens: [],         // {text, row: Float32Array(L*C) | null, msg: its message}
    listed: [],         // per layer, the hysteresis list after the latest token with a row
    selected: null,     // token index pinned in the panel, or null for "the latest"
    tracks: [],         // {c, strength, el, canvas, now, range, number}
    busy: false,
    abort: null,
    dirty: false,
    rendered: 0,        // tokens whose spans exist
  };
  const $ = (id) => document.getElementById(id);
  // The key comes from the address's fragment (#key=KEY: never sent to the server, so never in its
  // access log) or a prompt after a 401, and is taken out of the address bar at once (history).
  // A page without an origin of its own (a snapshot opened in a sandbox, about:blank) may not use
  // sessionStorage at all: reading it throws there, and the page must still draw.
  const keyStore = {
    get() { try { return sessionStorage.getItem("amygdala-key"); } catch (e) { return null; } },
    set(k) { try { sessionStorage.setItem("amygdala-key", k); } catch (e) { /* kept in memory only */ } },
  };
  let authKey = new URLSearchParams(location.hash.replace(/^#/, "")).get("key") || keyStore.get();
  if (location.hash.includes("key=")) history.replaceState(null, "", location.pathname + location.search);
  if (authKey) keyStore.set(authKey);
  function askKey() {
    const k = window.prompt("This server needs its API key (vLLM --api-key):");
    if (k) { authKey = k; keyStore.set(k); location.reload(); }
  }

  function headers() {
    const h = { "Content-Type": "application/json" };
    if (authKey) h.Authorization = "Bearer " + authKey;
    return h;
  }

  function notice(html, info) {
    const el = $("notice");
    el.innerHTML = html;
    el.className = info ? "info" : "";
    el.hidden = !html;
  }

  function escapeHtml(s) {
    return String(s).replace(/[&<>"']/g, (ch) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[ch]));
  }

  // ------------------------------------------------------------------ manifest
  function useManifest(m, zscore, statistics, smoothed) {
    S.manifest = m;
    S.L = m.layers.length;
    S.C = m.concepts.length;
    S.zscore = zscore;
    S.weights = valenceWeights(m.valence);
    // base: the statistics the rows arrive in (the server's default, or what `read --html` used);
    // against: the switch's choice, shown. sets: every set's mean/std, for converting between them.
    S.base = statistics || (m.statistics ? m.statistics.default : "neutral");
    S.against = S.base;
    S.sets = zscore && m.statistics_sets && m.statistics_sets[S.base] ? m.statistics_sets : null;
    S.trackNames = Array.isArray(m.tracks) ? m.tracks : [];
    const sw = $("statistics");
    sw.value = S.against;
    for (const opt of sw.options) opt.disabled = !(S.sets && S.sets[opt.value]) && opt.value !== S.base;
    sw.disabled = !S.sets || Object.keys(S.sets).length < 2;
    sw.title = sw.disabled ? "this readout holds one set of statistics (or its values are raw): nothing to switch"
      : "z against neutral text: is this token more X than plain prose? Against emotional text: X rather than another feeling?";
    // smooth: read --html already smoothed its rows (`smoothed`), the live page smooths here.
    S.smooth = smoothed > 1 ? 1 : Math.max(1, m.smooth || 1);
    const sm = $("smooth");
    sm.value = smoothed > 1 ? smoothed : S.smooth;
    sm.disabled = smoothed > 1;
    sm.title = smoothed > 1 ? `amygdala read smoothed these values over the last ${smoothed} tokens (read --smooth)`
      : "a causal moving average over the last N tokens of each message (1: none); amygdala read's default";
    $("emotionality").hidden = !S.trackNames.includes("emotionality");
    S.clusterIndex = null;
    if (Array.isArray(m.clusters)) {
      const groups = new Map();
      m.clusters.forEach((name, c) => {
        if (!groups.has(name)) groups.set(name, []);
        groups.get(name).push(c);
      });
      S.clusterIndex = Array.from(groups.entries());
    }
    S.listed = m.layers.map(() => []);
    S.hasTracks = Array.isArray(m.tracks) && m.tracks.includes("valence");
    $("readout-info").textContent = `${S.C} concepts × layers ${m.layers.join(", ")} · ${zscore ? "z-scores" : "raw projections"}`
      + (m.construction ? ` · ${m.construction.replace("_", " ")}` : "")
      + (S.hasTracks ? " · colour: valence track" : S.weights ? " · colour: valence" : " · no valence in this readout: tokens are not coloured");
    $("readout-info").title = S.weights
      ? "token colour: the valence-weighted mean of the concept values, weights centred so that a rise of every concept reads as neither (green pleasant, red unpleasant)"
      : "this readout file records no valence per concept (rebuild it with amygdala build)";
    renderPanel();
  }

  async function loadServer() {
    let resp;
    try {
      resp = await fetch("../v1/readout/manifest", { headers: headers() });
    } catch (e) {
      notice(`Cannot reach the server (${escapeHtml(e.message)}). Is <code>amygdala serve</code> still running?`);
      return;
    }
    if (resp.status === 404) {
      notice("This server has no readout loaded, so there is nothing to show. Start it with a readout: "
        + "<code>amygdala view --readout OUT</code> (or <code>amygdala serve --readout OUT</code>).");
      disableComposer("no readout on this server");
      return;
    }
    if (!resp.ok) {
      notice(`The readout manifest answered ${resp.status}${resp.status === 401 ? ": open the page as /amygdala/#key=YOUR_KEY, or reload and give the key" : ""}.`);
      if (resp.status === 401) askKey();
      disableComposer("no manifest");
      return;
    }
    const manifest = await resp.json();
    useManifest(manifest, !!manifest.zscore);
    try {
      const models = await (await fetch("../v1/models", { headers: headers() })).json();
      S.model = models.data[0].id;
      $("model").textContent = S.model;
    } catch (e) {
      notice("The server did not list its model (GET /v1/models); chat is off.");
      disableComposer("no model");
    }
  }

  function disableComposer(reason) {
    $("send").disabled = true;
    $("prompt").disabled = true;
    $("prompt").placeholder = reason;
  }

  // ------------------------------------------------------------------ messages and tokens
  const ROLE_LABELS = { text: "text (teacher-forced)", prompt: "prompt as the model read it (chat template included)" };

  /** A message element at the end of the conversation, or just before message ``before``. */
  function addMessage(role, content, steer, before) {
    const el = document.createElement("div");
    el.className = "msg " + role;
    const who = document.createElement("div");
    who.className = "who";
    who.textContent = ROLE_LABELS[role] || role;
    if (steer && steer.length) {
      const tag = document.createElement("span");
      tag.className = "steer-tag";
      tag.textContent = "steered: " + steer.map((s) => `${s.concept} ${s.strength > 0 ? "+" : ""}${s.strength}`).join(", ");
      who.appendChild(tag);
    }
    const body = document.createElement("div");
    body.className = "body";
    if (role === "user") body.textContent = content;
    el.append(who, body);
    const msg = { role, content, steer: steer || [], tokens: [], el, body };
    if (before) {
      $("messages").insertBefore(el, before.el);
      S.messages.splice(S.messages.indexOf(before), 0, msg);
    } else {
      $("messages").appendChild(el);
      S.messages.push(msg);
    }
    return msg;
  }

  /** The values the panel's entry rule sees: z as it is over emotional text, z minus the
   *  layer's median concept z over neutral text (see ENTER_Z). */
  function entryValues(values) {
    if (S.against === "emotional") return values;
    const sorted = Float32Array.from(values).sort();
    const median = sorted[sorted.length >> 1];
    return values.map((x) => x - median);
  }

  /** A token's tracks as {name: value}, mean over the layers: from the server's [n_layers][n_tracks]
   *  matrix, or as a snapshot stores them already. null without tracks. */
  function trackValues(tracks) {
    if (!tracks) return null;
    if (!Array.isArray(tracks)) return tracks;
    const out = {};
    S.trackNames.forEach((name, k) => { out[name] = tracks.reduce((a, layer) => a + layer[k], 0) / tracks.length; });
    return out;
  }

  function addToken(msg, text, matrix, tracks) {
    let base = null;
    if (matrix) {
      base = new Float32Array(S.L * S.C);
      for (let l = 0; l < S.L; l++) base.set(matrix[l], l * S.C);
    }
    const i = S.tokens.length;
    // base / baseTracks: as received; row / tracks: what is shown (the chosen statistics, smoothed).
    const t = { text, base, baseTracks: base ? trackValues(tracks) : null, msg, row: null, tracks: null };
    S.tokens.push(t);
    msg.tokens.push(i);
    viewToken(i);
    schedule();
  }

  /** Token ``i``'s shown row and tracks from the tokens before it in its message, and the
   *  panel's list stepped with it. */
  function viewToken(i) {
    const t = S.tokens[i];
    t.conv = convertRow(t.base, S.sets, S.base, S.against, S.L, S.C);
    t.row = t.tracks = null;
    if (!t.base) return;
    // The window: this token and the ones before it in its message that have a readout.
    const idx = t.msg.tokens, rows = [], trk = [];
    for (let q = idx.lastIndexOf(i); q >= 0 && rows.length < S.smooth; q--) {
      const x = S.tokens[idx[q]];
      if (x.conv) { rows.push(x.conv); trk.push(x.baseTracks); }
    }
    t.row = smoothLast(rows, S.smooth);
    if (t.baseTracks) {
      const names = Object.keys(t.baseTracks);
      const sm = smoothLast(trk.map((x) => (x ? Float32Array.from(names, (n) => x[n]) : null)), S.smooth);
      t.tracks = {};
      names.forEach((n, k) => { t.tracks[n] = sm[k]; });
    }
    if (!t.row) return;
    for (let l = 0; l < S.L; l++) {
      const values = t.row.subarray(l * S.C, (l + 1) * S.C);
      S.listed[l] = hysteresisStep(S.listed[l], S.zscore ? entryValues(values) : values, { k: PANEL_K, enter: S.zscore ? ENTER_Z : null, exit: S.zscore ? EXIT_Z : null });
    }
  }

  /** The statistics switch or the smoothing changed: every token's shown values, the panel's list
   *  (replayed from the first token) and every colour again. */
  function restyle() {
    S.listed = S.manifest.layers.map(() => []);
    S.tokens.forEach((_, i) => viewToken(i));
    document.querySelectorAll(".tok").forEach((span) => {
      span.style.backgroundColor = tokenColour(S.tokens[+span.dataset.i]);
    });
    renderPanel();
    renderTracks();
  }

  function tokenColour(t) {
    return valenceColour(t.tracks && t.tracks.valence != null ? t.tracks.valence / 2 : tokenValence(t.row, S.weights, S.L, S.C));
  }

  function schedule() {
    if (S.dirty) return;
    S.dirty = true;
    requestAnimationFrame(frame);
  }

  /** Everything that changed since the last frame, drawn once: spans, panel, tracks. */
  function frame() {
    S.dirty = false;
    const pane = $("messages");
    const follow = pane.scrollHeight - pane.scrollTop - pane.clientHeight < 40;
    let frag = null, fragMsg = null;
    for (; S.rendered < S.tokens.length; S.rendered++) {
      const t = S.tokens[S.rendered];
      if (fragMsg !== t.msg) {
        if (frag) fragMsg.body.appendChild(frag);
        frag = document.createDocumentFragment();
        fragMsg = t.msg;
      }
      const span = document.createElement("span");
      span.className = "tok";
      span.dataset.i = S.rendered;
      span.textContent = t.text;
      const colour = tokenColour(t);
      if (colour) span.style.backgroundColor = colour;
      frag.appendChild(span);
    }
    if (frag) fragMsg.body.appendChild(frag);
    if (follow) pane.scrollTop = pane.scrollHeight;
    renderPanel();
    renderTracks();
  }

  function panelToken() {
    if (S.selected != null) return S.selected;
    for (let i = S.tokens.length - 1; i >= 0; i--) if (S.tokens[i].row) return i;
    return null;
  }

  function renderPanel() {
    const holder = $("panel-layers");
    if (!S.manifest) { holder.textContent = ""; return; }
    const ti = panelToken();
    const token = ti == null ? null : S.tokens[ti];
    $("panel-token").textContent = token
      ? `${S.selected != null ? "selected" : "latest"} token #${ti} ${JSON.stringify(token.text)}${S.selected != null ? " (Esc: follow the latest)" : ""}`
      : "(no token yet)";
    holder.textContent = "";
    S.manifest.layers.forEach((layer, l) => {
      const col = document.createElement("div");
      col.className = "layer";
      col.innerHTML = `<h4>layer ${layer}</h4>`;
      if (token && token.row) {
        const values = token.row.subarray(l * S.C, (l + 1) * S.C);
        const list = S.selected != null
          ? argsortDesc(values).slice(0, PANEL_K)
          : S.listed[l];
        const entry = S.zscore ? entryValues(values) : values;
        const top = Math.max(1e-9, ...list.map((c) => Math.abs(values[c])));
        for (const c of list) {
          const div = document.createElement("div");
          div.className = "pc" + (S.zscore && entry[c] < ENTER_Z ? " fading" : "");
          div.dataset.concept = S.manifest.concepts[c];
          div.dataset.layer = layer;
          div.innerHTML = `<span class="bar" style="width:${(100 * Math.abs(values[c]) / top).toFixed(1)}%"></span>`
            + `<span class="name">${escapeHtml(S.manifest.concepts[c])}</span><span class="val">${fmt(values[c])}</span>`;
          div.title = (S.manifest.descriptions && S.manifest.descriptions[c]) || "";
          col.appendChild(div);
        }
      }
      holder.appendChild(col);
    });
    renderClusters(token);
  }

  function renderClusters(token) {
    const holder = $("clusters");
    holder.textContent = "";
    if (!S.clusterIndex) { holder.innerHTML = '<span class="muted">this readout records no clusters</span>'; return; }
    if (!token || !token.row) return;
    const means = S.clusterIndex.map(([name, idx]) => {
      let s = 0;
      for (let l = 0; l < S.L; l++) for (const c of idx) s += token.row[l * S.C + c];
      return [name, s / (idx.length * S.L)];
    }).sort((a, b) => b[1] - a[1]);
    const top = Math.max(1e-9, ...means.map((x) => Math.abs(x[1])));
    for (const [name, v] of means) {
      const row = document.createElement("div");
      row.className = "cl";
      row.dataset.cluster = name;
      const w = (50 * Math.abs(v) / top).toFixed(1);
      const left = v >= 0 ? 50 : 50 - w;
      row.innerHTML = `<span class="name" title="${escapeHtml(name)}">${escapeHtml(name.replace(/_/g, " "))}</span>`
        // Blue above the neutral-text mean, grey below: not the tokens' green/red, which mean valence.
        + `<span class="axis"><span style="left:${left}%;width:${w}%;background:${v >= 0 ? "rgba(53, 89, 199, .55)" : "rgba(120, 120, 120, .45)"}"></span></span>`
        + `<span class="val">${fmt(v)}</span>`;
      holder.appendChild(row);
    }
  }

  // ------------------------------------------------------------------ tooltip and selection
  function topOfLayer(row, l, k) {
    const values = row.subarray(l * S.C, (l + 1) * S.C);
    return argsortDesc(values).slice(0, k).map((c) => [S.manifest.concepts[c], values[c]]);
  }

  function showTooltip(ev) {
    const span = ev.target.closest ? ev.target.closest(".tok") : null;
    const tip = $("tooltip");
    if (!span || !S.manifest) { tip.hidden = true; return; }
    const t = S.tokens[+span.dataset.i];
    if (!t.row) { tip.hidden = true; return; }
    const v = t.tracks && t.tracks.valence != null ? t.tracks.valence : tokenValence(t.row, S.weights, S.L, S.C);
    const e = t.tracks && t.tracks.emotionality != null ? ` · emotionality ${fmt(t.tracks.emotionality)}` : "";
    let html = `<div><b>${escapeHtml(JSON.stringify(t.text))}</b>${v == null ? "" : ` · valence ${fmt(v)}`}${e}</div><table><tr>`;
    S.manifest.layers.forEach((layer, l) => {
      html += `<td><div class="muted">layer ${layer}</div>`
        + topOfLayer(t.row, l, 5).map(([n, x]) => `${escapeHtml(n)} ${fmt(x)}`).join("<br>") + "</td>";
    });
    tip.innerHTML = html + "</tr></table>";
    tip.hidden = false;
    const x = Math.min(ev.clientX + 14, window.innerWidth - tip.offsetWidth - 8);
    const y = ev.clientY + 18 + tip.offsetHeight > window.innerHeight ? ev.clientY - tip.offsetHeight - 10 : ev.clientY + 18;
    tip.style.left = x + "px";
    tip.style.top = y + "px";
  }

  function select(i) {
    const old = document.querySelector(".tok.selected");
    if (old) old.classList.remove("selected");
    S.selected = i;
    if (i != null) {
      const span = document.querySelector(`.tok[data-i="${i}"]`);
      if (span) span.classList.add("selected");
    }
    renderPanel();
    renderTracks();
  }

  // ------------------------------------------------------------------ tracks and steering
  function steerScale() {
    const std = S.manifest && S.manifest.std;
    if (!std) return 10;
    const all = std.flat().filter((x) => isFinite(x)).sort((a, b) => a - b);
    const median = all.length ? all[Math.floor(all.length / 2)] : 1;
    const raw = STEER_STDS * median;
    const step = Math.pow(10, Math.floor(Math.log10(raw)));
    return Math.ceil(raw / step) * step;
  }

  function addTrack(c) {
    if (S.tracks.some((t) => t.c === c)) return;
    const name = S.manifest.concepts[c];
    const el = document.createElement("div");
    el.className = "track";
    el.dataset.concept = name;
    const scale = steerScale();
    const cluster = S.manifest.clusters ? S.manifest.clusters[c].replace(/_/g, " ") : "";
    el.innerHTML = `<div class="top"><span class="name">${escapeHtml(name)}</span><span class="muted">${escapeHtml(cluster)}</span>`
      + `<span class="now"></span><button class="remove" type="button" title="remove">×</button></div>`
      + `<canvas width="440" height="68"></canvas>`
      + `<div class="steer"><span class="muted">steer</span><input type="range" min="${-scale}" max="${scale}" step="${scale / 100}" value="0">`
      + `<input type="number" step="any" value="0" aria-label="steering strength of ${escapeHtml(name)}"></div>`;
    const track = { c, strength: 0, el, canvas: el.querySelector("canvas"), now: el.querySelector(".now"),
      range: el.querySelector("input[type=range]"), number: el.querySelector("input[type=number]") };
    el.title = (S.manifest.descriptions && S.manifest.descriptions[c]) || "";
    track.range.addEventListener("input", () => setStrength(track, +track.range.value));
    track.number.addEventListener("change", () => {
      const v = Number(track.number.value);
      setStrength(track, isFinite(v) ? v : 0);
    });
    el.querySelector(".remove").addEventListener("click", () => {
      S.tracks = S.tracks.filter((t) => t !== track);
      el.remove();
      updateSteerSummary();
    });
    S.tracks.push(track);
    $("track-list").appendChild(el);
    renderTracks();
  }

  function setStrength(track, v) {
    track.strength = v;
    track.range.value = v;
    track.number.value = v;
    updateSteerSummary();
  }

  function currentSteer() {
    return S.tracks.filter((t) => t.strength !== 0).map((t) => ({ concept: S.manifest.concepts[t.c], strength: t.strength }));
  }

  function updateSteerSummary() {
    const steer = currentSteer();
    $("steer-summary").textContent = steer.length
      ? "next reply steered: " + steer.map((s) => `${s.concept} ${s.strength > 0 ? "+" : ""}${s.strength}`).join(", ") : "";
  }

  /** The concept's value per token (mean over layers); NaN where a token has no readout. */
  function series(c) {
    const out = new Float32Array(S.tokens.length);
    S.tokens.forEach((t, i) => {
      if (!t.row) { out[i] = NaN; return; }
      let s = 0;
      for (let l = 0; l < S.L; l++) s += t.row[l * S.C + c];
      out[i] = s / S.L;
    });
    return out;
  }

  function renderTracks() {
    const emo = $("emotionality");
    if (!emo.hidden) {
      const values = Float32Array.from(S.tokens, (t) => (t.tracks && t.tracks.emotionality != null ? t.tracks.emotionality : NaN));
      const ti = panelToken();
      emo.querySelector(".now").textContent = ti == null ? "" : fmt(values[ti]);
      drawSparkline(emo.querySelector("canvas"), values, ti);
    }
    for (const track of S.tracks) {
      const values = series(track.c);
      const ti = panelToken();
      track.now.textContent = ti == null ? "" : fmt(values[ti]);
      drawSparkline(track.canvas, values, ti);
    }
  }

  function drawSparkline(canvas, values, mark) {
    const ctx = canvas.getContext("2d");
    const W = canvas.width, H = canvas.height;
    ctx.clearRect(0, 0, W, H);
    const finite = Array.from(values).filter((v) => isFinite(v));
    if (!finite.length) return;
    let lo = Math.min(0, ...finite), hi = Math.max(0, ...finite);
    if (hi - lo < 1e-9) hi = lo + 1;
    const y = (v) => H - 3 - (v - lo) / (hi - lo) * (H - 6);
    const x = (i) => (values.length === 1 ? W / 2 : 2 + i * (W - 4) / (values.length - 1));
    ctx.strokeStyle = "#c8c8c2";
    ctx.beginPath(); ctx.moveTo(0, y(0)); ctx.lineTo(W, y(0)); ctx.stroke();
    ctx.strokeStyle = "#3559c7";
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    let pen = false;
    values.forEach((v, i) => {
      if (!isFinite(v)) { pen = false; return; }
      if (pen) ctx.lineTo(x(i), y(v)); else ctx.moveTo(x(i), y(v));
      pen = true;
    });
    ctx.stroke();
    if (mark != null && isFinite(values[mark])) {
      ctx.fillStyle = "#1d1d1f";
      ctx.beginPath(); ctx.arc(x(mark), y(values[mark]), 2.5, 0, 2 * Math.PI); ctx.fill();
    }
  }

  function renderSuggestions() {
    const q = $("search").value;
    const box = $("suggestions");
    box.textContent = "";
    if (!S.manifest || !q.trim()) return;
    for (const c of searchConcepts(q, S.manifest.concepts, S.manifest.descriptions, 8)) {
      const div = document.createElement("div");
      div.className = "sug";
      div.dataset.concept = S.manifest.concepts[c];
      const d = S.manifest.descriptions && S.manifest.descriptions[c];
      div.innerHTML = `${escapeHtml(S.manifest.concepts[c])}${d ? ` <span class="desc">${escapeHtml(d)}</span>` : ""}`;
      div.addEventListener("mousedown", (ev) => { ev.preventDefault(); pick(c); });
      box.appendChild(div);
    }
  }

  function pick(c) {
    addTrack(c);
    $("search").value = "";
    $("suggestions").textContent = "";
    $("search-message").textContent = "";
  }

  /** Enter in the search box: the exact name, else the first match, else the nearest names. */
  function submitSearch() {
    const q = $("search").value.trim();
    if (!q || !S.manifest) return;
    const names = S.manifest.concepts;
    const exact = names.findIndex((n) => n.toLowerCase() === q.toLowerCase().replace(/\s+/g, "_"));
    const found = exact >= 0 ? [exact] : searchConcepts(q, names, S.manifest.descriptions, 1);
    if (found.length) { pick(found[0]); return; }
    const msg = $("search-message");
    msg.innerHTML = `unknown concept ${escapeHtml(JSON.stringify(q))}; nearest: `;
    for (const name of nearestNames(q, names, 3)) {
      const a = document.createElement("a");
      a.textContent = name;
      a.addEventListener("click", () => pick(names.indexOf(name)));
      msg.appendChild(a);
    }
  }

  // ------------------------------------------------------------------ chat
  async function send(text) {
    if (S.busy || !S.model || !text.trim()) return;
    if (S.selected != null) select(null);
    addMessage("user", text, []);
    const history = S.messages.filter((m) => m.role === "user" || m.role === "assistant")
      .map((m) => ({ role: m.role, content: m.content }));
    const steer = currentSteer();
    const msg = addMessage("assistant", "", steer);
    const body = {
      model: S.model, messages: history, stream: true, logprobs: true,
      readout: S.zscore ? "zscore" : true,
      temperature: Number($("temperature").value), max_tokens: Number($("max-tokens").value),
    };
    if (steer.length) body.steer = steer;
    if ($("read-prompt").checked) body.readout_prompt = true;
    setBusy(true);
    S.abort = new AbortController();
    try {
      const resp = await fetch("../v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body), signal: S.abort.signal });
      if (!resp.ok) {
        const err = await resp.json().catch(() => ({}));
        failMessage(msg, (err.error && err.error.message) || err.message || `the server answered ${resp.status}`);
        return;
      }
      await readStream(resp, (chunk) => onChunk(msg, chunk));
    } catch (e) {
      if (e.name !== "AbortError") failMessage(msg, e.message);
    } finally {
      setBusy(false);
    }
  }

  function failMessage(msg, text) {
    const err = document.createElement("div");
    err.className = "error";
    err.textContent = text;
    msg.el.appendChild(err);
    const i = S.messages.indexOf(msg);
    if (!msg.tokens.length && i >= 0) {  // keep a failed turn (and its question) out of the next request
      let start = i;
      while (start > 0 && ["prompt", "user"].includes(S.messages[start - 1].role) && S.messages[start - 1].role !== "user") start--;
      if (start > 0 && S.messages[start - 1].role === "user") start--;
      S.messages.splice(start, i + 1 - start);
    }
  }

  async function readStream(resp, onData) {
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let nl;
      while ((nl = buf.indexOf("\n")) >= 0) {
        const line = buf.slice(0, nl).trim();
        buf = buf.slice(nl + 1);
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        onData(JSON.parse(data));
      }
    }
  }

  /** One streamed chunk: its tokens, each with its own readout matrix. */
  function onChunk(msg, chunk) {
    if (chunk.error) { failMessage(msg, chunk.error.message || "stream error"); return; }
    const ch = chunk.choices && chunk.choices[0];
    if (!ch) return;
    if (ch.prompt_readout && ch.prompt_tokens && !msg.prompt) {  // the first chunk, with readout_prompt
      msg.prompt = addMessage("prompt", ch.prompt_tokens.join(""), [], msg);
      ch.prompt_tokens.forEach((text, i) => addToken(msg.prompt, text, ch.prompt_readout[i], ch.prompt_tracks && ch.prompt_tracks[i]));
    }
    const content = (ch.delta && ch.delta.content) || "";
    msg.content += content;
    const rows = ch.readout_tokens || (ch.readout ? [ch.readout] : []);
    if (!rows.length) {
      if (content) addToken(msg, content, null);
      return;
    }
    // Several tokens in one chunk (the client fell behind): split the text at their logprobs' strings.
    const lp = (ch.logprobs && ch.logprobs.content) || [];
    const texts = splitText(content, lp.length === rows.length ? lp.map((x) => x.token) : rows.map(() => ""));
    const tracks = ch.tracks_tokens || (ch.tracks ? [ch.tracks] : []);
    rows.forEach((r, i) => addToken(msg, texts[i], r, tracks[i]));
  }

  function setBusy(busy) {
    S.busy = busy;
    document.body.dataset.busy = busy ? "true" : "false";
    $("send").disabled = busy;
    $("stop").hidden = !busy;
    $("status").textContent = busy ? "generating…" : "";
  }

  // ------------------------------------------------------------------ export
  function conversation() {
    const m = Object.assign({}, S.manifest);
    delete m.mean; delete m.std;
    return {
      format: FORMAT, version: VERSION,
      created: new Date().toISOString().replace(/\.\d+Z$/, "Z"),
      source: S.snapshot ? S.snapshot.source : "page",
      model: S.model || (S.snapshot && S.snapshot.model) || "",
      // The rows as they arrived (statistics S.base, not smoothed): the snapshot's controls work as here.
      manifest: m, readout: S.zscore ? "zscore" : "raw", statistics: S.base, smoothed: 1,
      alignment: S.snapshot ? S.snapshot.alignment : "sampled",
      messages: S.messages.map((msg) => ({
        role: msg.role, content: msg.content, steer: msg.steer,
        tokens: msg.tokens.map((i) => {
          const t = S.tokens[i];
          const out = { text: t.text, readout: t.base ? S.manifest.layers.map((_, l) => Array.from(t.base.subarray(l * S.C, (l + 1) * S.C), (x) => Math.round(x * 1e4) / 1e4)) : null };
          if (t.baseTracks) out.tracks = t.baseTracks;
          return out;
        }),
      })),
    };
  }

  function download(name, type, text) {
    const a = document.createElement("a");
    a.href = URL.createObjectURL(new Blob([text], { type }));
    a.download = name;
    document.body.appendChild(a);
    a.click();
    setTimeout(() => { URL.revokeObjectURL(a.href); a.remove(); }, 1000);
  }

  function stamp() { return new Date().toISOString().slice(0, 19).replace(/[:T]/g, "-"); }

  /** The page with its files inlined and the conversation embedded (what amygdala read --html writes). */
  async function snapshotHtml() {
    const [page, style, script] = await Promise.all(["index.html", "style.css", "app.js"].map((f) => fetch(f).then((r) => r.text())));
    // every <, > and & escaped (as view/offline.py's script_json): a comment opener followed by a script tag in a text would
    // otherwise keep the HTML parser from ending the data element, and the snapshot renders nothing
    const data = JSON.stringify(conversation()).replace(/[<>&]/g, (ch) => "\\u00" + ch.charCodeAt(0).toString(16).padStart(2, "0"));
    // Built from parts: this file is itself inlined into a <script> element, which a literal
    // closing tag or comment opener would end or confuse.
    const close = "<" + "/script>", slot = "<" + "!--snapshot-data--" + ">";
    return page
      .replace('<link rel="stylesheet" href="style.css">', () => `<style>\n${style}\n<` + "/style>")
      .replace(slot, () => `<script type="application/json" id="amygdala-snapshot">${data}${close}`)
      .replace(`<script src="app.js">${close}`, () => `<script>\n${script}\n${close}`);
  }

  // ------------------------------------------------------------------ snapshot mode
  function loadSnapshot(data) {
    if (data.format !== FORMAT) { notice(`This file is not an ${FORMAT} (format ${escapeHtml(data.format)}).`); return; }
    S.snapshot = data;
    document.body.classList.add("snapshot");
    useManifest(data.manifest, data.readout === "zscore", data.statistics, data.smoothed || 1);
    $("model").textContent = data.model || "";
    $("status").textContent = `snapshot (${data.source}, ${data.created})`;
    $("export-html").hidden = true;
    for (const m of data.messages) {
      const msg = addMessage(m.role, m.content, m.steer);
      for (const t of m.tokens) addToken(msg, t.text, t.readout, t.tracks);
      if (!m.tokens.length && m.role !== "user") msg.body.textContent = m.content;
    }
    if (data.alignment === "own") {
      notice("Teacher-forced readout: each token's scores are the residual stream at the token's own position.", true);
    }
  }

  // ------------------------------------------------------------------ start
  function wire() {
    $("composer").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const text = $("prompt").value;
      $("prompt").value = "";
      send(text);
    });
    $("prompt").addEventListener("keydown", (ev) => {
      if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("composer").requestSubmit(); }
    });
    $("stop").addEventListener("click", () => S.abort && S.abort.abort());
    $("messages").addEventListener("mousemove", showTooltip);
    $("messages").addEventListener("mouseleave", () => { $("tooltip").hidden = true; });
    $("messages").addEventListener("click", (ev) => {
      const span = ev.target.closest(".tok");
      if (span && S.tokens[+span.dataset.i].row) select(+span.dataset.i === S.selected ? null : +span.dataset.i);
    });
    document.addEventListener("keydown", (ev) => { if (ev.key === "Escape" && S.selected != null) select(null); });
    $("statistics").addEventListener("change", () => { S.against = $("statistics").value; restyle(); });
    $("smooth").addEventListener("change", () => {
      const n = Math.round(Number($("smooth").value));
      S.smooth = isFinite(n) && n >= 1 ? Math.min(n, 256) : 1;
      $("smooth").value = S.smooth;
      restyle();
    });
    $("search").addEventListener("input", renderSuggestions);
    $("search").addEventListener("keydown", (ev) => { if (ev.key === "Enter") { ev.preventDefault(); submitSearch(); } });
    $("search").addEventListener("blur", () => setTimeout(() => { $("suggestions").textContent = ""; }, 150));
    $("export-json").addEventListener("click", () => download(`amygdala-conversation-${stamp()}.json`, "application/json", JSON.stringify(conversation())));
    $("export-html").addEventListener("click", async () => download(`amygdala-conversation-${stamp()}.html`, "text/html", await snapshotHtml()));
  }

  window.amygdala = {
    state: S, hysteresisStep, convertRow, smoothLast, splitText, nearestNames, searchConcepts, tokenValence, valenceWeights, valenceColour, editDistance,
    addTrack: (name) => addTrack(S.manifest.concepts.indexOf(name)), conversation, snapshotHtml, send,
    // For bench/view.py: feed chunks and draw synchronously, without a server or frame timing.
    addMessage, onChunk, frame,
  };

  wire();
  const embedded = document.getElementById("amygdala-snapshot");
  if (embedded) loadSnapshot(JSON.parse(embedded.textContent));
  else loadServer();
})();

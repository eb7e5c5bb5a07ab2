// livecount inbox: a sidebar of views with live counts, and the selected view's conversations.
//
// Counts come only from the WebSocket stream (snapshot, then deltas); lists come from the
// HTTP API and are refetched when the selected view's counter moves, so the two agree.
// A reconnect resumes from the last (epoch, seq) applied (?epoch=E&since=S): the server
// answers one merged delta, or a snapshot when it cannot (another epoch: a restart). A delta
// of an epoch other than the snapshot's is never applied.
// Every piece of user-provided text reaches the DOM through textContent or an attribute,
// never through innerHTML.
"use strict";

(() => {
  const PAGE_SIZE = 50;
  const LIST_REFRESH_MS = 300;
  const BACKOFF_BASE_MS = 250;
  const BACKOFF_MAX_MS = 10000;
  // Failed connects in a row (a few seconds of backoff) after which the page stops asking to
  // resume, so a refused resume cannot keep it offline: it asks for a snapshot instead.
  const RESUME_ATTEMPTS = 6;
  const NOTICE_MS = 6000;
  const STORE_WS = "livecount.ws";
  const STORE_TOKEN = "livecount.token";
  const STORE_SELECTED = "livecount.selected";
  // The view builder: a preview is asked for this long after the last change, one at a time.
  const PREVIEW_DEBOUNCE_MS = 400;
  const JSON_SYNC_MS = 250;
  const KNOWN_CHANNELS = ["chat", "email", "phone", "social"];
  // Folders are seeded as the workspace's first shared views, at positions 0..6.
  const FOLDER_COUNT = 7;
  const TEAMMATE_FIELDS = new Set(["assignee_id", "author_id", "mentions", "unread_by"]);

  const state = {
    ws: null,
    token: null,
    me: null, // {id, name, email} or null for the admin token
    teammates: new Map(), // id -> teammate
    teams: new Map(), // id -> team
    views: [], // as the API sends them, any order
    counts: {}, // view id -> integer | {group: integer}
    epoch: null, // the epoch of the last snapshot: the numbering ``seq`` belongs to
    seq: null,
    selected: null, // {viewId, group}
    list: { items: [], nextCursor: null },
  };

  const $ = (id) => document.getElementById(id);

  // JSON text of a value, as the server reads numbers: an integral number past ±2**53 (say
  // 1e20, which JSON.stringify writes as 100000000000000000000, an integer the server refuses)
  // is written in exponent form, so it stays the float it was.
  const BIG = "\u0000livecount-number:";
  function jsonText(value, indent) {
    const text = JSON.stringify(value, (key, v) => (
      typeof v === "number" && Number.isInteger(v) && Math.abs(v) > 2 ** 53 ? BIG + v.toExponential() : v), indent);
    return text.replace(/"\\u0000livecount-number:([^"]+)"/g, "$1");
  }

  // -- DOM helpers (text only) ----------------------------------------------------------------

  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key.startsWith("on") && typeof value === "function") {
        el.addEventListener(key.slice(2), value);
      } else if (key === "className") {
        el.className = value;
      } else {
        el.setAttribute(key, value === true ? "" : String(value));
      }
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      el.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return el;
  }

  function show(el, visible) {
    el.hidden = !visible;
  }

  let noticeTimer = null;
  function notice(text, kind = "info") {
    const el = $("notice");
    el.textContent = text;
    el.dataset.kind = kind;
    show(el, true);
    clearTimeout(noticeTimer);
    noticeTimer = setTimeout(() => show(el, false), NOTICE_MS);
  }

  // -- HTTP API ---------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, code, message, retryAfter = null) {
      super(message);
      this.status = status;
      this.code = code;
      this.retryAfter = retryAfter; // seconds (Retry-After), for 429 and 503
    }
  }

  async function api(method, path, { body, ifMatch } = {}) {
    const headers = { Authorization: `Bearer ${state.token}`, Accept: "application/json" };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    if (ifMatch !== undefined && ifMatch !== null) headers["If-Match"] = String(ifMatch);
    const url = `/api/workspaces/${encodeURIComponent(state.ws)}${path}`;
    let response;
    try {
      response = await fetch(url, {
        method,
        headers,
        body: body === undefined ? undefined : jsonText(body),
        cache: "no-store",
      });
    } catch (err) {
      throw new ApiError(0, "network", "The server cannot be reached.");
    }
    let data = null;
    if (response.status !== 204) {
      try {
        data = await response.json();
      } catch (err) {
        data = null;
      }
    }
    if (!response.ok) {
      const error = (data && data.error) || {};
      const retry = Number(response.headers.get("Retry-After"));
      throw new ApiError(response.status, error.code || "http_error",
        error.message || `${response.status} ${response.statusText}`,
        Number.isFinite(retry) && retry >= 0 ? retry : null);
    }
    return data;
  }

  function listOf(data, key) {
    if (Array.isArray(data)) return data;
    return (data && Array.isArray(data[key])) ? data[key] : [];
  }

  async function loadTeammates() {
    const data = await api("GET", "/teammates");
    state.teammates = new Map(listOf(data, "teammates").map((t) => [t.id, t]));
  }

  async function loadTeams() {
    const data = await api("GET", "/teams");
    state.teams = new Map(listOf(data, "teams").map((t) => [t.id, t]));
  }

  async function loadViews() {
    const data = await api("GET", "/views");
    setViews(listOf(data, "views"));
  }

  // Names missing from the maps (a teammate or team created after the page loaded): fetch the
  // lists again, at most once every few seconds.
  let namesRefreshedAt = 0;
  function refreshNamesSoon() {
    const now = Date.now();
    if (now - namesRefreshedAt < 5000) return;
    namesRefreshedAt = now;
    Promise.all([loadTeammates(), loadTeams()])
      .then(() => { renderSidebar(); renderList(); })
      .catch(() => {});
  }

  // -- names and counts -------------------------------------------------------------------------

  function teammateName(id) {
    if (id === null || id === undefined) return null;
    const teammate = state.teammates.get(Number(id));
    if (!teammate) {
      refreshNamesSoon();
      return `Teammate ${id}`;
    }
    return teammate.name;
  }

  function teamName(id) {
    if (id === null || id === undefined) return null;
    const team = state.teams.get(Number(id));
    if (!team) {
      refreshNamesSoon();
      return `Team ${id}`;
    }
    return team.name;
  }

  function groupLabel(view, group) {
    if (view.group_by === "team_id") return teamName(group);
    if (TEAMMATE_FIELDS.has(view.group_by)) {
      const name = teammateName(group);
      return state.me && String(state.me.id) === group ? `${name} (you)` : name;
    }
    return group;
  }

  function viewById(id) {
    return state.views.find((v) => String(v.id) === String(id)) || null;
  }

  function isFolder(view) {
    return view.owner_id === null && view.position < FOLDER_COUNT;
  }

  function sortedViews() {
    return state.views.slice().sort((a, b) => (a.position - b.position) || (a.id - b.id));
  }

  // The count of a plain view, or of one group of a grouped view; null while unknown.
  function countOf(viewId, group) {
    const value = state.counts[String(viewId)];
    if (value === undefined) return null;
    if (group === null || group === undefined) return typeof value === "number" ? value : null;
    return typeof value === "object" ? (value[group] || 0) : null;
  }

  // The group values a grouped view shows a row for: every team or teammate when the view
  // groups by one of them, plus whatever groups the counts name.
  function groupsOf(view) {
    const present = Object.keys(state.counts[String(view.id)] || {});
    let all = [];
    if (view.group_by === "team_id") all = [...state.teams.keys()].map(String);
    else if (view.group_by === "assignee_id") all = [...state.teammates.keys()].map(String);
    const groups = [...new Set([...all, ...present])];
    const label = (g) => String(groupLabel(view, g)).toLowerCase();
    return groups.sort((a, b) => label(a).localeCompare(label(b)) || a.localeCompare(b));
  }

  function setViews(views) {
    state.views = views.slice();
    const known = new Set(state.views.map((v) => String(v.id)));
    for (const key of Object.keys(state.counts)) {
      if (!known.has(key)) delete state.counts[key];
    }
  }

  // -- sidebar ----------------------------------------------------------------------------------

  function badge(count, testid) {
    const text = count === null ? "…" : String(count);
    const cls = count === null ? "badge badge-pending" : (count === 0 ? "badge badge-zero" : "badge");
    return h("span", { className: cls, "data-testid": testid }, text);
  }

  function isSelected(viewId, group) {
    const sel = state.selected;
    return !!sel && String(sel.viewId) === String(viewId) && (sel.group ?? null) === (group ?? null);
  }

  function menuButton(view) {
    return h("button", {
      type: "button", className: "row-menu", "data-testid": `view-menu-${view.id}`,
      "aria-label": `Options for view ${view.name}`, "aria-haspopup": "menu", "aria-expanded": "false",
      title: "Edit, rename, move or delete",
      onclick: (event) => openViewMenu(view.id, event.currentTarget),
    }, "⋯");
  }

  function viewRow(view, { group = null, label, marker = null, nested = false, menu = null } = {}) {
    const suffix = group === null ? `${view.id}` : `${view.id}-${group}`;
    const selected = isSelected(view.id, group);
    const button = h("button", {
      type: "button",
      className: `nav-row${selected ? " active" : ""}${nested ? " nested" : ""}`,
      "data-testid": `view-${suffix}`,
      "data-view-id": view.id,
      "data-group": group,
      "aria-current": selected ? "page" : null,
      onclick: () => select(view.id, group),
    },
    h("span", { className: "nav-label" }, label ?? view.name),
    marker,
    badge(countOf(view.id, group), `count-${suffix}`));
    return h("li", { className: menu ? "nav-item has-menu" : null }, button, menu);
  }

  function section(title, testid, rows) {
    return h("div", { className: "nav-section", "data-testid": testid },
      title ? h("h2", { className: "nav-heading" }, title) : null,
      h("ul", { className: "nav-list" }, rows));
  }

  function renderSidebar() {
    const root = $("sidebar");
    const views = sortedViews();
    const parts = [];
    const plainFolders = views.filter((v) => isFolder(v) && !v.group_by);
    parts.push(section(null, "section-folders", plainFolders.map((v) => viewRow(v))));
    for (const view of views.filter((v) => isFolder(v) && v.group_by)) {
      const rows = groupsOf(view).map((g) => viewRow(view, { group: g, label: groupLabel(view, g) }));
      if (!rows.length) rows.push(h("li", { className: "nav-empty" }, "None yet"));
      parts.push(section(view.name, `section-${view.id}`, rows));
    }
    const custom = views.filter((v) => !isFolder(v));
    const customRows = [];
    for (const view of custom) {
      const marker = view.owner_id !== null
        ? h("span", { className: "marker", title: "Only you see this view", "data-testid": `personal-${view.id}` }, "personal")
        : null;
      if (!view.group_by) {
        customRows.push(viewRow(view, { marker, menu: menuButton(view) }));
        continue;
      }
      customRows.push(h("li", { className: "nav-group has-menu", "data-testid": `view-${view.id}` },
        h("span", { className: "nav-label" }, view.name), marker, menuButton(view)));
      for (const g of groupsOf(view)) {
        customRows.push(viewRow(view, { group: g, label: groupLabel(view, g), nested: true }));
      }
    }
    if (!customRows.length) {
      customRows.push(h("li", { className: "nav-empty" }, "No custom views yet"));
    }
    parts.push(section("Views", "section-views", customRows));
    const fresh = h("div", {}, parts);
    const signature = sidebarSignature(fresh);
    if (signature === lastSidebarSignature) {
      // Same rows as shown: change the numbers only, so a click in progress is not lost to
      // a row being replaced under the pointer.
      const shown = root.querySelectorAll(".badge");
      fresh.querySelectorAll(".badge").forEach((badgeEl, i) => {
        if (shown[i].textContent !== badgeEl.textContent) shown[i].textContent = badgeEl.textContent;
        if (shown[i].className !== badgeEl.className) shown[i].className = badgeEl.className;
      });
      return;
    }
    lastSidebarSignature = signature;
    // Keep the keyboard where it was: the same row (or row menu) is focused again.
    const focused = root.contains(document.activeElement) ? document.activeElement.dataset.testid : null;
    root.replaceChildren(...fresh.childNodes);
    if (focused) {
      const again = root.querySelector(`[data-testid="${CSS.escape(focused)}"]`);
      if (again) again.focus();
    }
  }

  let lastSidebarSignature = null;

  // Everything about the sidebar's rows except their counts.
  function sidebarSignature(tree) {
    const parts = [];
    for (const el of tree.querySelectorAll("*")) {
      if (el.classList.contains("badge")) continue;
      const own = [...el.childNodes].filter((n) => n.nodeType === Node.TEXT_NODE).map((n) => n.data).join("");
      parts.push(`${el.tagName}|${el.className}|${el.getAttribute("data-testid") || ""}|${own}`);
    }
    return parts.join("\n");
  }

  // -- conversation list ------------------------------------------------------------------------

  let listGeneration = 0;
  let listTimer = null;

  function select(viewId, group) {
    state.selected = { viewId: Number(viewId), group: group ?? null };
    sessionStorage.setItem(STORE_SELECTED, JSON.stringify(state.selected));
    state.list = { items: [], nextCursor: null };
    renderSidebar();
    renderListHead();
    $("list-body").replaceChildren();
    show($("list-empty"), false);
    loadList({ fresh: true });
  }

  function scheduleListRefresh() {
    clearTimeout(listTimer);
    listTimer = setTimeout(() => loadList({}), LIST_REFRESH_MS);
  }

  function listPath(cursor) {
    const { viewId, group } = state.selected;
    const params = new URLSearchParams();
    if (group !== null) params.set("group", group);
    params.set("limit", String(PAGE_SIZE));
    if (cursor) params.set("cursor", cursor);
    return `/views/${viewId}/conversations?${params}`;
  }

  // Load the selected list: from the start (keeping as many rows as were shown), or the next
  // page when ``more``. Answers to superseded requests are dropped.
  async function loadList({ more = false, fresh = false }) {
    if (!state.selected) return;
    clearTimeout(listTimer);
    const generation = ++listGeneration;
    const want = fresh ? PAGE_SIZE : Math.max(PAGE_SIZE, state.list.items.length);
    let items = more ? state.list.items.slice() : [];
    let cursor = more ? state.list.nextCursor : null;
    $("load-more").disabled = true;
    try {
      let pages = 0;
      do {
        const page = await api("GET", listPath(cursor));
        items = items.concat(page.conversations || []);
        cursor = page.next_cursor || null;
        pages += 1;
      } while (!more && cursor && items.length < want && pages < 20);
    } catch (err) {
      if (generation !== listGeneration) return;
      $("load-more").disabled = false;
      if (err.status === 404) {
        notice("This view no longer exists.", "warn");
      } else {
        notice(`Could not load the list: ${err.message}`, "error");
      }
      return;
    }
    if (generation !== listGeneration) return;
    state.list = { items, nextCursor: cursor };
    renderList();
  }

  function listTitle() {
    const sel = state.selected;
    const view = sel && viewById(sel.viewId);
    if (!view) return { title: "Select a view", crumb: null };
    if (sel.group === null) return { title: view.name, crumb: null };
    return { title: groupLabel(view, sel.group), crumb: view.name };
  }

  function renderListHead() {
    const { title, crumb } = listTitle();
    const heading = $("list-title");
    heading.replaceChildren(...[
      crumb ? h("span", { className: "crumb" }, crumb, h("span", { "aria-hidden": "true" }, " › ")) : null,
      title,
    ].filter((part) => part !== null));
    document.title = `${title} · livecount`;
    const sel = state.selected;
    const count = sel ? countOf(sel.viewId, sel.group) : null;
    const el = $("list-count");
    el.textContent = count === null ? "…" : String(count);
    show(el, !!sel);
  }

  function renderList() {
    renderListHead();
    // Rows whose conversation did not change are kept as they are (with a tag being typed).
    const body = $("list-body");
    const kept = new Map([...body.children].map((row) => [`${row.dataset.testid}@${row.dataset.version}`, row]));
    body.replaceChildren(...state.list.items.map((conv) =>
      kept.get(`conv-${conv.id}@${conv.version}`) || conversationRow(conv)));
    const empty = $("list-empty");
    empty.textContent = "No conversations here. Nice work.";
    show(empty, !!state.selected && state.list.items.length === 0);
    const more = $("load-more");
    more.disabled = false;
    show(more, !!state.list.nextCursor);
  }

  function formatTime(iso) {
    if (!iso) return "";
    const date = new Date(iso);
    return date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  }

  function conversationRow(conv) {
    const mine = state.me && conv.assignee_id === state.me.id;
    const stateText = conv.state === "snoozed" && conv.snoozed_until
      ? `snoozed until ${formatTime(conv.snoozed_until)}` : conv.state;
    const assignee = conv.assignee_id === null
      ? h("span", { className: "muted" }, "Unassigned")
      : `${teammateName(conv.assignee_id)}${mine ? " (you)" : ""}`;
    const team = conv.team_id === null ? h("span", { className: "muted" }, "—") : teamName(conv.team_id);
    const tags = (conv.tags || []).map((t) => h("span", { className: "chip", "data-testid": "tag" }, t));
    const row = h("tr", { "data-testid": `conv-${conv.id}`, "data-version": conv.version },
      h("td", { className: "conv-id" },
        h("span", { className: "conv-number" }, `#${conv.id}`),
        conv.priority ? h("span", { className: "flag", "data-testid": "conv-priority", title: "Priority" }, "Priority") : null),
      h("td", {}, h("span", { className: `pill state-${conv.state}`, "data-testid": "conv-state" }, stateText)),
      h("td", { "data-testid": "conv-assignee" }, assignee),
      h("td", { "data-testid": "conv-team" }, team),
      h("td", { "data-testid": "conv-tags", className: "tags" }, tags),
      h("td", { "data-testid": "conv-channel", className: "channel" }, conv.channel),
      h("td", { className: "actions" }, actionButtons(conv)));
    return row;
  }

  function actionButtons(conv) {
    const button = (label, testid, onclick, primary = false) =>
      h("button", { type: "button", className: `btn btn-small${primary ? " btn-primary" : ""}`, "data-testid": testid, onclick }, label);
    const buttons = [];
    const mine = state.me && conv.assignee_id === state.me.id;
    if (conv.state === "open") {
      if (state.me && !mine) {
        buttons.push(button("Assign to me", "action-assign", () =>
          patchConversation(conv, { assignee_id: state.me.id }, "assigned to you")));
      }
      buttons.push(button("Snooze 1 h", "action-snooze", () =>
        patchConversation(conv, {
          state: "snoozed",
          snoozed_until: new Date(Date.now() + 3600 * 1000).toISOString(),
        }, "snoozed for an hour")));
      buttons.push(button("Close", "action-close", () =>
        patchConversation(conv, { state: "closed" }, "closed"), true));
    } else {
      buttons.push(button("Reopen", "action-reopen", () =>
        patchConversation(conv, { state: "open", snoozed_until: null }, "reopened")));
      if (conv.state === "snoozed") {
        buttons.push(button("Close", "action-close", () =>
          patchConversation(conv, { state: "closed" }, "closed")));
      }
    }
    buttons.push(button("Tag…", "action-tag", (event) => startTagging(conv, event.currentTarget)));
    return h("div", { className: "action-group" }, buttons);
  }

  function startTagging(conv, anchor) {
    const group = anchor.closest(".action-group");
    const input = h("input", {
      className: "tag-input", "data-testid": "tag-input", placeholder: "New tag", maxlength: 100,
      "aria-label": `Tag for conversation ${conv.id}`,
    });
    const cancel = () => group.replaceWith(actionButtons(conv));
    const submit = () => {
      const tag = input.value.trim();
      if (!tag) return cancel();
      if ((conv.tags || []).includes(tag)) {
        notice(`#${conv.id} is already tagged “${tag}”.`);
        return cancel();
      }
      patchConversation(conv, { tags: [...(conv.tags || []), tag] }, `tagged “${tag}”`);
    };
    input.addEventListener("keydown", (event) => {
      if (event.key === "Enter") { event.preventDefault(); submit(); }
      if (event.key === "Escape") { event.preventDefault(); cancel(); }
    });
    const form = h("div", { className: "action-group" }, input,
      h("button", { type: "button", className: "btn btn-small btn-primary", "data-testid": "tag-submit", onclick: submit }, "Add"),
      h("button", { type: "button", className: "btn btn-small", onclick: cancel }, "Cancel"));
    group.replaceWith(form);
    input.focus();
  }

  function replaceConversation(conv) {
    const index = state.list.items.findIndex((c) => c.id === conv.id);
    if (index >= 0) state.list.items[index] = conv;
    const row = document.querySelector(`[data-testid="conv-${conv.id}"]`);
    if (row) row.replaceWith(conversationRow(conv));
  }

  // A merge patch guarded by the version the row shows. On 412 someone else changed it first:
  // show their version and say so, rather than overwrite their change.
  async function patchConversation(conv, patch, done) {
    const row = document.querySelector(`[data-testid="conv-${conv.id}"]`);
    if (row) row.querySelectorAll("button, input").forEach((el) => { el.disabled = true; });
    try {
      const updated = await api("PATCH", `/conversations/${conv.id}`, { body: patch, ifMatch: conv.version });
      replaceConversation(updated);
      notice(`Conversation #${conv.id} ${done}.`, "success");
    } catch (err) {
      if (err.status === 412) {
        try {
          replaceConversation(await api("GET", `/conversations/${conv.id}`));
        } catch (reloadError) {
          scheduleListRefresh();
        }
        notice(`Conversation #${conv.id} was changed by someone else meanwhile; it has been reloaded, please try again.`, "warn");
      } else {
        replaceConversation(conv);
        notice(`Could not update #${conv.id}: ${err.message}`, "error");
      }
    }
  }

  // -- live stream ------------------------------------------------------------------------------

  const live = { socket: null, attempt: 0, timer: null, stopped: true };

  function setConnection(status) {
    const el = $("conn-status");
    el.dataset.state = status;
    el.className = `conn conn-${status}`;
    el.textContent = { live: "live", reconnecting: "reconnecting…", connecting: "connecting…" }[status];
  }

  function streamUrl() {
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const params = new URLSearchParams({ token: state.token });
    if (state.epoch !== null && state.seq !== null && live.attempt <= RESUME_ATTEMPTS) {
      params.set("epoch", state.epoch);
      params.set("since", String(state.seq));
    }
    return `${scheme}://${location.host}/api/workspaces/${encodeURIComponent(state.ws)}/ws?${params}`;
  }

  function connect() {
    clearTimeout(live.timer);
    live.stopped = false;
    let socket;
    try {
      socket = new WebSocket(streamUrl());
    } catch (err) {
      retryLater(backoffDelay());
      return;
    }
    live.socket = socket;
    socket.onopen = () => {
      if (live.socket === socket) setConnection("live");
    };
    socket.onmessage = (event) => {
      if (live.socket !== socket) return;
      let message;
      try {
        message = JSON.parse(event.data);
      } catch (err) {
        return;
      }
      handleMessage(socket, message);
    };
    socket.onclose = () => {
      if (live.socket !== socket) return;
      live.socket = null;
      if (!live.stopped) retryLater(backoffDelay());
    };
  }

  function disconnect() {
    live.stopped = true;
    clearTimeout(live.timer);
    const socket = live.socket;
    live.socket = null;
    if (socket) socket.close(1000);
  }

  // Exponential backoff with "equal jitter": half the step fixed, half random, so a fleet of
  // clients dropped together does not come back in lockstep.
  function backoffDelay() {
    const step = Math.min(BACKOFF_MAX_MS, BACKOFF_BASE_MS * 2 ** live.attempt);
    live.attempt += 1;
    return step / 2 + Math.random() * (step / 2);
  }

  function retryLater(delay) {
    setConnection("reconnecting");
    clearTimeout(live.timer);
    live.timer = setTimeout(() => { if (!live.stopped) connect(); }, delay);
  }

  function handleMessage(socket, message) {
    switch (message.type) {
      case "snapshot":
        live.attempt = 0;
        applySnapshot(message);
        break;
      case "delta":
        if ((message.epoch ?? null) !== state.epoch || state.epoch === null) {
          // Another numbering than the snapshot's (or no snapshot yet): its seqs and values
          // cannot be merged with what the page holds. Start over from a snapshot.
          resync(socket);
          break;
        }
        live.attempt = 0;
        applyDelta(message);
        break;
      case "views":
        applyViews(message.views || []);
        break;
      case "reconnect": {
        // The server is draining this connection: go elsewhere after retry_ms (+ jitter).
        live.socket = null;
        socket.close(1000);
        const wait = Number(message.retry_ms) || 0;
        retryLater(wait + Math.random() * Math.min(1000, wait / 2 + 50));
        break;
      }
      default:
        break;
    }
  }

  // Drop this connection and what it resumes from; the next one starts with a snapshot.
  function resync(socket) {
    live.socket = null;
    socket.close(1000);
    state.epoch = null;
    state.seq = null;
    retryLater(backoffDelay());
  }

  function applySnapshot(message) {
    state.counts = message.counts || {};
    state.epoch = typeof message.epoch === "string" && message.epoch ? message.epoch : null;
    state.seq = message.seq;
    const unknown = Object.keys(state.counts).some((id) => !viewById(id));
    renderSidebar();
    renderListHead();
    if (unknown) loadViews().then(renderSidebar).catch(() => {});
    if (state.selected) scheduleListRefresh();
  }

  function applyDelta(message) {
    let touchesSelection = false;
    const sel = state.selected;
    for (const [viewId, value] of Object.entries(message.counts || {})) {
      if (typeof value === "number") {
        state.counts[viewId] = value;
        if (sel && String(sel.viewId) === viewId && sel.group === null) touchesSelection = true;
        continue;
      }
      const current = state.counts[viewId];
      const groups = (current && typeof current === "object") ? { ...current } : {};
      for (const [group, n] of Object.entries(value || {})) {
        if (n === 0) delete groups[group];
        else groups[group] = n;
        if (sel && String(sel.viewId) === viewId && sel.group === group) touchesSelection = true;
      }
      state.counts[viewId] = groups;
    }
    state.seq = message.seq;
    if (Object.keys(state.counts).some((id) => !viewById(id))) {
      loadViews().then(renderSidebar).catch(() => {});
    }
    renderSidebar();
    renderListHead();
    if (touchesSelection) scheduleListRefresh();
  }

  function applyViews(views) {
    const before = new Map(state.views.map((v) => [String(v.id), v.version]));
    setViews(views);
    for (const view of state.views) {
      const key = String(view.id);
      // A view's nonzero counters arrive in a delta; until then (and when they are all zero)
      // it counts nothing.
      if (state.counts[key] === undefined) state.counts[key] = view.group_by ? {} : 0;
    }
    const sel = state.selected;
    if (sel && !viewById(sel.viewId)) {
      notice("The view you were looking at was removed.", "warn");
      selectDefault();
      return;
    }
    renderSidebar();
    if (sel && before.get(String(sel.viewId)) !== viewById(sel.viewId).version) {
      scheduleListRefresh();
    }
    renderListHead();
  }

  // -- the view dialog: visual builder, JSON tab, live preview ---------------------------------

  const editor = {
    mode: "create", // or "edit"
    view: null, // the view being edited
    builder: null,
    tab: "builder",
    stale: null, // why the JSON tab's text cannot be shown in the builder, or null
    jsonTimer: null,
    preview: { timer: null, retryTimer: null, inflight: false, again: false, generation: 0, last: null },
  };

  const pretty = (filter) => jsonText(filter, 2);

  // Values the pickers suggest: what the page has seen in views and lists (free text is allowed).
  function collectValues(field, extra) {
    const found = new Set(extra);
    const walk = (node) => {
      if (!node || typeof node !== "object") return;
      if (Array.isArray(node)) { node.forEach(walk); return; }
      if (node.field === field) {
        for (const v of [].concat(node.value ?? [])) if (typeof v === "string" && v) found.add(v);
      }
      if (typeof node.operator === "string" && ["AND", "OR", "NOT"].includes(node.operator)) walk(node.value);
    };
    state.views.forEach((v) => walk(v.filter));
    for (const conv of state.list.items) {
      for (const v of [].concat(conv[field] ?? [])) if (typeof v === "string" && v) found.add(v);
    }
    return [...found].sort((a, b) => a.localeCompare(b));
  }

  function builderContext() {
    return {
      teammates: () => [...state.teammates.values()],
      teams: () => [...state.teams.values()],
      me: () => (state.me ? state.me.id : null),
      tags: () => collectValues("tags", []),
      channels: () => collectValues("channel", KNOWN_CHANNELS),
      onChange: builderChanged,
    };
  }

  function builderChanged() {
    editor.stale = null;
    $("view-filter").value = pretty(editor.builder.filter());
    setJsonStatus("In sync with the builder.");
    renderStale();
    schedulePreview();
  }

  function setJsonStatus(text) {
    $("json-status").textContent = text;
  }

  function renderStale() {
    const note = $("builder-stale");
    note.textContent = editor.stale
      ? `The builder cannot show this filter (${editor.stale}). Edit it in the JSON tab; the builder takes it back once it can.`
      : "";
    show(note, !!editor.stale);
    show($("builder"), !editor.stale);
  }

  // The JSON tab's text → the builder, when the builder can show it.
  function syncFromJson() {
    clearTimeout(editor.jsonTimer);
    editor.jsonTimer = null;
    let parsed;
    try {
      parsed = JSON.parse($("view-filter").value);
    } catch (err) {
      editor.stale = "it is not valid JSON";
      setJsonStatus(`Not valid JSON: ${err.message}`);
      renderStale();
      return;
    }
    try {
      editor.builder.set(parsed);
      editor.stale = null;
      setJsonStatus("The builder shows this filter.");
    } catch (err) {
      if (!(err instanceof window.LivecountBuilder.Unrepresentable)) throw err;
      editor.stale = err.message;
      setJsonStatus(`Only in JSON: ${err.message}.`);
    }
    renderStale();
  }

  function groupByValue() {
    const choice = $("view-group-by").value;
    if (!choice) return null;
    if (choice === "custom") return `custom.${$("view-group-key").value.trim()}`;
    return choice;
  }

  function setGroupBy(value) {
    const custom = typeof value === "string" && value.startsWith("custom.");
    $("view-group-by").value = custom ? "custom" : (value || "");
    $("view-group-key").value = custom ? value.slice(7) : "";
    show($("view-group-key-label"), custom);
  }

  // What to preview or save: {filter} or {error} (text) or {problem} (an unfinished builder row).
  function currentFilter() {
    if (editor.tab === "json" || editor.stale) {
      if (editor.jsonTimer) syncFromJson();
      try {
        return { filter: JSON.parse($("view-filter").value) };
      } catch (err) {
        return { error: `filter: not valid JSON (${err.message})` };
      }
    }
    const problem = editor.builder.problem();
    return problem ? { problem } : { filter: editor.builder.filter() };
  }

  // The path a server message starts with (``filter.value[1].operator: …``), if any.
  function messagePath(message) {
    const match = /^([A-Za-z_][\w.[\]]*): /.exec(message || "");
    return match ? match[1] : null;
  }

  function markFromMessage(message) {
    const path = messagePath(message);
    const groupBy = path === "group_by";
    $("view-group-by").setAttribute("aria-invalid", groupBy ? "true" : "false");
    if (path && path.startsWith("filter") && !editor.stale) editor.builder.mark(path, message);
    else editor.builder.unmark();
  }

  function schedulePreview(delay = PREVIEW_DEBOUNCE_MS) {
    const p = editor.preview;
    clearTimeout(p.timer);
    p.generation += 1;
    if (p.inflight) p.again = true;
    show($("view-error"), false); // about what was submitted; the filter has changed since
    p.timer = setTimeout(runPreview, delay);
    const el = $("preview");
    if (el.dataset.state === "ok") el.dataset.state = "pending";
  }

  async function runPreview() {
    const p = editor.preview;
    clearTimeout(p.timer);
    clearTimeout(p.retryTimer);
    if (!$("view-dialog").open) return;
    if (p.inflight) { p.again = true; return; }
    const current = currentFilter();
    if (current.error) {
      renderPreview({ kind: "invalid", message: current.error });
      editor.builder.unmark();
      return;
    }
    if (current.problem) {
      renderPreview({ kind: "incomplete", message: current.problem.message });
      editor.builder.mark(current.problem.node, current.problem.message, "incomplete");
      return;
    }
    const groupBy = groupByValue();
    const body = { filter: current.filter };
    if (groupBy) body.group_by = groupBy;
    const generation = p.generation;
    p.inflight = true;
    p.again = false;
    renderPreview({ kind: "loading" });
    try {
      const data = await api("POST", "/views/preview", { body });
      if (generation === p.generation && !p.again) {
        renderPreview({ kind: "ok", data, groupBy });
        markFromMessage(null);
      }
    } catch (err) {
      if (generation === p.generation && !p.again) {
        if (err.status === 429) {
          const wait = Math.max(1, err.retryAfter || 1);
          renderPreview({ kind: "limited", message: `Counting paused: too many previews. Trying again in ${wait} s.` });
          p.retryTimer = setTimeout(runPreview, wait * 1000);
        } else if (err.status === 400) {
          renderPreview({ kind: "invalid", message: err.message });
          markFromMessage(err.message);
        } else {
          renderPreview({ kind: "error", message: `Could not count: ${err.message}` });
        }
      }
    } finally {
      p.inflight = false;
      if (p.again && $("view-dialog").open) {
        p.again = false;
        runPreview();
      }
    }
  }

  function renderPreview(st) {
    const el = $("preview");
    el.dataset.state = st.kind;
    if (st.kind === "loading") {
      el.classList.add("busy");
      if (!el.firstChild) el.append(h("span", { className: "muted" }, "Counting…"));
      return;
    }
    el.classList.remove("busy");
    editor.preview.last = st;
    if (st.kind !== "ok") {
      const label = st.kind === "incomplete" ? "Not finished yet" : (st.kind === "invalid" ? "Not valid yet" : "Preview");
      el.replaceChildren(h("span", { className: `preview-flag preview-${st.kind}` }, label),
        h("span", { className: "preview-message", "data-testid": "preview-error" }, st.message));
      return;
    }
    if (typeof st.data.count === "number") {
      const n = st.data.count;
      el.replaceChildren(h("span", { className: "preview-num", "data-testid": "preview-count" }, String(n)),
        h("span", {}, n === 1 ? " conversation matches now" : " conversations match now"),
        h("span", { className: "muted" }, state.me ? " (as you see them)" : ""));
      return;
    }
    const groups = Object.entries(st.data.counts || {}).sort((a, b) => b[1] - a[1] || a[0].localeCompare(b[0]));
    const like = { group_by: st.groupBy };
    const shown = groups.slice(0, 6).map(([g, n]) => h("li", { "data-testid": `preview-group-${g}` },
      h("span", {}, String(groupLabel(like, g))), " ", h("b", {}, String(n))));
    el.replaceChildren(h("span", { className: "preview-num", "data-testid": "preview-count" }, String(groups.length)),
      h("span", {}, ` group${groups.length === 1 ? "" : "s"}`),
      groups.length ? h("ul", { className: "preview-groups" }, shown,
        groups.length > 6 ? h("li", { className: "muted" }, `+${groups.length - 6} more`) : null) : null);
  }

  function selectTab(tab, { focus = false } = {}) {
    if (tab === "builder" && editor.tab === "json") syncFromJson();
    if (tab === "json" && editor.tab === "builder" && !editor.stale) {
      $("view-filter").value = pretty(editor.builder.filter());
      setJsonStatus("In sync with the builder.");
    }
    editor.tab = tab;
    for (const name of ["builder", "json"]) {
      const button = $(`tab-${name}`);
      button.setAttribute("aria-selected", String(name === tab));
      button.tabIndex = name === tab ? 0 : -1;
      show($(`panel-${name}`), name === tab);
    }
    renderStale();
    if (focus) $(`tab-${tab}`).focus();
  }

  function openViewDialog(view = null) {
    const builderApi = window.LivecountBuilder;
    editor.mode = view ? "edit" : "create";
    editor.view = view;
    $("view-form").reset();
    show($("view-error"), false);
    $("view-dialog-title").textContent = view ? `Edit view “${view.name}”` : "New view";
    $("view-form").querySelector("[type=submit]").textContent = view ? "Save changes" : "Create view";
    $("view-name").value = view ? view.name : "";
    setGroupBy(view ? view.group_by : null);
    $("view-group-by").setAttribute("aria-invalid", "false");
    const personal = !!view && view.owner_id !== null;
    $("view-personal").checked = personal;
    $("view-shared").checked = !personal;
    $("view-personal").disabled = !!view || !state.me;
    $("view-shared").disabled = !!view;
    const note = $("visibility-note");
    note.textContent = view ? "Who sees a view is chosen when it is created."
      : (state.me ? "" : "The admin token has no personal views.");
    show(note, !!note.textContent);
    if (!editor.builder) editor.builder = builderApi.create($("builder"), builderContext());
    editor.stale = null;
    if (view) {
      try {
        editor.builder.set(view.filter);
      } catch (err) {
        if (!(err instanceof builderApi.Unrepresentable)) throw err;
        editor.stale = err.message;
      }
    } else {
      editor.builder.clear();
    }
    $("view-filter").value = pretty(view ? view.filter : editor.builder.filter());
    setJsonStatus(editor.stale ? `Only in JSON: ${editor.stale}.` : "In sync with the builder.");
    editor.tab = editor.stale ? "json" : "builder";
    selectTab(editor.tab);
    $("preview").replaceChildren();
    editor.preview.last = null;
    $("view-dialog").showModal();
    $("view-name").focus();
    schedulePreview(0);
  }

  function closedViewDialog() {
    const p = editor.preview;
    clearTimeout(p.timer);
    clearTimeout(p.retryTimer);
    clearTimeout(editor.jsonTimer);
    editor.jsonTimer = null;
    p.generation += 1;
    p.again = false;
    const view = editor.view;
    const back = view && document.querySelector(`[data-testid="view-menu-${view.id}"]`);
    (back || $("new-view")).focus();
  }

  function replaceView(view) {
    const index = state.views.findIndex((v) => v.id === view.id);
    if (index >= 0) state.views[index] = { ...state.views[index], ...view };
    else state.views.push(view);
  }

  async function submitView(event) {
    event.preventDefault();
    const error = $("view-error");
    show(error, false);
    const current = currentFilter();
    if (current.error || current.problem) {
      error.textContent = current.error || current.problem.message;
      show(error, true);
      if (current.problem) {
        editor.builder.mark(current.problem.node, current.problem.message);
        editor.builder.focus(current.problem.node);
      }
      return;
    }
    const body = { name: $("view-name").value.trim(), filter: current.filter, group_by: groupByValue() };
    const editing = editor.mode === "edit" ? editor.view : null;
    if (!editing) body.personal = $("view-personal").checked;
    const submit = $("view-form").querySelector("[type=submit]");
    submit.disabled = true;
    try {
      const view = editing
        ? await api("PUT", `/views/${editing.id}`, { body })
        : await api("POST", "/views", { body });
      replaceView(view);
      $("view-dialog").close();
      renderSidebar();
      if (editing) {
        if (state.selected && state.selected.viewId === view.id) {
          renderListHead();
          scheduleListRefresh();
        }
        notice(`View “${view.name}” saved.`, "success");
      } else {
        select(view.id, null);
        notice(`View “${view.name}” created.`, "success");
      }
    } catch (err) {
      error.textContent = err.status === 404 && editing
        ? "This view no longer exists: someone deleted it meanwhile."
        : err.message;
      show(error, true);
      if (err.status === 400) markFromMessage(err.message);
    } finally {
      submit.disabled = false;
    }
  }

  function wireViewDialog() {
    const groupBy = $("view-group-by");
    fillSelect(groupBy, window.LivecountBuilder.GROUP_BY);
    groupBy.addEventListener("change", () => {
      show($("view-group-key-label"), groupBy.value === "custom");
      if (groupBy.value === "custom") $("view-group-key").focus();
      schedulePreview();
    });
    $("view-group-key").addEventListener("input", () => schedulePreview());
    $("view-filter").addEventListener("input", () => {
      clearTimeout(editor.jsonTimer);
      editor.jsonTimer = setTimeout(syncFromJson, JSON_SYNC_MS);
      schedulePreview();
    });
    for (const name of ["builder", "json"]) {
      $(`tab-${name}`).addEventListener("click", () => selectTab(name));
    }
    $("view-form").querySelector("[role=tablist]").addEventListener("keydown", (event) => {
      const order = ["builder", "json"];
      let next = null;
      if (event.key === "ArrowRight" || event.key === "ArrowLeft") {
        next = order[(order.indexOf(editor.tab) + 1) % order.length];
      } else if (event.key === "Home") next = "builder";
      else if (event.key === "End") next = "json";
      if (next) {
        event.preventDefault();
        selectTab(next, { focus: true });
      }
    });
    $("view-form").addEventListener("submit", submitView);
    $("view-dialog").addEventListener("close", closedViewDialog);
  }

  // -- managing views: the row menu, rename, reorder, delete -----------------------------------

  const menu = { viewId: null };

  function customViews() {
    return sortedViews().filter((v) => !isFolder(v));
  }

  function menuTrigger(viewId) {
    return document.querySelector(`[data-testid="view-menu-${viewId}"]`);
  }

  function menuItems() {
    return [...$("view-menu").querySelectorAll("[role=menuitem]")].filter((b) => !b.disabled);
  }

  function openViewMenu(viewId, trigger) {
    if (menu.viewId === viewId && !$("view-menu").hidden) { closeViewMenu(true); return; }
    closeViewMenu(false);
    const custom = customViews();
    const index = custom.findIndex((v) => v.id === viewId);
    if (index < 0) return;
    menu.viewId = viewId;
    const el = $("view-menu");
    el.querySelector("[data-action=up]").disabled = index === 0;
    el.querySelector("[data-action=down]").disabled = index === custom.length - 1;
    el.setAttribute("aria-label", `Options for view ${custom[index].name}`);
    show(el, true);
    const rect = trigger.getBoundingClientRect();
    const width = el.offsetWidth;
    const height = el.offsetHeight;
    const left = Math.max(8, Math.min(rect.right - width, window.innerWidth - width - 8));
    const below = rect.bottom + 4 + height <= window.innerHeight - 8;
    el.style.left = `${left}px`;
    el.style.top = `${below ? rect.bottom + 4 : Math.max(8, rect.top - height - 4)}px`;
    trigger.setAttribute("aria-expanded", "true");
    menuItems()[0].focus();
  }

  function closeViewMenu(focusTrigger) {
    const el = $("view-menu");
    if (el.hidden) return;
    show(el, false);
    const trigger = menu.viewId !== null ? menuTrigger(menu.viewId) : null;
    if (trigger) {
      trigger.setAttribute("aria-expanded", "false");
      if (focusTrigger) trigger.focus();
    }
  }

  function wireViewMenu() {
    const el = $("view-menu");
    el.addEventListener("keydown", (event) => {
      const items = menuItems();
      const at = items.indexOf(document.activeElement);
      let next = null;
      if (event.key === "ArrowDown") next = items[(at + 1) % items.length];
      else if (event.key === "ArrowUp") next = items[(at - 1 + items.length) % items.length];
      else if (event.key === "Home") next = items[0];
      else if (event.key === "End") next = items[items.length - 1];
      else if (event.key === "Escape") { event.preventDefault(); closeViewMenu(true); return; }
      else if (event.key === "Tab") { closeViewMenu(false); return; }
      if (next) { event.preventDefault(); next.focus(); }
    });
    el.addEventListener("click", (event) => {
      const item = event.target.closest("[role=menuitem]");
      if (!item || item.disabled) return;
      const view = viewById(menu.viewId);
      closeViewMenu(item.dataset.action === "up" || item.dataset.action === "down");
      if (!view) return;
      switch (item.dataset.action) {
        case "edit": openViewDialog(view); break;
        case "rename": openRenameDialog(view); break;
        case "up": moveView(view, -1); break;
        case "down": moveView(view, 1); break;
        case "delete": openDeleteDialog(view); break;
        default: break;
      }
    });
    document.addEventListener("mousedown", (event) => {
      if (el.hidden || el.contains(event.target)) return;
      if (event.target.closest && event.target.closest(".row-menu")) return;
      closeViewMenu(false);
    });
    window.addEventListener("resize", () => closeViewMenu(false));
  }

  // Swap a custom view with its neighbour: the two take each other's positions (PUT with
  // position); the other pages follow through the stream's views message.
  async function moveView(view, delta) {
    const custom = customViews();
    const i = custom.findIndex((v) => v.id === view.id);
    const j = i + delta;
    if (i < 0 || j < 0 || j >= custom.length) return;
    const order = custom.slice();
    [order[i], order[j]] = [order[j], order[i]];
    const positions = custom.map((v) => v.position).sort((a, b) => a - b);
    for (let k = 1; k < positions.length; k += 1) {
      if (positions[k] <= positions[k - 1]) positions[k] = positions[k - 1] + 1;
    }
    const changes = order.map((v, k) => [v, positions[k]]).filter(([v, p]) => v.position !== p);
    for (const [v, p] of changes) replaceView({ ...v, position: p });
    renderSidebar();
    const trigger = menuTrigger(view.id);
    if (trigger) trigger.focus();
    try {
      for (const [v, p] of changes) {
        const updated = await api("PUT", `/views/${v.id}`, {
          body: { name: v.name, filter: v.filter, group_by: v.group_by, position: p },
        });
        replaceView(updated);
      }
      renderSidebar();
      notice(`Moved “${view.name}” ${delta < 0 ? "up" : "down"}.`, "success");
    } catch (err) {
      notice(`Could not move “${view.name}”: ${err.message}`, "error");
      loadViews().then(renderSidebar).catch(() => {});
    }
  }

  let renaming = null;

  function openRenameDialog(view) {
    renaming = view;
    $("rename-form").reset();
    show($("rename-error"), false);
    $("rename-name").value = view.name;
    $("rename-dialog").showModal();
    $("rename-name").select();
  }

  async function submitRename(event) {
    event.preventDefault();
    const view = renaming && viewById(renaming.id);
    const error = $("rename-error");
    show(error, false);
    if (!view) {
      error.textContent = "This view no longer exists.";
      show(error, true);
      return;
    }
    const name = $("rename-name").value.trim();
    try {
      const updated = await api("PUT", `/views/${view.id}`, {
        body: { name, filter: view.filter, group_by: view.group_by },
      });
      replaceView(updated);
      $("rename-dialog").close();
      renderSidebar();
      renderListHead();
      notice(`Renamed to “${updated.name}”.`, "success");
    } catch (err) {
      error.textContent = err.message;
      show(error, true);
    }
  }

  let deleting = null;

  function openDeleteDialog(view) {
    deleting = view;
    show($("delete-error"), false);
    $("delete-title").textContent = `Delete “${view.name}”?`;
    $("delete-text").textContent = view.owner_id === null
      ? "This view is shared: it disappears for everyone in the workspace. Conversations are not affected."
      : "This is your personal view. Conversations are not affected.";
    $("delete-dialog").showModal();
    $("delete-dialog").querySelector("[data-testid=delete-cancel]").focus();
  }

  async function submitDelete(event) {
    event.preventDefault();
    const view = deleting;
    const error = $("delete-error");
    try {
      await api("DELETE", `/views/${view.id}`);
    } catch (err) {
      if (err.status !== 404) {
        error.textContent = err.message;
        show(error, true);
        return;
      }
    }
    deleting = null;
    $("delete-dialog").close();
    state.views = state.views.filter((v) => v.id !== view.id);
    delete state.counts[String(view.id)];
    if (state.selected && state.selected.viewId === view.id) selectDefault();
    renderSidebar();
    notice(`View “${view.name}” deleted.`, "success");
    $("new-view").focus();
  }

  function wireManagement() {
    wireViewMenu();
    $("rename-form").addEventListener("submit", submitRename);
    $("delete-form").addEventListener("submit", submitDelete);
    for (const id of ["rename-dialog", "delete-dialog"]) {
      $(id).addEventListener("close", () => {
        const view = id === "rename-dialog" ? renaming : deleting;
        const trigger = view && menuTrigger(view.id);
        if (trigger) trigger.focus();
      });
    }
  }

  // -- the conversation dialog ------------------------------------------------------------------

  function fillSelect(select, options) {
    select.replaceChildren(...options.map(([value, label]) => h("option", { value }, label)));
  }

  function openConversationDialog() {
    $("conversation-form").reset();
    show($("conversation-error"), false);
    const byName = (a, b) => a.name.localeCompare(b.name);
    fillSelect($("conv-team"), [["", "No team"],
      ...[...state.teams.values()].sort(byName).map((t) => [t.id, t.name])]);
    fillSelect($("conv-assignee"), [["", "Unassigned"],
      ...[...state.teammates.values()].sort(byName).map((t) =>
        [t.id, state.me && t.id === state.me.id ? `${t.name} (you)` : t.name])]);
    const sel = state.selected && viewById(state.selected.viewId);
    if (sel && sel.group_by === "team_id" && state.selected.group !== null) {
      $("conv-team").value = state.selected.group;
    }
    $("conversation-dialog").showModal();
  }

  async function submitConversation(event) {
    event.preventDefault();
    const error = $("conversation-error");
    show(error, false);
    const team = $("conv-team").value;
    const assignee = $("conv-assignee").value;
    const tags = [...new Set($("conv-tags").value.split(",").map((t) => t.trim()).filter(Boolean))];
    const body = {
      channel: $("conv-channel").value.trim() || "chat",
      priority: $("conv-priority").checked,
      tags,
      waiting_since: new Date().toISOString(),
    };
    if (team) body.team_id = Number(team);
    if (assignee) body.assignee_id = Number(assignee);
    const submit = $("conversation-form").querySelector("[type=submit]");
    submit.disabled = true;
    try {
      const conv = await api("POST", "/conversations", { body });
      $("conversation-dialog").close();
      notice(`Conversation #${conv.id} created.`, "success");
    } catch (err) {
      error.textContent = err.message;
      show(error, true);
    } finally {
      submit.disabled = false;
    }
  }

  // -- sign-in and start-up ---------------------------------------------------------------------

  // ?ws=&token= (the links the demo prints) win over the session; the token then leaves the
  // address bar at once, so it is neither bookmarked nor shared by copying the URL.
  function readCredentials() {
    const url = new URL(location.href);
    const ws = url.searchParams.get("ws");
    const token = url.searchParams.get("token");
    if (ws && token) {
      sessionStorage.setItem(STORE_WS, ws);
      sessionStorage.setItem(STORE_TOKEN, token);
      sessionStorage.removeItem(STORE_SELECTED);
    }
    if (token !== null) {
      url.searchParams.delete("token");
      history.replaceState(null, "", url.pathname + url.search + url.hash);
    }
    const storedWs = sessionStorage.getItem(STORE_WS);
    const storedToken = sessionStorage.getItem(STORE_TOKEN);
    if (storedWs && storedToken && (!ws || ws === storedWs)) return { ws: storedWs, token: storedToken };
    return { ws: ws || storedWs || "", token: null };
  }

  function showLogin(ws, message) {
    disconnect();
    show($("app"), false);
    show($("login"), true);
    $("login-ws").value = ws || "";
    $("login-token").value = "";
    const error = $("login-error");
    error.textContent = message || "";
    show(error, !!message);
    (ws ? $("login-token") : $("login-ws")).focus();
  }

  function signOut() {
    sessionStorage.removeItem(STORE_TOKEN);
    sessionStorage.removeItem(STORE_SELECTED);
    state.token = null;
    showLogin(state.ws, null);
  }

  function selectDefault() {
    const views = sortedViews();
    const saved = JSON.parse(sessionStorage.getItem(STORE_SELECTED) || "null");
    if (saved && viewById(saved.viewId)) return select(saved.viewId, saved.group ?? null);
    // The admin token is nobody: skip the folders about "me".
    const aboutMe = (v) => JSON.stringify(v.filter || {}).includes('"$me"');
    const first = views.find((v) => !v.group_by && (state.me || !aboutMe(v)));
    if (first) select(first.id, null);
  }

  async function start(ws, token) {
    state.ws = ws;
    state.token = token;
    state.counts = {};
    state.epoch = null;
    state.seq = null;
    state.selected = null;
    try {
      const me = await api("GET", "/me");
      state.me = me && typeof me.id === "number" ? me : null;
      await Promise.all([loadTeammates(), loadTeams(), loadViews()]);
    } catch (err) {
      if (err.status === 401 || err.status === 403 || err.status === 404) {
        sessionStorage.removeItem(STORE_TOKEN);
        showLogin(ws, err.status === 401
          ? "That token was not accepted. Check it and try again."
          : `Workspace ${ws} is not available with this token.`);
      } else {
        showLogin(ws, `Could not sign in: ${err.message}`);
      }
      return;
    }
    show($("login"), false);
    show($("app"), true);
    $("me-name").textContent = state.me ? state.me.name : "Admin";
    renderSidebar();
    selectDefault();
    setConnection("connecting");
    live.attempt = 0;
    connect();
  }

  function wire() {
    $("login-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const ws = $("login-ws").value.trim();
      const token = $("login-token").value.trim();
      if (!ws || !token) return;
      sessionStorage.setItem(STORE_WS, ws);
      sessionStorage.setItem(STORE_TOKEN, token);
      const url = new URL(location.href);
      url.searchParams.set("ws", ws);
      history.replaceState(null, "", url.pathname + url.search);
      start(ws, token);
    });
    $("sign-out").addEventListener("click", signOut);
    $("new-view").addEventListener("click", () => openViewDialog(null));
    wireViewDialog();
    wireManagement();
    $("new-conversation").addEventListener("click", openConversationDialog);
    $("conversation-form").addEventListener("submit", submitConversation);
    $("load-more").addEventListener("click", () => loadList({ more: true }));
    for (const button of document.querySelectorAll("dialog [data-close]")) {
      button.addEventListener("click", () => button.closest("dialog").close());
    }
    window.addEventListener("online", () => {
      if (!live.stopped && !live.socket) { live.attempt = 0; connect(); }
    });
  }

  document.addEventListener("DOMContentLoaded", () => {
    wire();
    const { ws, token } = readCredentials();
    if (ws && token) start(ws, token);
    else showLogin(ws, null);
  });
})();

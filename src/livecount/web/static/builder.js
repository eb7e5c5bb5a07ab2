// livecount view builder: the filter language of DESIGN §3 as field → operator → value rows in
// nested AND/OR/NOT groups, with the operators each field type allows (the same table as
// livecount.filters.parse.OPS_BY_KIND) and value inputs that fit the field.
//
// The builder edits a model and serializes it back to the filter JSON. Loading keeps whatever
// it does not change exactly as it was (values stay raw JSON until edited; a NOT written as a
// bare object or a one-item list stays so; a lone comparison stays a lone comparison), so a
// saved view's filter goes through the builder and comes out equal.
//
// window.LivecountBuilder = { create, load, serialize, OPS_BY_KIND, FIELDS, ... }.
// Text reaches the DOM through textContent and attributes only.
"use strict";

(() => {
  const SCALAR = ["=", "!=", "IN", "NIN"];
  const ORDER = ["<", "<=", ">", ">="];
  const TEXT = ["~", "!~", "^", "$"];
  const NULL = ["is null", "is not null"];
  const SET = ["contains", "not_contains"];
  const OPS_BY_KIND = {
    string: [...SCALAR, ...ORDER, ...TEXT, ...NULL],
    teammate: [...SCALAR, ...ORDER, ...NULL],
    team: [...SCALAR, ...ORDER, ...NULL],
    bool: [...SCALAR, ...NULL],
    timestamp: [...SCALAR, ...ORDER, ...NULL, "older_than", "newer_than"],
    tags: [...SET, ...NULL],
    teammates: [...SET, ...NULL],
    custom: [...SCALAR, ...ORDER, ...TEXT, ...NULL],
  };
  const STATES = ["open", "snoozed", "closed"];
  const FIELDS = [
    { name: "state", label: "State", kind: "string" },
    { name: "assignee_id", label: "Assignee", kind: "teammate" },
    { name: "team_id", label: "Team", kind: "team" },
    { name: "author_id", label: "Author", kind: "teammate" },
    { name: "priority", label: "Priority", kind: "bool" },
    { name: "channel", label: "Channel", kind: "string" },
    { name: "tags", label: "Tags", kind: "tags" },
    { name: "mentions", label: "Mentions", kind: "teammates" },
    { name: "unread_by", label: "Unread by", kind: "teammates" },
    { name: "created_at", label: "Created", kind: "timestamp" },
    { name: "updated_at", label: "Last updated", kind: "timestamp" },
    { name: "waiting_since", label: "Waiting since", kind: "timestamp" },
    { name: "snoozed_until", label: "Snoozed until", kind: "timestamp" },
  ];
  const FIELD_BY_NAME = new Map(FIELDS.map((f) => [f.name, f]));
  //: group_by choices (every field but timestamps, as livecount.domain.GROUPABLE; custom keys)
  const GROUP_BY = [
    ["", "No grouping"], ["team_id", "Team"], ["assignee_id", "Assignee"],
    ["author_id", "Author"], ["state", "State"], ["channel", "Channel"],
    ["priority", "Priority"], ["tags", "Tags"], ["mentions", "Mentions"],
    ["unread_by", "Unread by"], ["custom", "Custom attribute…"],
  ];
  const MAX_DEPTH = 8;
  const MAX_CONDITIONS = 100;
  const ME = "$me";
  const ME_OPS = new Set(["=", "IN", "contains"]);
  const CUSTOM = "custom";
  const CUSTOM_KEY = /^[A-Za-z_][A-Za-z0-9_]{0,63}$/;
  const ISO_UTC = /^(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(?::\d{2})?)Z$/;
  const UNITS = [[86400, "days"], [3600, "hours"], [60, "minutes"], [1, "seconds"]];
  const MATCH = [["AND", false, "all of"], ["OR", false, "any of"],
    ["AND", true, "not all of"], ["OR", true, "none of"]];

  // -- the model ----------------------------------------------------------------------------

  let nextId = 1;
  const isObject = (v) => v !== null && typeof v === "object" && !Array.isArray(v);

  function group(fields) {
    return { type: "group", id: nextId++, op: "AND", negate: false, listed: false, elided: false,
      children: [], ...fields };
  }

  function cond(fields) {
    return { type: "cond", id: nextId++, field: "", op: "", value: undefined, has: false,
      rawText: null, ...fields };
  }

  function kindOf(field) {
    if (typeof field !== "string") return null;
    if (field.startsWith("custom.")) return "custom";
    const known = FIELD_BY_NAME.get(field);
    return known ? known.kind : null;
  }

  function accepts(kind) {
    return kind === "teammate" || kind === "teammates";
  }

  // value shape an operator takes: none (null tests), span (seconds), list (IN/NIN), scalar
  function shape(op) {
    if (NULL.includes(op)) return "none";
    if (op === "older_than" || op === "newer_than") return "span";
    if (op === "IN" || op === "NIN") return "list";
    return "scalar";
  }

  class Unrepresentable extends Error {}

  function onlyKeys(raw, keys, where) {
    for (const key of Object.keys(raw)) {
      if (!keys.includes(key)) throw new Unrepresentable(`${where}: unexpected key '${key}'`);
    }
  }

  function loadNode(raw, where) {
    if (!isObject(raw)) throw new Unrepresentable(`${where}: not a filter object`);
    const op = raw.operator;
    if (op === "AND" || op === "OR") {
      onlyKeys(raw, ["operator", "value"], where);
      if (!Array.isArray(raw.value)) throw new Unrepresentable(`${where}.value: ${op} needs a list`);
      return group({ op, children: raw.value.map((c, i) => loadNode(c, `${where}.value[${i}]`)) });
    }
    if (op === "NOT") {
      onlyKeys(raw, ["operator", "value"], where);
      let inner = raw.value;
      let listed = false;
      if (Array.isArray(inner)) {
        if (inner.length !== 1) throw new Unrepresentable(`${where}.value: NOT takes one sub-filter`);
        [inner] = inner;
        listed = true;
      }
      const child = loadNode(inner, `${where}.value${listed ? "[0]" : ""}`);
      if (child.type === "group" && !child.negate && !child.elided) {
        return { ...child, negate: true, listed };
      }
      return group({ negate: true, listed, elided: true, children: [child] });
    }
    onlyKeys(raw, ["field", "operator", "value"], where);
    const kind = kindOf(raw.field);
    if (kind === null) throw new Unrepresentable(`${where}.field: not a field the builder knows`);
    if (typeof op !== "string" || !OPS_BY_KIND[kind].includes(op)) {
      throw new Unrepresentable(`${where}.operator: not an operator for this field`);
    }
    const has = Object.prototype.hasOwnProperty.call(raw, "value");
    if (shape(op) === "none" && has) throw new Unrepresentable(`${where}: '${op}' takes no value`);
    return cond({ field: raw.field, op, value: has ? raw.value : undefined, has });
  }

  // Filter JSON → model (a root group); throws Unrepresentable for what the builder cannot show.
  function load(raw) {
    const node = loadNode(raw, "filter");
    if (node.type === "cond") return group({ elided: true, children: [node] });
    return node;
  }

  // Model → filter JSON. ``origins`` (a Map) learns which model node made each JSON object.
  function serialize(node, origins) {
    const note = (json) => { if (origins) origins.set(json, node); return json; };
    if (node.type === "cond") {
      const json = { field: node.field, operator: node.op };
      if (node.has && node.value !== undefined) json.value = node.value;
      return note(json);
    }
    let inner;
    if (node.elided && node.children.length === 1) {
      inner = serialize(node.children[0], origins);
    } else {
      inner = note({ operator: node.op, value: node.children.map((c) => serialize(c, origins)) });
    }
    if (!node.negate) return inner;
    return note({ operator: "NOT", value: node.listed ? [inner] : inner });
  }

  function depthOf(json) {
    if (!isObject(json) || !["AND", "OR", "NOT"].includes(json.operator)) return 1;
    const kids = Array.isArray(json.value) ? json.value : [json.value];
    return 1 + Math.max(0, ...kids.map(depthOf));
  }

  function conditionCount(node) {
    if (node.type === "cond") return 1;
    return node.children.reduce((n, c) => n + conditionCount(c), 0);
  }

  function defaultOp(kind) {
    return kind === "timestamp" ? "older_than" : OPS_BY_KIND[kind][0];
  }

  function defaultValue(field, op) {
    switch (shape(op)) {
      case "none": return undefined;
      case "span": return 3600;
      case "list": return [];
      default:
        if (field === "state" && (op === "=" || op === "!=")) return "open";
        if (kindOf(field) === "bool") return true;
        return undefined;
    }
  }

  function setField(c, field) {
    const before = kindOf(c.field);
    c.field = field;
    const kind = kindOf(field);
    if (kind === null) { c.op = ""; c.value = undefined; c.has = false; return; }
    if (kind !== before || !OPS_BY_KIND[kind].includes(c.op)) c.op = defaultOp(kind);
    c.value = defaultValue(field, c.op);
    c.has = shape(c.op) !== "none";
    c.rawText = null;
  }

  function withoutMe(value) {
    if (value === ME) return undefined;
    return Array.isArray(value) ? value.filter((v) => v !== ME) : value;
  }

  function setOp(c, op) {
    const from = shape(c.op);
    const to = shape(op);
    const kind = kindOf(c.field);
    let value = c.value;
    if (to === "none") value = undefined;
    else if (from === to) value = c.value;
    else if (from === "scalar" && to === "list") value = value === undefined ? [] : [value];
    else if (from === "list" && to === "scalar") value = Array.isArray(value) ? value[0] : undefined;
    else value = defaultValue(c.field, op);
    if (!ME_OPS.has(op)) value = withoutMe(value);
    if (kind === "custom" && TEXT.includes(op) && value !== undefined && typeof value !== "string") {
      value = String(value);
    }
    if (kind === "custom" && ORDER.includes(op) && typeof value === "boolean") value = undefined;
    c.op = op;
    c.value = value;
    c.has = to !== "none";
    c.rawText = null;
  }

  // -- labels -------------------------------------------------------------------------------

  function opLabel(kind, op) {
    const time = kind === "timestamp";
    const multi = kind === "tags" || kind === "teammates";
    switch (op) {
      case "=": return "is";
      case "!=": return "is not";
      case "IN": return "is any of";
      case "NIN": return "is none of";
      case "<": return time ? "is before" : "is less than";
      case "<=": return time ? "is at or before" : "is at most";
      case ">": return time ? "is after" : "is greater than";
      case ">=": return time ? "is at or after" : "is at least";
      case "~": return "contains text";
      case "!~": return "does not contain text";
      case "^": return "starts with";
      case "$": return "ends with";
      case "is null": return multi ? "is empty" : "is not set";
      case "is not null": return multi ? "is not empty" : "is set";
      case "contains": return "includes";
      case "not_contains": return "does not include";
      case "older_than": return "is more than … ago";
      case "newer_than": return "is less than … ago";
      default: return op;
    }
  }

  function show(value) {
    if (value === undefined) return "";
    return typeof value === "string" ? value : JSON.stringify(value);
  }

  // -- DOM helpers --------------------------------------------------------------------------

  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key.startsWith("on") && typeof value === "function") el.addEventListener(key.slice(2), value);
      else if (key === "className") el.className = value;
      else if (key === "value") el.value = value;
      else el.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      el.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return el;
  }

  // A <select> over raw JSON values: option values are indices into ``options``. A current
  // value not among them is kept as an extra option, so a loaded filter round-trips.
  function rawSelect(options, current, { placeholder, ...attrs }, onPick) {
    const all = options.slice();
    let index = all.findIndex(([v]) => v === current);
    if (current !== undefined && index < 0) {
      all.push([current, `${show(current)} (unknown)`]);
      index = all.length - 1;
    }
    const select = h("select", attrs,
      index < 0 ? h("option", { value: "", disabled: true }, placeholder || "Choose…") : null,
      all.map(([, label], i) => h("option", { value: String(i) }, label)));
    select.value = index < 0 ? "" : String(index);
    select.addEventListener("change", () => {
      if (select.value !== "") onPick(all[Number(select.value)][0]);
    });
    return select;
  }

  // -- the builder --------------------------------------------------------------------------

  // ctx: {teammates(): [{id, name}], teams(): [{id, name}], me(): id|null, tags(): [str],
  //       channels(): [str], onChange(): void}
  function create(container, ctx) {
    let root = group({ elided: true });
    let marked = null; // {id, message}: a node the server's message points at

    function changed() {
      ctx.onChange();
    }

    function rerender(focusKey) {
      const current = document.activeElement;
      const active = focusKey || keyOf(current);
      const caret = !focusKey && current && current.tagName === "INPUT" && typeof current.selectionStart === "number"
        ? [current.selectionStart, current.selectionEnd] : null;
      container.replaceChildren(renderGroup(root, { path: [], base: 1, negated: false }));
      if (active) {
        const el = container.querySelector(`[data-focus-key="${CSS.escape(active)}"]`);
        if (el) {
          el.focus();
          if (caret && el.tagName === "INPUT" && typeof el.setSelectionRange === "function") {
            try { el.setSelectionRange(caret[0], caret[1]); } catch (err) { /* not a text input */ }
          }
        }
      }
    }

    // Show which node a message is about, without rebuilding the rows (a value being typed).
    function paintMark() {
      for (const el of container.querySelectorAll("[data-node]")) {
        const on = !!marked && el.getAttribute("data-node") === String(marked.id);
        el.classList.toggle("invalid", on && marked.level === "invalid");
        el.classList.toggle("incomplete", on && marked.level === "incomplete");
        if (on) el.setAttribute("aria-invalid", "true");
        else el.removeAttribute("aria-invalid");
      }
    }

    function keyOf(el) {
      return el && container.contains(el) ? el.getAttribute("data-focus-key") : null;
    }

    function total() {
      return conditionCount(root);
    }

    function childBase(g, base) {
      return base + (g.negate ? 1 : 0) + (g.elided && g.children.length === 1 ? 0 : 1);
    }

    function labelOf(path, kind) {
      if (!path.length) return "Filter";
      return `${kind} ${path.map((i) => i + 1).join(".")}`;
    }

    function renderGroup(g, { path, base, negated }) {
      const name = labelOf(path, "Group");
      const isRoot = path.length === 0;
      const under = negated || g.negate;
      const kidsBase = base + (g.negate ? 1 : 0) + 1; // where children sit once it has two
      const depthNow = base - 1 + depthOf(serialize(g));
      const canNegate = g.negate || depthNow + 1 <= MAX_DEPTH;
      const matchIndex = MATCH.findIndex(([op, neg]) => op === g.op && neg === g.negate);
      const match = h("select", {
        className: "match", "data-testid": "group-op", "aria-label": `${name}: match`,
        "data-focus-key": `${g.id}:op`,
        onchange: (event) => {
          const [op, neg] = MATCH[Number(event.target.value)];
          if (op !== g.op) g.elided = false;
          g.op = op;
          if (neg !== g.negate) { g.negate = neg; g.listed = false; }
          rerender();
          changed();
        },
      }, MATCH.map(([, neg, label], i) => h("option", {
        value: String(i), disabled: neg && !g.negate && !canNegate,
      }, label)));
      match.value = String(matchIndex);
      const head = h("div", { className: "group-head" },
        h("span", { className: "group-title", "aria-hidden": "true" }, isRoot ? "Conversations matching" : "Match"),
        match,
        h("span", { className: "muted" }, isRoot ? "these conditions" : "these"),
        isRoot ? null : h("button", {
          type: "button", className: "btn btn-small btn-ghost remove-group",
          "data-testid": "remove-group", "aria-label": `Remove ${name.toLowerCase()}`,
          "data-focus-key": `${g.id}:remove`,
          onclick: () => removeNode(g),
        }, "Remove group"));
      const connector = g.op === "AND" ? "and" : "or";
      const rows = g.children.map((child, i) => {
        const childPath = [...path, i];
        const childAt = childBase(g, base);
        const row = child.type === "group"
          ? h("li", { className: "group-row" }, renderGroup(child, { path: childPath, base: childAt, negated: under }))
          : renderCond(child, { path: childPath, negated: under });
        if (i > 0) row.prepend(h("span", { className: "connector", "aria-hidden": "true" }, connector));
        return row;
      });
      const full = total() >= MAX_CONDITIONS;
      const deep = kidsBase + 1 > MAX_DEPTH;
      const foot = h("div", { className: "group-foot" },
        h("button", {
          type: "button", className: "btn btn-small", "data-testid": "add-cond",
          "aria-label": `Add a condition to ${name.toLowerCase()}`, "data-focus-key": `${g.id}:add-cond`,
          disabled: full || kidsBase > MAX_DEPTH,
          title: full ? `At most ${MAX_CONDITIONS} conditions per filter` : null,
          onclick: () => addChild(g, cond({})),
        }, "+ Condition"),
        h("button", {
          type: "button", className: "btn btn-small", "data-testid": "add-group",
          "aria-label": `Add a group to ${name.toLowerCase()}`, "data-focus-key": `${g.id}:add-group`,
          disabled: full || deep,
          title: deep ? `Filters nest at most ${MAX_DEPTH} levels` : (full ? `At most ${MAX_CONDITIONS} conditions per filter` : null),
          onclick: () => addChild(g, group({ children: [cond({})] })),
        }, "+ Group"),
        deep && !isRoot ? h("span", { className: "muted small" }, `Nesting limit (${MAX_DEPTH} levels) reached`) : null);
      const empty = g.children.length === 0
        ? h("li", { className: "group-empty muted" }, isRoot ? "No conditions yet: add one to start." : "An empty group: add a condition or remove it.")
        : null;
      const invalid = marked && marked.id === g.id;
      return h("fieldset", {
        className: `group${isRoot ? " group-root" : ""}${g.negate ? " group-not" : ""}${invalid ? ` ${marked.level}` : ""}`,
        "data-testid": "group", "data-node": g.id, "aria-invalid": invalid ? "true" : null,
      },
      h("legend", { className: "sr-only" }, name),
      head,
      h("ol", { className: "group-body" }, rows, empty),
      foot);
    }

    function addChild(g, node) {
      g.children.push(node);
      const target = node.type === "cond" ? node : node.children[0];
      rerender(`${target.id}:field`);
      changed();
    }

    function findParent(node, at = root) {
      for (const child of at.children) {
        if (child === node) return at;
        if (child.type === "group") {
          const found = findParent(node, child);
          if (found) return found;
        }
      }
      return null;
    }

    function removeNode(node) {
      const parent = findParent(node);
      if (!parent) return;
      const index = parent.children.indexOf(node);
      parent.children.splice(index, 1);
      const next = parent.children[index] || parent.children[index - 1];
      let focus = `${parent.id}:add-cond`;
      if (next) focus = next.type === "cond" ? `${next.id}:field` : `${next.id}:op`;
      if (marked && marked.id === node.id) marked = null;
      rerender(focus);
      changed();
    }

    function renderCond(c, { path, negated }) {
      const name = labelOf(path, "Condition");
      const kind = kindOf(c.field);
      const isCustom = kind === "custom";
      const fieldSelect = h("select", {
        className: "cond-field", "data-testid": "cond-field", "aria-label": `${name}: field`,
        "data-focus-key": `${c.id}:field`,
        onchange: (event) => {
          const value = event.target.value;
          setField(c, value === CUSTOM ? (isCustom ? c.field : "custom.") : value);
          rerender(value === CUSTOM ? `${c.id}:key` : `${c.id}:op`);
          changed();
        },
      },
      h("option", { value: "", disabled: true }, "Choose a field…"),
      h("optgroup", { label: "Conversation" }, FIELDS.map((f) => h("option", { value: f.name }, f.label))),
      h("optgroup", { label: "Custom attributes" }, h("option", { value: CUSTOM }, "Custom attribute…")));
      fieldSelect.value = isCustom ? CUSTOM : (kind ? c.field : "");
      const parts = [fieldSelect];
      if (isCustom) {
        parts.push(h("input", {
          className: "cond-key", "data-testid": "cond-key", "aria-label": `${name}: custom attribute key`,
          placeholder: "key, e.g. plan", value: c.field.slice(7), maxlength: 64, spellcheck: "false",
          "data-focus-key": `${c.id}:key`,
          oninput: (event) => { c.field = `custom.${event.target.value.trim()}`; changed(); },
        }));
      }
      if (kind) {
        const opSelect = h("select", {
          className: "cond-op", "data-testid": "cond-op", "aria-label": `${name}: operator`,
          "data-focus-key": `${c.id}:op`,
          onchange: (event) => {
            setOp(c, event.target.value);
            rerender(shape(c.op) === "none" ? `${c.id}:op` : `${c.id}:value`);
            changed();
          },
        }, OPS_BY_KIND[kind].map((op) => h("option", { value: op }, opLabel(kind, op))));
        opSelect.value = c.op;
        parts.push(opSelect);
        if (shape(c.op) !== "none") {
          parts.push(h("div", { className: "cond-value", "data-testid": "cond-value" },
            valueEditor(c, kind, name, negated)));
        }
      }
      const invalid = marked && marked.id === c.id;
      return h("li", {
        className: `cond${invalid ? ` ${marked.level}` : ""}`, "data-testid": "cond", "data-node": c.id,
        "aria-invalid": invalid ? "true" : null,
      },
      h("div", { className: "cond-main" }, parts),
      h("button", {
        type: "button", className: "icon-btn", "data-testid": "remove-cond",
        "aria-label": `Remove ${name.toLowerCase()}`, title: "Remove condition",
        onclick: () => removeNode(c),
      }, "×"));
    }

    // -- value editors ----------------------------------------------------------------------

    function teammateOptions(allowMe) {
      const me = ctx.me();
      const people = ctx.teammates().slice().sort((a, b) => a.name.localeCompare(b.name))
        .map((t) => [t.id, t.id === me ? `${t.name} (you)` : t.name]);
      return allowMe ? [[ME, "Me (whoever views it)"], ...people] : people;
    }

    function teamOptions() {
      return ctx.teams().slice().sort((a, b) => a.name.localeCompare(b.name)).map((t) => [t.id, t.name]);
    }

    function optionsFor(c, kind, negated) {
      const allowMe = accepts(kind) && ME_OPS.has(c.op) && !negated;
      if (c.field === "state" && shape(c.op) !== "scalar") return STATES.map((s) => [s, s]);
      if (c.field === "state" && (c.op === "=" || c.op === "!=")) return STATES.map((s) => [s, s]);
      if (kind === "teammate" || kind === "teammates") {
        const options = teammateOptions(allowMe);
        const hasMe = c.value === ME || (Array.isArray(c.value) && c.value.includes(ME));
        return !allowMe && hasMe ? [[ME, "Me (not allowed here)"], ...options] : options;
      }
      if (kind === "team") return teamOptions();
      if (kind === "bool") return [[true, "Yes"], [false, "No"]];
      return null;
    }

    function attrs(c, name, extra) {
      return { "aria-label": `${name}: value`, "data-focus-key": `${c.id}:value`, ...extra };
    }

    function valueEditor(c, kind, name, negated) {
      if (c.rawText !== null) return rawEditor(c, name);
      const sh = shape(c.op);
      if (sh === "span") return spanEditor(c, name);
      if (sh === "list") return listEditor(c, kind, name, negated);
      const options = optionsFor(c, kind, negated);
      if (options) {
        return rawSelect(options, c.value, attrs(c, name, {
          "data-testid": "value-select",
          placeholder: kind === "team" ? "Choose a team…" : (accepts(kind) ? "Choose a teammate…" : "Choose…"),
        }), (value) => { c.value = value; changed(); });
      }
      if (kind === "timestamp") return timeEditor(c, name);
      if (kind === "custom") return customEditor(c, name);
      if (c.value !== undefined && typeof c.value !== "string") return rawEditor(c, name);
      const suggestions = kind === "tags" ? ctx.tags() : (c.field === "channel" ? ctx.channels()
        : (c.field === "state" ? STATES : []));
      return textEditor(c, name, suggestions);
    }

    function textEditor(c, name, suggestions) {
      const input = h("input", attrs(c, name, {
        "data-testid": "value-text", value: c.value ?? "", spellcheck: "false",
        placeholder: c.field === "tags" ? "a tag, e.g. vip" : "text",
      }));
      const box = h("div", { className: "suggestions", "aria-label": "Suggestions", role: "group" });
      const refill = () => {
        const typed = input.value.trim().toLowerCase();
        const picks = suggestions.filter((s) => s.toLowerCase() !== typed && s.toLowerCase().startsWith(typed)).slice(0, 8);
        box.replaceChildren(...picks.map((s) => h("button", {
          type: "button", className: "chip-btn", "data-testid": "suggestion",
          "aria-label": `Use “${s}”`,
          onclick: () => {
            c.value = s;
            input.value = s;
            refill();
            input.focus();
            changed();
          },
        }, s)));
        box.hidden = picks.length === 0;
      };
      input.addEventListener("input", () => { c.value = input.value; refill(); changed(); });
      refill();
      return h("div", { className: "text-editor" }, input, box);
    }

    function rawEditor(c, name) {
      const input = h("input", attrs(c, name, {
        "data-testid": "value-json", className: "mono", spellcheck: "false",
        value: c.rawText !== null ? c.rawText : JSON.stringify(c.value),
        title: "The value as JSON",
      }));
      input.addEventListener("input", () => {
        c.rawText = input.value;
        try {
          c.value = JSON.parse(input.value);
          c.rawInvalid = false;
        } catch (err) {
          c.rawInvalid = true;
        }
        changed();
      });
      if (c.rawText === null) c.rawText = input.value;
      return h("div", { className: "raw-editor" }, input, h("span", { className: "muted small" }, "JSON"));
    }

    function timeEditor(c, name) {
      const match = c.value === undefined ? [null, ""] : (typeof c.value === "string" ? ISO_UTC.exec(c.value) : null);
      if (!match) return rawEditor(c, name);
      const input = h("input", attrs(c, name, {
        type: "datetime-local", step: "1", "data-testid": "value-time", value: match[1],
      }));
      input.addEventListener("input", () => {
        const v = input.value;
        c.value = v ? `${v.length === 16 ? `${v}:00` : v}Z` : undefined;
        changed();
      });
      return h("div", { className: "inline" }, input, h("span", { className: "muted small" }, "UTC"));
    }

    function spanEditor(c, name) {
      const v = c.value;
      if (v !== undefined && (typeof v !== "number" || !Number.isFinite(v))) return rawEditor(c, name);
      let unit = c.unit;
      if (!unit) {
        const exact = UNITS.find(([u]) => Number.isInteger(v / u));
        unit = v === undefined || v === 0 ? 3600 : (exact ? exact[0] : 1);
      }
      c.unit = unit;
      const number = h("input", attrs(c, name, {
        type: "number", min: "0", step: "any", "data-testid": "value-span", className: "narrow",
        value: v === undefined ? "" : String(v / unit),
      }));
      const units = h("select", {
        "aria-label": `${name}: unit`, "data-testid": "value-unit", "data-focus-key": `${c.id}:unit`,
      }, UNITS.map(([u, label]) => h("option", { value: String(u) }, label)));
      units.value = String(unit);
      const update = () => {
        c.unit = Number(units.value);
        const n = number.value.trim() === "" ? NaN : Number(number.value);
        c.value = Number.isFinite(n) && n >= 0 ? n * c.unit : undefined;
        changed();
      };
      number.addEventListener("input", update);
      units.addEventListener("change", update);
      return h("div", { className: "inline" }, number, units, h("span", { className: "muted" }, "ago"));
    }

    function customEditor(c, name) {
      const v = c.value;
      const allowed = TEXT.includes(c.op) ? ["text"] : (ORDER.includes(c.op) ? ["text", "number"] : ["text", "number", "boolean"]);
      let type = v === undefined ? (c.customType || allowed[0]) : (typeof v === "number" ? "number" : (typeof v === "boolean" ? "boolean" : "text"));
      if (v !== undefined && !["string", "number", "boolean"].includes(typeof v)) return rawEditor(c, name);
      if (!allowed.includes(type)) type = allowed[0];
      const typeSelect = h("select", {
        "aria-label": `${name}: value type`, "data-testid": "value-type", "data-focus-key": `${c.id}:type`,
        disabled: allowed.length === 1,
        onchange: (event) => {
          c.customType = event.target.value;
          const cur = c.value;
          if (c.customType === "number") c.value = cur === undefined || cur === "" || !Number.isFinite(Number(cur)) || typeof cur === "boolean" ? undefined : Number(cur);
          else if (c.customType === "boolean") c.value = true;
          else c.value = cur === undefined ? undefined : String(cur);
          rerender(`${c.id}:value`);
          changed();
        },
      }, allowed.map((t) => h("option", { value: t }, { text: "text", number: "number", boolean: "yes/no" }[t])));
      typeSelect.value = type;
      let input;
      if (type === "boolean") {
        input = rawSelect([[true, "Yes"], [false, "No"]], v, attrs(c, name, { "data-testid": "value-select" }),
          (value) => { c.value = value; changed(); });
      } else if (type === "number") {
        input = h("input", attrs(c, name, { type: "number", step: "any", "data-testid": "value-number", value: v === undefined ? "" : String(v) }));
        input.addEventListener("input", () => {
          const n = input.value.trim() === "" ? NaN : Number(input.value);
          c.value = Number.isFinite(n) ? n : undefined;
          changed();
        });
      } else {
        input = h("input", attrs(c, name, { "data-testid": "value-text", value: v ?? "", spellcheck: "false", placeholder: "text" }));
        input.addEventListener("input", () => { c.value = input.value; changed(); });
      }
      return h("div", { className: "inline" }, typeSelect, input);
    }

    function listEditor(c, kind, name, negated) {
      if (c.value !== undefined && !Array.isArray(c.value)) return rawEditor(c, name);
      const items = c.value || [];
      const options = optionsFor(c, kind, negated);
      const labelFor = (item) => {
        const found = options && options.find(([v]) => v === item);
        return found ? found[1] : show(item);
      };
      const chips = items.map((item, i) => h("span", { className: "chip chip-value", "data-testid": "value-chip" },
        labelFor(item),
        h("button", {
          type: "button", className: "chip-x", "aria-label": `Remove ${labelFor(item)}`,
          "data-focus-key": `${c.id}:chip:${i}`,
          onclick: () => {
            c.value = items.filter((_, j) => j !== i);
            rerender(`${c.id}:value`);
            changed();
          },
        }, "×")));
      const add = (value) => {
        c.value = [...items, value];
        rerender(`${c.id}:value`);
        changed();
      };
      let adder;
      if (options) {
        const free = options.filter(([v]) => !items.includes(v));
        adder = h("select", attrs(c, name, { "data-testid": "value-add" }),
          h("option", { value: "" }, items.length ? "Add another…" : "Choose…"),
          free.map(([, label], i) => h("option", { value: String(i) }, label)));
        adder.value = "";
        adder.addEventListener("change", () => {
          if (adder.value !== "") add(free[Number(adder.value)][0]);
        });
      } else {
        const typed = kind === "custom" ? ["text", "number", "boolean"] : null;
        const typeSelect = typed ? h("select", { "aria-label": `${name}: type of the next value`, "data-testid": "value-type" },
          typed.map((t) => h("option", { value: t }, { text: "text", number: "number", boolean: "yes/no" }[t]))) : null;
        const input = h("input", attrs(c, name, {
          "data-testid": "value-add-text", spellcheck: "false",
          placeholder: kind === "timestamp" ? "2024-03-10T12:00:00Z" : "a value",
        }));
        const commit = () => {
          const text = input.value.trim();
          const type = typeSelect ? typeSelect.value : "text";
          if (type === "boolean") return add(!["false", "no", "0", ""].includes(text.toLowerCase()));
          if (!text) return undefined;
          if (type === "number") {
            const n = Number(text);
            if (!Number.isFinite(n)) { input.setCustomValidity("not a number"); input.reportValidity(); return undefined; }
            return add(n);
          }
          return add(text);
        };
        input.addEventListener("keydown", (event) => {
          if (event.key === "Enter") { event.preventDefault(); commit(); }
        });
        input.addEventListener("input", () => input.setCustomValidity(""));
        adder = h("span", { className: "inline" }, typeSelect, input,
          h("button", { type: "button", className: "btn btn-small", "data-testid": "value-add-button", onclick: commit, "aria-label": `${name}: add the value` }, "Add"));
      }
      return h("div", { className: "list-editor" }, chips, adder);
    }

    // -- what is not complete yet -----------------------------------------------------------

    function problemIn(node, path) {
      if (node.type === "group") {
        if (node.children.length === 0) {
          return { node, message: path.length ? `${labelOf(path, "Group")} is empty: add a condition or remove the group.` : "Add a condition to start." };
        }
        for (let i = 0; i < node.children.length; i += 1) {
          const found = problemIn(node.children[i], [...path, i]);
          if (found) return found;
        }
        return null;
      }
      const name = labelOf(path, "Condition");
      const kind = kindOf(node.field);
      if (!node.field || kind === null) return { node, message: `${name}: choose a field.` };
      if (kind === "custom" && !CUSTOM_KEY.test(node.field.slice(7))) {
        return { node, message: `${name}: type the custom attribute's key (letters, digits and _).` };
      }
      if (node.rawInvalid && node.rawText !== null) return { node, message: `${name}: the value is not valid JSON.` };
      const sh = shape(node.op);
      if (sh === "none") return null;
      if (node.value === undefined || (typeof node.value === "string" && node.value === "" && kind === "tags")) {
        return { node, message: `${name}: ${sh === "span" ? "type a duration" : (optionsFor(node, kind, false) ? "choose a value" : "type a value")}.` };
      }
      if (sh === "list" && Array.isArray(node.value) && node.value.length === 0) {
        return { node, message: `${name}: add at least one value.` };
      }
      return null;
    }

    // The node a server path (``filter.value[1].value[0].operator``) points at, if any.
    function nodeAt(path) {
      const origins = new Map();
      let json = serialize(root, origins);
      let found = origins.get(json) || root;
      const steps = String(path).replace(/^filter\.?/, "").match(/[A-Za-z_]+|\[\d+\]/g) || [];
      for (const step of steps) {
        if (step === "value" && isObject(json) && ["AND", "OR", "NOT"].includes(json.operator)) json = json.value;
        else if (step.startsWith("[") && Array.isArray(json)) json = json[Number(step.slice(1, -1))];
        else break;
        if (origins.has(json)) found = origins.get(json);
      }
      return found;
    }

    rerender();

    return {
      // Replace the model by ``raw`` (throws Unrepresentable, leaving the model as it was).
      set(raw) {
        root = load(raw);
        marked = null;
        rerender();
      },
      clear() {
        root = group({ elided: true });
        marked = null;
        rerender();
      },
      filter() {
        return serialize(root);
      },
      problem() {
        return problemIn(root, []);
      },
      // Point at the node a server message names (or at a local problem's node).
      mark(pathOrNode, message, level = "invalid") {
        const node = typeof pathOrNode === "string" ? nodeAt(pathOrNode) : pathOrNode;
        marked = node && !(node === root && level === "incomplete") ? { id: node.id, message, level } : null;
        paintMark();
      },
      unmark() {
        if (!marked) return;
        marked = null;
        paintMark();
      },
      // Move focus to a problem's node (its first control).
      focus(node) {
        const el = container.querySelector(`[data-node="${node.id}"] select, [data-node="${node.id}"] input`);
        if (el) el.focus();
      },
      refresh() {
        rerender();
      },
    };
  }

  window.LivecountBuilder = {
    create, load, serialize, depthOf, Unrepresentable, OPS_BY_KIND, FIELDS, GROUP_BY, STATES,
    MAX_DEPTH, MAX_CONDITIONS, CUSTOM_KEY,
  };
})();

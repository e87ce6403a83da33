// The submit page's spec form, generated from the job spec's JSON Schema (GET /openapi.json's JobSpec, embedded
// in the page): one field per spec field, with its range, default and help, in fieldsets grouped as the spec
// is. The form edits one spec object; the page keeps the JSON view in sync with it, both ways. No build step.
(function () {
  "use strict";

  function el(tag, attrs, text) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) { if (attrs[k] !== undefined && attrs[k] !== null) node.setAttribute(k, attrs[k]); });
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function humanize(name) { return (name.charAt(0).toUpperCase() + name.slice(1)).replace(/_/g, " "); }

  // SpecForm(root, schema, onChange): render(value) draws the form for `value` (a spec object, edited in
  // place); onChange(value) runs after every edit.
  function SpecForm(root, schema, onChange) {
    var defs = schema.$defs || {};
    var value = {};
    var counter = 0;

    function resolve(node) {
      while (node && node.$ref) node = defs[node.$ref.split("/").pop()];
      return node || {};
    }

    function get(path) {
      var v = value;
      for (var i = 0; i < path.length; i++) { if (v === null || typeof v !== "object") return undefined; v = v[path[i]]; }
      return v;
    }

    function set(path, v) {
      var parent = value;
      for (var i = 0; i < path.length - 1; i++) {
        if (parent[path[i]] === null || typeof parent[path[i]] !== "object") parent[path[i]] = {};
        parent = parent[path[i]];
      }
      var key = path[path.length - 1];
      if (v === undefined) delete parent[key]; else parent[key] = v;
      onChange(value);
    }

    // A union with a discriminator: its leaves (object schemas), each with the constants that select it.
    function leaves(node) {
      node = resolve(node);
      if (node.oneOf) return node.oneOf.reduce(function (all, option) { return all.concat(leaves(option)); }, []);
      var consts = {};
      Object.keys(node.properties || {}).forEach(function (k) {
        var p = node.properties[k];
        if (p.const !== undefined) consts[k] = p.const;
      });
      return [{ schema: node, consts: consts }];
    }

    function nonNull(node) {
      var branches = (node.anyOf || []).filter(function (b) { return b.type !== "null"; });
      return branches.length === 1 && branches.length < node.anyOf.length ? branches[0] : null;
    }

    function help(node, extra) {
      var parts = [];
      if (node.description) parts.push(node.description.replace(/``/g, ""));
      var range = [];
      if (node.minimum !== undefined) range.push("≥ " + node.minimum);
      if (node.exclusiveMinimum !== undefined) range.push("> " + node.exclusiveMinimum);
      if (node.maximum !== undefined) range.push("≤ " + node.maximum);
      if (node.exclusiveMaximum !== undefined) range.push("< " + node.exclusiveMaximum);
      if (range.length) parts.push("Range: " + range.join(", ") + ".");
      if (extra) parts.push(extra);
      return parts.join(" ");
    }

    function defaultText(node) {
      return node.default === undefined || node.default === null ? "" : JSON.stringify(node.default);
    }

    // One labelled row: label, control, help text.
    function row(name, label, control, text, required) {
      var wrap = el("div", { "class": "spec-field", "data-field": name });
      var id = control.id || ("spec-" + (++counter));
      control.id = id;
      var lab = el("label", { "for": id }, label + (required ? " *" : ""));
      wrap.appendChild(lab);
      wrap.appendChild(control);
      if (text) {
        var hint = el("small", { "class": "hint", id: id + "-help" }, text.replace(/``/g, ""));
        control.setAttribute("aria-describedby", id + "-help");
        wrap.appendChild(hint);
      }
      return wrap;
    }

    function listValue(text, numeric) {
      var items = text.split(",").map(function (s) { return s.trim(); }).filter(function (s) { return s !== ""; });
      if (!numeric) return items;
      return items.map(function (s) { var n = Number(s); return isNaN(n) ? s : n; });
    }

    function field(name, node, path, required) {
      var original = node;
      node = resolve(node);
      var label = original.title || node.title || humanize(name);
      var current = get(path);
      var optional = nonNull(original);
      if (original.oneOf || node.oneOf) return union(name, original.oneOf ? original : node, path, label);
      if (optional && resolve(optional).type === "object" && resolve(optional).properties) {
        return optionalGroup(name, resolve(optional), path, label, original);
      }
      var scalar = optional ? resolve(optional) : node;
      var described = Object.assign({}, scalar, { description: original.description || node.description });
      if (scalar.const !== undefined) return null;  // set by its union's choice
      if (scalar.enum) {
        var select = el("select", { name: path.join(".") });
        select.appendChild(el("option", { value: "" }, required ? "(choose)" : "(default" + (defaultText(original) ? ": " + defaultText(original) : "") + ")"));
        scalar.enum.forEach(function (option) { select.appendChild(el("option", { value: option }, option)); });
        select.value = current === undefined || current === null ? "" : String(current);
        select.addEventListener("change", function () { set(path, select.value === "" ? undefined : select.value); });
        return row(name, label, select, help(described), required);
      }
      if (scalar.type === "boolean") {
        var box = el("input", { type: "checkbox", name: path.join(".") });
        box.checked = current === undefined ? !!original.default : !!current;
        box.addEventListener("change", function () { set(path, box.checked); });
        return row(name, label, box, help(described, "Default: " + (original.default ? "on" : "off") + "."), required);
      }
      if (scalar.type === "array" && scalar.items) {
        var items = resolve(scalar.items);
        if (items.enum) return checkboxes(name, label, items.enum, path, described);
        var numeric = items.type === "integer" || items.type === "number";
        var list = el("input", { type: "text", name: path.join("."), inputmode: numeric ? "numeric" : null,
          placeholder: defaultText(original) || (numeric ? "e.g. 64, 64, 32" : "comma-separated") });
        list.value = Array.isArray(current) ? current.join(", ") : "";
        list.addEventListener("input", function () { set(path, list.value.trim() === "" ? undefined : listValue(list.value, numeric)); });
        return row(name, label, list, help(described, "A comma-separated list."), required);
      }
      if (scalar.type === "integer" || scalar.type === "number") {
        var input = el("input", { type: "number", name: path.join("."), placeholder: defaultText(original),
          step: scalar.type === "integer" ? "1" : "any",
          min: scalar.minimum !== undefined ? scalar.minimum : (scalar.type === "integer" && scalar.exclusiveMinimum !== undefined ? scalar.exclusiveMinimum + 1 : null),
          max: scalar.maximum !== undefined ? scalar.maximum : null });
        input.value = typeof current === "number" ? String(current) : "";
        input.addEventListener("input", function () {
          if (input.value.trim() === "") { set(path, undefined); return; }
          var n = Number(input.value);
          if (!isNaN(n)) set(path, n);
        });
        return row(name, label, input, help(described), required);
      }
      if (scalar.type === "string") {
        var text = el("input", { type: "text", name: path.join("."), placeholder: defaultText(original), maxlength: scalar.maxLength });
        text.value = typeof current === "string" ? current : "";
        text.addEventListener("input", function () { set(path, text.value === "" ? undefined : text.value); });
        return row(name, label, text, help(described), required);
      }
      if (original.anyOf && !optional) {  // e.g. memory_fraction: a number or "auto"
        var either = el("input", { type: "text", name: path.join("."), placeholder: defaultText(original) });
        either.value = current === undefined || current === null ? "" : String(current);
        either.addEventListener("input", function () {
          var raw = either.value.trim();
          if (raw === "") { set(path, undefined); return; }
          set(path, raw !== "" && !isNaN(Number(raw)) ? Number(raw) : raw);
        });
        return row(name, label, either, help(described), required);
      }
      // Anything else (a Keras model JSON, free-form objects): a JSON box of its own.
      var json = el("textarea", { name: path.join("."), rows: "6", spellcheck: "false" });
      json.value = current === undefined ? "" : JSON.stringify(current, null, 2);
      json.addEventListener("input", function () {
        if (json.value.trim() === "") { set(path, undefined); return; }
        try { set(path, JSON.parse(json.value)); json.setCustomValidity(""); } catch (e) { json.setCustomValidity("not JSON yet"); }
      });
      return row(name, label, json, help(described, "JSON."), required);
    }

    function checkboxes(name, label, options, path, node) {
      var group = el("fieldset", { "class": "spec-choices", "data-field": name });
      group.appendChild(el("legend", null, label));
      var current = get(path) || [];
      options.forEach(function (option) {
        var id = "spec-" + (++counter);
        var box = el("input", { type: "checkbox", id: id, value: option });
        box.checked = current.indexOf(option) >= 0;
        box.addEventListener("change", function () {
          var chosen = Array.prototype.filter.call(group.querySelectorAll("input"), function (b) { return b.checked; })
            .map(function (b) { return b.value; });
          set(path, chosen.length ? chosen : undefined);
        });
        var lab = el("label", { "for": id, "class": "inline" });
        lab.appendChild(box);
        lab.appendChild(document.createTextNode(" " + option));
        group.appendChild(lab);
      });
      if (node.description) group.appendChild(el("small", { "class": "hint" }, node.description));
      return group;
    }

    // Required fields first (depth, width, ...), then the rest in the spec's own order.
    function objectFields(container, node, path) {
      var required = node.required || [];
      var names = Object.keys(node.properties || {});
      names = names.filter(function (n) { return required.indexOf(n) >= 0; })
        .concat(names.filter(function (n) { return required.indexOf(n) < 0; }));
      names.forEach(function (name) {
        var child = field(name, node.properties[name], path.concat([name]), required.indexOf(name) >= 0);
        if (child) container.appendChild(child);
      });
    }

    function group(name, node, path, label, description) {
      var set_ = el("fieldset", { "class": "spec-group", "data-field": name });
      set_.appendChild(el("legend", null, label));
      if (description) set_.appendChild(el("p", { "class": "hint" }, description.replace(/``/g, "")));
      objectFields(set_, node, path);
      return set_;
    }

    function optionalGroup(name, node, path, label, original) {
      var wrap = el("fieldset", { "class": "spec-group", "data-field": name });
      wrap.appendChild(el("legend", null, label));
      var id = "spec-" + (++counter);
      var toggle = el("input", { type: "checkbox", id: id });
      var on = get(path) !== undefined && get(path) !== null;
      toggle.checked = on;
      var lab = el("label", { "for": id, "class": "inline" });
      lab.appendChild(toggle);
      lab.appendChild(document.createTextNode(" use " + label.toLowerCase()));
      wrap.appendChild(lab);
      if (original.description || node.description) wrap.appendChild(el("p", { "class": "hint" }, original.description || node.description));
      if (on) objectFields(wrap, node, path);
      toggle.addEventListener("change", function () { set(path, toggle.checked ? {} : undefined); render(value); });
      return wrap;
    }

    function union(name, node, path, label) {
      var options = leaves(node);
      var current = get(path) || {};
      var chosen = -1;
      options.forEach(function (option, i) {
        var keys = Object.keys(option.consts);
        if (chosen < 0 && keys.length && keys.every(function (k) { return current[k] === option.consts[k]; })) chosen = i;
      });
      var wrap = el("fieldset", { "class": "spec-group", "data-field": name });
      wrap.appendChild(el("legend", null, label));
      var select = el("select", { name: path.join(".") + ".$choice" });
      select.appendChild(el("option", { value: "" }, "(choose)"));
      options.forEach(function (option, i) {
        var text = Object.keys(option.consts).map(function (k) { return option.consts[k]; }).join(" · ");
        select.appendChild(el("option", { value: String(i) }, text));
      });
      select.value = chosen < 0 ? "" : String(chosen);
      var kind = Object.keys((options[0] || { consts: {} }).consts)[0] || "kind";
      wrap.appendChild(row(name + "-kind", kind === "name" ? label : humanize(kind), select, chosen >= 0 ? options[chosen].schema.description : "", true));
      select.addEventListener("change", function () {
        if (select.value === "") { set(path, undefined); render(value); return; }
        var option = options[Number(select.value)];
        var next = {};
        // Fields both kinds have (depth, width, activation, ...) are kept; the others go.
        Object.keys(current).forEach(function (k) { if (option.schema.properties && option.schema.properties[k]) next[k] = current[k]; });
        Object.keys(option.consts).forEach(function (k) { next[k] = option.consts[k]; });
        set(path, next);
        render(value);
      });
      if (chosen >= 0) objectFields(wrap, options[chosen].schema, path);
      return wrap;
    }

    function render(next) {
      value = next && typeof next === "object" ? next : {};
      counter = 0;
      while (root.firstChild) root.removeChild(root.firstChild);
      var required = schema.required || [];
      Object.keys(schema.properties || {}).forEach(function (name) {
        var node = schema.properties[name];
        var resolved = resolve(node);
        var path = [name];
        var child;
        if (resolved.type === "object" && resolved.properties && !node.oneOf) {
          child = group(name, resolved, path, humanize(name), resolved.description);
        } else {
          child = field(name, node, path, required.indexOf(name) >= 0);
        }
        if (child) root.appendChild(child);
      });
    }

    return { render: render, value: function () { return value; } };
  }

  window.GpuyardSpecForm = SpecForm;
})();

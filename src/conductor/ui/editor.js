// A request body edited as JSON or YAML text. The text goes to the API as typed, with its
// content type (the conductor reads YAML itself), and the API's 422s are listed by field.

import { h } from './dom.js';
import { api, fieldErrors } from './api.js';

const PLAIN = /^[A-Za-z_][A-Za-z0-9_./-]*$/;
const RESERVED = /^(true|false|null|yes|no|on|off|y|n)$/i;

// Characters JSON leaves as they are but YAML does not allow in a quoted scalar.
const UNPRINTABLE = /[\u007f-\u0084\u0086-\u009f\ufffe\uffff]/g;

function scalar(v) {
  if (typeof v === 'string' && PLAIN.test(v) && !RESERVED.test(v)) return v;
  // A JSON scalar is a YAML flow scalar with the same value (strings double-quoted).
  return JSON.stringify(v).replace(UNPRINTABLE, (c) => '\\u' + c.charCodeAt(0).toString(16).padStart(4, '0'));
}

/** A mapping key; one over YAML's 1024-character limit for implicit keys is explicit. */
function key(k, ind) {
  const text = scalar(k);
  return text.length > 1000 ? `? ${text}\n${ind}` : text;
}

function isBlock(v) {
  if (Array.isArray(v)) return v.some((x) => x !== null && typeof x === 'object');
  return v !== null && typeof v === 'object' && Object.keys(v).length > 0;
}

function inline(v) {
  if (Array.isArray(v)) return '[' + v.map(scalar).join(', ') + ']';
  if (v !== null && typeof v === 'object') return '{}';
  return scalar(v);
}

function block(v, ind) {
  const after = (x) => (isBlock(x) ? '\n' + block(x, ind + '  ') : ' ' + inline(x));
  if (Array.isArray(v)) return v.map((x) => ind + '-' + after(x)).join('\n');
  return Object.entries(v).map(([k, x]) => ind + key(k, ind) + ':' + after(x)).join('\n');
}

/** A JSON value as block YAML (lists of scalars in flow style, e.g. commands). */
export function toYaml(v) {
  return (isBlock(v) ? block(v, '') : inline(v)) + '\n';
}

const TYPES = { json: 'application/json', yaml: 'application/yaml' };

/**
 * A form editing the body of `method path`: `initial()` gives the value to start from (null:
 * an empty editor), `done(result)` runs after a success.
 */
export function bodyEditor({ id, method, path, initial, done, label }) {
  const format = h('select', { name: 'format' }, h('option', { value: 'yaml' }, 'YAML'), h('option', { value: 'json' }, 'JSON'));
  const area = h('textarea', { name: 'body', rows: 14, spellcheck: 'false' });
  const errs = h('ul', { class: 'error errors' });
  let rendered = null;
  const render = () => {
    const v = initial();
    if (v === null || v === undefined) return;
    rendered = format.value === 'yaml' ? toYaml(v) : JSON.stringify(v, null, 2);
    area.value = rendered;
  };
  // Switching formats re-renders text that was not edited (YAML is not parsed here); once
  // the text is edited, its format is fixed until it is saved or emptied.
  format.addEventListener('change', () => { if (!area.value || area.value === rendered) render(); });
  area.addEventListener('focus', () => { if (!area.value) render(); });
  area.addEventListener('input', () => { format.disabled = Boolean(area.value) && area.value !== rendered; });
  const form = h('form', { id, class: 'editor' }, h('div', { class: 'bar' }, format, h('button', { type: 'submit' }, label)), area, errs);
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    errs.replaceChildren();
    if (!area.value) render();
    try {
      const result = await api(method, path, area.value, TYPES[format.value]);
      errs.append(h('li', { class: 'ok' }, 'saved'));
      area.value = '';
      rendered = null;
      format.disabled = false;
      if (done) done(result);
    } catch (err) {
      const list = Object.entries(fieldErrors(err));
      if (list.length === 0) errs.append(h('li', {}, err.message));
      for (const [loc, msg] of list) errs.append(h('li', { 'data-loc': loc }, `${loc}: ${msg}`));
    }
  });
  return form;
}

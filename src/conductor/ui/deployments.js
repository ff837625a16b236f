// The deployments page: a live table (rows keyed by id, only changed cells touched), a create
// form whose 422s land on the field they name, and row actions (start/stop, delete).

import { h, setText } from './dom.js';
import { api } from './api.js';
import { deleteButton, fields } from './form.js';
import { bodyEditor } from './editor.js';

const COLUMNS = ['name', 'id', 'node', 'desired', 'current', 'restarts', 'gpu', 'actions'];

/** `GPU 0: 12.5 GiB 80%` per GPU its processes use. */
export function gpuText(status) {
  return (status && status.gpus || []).map((g) => `GPU ${g.gpu_index}: ${(g.memory_bytes / 2 ** 30).toFixed(1)} GiB`
    + (g.util_percent === null || g.util_percent === undefined ? '' : ` ${Math.round(g.util_percent)}%`)).join(', ');
}

function commandOf(text) {
  const t = text.trim();
  if (t.startsWith('[')) return JSON.parse(t);
  return ['sh', '-c', t];
}

/** `a=1, b=2` -> `{a: 1, b: 2}` (numbers where they parse). */
function pairs(text, numbers) {
  const out = {};
  for (const part of text.split(',').map((x) => x.trim()).filter(Boolean)) {
    const [k, ...rest] = part.split('=');
    const v = rest.join('=').trim();
    out[k.trim()] = numbers && /^-?\d+$/.test(v) ? Number(v) : v;
  }
  return out;
}

function createForm(canWrite) {
  if (!canWrite) return null;
  const errors = fields((loc) => loc.replace(/^specification\./, ''));
  const field = errors.field;
  const input = (name, placeholder, type = 'text') => h('input', { name, placeholder, type });
  const name = h('input', { name: 'name', required: true, maxlength: 200, placeholder: 'hello' });
  const command = h('input', { name: 'command', required: true, placeholder: 'while true; do date; sleep 1; done' });
  const group = input('node_group', '(any)');
  const envName = input('env_name', 'conda/uv env');
  const env = input('env', 'A=1, B=2');
  const capacity = input('capacity', 'gpu=1, cpu=4');
  const restart = h('select', { name: 'restart' }, ['', 'always', 'on-failure', 'never'].map((v) => h('option', { value: v }, v || '(default)')));
  const gitRepo = input('git_repo', 'https://github.com/org/repo');
  const gitRef = input('git_ref', 'main, a tag or a SHA');
  const token = input('token', 'git token (kept secret)', 'password');
  const health = input('health', 'tcp:PORT or http://127.0.0.1:PORT/path');
  const cron = input('cron', '0 3 * * *');
  const tz = input('timezone', 'UTC');
  const status = h('span', { class: 'status', role: 'status' });
  const form = h('form', { id: 'create', class: 'card' },
    h('h2', {}, 'New deployment'),
    field('name', 'Name', name),
    field('spec.config.command', 'Command', command),
    field('spec.node_group', 'Group', group),
    field('spec.config.env_name', 'Env', envName),
    field('spec.config.env', 'Variables', env),
    field('spec.capacity_requests', 'Capacity', capacity),
    field('spec.restart_policy', 'Restart', restart),
    field('spec.config.git_repo', 'Git repo', gitRepo),
    field('spec.config.git_ref', 'Git ref', gitRef),
    field('spec.config.token', 'Git token', token),
    field('spec.health_check', 'Health check', health),
    field('spec.auto_restart', 'Cron restart', cron),
    field('spec.auto_restart.timezone', 'Time zone', tz),
    h('button', { type: 'submit' }, 'Create'), status);
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    errors.clear();
    setText(status, '');
    let cmd;
    try { cmd = commandOf(command.value); } catch (e) {
      errors.set('spec.config.command', 'not a JSON list: ' + e.message);
      return;
    }
    const config = { command: cmd };
    const spec = { config };
    const v = (el) => el.value.trim();
    if (v(group)) spec.node_group = v(group);
    if (v(envName)) config.env_name = v(envName);
    if (v(env)) config.env = pairs(v(env), false);
    if (v(capacity)) spec.capacity_requests = pairs(v(capacity), true);
    if (restart.value) spec.restart_policy = { type: restart.value };
    if (v(gitRepo)) config.git_repo = v(gitRepo);
    if (v(gitRef)) config.git_ref = v(gitRef);
    if (token.value) config.token = token.value;
    const hc = v(health);
    if (hc.startsWith('tcp:')) spec.health_check = { type: 'tcp', host: '127.0.0.1', port: Number(hc.slice(4)) };
    else if (hc) spec.health_check = { type: 'http', url: hc };
    if (v(cron)) spec.auto_restart = { enabled: true, cron: v(cron), timezone: v(tz) || 'UTC' };
    try {
      const d = await api('POST', '/deployments', { name: name.value, specification: { spec } });
      setText(status, 'created ' + d.id.slice(0, 8));
      form.reset();
    } catch (err) {
      if (!errors.show(err)) setText(status, err.message);
    }
  });
  return form;
}

export function deploymentsPage(main, live, who) {
  const canWrite = who.role !== 'viewer';
  const search = h('input', { type: 'search', id: 'search', placeholder: 'search name or id' });
  const choice = (id, label) => h('select', { id }, h('option', { value: '' }, label));
  const stateFilter = choice('filter-state', 'any state');
  const nodeFilter = choice('filter-node', 'any node');
  const groupFilter = choice('filter-group', 'any group');
  /** Keeps a select's options equal to `values` (sorted), leaving its choice alone while it
   * is still offered; returns whether the choice had to go (the rows need filtering again). */
  function options(select, values) {
    const want = [...values].sort();
    const have = [...select.options].slice(1).map((o) => o.value);
    if (want.join('\u0000') === have.join('\u0000')) return false;
    const chosen = select.value;
    select.replaceChildren(select.options[0], ...want.map((v) => h('option', { value: v }, v)));
    select.value = want.includes(chosen) ? chosen : '';
    return select.value !== chosen;
  }
  const tbody = h('tbody');
  const count = h('span', { class: 'count' });
  const table = h('table', { id: 'deployments' },
    h('thead', {}, h('tr', {}, COLUMNS.map((c) => h('th', {}, c)))), tbody);
  const empty = h('p', { class: 'empty', hidden: true }, canWrite
    ? 'No deployments yet. Create one with the form above, or with `symphony deploy`.'
    : 'No deployments yet.');
  // The whole body as YAML or JSON, for what the form does not cover.
  const raw = canWrite ? h('details', { class: 'card' }, h('summary', {}, 'New deployment from YAML or JSON'),
    bodyEditor({ id: 'create-raw', method: 'POST', path: '/deployments', label: 'Create',
      initial: () => ({ name: 'hello', desired_state: 'RUNNING', specification: { spec: { config: { command: ['sh', '-c', 'while true; do date; sleep 1; done'] }, restart_policy: { type: 'always' } } } }) })) : null;
  main.replaceChildren(h('section', {}, createForm(canWrite), raw,
    h('div', { class: 'bar' }, search, stateFilter, nodeFilter, groupFilter, count), table, empty));
  const rows = new Map();

  function rowFor(d) {
    let r = rows.get(d.id);
    if (r) return r;
    const cells = Object.fromEntries(COLUMNS.map((c) => [c, h('td', { 'data-col': c })]));
    const link = h('a', { href: '/ui/deployments/' + encodeURIComponent(d.id), 'data-nav': true });
    cells.name.append(link);
    const toggle = h('button', { class: 'toggle' });
    toggle.addEventListener('click', async () => {
      const want = r.desired === 'RUNNING' ? 'STOPPED' : 'RUNNING';
      toggle.disabled = true;
      try { await api('PATCH', '/deployments/' + d.id, { desired_state: want }); }
      catch (err) { setText(r.cells.actions.querySelector('.status') || toggle, err.message); }
      finally { toggle.disabled = false; }
    });
    const del = deleteButton(() => api('DELETE', '/deployments/' + d.id));
    if (canWrite) cells.actions.append(toggle, ' ', del);
    const tr = h('tr', { 'data-id': d.id }, Object.values(cells));
    r = { tr, cells, link, toggle, desired: null, match: false };
    rows.set(d.id, r);
    return r;
  }

  function render(frame, change) {
    if (change && change.deployments && !change.order) {
      renderSome(frame, change);
      // Counted for the browser tests: updates of deployments that touched only their rows.
      if (change.deployments.size) window.symphonyPartial = (window.symphonyPartial || 0) + 1;
    } else {
      renderRows(frame);
    }
  }

  let shown = 0;
  const states = new Set(['RUNNING', 'STOPPED', 'PENDING', 'FAILED']);
  const groups = new Set();

  /** Fills a row from `d`; returns whether it passes the search and filters. */
  function fill(r, d) {
    const q = search.value.trim().toLowerCase();
    const state = d.current_state ?? 'PENDING';
    const group = d.specification && d.specification.spec ? d.specification.spec.node_group : null;
    states.add(state);
    if (group) groups.add(group);
    const match = (!q || d.name.toLowerCase().includes(q) || d.id.startsWith(q))
      && (!stateFilter.value || state === stateFilter.value)
      && (!nodeFilter.value || d.assigned_node_id === nodeFilter.value)
      && (!groupFilter.value || group === groupFilter.value);
    r.tr.hidden = !match;
    setText(r.link, d.name);
    setText(r.cells.id, d.id.slice(0, 8));
    setText(r.cells.node, d.assigned_node_id ?? ('unassigned' + (d.assignment_reason ? ': ' + d.assignment_reason : '')));
    setText(r.cells.desired, d.desired_state);
    setText(r.cells.current, d.current_state ?? '');
    setText(r.cells.restarts, d.status ? d.status.restart_count ?? 0 : '');
    setText(r.cells.gpu, gpuText(d.status));
    r.desired = d.desired_state;
    setText(r.toggle, d.desired_state === 'RUNNING' ? 'Stop' : 'Start');
    if (match !== r.match) shown += match ? 1 : -1;
    r.match = match;
    return match;
  }

  /** The count and the filters' options; true when a filter's choice went away. */
  function counts(total) {
    setText(count, `${shown} of ${total}`);
    empty.hidden = total !== 0;
    return [options(stateFilter, states), options(groupFilter, groups)].some(Boolean);
  }

  /** Only the rows of `ids` changed (no creation, deletion or reordering). */
  function renderSome(frame, change) {
    for (const id of change.deployments) {
      const r = rows.get(id);
      const d = live.byId.get(id);
      if (r && d) fill(r, d);
    }
    const gone = change.nodes.size > 0 && options(nodeFilter, new Set(Object.keys(frame.nodes)));
    if (counts(rows.size) || gone) renderRows(frame);
  }

  function renderRows(frame) {
    // The filters offer what the rows have now (and the four usual states).
    states.clear();
    for (const st of ['RUNNING', 'STOPPED', 'PENDING', 'FAILED']) states.add(st);
    groups.clear();
    const seen = new Set();
    let prev = null;
    for (const d of frame.deployments) {
      seen.add(d.id);
      const r = rowFor(d);
      fill(r, d);
      // Keep the server's order (newest first) without moving rows that are in place.
      const want = prev ? prev.nextSibling : tbody.firstChild;
      if (want !== r.tr) tbody.insertBefore(r.tr, want);
      prev = r.tr;
    }
    for (const [id, r] of rows) {
      if (!seen.has(id)) {
        if (r.match) shown -= 1;
        r.tr.remove();
        rows.delete(id);
      }
    }
    const gone = options(nodeFilter, new Set(Object.keys(frame.nodes)));
    // A filter whose choice went away shows everything again: filter the rows once more.
    if (counts(frame.deployments.length) || gone) renderRows(frame);
  }
  for (const el of [search, stateFilter, nodeFilter, groupFilter]) {
    el.addEventListener(el === search ? 'input' : 'change', () => live.last && render(live.last));
  }
  return live.subscribe(render);
}

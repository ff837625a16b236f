// Envs (conda/uv): the definitions, where each is ready or has a problem (from the nodes'
// reports in the live state), create and edit (packages, script) with the API's 422 on its
// field, rerun, delete.

import { h, setText } from './dom.js';
import { api, paced } from './api.js';
import { deleteButton, fields } from './form.js';

export function envsPage(main, live, who) {
  const canWrite = who.role !== 'viewer';
  const tbody = h('tbody');
  const table = h('table', { id: 'envs' },
    h('thead', {}, h('tr', {}, ['name', 'manager', 'python', 'packages', 'ready on', 'problems', 'actions'].map((c) => h('th', {}, c)))),
    tbody);
  const errors = fields();
  const field = errors.field;
  const name = h('input', { name: 'name', placeholder: 'torch' });
  const python = h('input', { name: 'python_version', placeholder: '3.11' });
  const packages = h('input', { name: 'packages', placeholder: 'numpy, torch==2.4' });
  const manager = h('select', { name: 'manager' }, h('option', { value: 'uv' }, 'uv'), h('option', { value: 'conda' }, 'conda'));
  const script = h('input', { name: 'custom_script', placeholder: 'pip install -e . (optional)' });
  const status = h('span', { class: 'status', role: 'status' });
  const title = h('h2', {}, 'New env');
  const save = h('button', { type: 'submit' }, 'Create');
  const cancel = h('button', { type: 'button', class: 'cancel', hidden: true }, 'Cancel');
  const form = canWrite ? h('form', { id: 'create-env', class: 'card' }, title,
    field('name', 'Name', name), field('python_version', 'Python', python),
    field('packages', 'Packages', packages), field('manager', 'Manager', manager),
    field('custom_script', 'Script', script), save, cancel, status) : null;
  // Editing reuses the form: name, Python and manager are fixed once made.
  let editing = null;
  function edit(e) {
    editing = e ? e.name : null;
    if (form) form.reset();
    errors.clear();
    for (const el of [name, python, manager]) el.disabled = Boolean(e);
    cancel.hidden = !e;
    setText(title, e ? 'Edit env ' + e.name : 'New env');
    setText(save, e ? 'Save' : 'Create');
    if (!e) return;
    name.value = e.name;
    python.value = e.python_version;
    manager.value = e.manager;
    packages.value = e.packages.join(', ');
    script.value = e.custom_script || '';
  }
  cancel.addEventListener('click', () => edit(null));
  main.replaceChildren(h('section', {}, form, table));

  let defs = [];
  let nodes = {};
  const rows = new Map();
  function render() {
    const seen = new Set();
    for (const e of defs) {
      seen.add(e.name);
      let r = rows.get(e.name);
      if (!r) {
        const cells = [0, 1, 2, 3, 4, 5, 6].map(() => h('td'));
        if (canWrite) {
          const rerun = h('button', { class: 'rerun' }, 'Rerun');
          rerun.addEventListener('click', () => api('POST', `/conda-envs/${encodeURIComponent(e.name)}/rerun`).catch((err) => setText(rerun, err.message)));
          const del = deleteButton(async () => {
            await api('DELETE', `/conda-envs/${encodeURIComponent(e.name)}`);
            refresh();
          });
          const change = h('button', { class: 'edit' }, 'Edit');
          change.addEventListener('click', () => edit(defs.find((d) => d.name === e.name)));
          cells[6].append(change, ' ', rerun, ' ', del);
        }
        r = { tr: h('tr', { 'data-name': e.name }, cells), cells };
        rows.set(e.name, r);
        tbody.append(r.tr);
      }
      const ready = Object.values(nodes).filter((n) => n.conda_envs.includes(e.name)).map((n) => n.node_id);
      const problems = Object.values(nodes).flatMap((n) => n.env_problems.filter((p) => p.includes(e.name)).map((p) => `${n.node_id}: ${p}`));
      setText(r.cells[0], e.name);
      setText(r.cells[1], e.manager);
      setText(r.cells[2], e.python_version);
      setText(r.cells[3], e.packages.join(', '));
      setText(r.cells[4], ready.join(', '));
      setText(r.cells[5], problems.join('; '));
    }
    for (const [n, r] of rows) if (!seen.has(n)) { r.tr.remove(); rows.delete(n); }
  }
  const refresh = paced(async () => { defs = await api('GET', '/conda-envs?limit=1000'); render(); });
  if (form) form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    errors.clear();
    setText(status, '');
    try {
      if (editing) {
        await api('PATCH', `/conda-envs/${encodeURIComponent(editing)}`, { packages: packages.value, custom_script: script.value });
        setText(status, 'saved ' + editing);
      } else {
        await api('POST', '/conda-envs', { name: name.value, python_version: python.value, packages: packages.value, manager: manager.value, custom_script: script.value || null });
        setText(status, 'created ' + name.value);
      }
      edit(null);
      refresh();
    } catch (err) {
      if (!errors.show(err)) setText(status, err.message);
    }
  });
  refresh();
  return live.subscribe((frame, change) => {
    nodes = frame.nodes;
    if (change.all || change.nodes.size) { render(); refresh(); }
  });
}

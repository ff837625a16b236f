// Tokens (admins only): join tokens for nodes and API tokens for people and scripts. A new
// token's text is shown once, here, and never again; listing shows ids and states only.

import { h, keyed, setText } from './dom.js';
import { api } from './api.js';
import { deleteButton, fields } from './form.js';

function when(ms) {
  return ms ? new Date(ms).toISOString().replace('T', ' ').slice(0, 16) : '';
}

function stateOf(t, now) {
  if (t.revoked_at_ms) return 'revoked ' + when(t.revoked_at_ms);
  if (t.expires_at_ms !== undefined && t.expires_at_ms <= now) return 'expired';
  if (t.max_uses !== undefined && t.max_uses !== null && t.uses >= t.max_uses) return 'used up';
  return 'active';
}

/** A form that POSTs `body()` to `path`, shows the new token once, and calls `done`. */
function creator(id, title, path, inputs, body, done) {
  const errors = fields();
  const shown = h('div', { class: 'secret', hidden: true, 'data-secret': '' });
  const status = h('span', { class: 'status', role: 'status' });
  const form = h('form', { id, class: 'card' }, h('h2', {}, title),
    inputs.map(([name, label, el]) => errors.field(name, label, el)),
    h('button', { type: 'submit' }, 'Create'), status, shown);
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    errors.clear();
    setText(status, '');
    try {
      const made = await api('POST', path, body());
      shown.replaceChildren(h('p', {}, 'Copy it now: it is not shown again.'), h('code', {}, made.token));
      shown.hidden = false;
      done();
    } catch (err) {
      if (!errors.show(err)) setText(status, err.message);
    }
  });
  return form;
}

function table(id, columns) {
  const tbody = h('tbody');
  return { tbody, el: h('table', { id }, h('thead', {}, h('tr', {}, columns.map((c) => h('th', {}, c)))), tbody) };
}

export function tokensPage(main, live) {
  const groups = h('input', { name: 'groups', placeholder: 'gpu, a100' });
  const ttl = h('input', { name: 'ttl_sec', type: 'number', min: 1, placeholder: '3600' });
  const uses = h('input', { name: 'uses', type: 'number', min: 1, placeholder: 'any' });
  const prefix = h('input', { name: 'node_id_prefix', placeholder: 'node-' });
  const joins = table('join-tokens', ['id', 'groups', 'node ids', 'uses', 'expires', 'state', '']);
  const name = h('input', { name: 'name', placeholder: 'ci' });
  const role = h('select', { name: 'role' }, ['viewer', 'operator', 'admin'].map((r) => h('option', { value: r }, r)));
  const apis = table('api-tokens', ['id', 'name', 'role', 'created', 'state', '']);

  const num = (el) => (el.value.trim() ? Number(el.value) : undefined);
  async function refresh() {
    const now = Date.now();
    // The state depends on the time too: it is part of what keys a row's rebuild.
    const [j, a] = (await Promise.all([api('GET', '/tokens'), api('GET', '/api-tokens')]))
      .map((list) => list.map((t) => ({ ...t, state: stateOf(t, now) })));
    keyed(joins.tbody, j, (t) => t.id, (t) => h('tr', { 'data-id': t.id },
      h('td', {}, t.id), h('td', {}, t.groups.join(', ')), h('td', {}, t.node_id_prefix + '…'),
      h('td', {}, `${t.uses}${t.max_uses === null ? '' : ' / ' + t.max_uses}`), h('td', {}, when(t.expires_at_ms)),
      h('td', { 'data-col': 'state' }, t.state),
      h('td', {}, t.revoked_at_ms ? '' : deleteButton(async () => { await api('DELETE', '/tokens/' + encodeURIComponent(t.id)); refresh(); }, 'Revoke', 'revoke'))));
    keyed(apis.tbody, a, (t) => t.id, (t) => h('tr', { 'data-id': t.id },
      h('td', {}, t.id), h('td', {}, t.name), h('td', {}, t.role), h('td', {}, when(t.created_at_ms)),
      h('td', { 'data-col': 'state' }, t.state),
      h('td', {}, t.revoked_at_ms ? '' : deleteButton(async () => { await api('DELETE', '/api-tokens/' + encodeURIComponent(t.id)); refresh(); }, 'Revoke', 'revoke'))));
  }
  const failed = h('p', { class: 'error', role: 'alert' });
  const load = () => refresh().catch((err) => setText(failed, err.message));

  main.replaceChildren(h('section', {}, failed,
    creator('create-join-token', 'New join token (a node joins with it: SYMPHONY_JOIN_TOKEN)', '/tokens',
      [['groups', 'Groups', groups], ['ttl_sec', 'Valid for (s)', ttl], ['uses', 'Uses', uses], ['node_id_prefix', 'Node id prefix', prefix]],
      () => ({
        groups: groups.value.split(',').map((g) => g.trim()).filter(Boolean),
        ttl_sec: num(ttl), uses: num(uses), node_id_prefix: prefix.value.trim() || undefined,
      }), load),
    h('h3', {}, 'Join tokens'), joins.el,
    creator('create-api-token', 'New API token', '/api-tokens', [['name', 'Name', name], ['role', 'Role', role]],
      () => ({ name: name.value, role: role.value }), load),
    h('h3', {}, 'API tokens'), apis.el));
  // Uses change when nodes enroll: read (again) when a node appears, and every 30 s (tokens
  // expire, and other admins make and revoke them).
  let known = null;
  const unsubscribe = live.subscribe((frame) => {
    const ids = Object.keys(frame.nodes);
    if (!known || ids.some((id) => !known.has(id))) { known = new Set(ids); load(); }
  });
  const timer = setInterval(load, 30000);
  return () => { clearInterval(timer); unsubscribe(); };
}

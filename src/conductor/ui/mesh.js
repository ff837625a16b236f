// Experiments (processes by group, with their nodes and states; stop/start/delete) and
// services (binder, connectors, the path each connector's tunnels take; exposed ones link
// to the conductor's proxy). Both lists are read again (paced) when the live state changes; an
// item's element is rebuilt only when the item changed.

import { h, keyed, setText } from './dom.js';
import { api, paced } from './api.js';
import { deleteButton } from './form.js';

/** Re-reads `path` (paced) when the live state changes and renders it. */
function polled(live, path, render) {
  const read = paced(async () => render(await api('GET', path)));
  read();
  return live.subscribe(() => read());
}

export function experimentsPage(main, live, who) {
  const canWrite = who.role !== 'viewer';
  const list = h('div', { id: 'experiments' });
  main.replaceChildren(h('section', {}, list));
  return polled(live, '/experiments', (exps) => {
    keyed(list, exps, (e) => e.name, (e) => {
      const actions = [];
      if (canWrite) {
        const want = e.state === 'stopped' ? 'RUNNING' : 'STOPPED';
        const toggle = h('button', { class: 'toggle' }, want === 'RUNNING' ? 'Start' : 'Stop');
        toggle.addEventListener('click', () => api('PATCH', `/experiments/${encodeURIComponent(e.name)}`, { desired_state: want }).catch((err) => setText(toggle, err.message)));
        const del = deleteButton(() => api('DELETE', `/experiments/${encodeURIComponent(e.name)}`));
        actions.push(toggle, ' ', del);
      }
      const groups = new Map();
      for (const p of e.processes) {
        const g = p.group ?? '(no group)';
        if (!groups.has(g)) groups.set(g, []);
        groups.get(g).push(p);
      }
      return h('article', { class: 'card exp', 'data-name': e.name },
        h('h2', {}, e.name, ' ', h('span', { class: 'status' }, `${e.state}${e.reason ? ': ' + e.reason : ''}`)), ...actions,
        h('table', {}, h('thead', {}, h('tr', {}, ['group', 'process', 'node', 'state', 'restarts', 'exit'].map((c) => h('th', {}, c)))),
          h('tbody', {}, [...groups].flatMap(([g, ps]) => ps.map((p) => h('tr', { 'data-process': p.name },
            h('td', {}, g),
            h('td', {}, h('a', { href: '/ui/deployments/' + encodeURIComponent(p.deployment_id), 'data-nav': true }, p.name)),
            h('td', {}, p.node_id ?? ''), h('td', {}, p.current_state), h('td', {}, p.restarts), h('td', {}, p.last_exit_code ?? '')))))));
    });
  });
}

export function servicesPage(main, live) {
  const tbody = h('tbody');
  main.replaceChildren(h('section', {}, h('table', { id: 'services' },
    h('thead', {}, h('tr', {}, ['namespace', 'service', 'port', 'binder', 'node', 'connectors', 'paths', 'exposed'].map((c) => h('th', {}, c)))), tbody)));
  return polled(live, '/services', (services) => {
    keyed(tbody, services, (s) => `${s.namespace}/${s.name}`, (s) => h('tr', { 'data-service': `${s.namespace}/${s.name}` },
      h('td', {}, s.namespace), h('td', {}, s.name), h('td', {}, s.port),
      h('td', {}, h('a', { href: '/ui/deployments/' + encodeURIComponent(s.deployment_id), 'data-nav': true }, s.deployment_name)),
      h('td', {}, s.node_id ?? ''), h('td', {}, s.connectors.length),
      h('td', {}, s.paths.map((p) => `${p.node_id}: ${p.path}${p.rtt_ms != null ? ` (${p.rtt_ms.toFixed(1)} ms)` : ''}`).join(', ')),
      h('td', {}, s.exposed ? h('a', { href: `/services/${encodeURIComponent(s.namespace)}/${encodeURIComponent(s.name)}/` }, 'open') : '')));
  });
}

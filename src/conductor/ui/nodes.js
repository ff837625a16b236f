// The nodes page (first cut): state, groups, reserved vs total capacity, connection facts.

import { h, setText } from './dom.js';

export function nodesPage(main, live) {
  const tbody = h('tbody');
  const table = h('table', { id: 'nodes' },
    h('thead', {}, h('tr', {}, ['node', 'state', 'groups', 'capacity (reserved / total)', 'rtt', 'certificate'].map((c) => h('th', {}, c)))),
    tbody);
  main.replaceChildren(h('section', {}, table));
  const rows = new Map();
  return live.subscribe((frame) => {
    const seen = new Set();
    for (const n of Object.values(frame.nodes)) {
      seen.add(n.node_id);
      let r = rows.get(n.node_id);
      if (!r) {
        const cells = [0, 1, 2, 3, 4, 5].map(() => h('td'));
        r = { tr: h('tr', { 'data-id': n.node_id }, cells), cells };
        rows.set(n.node_id, r);
        tbody.append(r.tr);
      }
      const caps = Object.entries(n.capacities_total)
        .map(([k, v]) => `${k}: ${n.total_capacities_used[k] ?? 0} / ${v}`).join(', ');
      setText(r.cells[0], n.node_id);
      setText(r.cells[1], n.state);
      setText(r.cells[2], n.groups.join(', '));
      setText(r.cells[3], caps);
      setText(r.cells[4], n.connection ? n.connection.rtt_ms.toFixed(2) + ' ms' : '');
      setText(r.cells[5], n.certificate ? n.certificate.state : '');
    }
    for (const [id, r] of rows) if (!seen.has(id)) { r.tr.remove(); rows.delete(id); }
  });
}

// Nodes: one card each, updated in place. State, groups, connection facts, capacity reserved
// vs total beside measured use, CPU per core, memory, disks, GPUs, and short history charts
// (kept in the page from the live updates: the last HISTORY samples).

import { h, setText } from './dom.js';
import { sparkline } from './chart.js';
import { api } from './api.js';
import { deleteButton } from './form.js';

const HISTORY = 120;
const GiB = 2 ** 30;

function pct(x) { return (x ?? 0).toFixed(0) + ' %'; }
function gib(b) { return (b / GiB).toFixed(1); }

function bar(percent) {
  const fill = h('span', { class: 'fill' });
  const el = h('span', { class: 'meter' }, fill);
  el.set = (p) => { fill.style.width = Math.max(0, Math.min(100, p ?? 0)).toFixed(1) + '%'; };
  el.set(percent);
  return el;
}

function card(id, admin) {
  const f = {};
  for (const k of ['state', 'groups', 'connection', 'capacity', 'cpu', 'memory', 'disks', 'certificate', 'deployments', 'problems']) f[k] = h('dd', { 'data-fact': k });
  const dl = h('dl', { class: 'facts' }, Object.entries(f).map(([k, dd]) => [h('dt', {}, k), dd]));
  const cores = h('div', { class: 'cores' });
  const cpuChart = h('div', { class: 'chart', 'data-chart': 'cpu' });
  const memBar = bar(0);
  const gpus = h('div', { class: 'gpus' });
  // Revoking is for admins: its certificate stops working at once and its work moves.
  const revoke = admin ? deleteButton(() => api('POST', `/nodes/${encodeURIComponent(id)}/revoke`, { reason: 'revoked from the web UI' }), 'Revoke', 'revoke') : null;
  const el = h('article', { class: 'node card', 'data-id': id }, h('h2', {}, id, ' ', revoke), dl,
    h('div', { class: 'charts' }, h('div', {}, h('h4', {}, 'CPU per core'), cores),
      h('div', {}, h('h4', {}, 'CPU total (history)'), cpuChart),
      h('div', {}, h('h4', {}, 'memory'), memBar)), gpus);
  return { el, revoke, f, cores, cpuChart, memBar, gpus, coreBars: [], gpuCards: new Map(), cpuHist: [], gpuHist: new Map(), lastTs: null };
}

function update(c, n) {
  const s = n.state + (n.schedulable ? '' : ' (not schedulable)');
  setText(c.f.state, s);
  setText(c.f.groups, n.groups.join(', '));
  const conn = n.connection;
  setText(c.f.connection, conn ? `${conn.remote_addr}, rtt ${conn.rtt_ms.toFixed(2)} ms, ${conn.path_changes} path changes, ${conn.reconnects} reconnects` : 'not connected');
  const cpuUse = n.cpu.dynamic ? n.cpu.dynamic.total_percent : null;
  const memUse = n.memory.dynamic ? n.memory.dynamic.used_percent : null;
  setText(c.f.capacity, Object.entries(n.capacities_total)
    .map(([k, v]) => `${k}: ${n.total_capacities_used[k] ?? 0} / ${v} reserved`).join(', ') +
    ` — measured: cpu ${cpuUse === null ? '?' : pct(cpuUse)}, memory ${memUse === null ? '?' : pct(memUse)}`);
  setText(c.f.cpu, `${n.cpu.static.logical_cores} cores` + (cpuUse === null ? '' : `, ${pct(cpuUse)}`));
  const mem = n.memory;
  setText(c.f.memory, mem.dynamic ? `${gib(mem.dynamic.used_bytes)} / ${gib(mem.static.total_bytes)} GiB` : `${gib(mem.static.total_bytes)} GiB`);
  c.memBar.set(memUse);
  setText(c.f.disks, n.storage_mounts.map((m) => `${m.mount_point} ${pct(m.used_percent)} of ${gib(m.total_bytes)} GiB`).join(', '));
  if (c.revoke) c.revoke.hidden = Boolean(n.certificate && n.certificate.state === 'revoked');
  setText(c.f.certificate, n.certificate ? n.certificate.state + (n.certificate.reason ? ': ' + n.certificate.reason : '') : '');
  setText(c.f.deployments, n.assigned_deployments.map((d) => d.name).join(', '));
  setText(c.f.problems, (n.problems || []).concat(n.env_problems).join('; '));

  const perCore = n.cpu.dynamic ? n.cpu.dynamic.per_core : [];
  while (c.coreBars.length < perCore.length) { const b = bar(0); b.setAttribute('data-core', c.coreBars.length); c.coreBars.push(b); c.cores.append(b); }
  perCore.forEach((core, i) => c.coreBars[i].set(core.used_percent));

  // History: one sample per heartbeat (the snapshot repeats between them).
  const ts = n.dynamic_timestamp_unix_ms;
  if (ts && ts !== c.lastTs) {
    c.lastTs = ts;
    c.cpuHist.push(cpuUse ?? 0);
    if (c.cpuHist.length > HISTORY) c.cpuHist.shift();
    c.cpuChart.replaceChildren(sparkline(c.cpuHist, 100));
    for (const g of n.gpus) {
      const hist = c.gpuHist.get(g.index) || [];
      hist.push(g.util_percent);
      if (hist.length > HISTORY) hist.shift();
      c.gpuHist.set(g.index, hist);
    }
    c.redraw = true;
  }
  for (const g of n.gpus) {
    let gc = c.gpuCards.get(g.index);
    if (!gc) {
      gc = { text: h('p'), chart: h('div', { class: 'chart', 'data-chart': 'gpu' }) };
      gc.el = h('div', { class: 'gpu', 'data-gpu': g.index }, h('h4', {}, `GPU ${g.index}`), gc.text, gc.chart);
      c.gpuCards.set(g.index, gc);
      c.gpus.append(gc.el);
    }
    setText(gc.text, `${g.name}: ${pct(g.util_percent)} util, ${gib(g.mem_used_bytes)} / ${gib(g.mem_total_bytes)} GiB, ${g.temperature_c.toFixed(0)} °C, ${g.power_w.toFixed(0)} W`);
    if (c.redraw || !gc.chart.firstChild) gc.chart.replaceChildren(sparkline(c.gpuHist.get(g.index) || [], 100));
  }
  c.redraw = false;
}

export function nodesPage(main, live, who) {
  const admin = who.role === 'admin';
  const list = h('div', { id: 'nodes' });
  main.replaceChildren(h('section', {}, list));
  const cards = new Map();
  return live.subscribe((frame, change) => {
    if (!change.all) {
      // Only the nodes that changed or went.
      for (const id of change.nodes) {
        const n = frame.nodes[id];
        const c = cards.get(id);
        if (!n) { if (c) { c.el.remove(); cards.delete(id); } continue; }
        if (c) update(c, n);
        else { const fresh = card(id, admin); cards.set(id, fresh); list.append(fresh.el); update(fresh, n); }
      }
      return;
    }
    const seen = new Set();
    for (const n of Object.values(frame.nodes)) {
      seen.add(n.node_id);
      let c = cards.get(n.node_id);
      if (!c) { c = card(n.node_id, admin); cards.set(n.node_id, c); list.append(c.el); }
      update(c, n);
    }
    for (const [id, c] of cards) if (!seen.has(id)) { c.el.remove(); cards.delete(id); }
  });
}

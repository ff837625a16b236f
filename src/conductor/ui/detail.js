// One deployment: its state (live), its spec (secrets arrive masked), its events (stored, then
// live) and its logs (live, with stream filter, pause/follow, search, download and a cap).

import { h, setText } from './dom.js';
import { api } from './api.js';
import { bodyEditor, toYaml } from './editor.js';
import { gpuText } from './deployments.js';

const LINE_CAP = 5000;
const STREAMS = ['stdout', 'stderr', 'system'];

function wsUrl(path) {
  return (location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host + path;
}

function time(ms) {
  return new Date(ms).toISOString().replace('T', ' ').slice(0, 23);
}

export function detailPage(main, live, id) {
  const facts = {};
  const dl = h('dl', { class: 'facts' });
  for (const k of ['name', 'desired', 'current', 'node', 'generation', 'restarts', 'last exit', 'reason', 'gpu']) {
    facts[k] = h('dd', { 'data-fact': k });
    dl.append(h('dt', {}, k), facts[k]);
  }
  const spec = h('pre', { id: 'spec' });
  const events = h('ol', { id: 'events', class: 'events' });
  const logBox = h('div', { id: 'logs', class: 'logs' });
  const search = h('input', { type: 'search', placeholder: 'filter lines' });
  const pause = h('button', { type: 'button' }, 'Pause');
  const download = h('button', { type: 'button' }, 'Download');
  const tail = h('select', {}, ['200', '1000', '5000'].map((n) => h('option', { value: n }, n)));
  const boxes = Object.fromEntries(STREAMS.map((s) => [s, h('input', { type: 'checkbox', checked: true, value: s })]));
  const logState = h('span', { class: 'status' });
  main.replaceChildren(h('section', { class: 'detail' },
    h('p', {}, h('a', { href: '/ui/deployments', 'data-nav': true }, '← deployments')),
    dl,
    h('h3', {}, 'Logs'),
    h('div', { class: 'bar' }, tail, STREAMS.map((s) => h('label', { class: 'inline' }, boxes[s], s)),
      search, pause, download, logState),
    logBox,
    h('h3', {}, 'Events'), events,
    h('h3', {}, 'Specification'), spec,
    h('h3', {}, 'Edit'),
    // The PATCH body as YAML or JSON: the git token stays masked; sent back unchanged it is
    // kept (for the same repository).
    bodyEditor({ id: 'edit-spec', method: 'PATCH', path: '/deployments/' + encodeURIComponent(id), label: 'Save',
      initial: () => { const d = live.byId.get(id); return d ? { name: d.name, specification: d.specification } : null; } })));

  const lines = [];
  let paused = false;
  let logSocket = null;
  let eventSocket = null;
  let closed = false;

  const shown = (l) => !search.value || l.line.includes(search.value);
  function addLines(entries) {
    const frag = document.createDocumentFragment();
    for (const e of entries) {
      lines.push(e);
      const div = h('div', { class: 'line ' + e.stream, 'data-stream': e.stream },
        h('span', { class: 't' }, time(e.timestamp_unix_ms)), ' ', h('span', { class: 's' }, `[${e.stream}]`), ' ', e.line);
      div.hidden = !shown(e);
      frag.append(div);
    }
    logBox.append(frag);
    while (lines.length > LINE_CAP) { lines.shift(); logBox.firstChild.remove(); }
    if (!paused) logBox.scrollTop = logBox.scrollHeight;
  }
  search.addEventListener('input', () => {
    [...logBox.children].forEach((div, i) => { div.hidden = !shown(lines[i]); });
  });
  pause.addEventListener('click', () => {
    paused = !paused;
    setText(pause, paused ? 'Follow' : 'Pause');
    if (!paused) logBox.scrollTop = logBox.scrollHeight;
  });
  download.addEventListener('click', () => {
    const text = lines.map((l) => `${time(l.timestamp_unix_ms)} [${l.stream}] ${l.line}`).join('\n');
    const a = h('a', { href: URL.createObjectURL(new Blob([text + '\n'], { type: 'text/plain' })), download: `${id}.log` });
    a.click();
    URL.revokeObjectURL(a.href);
  });
  function openLogs() {
    if (logSocket) logSocket.close();
    lines.length = 0;
    logBox.replaceChildren();
    const streams = STREAMS.filter((s) => boxes[s].checked);
    if (streams.includes('system')) streams.push('system-hc', 'system-ar');
    const q = new URLSearchParams({ tail: tail.value, streams: streams.join(',') });
    const ws = new WebSocket(wsUrl(`/ws/deployments/${encodeURIComponent(id)}/logs?${q}`));
    logSocket = ws;
    ws.onopen = () => setText(logState, 'streaming');
    ws.onmessage = (ev) => {
      const f = JSON.parse(ev.data);
      if (f.error) setText(logState, f.error);
      else addLines(f.entries);
    };
    ws.onclose = () => {
      if (logSocket === ws && !closed) {
        setText(logState, 'disconnected; reconnecting…');
        setTimeout(() => { if (logSocket === ws && !closed) openLogs(); }, 1000);
      }
    };
  }
  tail.addEventListener('change', openLogs);
  for (const b of Object.values(boxes)) b.addEventListener('change', openLogs);
  openLogs();

  let lastEvent = 0;
  function addEvents(list) {
    for (const e of list) {
      if (e.id <= lastEvent) continue;
      lastEvent = e.id;
      events.append(h('li', { 'data-kind': e.kind }, h('span', { class: 't' }, time(e.at_ms)), ' ', h('code', {}, e.kind), ' ', e.message));
    }
  }
  api('GET', `/deployments/${encodeURIComponent(id)}/events?limit=200`).then((list) => {
    addEvents(list);
    if (closed) return;
    const q = new URLSearchParams({ after: String(lastEvent), object: `deployment/${id}` });
    eventSocket = new WebSocket(wsUrl(`/ws/events?${q}`));
    eventSocket.onmessage = (ev) => addEvents(JSON.parse(ev.data).events || []);
  }).catch(() => {});

  let specShown = null;
  const unsubscribe = live.subscribe((frame, change) => {
    if (!change.all && !change.deployments.has(id)) return;
    const d = live.byId.get(id);
    if (!d) { setText(facts.current, 'deleted'); return; }
    const st = d.status || {};
    setText(facts.name, d.name);
    setText(facts.desired, d.desired_state);
    setText(facts.current, d.current_state ?? '');
    setText(facts.node, d.assigned_node_id ?? 'unassigned');
    setText(facts.generation, st.generation ?? '');
    setText(facts.restarts, st.restart_count ?? '');
    setText(facts['last exit'], st.last_exit_code ?? '');
    setText(facts.reason, st.reason ?? d.assignment_reason ?? '');
    setText(facts.gpu, gpuText(st));
    if (d.updated_at_ms !== specShown) {
      specShown = d.updated_at_ms;
      setText(spec, toYaml(d.specification));
    }
  });
  return () => {
    closed = true;
    unsubscribe();
    if (logSocket) logSocket.close();
    if (eventSocket) eventSocket.close();
  };
}

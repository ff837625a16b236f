// Workflow runs: the workflows (start a run with parameters), the runs (newest first, with
// progress), and one run's DAG by levels with each task's live state, attempts and a link to
// its logs (the deployment its attempts ran as). Read again (paced) as the live state moves.

import { h, keyed, setText } from './dom.js';
import { api, paced } from './api.js';
import { deleteButton } from './form.js';

function age(ms) {
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  if (s < 60) return s + 's';
  if (s < 3600) return Math.round(s / 60) + 'm';
  return Math.round(s / 3600) + 'h';
}

function progress(p) {
  return `${p.done}/${p.total} done, ${p.running} running, ${p.failed} failed`;
}

export function runsPage(main, live, who) {
  const canWrite = who.role !== 'viewer';
  const workflows = h('tbody');
  const runs = h('tbody');
  const status = h('span', { class: 'status', role: 'status' });
  main.replaceChildren(h('section', {},
    h('h3', {}, 'Workflows'), status,
    h('table', { id: 'workflows' }, h('thead', {}, h('tr', {}, ['name', 'version', 'tasks', 'running', 'queued', 'marks', ''].map((c) => h('th', {}, c)))), workflows),
    h('h3', {}, 'Runs'),
    h('table', { id: 'runs' }, h('thead', {}, h('tr', {}, ['run', 'workflow', 'state', 'progress', 'age', 'reason'].map((c) => h('th', {}, c)))), runs)));
  const read = paced(async () => {
    const [ws, rs] = await Promise.all([api('GET', '/workflows'), api('GET', '/runs?limit=500')]);
    keyed(workflows, ws, (w) => w.name, (w) => {
      const params = h('input', { name: 'params', placeholder: 'k=v, k2=v2' });
      const start = h('button', { class: 'start-run' }, 'Start run');
      start.addEventListener('click', async () => {
        const p = {};
        for (const part of params.value.split(',').map((x) => x.trim()).filter(Boolean)) {
          const [k, ...v] = part.split('=');
          p[k.trim()] = v.join('=').trim();
        }
        try {
          const run = await api('POST', `/workflows/${encodeURIComponent(w.name)}/runs`, { params: p });
          setText(status, `run ${run.id} ${run.state.toLowerCase()}`);
          read();
        } catch (err) { setText(status, err.message); }
      });
      const marks = w.max_running ? `${w.max_running} / ${w.resume_below ?? w.max_running}` : '';
      return h('tr', { 'data-name': w.name }, h('td', {}, w.name), h('td', {}, w.version), h('td', {}, w.tasks),
        h('td', {}, w.running), h('td', {}, w.queued), h('td', {}, marks), h('td', {}, canWrite ? [params, ' ', start] : ''));
    });
    keyed(runs, rs, (r) => r.id, (r) => h('tr', { 'data-id': r.id },
      h('td', {}, h('a', { href: '/ui/runs/' + encodeURIComponent(r.id), 'data-nav': true }, r.id)),
      h('td', {}, `${r.workflow} v${r.version}`), h('td', { 'data-col': 'state' }, r.state),
      h('td', {}, progress(r.tasks)), h('td', {}, age(r.queued_at_ms)), h('td', {}, r.reason ?? '')));
  });
  read();
  return live.subscribe(() => read());
}

export function runPage(main, live, who, id) {
  const canWrite = who.role !== 'viewer';
  const title = h('h2', {}, 'run ' + id);
  const facts = h('p', { class: 'status', id: 'run-facts' });
  const actions = h('span');
  const dag = h('div', { id: 'dag', class: 'dag' });
  main.replaceChildren(h('section', {},
    h('p', {}, h('a', { href: '/ui/runs', 'data-nav': true }, '← runs')), title, facts, actions, dag));
  let shownState = null;
  const read = paced(async () => {
    const run = await api('GET', `/runs/${encodeURIComponent(id)}`);
    setText(title, `run ${run.id} of ${run.workflow} v${run.version}`);
    setText(facts, `${run.state}: ${progress(run.progress)}${run.reason ? ' — ' + run.reason : ''}`);
    if (canWrite && run.state !== shownState) {
      shownState = run.state;
      const buttons = [];
      if (run.state === 'RUNNING' || run.state === 'QUEUED') {
        buttons.push(deleteButton(async () => { await api('POST', `/runs/${encodeURIComponent(id)}/cancel`); read(); }, 'Cancel', 'cancel'));
      }
      if (run.state === 'FAILED' || run.state === 'CANCELLED') {
        const retry = h('button', { class: 'retry' }, 'Retry failed tasks');
        retry.addEventListener('click', async () => {
          try { await api('POST', `/runs/${encodeURIComponent(id)}/retry`); read(); } catch (err) { setText(retry, err.message); }
        });
        buttons.push(retry);
      }
      actions.replaceChildren(...buttons);
    }
    // Levels: a task sits one level below the deepest task it depends on.
    const level = new Map();
    for (const t of run.tasks) {
      level.set(t.name, t.depends_on.reduce((m, d) => Math.max(m, (level.get(d) ?? 0) + 1), 0));
    }
    const columns = [];
    for (const t of run.tasks) {
      const l = level.get(t.name);
      (columns[l] ||= []).push(t);
    }
    keyed(dag, columns.map((tasks, l) => ({ l, tasks })), (c) => String(c.l), (c) => h('div', { class: 'level' },
      c.tasks.map((t) => {
        const a = t.attempts[t.attempts.length - 1];
        const lines = [];
        if (a) lines.push(`attempt ${t.attempts.length}/${t.max_attempts}${a.node_id ? ' on ' + a.node_id : ''}${a.exit_code !== null && a.exit_code !== undefined ? ', exit ' + a.exit_code : ''}`);
        if (t.depends_on.length) lines.push('after ' + t.depends_on.join(', '));
        if (t.reason) lines.push(t.reason);
        if (t.result !== null && t.result !== undefined) lines.push('result ' + JSON.stringify(t.result));
        return h('div', { class: 'task state-' + t.state.toLowerCase(), 'data-task': t.name },
          h('strong', {}, t.name), ' ', h('span', { class: 'task-state' }, t.state),
          lines.map((x) => h('div', { class: 'status' }, x)),
          t.deployment_id ? h('a', { href: '/ui/deployments/' + encodeURIComponent(t.deployment_id), 'data-nav': true }, 'logs') : null);
      })));
  }, 500);
  read();
  return live.subscribe(() => read());
}

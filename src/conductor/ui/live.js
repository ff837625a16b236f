// Live state from /ws/updates?frames=delta: one snapshot, then only what changed. Keeps the
// whole state (`deployments` newest first, `nodes` by id) and tells listeners what changed,
// so a page touches only those rows. Reconnects with backoff and shows a banner while the
// socket is down.

export class Live {
  constructor(banner) {
    this.banner = banner;
    this.listeners = new Set();
    /** `{deployments: [...], nodes: {...}}`, or null before the first frame. */
    this.last = null;
    this.byId = new Map();
    this.delay = 250;
    this.connect();
  }

  /**
   * `fn(state, change)`: `change.all` after a snapshot; otherwise `change.deployments` and
   * `change.nodes` are the ids that changed or went, and `change.order` says whether the
   * list of deployments changed.
   */
  subscribe(fn) {
    this.listeners.add(fn);
    if (this.last) fn(this.last, { all: true });
    return () => this.listeners.delete(fn);
  }

  apply(frame) {
    if (frame.type === 'snapshot') {
      this.byId = new Map(frame.deployments.map((d) => [d.id, d]));
      this.last = { deployments: frame.deployments, nodes: frame.nodes };
      return { all: true };
    }
    if (frame.type !== 'delta' || !this.last) return null;
    const change = { deployments: new Set(), nodes: new Set(), order: Boolean(frame.order) };
    for (const id of frame.removed_deployments) { this.byId.delete(id); change.deployments.add(id); }
    for (const d of frame.deployments) { this.byId.set(d.id, d); change.deployments.add(d.id); }
    const ids = frame.order || this.last.deployments.map((d) => d.id);
    const nodes = { ...this.last.nodes };
    for (const id of frame.removed_nodes) { delete nodes[id]; change.nodes.add(id); }
    for (const [id, n] of Object.entries(frame.nodes)) { nodes[id] = n; change.nodes.add(id); }
    this.last = { deployments: ids.map((id) => this.byId.get(id)).filter(Boolean), nodes };
    return change;
  }

  connect() {
    const scheme = location.protocol === 'https:' ? 'wss://' : 'ws://';
    // `?frames=snapshot` on the page's URL asks for the original's full frames (the bench's
    // baseline); the page then renders everything on every frame.
    const frames = new URLSearchParams(location.search).get('frames') === 'snapshot' ? 'snapshot' : 'delta';
    const ws = new WebSocket(scheme + location.host + '/ws/updates?frames=' + frames);
    ws.onopen = () => {
      this.delay = 250;
      this.banner.hidden = true;
    };
    ws.onmessage = (ev) => {
      let frame;
      try { frame = JSON.parse(ev.data); } catch { return; }
      const started = performance.now();
      const change = this.apply(frame);
      if (!change) return;
      for (const fn of this.listeners) fn(this.last, change);
      // What each frame cost the page (parse excluded), for the browser tests and the bench.
      const ms = performance.now() - started;
      const m = (window.symphonyRender ||= { count: 0, first_at_ms: null, last_ms: 0, max_ms: 0, total_ms: 0, bytes: 0 });
      m.count += 1;
      m.bytes += ev.data.length;
      m.last_ms = ms;
      m.max_ms = Math.max(m.max_ms, ms);
      m.total_ms += ms;
      if (m.first_at_ms === null) m.first_at_ms = performance.now();
    };
    ws.onclose = () => {
      // Counted for the browser tests (and anyone curious in the console).
      window.symphonyDisconnects = (window.symphonyDisconnects || 0) + 1;
      this.banner.textContent = 'Connection to the conductor lost; reconnecting…';
      this.banner.hidden = false;
      setTimeout(() => this.connect(), this.delay);
      this.delay = Math.min(this.delay * 2, 5000);
    };
  }
}

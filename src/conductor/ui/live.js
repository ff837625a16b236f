// Live state from /ws/updates: a snapshot per change. Reconnects with backoff and shows a
// banner while the socket is down.

export class Live {
  constructor(banner) {
    this.banner = banner;
    this.listeners = new Set();
    this.last = null;
    this.delay = 250;
    this.connect();
  }

  subscribe(fn) {
    this.listeners.add(fn);
    if (this.last) fn(this.last);
    return () => this.listeners.delete(fn);
  }

  connect() {
    const scheme = location.protocol === 'https:' ? 'wss://' : 'ws://';
    const ws = new WebSocket(scheme + location.host + '/ws/updates');
    ws.onopen = () => {
      this.delay = 250;
      this.banner.hidden = true;
    };
    ws.onmessage = (ev) => {
      let frame;
      try { frame = JSON.parse(ev.data); } catch { return; }
      if (frame.type !== 'snapshot') return;
      this.last = frame;
      for (const fn of this.listeners) fn(frame);
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

// A small SVG line chart of recent samples (ours: no chart library).

const NS = 'http://www.w3.org/2000/svg';

/** A sparkline of `values` (0..max) as an SVG element. */
export function sparkline(values, max, width = 240, height = 40) {
  const svg = document.createElementNS(NS, 'svg');
  svg.setAttribute('viewBox', `0 0 ${width} ${height}`);
  svg.setAttribute('width', String(width));
  svg.setAttribute('height', String(height));
  svg.setAttribute('class', 'spark');
  const base = document.createElementNS(NS, 'line');
  base.setAttribute('x1', '0'); base.setAttribute('x2', String(width));
  base.setAttribute('y1', String(height - 0.5)); base.setAttribute('y2', String(height - 0.5));
  base.setAttribute('class', 'axis');
  svg.append(base);
  if (values.length > 1) {
    const step = width / (values.length - 1);
    const pts = values.map((v, i) => `${(i * step).toFixed(1)},${(height - 1 - (Math.min(v, max) / max) * (height - 2)).toFixed(1)}`);
    const line = document.createElementNS(NS, 'polyline');
    line.setAttribute('points', pts.join(' '));
    line.setAttribute('class', 'series');
    svg.append(line);
  }
  svg.setAttribute('data-samples', String(values.length));
  return svg;
}

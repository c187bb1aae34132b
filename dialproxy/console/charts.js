// Charts drawn as inline SVG: hourly bars, and meters for limit utilisation.
import { fmt, h, s } from "./ui.js";

// Bars of `points` ([{label, value}]), labelled every `every`-th; `title` names it for
// screen readers (role=img) and the table under it says the same in numbers.
export function bars(points, { title, unit, alt = false, every = 6, width = 640, height = 180 }) {
  const left = 44, bottom = 22, top = 10;
  const max = Math.max(1, ...points.map((p) => p.value));
  const step = (width - left) / Math.max(points.length, 1);
  const scale = (v) => ((height - bottom - top) * v) / max;
  const total = points.reduce((a, p) => a + p.value, 0);
  const svg = s("svg", {
    class: "chart", viewBox: `0 0 ${width} ${height}`, role: "img",
    "aria-label": `${title}: ${fmt.num(total)} ${unit} in all, at most ${fmt.num(max)} in an hour`,
  });
  for (const fraction of [0, 0.5, 1]) {
    const y = height - bottom - (height - bottom - top) * fraction;
    svg.append(
      s("line", { class: "axis", x1: left, x2: width, y1: y, y2: y }),
      s("text", { x: left - 6, y: y + 4, "text-anchor": "end" }, fmt.compact(max * fraction)),
    );
  }
  points.forEach((p, i) => {
    const barHeight = scale(p.value);
    const x = left + i * step + step * 0.15;
    const bar = s("rect", {
      class: alt ? "bar alt" : "bar", x, width: step * 0.7,
      y: height - bottom - barHeight, height: Math.max(barHeight, p.value ? 1 : 0),
    }, s("title", {}, `${p.label}: ${fmt.num(p.value)} ${unit}`));
    svg.append(bar);
    const tail = points.length - 1 - i; // (no label crowding the last one)
    if ((i % every === 0 && (tail === 0 || tail >= every / 2)) || tail === 0) {
      const last = i === points.length - 1;
      svg.append(s("text", { x: last ? width : x + step * 0.35, y: height - 6, "text-anchor": last ? "end" : "middle" }, p.label));
    }
  });
  return svg;
}

// One meter a row: label, a bar of used / limit, the figures.
export function meters(items) {
  return h("div.meter", {}, items.map((item) => {
    const share = item.limit ? Math.min(item.used / item.limit, 1) : 1;
    const svg = s("svg", { viewBox: "0 0 100 12", preserveAspectRatio: "none", "aria-hidden": "true" },
      s("rect", { class: "track", x: 0, y: 0, width: 100, height: 12, rx: 3 }),
      s("rect", { class: share >= 0.9 ? "fill high" : "fill", x: 0, y: 0, width: 100 * share, height: 12, rx: 3 }));
    return [
      h("span.label", { text: item.label }),
      svg,
      h("span.mono", { text: `${fmt.num(item.used)} / ${fmt.num(item.limit)} (${Math.round(share * 100)}%)` }),
    ];
  }));
}

// The audit review page: one section page at a time from /api/items, decisions POSTed per click.
// Plain JS, no build step. The server is the only state that matters: the page can be reloaded
// at any moment, and its place (section, offset, page size) lives in the URL's #hash.
(function () {
  'use strict';

  const SUMMARY = {
    label: (it) => [`given ${it.given} → suggested ${it.suggested}`, `score ${fmt(it.score, 3)}`,
      `p(given) ${fmt(it.self_confidence, 3)}`,
      `p(suggested) ${fmt(it.suggested_probability, 3)}`],
    duplicate: (it) => [`${it.match} copy`, `cosine ${fmt(it.score, 4)}`, `${it.members.length} images`],
    leak: (it) => [`${it.match} copy across ${it.splits.join(' / ')}`, `cosine ${fmt(it.score, 4)}`,
      `${it.members.length} images`],
    outlier: (it) => [`kNN distance ${fmt(it.score, 3)}`, `z ${fmt(it.z, 1)}`,
      `centroid distance ${fmt(it.centroid_distance, 3)}`],
  };
  const STATE_TEXT = { keep: 'kept', exclude: 'excluded', undecided: '' };

  const state = { meta: null, section: 'label', offset: 0, limit: 50, page: null, focus: 0, tiles: [] };
  const $ = (id) => document.getElementById(id);

  function fmt(x, digits) { return typeof x === 'number' ? x.toFixed(digits) : '–'; }

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === 'class') node.className = v;
      else if (k === 'text') node.textContent = v;
      else if (k.startsWith('on')) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v === true ? '' : v);
    }
    for (const c of children) if (c) node.append(c);
    return node;
  }

  async function api(path, options) {
    const res = await fetch(path, options);
    const body = await res.json().catch(() => ({ error: `HTTP ${res.status}` }));
    if (!res.ok) throw new Error(body.error || `HTTP ${res.status}`);
    return body;
  }

  function toast(message) {
    const t = $('toast');
    t.textContent = message;
    t.hidden = false;
    clearTimeout(toast.timer);
    toast.timer = setTimeout(() => { t.hidden = true; }, 5000);
  }

  // ------------------------------------------------------------------ place in the URL
  function readHash() {
    const h = new URLSearchParams(location.hash.slice(1));
    const names = state.meta.sections.map((s) => s.name);
    state.section = names.includes(h.get('section')) ? h.get('section')
      : (state.meta.sections.find((s) => s.total > 0) || state.meta.sections[0]).name;
    state.offset = Math.max(0, parseInt(h.get('offset') || '0', 10) || 0);
    state.limit = [25, 50, 100, 200].includes(+h.get('limit')) ? +h.get('limit') : 50;
  }

  function go(section, offset, limit) {
    const h = new URLSearchParams({ section, offset: String(offset), limit: String(limit || state.limit) });
    if (location.hash.slice(1) === h.toString()) load();
    else location.hash = h.toString();  // hashchange -> load
  }

  // ------------------------------------------------------------------ rendering
  function renderTabs() {
    const nav = $('tabs');
    nav.replaceChildren(...state.meta.sections.map((s) => el('button', {
      type: 'button', role: 'tab', 'data-section': s.name, 'aria-selected': String(s.name === state.section),
      text: `${s.title} (${s.total})`, onclick: () => go(s.name, 0),
    })));
  }

  function renderCounts(counts) {
    const parts = [['keep', 'kept'], ['exclude', 'excluded'], ['relabel', 'relabelled']]
      .map(([k, word], i) => [i ? ' · ' : '', el('b', { class: k, text: String(counts[k] || 0) }), ` ${word}`]).flat();
    $('counts').replaceChildren('Decided: ', ...parts);
  }

  function renderPager(node) {
    const p = state.page;
    const last = Math.max(0, Math.floor((p.total - 1) / p.limit) * p.limit);
    const size = el('select', { 'aria-label': 'items per page', onchange: (e) => go(state.section, 0, +e.target.value) },
      ...[25, 50, 100, 200].map((n) => el('option', { value: n, selected: n === p.limit, text: `${n} per page` })));
    node.replaceChildren(
      el('button', { type: 'button', class: 'prev', disabled: p.offset === 0, text: '← prev',
        onclick: () => go(state.section, Math.max(0, p.offset - p.limit)) }),
      el('span', { class: 'range', text: p.total ? `${p.offset + 1}–${Math.min(p.total, p.offset + p.limit)} of ${p.total}` : '0 items' }),
      el('button', { type: 'button', class: 'next', disabled: p.offset + p.limit >= p.total, text: 'next →',
        onclick: () => go(state.section, Math.min(last, p.offset + p.limit)) }),
      size);
  }

  function renderItems() {
    const main = $('items');
    state.tiles = [];
    if (!state.page.items.length) {
      main.replaceChildren(el('p', { class: 'muted', text: 'Nothing found in this section.' }));
      return;
    }
    main.replaceChildren(...state.page.items.map(renderItem));
    state.focus = Math.min(state.focus, state.tiles.length - 1);
  }

  function renderItem(item) {
    const hashes = item.members.map((m) => m.sha256).filter(Boolean);
    const shared = new Set(hashes).size < hashes.length
      ? el('span', { class: 'shared', text: ' · byte-identical copies: one decision covers them all' }) : null;
    const head = el('div', { class: 'item-head' }, el('span', { class: 'rank', text: `#${item.rank}` }),
      SUMMARY[item.kind](item).join(' · '), shared);
    const members = item.members.map((m) => renderTile(item, m));
    const context = (item.context || []).map((m) => renderContext(m));
    return el('article', { class: `item ${item.kind}`, 'data-key': item.key }, head,
      el('div', { class: 'members' }, ...members, ...context));
  }

  function thumb(member, edge) {
    if (!member.thumb) return el('div', { class: 'thumb', text: 'file missing' });
    return el('div', { class: 'thumb', title: 'click to enlarge', onclick: () => zoom(member) },
      el('img', { src: `${member.thumb}?size=${edge}`, alt: member.id, loading: 'lazy' }));
  }

  function renderContext(member) {
    return el('div', { class: 'tile context' }, thumb(member, 160),
      el('div', { class: 'meta', text: member.role }),
      el('div', { class: 'path', text: member.id }));
  }

  function renderTile(item, member) {
    const classes = state.meta.class_names;
    const suggested = item.suggested && item.suggested !== member.label ? item.suggested
      : classes.find((c) => c !== member.label) || classes[0];
    const select = el('select', { class: 'relabel-to', 'aria-label': 'relabel to' },
      ...classes.map((c) => el('option', { value: c, selected: c === suggested, text: c })));
    const disabled = !member.sha256;
    const button = (act, text, key) => el('button', { type: 'button', 'data-act': act, disabled, title: `${text} (${key})`,
      text, onclick: () => act === 'relabel' ? decide(tile, 'relabel', select.value) : decide(tile, act) });
    const tile = el('div', { class: 'tile', tabindex: '-1', 'data-id': member.id, 'data-sha256': member.sha256 || '' },
      thumb(member, 256),
      el('div', { class: 'path', title: member.id, text: member.id }),
      el('div', { class: 'meta' }, el('span', { class: `split-${member.split}`, text: member.split }), ` · ${member.label}`),
      el('div', { class: 'state' }),
      member.audit_excludes ? el('div', { class: 'hint', text: 'EXCLUDE (automatic) would drop it' }) : null,
      el('div', { class: 'buttons' }, button('keep', 'Keep', 'p'), button('exclude', 'Exclude', 'e'),
        select, button('relabel', 'Relabel', 'r'), button('undecided', 'Undecided', 'u')));
    tile.member = member;
    tile.select = select;
    tile.addEventListener('click', (e) => { if (!e.target.closest('select')) setFocus(state.tiles.indexOf(tile), false); });
    state.tiles.push(tile);
    paint(tile);
    return tile;
  }

  function paint(tile) {
    const d = tile.member.decision;
    const kind = d ? d.decision : 'undecided';
    tile.classList.remove('keep', 'exclude', 'relabel', 'undecided');
    tile.classList.add(kind);
    tile.classList.toggle('missing', !tile.member.sha256);
    tile.dataset.decision = kind;
    const text = kind === 'relabel' ? `relabelled ${tile.member.label} → ${d.label}` : STATE_TEXT[kind];
    tile.querySelector('.state').textContent = tile.member.sha256 ? text : 'no file: cannot decide';
  }

  function setFocus(index, scroll = true) {
    if (!state.tiles.length) return;
    state.focus = Math.max(0, Math.min(state.tiles.length - 1, index));
    const tile = state.tiles[state.focus];
    tile.focus({ preventScroll: true });
    if (scroll) tile.scrollIntoView({ block: 'nearest' });
  }

  function zoom(member) {
    const overlay = el('div', { id: 'zoom', onclick: () => overlay.remove() },
      el('img', { src: `${member.thumb}?size=1024`, alt: member.id }));
    document.body.append(overlay);
  }

  // ------------------------------------------------------------------ actions
  async function decide(tile, decision, label) {
    const m = tile.member;
    if (!m.sha256) { toast(`${m.id}: the file is missing, nothing to decide on.`); return; }
    tile.classList.add('saving');
    try {
      const body = await api('/api/decisions', {
        method: 'POST', headers: { 'Content-Type': 'application/json' },
        body: JSON.stringify({ id: m.id, sha256: m.sha256, decision, label: label || '' }),
      });
      // Byte-identical copies share the decision (it is keyed by content): repaint them all.
      for (const t of state.tiles) if (t.member.sha256 === m.sha256) { t.member.decision = body.decision; paint(t); }
      renderCounts(body.counts);
    } catch (err) {
      toast(err.message);
    } finally {
      tile.classList.remove('saving');
    }
  }

  function onKey(e) {
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    if (['INPUT', 'SELECT', 'TEXTAREA'].includes(e.target.tagName)) return;
    if (e.key === 'Escape') { $('help').hidden = true; const z = $('zoom'); if (z) z.remove(); return; }
    const tile = state.tiles[state.focus];
    const item = tile && state.page.items.find((it) => it.members.includes(tile.member));
    const act = (decision, label) => { if (tile) { decide(tile, decision, label); setFocus(state.focus + 1); } };
    const classes = state.meta.class_names;
    switch (e.key) {
      case 'j': case 'ArrowDown': setFocus(state.focus + 1); break;
      case 'k': case 'ArrowUp': setFocus(state.focus - 1); break;
      case 'p': act('keep'); break;
      case 'e': act('exclude'); break;
      case 'u': act('undecided'); break;
      case 'r': act('relabel', item && item.suggested && item.suggested !== tile.member.label ? item.suggested : tile && tile.select.value); break;
      case ']': if (state.page.offset + state.page.limit < state.page.total) go(state.section, state.page.offset + state.page.limit); break;
      case '[': if (state.page.offset > 0) go(state.section, Math.max(0, state.page.offset - state.page.limit)); break;
      case 't': {
        const names = state.meta.sections.map((s) => s.name);
        go(names[(names.indexOf(state.section) + 1) % names.length], 0);
        break;
      }
      case '?': $('help').hidden = !$('help').hidden; break;
      default:
        if (/^[1-9]$/.test(e.key) && +e.key <= classes.length) act('relabel', classes[+e.key - 1]);
        else return;
    }
    e.preventDefault();
  }

  // ------------------------------------------------------------------ loading
  async function load() {
    readHash();
    renderTabs();
    try {
      state.page = await api(`/api/items?section=${state.section}&offset=${state.offset}&limit=${state.limit}`);
    } catch (err) {
      toast(err.message);
      return;
    }
    state.focus = 0;
    renderPager($('pager-top'));
    renderPager($('pager-bottom'));
    renderItems();
    window.scrollTo(0, 0);
    if (state.tiles.length) setFocus(0, false);
    document.body.dataset.loaded = `${state.section}:${state.offset}`;  // lets tests wait for a page
  }

  async function start() {
    try {
      state.meta = await api('/api/meta');
    } catch (err) {
      $('items').replaceChildren(el('p', { text: `Cannot reach the review server: ${err.message}` }));
      return;
    }
    $('audit-name').textContent = state.meta.audit;
    $('decisions-file').textContent = state.meta.decisions_file;
    renderCounts(state.meta.decisions);
    $('help-button').addEventListener('click', () => { $('help').hidden = !$('help').hidden; });
    window.addEventListener('hashchange', load);
    document.addEventListener('keydown', onKey);
    await load();
  }

  start();
})();

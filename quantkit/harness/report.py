"""`quantkit report DIR`: the results of a recipe run (DIR/eval/*.json, DIR/bench/*.json) as one markdown table
and three PNG plots - accuracy vs weight memory, throughput per method (peers included), latency per batch size."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

BASELINE = "baseline"
PLOTS = ("accuracy_vs_memory.png", "throughput.png", "latency.png")


def _read_dir(path: Path) -> dict[str, dict]:
    out = {}
    for f in sorted(path.glob("*.json")) if path.is_dir() else []:
        try:
            out[f.stem] = json.loads(f.read_text())
        except ValueError:
            continue
    return out


def load_results(out_dir: Path) -> tuple[list[str], dict[str, dict], dict[str, dict]]:
    """(variant order: recipe order when recipe.json says it, baseline first; eval results; bench results)."""
    evals, benches = _read_dir(out_dir / "eval"), _read_dir(out_dir / "bench")
    names = list(dict.fromkeys([*evals, *benches]))
    recipe = out_dir / "recipe.json"
    if recipe.exists():
        order = json.loads(recipe.read_text()).get("variants", [])
        names = [n for n in order if n in names] + [n for n in names if n not in order]
    names.sort(key=lambda n: n != BASELINE)
    if not names:
        raise ValueError(f"{out_dir} holds no results (eval/*.json or bench/*.json): run a recipe into it first")
    return names, evals, benches


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _label(name: str, result: dict) -> str:
    kv = result.get("kv_cache_dtype", "auto")
    return f"{name} ({result.get('method', 'none')}{'' if kv == 'auto' else ', KV ' + kv})"


def markdown(out_dir: Path) -> str:
    names, evals, benches = load_results(out_dir)
    base_tps = benches.get(BASELINE, {}).get("throughput", {}).get("quantkit", {}).get("output_tokens_per_s")
    lines = [("| variant | weights (MB) | perplexity | Δppl % | KL mean | KL p99 | top-1 agree | greedy exact | "
             "output tok/s | vs baseline |"), "|---|---|---|---|---|---|---|---|---|---|"]
    for name in names:
        e, b = evals.get(name, {}), benches.get(name, {})
        tps = b.get("throughput", {}).get("quantkit", {}).get("output_tokens_per_s")
        weight = e.get("weight_bytes") or b.get("memory", {}).get("weight_bytes")
        lines.append(" | ".join([
            f"| {_label(name, e or b)}", _fmt(weight and weight / 1e6, ".1f"), _fmt(e.get("perplexity"), ".3f"),
            _fmt(e.get("perplexity_increase_pct"), "+.2f"), _fmt(e.get("kl_mean"), ".4f"), _fmt(e.get("kl_p99"), ".4f"),
            _fmt(e.get("top1_agreement"), ".3f"), _fmt(e.get("greedy_exact_match"), ".2f"), _fmt(tps, ".1f"),
            _fmt(tps / base_tps if tps and base_tps else None, ".2f") + "x |"]))
    text = "\n".join(lines)
    peers = benches.get(BASELINE, {}).get("throughput", {})
    if len(peers) > 1:
        rows = ["| engine (same workload, same run) | output tok/s | req/s | quantkit speedup |", "|---|---|---|---|"]
        for engine, r in peers.items():
            if "unavailable" in r:
                rows.append(f"| {engine} | unavailable: {r['unavailable']} | | |")
            else:
                rows.append(f"| {engine} | {r['output_tokens_per_s']:.1f} | {r['requests_per_s']:.2f} | "
                            f"{_fmt(r.get('quantkit_speedup'), '.2f')}{'x' if 'quantkit_speedup' in r else ''} |")
        text += "\n\nPeers beside the unquantized baseline:\n\n" + "\n".join(rows)
    sizes = next((e.get("eval") for e in evals.values() if e.get("eval")), None)
    if sizes:
        text += (f"\n\nEval sizes: {sizes['windows']} held-out windows x {sizes['seqlen']} tokens "
                 f"(stride {sizes['seqlen']}, chunked prefill {sizes['chunk_size']} through the paged KV cache), "
                 f"KL over the reference's top-{sizes['top_k']} + rest, greedy exact match over "
                 f"{sizes['chat_prompts']} chat prompts x {sizes['max_tokens']} tokens.")
    device = next((r.get("device") for r in [*evals.values(), *benches.values()] if r.get("device")), None)
    if device:
        text += f"\n\nDevice: {device}."
    return text


def plots(out_dir: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names, evals, benches = load_results(out_dir)
    written = []

    scored = [n for n in names if evals.get(n, {}).get("perplexity") is not None]
    if scored:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for ax, key, title in ((axes[0], "perplexity", "perplexity (held-out)"),
                               (axes[1], "kl_mean", "mean KL(reference || variant)")):
            for n in scored:
                x, y = evals[n]["weight_bytes"] / 1e6, evals[n].get(key)
                if y is not None:
                    ax.scatter(x, y)
                    ax.annotate(n, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
            ax.set_xlabel("weight memory (MB)")
            ax.set_title(title)
            ax.grid(alpha=0.3)
        fig.tight_layout()
        written.append(_save(fig, out_dir / PLOTS[0]))

    bars = [(n, benches[n]["throughput"]["quantkit"]["output_tokens_per_s"]) for n in names
            if "throughput" in benches.get(n, {})]
    bars += [(f"peer: {p}", r["output_tokens_per_s"]) for p, r in
             benches.get(BASELINE, {}).get("throughput", {}).items() if p != "quantkit" and "output_tokens_per_s" in r]
    if bars:
        fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(bars) + 2), 4.2))
        ax.bar([b[0] for b in bars], [b[1] for b in bars],
               color=["tab:gray" if b[0].startswith("peer") else "tab:blue" for b in bars])
        ax.set_ylabel("output tokens/s")
        ax.set_title("offline throughput (same workload)")
        ax.tick_params(axis="x", rotation=45)
        fig.tight_layout()
        written.append(_save(fig, out_dir / PLOTS[1]))

    latency = [n for n in names if benches.get(n, {}).get("latency")]
    if latency:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for n in latency:
            rows = benches[n]["latency"]
            sizes = [r["batch_size"] for r in rows]
            axes[0].plot(sizes, [r["ttft_ms"] for r in rows], marker="o", label=n)
            axes[1].plot(sizes, [r["tpot_ms"] for r in rows], marker="o", label=n)
        for ax, title in ((axes[0], "time to first token (ms)"), (axes[1], "time per output token (ms)")):
            ax.set_xlabel("batch size")
            ax.set_title(title)
            ax.grid(alpha=0.3)
        axes[1].legend(fontsize=8)
        fig.tight_layout()
        written.append(_save(fig, out_dir / PLOTS[2]))
    return written


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(out_dir: str | Path) -> str:
    """Writes out_dir/report.md (table + plot links) and the PNGs; returns the markdown."""
    out_dir = Path(out_dir)
    table = markdown(out_dir)
    images = plots(out_dir)
    recipe = out_dir / "recipe.json"
    title = json.loads(recipe.read_text()).get("name", out_dir.name) if recipe.exists() else out_dir.name
    text = f"# quantkit report: {title}\n\n{table}\n" + "".join(f"\n![{p.stem}]({p.name})\n" for p in images)
    (out_dir / "report.md").write_text(text)
    return table

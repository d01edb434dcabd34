"""Write a sweep's results: results.json, results.csv, report.md and its PNG plots.

The report puts every number next to its context (machine, settings, parameter counts) and
shows, per mode, tokens/s and the case's own peak memory against L on log-log axes, decode
latency and state bytes against L, the fitted exponents, the crossover against the reference
mixer, the analytic accounting at sizes this machine cannot hold, and the MQAR quality sweep when
its rows are given (`quality.json`: a list of {"mixer", "d_model", "seq_len", "accuracy"}).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never open a window
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

from seqarch.bench.analysis import crossover, exponents, ok_rows  # noqa: E402
from seqarch.bench.runner import COLUMNS  # noqa: E402
from seqarch.runs import finite_or_null  # noqa: E402

MODE_TITLES = {"train": "train (forward + backward)", "prefill": "prefill", "decode": "decode (one token after L)"}
QUALITY_KEYS = ("mixer", "d_model", "seq_len", "accuracy")


def format_bytes(value: float | None) -> str:
    if value is None:
        return "—"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(value) >= size:
            return f"{value / size:,.1f} {unit}"
    return f"{value:,.0f} B"


def format_count(value: float | None) -> str:
    if value is None:
        return "—"
    for unit, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:,.2f}{unit}"
    return f"{value:,.0f}"


def _table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def write_results(rows: list[dict[str, Any]], out: Path, context: dict[str, Any]) -> None:
    """results.json (rows + machine + settings) and results.csv (rows, COLUMNS in order)."""
    # Strict JSON: a failed case's NaN / inf are written as null.
    payload = finite_or_null({**context, "rows": rows})
    (out / "results.json").write_text(json.dumps(payload, indent=1, allow_nan=False) + "\n")
    with open(out / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(COLUMNS))
        writer.writeheader()
        for row in rows:
            writer.writerow({key: "" if row.get(key) is None else row[key] for key in COLUMNS})


def load_quality(path: str | Path) -> list[dict[str, Any]]:
    """MQAR accuracy rows written by the quality sweep; each needs QUALITY_KEYS."""
    rows = json.loads(Path(path).read_text())
    if not isinstance(rows, list) or not all(isinstance(row, dict) and set(QUALITY_KEYS) <= set(row) for row in rows):
        raise ValueError(f"quality results {path}: expected a JSON list of objects with keys {', '.join(QUALITY_KEYS)}")
    return rows


# --- plots ---------------------------------------------------------------------------------------
def _loglog(path: Path, title: str, ylabel: str, series: dict[str, tuple[list[float], list[float]]],
            xlabel: str = "sequence length L") -> str:
    figure, axis = plt.subplots(figsize=(6, 4))
    for label, (xs, ys) in series.items():
        points = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None and y > 0]
        if points:
            axis.plot(*zip(*points, strict=True), marker="o", label=label)
    axis.set_xscale("log", base=2)
    axis.set_yscale("log")
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.grid(True, which="both", alpha=0.3)
    if axis.lines:
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path.name


def _series(rows, mixers, mode, key) -> dict[str, tuple[list[float], list[float]]]:
    return {mixer: ([row["seq_len"] for row in ok_rows(rows, mixer, mode)],
                    [row[key] for row in ok_rows(rows, mixer, mode)]) for mixer in mixers}


def _plots(rows, mixers, modes, out: Path, analytic_bench, analytic_large, large_name) -> dict[str, str]:
    figures = {}
    for mode in modes:
        figures[f"throughput_{mode}"] = _loglog(out / f"throughput_{mode}.png", f"throughput: {MODE_TITLES[mode]}",
                                                "tokens / s", _series(rows, mixers, mode, "tokens_per_s"))
        figures[f"memory_{mode}"] = _loglog(out / f"memory_{mode}.png", f"peak memory over baseline: {mode}",
                                            "bytes", _series(rows, mixers, mode, "case_bytes"))
    if "decode" in modes:
        figures["decode_latency"] = _loglog(out / "decode_latency.png", "decode latency per token after L",
                                            "ms / token", _series(rows, mixers, "decode", "latency_ms"))
    state_series = {}
    for mixer in mixers:
        measured = _series(rows, mixers, "decode", "state_bytes_measured")[mixer]
        if measured[0]:
            state_series[f"{mixer} (measured)"] = measured
        bench = [row for row in analytic_bench if row["mixer"] == mixer]
        state_series[f"{mixer} (analytic)"] = ([row["seq_len"] for row in bench], [row["state_bytes"] for row in bench])
    figures["state_bytes"] = _loglog(out / "state_bytes.png", "decode state bytes vs L (benchmark shape)", "bytes",
                                     state_series)
    large = {mixer: ([row["seq_len"] for row in analytic_large if row["mixer"] == mixer],
                     [row["state_bytes"] for row in analytic_large if row["mixer"] == mixer]) for mixer in mixers}
    figures["state_bytes_large"] = _loglog(out / "state_bytes_large.png", f"state bytes vs L (analytic, {large_name})",
                                           "bytes", large)
    return figures


def _quality_plots(quality, out: Path) -> dict[str, str]:
    figures = {}
    mixers = sorted({row["mixer"] for row in quality})
    for axis_key, other_key, name in (("d_model", "seq_len", "accuracy_vs_width"),
                                      ("seq_len", "d_model", "accuracy_vs_length")):
        figure, axes = plt.subplots(figsize=(6, 4))
        others = sorted({row[other_key] for row in quality})
        for color, mixer in enumerate(mixers):  # one colour per mixer, one line style per width / length
            for style, other in enumerate(others):
                points = sorted((row[axis_key], row["accuracy"]) for row in quality
                                if row["mixer"] == mixer and row[other_key] == other and row["accuracy"] is not None)
                if points:
                    axes.plot(*zip(*points, strict=True), color=f"C{color % 10}", marker="os^D"[style % 4],
                              linestyle=("-", "--", ":", "-.")[style % 4], label=f"{mixer} {other_key}={other}")
        axes.set_xscale("log", base=2)
        axes.set_xlabel(axis_key)
        axes.set_ylabel("MQAR accuracy")
        axes.set_ylim(0, 1.02)
        axes.grid(True, alpha=0.3)
        if axes.lines:
            axes.legend(fontsize=7)
        figure.tight_layout()
        figure.savefig(out / f"{name}.png", dpi=110)
        plt.close(figure)
        figures[name] = f"{name}.png"
    return figures


# --- markdown ------------------------------------------------------------------------------------
def _cell(row: dict[str, Any] | None, key: str, fmt) -> str:
    if row is None:
        return "—"
    if row["status"] != "ok":
        return row["status"].replace("_", " ")
    return fmt(row[key])


def _grid_table(rows, mixers, mode, key, fmt) -> str:
    lengths = sorted({row["seq_len"] for row in rows if row["mode"] == mode})
    index = {(row["mixer"], row["seq_len"]): row for row in rows if row["mode"] == mode}
    body = [[mixer] + [_cell(index.get((mixer, length)), key, fmt) for length in lengths] for mixer in mixers]
    return _table(["mixer"] + [f"L={length}" for length in lengths], body)


def _ratio_table(rows, mixers, mode, reference) -> str:
    """tokens/s of each mixer divided by the reference's at the same length (same sweep, interleaved)."""
    lengths = sorted({row["seq_len"] for row in rows if row["mode"] == mode})
    index = {(row["mixer"], row["seq_len"]): row for row in rows if row["mode"] == mode and row["status"] == "ok"}
    body = []
    for mixer in mixers:
        line = [mixer]
        for length in lengths:
            mine, theirs = index.get((mixer, length)), index.get((reference, length))
            line.append(f"{mine['tokens_per_s'] / theirs['tokens_per_s']:.2f}x" if mine and theirs else "—")
        body.append(line)
    return _table(["mixer"] + [f"L={length}" for length in lengths], body)


def _accuracy_cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return "—"
    if row["accuracy"] is None:
        return row.get("status", "failed")
    return f"{row['accuracy']:.3f}"


def quality_table(quality: list[dict[str, Any]]) -> str:
    """One line per (mixer, L): accuracy at every width; a cell that did not run shows its status.
    A "kv pairs" column follows L when the rows carry `num_kv_pairs` (the sweep's rows do)."""
    widths = sorted({row["d_model"] for row in quality})
    with_pairs = any("num_kv_pairs" in row for row in quality)
    index = {(row["mixer"], row["seq_len"], row["d_model"]): row for row in quality}
    body = []
    for mixer in dict.fromkeys(row["mixer"] for row in quality):
        for length in sorted({row["seq_len"] for row in quality if row["mixer"] == mixer}):
            pairs = {row.get("num_kv_pairs") for row in quality if row["seq_len"] == length} - {None}
            body.append([mixer, str(length)] + ([",".join(map(str, sorted(pairs))) or "—"] if with_pairs else [])
                        + [_accuracy_cell(index.get((mixer, length, width))) for width in widths])
    return _table(["mixer", "L"] + (["kv pairs"] if with_pairs else []) + [f"d={width}" for width in widths], body)


def _is_sweep_rows(quality) -> bool:
    """Rows of seqarch.bench.quality's sweep (task, block, lr and seeds per row), not bare accuracy rows."""
    return bool(quality) and all("task" in row and "block" in row for row in quality)


def _quality_section(quality, figures) -> list[str]:
    if _is_sweep_rows(quality):
        from seqarch.bench.quality import quality_lines

        body = [("#" + line) if line.startswith("## ") else line for line in quality_lines(quality)]
        return ["## Quality: MQAR recall and state tracking", ""] + body
    lines = ["## Quality: MQAR accuracy vs width and length", ""]
    if not quality:
        return lines + [
            "Not run for this report. The quality sweep trains each mixer on multi-query associative recall",
            "(MQAR, as Zoology does) at a few widths and lengths with `seqarch.train`: run it with",
            "`seqarch bench quality=true`, or pass rows written earlier with `quality=<path to quality.json>`",
            "(a JSON list of {mixer, d_model, seq_len, accuracy}), and this section shows accuracy vs width",
            "and vs length per mixer.", "",
        ]
    settings = {(row.get("steps"), row.get("lr")) for row in quality}
    trained = ", ".join(f"{steps} steps at lr {lr}" for steps, lr in sorted(settings, key=str)
                        if steps is not None)
    errors = sorted({f"{row['mixer']} d={row['d_model']} L={row['seq_len']}: {row['error']}" for row in quality
                     if row.get("error")})
    lines += ["Final validation accuracy on MQAR (two-layer SeqLM per mixer, trained from scratch per cell"
              + (f"; {trained}" if trained else "") + "). Chance is 1 / (V / 2); guessing among the values"
              " in context gives ~1 / kv pairs, so accuracy well above that means recall.", "",
              quality_table(quality), ""]
    if errors:
        lines += ["Cells that failed:", ""] + [f"- {error}" for error in errors] + [""]
    return lines + [f"![accuracy vs width]({figures['accuracy_vs_width']})",
                    f"![accuracy vs length]({figures['accuracy_vs_length']})", ""]


def _analytic_table(rows, with_measured: dict | None = None) -> str:
    header = ["mixer", "L", "params", "weights", "state / KV cache", "matmul FLOPs/token", "mixing FLOPs/token"]
    if with_measured is not None:
        header.insert(5, "measured state")
    body = []
    for row in rows:
        line = [row["mixer"], f"{row['seq_len']:,}", format_count(row["params"]), format_bytes(row["weight_bytes"]),
                format_bytes(row["state_bytes"]), format_count(row["matmul_flops_per_token"]),
                format_count(row["mixing_flops_per_token"]) if row["mixing_flops_per_token"] is not None
                else "not declared"]
        if with_measured is not None:
            line.insert(5, format_bytes(with_measured.get((row["mixer"], row["seq_len"]))))
        body.append(line)
    return _table(header, body)


def write_report(rows: list[dict[str, Any]], out: Path, context: dict[str, Any],
                 analytic_bench: list[dict[str, Any]], analytic_large: list[dict[str, Any]],
                 quality: list[dict[str, Any]] | None = None) -> Path:
    """Write results.json, results.csv, the plots and report.md into `out`; returns report.md's path."""
    out.mkdir(parents=True, exist_ok=True)
    write_results(rows, out, context)
    settings, machine = context["settings"], context["machine"]
    mixers = list(dict.fromkeys(row["mixer"] for row in rows))
    modes = list(dict.fromkeys(row["mode"] for row in rows))
    large_name = context.get("extrapolate", "large model")
    figures = _plots(rows, mixers, modes, out, analytic_bench, analytic_large, large_name)
    if quality and not _is_sweep_rows(quality):
        figures.update(_quality_plots(quality, out))

    load = ", ".join(f"{value:.2f}" for value in machine["load_average_1_5_15"] or [])
    lines = ["# seqarch benchmark report", ""]
    if settings.get("note"):
        lines += [f"> {settings['note']}", ""]
    lines += [
        "## Machine and settings", "",
        _table(["", ""], [
            ["CPU", f"{machine['cpu_model']} ({machine['usable_cores']} usable cores of {machine['cpu_count']})"],
            ["torch / Python", f"{machine['torch_version']} / {machine['python_version']}"],
            ["load average (1, 5, 15 min) at start", load],
            ["date", machine["date_utc"]],
            ["device, dtype, threads", f"{settings['device']}, {settings['dtype']}, {settings['threads']}"],
            ["model", f"SeqLM, {settings['n_layers']} layers, vocab {settings['vocab_size']}, "
                      f"MLP {'on' if settings['mlp'] else 'off'}, batch {settings['batch_size']}"],
            ["widths", "matched parameter counts" if settings["match_params"] else
             f"the same for every mixer (d_model={settings['d_model']})"],
            ["timing", f"{settings['warmup']} warm-up + {settings['repeats']} timed runs per case, "
                       f"{settings['rounds']} interleaved round(s); median; decode runs "
                       f"{settings['decode_tokens']} tokens"],
            ["budget", f"{settings['budget_s']:g} s wall per case (fresh subprocess)"],
        ]), "",
        "Parameters per mixer (the whole model; non-embedding in brackets):", "",
    ]
    by_mixer = {row["mixer"]: row for row in rows if row["status"] == "ok"}
    lines += [_table(["mixer", "d_model", "params"], [
        [mixer, str(by_mixer[mixer]["d_model"]) if mixer in by_mixer else "—",
         f"{format_count(by_mixer[mixer]['params'])} ({format_count(by_mixer[mixer]['params_non_embedding'])})"
         if mixer in by_mixer else "—"] for mixer in mixers]), ""]

    for mode in modes:
        lines += [f"## {MODE_TITLES[mode]}", "", "Tokens per second (median):", "",
                  _grid_table(rows, mixers, mode, "tokens_per_s", lambda v: f"{v:,.0f}"), ""]
        if settings["reference"] in mixers:
            lines += [f"Tokens per second relative to {settings['reference']} at the same length:", "",
                      _ratio_table(rows, mixers, mode, settings["reference"]), ""]
        if mode == "decode":
            lines += ["Latency per token (ms):", "",
                      _grid_table(rows, mixers, mode, "latency_ms", lambda v: f"{v:.3f}"), ""]
        lines += ["Peak memory over the case's baseline (peak RSS - RSS after imports, model and inputs):", "",
                  _grid_table(rows, mixers, mode, "case_bytes", format_bytes), "",
                  f"![throughput {mode}]({figures[f'throughput_{mode}']}) "
                  f"![memory {mode}]({figures[f'memory_{mode}']})", ""]
    if "decode" in modes:
        lines += [f"![decode latency]({figures['decode_latency']})", ""]

    lines += ["## Scaling exponents", "",
              "Slope of log(time) against log(L): time of a run over L tokens for train and prefill, time of "
              "one decoded token for decode. Over all measured lengths / over the largest three.", ""]
    body = []
    for mixer in mixers:
        line = [mixer]
        for mode in modes:
            full, tail = exponents(rows, mixer, mode)
            line.append(f"{'—' if full is None else f'{full:.2f}'} / {'—' if tail is None else f'{tail:.2f}'}")
        body.append(line)
    lines += [_table(["mixer"] + list(modes), body), ""]

    reference = settings["reference"]
    lines += [f"## Crossover against {reference}", ""]
    if reference in mixers:
        body = [[mixer] + [crossover(rows, mixer, reference, mode)[1] for mode in modes]
                for mixer in mixers if mixer != reference]
        lines += [f"Length from which each mixer's tokens/s exceeds {reference}'s at every larger measured length "
                  "(interpolated in log L):", "", _table(["mixer"] + list(modes), body) if body else "(no other mixer)",
                  ""]
    else:
        lines += [f"{reference} was not measured in this sweep.", ""]

    measured_state = {(row["mixer"], row["seq_len"]): row["state_bytes_measured"] for row in rows
                      if row["mode"] == "decode" and row["status"] == "ok"}
    lines += ["## State bytes and analytic accounting", "",
              "Measured decode states at the benchmark shape next to `state_nbytes` and the analytic FLOPs "
              "(computed on the meta device, nothing allocated):", "",
              _analytic_table(analytic_bench, measured_state), "",
              f"The same accounting at the shape of {large_name} (no allocation; this machine could not hold it):", "",
              _analytic_table(analytic_large), "",
              f"![state bytes]({figures['state_bytes']}) ![state bytes, large]({figures['state_bytes_large']})", "",
              "Mixing FLOPs are the sequence-mixing work the weights do not show (attention: 4·L·H·E per layer); "
              "\"not declared\" means the mixer does not define `flops_per_token(seq_len)`.", ""]
    lines += _quality_section(quality, figures)
    lines += ["## Files", "", "`results.json` (rows, machine, settings), `results.csv` (columns: "
              + ", ".join(f"`{column}`" for column in COLUMNS) + "), and the PNG plots above.", ""]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report

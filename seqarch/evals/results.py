"""Results folders of `seqarch eval`: results.json, results.csv, results.md and, for passkey, heatmap.png.

A results folder is claimed fresh (an existing folder is never written into): by default
<run folder>/evals/<task>-<scaling>/<timestamp>/, or the `out=` folder, which must not exist.
results.json is strict JSON: a non-finite value (the perplexity of a diverged model) is written as
null and listed under `non_finite`.
"""

from __future__ import annotations

import csv
from pathlib import Path

from seqarch.runs import strict_json


def ppl_table(rows: list[dict], trained_length: int) -> str:
    """Markdown: one row per length."""
    lines = ["| length | x trained | windows | perplexity | bits/token |", "|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['length']} | {row['length'] / trained_length:g} | {row['windows']} | "
                     f"{row['perplexity']:.3f} | {row['bits_per_token']:.3f} |")
    return "\n".join(lines)


def passkey_grid(rows: list[dict], key: str = "accuracy") -> tuple[list[int], list[float], list[list[float]]]:
    """(lengths, depths, values[depth][length]) of passkey rows."""
    lengths = sorted({row["length"] for row in rows})
    depths = sorted({row["depth"] for row in rows})
    cells = {(row["depth"], row["length"]): row[key] for row in rows}
    return lengths, depths, [[cells[depth, length] for length in lengths] for depth in depths]


def passkey_table(rows: list[dict]) -> str:
    """Markdown: exact-match accuracy, depths down, lengths across, and the mean over depths."""
    lengths, depths, values = passkey_grid(rows)
    lines = ["| depth \\ length | " + " | ".join(map(str, lengths)) + " |", "|---:|" + "---:|" * len(lengths)]
    for depth, line in zip(depths, values, strict=True):
        lines.append(f"| {depth:g} | " + " | ".join(f"{v:.2f}" for v in line) + " |")
    means = [sum(column) / len(column) for column in zip(*values, strict=True)]
    lines.append("| **mean** | " + " | ".join(f"**{v:.2f}**" for v in means) + " |")
    return "\n".join(lines)


def passkey_heatmap(rows: list[dict], path: Path, title: str) -> None:
    """A PNG heatmap of exact-match accuracy (depth x length), each cell annotated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths, depths, values = passkey_grid(rows)
    figure, axes = plt.subplots(figsize=(1.1 * len(lengths) + 2.5, 0.6 * len(depths) + 1.8))
    image = axes.imshow(values, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    axes.set_xticks(range(len(lengths)), [str(length) for length in lengths])
    axes.set_yticks(range(len(depths)), [f"{depth:g}" for depth in depths])
    axes.set_xlabel("length (bytes)")
    axes.set_ylabel("needle depth")
    axes.set_title(title, fontsize=9)
    for i, line in enumerate(values):
        for j, value in enumerate(line):
            axes.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8)
    figure.colorbar(image, ax=axes, label="exact match")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_results(folder: Path, meta: dict, rows: list[dict]) -> None:
    """Write the results of one eval into a fresh `folder` (already created)."""
    (folder / "results.json").write_text(strict_json({**meta, "rows": rows}))  # NaN / inf (a diverged model) -> null
    with (folder / "results.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    settings = ", ".join(f"{key}={value}" for key, value in meta["settings"].items())
    if meta["task"] == "ppl":
        table = ppl_table(rows, meta["trained_length"])
    else:
        table = passkey_table(rows)
        passkey_heatmap(rows, folder / "heatmap.png", f"passkey exact match, {settings}")
    (folder / "results.md").write_text(f"# {meta['task']}: {meta['ckpt']}\n\n{settings}\n\n{table}\n")


__all__ = ["passkey_grid", "passkey_heatmap", "passkey_table", "ppl_table", "write_results"]

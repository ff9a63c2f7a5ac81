"""Write ``docs/benchmarks.md`` and its plots from the JSON files under ``benchmarks/results/``.

``python -m benchmarks.report`` regenerates the report without re-running anything.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import FuncFormatter, NullLocator

from benchmarks.common import REPO, REPORT, RESULTS_DIR, load_result, mean_std, median
from benchmarks.recipes import LR_TABLE

#: How the anchors were made to run as their docs show; facts about the libraries, not measurements.
ANCHOR_NOTES = [
    "## Notes on the anchors",
    "",
    "- Lightning `BackboneFinetuning` adds the backbone's param group to the optimizer when it unfreezes it. With "
    "the protocol's per-step `LambdaLR` (or `CosineAnnealingLR`) the next `scheduler.step()` fails under torch 2.14.1 "
    "(`ValueError: zip() argument 2 is shorter than argument 1`: the scheduler's per-group lists do not know the new "
    "group). Its recipe therefore uses an epoch-wise `StepLR(step_size=1, gamma)` (gamma chosen on validation), which "
    "reads the rates from the param groups. lt_finetune keeps every group in the optimizer from the first step "
    "(frozen ones at learning rate 0), so any scheduler works.",
    "- `BackboneFinetuning`'s frozen phase keeps BatchNorm trainable (`train_bn=True`, its default): that is both why "
    "it is slow and why it uses as much memory as full fine-tuning in sections 2 and 4.",
    "- finetuning-scheduler: explicit schedule (head; `features.9`-`features.18`; the rest), "
    "`epoch_transitions_only=True`, `restore_best=False` (no validation loop in this protocol), "
    "`apply_lambdas_new_pgs=True` so the cosine also drives the groups added later; each phase's `lr` is the full "
    "fine-tuning rate. It raises `max_epochs` to its last phase's `max_transition_epoch`, so transitions are capped at "
    "the run's epochs. Frozen BatchNorm layers stay in training mode (batch statistics), which costs speed in phase 0.",
    "",
]

OVERHEAD_GOAL = 1.01
SPEEDUP_GOAL = 0.95
DDP_GOAL = 1.05
MEMORY_GOAL = 0.6
ACCURACY_GOAL = 0.975
FEW_LABEL_MARGIN = 0.02


def _verdict(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def _mib(n: float) -> str:
    return f"{n / 2**20:.0f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return [*lines, ""]


def _meta_line(result: dict[str, Any]) -> str:
    meta = result["meta"]
    return (
        f"*Produced by `{meta['command']}` ({meta['mode']} settings) on {meta['started']}; "
        f"section wall time {meta['wall_s']:.0f} s.*"
    )


def _round_ratios(raw: dict[str, list[list[float]]], a: str, b: str) -> list[float]:
    return [median(x) / median(y) for x, y in zip(raw[a], raw[b])]


# -- sections ----------------------------------------------------------------------------------------------------


def _overhead(result: dict[str, Any], goals: list[tuple[str, str, str, bool]]) -> list[str]:
    data = result["data"]
    raw, med = data["raw_step_times"], data["median_step_time"]
    p = data["protocol"]
    lines = [
        "## 1. Overhead of the callbacks",
        "",
        "Median step time (ms) with lt_finetune's callbacks vs the same trainable set set up by hand in plain "
        "Lightning: same ImageNet MobileNetV2, Animal-MNIST batches (64 px, batch 64) and seed. "
        f"{p['repeats']} interleaved repeats of {p['timed_steps']} timed steps after {p['warmup_steps']} warm-up "
        "steps; a step is timed start to start (data, hooks, forward, backward, optimizer). The ratio is of the "
        "medians; the range is the ratio in each repeat (same round of the interleaving).",
        "",
        _meta_line(result),
        "",
    ]
    rows = []
    spread: list[float] = []
    for label, ours, hand in data["overhead_pairs"]:
        ratio = med[ours] / med[hand]
        rounds = _round_ratios(raw, ours, hand)
        spread += rounds
        ok = ratio <= OVERHEAD_GOAL
        goals.append((f"1. Overhead: {label}", f"<= {OVERHEAD_GOAL}", f"{ratio:.3f}", ok))
        rows.append(
            [
                label,
                f"`{ours}`: {_ms(med[ours])}",
                f"`{hand}`: {_ms(med[hand])}",
                f"{ratio:.3f}",
                f"{min(rounds):.3f}-{max(rounds):.3f}",
                _verdict(ok),
            ]
        )
    lines += _table(
        ["trainable set", "lt_finetune", "plain Lightning", "ratio", "per-repeat range", f"goal <= {OVERHEAD_GOAL}"],
        rows,
    )
    lines += [
        "Configurations: "
        + "; ".join(
            f"`{k}` = {v}"
            for k, v in data["configs"].items()
            if k in {x for r in data["overhead_pairs"] for x in r[1:]}
        )
        + ".",
        "",
    ]
    if spread and max(spread) - min(spread) > 2 * (OVERHEAD_GOAL - 1):
        lines += [
            f"Resolution: the per-repeat ratios of this run span {min(spread):.3f}-{max(spread):.3f} (load average at "
            f"the end of the section: {result['meta'].get('load', 'n/a')}), wider than the 1% the goal asks to "
            "resolve, so this run cannot establish a 1% overhead either way; the verdicts are the medians as measured. "
            "More repeats (`--full`) or an idle machine narrow the range.",
            "",
        ]
    return lines


def _speedup(result: dict[str, Any], goals: list[tuple[str, str, str, bool]]) -> list[str]:
    data = result["data"]
    raw, med = data["raw_step_times"], data["median_step_time"]
    lines = [
        "## 2. Freezing speed-up kept",
        "",
        "Full-training step time divided by frozen-backbone step time (ImageNet MobileNetV2, 64 px, batch 64), and "
        "that speed-up as a fraction of the speed-up of freezing by hand. Same timing run as section 1.",
        "",
        _meta_line(result),
        "",
    ]
    rows = []
    hand = next((r for r in data["speedup_rows"] if r[1] == "hand_frozen"), None)
    hand_speedup = med[hand[2]] / med[hand[1]] if hand else None
    for label, frozen, full in data["speedup_rows"]:
        speedup = med[full] / med[frozen]
        rounds = [median(f) / median(z) for f, z in zip(raw[full], raw[frozen])]
        kept = speedup / hand_speedup if hand_speedup else float("nan")
        goal = ""
        if frozen == "ours_frozen":
            ok = kept >= SPEEDUP_GOAL
            goal = _verdict(ok)
            goals.append(("2. Freezing speed-up kept (lt_finetune / by hand)", f">= {SPEEDUP_GOAL}", f"{kept:.3f}", ok))
        rows.append(
            [
                label,
                f"`{frozen}`: {_ms(med[frozen])}",
                f"`{full}`: {_ms(med[full])}",
                f"{speedup:.2f}x ({min(rounds):.2f}-{max(rounds):.2f})",
                f"{kept:.3f}",
                goal or "(anchor)" if frozen != "hand_frozen" else "reference",
            ]
        )
    lines += _table(
        [
            "approach",
            "frozen step (ms)",
            "full step (ms)",
            "speed-up (per-repeat range)",
            "kept vs by hand",
            f"goal >= {SPEEDUP_GOAL}",
        ],
        rows,
    )
    lines += [
        "Why the anchors keep less: Lightning's `BackboneFinetuning` freezes with `train_bn=True`, so every "
        "BatchNorm layer's affine parameters stay trainable and the backward pass runs through the whole backbone; "
        "finetuning-scheduler freezes BatchNorm parameters but leaves the layers in training mode (batch statistics, "
        'running-statistics updates). lt_finetune\'s default `bn_mode="eval"` runs the frozen backbone in eval mode '
        "with no graph, like freezing by hand.",
        "",
    ]
    return lines


def _ddp(result: dict[str, Any], goals: list[tuple[str, str, str, bool]]) -> list[str]:
    data = result["data"]
    med, raw = data["median_step_time"], data["raw_step_times"]
    p = data["protocol"]
    ratio = med["ours"] / med["plain"]
    rounds = _round_ratios(raw, "ours", "plain")
    ok = ratio <= DDP_GOAL
    goals.append(("3. DDP step time, our unfreezing / plain DDP", f"<= {DDP_GOAL}", f"{ratio:.3f}", ok))
    gap = max(max(v) for v in data["replica_max_abs_diff"].values())
    lines = [
        "## 3. DDP",
        "",
        f"2-process CPU DDP (gloo, {data['threads_per_process']} thread per process, batch 64 per process). `ours`: "
        "`FreezeBackbone(unfreeze_at_step=1)`, so the backbone was frozen when DDP wrapped the model and is unfrozen "
        "after the first step; DDP does not know its parameters and lt_finetune averages their gradients with one "
        "`all_reduce` per step. `plain`: the same model with every parameter trainable from the start (DDP's bucketed, "
        f"overlapped all-reduce). Both trainable sets are identical when timed. {p['repeats']} interleaved repeats of "
        f"{p['timed_steps']} steps after {p['warmup_steps_after_unfreezing']} warm-up steps, all in one DDP launch.",
        "",
        _meta_line(result),
        "",
    ]
    lines += _table(
        ["configuration", "median step (ms)", "ratio ours/plain", "per-repeat range", f"goal <= {DDP_GOAL}"],
        [
            ["plain DDP, all trainable from the start", _ms(med["plain"]), "", "", ""],
            [
                "lt_finetune, backbone unfrozen after wrapping",
                _ms(med["ours"]),
                f"{ratio:.3f}",
                f"{min(rounds):.3f}-{max(rounds):.3f}",
                _verdict(ok),
            ],
        ],
    )
    lines += [
        f"Largest parameter difference between the two replicas after any run: {gap:.2e} (replicas stay identical).",
        "",
    ]
    if max(rounds) < 1:
        lines += [
            "lt_finetune's run was faster in every repeat. This run does not isolate why; a likely cause on 2 cores "
            "with one compute thread per process is that DDP's all-reduce overlaps the backward pass and competes "
            "with it for the cores, while lt_finetune's single all-reduce runs after it.",
            "",
        ]
    return lines


def _memory(result: dict[str, Any], goals: list[tuple[str, str, str, bool]]) -> list[str]:
    data = result["data"]
    summary = data["summary"]
    ref = summary[data["reference"]]
    lines = [
        "## 4. Memory",
        "",
        f"Peak resident memory (RSS, `VmHWM`) of a fresh process training {data['steps']} steps (MobileNetV2, 64 px, "
        'batch 64); the peak counter is reset right before `fit`. "Training increment" is the peak minus the RSS '
        "just before `fit` (what training adds on top of the loaded model, data and libraries). "
        f"{data['repeats']} probe(s) per configuration (median).",
        "",
        _meta_line(result),
        "",
    ]
    rows = []
    for name, s in summary.items():
        whole = s["peak_rss"] / ref["peak_rss"]
        inc = s["training_peak"] / ref["training_peak"]
        rows.append(
            [
                f"`{name}`: {data['configs'][name]}",
                _mib(s["rss_before"]),
                _mib(s["peak_rss"]),
                _mib(s["training_peak"]),
                f"{whole:.2f}",
                f"{inc:.2f}",
            ]
        )
    lines += _table(
        [
            "configuration",
            "RSS before fit (MiB)",
            "peak RSS (MiB)",
            "training increment (MiB)",
            "peak / full",
            "increment / full",
        ],
        rows,
    )
    ours = summary.get("ours_frozen")
    if ours is not None:
        inc = ours["training_peak"] / ref["training_peak"]
        whole = ours["peak_rss"] / ref["peak_rss"]
        goals.append(
            ("4. Memory, frozen / full (training increment)", f"<= {MEMORY_GOAL}", f"{inc:.2f}", inc <= MEMORY_GOAL)
        )
        goals.append(
            (
                "4. Memory, frozen / full (whole-process peak RSS)",
                f"<= {MEMORY_GOAL}",
                f"{whole:.2f}",
                whole <= MEMORY_GOAL,
            )
        )
        lines += [
            f"Goal (frozen <= {MEMORY_GOAL}x full): on the training increment {inc:.2f}x, "
            f"{_verdict(inc <= MEMORY_GOAL)}; "
            f"on the whole-process peak RSS {whole:.2f}x, {_verdict(whole <= MEMORY_GOAL)} (the process' fixed "
            "share, libraries, model and data, is the same in both).",
            "",
        ]
    return lines


def _acc_rows(runs: list[dict[str, Any]], per_class: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for r in runs:
        if r["per_class"] == per_class:
            out.setdefault(r["recipe"], []).append(r["final"])
    return out


def _fmt_acc(values: Sequence[float]) -> str:
    mean, std = mean_std(values)
    return f"{mean:.3f} ± {std:.3f}"


def _accuracy(
    result: dict[str, Any], goals: list[tuple[str, str, str, bool]], images: Path, plots: list[str]
) -> list[str]:
    data = result["data"]
    p = data["protocol"]
    recipes = data["recipes"]
    runs = data["runs"]
    pick = data["pick"]
    n_seeds = len(p["seeds"])
    lines = [
        "## 5. Accuracy at equal epochs (Animal-MNIST)",
        "",
        f"{p['main_per_class']} labelled training images per class (the seed draws them), the fixed test split of "
        f"{p['test_per_class']} per class (identical for every seed and size), grayscale to 3 channels, 64 px, "
        f"ImageNet mean/std, horizontal flips only, batch 64, {p['epochs']} epochs, AdamW (weight decay 0.05, none on "
        "norms and biases) with a per-step warm-up + cosine schedule (except where noted), ImageNet MobileNetV2. "
        f"Test accuracy after the last epoch, mean ± sample std over {n_seeds} seed(s) {p['seeds']}"
        + (" (the default runs 2 seeds to fit its time budget; `--full` runs 3). " if n_seeds == 2 else ". ")
        + f"Per-epoch curves: seed {p['seeds'][0]} (every seed with `--full`). "
        f"Hyper-parameters from `{data['hparams_source']}` (chosen on validation, see below).",
        "",
        _meta_line(result),
        "",
    ]
    if p.get("limit_train_batches"):
        lines += [f"**Smoke settings: {p['limit_train_batches']} batches per epoch; the numbers mean nothing.**", ""]
    hp = data["hparams"]

    def table_for(per_class: int) -> tuple[list[str], dict[str, list[float]]]:
        acc = _acc_rows(runs, per_class)
        full = mean_std(acc["full"])[0] if "full" in acc else None
        rows = []
        for name, values in sorted(acc.items(), key=lambda kv: -mean_std(kv[1])[0]):
            info = recipes[name]
            from benchmarks.recipes import RECIPES

            key = RECIPES[name].hparams if name in RECIPES else ""
            delta = f"{mean_std(values)[0] - full:+.3f}" if full is not None else ""
            rows.append(
                [
                    info["label"] + (" (val pick)" if name == pick else ""),
                    info["family"],
                    info["description"],
                    ", ".join(f"{k}={v:g}" for k, v in hp.get(key, {}).items()),
                    _fmt_acc(values),
                    " ".join(f"{v:.3f}" for v in values),
                    delta,
                ]
            )
        header = ["recipe", "family", "what", "hyper-parameters", "test acc", "per seed", "vs full FT"]
        return _table(header, rows), acc

    main_table, main_acc = table_for(p["main_per_class"])
    lines += [f"### {p['main_per_class']} labels per class", "", *main_table]
    means = {n: mean_std(v)[0] for n, v in main_acc.items()}
    ours = {n: m for n, m in means.items() if recipes[n]["family"] == "lt_finetune"}
    if ours:
        best = max(ours, key=lambda n: ours[n])
        rivals = {n: m for n, m in means.items() if n == "full" or recipes[n]["family"] == "anchor"}
        ahead = all(ours[best] > m for m in rivals.values())
        ok = ours[best] >= ACCURACY_GOAL and ahead
        label = f"5. Best lt_finetune recipe at {p['main_per_class']}/class (`{best}`), ahead of full FT and anchors"
        goals.append((label, f">= {ACCURACY_GOAL}", f"{ours[best]:.3f}", ok))
        lines += [
            f"Best lt_finetune recipe by test mean: `{best}` at {ours[best]:.3f} (goal >= {ACCURACY_GOAL}: "
            f"{_verdict(ours[best] >= ACCURACY_GOAL)}); ahead of full fine-tuning and both anchors "
            f"({', '.join(f'`{n}` {m:.3f}' for n, m in rivals.items())}): {_verdict(ahead)}. "
            f"The recipe chosen on validation before any test run is `{pick}` ({means.get(pick, float('nan')):.3f}).",
            "",
        ]
        if not ok:
            lines += [_tried(recipes, ours), ""]
    few_table, few_acc = table_for(p["few_per_class"])
    lines += [f"### {p['few_per_class']} labels per class (same test split)", "", *few_table]
    few_means = {n: mean_std(v)[0] for n, v in few_acc.items()}
    ours_few = {n: m for n, m in few_means.items() if recipes[n]["family"] == "lt_finetune"}
    if ours_few and "full" in few_means:
        best = max(ours_few, key=lambda n: ours_few[n])
        margin = ours_few[best] - few_means["full"]
        ok = margin >= FEW_LABEL_MARGIN
        goals.append(
            (
                f"5. Best lt_finetune recipe at {p['few_per_class']}/class (`{best}`) vs full FT",
                f">= +{FEW_LABEL_MARGIN:.2f}",
                f"{margin:+.3f}",
                ok,
            )
        )
        lines += [
            f"Best lt_finetune recipe: `{best}` {ours_few[best]:.3f} vs full fine-tuning {few_means['full']:.3f}: "
            f"{margin:+.3f} (goal >= +{FEW_LABEL_MARGIN:.2f}: {_verdict(ok)}). The validation pick `{pick}`: "
            f"{few_means.get(pick, float('nan')) - few_means['full']:+.3f}. Hyper-parameters were chosen at "
            f"{p['main_per_class']}/class and not re-tuned for {p['few_per_class']}/class.",
            "",
        ]
        if not ok:
            lines += [_tried(recipes, ours_few), ""]
    sizes = sorted({r["per_class"] for r in runs})
    eff_recipes = [n for n in ("scratch", "full", pick) if n in recipes]
    eff_rows = []
    for size in sizes:
        acc = _acc_rows(runs, size)
        eff_rows.append([str(size)] + [_fmt_acc(acc[n]) if n in acc else "" for n in eff_recipes])
    lines += [
        "### Data efficiency",
        "",
        *_table(["labels per class", *[recipes[n]["label"] for n in eff_recipes]], eff_rows),
    ]
    lines += _lr_selection()
    plots += _plot_curves(data, images / "accuracy_per_epoch.png")
    plots += _plot_efficiency(data, eff_recipes, images / "data_efficiency.png")
    lines += [
        f"![Test accuracy per epoch]({images.name}/accuracy_per_epoch.png)",
        "",
        f"![Data efficiency]({images.name}/data_efficiency.png)",
        "",
    ]
    if data["skipped"]:
        lines += ["Skipped recipes: " + ", ".join(f"`{k}` ({v})" for k, v in data["skipped"].items()) + ".", ""]
    return lines


def _tried(recipes: dict[str, Any], ours: dict[str, float]) -> str:
    listed = ", ".join(f"`{n}` ({m:.3f})" for n, m in sorted(ours.items(), key=lambda kv: -kv[1]))
    return (
        f"Goal not met. Tried: every lt_finetune recipe in the registry, {listed}, each with the learning rate (and "
        "LayerwiseLR decay) chosen on validation from the grid below; nothing was tuned on the test split."
    )


def _lr_selection() -> list[str]:
    if not LR_TABLE.is_file():
        return ["No `lr_table.json`: the defaults in `benchmarks/recipes.py` were used.", ""]
    table = json.loads(LR_TABLE.read_text())
    lines = [
        "### How the hyper-parameters were chosen",
        "",
        f"`{table['command']}` ({table['wall_s']:.0f} s): {table['protocol']}. One seed and a 500-image validation "
        "split, so differences under about one point are noise. Chosen values (first best wins ties):",
        "",
    ]
    rows = [
        [t["key"], f"`{t['recipe']}`", ", ".join(f"{k}={v:g}" for k, v in t["hparams"].items()), f"{t['val_acc']:.3f}"]
        for t in table["trials"]
    ]
    lines += _table(["key", "recipe", "candidate", "val acc"], rows)
    lines += [
        "Chosen: "
        + "; ".join(f"{k}: " + ", ".join(f"{a}={b:g}" for a, b in v.items()) for k, v in table["chosen"].items())
        + f". Validation pick among lt_finetune recipes: `{table['pick']}`.",
        "",
    ]
    return lines


def _scale(result: dict[str, Any], images: Path, plots: list[str]) -> list[str]:
    data = result["data"]
    lines = ["## 6. Scale (Fashion-MNIST)", ""]
    if "skipped" in data:
        return [*lines, f"Skipped: {data['skipped']}", ""]
    lines += [
        "One epoch on the first N images of a seeded permutation of Fashion-MNIST's 60,000 training images, resized "
        "to 64 px, batch 64 per process, each configuration in a fresh process. `layerwise_lr` is full fine-tuning "
        "through lt_finetune (backward through everything); `linear_probe` has the backbone frozen. Throughput is "
        "N / epoch time.",
        "",
        _meta_line(result),
        "",
    ]
    rows = [
        [
            f"{r['size']:,}",
            f"`{r['recipe']}`",
            r["devices"],
            f"{r['epoch_s']:.1f}",
            f"{r.get('images', r['size']) / r['epoch_s']:.0f}",
            _ms(r["median_step_s"]) if r["median_step_s"] else "",
        ]
        for r in data["runs"]
    ]
    lines += _table(["images", "recipe", "processes", "epoch (s)", "images/s", "median step (ms)"], rows)
    plots += _plot_scale(data, images / "scale_cost.png")
    lines += [f"![Cost vs work]({images.name}/scale_cost.png)", ""]
    return lines


# -- plots -------------------------------------------------------------------------------------------------------


def _plot_curves(data: dict[str, Any], path: Path) -> list[str]:
    main = data["protocol"]["main_per_class"]
    curves: dict[str, list[list[float]]] = {}
    for r in data["runs"]:
        if r["per_class"] == main and all(h is not None for h in r["history"]):
            curves.setdefault(r["recipe"], []).append(r["history"])
    if not curves:
        return []
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, histories in curves.items():
        epochs = range(1, len(histories[0]) + 1)
        mean = [sum(h[i] for h in histories) / len(histories) for i in range(len(histories[0]))]
        style = (
            "--"
            if data["recipes"][name]["family"] == "anchor"
            else (":" if data["recipes"][name]["family"] == "baseline" else "-")
        )
        ax.plot(list(epochs), mean, style, marker="o", label=data["recipes"][name]["label"])
    seeds = sorted(
        {r["seed"] for r in data["runs"] if r["per_class"] == main and all(h is not None for h in r["history"])}
    )
    ax.set(xlabel="epoch", ylabel="test accuracy", title=f"Animal-MNIST, {main} labels/class (seeds {seeds})")
    ax.set_xticks(range(1, max(len(h[0]) for h in curves.values()) + 1))
    ax.set_ylim(max(0.0, min(min(min(h) for h in hs) for hs in curves.values()) - 0.02), 1.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return [_save(fig, path)]


def _plot_efficiency(data: dict[str, Any], names: list[str], path: Path) -> list[str]:
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name in names:
        sizes = sorted({r["per_class"] for r in data["runs"] if r["recipe"] == name})
        stats = [
            mean_std([r["final"] for r in data["runs"] if r["recipe"] == name and r["per_class"] == s]) for s in sizes
        ]
        label = data["recipes"][name]["label"] + (" (val pick)" if name == data["pick"] else "")
        ax.errorbar(
            sizes,
            [m for m, _ in stats],
            yerr=[s for _, s in stats],
            marker="o",
            capsize=3,
            label=label,
        )
    ax.set_xscale("log")
    all_sizes = sorted({r["per_class"] for r in data["runs"]})
    ax.set_xticks(all_sizes, [str(s) for s in all_sizes])
    ax.minorticks_off()
    ax.set(xlabel="labelled images per class", ylabel="test accuracy", title="Data efficiency (Animal-MNIST)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return [_save(fig, path)]


def _plot_scale(data: dict[str, Any], path: Path) -> list[str]:
    fig, ax = plt.subplots(figsize=(6, 4.5))
    keys = sorted({(r["recipe"], r["devices"]) for r in data["runs"]})
    for recipe, devices in keys:
        rows = sorted(
            (r for r in data["runs"] if (r["recipe"], r["devices"]) == (recipe, devices)), key=lambda r: r["size"]
        )
        ax.plot(
            [r["size"] for r in rows],
            [r["epoch_s"] for r in rows],
            marker="o",
            label=f"{recipe}, {devices} process{'es' if devices > 1 else ''}",
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    sizes = sorted({r["size"] for r in data["runs"]})
    ax.set_xticks(sizes, [f"{s / 1000:g}k" if s >= 1000 else str(s) for s in sizes])
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if str(v)[0] in "25" else ""))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set(
        xlabel="training images (one epoch)", ylabel="epoch wall time (s)", title="Cost vs work (Fashion-MNIST, 64 px)"
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return [_save(fig, path)]


def _save(fig: Any, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


# -- the report ----------------------------------------------------------------------------------------------------


def write_report(results_dir: Path = RESULTS_DIR, out: Path = REPORT) -> list[str]:
    """Write the Markdown report and its plots (next to it, under ``<out stem>/``); returns the plot paths."""
    images = out.parent / out.stem
    run = load_result(results_dir, "run")
    results = {name: load_result(results_dir, name) for name in ("speed", "ddp", "memory", "accuracy", "scale")}
    goals: list[tuple[str, str, str, bool]] = []
    plots: list[str] = []
    body: list[str] = []
    speed = results["speed"]
    if speed and speed["data"]["overhead_pairs"]:
        body += _overhead(speed, goals)
    if speed and speed["data"]["speedup_rows"]:
        body += _speedup(speed, goals)
    if results["ddp"]:
        body += _ddp(results["ddp"], goals)
    if results["memory"]:
        body += _memory(results["memory"], goals)
    if results["accuracy"]:
        body += _accuracy(results["accuracy"], goals, images, plots)
    if results["scale"]:
        body += _scale(results["scale"], images, plots)
    meta = run["meta"] if run else {}
    lines = [
        "# Benchmarks",
        "",
        "The measured claims of lt_finetune. Every number below comes from one run of the committed scripts in "
        "`benchmarks/`; the raw results are in `benchmarks/results/*.json`, and `python -m benchmarks.report` "
        "rebuilds this page from them. Timings are medians of interleaved repeats, reported as ratios measured in "
        "the same run.",
        "",
    ]
    if meta:
        lines += [
            f"This page: `{meta['command']}` ({meta['mode']} settings), started {meta['started']}, total wall time "
            f"**{meta['wall_s'] / 60:.1f} min**, sections {meta['sections']}. Load average before / after: "
            f"{meta.get('load_before')} / {meta.get('load_after')} (the machine was shared with other work).",
            "",
        ]
    lines += ["## Goals", ""]
    lines += _table(["goal", "target", "measured", "verdict"], [[g, t, m, _verdict(ok)] for g, t, m, ok in goals])
    lines += _how_to_run(meta)
    lines += _machine(meta)
    lines += body
    lines += ANCHOR_NOTES
    if meta.get("notes"):
        lines += ["## Setup notes from this run", "", *[f"- {n}" for n in meta["notes"]], ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines).rstrip() + "\n")
    return plots


def _how_to_run(meta: dict[str, Any]) -> list[str]:
    return [
        "## How to run",
        "",
        "```bash",
        "make bench                         # = python -m benchmarks.run: the CPU-sized default",
        "make bench-full                    # = python -m benchmarks.run --full: more repeats/seeds, 60k images, DDP",
        "python -m benchmarks.run --sections 1,2   # a subset; other sections keep their last results",
        "python -m benchmarks.run --smoke          # tiny settings, results under /tmp: checks that it all runs",
        "python -m benchmarks.select_lr            # re-pick hyper-parameters on validation (lr_table.json)",
        "python -m benchmarks.report               # rebuild this page from benchmarks/results/*.json",
        "```",
        "",
        "The run's setup step installs what only the benchmarks need when it is missing: "
        "`pip install --no-deps finetuning-scheduler==2.14.1` (the anchor), and, when run as root, "
        "`apt-get update && apt-get install -y dataset-fashion-mnist` (section 6; skipped with a note otherwise). "
        "`make setup` provides the rest (ImageNet MobileNetV2 weights, Animal-MNIST).",
        "",
    ]


def _machine(meta: dict[str, Any]) -> list[str]:
    machine, versions = meta.get("machine", {}), meta.get("versions", {})
    if not machine:
        return []
    lines = ["## Machine and versions", ""]
    lines += _table(
        ["item", "value"],
        [
            ["CPU", machine["cpu_model"]],
            ["cores (nproc)", machine["nproc"]],
            ["RAM", f"{machine['ram_gib']} GiB"],
            ["GPU", machine["gpu"] or "none (CPU only)"],
            ["torch threads", machine["torch_threads"]],
            ["OS", machine["os"]],
            ["Python", machine["python"]],
        ]
        + [[k, v] for k, v in versions.items()],
    )
    return lines


def main(argv: list[str] | None = None) -> None:
    """Rebuild the report from stored results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--out", type=Path, default=REPORT)
    args = parser.parse_args(argv)
    for plot in write_report(args.results_dir, args.out):
        print(f"wrote {Path(plot).relative_to(REPO) if Path(plot).is_relative_to(REPO) else plot}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""LoRA (peft adapters) vs full fine-tuning vs linear probing on Animal-MNIST: accuracy, size, step time, memory.

Protocol: section 5's (:mod:`benchmarks.accuracy`), shortened to fit about 15 minutes on 2 shared cores: ImageNet
MobileNetV2, ``--per-class`` (100) labelled images per class drawn with the seed, the fixed 200-per-class test split,
64 px, flips, batch 64, AdamW (weight decay 0.05, none on norms and biases), per-step warm-up + cosine, ``--epochs``
(3). Full fine-tuning and the linear probe use their learning rates from ``lr_table.json`` (chosen at 200 per class
and 5 epochs); LoRA (rank 8, alpha 16, the default targets: MobileNetV2's 34 pointwise convolutions) has none there,
so its rate is chosen here first from ``--grid``, by the rule ``select_lr`` follows: seed 0, the training images
split 3:1 per class, validation accuracy after the last epoch; the test split is never used for a choice. Every
process runs one torch thread (``--threads``): on shared cores OpenMP's spinning threads otherwise slow steps
several-fold, unevenly.

Cost is measured in a fresh process per method (``python -m benchmarks.lora probe``): after the model, data and
Trainer are built the peak-RSS counter is reset (Linux ``/proc/self/clear_refs``), ``--probe-steps`` training steps
run, and ``VmHWM`` is read; the step time is the median over the steps after the first three (``StepTimer``). RSS
counts everything the process holds (weights, activations, optimizer state, allocator caches), which is what a CPU
run pays; ``tracemalloc`` would miss it, as torch allocates outside Python's allocator. The LoRA model is also timed
for inference before and after :func:`lt_finetune.lora.merge_lora`, and the merged model is scored again.

Usage::

    python -m benchmarks.lora                 # selection + 2 seeds + probes; writes docs/benchmarks/lora.md
    python -m benchmarks.lora --smoke         # minutes: tiny settings, output under /tmp
    python -m benchmarks.lora probes          # more cost probes into benchmarks/results/lora.json; rewrites the page
    python -m benchmarks.lora report          # rewrite the page from benchmarks/results/lora.json
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from benchmarks.accuracy import NUM_CLASSES, carve_validation, datamodule
from benchmarks.common import (
    BACKBONE,
    REPO,
    RESULTS_DIR,
    StepTimer,
    accuracy,
    library_versions,
    load_result,
    machine_info,
    make_trainer,
    mean_std,
    median,
    quiet,
    reset_peak_rss,
    save_result,
    scratch_dir,
    vm_status,
    weights_path,
)
from benchmarks.recipes import build, load_hparams
from lt_finetune import TransferModule
from lt_finetune.callbacks import LoRA

REPORT = REPO / "docs" / "benchmarks" / "lora.md"
METHODS = {"full": "Full fine-tuning", "linear_probe": "Linear probe", "lora": "LoRA r=8 (peft)"}
RANK, ALPHA = 8, 16.0


def build_method(name: str, lr: float | None, weights: str, root: str, epochs: int) -> tuple[pl.LightningModule, list]:
    """The module and callbacks of one method; ``lr`` only for LoRA (the others read ``lr_table.json``)."""
    if name != "lora":
        return build(name, load_hparams(), weights, NUM_CLASSES, root, epochs)
    model = TransferModule(
        backbone=BACKBONE, num_classes=NUM_CLASSES, pretrained=weights, lr=lr, weight_decay=0.05, schedule="cosine"
    )
    return model, [LoRA(r=RANK, alpha=ALPHA)]


def fit_and_score(
    name: str, lr: float | None, seed: int, settings: dict[str, Any], weights: str, select: bool
) -> dict[str, Any]:
    """Train one method with one seed; the score is validation accuracy (``select``) or test accuracy."""
    start = time.perf_counter()
    epochs, limit, per_class = settings["epochs"], settings["limit_batches"], settings["per_class"]
    dm = datamodule(per_class, seed)
    if select:
        carve_validation(dm, max(per_class // 4, 1), seed)
    loader = dm.val_dataloader() if select else dm.test_dataloader()
    pl.seed_everything(seed, verbose=False)
    root = scratch_dir()
    model, callbacks = build_method(name, lr, weights, root, epochs)
    trainer = make_trainer(root, callbacks, max_epochs=epochs, limit_train_batches=limit)
    trainer.fit(model, datamodule=dm)
    result: dict[str, Any] = {"score": accuracy(model, loader, limit), "wall_s": time.perf_counter() - start}
    result["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if name == "lora" and not select:
        from lt_finetune.lora import merge_lora

        x = next(iter(loader))[0]
        with torch.no_grad():
            before = model.eval()(x)
            merge_lora(model.backbone)
            result["merged_max_logit_diff"] = float((model(x) - before).abs().max())
        result["merged_score"] = accuracy(model, loader, limit)
    return result


# -- the fresh-process probe -------------------------------------------------------------------------------------


def probe(name: str, lr: float, steps: int, out: Path) -> None:
    """In this (fresh) process: peak RSS and step time of ``steps`` training steps of ``name``."""
    quiet()
    dm = datamodule(100, 0)
    pl.seed_everything(0, verbose=False)
    root = scratch_dir()
    model, callbacks = build_method(name, lr, weights_path(), root, 1)
    timer = StepTimer()
    trainer = make_trainer(root, [timer, *callbacks], max_epochs=1, limit_train_batches=steps + 1)
    gc.collect()
    before = vm_status()
    reset = reset_peak_rss()
    trainer.fit(model, datamodule=dm)
    after = vm_status()
    data: dict[str, Any] = {
        "method": name,
        "rss_before": before["VmRSS"],
        "peak_rss": after["VmHWM"],
        "peak_reset": reset,
        "step_s": median(timer.step_times(warmup=3)),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total": sum(p.numel() for p in model.parameters()),
        "torch_threads": torch.get_num_threads(),
    }
    if name == "lora":
        from lt_finetune.lora import merge_lora

        x = next(iter(dm.test_dataloader()))[0]
        data["infer_s"] = _forward_time(model, x)
        merge_lora(model.backbone)
        data["infer_merged_s"] = _forward_time(model, x)
    out.write_text(json.dumps(data))


@torch.inference_mode()
def _forward_time(model: torch.nn.Module, x: torch.Tensor, repeats: int = 7) -> float:
    model.eval()
    model(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - start)
    return median(times)


def run_probes(lrs: dict[str, float], steps: int, threads: int, repeats: int, log: Any) -> dict[str, list]:
    """``repeats`` fresh-process probes of every method, interleaved so that a busy spell hits all of them."""
    results: dict[str, list] = {name: [] for name in METHODS}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeats):
            for name in METHODS:
                out = Path(tmp) / f"{name}.json"
                cmd = [sys.executable, "-m", "benchmarks.lora", "probe", name, str(out), "--lr", str(lrs[name])]
                cmd += ["--probe-steps", str(steps), "--threads", str(threads)]
                done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
                if done.returncode != 0 or not out.is_file():
                    raise RuntimeError(f"probe failed: {' '.join(cmd)}\n{done.stderr[-3000:]}")
                r = json.loads(out.read_text())
                results[name].append(r)
                log(f"  probe {name:<13} {r['step_s']:.3f} s/step, peak RSS {r['peak_rss'] / 2**20:.0f} MiB")
    return results


def _summary(probes: list[dict[str, Any]] | dict[str, Any]) -> dict[str, Any]:
    # Medians over the repeats; a single probe (older result files) is a list of one.
    runs = probes if isinstance(probes, list) else [probes]
    out = dict(runs[0])
    for key in ("step_s", "peak_rss", "rss_before", "infer_s", "infer_merged_s"):
        if key in out:
            out[key] = median(r[key] for r in runs)
    out["step_range"] = (min(r["step_s"] for r in runs), max(r["step_s"] for r in runs))
    out["repeats"] = len(runs)
    return out


# -- the whole benchmark -----------------------------------------------------------------------------------------


def run(settings: dict[str, Any], log: Any = print) -> dict[str, Any]:
    weights = weights_path()
    hparams = load_hparams()
    selection = {}
    grid = settings["grid"]
    for lr in grid:
        r = fit_and_score("lora", lr, 0, settings, weights, select=True)
        selection[lr] = r["score"]
        log(f"  select lora lr={lr:g}: val acc {r['score']:.3f} ({r['wall_s']:.0f} s)")
    chosen = max(grid, key=lambda lr: (selection[lr], -lr))
    lrs = {"full": hparams["full"]["lr"], "linear_probe": hparams["linear_probe"]["lr"], "lora": chosen}
    runs = []
    for seed in settings["seeds"]:
        for name in METHODS:
            r = fit_and_score(name, lrs[name], seed, settings, weights, select=False)
            runs.append({"method": name, "seed": seed, **r})
            extra = f", merged {r['merged_score']:.3f}" if "merged_score" in r else ""
            log(f"  seed {seed} {name:<13} test acc {r['score']:.3f}{extra} ({r['wall_s']:.0f} s)")
    probes = run_probes(lrs, settings["probe_steps"], settings["threads"], settings["probe_repeats"], log)
    return {"lrs": lrs, "selection": {str(k): v for k, v in selection.items()}, "runs": runs, "probes": probes}


def report(data: dict[str, Any], meta: dict[str, Any]) -> str:
    """The markdown page."""
    rows = [
        "| method | test accuracy | trainable parameters | step time (s) | peak RSS (MiB) | training RSS (MiB) | lr |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, label in METHODS.items():
        scores = [r["score"] for r in data["runs"] if r["method"] == name]
        mean, std = mean_std(scores)
        p = _summary(data["probes"][name])
        low, high = p["step_range"]
        shown = f"{p['step_s']:.2f}" + (f" ({low:.2f}-{high:.2f})" if p["repeats"] > 1 else "")
        rows.append(
            f"| {label} | {mean:.3f} ± {std:.3f} ({', '.join(f'{s:.3f}' for s in scores)}) | "
            f"{p['trainable']:,} of {p['total']:,} ({100 * p['trainable'] / p['total']:.1f} %) | {shown} | "
            f"{p['peak_rss'] / 2**20:.0f} | {(p['peak_rss'] - p['rss_before']) / 2**20:.0f} | {data['lrs'][name]:g} |"
        )
    lora_runs = [r for r in data["runs"] if r["method"] == "lora"]
    lora, full = _summary(data["probes"]["lora"]), _summary(data["probes"]["full"])
    merged = ", ".join(f"{r['merged_score']:.3f}" for r in lora_runs)
    unmerged = ", ".join(f"{r['score']:.3f}" for r in lora_runs)
    drift = max(r["merged_max_logit_diff"] for r in lora_runs)

    def ratio(key: str) -> float:
        if key == "training":
            return (lora["peak_rss"] - lora["rss_before"]) / max(full["peak_rss"] - full["rss_before"], 1)
        return float(lora[key]) / float(full[key])

    machine, settings = meta["machine"], meta["settings"]
    selection = ", ".join(f"{float(k):g}: {v:.3f}" for k, v in data["selection"].items())
    lines = [
        "# LoRA vs full fine-tuning vs linear probing",
        "",
        f"Written by `{meta['command']}` on {meta['started']} in {meta['wall_s'] / 60:.1f} min"
        + (
            f"; cost probes added by `python -m benchmarks.lora probes` on {', '.join(meta['probes_added'])}."
            if meta.get("probes_added")
            else "."
        ),
        "",
        f"ImageNet MobileNetV2 on Animal-MNIST, section 5's protocol (`benchmarks/accuracy.py`) shortened to fit "
        f"about 15 minutes on 2 shared cores: {settings['per_class']} labelled images per class drawn with the seed "
        f"(section 5: 200), {settings['epochs']} epochs (section 5: 5), seeds {settings['seeds']}; the fixed "
        "2,000-image test split, 64 px, flips, batch 64, AdamW (weight decay 0.05), per-step warm-up + cosine. "
        f"LoRA: rank {RANK}, alpha {ALPHA:g}, peft adapters on the default targets (the 34 pointwise convolutions); "
        "its learning rate was chosen on validation (seed 0, the training images split 3:1 per class; validation "
        f"accuracy by rate: {selection}). Full fine-tuning and the probe take theirs from `benchmarks/lr_table.json` "
        "(chosen at 200 per class and 5 epochs). The test split is used for nothing but these numbers.",
        "",
        *rows,
        "",
        "- **test accuracy**: mean ± standard deviation over the seeds (each seed's value in brackets).",
        "- **trainable parameters**: what the optimizer updates (head included; LoRA: adapters + head).",
        f"- **step time**: median wall time of one training step (forward, backward, optimizer, every hook) over "
        f"{settings['probe_steps']} steps after 3 warm-up steps, in a fresh process per method and probe, one torch "
        f"thread; the median over {lora['repeats']} interleaved probes per method (their range in brackets). Peak "
        "and training RSS are medians over the same probes.",
        "- **peak RSS**: the process' peak resident memory (`VmHWM`, reset after the model, data and Trainer are "
        "built) during those steps; **training RSS** is that peak minus the RSS just before `fit`. It counts "
        "activations, gradients, optimizer state and allocator caches; `tracemalloc` would not see them.",
        "",
        f"Merging (`lt_finetune.lora.merge_lora`, what `lt-finetune export` does): test accuracy after merging "
        f"{merged} (before: {unmerged}), largest logit change {drift:.1e}; inference on a batch of 64 takes "
        f"{lora['infer_s']:.3f} s with the adapters and {lora['infer_merged_s']:.3f} s merged.",
        "",
        f"Relative to full fine-tuning, LoRA trains {ratio('trainable'):.3f}x the parameters at {ratio('step_s'):.2f}x "
        f"the step time and {ratio('training'):.2f}x the training RSS. On a CPU the backward pass of LoRA still runs "
        "through every block that holds an adapter (the input gradients are needed below it); what it saves is the "
        "weight gradients and AdamW state of the frozen weights, and the activations those weight gradients need.",
        "",
        f"Machine: {machine['cpu_model']}, {machine['nproc']} cores, shared with other jobs while this ran (times "
        f"carry that noise; one torch thread per process, as OpenMP's spinning threads are slowed most by sharing), "
        f"torch {meta['versions']['torch']}, peft {meta['versions'].get('peft', '?')}.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", nargs="?", default="run", choices=["run", "probe", "probes", "report"])
    parser.add_argument("method", nargs="?", help="probe: the method")
    parser.add_argument("out", nargs="?", help="probe: the JSON file to write")
    parser.add_argument("--lr", type=float, default=1e-2, help="probe: learning rate")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--grid", default="0.003,0.01,0.03", help="LoRA learning rates to choose from")
    parser.add_argument("--probe-steps", type=int, default=12)
    parser.add_argument("--probe-repeats", type=int, default=2, help="fresh-process probes per method")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--smoke", action="store_true", help="tiny settings; output under /tmp")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.mode == "probe":
        probe(args.method, args.lr, args.probe_steps, Path(args.out))
        return
    quiet()
    if args.mode in ("probes", "report"):  # re-run the probes only (adding repeats), or re-render the page
        stored = load_result(RESULTS_DIR, "lora")
        if stored is None:
            raise SystemExit(f"{RESULTS_DIR / 'lora.json'} is missing: run `python -m benchmarks.lora` first.")
        data, meta = stored["data"], stored["meta"]
        if args.mode == "probes":
            lrs, old = data["lrs"], meta["settings"]
            more = run_probes(lrs, old["probe_steps"], old["threads"], args.probe_repeats, print)
            for name, probes in more.items():
                previous = data["probes"][name]
                data["probes"][name] = (previous if isinstance(previous, list) else [previous]) + probes
            meta["probes_added"] = [*meta.get("probes_added", []), time.strftime("%Y-%m-%d %H:%M")]
            save_result(RESULTS_DIR, "lora", data, meta)
        REPORT.write_text(report(data, meta))
        print(f"Wrote {REPORT}")
        return
    settings: dict[str, Any] = {
        "seeds": [int(s) for s in args.seeds.split(",")],
        "per_class": args.per_class,
        "epochs": args.epochs,
        "grid": [float(g) for g in args.grid.split(",")],
        "probe_steps": args.probe_steps,
        "threads": args.threads,
        "probe_repeats": args.probe_repeats,
        "limit_batches": None,
    }
    if args.smoke:
        settings.update(seeds=settings["seeds"][:1], epochs=1, grid=settings["grid"][:1])
        settings.update(probe_steps=4, probe_repeats=1)
        settings["limit_batches"] = 2
    started = time.strftime("%Y-%m-%d %H:%M")
    start = time.perf_counter()
    data = run(settings)
    import importlib.metadata

    versions = {**library_versions(), "peft": importlib.metadata.version("peft")}
    command = "python -m benchmarks.lora" + (" --smoke" if args.smoke else "")
    meta = {
        "command": command,
        "started": started,
        "wall_s": time.perf_counter() - start,
        "machine": machine_info(),
        "versions": versions,
        "settings": settings,
    }
    results_dir = Path("/tmp/lt_bench_smoke") if args.smoke else RESULTS_DIR
    save_result(results_dir, "lora", data, meta)
    out = results_dir / "lora.md" if args.smoke else REPORT
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report(data, meta))
    print(f"Wrote {out}")


if __name__ == "__main__":
    main()

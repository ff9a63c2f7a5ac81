"""The fixed text of ``docs/benchmarks.md``: the page's introduction, how to run, notes on the anchors.

Text that depends on a run's numbers stays with the section that renders it (``report_cost``, ``report_accuracy``).
"""

#: The page's title and what every number on it is.
INTRO = [
    "# Benchmarks",
    "",
    "The measured claims of lt_finetune. Every number below comes from one run of the committed scripts in "
    "`benchmarks/`; the raw results are in `benchmarks/results/*.json`, and `python -m benchmarks.report` "
    "rebuilds this page from them. Timings are medians of interleaved repeats, reported as ratios measured in "
    "the same run.",
    "",
]

#: The commands, shown under "How to run".
HOW_TO_RUN = [
    "## How to run",
    "",
    "```bash",
    "make bench                         # = python -m benchmarks.run: the CPU-sized default",
    "make bench-full                    # = python -m benchmarks.run --full: more repeats/seeds, 60k images, DDP",
    "python -m benchmarks.run --sections 1,2   # a subset; other sections keep their last results",
    "python -m benchmarks.run --sections 7 --seeds 0,1,2   # techniques in/out of distribution (~25 min)",
    "python -m benchmarks.run --smoke          # tiny settings, results under /tmp: checks that it all runs",
    "python -m benchmarks.select_lr            # re-pick hyper-parameters on validation (lr_table.json)",
    "python -m benchmarks.select_few           # section 10's, at 10 labels per class (few_lr_table.json)",
    "python -m benchmarks.select_validation    # section 11: rank and advise vs fine-tuning (~15 min)",
    "python -m benchmarks.report               # rebuild this page from benchmarks/results/*.json",
    "```",
    "",
    "`make bench` runs `make bench-setup` first, which installs what only the benchmarks need (the "
    "finetuning-scheduler and fastai anchors; as root, Fashion-MNIST for section 6); what is missing is skipped "
    "with a note. "
    "`make setup` provides the rest (ImageNet MobileNetV2 weights, Animal-MNIST).",
    "",
]

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
    "- fastai (section 7): `Learner` on the same MobileNetV2 file and the same normalised tensors, split into "
    "body (`features`) and head as `vision_learner` does, `CrossEntropyLossFlat`, `fine_tune(epochs - 1, "
    "base_lr=2e-3, freeze_epochs=1)`: its documented defaults (one frozen epoch, then discriminative rates and "
    "one-cycle), BatchNorm trainable while frozen (`train_bn=True`), weight decay 0.01.",
    "",
]

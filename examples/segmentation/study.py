"""A study over seeds: every ``--norm`` x images per process x seed of train.py at one
process count, then a table (mean and range over the seeds) and a plot of mIoU per epoch.

    python examples/segmentation/study.py --nproc 4 -b 1 --seeds 0 1 2 \\
        --output-dir runs/small_batch -- --num-train 320 --num-val 200 --epochs 4
    python examples/segmentation/study.py --quick       # a reduced matrix, minutes on a CPU

Arguments after ``--`` go to every train.py run. Each run is launched with torchrun into
``<output-dir>/p<P>_b<B>/<norm>/seed<S>/`` (train.py's outputs, plus ``train.log``). A run
whose metrics.jsonl covers every epoch is finished and is never launched again; an
unfinished one continues from its checkpoint. So the same command resumes an interrupted
study, and more invocations (another process count, other batch sizes, norms or seeds) can
add to one output folder as long as their train.py arguments agree. After every run,
``<output-dir>/results.md`` (final mIoU and pixel accuracy: mean and min-max over the
seeds; time per run) and ``<output-dir>/miou.png`` (one panel per processes x images, one
line per norm, the seeds' range shaded) are rewritten from all finished runs in the folder.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import train  # this directory's train.py: its flags, presets and --norm choices
from compare import load_run, plot_miou, style_miou_axes
from utils import read_jsonl

TRAIN = Path(__file__).resolve().with_name("train.py")

# The matrix without options: the normalizations of the small-batch comparison. sn_nobn is
# SN without its BN scope, the SN authors' choice for one image per GPU.
DEFAULT_NORMS = ("bn", "syncbn", "gn", "sn_nobn", "syncsn", "syncssn")
DEFAULT_BATCH_SIZES = (1, 2)
DEFAULT_SEEDS = (0, 1, 2)
DEFAULT_NPROC = 4
# --quick: one local and one synchronized norm, two seeds (so the ranges exist), small
# images and few steps. Arguments after -- still win (argparse keeps the last value).
QUICK_NORMS = ("bn", "syncsn")
QUICK_SEEDS = (0, 1)
QUICK_BATCH_SIZES = (1,)
QUICK_NPROC = 2
QUICK_TRAIN_ARGS = ["--image-size", "32", "--num-train", "64", "--num-val", "32"]
QUICK_TRAIN_ARGS += ["--epochs", "2", "--base-width", "8"]

# train.py flags the study sets itself for each run, with the option that sets them here.
OWNED = {
    "batch_size": "-b/--batch-sizes",
    "norm": "--norms",
    "seed": "--seeds",
    "output_dir": "--output-dir",
    "resume": None,  # always auto: that is how an unfinished run continues
    "test_only": None,
}
# Flags that change how fast a run goes, not what it computes.
NEUTRAL = ("print_freq", "dist_timeout")

LABELS = {
    "bn": "BN",
    "syncbn": "SyncBN",
    "gn": "GN",
    "sn": "SN",
    "sn_nobn": "SN w/o BN",
    "syncsn": "SyncSN",
    "ssn": "SSN",
    "ssn_nobn": "SSN w/o BN",
    "syncssn": "SyncSSN",
}
COLOURS = {
    "bn": "tab:blue",
    "syncbn": "tab:purple",
    "gn": "tab:green",
    "sn": "tab:brown",
    "sn_nobn": "tab:olive",
    "syncsn": "tab:red",
    "ssn": "tab:pink",
    "ssn_nobn": "tab:gray",
    "syncssn": "tab:orange",
}
STUDY_FILE = "study.json"
# Lines of train.py's log shown while a run goes: epoch summaries, resumes, the end.
ECHO = re.compile(r"(epoch \d+: |resumed from |done: )")


@dataclass(frozen=True)
class Run:
    """One cell of the matrix."""

    nproc: int
    batch_size: int
    norm: str
    seed: int

    @property
    def config(self) -> str:
        return f"p{self.nproc}_b{self.batch_size}"

    def path(self, root: Path) -> Path:
        return root / self.config / self.norm / f"seed{self.seed}"

    def __str__(self) -> str:
        return f"{self.nproc}x{self.batch_size} {self.norm} seed {self.seed}"


# --------------------------------------------------------------------------------------
# Command line and the checks made before anything is launched
# --------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """The study's own options and the train.py arguments (after ``--``)."""
    argv = list(argv)
    train_args: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, train_args = argv[:i], argv[i + 1 :]
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0].replace("``", ""),
        usage="%(prog)s [options] [-- TRAIN_ARGS...]",
        epilog="TRAIN_ARGS go to every train.py run (see train.py --help), e.g. -- --epochs 3",
    )
    p.add_argument(
        "--nproc",
        type=int,
        default=None,
        help=f"processes per run (torchrun --nproc_per_node); default {DEFAULT_NPROC}, "
        f"--quick {QUICK_NPROC}",
    )
    p.add_argument(
        "-b",
        "--batch-sizes",
        type=int,
        nargs="+",
        default=None,
        metavar="B",
        help=f"images per process; default {_words(DEFAULT_BATCH_SIZES)}, "
        f"--quick {_words(QUICK_BATCH_SIZES)}",
    )
    p.add_argument(
        "--norms",
        nargs="+",
        default=None,
        choices=tuple(train.NORMS),
        metavar="NORM",
        help=f"train.py --norm values, of {', '.join(train.NORMS)}; "
        f"default {_words(DEFAULT_NORMS)}, --quick {_words(QUICK_NORMS)}",
    )
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        metavar="S",
        help=f"train.py --seed values; default {_words(DEFAULT_SEEDS)}, "
        f"--quick {_words(QUICK_SEEDS)}",
    )
    p.add_argument("--output-dir", default="runs/study", help="folder of the runs and results")
    p.add_argument(
        "--plot", default=None, help="PNG of the mIoU curves (default <output-dir>/miou.png)"
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="reduced matrix and sizes (train.py " + " ".join(QUICK_TRAIN_ARGS) + ")",
    )
    args = p.parse_args(argv)
    quick = args.quick
    args.nproc = args.nproc or (QUICK_NPROC if quick else DEFAULT_NPROC)
    args.batch_sizes = _unique(
        args.batch_sizes or (QUICK_BATCH_SIZES if quick else DEFAULT_BATCH_SIZES)
    )
    args.norms = _unique(args.norms or (QUICK_NORMS if quick else DEFAULT_NORMS))
    args.seeds = _unique(args.seeds or (QUICK_SEEDS if quick else DEFAULT_SEEDS))
    if args.nproc < 1:
        p.error(f"--nproc must be at least 1, got {args.nproc}")
    if min(args.batch_sizes) < 1:
        p.error(f"-b/--batch-sizes must be at least 1 image per process, got {args.batch_sizes}")
    return args, (QUICK_TRAIN_ARGS if quick else []) + train_args


def _words(values: Sequence) -> str:
    return " ".join(map(str, values))


def _unique(values: Sequence) -> list:
    return list(dict.fromkeys(values))


def train_argv(run: Run, common: list[str], root: Path) -> list[str]:
    # The study's flags come last: with argparse the last occurrence wins.
    return [
        *common,
        "-b",
        str(run.batch_size),
        "--norm",
        run.norm,
        "--seed",
        str(run.seed),
        "--output-dir",
        str(run.path(root)),
        "--resume",
        "auto",
    ]


def check_train_args(common: list[str]) -> dict:
    """train.py's reading of the shared arguments, minus what the study sets per run: the
    settings that must agree between the runs of one output folder."""
    parser = train.get_args_parser()
    try:
        flags = parser.parse_args(common)
    except SystemExit:  # argparse has printed what is wrong
        raise SystemExit(
            f"train.py does not accept the arguments after --: {shlex.join(common)}"
        ) from None
    defaults = parser.parse_args([])
    for key, option in OWNED.items():
        if getattr(flags, key) != getattr(defaults, key):
            where = f"set it with the study's {option}" if option else "the study sets it"
            raise SystemExit(
                f"--{key.replace('_', '-')} after -- is given to each run by the study "
                f"({where}), got {getattr(flags, key)!r}"
            )
    # Only what differs from train.py's defaults: a flag added to train.py later does not
    # make an existing folder look different.
    return {
        k: v
        for k, v in vars(flags).items()
        if k not in OWNED and k not in NEUTRAL and v != getattr(defaults, k)
    }


def resolved_epochs(runs: list[Run], common: list[str], root: Path) -> int:
    """The number of epochs every run trains for (from the flags or the dataset's preset);
    parsing each run's command line first stops a bad one before the first launch.
    Combinations train.py rejects later (a batch too small for a norm, ...) fail that run
    alone, with train.py's message."""
    parser = train.get_args_parser()
    epochs = set()
    for run in runs:
        ns = parser.parse_args(train_argv(run, common, root))
        epochs.add(ns.epochs if ns.epochs is not None else train.PRESETS[ns.dataset]["epochs"])
    if len(epochs) != 1:
        raise SystemExit(f"the runs would train for different numbers of epochs: {epochs}")
    return epochs.pop()


def open_study(root: Path, settings: dict, common: list[str], epochs: int) -> None:
    """Records the shared settings in a new output folder, or checks that an existing
    folder's runs were made with the same ones: a finished run is never trained further
    or overwritten by an invocation that asks for something else."""
    record = root / STUDY_FILE
    if record.is_file():
        saved = json.loads(record.read_text())
        defaults = vars(train.get_args_parser().parse_args([]))
        then = {**defaults, **saved["settings"]}
        now = {**defaults, **settings}
        diff = [
            f"--{k.replace('_', '-')} {then.get(k)!r} (now {now.get(k)!r})"
            for k in sorted(set(then) | set(now))
            if k not in OWNED and k not in NEUTRAL and then.get(k) != now.get(k)
        ]
        if diff or saved["epochs"] != epochs:
            diff = diff or [f"epochs {saved['epochs']} (now {epochs})"]
            raise SystemExit(
                f"{root} holds runs made with train.py arguments "
                f"{shlex.join(saved['train_args'])!r}; these differ: {', '.join(diff)}. "
                "Pass the same arguments after -- (and --quick if it was used), or another "
                "--output-dir"
            )
        return
    if root.exists() and any(root.iterdir()):
        raise SystemExit(
            f"{root} exists and holds files that study.py did not make (no {STUDY_FILE}); "
            "choose another --output-dir"
        )
    root.mkdir(parents=True, exist_ok=True)
    record.write_text(
        json.dumps({"train_args": common, "settings": settings, "epochs": epochs}, indent=1) + "\n"
    )


def is_finished(path: Path, epochs: int) -> bool:
    rows = read_jsonl(str(path / "metrics.jsonl"))
    return [r["epoch"] for r in rows] == list(range(epochs))


# --------------------------------------------------------------------------------------
# Launching
# --------------------------------------------------------------------------------------


class Interrupted(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_interrupted(signum: int, frame: object) -> None:
    # Further signals while the run is being stopped are ignored: stopping takes a step.
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)
    raise Interrupted(signum)


def launch(run: Run, common: list[str], root: Path) -> tuple[int, float]:
    """One torchrun of train.py, its output appended to the run's train.log; rank 0's epoch
    lines are echoed as they appear. Returns the exit status and the wall time.

    torchrun runs in a session of its own: a Ctrl-C or SIGTERM reaches the study, which
    passes SIGTERM on, so train.py writes a checkpoint of the step it reached."""
    out = run.path(root)
    out.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={run.nproc}",
        str(TRAIN),
        *train_argv(run, common, root),
    ]
    log_path = out / "train.log"
    t0 = time.perf_counter()
    with open(log_path, "a") as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        offset = log.tell()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        with open(log_path) as tail:
            tail.seek(offset)
            pending = ""
            while True:
                done = proc.poll() is not None
                pending += tail.read()
                *lines, pending = pending.split("\n")  # a line being written stays pending
                for line in lines:
                    if ECHO.match(line):
                        print(f"    {line}", flush=True)
                if done:
                    break
                time.sleep(0.5)
    except Interrupted:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise
    return proc.returncode, time.perf_counter() - t0


# torchrun's own lines around a failure (its banner, timestamps, the ChildFailedError box)
# and traceback frames: left out of the lines shown, which keeps train.py's message.
_NOISE = re.compile(
    r"([WEI]\d{4} |\*+$|Setting OMP|=+$|-+$|\[\d+\]:|\s|Traceback|Failures:|Root Cause|"
    r"torch\.distributed\.elastic|.*/train\.py FAILED$)"
)


def failure_lines(log: Path, count: int = 6) -> list[str]:
    """The last lines of the last attempt in a run's log that say why it failed."""
    lines = log.read_text().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("$ ")]
    shown: list[str] = []
    for line in lines[starts[-1] + 1 if starts else 0 :]:
        if line and not _NOISE.match(line) and line not in shown:  # ranks repeat messages
            shown.append(line)
    return shown[-count:] + [f"(full log: {log})"]


def _fmt_time(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h:d}:{m:02d}:{s:02d}"


def estimate_left(pending: list[Run], walls: dict[tuple[str, str], list[float]]) -> float | None:
    """Seconds the pending runs should take: the mean wall time of this invocation's runs
    of the same configuration and norm, else of the same norm, else of all of them."""
    if not walls:
        return None
    everything = [w for ws in walls.values() for w in ws]
    total = 0.0
    for run in pending:
        same = walls.get((run.config, run.norm))
        norm = [w for (_, n), ws in walls.items() if n == run.norm for w in ws]
        pool = same or norm or everything
        total += sum(pool) / len(pool)
    return total


# --------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------


@dataclass
class Group:
    """The finished seeds of one (processes, images per process, norm)."""

    nproc: int
    batch_size: int
    norm: str
    seeds: list[int]
    rows: list[list[dict]]  # per seed, metrics.jsonl

    def final(self, key: str) -> list[float]:
        return [rows[-1][key] for rows in self.rows]

    def times(self) -> list[float]:
        # Training and evaluation, summed over epochs: start-up excluded, and a run that
        # was interrupted and resumed counts each epoch once.
        return [sum(r["epoch_time"] for r in rows) for rows in self.rows]


def _norm_order(norm: str) -> tuple[int, str]:
    known = list(DEFAULT_NORMS) + [n for n in LABELS if n not in DEFAULT_NORMS]
    return (known.index(norm) if norm in known else len(known), norm)


def collect(root: Path, epochs: int) -> list[Group]:
    """Every finished run under ``root``, grouped over seeds."""
    groups = []
    for config in root.glob("p*_b*"):
        nproc, batch = (int(x[1:]) for x in config.name.split("_"))
        for norm_dir in config.iterdir():
            seeds, rows = [], []
            for seed_dir in norm_dir.glob("seed*"):
                if is_finished(seed_dir, epochs):
                    label, run_rows = load_run(str(seed_dir))
                    # --convert runs are labelled so; they are SyncSN networks.
                    if label not in (norm_dir.name, "BN->SyncSN"):
                        print(f"warning: {seed_dir} was trained with --norm {label}: left out")
                        continue
                    seeds.append(int(seed_dir.name[4:]))
                    rows.append(run_rows)
            if seeds:
                order = sorted(range(len(seeds)), key=seeds.__getitem__)
                groups.append(
                    Group(
                        nproc,
                        batch,
                        norm_dir.name,
                        [seeds[i] for i in order],
                        [rows[i] for i in order],
                    )
                )
    groups.sort(key=lambda g: (g.batch_size, g.nproc, _norm_order(g.norm)))
    return groups


def _spread(values: list[float], fmt: str) -> str:
    mean = format(sum(values) / len(values), fmt)
    if len(values) == 1:
        return mean
    return f"{mean} ({format(min(values), fmt)}–{format(max(values), fmt)})"


def _config_title(nproc: int, batch: int) -> str:
    return f"{nproc} process{'es' if nproc > 1 else ''} x {batch} image{'s' if batch > 1 else ''}"


def format_table(groups: list[Group]) -> str:
    lines = [
        "| processes x images | norm | seeds | final mIoU | pixel accuracy | time per run (s) |",
        "|---|---|---|---|---|---|",
    ]
    for g in groups:
        lines.append(
            f"| {g.nproc} x {g.batch_size} | {LABELS.get(g.norm, g.norm)} | "
            f"{','.join(map(str, g.seeds))} | {_spread(g.final('miou'), '.3f')} | "
            f"{_spread(g.final('pixel_acc'), '.3f')} | {_spread(g.times(), '.0f')} |"
        )
    return "\n".join(lines)


def plot_groups(groups: list[Group], path: Path) -> None:
    """One panel per (processes, images per process): mean mIoU per epoch over the seeds,
    with the seeds' min-max shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = list(dict.fromkeys((g.nproc, g.batch_size) for g in groups))
    fig, axes = plt.subplots(
        1, len(configs), figsize=(4.8 * len(configs), 4.0), sharey=True, squeeze=False
    )
    for ax, (nproc, batch) in zip(axes[0], configs, strict=True):
        panel = [g for g in groups if (g.nproc, g.batch_size) == (nproc, batch)]
        epochs = [r["epoch"] for r in panel[0].rows[0]]  # the same for every finished run
        for g in panel:
            per_epoch = list(zip(*([r["miou"] for r in rows] for rows in g.rows), strict=True))
            mean = [sum(v) / len(v) for v in per_epoch]
            band = ([min(v) for v in per_epoch], [max(v) for v in per_epoch])
            plot_miou(
                ax,
                LABELS.get(g.norm, g.norm),
                epochs,
                mean,
                band if len(g.seeds) > 1 else None,
                COLOURS.get(g.norm),
            )
        seeds = sorted({s for g in panel for s in g.seeds})
        listed = ",".join(map(str, seeds))
        style_miou_axes(
            ax, f"{_config_title(nproc, batch)}, seed{'s' if len(seeds) > 1 else ''} {listed}"
        )
        ax.set_xticks(epochs)
        ax.set_ylabel("")
    axes[0][0].set_ylabel("validation mIoU")
    # One legend for all panels, under them: inside a panel it would hide curves.
    handles = {}
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    fig.legend(
        handles.values(),
        handles.keys(),
        loc="lower center",
        ncol=min(len(handles), 6),
        fontsize=8,
        frameon=False,
    )
    fig.suptitle("lines: mean over the seeds; shaded: their min-max", fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(root: Path, epochs: int, plot: Path) -> list[Group]:
    groups = collect(root, epochs)
    if not groups:
        return groups
    saved = json.loads((root / STUDY_FILE).read_text())
    text = [
        "# Final validation mIoU and pixel accuracy over seeds",
        "",
        f"Written {datetime.now():%Y-%m-%d %H:%M} from the finished runs in {root}. "
        f"train.py arguments shared by every run: `{shlex.join(saved['train_args']) or '(none)'}`"
        f" ({epochs} epochs). Mean over the seeds, min–max in parentheses; time per run: "
        "training and evaluation summed over the epochs, start-up excluded.",
        "",
        format_table(groups),
        "",
    ]
    (root / "results.md").write_text("\n".join(text))
    plot_groups(groups, plot)
    return groups


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def run_all(
    todo: list[Run], partial: list[Run], common: list[str], root: Path, epochs: int, plot: Path
) -> list[Run]:
    """Launches the runs one after the other, with progress; returns those that failed."""
    walls: dict[tuple[str, str], list[float]] = {}
    failed: list[Run] = []
    t_start = time.perf_counter()
    for i, run in enumerate(todo):
        verb = "continue" if run in partial else "start"
        print(f"[{i + 1}/{len(todo)}] {verb} {run}: log {run.path(root) / 'train.log'}", flush=True)
        rc, wall = launch(run, common, root)
        if is_finished(run.path(root), epochs):
            walls.setdefault((run.config, run.norm), []).append(wall)
            last = read_jsonl(str(run.path(root) / "metrics.jsonl"))[-1]
            write_results(root, epochs, plot)
            status = f"done in {wall:.0f} s, final mIoU {last['miou']:.3f}"
            if rc != 0:
                # Every epoch was trained, evaluated and recorded before the crash: the
                # run's results stand, and a later invocation will not launch it again.
                status += f" (then exit status {rc} on the way out: see its train.log)"
        else:
            failed.append(run)
            for line in failure_lines(run.path(root) / "train.log"):
                print(f"    {line}")
            status = f"FAILED (exit status {rc}) after {wall:.0f} s"
        left = estimate_left(todo[i + 1 :], walls)
        eta = f", about {_fmt_time(left)} left" if left is not None and i + 1 < len(todo) else ""
        elapsed = _fmt_time(time.perf_counter() - t_start)
        print(f"[{i + 1}/{len(todo)}] {run}: {status}; {elapsed} elapsed{eta}", flush=True)
    return failed


def main(argv: Sequence[str] | None = None) -> int:
    """The study on the command line ``argv`` (default: sys.argv); returns the exit status:
    0, 1 when a run failed, 128 + the signal number when interrupted."""
    args, common = parse_args(sys.argv[1:] if argv is None else argv)
    root = Path(args.output_dir)
    plot = Path(args.plot) if args.plot else root / "miou.png"
    # Seed by seed: an interrupted study has compared every norm on the first seeds.
    runs = [
        Run(args.nproc, b, norm, seed)
        for seed in args.seeds
        for b in args.batch_sizes
        for norm in args.norms
    ]
    settings = check_train_args(common)
    epochs = resolved_epochs(runs, common, root)
    open_study(root, settings, common, epochs)

    finished = [r for r in runs if is_finished(r.path(root), epochs)]
    todo = [r for r in runs if r not in finished]
    partial = [r for r in todo if r.path(root).exists()]
    print(
        f"{len(runs)} runs ({args.nproc} processes; images per process "
        f"{','.join(map(str, args.batch_sizes))}; {' '.join(args.norms)}; seeds "
        f"{','.join(map(str, args.seeds))}; {epochs} epochs) in {root}: {len(finished)} "
        f"finished (skipped), {len(partial)} to continue, {len(todo) - len(partial)} to start",
        flush=True,
    )
    for run in finished:
        print(f"  skip {run}: finished", flush=True)

    previous = {s: signal.signal(s, _raise_interrupted) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        failed = run_all(todo, partial, common, root, epochs, plot)
    except Interrupted as e:
        print(
            f"interrupted by {signal.Signals(e.signum).name}: a run in progress stopped with a "
            "checkpoint; the same command continues the study",
            flush=True,
        )
        return 128 + e.signum
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)

    groups = write_results(root, epochs, plot)
    if groups:
        print(format_table(groups))
        print(f"table written to {root / 'results.md'}, plot to {plot}")
    if failed:
        print(
            f"{len(failed)} run(s) failed: {'; '.join(map(str, failed))}. Their logs are "
            "train.log in their folders; the same command retries them",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

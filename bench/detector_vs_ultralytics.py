"""Side by side: an effdense detector preset against ultralytics' YOLOv8n, both trained from scratch for
the same wall-clock budget on the same CPU threads and data, both scored by the same pycocotools code.

    pip install -e ".[bench]"          # ultralytics (AGPL): only this script uses it, in its own process
    python bench/detector_vs_ultralytics.py                           # 128 and 256 px, seeds 0 1 2, 4 min each
    python bench/detector_vs_ultralytics.py --sizes 256 --seeds 0 --minutes 10 --threads 8
    python bench/detector_vs_ultralytics.py --preset configs/demo/detection.yaml --set optim.lr=0.004
    python bench/detector_vs_ultralytics.py --sides effdense           # no ultralytics needed
    python bench/detector_vs_ultralytics.py --sizes 128 --seeds 0 --minutes 0.3 --threads 1 \
        --train-images 32 --val-images 8                               # a smoke test (~1 min)

Data (bench/shapes_data.py, the same files for every run): N training and M validation images of 256 px,
square / circle / triangle of 24-80 px in random colours on textured backgrounds (some low-contrast, some
cluttered, some without objects), written as COCO json from --data-seed and converted to YOLO labels for
ultralytics (hard links to the same JPEG files).

Each (input size, seed, side) is one child process, run one after another (never at the same time), so
thread settings and imports do not leak between the sides:

* effdense: the preset (--preset; default configs/detection/efficientdet_d0_custom.yaml where it exists,
  else configs/demo/detection.yaml) with data.root / data.image_size / data.batch_size / data.workers /
  train.device=cpu / train.seed set, evaluation and checkpoints only at the end, then the --set overrides;
  trained through the package API (as `effdense train` does) for --minutes with train.time_limit (the
  Trainer refits its epochs and schedule to the time, as ultralytics does). With a Trainer that lacks
  train.time_limit (or --set train.time_limit=null) it stops at the deadline through its max_steps check
  instead (the schedule then not refitted) and the output says so.
* ultralytics: YOLO("yolov8n.yaml") (built from the yaml, nothing downloaded), epochs=10000 with
  time=--minutes/60 (ultralytics refits its epochs to the time after each epoch), batch, workers,
  device=cpu, amp=False, plots=False, val=False, deterministic=False, seed (ultralytics turns data loader
  workers off on the CPU; the bench gives it --workers back, as effdense has them); then predict on the
  validation images with its validation defaults (conf=0.001, iou=0.7) and max_det=100, boxes in original
  pixels. It runs with YOLO_OFFLINE=1 and its own YOLO_CONFIG_DIR (settings sync off, a local font under
  the name Arial.ttf), so it never touches the network.

Both get torch.set_num_threads(--threads) and OMP_NUM_THREADS=--threads (note: importing ultralytics sets
OMP_NUM_THREADS=1 when it is unset, which would leave it one thread). Both sides' detections on the
validation images are written as COCO results json and scored here by one function (COCOeval bbox:
mAP = stats[0], mAP50 = stats[1]) against the same validation json.

Columns: steps = batches of --batch images trained (ultralytics accumulates gradients over nbs=64 images,
so its optimizer steps are fewer: see results.json); train s = the training loop's time (what the budget
bounds); img/s = images trained / train s; setup s = process start to the first step (imports, data,
model); eval s = predicting the validation images; other s = the rest of the child's time (ultralytics'
own final validation passes, checkpoint writing, process exit).

Output: a fresh folder per invocation under --output (runs/bench/detector_vs_ultralytics/<time>/) with
data/, one folder per run (logs, configs, weights, detections.json), results.json and results.md.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SIDES = ("effdense", "ultralytics")
DEFAULT_OUTPUT = "runs/bench/detector_vs_ultralytics"
INSTALL_HINT = 'pip install -e ".[bench]"'


def default_preset() -> str:
    custom = REPO / "configs" / "detection" / "efficientdet_d0_custom.yaml"
    return str(custom if custom.is_file() else REPO / "configs" / "demo" / "detection.yaml")


# --------------------------------------------------------------------------------------------- scoring


def coco_score(gt_json: str | Path, detections: list[dict]) -> dict[str, float]:
    """mAP (COCOeval stats[0]) and mAP50 (stats[1]) of COCO-format ``detections`` on every image of ``gt_json``."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_json))
        if not detections:
            return {"mAP": 0.0, "mAP50": 0.0, "detections": 0}
        evaluator = COCOeval(gt, gt.loadRes(detections), "bbox")
        evaluator.params.imgIds = sorted(gt.getImgIds())
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = evaluator.stats
    return {"mAP": max(float(stats[0]), 0.0), "mAP50": max(float(stats[1]), 0.0), "detections": len(detections)}


# --------------------------------------------------------------------------------------------- workers


def _set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def worker_effdense(job: dict) -> dict:
    """Train the preset in this process through the package API and predict the validation split."""
    import logging

    sys.path.insert(0, str(REPO))
    _set_threads(job["threads"])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stdout, force=True)

    from tasks import registry
    from tasks.config import load
    from tasks.data import build_loaders
    from tasks.engine import Trainer

    minutes = job["minutes"]
    run_dir = Path(job["dir"]) / "effdense"
    overrides = [
        "data.format=coco", f"data.root={job['coco_root']}", "data.train_split=train", "data.val_split=val",
        "data.train_annotations=null", "data.val_annotations=null", "data.train_images=null", "data.val_images=null",
        f"data.image_size={job['size']}", f"data.batch_size={job['batch']}", f"data.workers={job['workers']}",
        f"model.num_classes={job['num_classes']}", "train.batch_size=null", "train.device=cpu",
        f"train.seed={job['seed']}", "train.eval_every=1000000", "train.checkpoint_every=1000000",
        "train.progress=false", "train.max_steps=null", f"train.output_dir={run_dir.parent}",
        f"train.run_name={run_dir.name}", f"train.time_limit={minutes}",
    ]
    overrides += job["overrides"]
    cfg = load(job["preset"], overrides)
    _set_threads(job["threads"])
    loaders = build_loaders(cfg, splits=("train", "val"))
    model = registry.build_model(cfg)
    trainer = Trainer(model, {"train": loaders["train"]}, cfg, run_dir=run_dir,
                      epoch_callbacks=registry.get(cfg.model.task).epoch_callbacks(cfg))
    budget_mode = "train.time_limit"
    if getattr(trainer, "time_limit", None) is None:  # the Trainer sets it from train.time_limit where implemented
        # Fallback while the Trainer lacks train.time_limit: stop at the deadline through the max_steps check.
        budget_mode = "deadline via the max_steps check (train.time_limit not implemented; schedule not refitted)"
        deadline = [None]
        reached = trainer._max_steps_reached

        def max_steps_or_deadline() -> bool:
            return reached() or (deadline[0] is not None and time.perf_counter() >= deadline[0])

        trainer._max_steps_reached = max_steps_or_deadline
        deadline[0] = time.perf_counter() + minutes * 60
        print(f"bench: {budget_mode}", flush=True)
    fit_start = time.time()
    t0 = time.perf_counter()
    trainer.fit()
    train_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    metrics = trainer.evaluate(loaders["val"])
    trainer.last_evaluator.save(job["dir"])  # detections.json (COCO results: original pixels, category ids)
    eval_s = time.perf_counter() - t1
    batch_images = cfg.data.batch_size * trainer.accum
    return {"steps": trainer.step, "optimizer_steps": trainer.step, "images": trainer.step * batch_images,
            "epochs": trainer.epoch + trainer.batch_in_epoch / max(trainer.batches_per_epoch, 1),
            "planned_epochs": getattr(trainer, "epochs", cfg.train.epochs), "train_s": train_s, "eval_s": eval_s,
            "setup_s": fit_start - job["launched"], "budget_mode": budget_mode,
            "own_metrics": {"mAP": metrics.get("mAP"), "mAP50": metrics.get("mAP50")},
            "preset": job["preset"], "batch": cfg.data.batch_size, "lr": cfg.optim.lr,
            "detections_file": str(Path(job["dir"]) / "detections.json")}


def worker_ultralytics(job: dict) -> dict:
    """Train YOLOv8n from its yaml for the budget, then predict the validation images (COCO results json)."""
    _set_threads(job["threads"])
    from ultralytics import YOLO
    from ultralytics.utils import SETTINGS

    SETTINGS.update({"sync": False})  # no analytics events (YOLO_OFFLINE already keeps them off)
    _set_threads(job["threads"])  # importing ultralytics may have changed it
    state = {"iterations": 0, "optimizer_steps": 0, "loop_s": 0.0, "epoch_iters": {}, "train_start": None}

    def on_pretrain_routine_start(trainer):  # ultralytics sets workers=0 on CPU; give it the same as effdense
        trainer.args.workers = job["workers"]

    def on_train_start(trainer):
        _set_threads(job["threads"])
        state["train_start"] = time.time()
        state["train_start_perf"] = time.perf_counter()
        state["loader_workers"] = trainer.train_loader.num_workers
        step = trainer.optimizer_step

        def counted_step():
            state["optimizer_steps"] += 1
            return step()

        trainer.optimizer_step = counted_step

    def on_train_epoch_start(trainer):
        state["epoch_t0"] = time.perf_counter()

    def on_train_batch_start(trainer):  # counted at the start: the batch the time limit stops on still trained
        state["iterations"] += 1
        state["epoch_iters"][trainer.epoch] = state["epoch_iters"].get(trainer.epoch, 0) + 1

    def on_train_epoch_end(trainer):
        state["epoch_end"] = time.perf_counter()
        state["loop_s"] += state["epoch_end"] - state.pop("epoch_t0")
        state["train_images"] = len(trainer.train_loader.dataset)
        state["accumulate"] = trainer.accumulate
        state["epochs"] = trainer.epochs

    model = YOLO("yolov8n.yaml")
    for event, callback in (("on_pretrain_routine_start", on_pretrain_routine_start),
                            ("on_train_start", on_train_start), ("on_train_epoch_start", on_train_epoch_start),
                            ("on_train_batch_start", on_train_batch_start),
                            ("on_train_epoch_end", on_train_epoch_end)):
        model.add_callback(event, callback)
    settings = dict(data=job["yolo_yaml"], imgsz=job["size"], epochs=10000, time=job["minutes"] / 60,
                    batch=job["batch"], workers=job["workers"], device="cpu", amp=False, plots=False, val=False,
                    seed=job["seed"], deterministic=False, project=job["dir"], name="ultralytics", exist_ok=True)
    model.train(**{**settings, **job["overrides"]})
    last = Path(model.trainer.last)
    t1 = time.perf_counter()
    predictor = YOLO(str(last))
    gt = json.loads(Path(job["val_json"]).read_text())
    cat_ids = sorted(c["id"] for c in gt["categories"])  # YOLO class k = k-th sorted category id
    detections = []
    for image in gt["images"]:
        result = predictor.predict(str(Path(job["val_dir"]) / image["file_name"]), imgsz=job["size"], conf=0.001,
                                   iou=0.7, max_det=100, device="cpu", verbose=False)[0]
        boxes = result.boxes
        for (x0, y0, x1, y1), score, cls in zip(boxes.xyxy.tolist(), boxes.conf.tolist(), boxes.cls.tolist()):
            detections.append({"image_id": image["id"], "category_id": cat_ids[int(cls)],
                               "bbox": [x0, y0, x1 - x0, y1 - y0], "score": score})
    eval_s = time.perf_counter() - t1
    out = Path(job["dir"]) / "detections.json"
    out.write_text(json.dumps(detections))
    per_epoch = state.get("train_images", 0)
    images = sum(min(n * job["batch"], per_epoch) if per_epoch else n * job["batch"]
                 for n in state["epoch_iters"].values())
    batches_per_epoch = len(model.trainer.train_loader) if getattr(model.trainer, "train_loader", None) else 0
    return {"steps": state["iterations"], "optimizer_steps": state["optimizer_steps"], "images": images,
            "epochs": state["iterations"] / batches_per_epoch if batches_per_epoch else None,
            "planned_epochs": state.get("epochs"), "eval_s": eval_s, "loop_s": state["loop_s"],
            # the training phase: first step to the end of the last epoch (its per-epoch checkpoints included,
            # its validation after the last epoch and the final validation of best.pt not)
            "train_s": state["epoch_end"] - state["train_start_perf"], "loader_workers": state["loader_workers"],
            "setup_s": (state["train_start"] or time.time()) - job["launched"], "budget_mode": "time (hours)",
            "accumulate": state.get("accumulate"), "weights": str(last), "batch": job["batch"],
            "detections_file": str(out)}


def worker_main(side: str, job_file: str) -> int:
    job = json.loads(Path(job_file).read_text())
    result = (worker_effdense if side == "effdense" else worker_ultralytics)(job)
    result["worker_s"] = time.time() - job["launched"]
    Path(job["dir"], "result.json").write_text(json.dumps(result, indent=1) + "\n")
    return 0


# --------------------------------------------------------------------------------------------- driver


def fresh_run_dir(output: Path) -> Path:
    """A new folder under ``output`` (never one that exists)."""
    output.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for index in range(1000):
        candidate = output / (stamp if index == 0 else f"{stamp}-{index}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise RuntimeError(f"no fresh run folder under {output}")


def ultralytics_env(run_dir: Path) -> dict[str, str]:
    """YOLO_OFFLINE=1 and a private YOLO_CONFIG_DIR holding a local TTF under the name Arial.ttf (its dataset
    check would otherwise try to download the font)."""
    config_dir = run_dir / "yolo_config"
    font_dir = config_dir / "Ultralytics"
    font_dir.mkdir(parents=True, exist_ok=True)
    font = font_dir / "Arial.ttf"
    if not font.exists():
        import matplotlib

        source = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
        if source.is_file():
            shutil.copyfile(source, font)
    return {"YOLO_OFFLINE": "1", "YOLO_CONFIG_DIR": str(config_dir)}


def parse_value(text: str):
    import yaml

    return yaml.safe_load(text)


def run_job(side: str, job: dict, env_extra: dict[str, str], timeout: float) -> dict:
    """One child process; returns its result.json plus the parent's wall time (or an error)."""
    job_dir = Path(job["dir"])
    job_dir.mkdir(parents=True, exist_ok=False)
    job["launched"] = time.time()
    (job_dir / "job.json").write_text(json.dumps(job, indent=1) + "\n")
    env = dict(os.environ, OMP_NUM_THREADS=str(job["threads"]), MKL_NUM_THREADS=str(job["threads"]),
               PYTHONUNBUFFERED="1", **env_extra)
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", side, "--job", str(job_dir / "job.json")]
    # the child runs in this folder (relative paths in --set mean the same); every path the bench passes is absolute
    start = time.perf_counter()
    with open(job_dir / "worker.log", "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)
        try:
            rc = process.wait(timeout=timeout)
        except BaseException:  # timeout or Ctrl-C: stop the child's whole group (its data loader workers too)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=30)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            if sys.exc_info()[0] is not subprocess.TimeoutExpired:
                raise
            rc = "timeout"
    wall = time.perf_counter() - start
    result_file = job_dir / "result.json"
    if rc != 0 or not result_file.is_file():
        tail = (job_dir / "worker.log").read_text(errors="replace").strip().splitlines()[-3:]
        return {"error": f"exit {rc}: " + " | ".join(tail), "wall_s": wall}
    result = json.loads(result_file.read_text())
    result["wall_s"] = wall
    return result


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


COLUMNS = (("side", "<11", "side"), ("seed", ">4", "seed"), ("steps", ">6", "d"), ("train s", ">7", ".1f"),
           ("img/s", ">6", ".1f"), ("mAP50", ">6", ".3f"), ("mAP", ">6", ".3f"), ("setup s", ">7", ".1f"),
           ("eval s", ">6", ".1f"), ("other s", ">7", ".1f"))


def _row_values(row: dict) -> list:
    if "error" in row:
        return [row["side"], row["seed"]] + [None] * (len(COLUMNS) - 2)
    other = row["wall_s"] - row["setup_s"] - row["train_s"] - row["eval_s"]
    return [row["side"], row["seed"], row["steps"], row["train_s"], row["images"] / max(row["train_s"], 1e-9),
            row["mAP50"], row["mAP"], row["setup_s"], row["eval_s"], max(other, 0.0)]


def _median_values(rows: list[dict], side: str) -> list:
    values = [_row_values(r) for r in rows if r["side"] == side and "error" not in r]
    if not values:
        return [side, "-"] + [None] * (len(COLUMNS) - 2)
    medians = [_median([v[i] for v in values]) for i in range(2, len(COLUMNS))]
    medians[0] = None if medians[0] is None else round(medians[0])
    return [side, "med"] + medians


def _cells(values: list) -> list[str]:
    cells = []
    for (_, align, spec), value in zip(COLUMNS, values):
        if spec in ("side", "seed"):
            cells.append(str(value))
        else:
            cells.append(_fmt(value, spec))
    return cells


def format_tables(results: list[dict], sides: list[str], markdown: bool = False) -> str:
    lines = []
    for size in sorted({r["size"] for r in results}):
        rows = sorted((r for r in results if r["size"] == size),
                      key=lambda r: (sides.index(r["side"]) if r["side"] in sides else len(sides), r["seed"]))
        body = [_cells(_row_values(r)) for r in rows] + [_cells(_median_values(rows, side)) for side in sides]
        title = f"input {size} px"
        if markdown:
            lines += [f"### {title}", "", "| " + " | ".join(c[0] for c in COLUMNS) + " |",
                      "|" + "|".join("---" if c[1].startswith("<") else "---:" for c in COLUMNS) + "|"]
            lines += ["| " + " | ".join(cells) + " |" for cells in body]
        else:
            lines += [title, "  ".join(format(c[0], c[1]) for c in COLUMNS)]
            for index, cells in enumerate(body):
                if index == len(rows):
                    lines.append("-" * len(lines[-1]))
                lines.append("  ".join(format(cell, c[1]) for c, cell in zip(COLUMNS, cells)))
        errors = [r for r in rows if "error" in r]
        for r in errors:
            lines.append(f"{'- ' if markdown else ''}failed: {r['side']} seed {r['seed']}: {r['error']}")
        lines.append("")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench/detector_vs_ultralytics.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256], metavar="PX",
                        help="input sizes (data.image_size / imgsz) to compare at (default: 128 256)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (default: 0 1 2)")
    parser.add_argument("--minutes", type=float, default=4.0,
                        help="training budget per run, wall clock minutes (default: 4)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help=f"torch threads for both sides (default: all cores, {os.cpu_count()} here)")
    parser.add_argument("--preset", default=None,
                        help="effdense preset (file or shipped name); default: configs/detection/"
                             "efficientdet_d0_custom.yaml where it exists, else configs/demo/detection.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="effdense config override after the benchmark's own (repeatable), e.g. "
                             "--set optim.lr=0.004")
    parser.add_argument("--yolo-set", action="append", default=[], metavar="KEY=VALUE", dest="yolo_overrides",
                        help="extra ultralytics train argument (repeatable), e.g. --yolo-set mosaic=0.5")
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES),
                        help="which sides to run (default: both)")
    parser.add_argument("--batch", type=int, default=16, help="training batch for both sides (default: 16)")
    parser.add_argument("--workers", type=int, default=2, help="data loader workers for both sides (default: 2)")
    parser.add_argument("--train-images", type=int, default=240, help="synthetic training images (default: 240)")
    parser.add_argument("--val-images", type=int, default=40, help="synthetic validation images (default: 40)")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic data (default: 0)")
    parser.add_argument("--output", default=DEFAULT_OUTPUT,
                        help=f"parent folder; each invocation writes a fresh subfolder (default: {DEFAULT_OUTPUT})")
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--job", help=argparse.SUPPRESS)
    return parser


def _versions(sides: list[str]) -> dict:
    versions = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                versions["cpu"] = line.split(":", 1)[1].strip()
                break
    from importlib import metadata

    for package in ("torch", "effdense", "pycocotools") + (("ultralytics",) if "ultralytics" in sides else ()):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[package] = metadata.version(package)
    return versions


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        return worker_main(args.worker, args.job)
    sides = [side for side in SIDES if side in args.sides]
    if "ultralytics" in sides:
        import importlib.util

        if importlib.util.find_spec("ultralytics") is None:
            print(f"error: ultralytics is not installed: {INSTALL_HINT} (or run --sides effdense)", file=sys.stderr)
            return 2
    if args.minutes <= 0 or args.threads < 1 or args.batch < 1:
        print("error: --minutes, --threads and --batch must be positive", file=sys.stderr)
        return 2
    preset = args.preset or default_preset()
    if Path(preset).is_file():
        preset = str(Path(preset).resolve())
    yolo_overrides = {}
    for item in args.yolo_overrides:
        key, sep, value = item.partition("=")
        if not sep:
            print(f"error: --yolo-set {item}: expected KEY=VALUE", file=sys.stderr)
            return 2
        yolo_overrides[key] = parse_value(value)

    sys.path.insert(0, str(HERE))
    import shapes_data

    run_dir = fresh_run_dir(Path(args.output)).resolve()
    coco_root = shapes_data.write_shapes_coco(run_dir / "data" / "coco", args.train_images, args.val_images,
                                              seed=args.data_seed)
    yolo_yaml = shapes_data.coco_to_yolo(coco_root, run_dir / "data" / "yolo") if "ultralytics" in sides else None
    val_json = coco_root / "annotations" / "instances_val.json"
    num_classes = len(shapes_data.CATEGORIES)
    yolo_env = ultralytics_env(run_dir) if "ultralytics" in sides else {}
    print(f"bench: output {run_dir}\nbench: effdense preset {preset}; {args.minutes:g} min per run, "
          f"{args.threads} thread(s), batch {args.batch}, {args.train_images}/{args.val_images} images", flush=True)
    timeout = args.minutes * 60 * 3 + 900
    results: list[dict] = []
    header = {"command": [sys.executable, *sys.argv], "args": {k: v for k, v in vars(args).items()
                                                               if k not in ("worker", "job")},
              "preset": preset, "versions": _versions(sides), "run_dir": str(run_dir)}

    def save() -> None:
        (run_dir / "results.json").write_text(json.dumps({**header, "runs": results, "medians": medians(results)},
                                                         indent=1) + "\n")
        (run_dir / "results.md").write_text(markdown(header, results, sides, args))

    try:
        for size in args.sizes:
            for index, seed in enumerate(args.seeds):
                order = sides if index % 2 == 0 else sides[::-1]  # alternate which side goes first
                for side in order:
                    job = {"side": side, "size": size, "seed": seed, "threads": args.threads, "minutes": args.minutes,
                           "batch": args.batch, "workers": args.workers, "num_classes": num_classes,
                           "dir": str(run_dir / f"{size}px" / f"seed{seed}" / side), "preset": preset,
                           "coco_root": str(coco_root.resolve()), "val_json": str(val_json.resolve()),
                           "val_dir": str((coco_root / "val").resolve()),
                           "yolo_yaml": str(yolo_yaml) if yolo_yaml else None,
                           "overrides": list(args.overrides) if side == "effdense" else yolo_overrides}
                    print(f"bench: {side} {size} px seed {seed} ...", end=" ", flush=True)
                    result = run_job(side, job, yolo_env if side == "ultralytics" else {}, timeout)
                    result.update(side=side, size=size, seed=seed)
                    if "error" not in result:
                        detections = json.loads(Path(result["detections_file"]).read_text())
                        result.update(coco_score(val_json, detections))
                        print(f"{result['steps']} steps in {result['train_s']:.1f} s, mAP50 {result['mAP50']:.3f} "
                              f"mAP {result['mAP']:.3f} ({result['wall_s']:.0f} s in all)", flush=True)
                        if side == "effdense" and result["budget_mode"] != "train.time_limit":
                            print(f"bench: note: effdense budget: {result['budget_mode']}", flush=True)
                    else:
                        print(f"failed ({result['error']}); log: {job['dir']}/worker.log", flush=True)
                    results.append(result)
                    save()
    except KeyboardInterrupt:
        print("\nbench: interrupted; the finished runs are in results.json", file=sys.stderr)
        save()
        print(format_tables(results, sides))
        return 130
    save()
    print()
    print(format_tables(results, sides), end="")
    print(f"bench: wrote {run_dir / 'results.json'} and {run_dir / 'results.md'}")
    return 0 if all("error" not in r for r in results) else 1


def medians(results: list[dict]) -> dict:
    out: dict = {}
    for r in results:
        out.setdefault(str(r["size"]), {}).setdefault(r["side"], []).append(r)
    summary = {}
    for size, by_side in out.items():
        summary[size] = {}
        for side, rows in by_side.items():
            ok = [r for r in rows if "error" not in r]
            summary[size][side] = {key: _median([r[key] for r in ok]) for key in
                                   ("steps", "train_s", "mAP50", "mAP", "setup_s", "eval_s")} if ok else None
            if ok:
                summary[size][side]["images_per_s"] = _median([r["images"] / max(r["train_s"], 1e-9) for r in ok])
                summary[size][side]["runs"] = len(ok)
    return summary


def markdown(header: dict, results: list[dict], sides: list[str], args) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in header["versions"].items())
    budget_modes = sorted({r["budget_mode"] for r in results if r.get("side") == "effdense" and "budget_mode" in r})
    lines = ["# effdense vs ultralytics YOLOv8n (same wall-clock budget; YOLOv8n from its yaml)", "",
             f"- command: `{' '.join(header['command'])}`",
             f"- effdense preset: `{header['preset']}`" + (f", overrides {args.overrides}" if args.overrides else ""),
             (f"- budget {args.minutes:g} min per run, {args.threads} torch thread(s), batch {args.batch}, "
              f"{args.workers} loader workers, {args.train_images} train / {args.val_images} val images "
              f"(data seed {args.data_seed})"),
             f"- effdense budget mode: {', '.join(budget_modes) or '-'}",
             f"- {versions}",
             ("- steps: batches trained; train s: the training loop; setup s: process start to the first step; "
              "eval s: predicting the val images; other s: the rest (ultralytics' own final validation, "
              "checkpoints, process exit)"),
             "- both scored by the same COCOeval code on the same val json (mAP = stats[0], mAP50 = stats[1])", ""]
    return "\n".join(lines) + "\n" + format_tables(results, sides, markdown=True)


if __name__ == "__main__":
    sys.exit(main())

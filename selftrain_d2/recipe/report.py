"""The short report of a recipe run: ``OUTPUT/report.md`` and figures under ``OUTPUT/report/``.

- a table of every evaluated stage's metrics, with per-class IoU for semantic segmentation;
- pseudo-label quality against held-out labels, where the labelled dataset's metadata points at them
  (``heldout_sem_seg_root``);
- class pixel counts of the real training labels before and after adding the pseudo labels;
- overlays of a few pseudo labels drawn with Detectron2's Visualizer;
- training curves (total loss and learning rate) from each training stage's ``metrics.json``.
"""
import json
import logging
import os

import numpy as np

from ..evaluation.label_statistics import dataset_pixel_counts, pseudo_label_quality
from ..utils.io import atomic_write, atomic_write_json, atomic_write_text

__all__ = ["write_report", "metrics_table"]

logger = logging.getLogger(__name__)

NUM_OVERLAYS = 4


def _fmt(value):
    return "-" if value is None or (isinstance(value, float) and not np.isfinite(value)) else f"{value:.2f}"


def metrics_table(summary):
    """Markdown table: one column per evaluated stage; rows: headline metrics, then per-class IoU."""
    columns = [name for name, result in summary.items() if isinstance(result, dict)]
    rows = []
    for task in ("sem_seg", "segm", "bbox"):
        keys = []
        for name in columns:
            for key in summary[name].get(task, {}):
                if key not in keys:
                    keys.append(key)
        headline = [k for k in keys if "-" not in k]  # mIoU, fwIoU, mACC, pACC, AP, AP50 ...
        per_class = [k for k in keys if k.startswith(("IoU-", "AP-"))]
        for key in headline + per_class:
            rows.append([f"{task}/{key}"] + [_fmt(summary[n].get(task, {}).get(key)) for n in columns])
    if not rows:
        return ""
    lines = ["| metric | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _save_figure(fig, path):
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100, bbox_inches="tight")


def _training_curves(ctx, folder):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for name, result in ctx.results.items():
        path = os.path.join(result.get("dir", ""), "metrics.json")
        if not os.path.isfile(path):
            continue
        iters, losses, lrs = [], [], []
        with open(path) as f:
            for line in f:
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if "total_loss" in entry and "iteration" in entry:
                    iters.append(entry["iteration"])
                    losses.append(entry["total_loss"])
                    lrs.append(entry.get("lr", np.nan))
        if not iters:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(iters, losses, label="total_loss")
        ax.set_xlabel("iteration")
        ax.set_ylabel("total loss")
        ax.set_title(f"{name}: training curve")
        ax2 = ax.twinx()
        ax2.plot(iters, lrs, color="tab:orange", alpha=0.6, label="lr")
        ax2.set_ylabel("learning rate")
        out = os.path.join(folder, f"curve_{name}.png")
        _save_figure(fig, out)
        plt.close(fig)
        written.append(out)
    return written


def _overlays(records, meta, folder, stage):
    from detectron2.utils.visualizer import ColorMode, Visualizer
    from PIL import Image

    from ..data.image_io import read_image, read_sem_seg

    written = []
    classes = meta.get("stuff_classes", [])
    for record in records[:NUM_OVERLAYS]:
        try:
            image = read_image(record["file_name"], "RGB")
            label = read_sem_seg(record["sem_seg_file_name"], len(classes), meta.get("ignore_label", 255))
        except (OSError, ValueError) as e:
            logger.warning("overlay skipped: %s", e)
            continue
        vis = Visualizer(image, metadata=_MetaView(meta), instance_mode=ColorMode.IMAGE)
        drawn = vis.draw_sem_seg(label, alpha=0.5).get_image()
        out = os.path.join(folder, f"overlay_{stage}_{len(written)}.png")
        with atomic_write(out, "wb") as f:
            Image.fromarray(drawn).save(f, format="PNG")
        written.append(out)
    return written


class _MetaView:
    """What the Visualizer reads from a Metadata, from a plain dict (meta.json of pseudo labels)."""

    def __init__(self, meta):
        self._meta = meta

    def get(self, key, default=None):
        return self._meta.get(key, default)

    def __getattr__(self, key):
        try:
            return self._meta[key]
        except KeyError:
            raise AttributeError(key) from None


def _pseudo_label_sections(ctx, folder):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    lines, quality, counts = [], {}, {}
    for name, result in ctx.results.items():
        dataset_json = os.path.join(result.get("dir", ""), "dataset.json")
        meta_json = os.path.join(result.get("dir", ""), "meta.json")
        if "report" not in result or not os.path.isfile(dataset_json) or not os.path.isfile(meta_json):
            continue
        with open(dataset_json) as f:
            records = json.load(f)
        with open(meta_json) as f:
            meta = json.load(f)
        classes = meta.get("stuff_classes")
        if not classes:
            continue
        ignore = meta.get("ignore_label", 255)
        report = result.get("report") or {}
        lines.append(f"\n## Pseudo labels: {name}\n")
        lines.append(f"{len(records)} images labelled from `{result.get('input')}`; "
                     f"{len(report.get('skipped', []))} unreadable images skipped.\n")
        source = result.get("input")
        heldout_root, heldout_classes = None, classes
        if source in DatasetCatalog.list():
            source_meta = MetadataCatalog.get(source)
            heldout_root = source_meta.get("heldout_sem_seg_root")
            # The held-out labels may have more classes (new classes of a target domain) than the teacher.
            if len(source_meta.get("stuff_classes", None) or ()) > len(classes):
                heldout_classes = list(source_meta.stuff_classes)
        if heldout_root:
            q = pseudo_label_quality(records, heldout_root, heldout_classes, ignore)
            quality[name] = q
            lines.append(f"Against held-out labels ({q['images']} images): coverage {q['coverage']:.1f}% of "
                         f"labelled pixels, pixel accuracy {q['pACC']:.1f}%, mIoU {q['mIoU']:.1f} on covered pixels.\n")
            lines.append("| class | IoU |\n|---|---|")
            lines += [f"| {c} | {_fmt(q[f'IoU-{c}'])} |" for c in heldout_classes]
        else:
            lines.append("No held-out labels for this input (metadata `heldout_sem_seg_root`): quality not measured.")
        pseudo_counts = dataset_pixel_counts(records, len(classes), ignore)
        real_counts = _real_counts(ctx, name, len(classes), ignore)
        counts[name] = {"pseudo": pseudo_counts.tolist(), "real": None if real_counts is None else real_counts.tolist()}
        lines.append("\nClass pixel counts (thousands): real training labels, pseudo labels, both.\n")
        lines.append("| class | real | pseudo | real + pseudo |\n|---|---|---|---|")
        for i, c in enumerate(classes):
            real = None if real_counts is None else int(real_counts[i])
            both = None if real is None else real + int(pseudo_counts[i])
            lines.append(f"| {c} | {'-' if real is None else f'{real / 1e3:.1f}'} | {pseudo_counts[i] / 1e3:.1f} | "
                         f"{'-' if both is None else f'{both / 1e3:.1f}'} |")
        overlays = _overlays(records, meta, folder, name)
        lines += [f"\n![{os.path.basename(p)}](report/{os.path.basename(p)})" for p in overlays]
    return lines, quality, counts


def _real_counts(ctx, pseudo_stage, num_classes, ignore):
    """Pixel counts of the real training labels of the stage whose model wrote the pseudo labels."""
    from detectron2.data import DatasetCatalog

    from ..config import load_config
    from ..data.datasets import register_from_cfg

    model_stage = ctx.recipe.stage(pseudo_stage).options.get("model")
    config = ctx.results.get(model_stage, {}).get("config")
    if not config:
        return None
    cfg = load_config(config, [])
    register_from_cfg(cfg)
    counts = np.zeros(num_classes, dtype=np.int64)
    for dataset in cfg.DATASETS.TRAIN:
        records = [r for r in DatasetCatalog.get(dataset) if "sem_seg_file_name" in r]
        counts += dataset_pixel_counts(records, num_classes, ignore)
    return counts


def write_report(ctx, summary, timings):
    folder = os.path.join(ctx.output_dir, "report")
    os.makedirs(folder, exist_ok=True)
    lines = [f"# Recipe {ctx.recipe.name}\n", f"Output: `{ctx.output_dir}`\n", "## Stages\n",
             "| stage | type | seconds |", "|---|---|---|"]
    lines += [f"| {s.name} | {s.type} | {_fmt(timings.get(s.name))} |" for s in ctx.recipe.stages]
    table = metrics_table(summary)
    if table:
        lines += ["\n## Evaluation (Detectron2 evaluators, %)\n", table]
    pl_lines, quality, counts = _pseudo_label_sections(ctx, folder)
    lines += pl_lines
    curves = _training_curves(ctx, folder)
    if curves:
        lines.append("\n## Training curves\n")
        lines += [f"![{os.path.basename(p)}](report/{os.path.basename(p)})" for p in curves]
    atomic_write_text(os.path.join(ctx.output_dir, "report.md"), "\n".join(lines) + "\n")
    atomic_write_json(os.path.join(folder, "pseudo_label_stats.json"), {"quality": quality, "pixel_counts": counts},
                      indent=2)
    logger.info("Report: %s", os.path.join(ctx.output_dir, "report.md"))

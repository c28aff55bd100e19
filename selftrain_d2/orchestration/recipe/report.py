"""The short report of a recipe run: ``OUTPUT/report.md`` and figures under ``OUTPUT/report/``.

- warnings first: a class an evaluated model never predicts (semantic: on any image of the evaluation set;
  instances: AP 0), a class the pseudo labels never contain;
- a table of every evaluated stage's metrics, with per-class IoU for semantic segmentation;
- pseudo-label quality against held-out labels, where the unlabelled dataset has them (``DATASETS.HELDOUT``,
  the base of a split's unlabelled half, or the metadata keys ``heldout_dataset`` / ``heldout_sem_seg_root``);
- class pixel counts of the real training labels before and after adding the pseudo labels;
- a few pictures of image | pseudo label | held-out label, side by side, with a legend of the classes;
- training curves (total loss and learning rate) from each training stage's ``metrics.json``.

Datasets are looked up after registering the recipe's ``datasets`` block and every training stage's config.
"""
import glob
import json
import logging
import math
import os

import numpy as np

from ...evaluation.label_statistics import dataset_pixel_counts, heldout_label_file, pseudo_label_quality
from ...pseudo_labels.folder import PseudoLabelFolder
from ...utils.io import atomic_write, atomic_write_json, atomic_write_text

__all__ = ["write_report", "metrics_table", "label_figure", "never_predicted"]

logger = logging.getLogger(__name__)

NUM_OVERLAYS = 4
MIN_SIDE = 256  # pictures: smaller images are upscaled (nearest) until their shorter side is at least this
MAX_SIDE = 1024  # ... and larger ones shrunk until their longer side is at most this
IGNORE_COLOR = (40, 40, 40)


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


def _class_colors(classes, meta):
    colors = meta.get("stuff_colors", None)
    if colors is not None and len(colors) >= len(classes):
        return np.asarray([tuple(c)[:3] for c in colors[: len(classes)]], dtype=np.uint8)
    from detectron2.utils.colormap import colormap

    palette = colormap(rgb=True, maximum=255).astype(np.uint8)
    return np.asarray([palette[i % len(palette)] for i in range(len(classes))], dtype=np.uint8)


def _display_size(height, width):
    """(height, width) at which a picture is shown: enlarged by an integer factor until its shorter side is at
    least MIN_SIDE, unless its longer side would pass MAX_SIDE; shrunk to MAX_SIDE when it is longer."""
    longest = max(height, width)
    if longest > MAX_SIDE:
        scale = MAX_SIDE / longest
    else:
        scale = max(1, min(math.ceil(MIN_SIDE / min(height, width)), MAX_SIDE // longest))
    return max(1, round(height * scale)), max(1, round(width * scale))


def label_figure(image, panels, classes, colors, ignore_label, path, title=None):
    """Save ``image`` and the label maps of ``panels`` (``[(title, label or None)]``) side by side as a PNG, at a
    readable size (:func:`_display_size`; labels resized nearest), with a legend of the classes they contain."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    from PIL import Image

    height, width = _display_size(*image.shape[:2])
    enlarge = height >= image.shape[0]
    shown = np.asarray(Image.fromarray(image).resize((width, height), Image.NEAREST if enlarge else Image.BILINEAR))
    lut = np.zeros((256, 3), np.uint8)
    lut[: len(colors)] = colors
    lut[ignore_label] = IGNORE_COLOR
    pictures, present, ignored = [("image", shown)], set(), False
    for name, label in panels:
        if label is None:
            pictures.append((f"{name}: none", np.full_like(shown, 255)))
            continue
        label = np.asarray(Image.fromarray(label.astype(np.uint8)).resize((width, height), Image.NEAREST))
        values = set(int(v) for v in np.unique(label))
        ignored |= ignore_label in values
        present |= {v for v in values if v < len(classes)}
        pictures.append((name, (0.3 * shown + 0.7 * lut[label]).astype(np.uint8)))
    dpi = 100
    fig, axes = plt.subplots(1, len(pictures), figsize=(len(pictures) * (width / dpi + 0.2), height / dpi + 0.9),
                             dpi=dpi, squeeze=False, layout="constrained")
    for ax, (name, picture) in zip(axes[0], pictures):
        ax.imshow(picture, interpolation="nearest")
        ax.set_title(name, fontsize=10)
        ax.axis("off")
    handles = [Patch(color=colors[i] / 255.0, label=classes[i]) for i in sorted(present)]
    if ignored:
        handles.append(Patch(color=np.asarray(IGNORE_COLOR) / 255.0, label=f"ignore ({ignore_label})"))
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 6), fontsize=9, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    _save_figure(fig, path)
    plt.close(fig)
    return path


def _pseudo_figures(records, meta, heldout, heldout_classes, heldout_ignore, folder, stage):
    from ...data.image_io import read_image, read_sem_seg

    written = []
    ignore = meta.get("ignore_label", 255)
    classes = heldout_classes  # the pseudo labels' classes, or more (new classes of a target domain)
    colors = _class_colors(classes, meta)
    for record in records[:NUM_OVERLAYS]:
        try:
            image = read_image(record["file_name"], "RGB")
            label = read_sem_seg(record["sem_seg_file_name"], len(classes), ignore)
            panels = [("pseudo label", label)]
            if heldout is not None:
                path = heldout_label_file(record, heldout)
                held = read_sem_seg(path, len(classes), heldout_ignore) if path else None
                if held is not None and heldout_ignore != ignore:
                    held = np.where(held == heldout_ignore, ignore, held)
                panels.append(("held-out label", held))
        except (OSError, ValueError) as e:
            logger.warning("picture skipped: %s", e)
            continue
        out = os.path.join(folder, f"overlay_{stage}_{len(written)}.png")
        label_figure(image, panels, classes, colors, ignore, out, title=os.path.basename(record["file_name"]))
        written.append(out)
    return written


def _register_datasets(ctx):
    """Make the datasets of the recipe's block and of every training stage's config known in this process."""
    from ...config import load_config
    from ...data.datasets import register_from_cfg

    configs = [None] + [r.get("config") for r in ctx.results.values() if r.get("config")]
    for config in configs:
        try:
            register_from_cfg(load_config(config, ctx.recipe.data_opts(config)))
        except (OSError, ValueError, KeyError, ImportError) as e:
            logger.warning("report: datasets of %s not registered: %s", config or "the recipe", e)


def never_predicted(stage_dir):
    """``{dataset: [classes never predicted]}`` from the semantic predictions that Detectron2's SemSegEvaluator
    saved under ``<stage_dir>/inference/<dataset>/sem_seg_predictions.json``."""
    from detectron2.data import MetadataCatalog

    out = {}
    for path in sorted(glob.glob(os.path.join(stage_dir, "inference", "*", "sem_seg_predictions.json"))):
        dataset = os.path.basename(os.path.dirname(path))
        meta = MetadataCatalog.get(dataset)
        classes = meta.get("stuff_classes", None)
        if not classes:
            continue
        with open(path) as f:
            predicted = {int(p["category_id"]) for p in json.load(f)}
        to_contiguous = meta.get("stuff_dataset_id_to_contiguous_id", None)
        if to_contiguous:
            predicted = {int(to_contiguous[k]) for k in predicted if k in to_contiguous}
        missing = [c for i, c in enumerate(classes) if i not in predicted]
        if missing:
            out[dataset] = missing
    return out


def _evaluation_warnings(ctx, summary):
    lines = []
    for name, metrics in summary.items():
        result = ctx.results.get(name, {})
        for dataset, missing in never_predicted(result.get("dir", "")).items():
            seg = (metrics or {}).get("sem_seg", {})
            absent = [c for c in missing if isinstance(seg.get(f"IoU-{c}"), float) and math.isnan(seg[f"IoU-{c}"])]
            in_labels = [c for c in missing if c not in absent]
            if in_labels:
                lines.append(f"stage `{name}` never predicts {', '.join(in_labels)} on `{dataset}` "
                             "(present in its labels)")
            if absent:
                lines.append(f"stage `{name}` never predicts {', '.join(absent)} on `{dataset}` "
                             "(absent from its labels too)")
        segm = (metrics or {}).get("segm", {})
        zero = [k[3:] for k, v in segm.items() if k.startswith("AP-") and v == 0.0]
        if zero:
            lines.append(f"stage `{name}`: mask AP 0 for {', '.join(zero)} (never a correct instance)")
    return lines


def _pseudo_label_sections(ctx, folder):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from ...data.datasets.heldout import heldout_labels

    lines, quality, counts, warnings = [], {}, {}, []
    for name, result in ctx.results.items():
        labels = PseudoLabelFolder(result.get("dir", ""))
        if "report" not in result or not labels.exists():
            continue
        records, meta = labels.records(), labels.meta()
        classes = meta.get("stuff_classes")
        if not classes:
            continue
        ignore = meta.get("ignore_label", 255)
        report = result.get("report") or {}
        lines.append(f"\n## Pseudo labels: {name}\n")
        lines.append(f"{len(records)} images labelled from `{result.get('input')}`; "
                     f"{len(report.get('skipped', []))} unreadable images skipped.\n")
        source = result.get("input")
        heldout, heldout_classes, heldout_source = heldout_labels(source)
        heldout_ignore = ignore
        if source in DatasetCatalog.list():
            source_meta = MetadataCatalog.get(source)
            heldout_ignore = source_meta.get("ignore_label", ignore)
            # The held-out labels may have more classes (new classes of a target domain) than the teacher.
            if heldout_classes is None and len(source_meta.get("stuff_classes", None) or ()) > len(classes):
                heldout_classes = list(source_meta.stuff_classes)
        if heldout_classes is None or len(heldout_classes) < len(classes):
            heldout_classes = classes
        if heldout is not None:
            q = pseudo_label_quality(records, heldout, heldout_classes, ignore)
            quality[name] = q
            lines.append(f"Against held-out labels ({heldout_source}, {q['images']} images, {q['missing']} without "
                         f"one): coverage {q['coverage']:.1f}% of labelled pixels, pixel accuracy {q['pACC']:.1f}%, "
                         f"mIoU {q['mIoU']:.1f} on covered pixels.\n")
            lines.append("| class | IoU |\n|---|---|")
            lines += [f"| {c} | {_fmt(q[f'IoU-{c}'])} |" for c in heldout_classes]
        else:
            lines.append("No held-out labels for this input: quality not measured. Give them with "
                         "`DATASETS.HELDOUT: [[INPUT, LABELED_DATASET or LABEL_DIR]]` (datasets/README.md).")
        pseudo_counts = dataset_pixel_counts(records, len(classes), ignore)
        never = [c for c, n in zip(classes, pseudo_counts) if n == 0]
        if never:
            warnings.append(f"pseudo labels `{name}` never contain {', '.join(never)}")
        real_counts = _real_counts(ctx, name, len(classes), ignore)
        counts[name] = {"pseudo": pseudo_counts.tolist(), "real": None if real_counts is None else real_counts.tolist()}
        lines.append("\nClass pixel counts (thousands): real training labels, pseudo labels, both.\n")
        lines.append("| class | real | pseudo | real + pseudo |\n|---|---|---|---|")
        for i, c in enumerate(classes):
            real = None if real_counts is None else int(real_counts[i])
            both = None if real is None else real + int(pseudo_counts[i])
            lines.append(f"| {c} | {'-' if real is None else f'{real / 1e3:.1f}'} | {pseudo_counts[i] / 1e3:.1f} | "
                         f"{'-' if both is None else f'{both / 1e3:.1f}'} |")
        figures = _pseudo_figures(records, meta, heldout, heldout_classes, heldout_ignore, folder, name)
        lines += [f"\n![{os.path.basename(p)}](report/{os.path.basename(p)})" for p in figures]
    return lines, quality, counts, warnings


def _real_counts(ctx, pseudo_stage, num_classes, ignore):
    """Pixel counts of the real training labels of the stage whose model wrote the pseudo labels."""
    from detectron2.data import DatasetCatalog

    from ...config import load_config
    from ...data.datasets import register_from_cfg

    model_stage = ctx.recipe.stage(pseudo_stage).options.get("model")
    config = ctx.results.get(model_stage, {}).get("config")
    if not config:
        return None
    cfg = load_config(config, [])
    register_from_cfg(cfg)
    if not cfg.DATASETS.TRAIN:
        return None
    counts = np.zeros(num_classes, dtype=np.int64)
    for dataset in cfg.DATASETS.TRAIN:
        records = [r for r in DatasetCatalog.get(dataset) if "sem_seg_file_name" in r]
        counts += dataset_pixel_counts(records, num_classes, ignore)
    return counts


def write_report(ctx, summary, timings):
    folder = os.path.join(ctx.output_dir, "report")
    os.makedirs(folder, exist_ok=True)
    _register_datasets(ctx)
    pl_lines, quality, counts, pl_warnings = _pseudo_label_sections(ctx, folder)
    warnings = _evaluation_warnings(ctx, summary) + pl_warnings
    for line in warnings:
        logger.warning("Report: %s", line.replace("`", ""))
    lines = [f"# Recipe {ctx.recipe.name}\n"]
    lines += [f"**Warning:** {line}\n" for line in warnings]
    lines += [f"Output: `{ctx.output_dir}`\n", "## Stages\n", "| stage | type | seconds |", "|---|---|---|"]
    lines += [f"| {s.name} | {s.type} | {_fmt(timings.get(s.name))} |" for s in ctx.recipe.stages]
    table = metrics_table(summary)
    if table:
        lines += ["\n## Evaluation (Detectron2 evaluators, %)\n", table]
    lines += pl_lines
    curves = _training_curves(ctx, folder)
    if curves:
        lines.append("\n## Training curves\n")
        lines += [f"![{os.path.basename(p)}](report/{os.path.basename(p)})" for p in curves]
    atomic_write_text(os.path.join(ctx.output_dir, "report.md"), "\n".join(lines) + "\n")
    atomic_write_json(os.path.join(folder, "pseudo_label_stats.json"), {"quality": quality, "pixel_counts": counts},
                      indent=2)
    logger.info("Report: %s", os.path.join(ctx.output_dir, "report.md"))

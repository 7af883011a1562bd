"""``report.html``: one self-contained page (inline CSS, pictures as data URIs, nothing fetched) about a run."""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from html import escape
from pathlib import Path

from finetune.files import write_atomically
from finetune.report.history import PhaseSpan

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2em auto; max-width: 1100px;
       padding: 0 1em; color: #222; line-height: 1.4; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.6em; }
.subtitle { color: #666; margin-top: 0; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.7em; text-align: right; }
th { background: #f2f4f7; } td:first-child, th:first-child { text-align: left; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; }
pre { background: #f6f8fa; border: 1px solid #ddd; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
.problems { background: #fff4e5; border: 1px solid #f0b37e; padding: 0.5em 1em; }
.warnings { background: #fdecea; border: 1px solid #e0897e; padding: 0.2em 1em; }
.stages { display: flex; height: 1.6em; border: 1px solid #ccc; margin: 0.5em 0; }
.stages div { height: 100%; min-width: 1px; }
.swatch { display: inline-block; width: 0.8em; height: 0.8em; margin-right: 0.4em; vertical-align: middle; }
"""

# Distinguishable in colour and in grey (Okabe-Ito, then greys), cycled for long runs.
STAGE_COLOURS = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000", "#999999")

CAPTIONS = {
    "learning_curves.png": "Loss and accuracy per epoch; dashed lines mark where a new phase starts.",
    "learning_rate.png": "The learning rate at the end of each epoch.",
    "confusion_matrix.png": (
        "The test split's confusion matrix, each row normalised to sum to 1: the share of the true class, "
        "with the count beneath."
    ),
    "mistakes.png": "Misclassified test images as stored, most confident mistakes first.",
    "mistake_heatmaps.png": "The surest mistakes, each with a heatmap of the class the model wrongly gave.",
    "gradient_norms.png": "Sampled gradient norms per layer (training's gradient health check).",
}


def png_data_uri(path: str | Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _number(value, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], table_id: str) -> str:
    head = "".join(f"<th>{escape(cell)}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(cell)}</td>" for cell in row) + "</tr>\n" for row in rows)
    return f'<table id="{escape(table_id)}">\n<tr>{head}</tr>\n{body}</table>\n'


def phase_table(spans: Sequence[PhaseSpan], train_images: int | None) -> str:
    rows = []
    for span in spans:
        rate = train_images * span.epochs / span.seconds if train_images and span.seconds > 0 else None
        rows.append(
            [
                span.name,
                f"{span.first}–{span.last}" if span.last > span.first else str(span.first),
                str(span.epochs),
                f"{span.seconds:.1f}",
                _number(span.best_val_accuracy),
                "–" if rate is None else f"{rate:,.0f}",
            ]
        )
    header = ["phase", "epochs of the run", "epochs", "seconds", "best validation accuracy", "train images/s"]
    return _table(header, rows, "phases")


def metrics_table(metrics: dict) -> str:
    test = metrics["test"]
    rows = [["test", _number(test["accuracy"]), _number(test["loss"]), str(test["examples"])]]
    if "validation" in metrics:
        validation = metrics["validation"]
        rows.append(
            ["validation (last epoch)", _number(validation["accuracy"]), _number(validation["loss"]),
             str(validation["examples"])]
        )  # fmt: skip
    table = _table(["split", "accuracy", "loss", "examples"], rows, "metrics")
    if "mc_dropout" in test:
        mc = test["mc_dropout"]
        table += _table(
            ["MC dropout", "value"],
            [
                ["samples", str(mc["samples"])],
                ["accuracy of a single pass", _number(mc["accuracy_single_pass"])],
                ["mean predictive entropy", _number(mc["mean_predictive_entropy"])],
                ["mean std of the predicted class", _number(mc["mean_std_of_predicted_class"])],
            ],
            "mc-dropout",
        )
    return table


def per_class_table(test: dict) -> str:
    """Precision, recall, F1 and support per class, the worst F1 first (ties in class order).

    A class without test images has no recall or F1 to show ("–", where
    ``metrics.json`` holds scikit-learn's 0) and comes last, so that it does
    not pass for the worst class. Likewise a class never predicted shows no
    precision (there was no prediction to be right); its F1 of 0 stands.
    """
    if "confusion_matrix" in test:
        predicted = [sum(column) for column in zip(*test["confusion_matrix"], strict=True)]
    else:  # multi-label: each tag's own count of images it was predicted for
        predicted = [test["per_class"][name].get("predicted", 1) for name in test["class_names"]]
    scores = [
        (name, test["per_class"][name], count) for name, count in zip(test["class_names"], predicted, strict=True)
    ]
    scores.sort(key=lambda item: (item[1]["support"] == 0, item[1]["f1"]))  # stable: ties keep the class order
    rows = []
    for name, score, count in scores:
        measured = score["support"] > 0
        rows.append(
            [
                str(name),
                _number(score["precision"] if count else None),
                _number(score["recall"] if measured else None),
                _number(score["f1"] if measured else None),
                str(score["support"]),
            ]
        )
    table = _table(["class", "precision", "recall (accuracy)", "F1", "test images"], rows, "per-class")
    summary = [
        ["macro-F1", _number(test.get("macro_f1"))],
        ["balanced accuracy", _number(test.get("balanced_accuracy"))],
    ]
    if test.get("multi_label"):
        summary = [
            ["macro-F1", _number(test.get("macro_f1"))],
            ["micro-F1", _number(test.get("micro_f1"))],
            ["mean average precision", _number(test.get("mean_average_precision"))],
            ["exact match", _number(test.get("exact_match"))],
        ]
    if "top_k_accuracy" in test:
        summary.append([f"top-{test['top_k']} accuracy", _number(test["top_k_accuracy"])])
    return table + _table(["over the classes", "value"], summary, "class-averages")


def stage_bar(seconds_by_stage: Mapping[str, float]) -> str:
    """Where the run's time went: one bar split by stage (a title on each part), and a table of the same."""
    total = sum(seconds_by_stage.values())
    if total <= 0:
        return ""
    parts, rows = [], []
    for index, (name, seconds) in enumerate(seconds_by_stage.items()):
        colour = STAGE_COLOURS[index % len(STAGE_COLOURS)]
        share = 100 * seconds / total
        label = escape(f"{name}: {seconds:.1f} s ({share:.1f}%)")
        parts.append(f'<div style="width:{share:.3f}%;background:{colour}" title="{label}"></div>')
        swatch = f'<span class="swatch" style="background:{colour}"></span>'
        rows.append(f"<tr><td>{swatch}{escape(name)}</td><td>{seconds:.1f}</td><td>{share:.1f}%</td></tr>")
    rows.append(f"<tr><th>all</th><th>{total:.1f}</th><th>100%</th></tr>")
    return (
        f'<div class="stages" id="stage-bar">{"".join(parts)}</div>'
        f'<table id="stages"><tr><th>stage</th><th>seconds</th><th>share</th></tr>{"".join(rows)}</table>'
    )


def render(
    title: str,
    metrics: dict,
    spans: Sequence[PhaseSpan],
    pictures: Sequence[Path],
    recipe_text: str,
    problems: Sequence[str] = (),
    captions: Mapping[str, str] | None = None,
) -> str:
    """The page's HTML: every value escaped, every picture inline; ``captions`` replace the usual ones by file name."""
    facts = " · ".join(
        escape(fact)
        for key, fact in (
            ("backend", f"backend {metrics.get('backend')}"),
            ("precision", f"precision {metrics.get('precision')}"),
            ("train_images", f"{metrics.get('train_images')} train images"),
            ("validation_images", f"{metrics.get('validation_images')} validation images"),
            ("seconds", f"run time {metrics.get('seconds', 0):.1f} s"),
        )
        if key in metrics
    )
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{escape(title)}: finetune run report</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>{escape(title)}</h1>",
        f'<p class="subtitle">Recipe {escape(title)}: {facts}</p>',
    ]
    if problems:
        items = "".join(f"<li>{escape(problem)}</li>" for problem in problems)
        parts.append(f'<div class="problems"><p>Not drawn:</p><ul>{items}</ul></div>')
    if metrics.get("warnings"):
        items = "".join(
            f"<li>{escape(str(item.get('phase', '')))}: {escape(str(item.get('message', '')))}</li>"
            for item in metrics["warnings"]
        )
        parts.append(f'<div class="warnings"><h2>Warnings</h2><ul>{items}</ul></div>')
    parts += ["<h2>Test metrics</h2>", metrics_table(metrics)]
    parts += ["<h2>Phases</h2>", phase_table(spans, metrics.get("train_images"))]
    if metrics.get("seconds_by_stage"):
        parts += ["<h2>Where the time went</h2>", stage_bar(metrics["seconds_by_stage"])]
    parts.append("<h2>Pictures</h2>")
    for picture in pictures:
        caption = {**CAPTIONS, **(captions or {})}.get(picture.name, "")
        parts.append(
            f'<figure><img src="{png_data_uri(picture)}" alt="{escape(picture.name)}">'
            f"<figcaption>{escape(picture.name)}: {escape(caption)}</figcaption></figure>"
        )
    parts += ["<h2>Per class (test), worst F1 first</h2>", per_class_table(metrics["test"])]
    parts += ["<h2>Recipe (resolved)</h2>", f"<pre>{escape(recipe_text)}</pre>", "</body></html>", ""]
    return "\n".join(parts)


def write_report_html(path: str | Path, *args, **kwargs) -> Path:
    """:func:`render`'s page, written atomically at ``path``."""
    text = render(*args, **kwargs)
    return write_atomically(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))

"""One call after a run: its pictures and ``report.html``; a picture that cannot be drawn is named, not fatal."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from finetune.data import Split
from finetune.errors import first_line
from finetune.report import confusion, curves, mistakes, page
from finetune.report.history import phase_spans

# Drawn by training (gradient health) when it sampled; shown in the report when present.
OTHER_PICTURES = ("gradient_norms.png",)
HEATMAP_MISTAKES = 12


def write_pictures_and_report(
    run_dir: str | Path,
    title: str,
    history: Sequence[dict],
    metrics: dict,
    test: Split,
    probabilities: np.ndarray | None,
    overlay: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
) -> list[str]:
    """``learning_curves.png``, ``learning_rate.png``, ``confusion_matrix.png``, ``mistakes.png``, ``report.html``.

    ``history`` is ``history.csv``'s rows, ``metrics`` what ``metrics.json``
    holds, ``probabilities`` the test split's predicted class probabilities
    (rows in ``test``'s order). ``overlay(images, classes)`` draws heatmaps over images: given, the surest
    mistakes get ``mistake_heatmaps.png`` too. Returns one line per picture that failed to
    draw (the page says so too); the others and the page are still written.
    """
    run_dir = Path(run_dir)
    class_names = metrics["test"]["class_names"]
    problems: list[str] = []
    drawn: list[str] = []

    def draw(name: str, drawing: Callable[[Path], object]) -> None:
        try:
            drawing(run_dir / name)
            drawn.append(name)
        except Exception as error:  # noqa: BLE001 - a picture is never worth the run: say which and go on
            problems.append(f"{name}: {first_line(error)}")

    if history:
        draw("learning_curves.png", lambda path: curves.draw_learning_curves(history, path, title))
        draw("learning_rate.png", lambda path: curves.draw_learning_rate(history, path, title))
    multi_label = bool(metrics["test"].get("multi_label"))  # tags: no confusion matrix, no single wrong class
    if not multi_label:
        draw(
            "confusion_matrix.png",
            lambda path: confusion.draw_confusion_matrix(
                metrics["test"]["confusion_matrix"], class_names, path, f"{title}: test split"
            ),
        )
    captions: dict[str, str] = {}
    if probabilities is not None and not multi_label:
        shown: list[int] = []

        def draw_mistakes(path: Path) -> None:
            shown.extend(mistakes.draw_mistakes(test.images, test.labels, probabilities, class_names, path))

        draw("mistakes.png", draw_mistakes)
        wrong = int(np.sum(probabilities.argmax(axis=1) != np.asarray(test.labels)))
        captions["mistakes.png"] = (
            f"{wrong} of {len(test)} test images misclassified; the {len(shown)} the model was surest of, as stored."
        )
        if overlay is not None and wrong:
            draw(
                "mistake_heatmaps.png",
                lambda path: mistakes.draw_mistakes(
                    test.images, test.labels, probabilities, class_names, path, limit=HEATMAP_MISTAKES,
                    title="Where the model looked", overlay=overlay,
                ),
            )  # fmt: skip
            captions["mistake_heatmaps.png"] = (
                f"The {min(wrong, HEATMAP_MISTAKES)} surest mistakes with a Grad-CAM heatmap of the class the model "
                "wrongly gave: where in the image that class's evidence was (red most)."
            )
    pictures = [run_dir / name for name in drawn]
    pictures += [run_dir / name for name in OTHER_PICTURES if (run_dir / name).is_file()]
    recipe = run_dir / "recipe.yaml"
    recipe_text = recipe.read_text(encoding="utf-8") if recipe.is_file() else "(no recipe.yaml in the run folder)"
    page.write_report_html(
        run_dir / "report.html", title, metrics, phase_spans(history), pictures, recipe_text, problems, captions
    )
    return problems

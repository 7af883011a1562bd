"""``DIR/tune_report.html``: the study in pictures (Optuna's own matplotlib plots) and its trials in a table."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from finetune.errors import first_line
from finetune.files import write_text_atomically

_PLOTS = (
    ("plot_optimization_history", "Each trial's value and the best so far."),
    ("plot_param_importances", "How much each key mattered (Optuna's fANOVA over the finished trials)."),
    ("plot_slice", "Each key's sampled values against the trial's value."),
    ("plot_intermediate_values", "The value after each epoch, per trial: where pruning stopped trials."),
)


def write_tune_report(study, out: Path, metric: str) -> Path:
    """One self-contained page (pictures as data URIs); a plot Optuna cannot draw is named, not fatal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as plots

    sections = []
    for name, caption in _PLOTS:
        try:
            axes = getattr(plots, name)(study)
            figure = (axes[0] if hasattr(axes, "__len__") else axes).figure
            figure.set_size_inches(9, 4.5)
            buffer = io.BytesIO()
            figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
            plt.close(figure)
            source = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
            sections.append(f'<figure><img src="{source}" alt="{name}"><figcaption>{caption}</figcaption></figure>')
        except Exception as error:  # noqa: BLE001 - too few trials for a plot is not worth the study
            sections.append(f"<p>{html.escape(name)}: not drawn ({html.escape(first_line(error))})</p>")
    rows = []
    for trial in study.get_trials(deepcopy=False):
        value = "" if trial.value is None else f"{trial.value:.4f}"
        params = ", ".join(f"{key}={value!r}" for key, value in trial.params.items())
        cells = (str(trial.number), trial.state.name.lower(), value, params, str(trial.user_attrs.get("run_dir", "")))
        rows.append("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in cells) + "</tr>")
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>finetune tune</title><style>"
        "body{font:14px system-ui,sans-serif;max-width:60rem;margin:2rem auto}img{max-width:100%}"
        "td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:left}</style></head><body>"
        f"<h1>Study {html.escape(study.study_name)}: {html.escape(metric)}</h1>"
        + "".join(sections)
        + "<h2>Trials</h2><table><tr><th>trial</th><th>state</th><th>value</th><th>values</th><th>run folder</th></tr>"
        + "".join(rows)
        + "</table></body></html>"
    )
    return write_text_atomically(out / "tune_report.html", page)

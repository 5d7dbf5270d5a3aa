"""``loss.png``: the training and evaluation loss of a run, published beside the adapter.

Drawn with matplotlib's Agg canvas directly (no pyplot): a pod has no display, and pyplot's
global figure registry would keep every figure alive in a long-lived process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kubetune.api.results import eval_points

PLOT_NAME = "loss.png"
SIZE_INCHES = (6.4, 4.0)
DPI = 100
"""640 x 400 pixels: readable in a browser or an S3 console preview, a few tens of kB."""


def render_loss_curve(results: dict[str, Any], path: Path, *, title: str = "") -> Path | None:
    """Write the PNG for ``results`` (the trainer's results dict) to ``path``.

    Training loss: ``lossHistory`` ([step, loss] per log line). Evaluation loss: the initial
    evaluation at step 0, ``evalHistory`` (each epoch end) and the final ``evalLoss`` at the
    last step. Returns None (and writes nothing) when there is no training loss to draw.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    train = [(int(step), float(loss)) for step, loss in results.get("lossHistory") or []]
    if not train:
        return None
    evals = eval_points(results)

    figure = Figure(figsize=SIZE_INCHES, dpi=DPI)
    FigureCanvasAgg(figure)  # attaches itself to the figure; savefig renders through it
    axes = figure.add_subplot()
    steps, losses = zip(*train, strict=True)
    axes.plot(steps, losses, color="tab:blue", marker="." if len(train) < 50 else None, label="training loss")
    if evals:
        eval_steps, eval_losses = zip(*evals, strict=True)
        axes.plot(eval_steps, eval_losses, color="tab:orange", marker="o", linestyle="--", label="eval loss")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss (nats per token)")
    axes.set_title(title or "kubetune LoRA fine-tuning", fontsize="medium")
    axes.grid(alpha=0.3)
    axes.legend(loc="best")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path

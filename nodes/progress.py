"""Per-iteration progress: ComfyUI's progress bar with the current image as preview, Cancel,
and the pack's own websocket event for the live chart in web/siso.js.

Every ``siso.progress`` event carries the whole history so far (a few floats per iteration),
so a page reloaded mid-run redraws the complete chart from the next event. With no browser
attached (API use) the events go nowhere and cost nothing."""
from PIL import Image

from ..siso_ops import host

EVENT = "siso.progress"


class IterationProgress:
    def __init__(self, total: int, node_id=None, patience: int | None = None, editing: bool = False):
        self.total = total
        self.node_id = node_id
        self.patience = patience
        self.editing = editing
        self.bar = host.progress_bar(total, node_id=node_id)
        self.history = {"loss": [], "dino": [], "ir": [], "background": []}
        self.best = 0
        self.iteration = 0

    def _event(self, state: str, reason: str = ""):
        host.send_event(EVENT, {"node": self.node_id, "state": state, "reason": reason, "iteration": self.iteration, "max": self.total,
               "best": self.best, "patience": self.patience, "editing": self.editing, "history": self.history})

    def __call__(self, report):
        # The image goes out as a preview only where ComfyUI sends sampler previews too
        # (--preview-method other than none): API clients of a default server get no binary
        # frames from a stock graph, and must get none from ours.
        preview = None
        if host.previews_enabled():
            pixels = (report.image[0].permute(1, 2, 0).numpy() * 255).round().astype("uint8")
            preview = ("JPEG", Image.fromarray(pixels), 512)
        self.bar.update_absolute(report.iteration + 1, self.total, preview)
        terms = report.terms
        self.history["loss"].append(terms["loss"])
        # the chart shows similarities (cosine, higher is better); the loss holds distances
        self.history["dino"].append(-terms["dino"] if "dino" in terms else None)
        self.history["ir"].append(-terms["ir"] if "ir" in terms else None)
        self.history["background"].append(terms.get("background"))
        # several reference photos: each one's similarity, drawn as faint lines
        for term in ("dino", "ir"):
            per_photo = [-terms[k] for k in sorted((k for k in terms if k.startswith(term + "@")),
                                                   key=lambda k: int(k.split("@")[1]))]
            if per_photo:
                self.history.setdefault(f"{term}_per_photo", []).append(per_photo)
        self.iteration = report.iteration + 1
        self.best = report.best_iteration + 1
        self._event("running")
        # Cancel: ComfyUI's interrupt flag is checked once per iteration (and inside layers).
        host.throw_if_interrupted()

    def finish(self, report: str):
        self.bar.update_absolute(self.total, self.total)
        self._event("done", report)

    def failed(self, error: BaseException):
        if host.is_cancel(error):
            self._event("cancelled", f"cancelled after {self.iteration} iterations")
        else:
            self._event("failed", f"{type(error).__name__}: {error}")

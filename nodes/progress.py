"""Per-iteration progress bar with the current image as preview, and Cancel."""
import comfy.utils
from PIL import Image

from ..siso_ops import comfy_adapter as host


class IterationProgress:
    def __init__(self, total: int, node_id=None):
        self.total = total
        self.bar = comfy.utils.ProgressBar(total, node_id=node_id)

    def __call__(self, report):
        pixels = (report.image[0].permute(1, 2, 0).numpy() * 255).round().astype("uint8")
        self.bar.update_absolute(report.iteration + 1, self.total, ("JPEG", Image.fromarray(pixels), 512))
        # Cancel: ComfyUI's interrupt flag is checked once per iteration (and inside layers).
        host.throw_if_interrupted()

    def finish(self):
        self.bar.update_absolute(self.total, self.total)

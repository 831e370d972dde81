import logging

import torch
from comfy_api.v0_0_2 import io

from ..siso_ops import host, loaded_networks
from ..siso_ops.memory_networks import network_bytes
from ..siso_ops.precision import PRECISIONS, compute_dtype, precision_warnings
from ..siso_ops.score import score_images, size_problem
from ..siso_ops.similarity import weights_problem
from .checks import CheckedNode, checked
from .graph_types import CATEGORY, Subject
from .optimize import WEIGHT_FILE_CHECKS, weight_file_defaults
from .queue_checks import linked_batch_size, linked_image_size

log = logging.getLogger("siso")


class SISOSubjectScore(CheckedNode):
    CHOICE_CHECKS = WEIGHT_FILE_CHECKS

    def __init__(self):
        super().__init__()
        # ComfyUI keeps one object per node of the running workflow; the similarity networks stay
        # loaded while one lives, so "Free model and node cache" releases them.
        host.keep_similarity_networks_while(self)

    @classmethod
    def define_schema(cls):
        weight_files = host.weight_file_choices()
        defaults = weight_file_defaults(weight_files)
        return io.Schema(
            node_id="SISOSubjectScore",
            display_name="SISO Subject Score",
            category=CATEGORY,
            description=(
                "How much each image of a batch looks like your subject, by the two networks SISO optimises "
                "against: the mean cosine similarity of its DINOv2 and image-retrieval embeddings to the subject's "
                "photos (higher is closer, at most 1). Gives the scores, a table, the batch sorted best first and "
                "the best image's index, and beside them the paper's diversity figure (mean squared error to the "
                "subject photo: near 0 means the image copies the photo). Use it to pick the best of several stage-2 "
                "seeds, or to compare SISO with "
                "other tools' outputs (Kontext, Qwen-Image-Edit, IPAdapter) on your own subject. Shares the loaded "
                "networks with SISO Optimize; no gradients."),
            inputs=[
                io.Image.Input("images", tooltip="The images to score (a batch)."),
                Subject.Input("subject", tooltip="From SISO Load Subject (one or more photos)."),
                io.Combo.Input("dino_weights", options=weight_files, **defaults["dino_weights"], tooltip="DINOv2 ViT-L/14 weights in models/siso (as in SISO Optimize)."),
                io.Combo.Input("ir_weights", options=weight_files, **defaults["ir_weights"], tooltip="Image-retrieval network weights in models/siso (as in SISO Optimize)."),
                io.Float.Input("dino_weight", default=1.0, min=0.0, max=10.0, step=0.05, tooltip="Weight of the DINOv2 similarity in the ranking score (0 skips the network)."),
                io.Float.Input("ir_weight", default=1.0, min=0.0, max=10.0, step=0.05, tooltip="Weight of the image-retrieval similarity in the ranking score (0 skips the network)."),
                io.Combo.Input("precision", options=list(PRECISIONS), default="auto", optional=True, tooltip="Compute precision of the networks (auto: bfloat16 where the hardware is fast at it)."),
            ],
            outputs=[
                io.Float.Output(display_name="dino", is_output_list=True, tooltip="DINOv2 similarity of each image, in batch order."),
                io.Float.Output(display_name="ir", is_output_list=True, tooltip="Image-retrieval similarity of each image, in batch order."),
                io.String.Output(display_name="table", tooltip="rank | image index | DINO | IR | score | MSE to subject (diversity), best first."),
                io.Image.Output(display_name="best_first", tooltip="The batch re-ordered, best score first."),
                io.Int.Output(display_name="best_index", tooltip="Batch index of the best image (for ImageFromBatch)."),
                io.Float.Output(display_name="diversity", is_output_list=True,
                                tooltip="Mean squared error of each image to the subject photo, in batch order (the SISO paper's diversity: near 0 = a copy of the photo)."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def check_values(cls, dino_weight=None, ir_weight=None, **values):
        if isinstance(dino_weight, (int, float)) and isinstance(ir_weight, (int, float)):
            return weights_problem(dino_weight, ir_weight, "score the images")
        return None

    @classmethod
    def check_prompt(cls, prompt, node_id):
        # what the prompt shows of the images before they are made: an empty batch, a size too small
        images = prompt[node_id].get("inputs", {}).get("images")
        if linked_batch_size(prompt, images) == 0:
            return {"images": "images is an empty batch (0 images): the node that makes it gives none; make at "
                              "least one image"}
        size = linked_image_size(prompt, images, host.input_image_size)
        problem = size_problem(*size) if size else None
        return {"images": f"images: {problem}"} if problem else {}

    @classmethod
    @checked
    def execute(cls, images, subject, dino_weights, ir_weights, dino_weight, ir_weight, precision="auto"):
        problem = size_problem(images.shape[2], images.shape[1])
        if problem:
            raise ValueError(f"SISO Subject Score: {problem}")
        device = host.compute_device()
        dtype = compute_dtype(device, precision)
        warnings = precision_warnings(device, precision)
        for warning in warnings:
            log.warning("SISO Subject Score: %s", warning)
        dino, ir = loaded_networks.load(host.weight_file_path("dino", dino_weights) if dino_weight > 0 else None,
                                        host.weight_file_path("ir", ir_weights) if ir_weight > 0 else None,
                                        dino_weight, ir_weight, dtype)
        bar = host.progress_bar(images.shape[0], node_id=getattr(cls.hidden, "unique_id", None))

        def on_chunk(done, total):
            bar.update_absolute(done, total)
            host.throw_if_interrupted()

        # what ComfyUI holds on a GPU makes room for the networks' weights
        host.make_room_for(sum(network_bytes(n.module) for n in (dino, ir) if n is not None), device)
        with loaded_networks.on_device((dino, ir), device):
            scores = score_images(images[..., :3].permute(0, 3, 1, 2), subject.images, dino, ir, dino_weight,
                                  ir_weight, device, dtype, on_chunk)
        table = scores.table()
        best_first = images[torch.tensor(scores.order)]
        dino_out = [v if v is not None else float("nan") for v in scores.dino]
        ir_out = [v if v is not None else float("nan") for v in scores.ir]
        shown = "".join(f"Warning: {warning}.\n" for warning in warnings) + table
        return io.NodeOutput(dino_out, ir_out, table, best_first, scores.best, scores.subject_mse, ui={"text": [shown]})

from comfy_api.v0_0_2 import io

from ..siso_ops.dreambooth import training_set
from .checks import CheckedNode, checked
from .graph_types import CATEGORY, search_aliases


class DreamBoothTrainingSet(CheckedNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DreamBoothTrainingSet",
            display_name="DreamBooth Training Set (subject + class images)",
            category=CATEGORY,
            # searching "SISO" finds every node of the pack, this one too (its name is the paper's baseline's)
            **search_aliases("SISO DreamBooth", "single-image DreamBooth", "class images"),
            description=(
                "Single-image DreamBooth with prior preservation, for ComfyUI's own Train LoRA node: your subject "
                "photo with a rare-token prompt ('a photo of sks dog') and class images the model generated itself "
                "from the class prompt ('a photo of a dog'), one prompt per image. Train LoRA has no loss weight, so "
                "the prior-preservation weight is the ratio of class to subject samples: the subject is repeated "
                "as often as the weight asks (weight 1 with 8 class images: 8 subject copies). Connect latents and "
                "conditioning to Train LoRA's latents and positive, and use batch_size 1 there (a prompt pairs with "
                "its own image only at batch size 1) with the grad_accumulation_steps this node reports."),
            inputs=[
                io.Latent.Input("subject", tooltip="VAE Encode of your subject photo (scaled to the class images' size)."),
                io.Conditioning.Input("subject_prompt", tooltip="The rare-token prompt, e.g. 'a photo of sks dog' (one CLIP Text Encode)."),
                io.Latent.Input("class_images", tooltip="The class images' latents: a KSampler's output with the class prompt on the same model, batch size = their number."),
                io.Conditioning.Input("class_prompt", tooltip="The class prompt the class images were made with, e.g. 'a photo of a dog'."),
                io.Float.Input("prior_weight", default=1.0, min=0.0, max=10.0, step=0.05,
                               tooltip="Weight of the class images' loss against the subject's (DreamBooth's lambda; 1 is its usual value, 0 trains on the subject alone)."),
            ],
            outputs=[
                io.Latent.Output(display_name="latents", is_output_list=True, tooltip="One latent per sample: into Train LoRA's latents."),
                io.Conditioning.Output(display_name="conditioning", is_output_list=True, tooltip="One prompt per sample, in the same order: into Train LoRA's positive."),
                io.Int.Output(display_name="grad_accumulation_steps", tooltip="Draws per optimiser step that hold about one subject sample (1 + prior weight): into Train LoRA's grad_accumulation_steps."),
                io.String.Output(display_name="summary", tooltip="How many samples of each kind, and the prior weight they give."),
            ],
        )

    @classmethod
    @checked
    def execute(cls, subject, subject_prompt, class_images, class_prompt, prior_weight):
        dataset = training_set(subject, subject_prompt, class_images, class_prompt, prior_weight)
        summary = dataset.summary()
        return io.NodeOutput(dataset.latents, dataset.conditionings, dataset.accumulation, summary, ui={"text": [summary]})

import logging

from comfy_api.v0_0_2 import io

from ..siso_ops import host
from ..siso_ops.editing import InversionSettings, check_photo, invert_photo
from ..siso_ops.renoise import ReNoiseSettings
from .checks import CheckedNode, checked
from .queue_checks import later_mask_problem
from .graph_types import CATEGORY, NO_SEED_CONTROL, Inversion

log = logging.getLogger("siso")
SAMPLERS = ("euler_ancestral", "euler")


class ReNoiseInvert(CheckedNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ReNoiseInvert",
            display_name="SISO ReNoise Invert",
            category=CATEGORY,
            description=(
                "Inverts a photo into your model's noise with ReNoise (Garibi et al. 2024), so that denoising it gives the "
                "photo back. Feed the inversion to SISO Optimize Subject LoRA to swap the subject while keeping the rest. "
                "Defaults are for turbo models (SD-Turbo, SDXL-Turbo): 4 steps at strength 0.75 invert 3 steps "
                "(timesteps 249, 499, 749), euler_ancestral with noise correction. The reconstruction output shows how "
                "faithful the inversion is. The MODEL and VAE are not changed."),
            inputs=[
                io.Model.Input("model", tooltip="The model you will optimise with (the inversion is only valid for it)."),
                io.Vae.Input("vae", tooltip="The model's VAE, used to encode the photo."),
                io.Image.Input("image", tooltip="ONE photo; width and height must be multiples of the VAE's block (8; 16 for Flux.2, 32 for HunyuanImage 2.1), checked before any work."),
                io.Conditioning.Input("positive", tooltip="A prompt describing the photo, e.g. 'a photo of a cat'; use the same conditioning in SISO Optimize."),
                io.Int.Input("steps", default=4, min=1, max=100, tooltip="The full sampling schedule (4 for turbo models). Denoise with the same count."),
                io.Float.Input("strength", default=0.75, min=0.01, max=1.0, step=0.01, tooltip="Fraction of the schedule that is inverted: int(steps x strength) steps. Lower keeps more of the photo's layout but leaves less room for the new subject."),
                io.Combo.Input("scheduler", options=list(host.SCHEDULERS), default="simple", tooltip="Sigma schedule ('simple' at 4 steps gives turbo's 999/749/499/249)."),
                io.Combo.Input("sampler", options=list(SAMPLERS), default=SAMPLERS[0], tooltip="euler_ancestral (with noise correction: exact reconstruction) or deterministic euler (DDIM)."),
                io.Int.Input("renoise_iterations", default=9, min=0, max=100, tooltip="K: extra noise predictions per step (0 with no averaging and no regularisation is plain DDIM inversion). Averaging and the noise regularisation start at iteration average_start: with K below it neither runs on the other steps."),
                io.Int.Input("first_step_iterations", default=5, min=0, max=100, tooltip="K on the first, lowest-noise step; at most renoise_iterations (a larger value runs renoise_iterations)."),
                io.Int.Input("average_first_start", default=0, min=0, max=100, tooltip="First step: average the predictions of iterations [start, end)."),
                io.Int.Input("average_first_end", default=5, min=1, max=101, tooltip="First step: end of the averaged range (exclusive)."),
                io.Int.Input("average_start", default=8, min=0, max=100, tooltip="Other steps: average the predictions of iterations [start, end), and regularise the noise from start on; renoise_iterations must reach start for either to run."),
                io.Int.Input("average_end", default=10, min=1, max=101, tooltip="Other steps: end of the averaged range (exclusive)."),
                io.Float.Input("kl_weight", default=0.065, min=0.0, max=10.0, step=0.005, tooltip="Noise regularisation: patch KL toward N(0, 1) (0 disables). Applied on the steps after the first, from iteration average_start on."),
                io.Float.Input("autocorrelation_weight", default=20.0, min=0.0, max=1000.0, step=0.5, tooltip="Noise regularisation: auto-correlation over an image pyramid, 5 random shifts (0 disables)."),
                io.Int.Input("regularisation_passes", default=4, min=0, max=50, tooltip="Regularisation passes per prediction (0 disables)."),
                io.Boolean.Input("noise_correction", default=True, tooltip="euler_ancestral: store the per-step noises that make each step land exactly on the inverted latent."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=NO_SEED_CONTROL, tooltip="Seed of the ancestral noises and of the regulariser's random shifts. It stays as set (no randomize after each queue), so queueing again reuses the inversion."),
            ],
            outputs=[
                Inversion.Output(display_name="inversion", tooltip="The inverted latent, its schedule and per-step noises: connect to SISO Optimize Subject LoRA."),
                io.Image.Output(display_name="reconstruction", tooltip="The inversion denoised by the unchanged model: should look like the photo."),
            ],
            hidden=[io.Hidden.unique_id, io.Hidden.prompt],
        )

    @classmethod
    def check_values(cls, steps=None, strength=None, average_first_start=None, average_first_end=None,
                     average_start=None, average_end=None, **values):
        if isinstance(steps, int) and isinstance(strength, (int, float)) and int(steps * strength) < 1:
            return f"strength {strength} of {steps} steps inverts no step: raise strength or steps"
        for start, end, name in ((average_first_start, average_first_end, "average_first"),
                                 (average_start, average_end, "average")):
            if isinstance(start, int) and isinstance(end, int) and start >= end:
                return f"{name}_start ({start}) must be below {name}_end ({end})"
        return None

    @classmethod
    @checked
    def execute(cls, model, vae, image, positive, steps, strength, scheduler, sampler, renoise_iterations,
                first_step_iterations, average_first_start, average_first_end, average_start, average_end, kl_weight,
                autocorrelation_weight, regularisation_passes, noise_correction, seed):
        settings = InversionSettings(steps=steps, strength=strength, scheduler=scheduler, renoise=ReNoiseSettings(
            renoise_iterations=renoise_iterations, first_step_iterations=first_step_iterations, average=True,
            average_first=(average_first_start, average_first_end), average_other=(average_start, average_end),
            kl_weight=kl_weight, ac_weight=autocorrelation_weight, regularisation_passes=regularisation_passes,
            ancestral=sampler == "euler_ancestral", noise_correction=noise_correction, seed=seed))
        settings.check()
        host.check_vae(vae, model)
        check_photo(image, host.latent_scale(vae))
        # the mask a later SISO Optimize edits under, where the prompt tells its size, against this
        # photo's size that only the run tells (the queue compared the two where it knew both)
        problem = later_mask_problem(getattr(cls.hidden, "prompt", None), getattr(cls.hidden, "unique_id", None),
                                     (image.shape[2], image.shape[1]), host.input_image_size)
        if problem:
            raise ValueError(problem)
        bar = host.progress_bar(settings.inverted_steps, node_id=getattr(cls.hidden, "unique_id", None))

        def on_step(done, total):
            bar.update_absolute(done, total)
            host.throw_if_interrupted()

        inversion, reconstruction = invert_photo(model, vae, image, positive, settings, on_step)
        log.info("SISO: %r (%d model evaluations)", inversion, inversion.predictions)
        return io.NodeOutput(inversion, reconstruction, ui={"text": [repr(inversion)]})

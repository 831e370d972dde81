"""Which layers of a diffusion model get the LoRA: the two choices of SISO Optimize's
``lora_target``, in the user's words (saved workflows and API prompts send these strings)."""

ATTENTION = "attention (DiT: + context and MLP)"
ALL_LINEAR = "all linear layers"
TARGETS = (ATTENTION, ALL_LINEAR)

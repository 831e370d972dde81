"""The pack's graph types."""
from comfy_api.v0_0_2 import io

Subject = io.Custom("SISO_SUBJECT")
SubjectLoRA = io.Custom("SISO_LORA")
Inversion = io.Custom("SISO_INVERSION")
CATEGORY = "SISO subject"

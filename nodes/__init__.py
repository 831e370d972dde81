"""ComfyUI faces of the pack: schemas, input checks, progress and file saving. The method
lives in ``siso_ops``."""
from .subject import LoadSubject
from .optimize import SISOOptimize
from .lora import ApplySISOLoRA, SaveSISOLoRA
from .mask import SubjectMask
from .invert import ReNoiseInvert

NODES = [LoadSubject, SISOOptimize, ApplySISOLoRA, SaveSISOLoRA, ReNoiseInvert, SubjectMask]

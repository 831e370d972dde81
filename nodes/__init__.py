"""ComfyUI faces of the pack: schemas, input checks, progress and file saving. The method
lives in ``siso_ops``."""
from .subject import LoadSubject
from .optimize import SISOOptimize
from .lora import ApplySISOLoRA, LoadSISOLoRA, SaveSISOLoRA
from .mask import SubjectMask
from .invert import ReNoiseInvert
from .score import SISOSubjectScore
from .dreambooth import DreamBoothTrainingSet

NODES = [LoadSubject, SISOOptimize, ApplySISOLoRA, SaveSISOLoRA, ReNoiseInvert, SubjectMask, SISOSubjectScore, LoadSISOLoRA,
         DreamBoothTrainingSet]

"""MAUGen: joint face image + 12-AU label generation on diffusers (the paper's sections 3.2-3.4).

Modules, one job each: `conditioning` (C_ID / C_AU tokens, the MRL's routing of C_AU),
`label_decoder` (the CLD with IDM and LGFE), `core` (feature taps and one shared forward),
`pipeline` (MAUGenPipeline), `losses` (eqs. 9-11 and the identity / CLIP / image-label terms),
`build` (architecture config, tiny and SD 1.5 configurations), `speed` (attention backend, channels_last,
torch.compile, attention cache), `train` (`factory train`),
`data` (puppet, DISFA, BP4D, identity bank).
"""

from .build import MAUGenConfig, build_pipeline
from .conditioning import MAUGenConditioner
from .label_decoder import ConditionalLabelDecoder, LabelOutput
from .pipeline import MAUGenPipeline, MAUGenPipelineOutput

__all__ = [
    "ConditionalLabelDecoder",
    "LabelOutput",
    "MAUGenConditioner",
    "MAUGenConfig",
    "MAUGenPipeline",
    "MAUGenPipelineOutput",
    "build_pipeline",
]

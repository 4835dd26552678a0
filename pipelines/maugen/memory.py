"""What a MAUGen generator actor holds in memory, read off a checkpoint without loading its weights.

`factory build --dry-run` prints it for the configured checkpoint at `maugen.dtype`. Parameter
counts come from the safetensors headers (no tensor is read), or, for `meta:sd15` and
`meta:sd15-inpainting`, from MAUGen built at Stable Diffusion 1.5's sizes on the meta device
(`build.sd15_on_meta`): a cluster can be sized before the weights exist. The estimate is the
weights; activations at a batch size come on top and depend on the attention kernel, so they are
measured on a device (bench/gpu.sh), not guessed here.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

META_PREFIX = "meta:"
#: meta:NAME -> whether the UNet is the 9-channel inpainting one
META_CHECKPOINTS: dict[str, bool] = {"sd15": False, "sd15-inpainting": True}
BYTES_PER_PARAMETER: dict[str, int] = {"float32": 4, "float16": 2, "bfloat16": 2}


def is_meta(ref: str) -> bool:
    return ref.startswith(META_PREFIX)


def parameter_counts(ref: str) -> dict[str, int]:
    """Parameters per component of a checkpoint (`builtin:NAME`, a saved pipeline, or `meta:sd15[-inpainting]`)."""
    if is_meta(ref):
        name = ref[len(META_PREFIX) :]
        if name not in META_CHECKPOINTS:
            raise FileNotFoundError(
                f"maugen.checkpoint {ref!r}: the meta checkpoints are {', '.join(META_PREFIX + n for n in META_CHECKPOINTS)}"
            )
        from .build import sd15_on_meta

        return sd15_on_meta(inpainting=META_CHECKPOINTS[name])
    from safetensors import safe_open

    from .builtin import resolve_checkpoint

    counts: dict[str, int] = {}
    for comp in sorted(p for p in Path(resolve_checkpoint(ref)).iterdir() if p.is_dir()):
        n = 0
        for f in sorted(comp.glob("*.safetensors")):
            with safe_open(str(f), "pt") as st:
                n += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
        if n:
            counts[comp.name] = n
    return counts


def generator_memory(ref: str, dtype: str) -> dict[str, Any]:
    """The weights one generator actor holds at `dtype` (every component is loaded in that dtype)."""
    counts = parameter_counts(ref)
    total = sum(counts.values())
    weights = total * BYTES_PER_PARAMETER[dtype]
    return {
        "checkpoint": ref,
        "dtype": dtype,
        "parameters": counts,
        "total_parameters": total,
        "weights_bytes": weights,
        "weights_gib": round(weights / 2**30, 3),
        "note": "weights only; activations at maugen.batch_size come on top (bench/gpu.sh measures the peak)",
    }

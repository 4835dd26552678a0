"""`MAUGenPipeline`: prompt + identity exemplar -> face image, AU occurrence and AU intensity.

A `DiffusionPipeline` with registered modules, so `save_pretrained` / `from_pretrained` work on a
local directory like any diffusers pipeline:

    unet             UNet2DConditionModel: the MRL (down path) and the DIG's image branch (up path)
    vae              AutoencoderKL, or None for a pixel-space model (the tiny puppet configuration, which
                     diffuses 2x2 pixel patches folded into 12 channels: a quarter of the positions)
    text_encoder     transformers text model (CLIP for Stable Diffusion weights)
    tokenizer        its tokenizer
    identity_encoder image -> L2-normalised identity embedding (ArcFace-style)
    conditioner      MAUGenConditioner: C_ID and C_AU tokens, null tokens for guidance
    label_decoder    ConditionalLabelDecoder: the DIG's label branch (CLD, IDM, LGFE, heads)
    scheduler        any diffusers scheduler (DDIM, DPM-Solver, ...)

Inpainting models (the authors' SD-inpainting base, and the tiny model) generate the face region
only: outside the mask the sample is the exemplar noised to each step's level, and the output is
composited onto the exemplar, since the masked denoising loss (eq. 10) never trains that region.

Sampling with mutual conditioning: at each step the AU condition and the label decoder's initial
queries are the previous step's EMA of final-layer AU tokens, detached (no_grad sampling). The
labels returned are those of the last step, read from the conditional branch.

Classifier-free guidance can be limited to an interval of noise levels (`guidance_interval`, as
t / num_train_timesteps; Kynkaanniemi et al. 2024): outside it a step runs the conditional branch
alone, so each unguided step costs half the UNet work.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DiffusionPipeline, UNet2DConditionModel
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from core.facs import AU_DESCRIPTIONS, AU_NAMES, AUS
from core.identity_net import IdentityNet  # noqa: F401 - diffusers loads a component class only from an imported module
from core.iresnet import IResNet  # noqa: F401 - the same, for ArcFace's IResNet as identity_encoder

from . import core
from .conditioning import MAUGenConditioner, install_mrl_processors
from .label_decoder import ConditionalLabelDecoder

log = logging.getLogger(__name__)

AU_TEXTS: tuple[str, ...] = tuple(f"{AU_NAMES[au]}: {AU_DESCRIPTIONS[au]}" for au in AUS)

#: Component modules named in the model_index.json of older checkpoints -> where those classes live now.
#: (detectors.models still re-exports IdentityNet, but diffusers resolves only a module the process has
#: already imported, and pipelines do not import detectors.)
MOVED_COMPONENT_MODULES: dict[str, str] = {"detectors.models": "core.identity_net"}


@dataclass
class MAUGenPipelineOutput(BaseOutput):
    images: np.ndarray | list[PIL.Image.Image]  # uint8 (B, H, W, 3) for output_type="np"
    au_occurrence: np.ndarray  # float32 (B, 12): occurrence probabilities
    au_intensity: np.ndarray  # float32 (B, 12) on 0-5
    au_condition: list[np.ndarray] | None = None  # per step (B, 12, D) C_AU, when asked for
    #: bool (B,): the sample's pixels and labels are finite. With on_nonfinite="mark" a sample that is
    #: not has black pixels and NaN labels instead of failing its whole batch.
    finite: np.ndarray | None = None


def to_image_tensor(images, batch: int, size: tuple[int, int], name: str) -> torch.Tensor:
    """uint8 HWC arrays / PIL images / float tensors in [-1, 1] -> (B, 3, H, W) float in [-1, 1]."""
    if isinstance(images, torch.Tensor):
        x = images.float()
        if x.ndim == 3:
            x = x.unsqueeze(0)
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"{name}: a tensor must be (B, 3, H, W) in [-1, 1], got shape {tuple(x.shape)}")
    else:
        if isinstance(images, (PIL.Image.Image, np.ndarray)) and not (
            isinstance(images, np.ndarray) and images.ndim == 4
        ):
            images = [images]
        arrs = []
        for i, im in enumerate(images):
            a = np.asarray(im.convert("RGB") if isinstance(im, PIL.Image.Image) else im)
            if a.ndim != 3 or a.shape[2] != 3:
                raise ValueError(f"{name}[{i}]: expected an RGB image (H, W, 3), got shape {a.shape}")
            if a.dtype != np.uint8:
                raise ValueError(f"{name}[{i}]: expected uint8 pixels, got {a.dtype}; convert with .astype(np.uint8)")
            arrs.append(a)
        x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} holds NaN/inf values; pass finite images")
    if x.shape[0] == 1 and batch > 1:
        x = x.expand(batch, -1, -1, -1)
    if x.shape[0] != batch:
        raise ValueError(f"{name}: got {x.shape[0]} images for {batch} prompts")
    if tuple(x.shape[-2:]) != size:
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    return x


def to_mask_tensor(mask, batch: int, size: tuple[int, int]) -> torch.Tensor:
    """(H, W) / (B, H, W) bool or float arrays, PIL "L" images or (B, 1, H, W) tensors -> (B, 1, H, W) in [0, 1]."""
    if isinstance(mask, torch.Tensor):
        m = mask.float()
    else:
        if isinstance(mask, PIL.Image.Image):
            mask = np.asarray(mask.convert("L"), dtype=np.float32) / 255.0
        elif isinstance(mask, (list, tuple)):
            mask = np.stack(
                [
                    np.asarray(m.convert("L"), dtype=np.float32) / 255.0 if isinstance(m, PIL.Image.Image) else m
                    for m in mask
                ]
            )
        m = torch.from_numpy(np.array(mask, dtype=np.float32))  # a copy: arrays from Ray's object store are read-only
    if m.ndim == 2:
        m = m[None, None]
    elif m.ndim == 3:
        m = m[:, None]
    if m.ndim != 4 or m.shape[1] != 1:
        raise ValueError(f"mask_image: expected (H, W), (B, H, W) or (B, 1, H, W), got {tuple(m.shape)}")
    if not torch.isfinite(m).all() or m.min() < 0 or m.max() > 1:
        raise ValueError("mask_image must hold values in [0, 1] (1 = the face region to generate)")
    if m.shape[0] == 1 and batch > 1:
        m = m.expand(batch, -1, -1, -1)
    if m.shape[0] != batch:
        raise ValueError(f"mask_image: got {m.shape[0]} masks for {batch} prompts")
    if tuple(m.shape[-2:]) != size:
        m = F.interpolate(m, size=size, mode="bilinear", align_corners=False)
    return m


class MAUGenPipeline(DiffusionPipeline):
    """Joint face image + 12-AU label generation (MAUGen) on diffusers."""

    model_cpu_offload_seq = "text_encoder->identity_encoder->conditioner->unet->label_decoder->vae"
    _optional_components = ["vae"]  # noqa: RUF012 - the diffusers convention, read by DiffusionPipeline

    def __init__(
        self,
        unet: UNet2DConditionModel,
        text_encoder,
        tokenizer,
        identity_encoder,
        conditioner: MAUGenConditioner,
        label_decoder: ConditionalLabelDecoder,
        scheduler,
        vae: AutoencoderKL | None = None,
    ):
        super().__init__()
        self.register_modules(
            unet=unet,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            identity_encoder=identity_encoder,
            conditioner=conditioner,
            label_decoder=label_decoder,
            scheduler=scheduler,
        )
        want = core.tapped_channels(unet, label_decoder.config.label_layers)
        if tuple(label_decoder.config.feature_channels) != want:
            raise ValueError(
                f"label_decoder.feature_channels {tuple(label_decoder.config.feature_channels)} do not match the UNet's "
                f"up blocks {tuple(label_decoder.config.label_layers)} ({want}); rebuild the label decoder for this UNet"
            )
        install_mrl_processors(unet, conditioner)
        self.tap = core.FeatureTap(unet, label_decoder.config.label_layers)

    @classmethod
    def load_config(cls, *args, **kwargs):
        """The config (model_index.json), with component modules that moved since it was saved renamed."""
        out = super().load_config(*args, **kwargs)
        config = out[0] if isinstance(out, tuple) else out
        for name, entry in config.items():
            if isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[0] in MOVED_COMPONENT_MODULES:
                config[name] = [MOVED_COMPONENT_MODULES[entry[0]], entry[1]]
        return out

    # ------------------------------------------------------------------ geometry

    @property
    def patch_size(self) -> int:
        """Pixel-space models fold p x p pixel patches into channels (UNet channels = 3 p^2); 1 = plain pixels."""
        c = int(self.unet.config.out_channels)
        p = int(round((c / 3) ** 0.5))
        if 3 * p * p != c:
            raise ValueError(
                f"a pixel-space MAUGen's UNet must output 3 * p^2 channels (RGB in p x p patches), got {c}; "
                "give the pipeline a VAE or rebuild the UNet"
            )
        return p

    @property
    def vae_scale_factor(self) -> int:
        if self.vae is None:
            return self.patch_size
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels if self.vae is not None else 3 * self.patch_size**2

    @property
    def inpainting(self) -> bool:
        return core.is_inpainting(self.unet, self.latent_channels)

    @property
    def reference(self) -> bool:
        """Whether the UNet also reads the whole exemplar (`model.reference`)."""
        return core.has_reference(self.unet, self.latent_channels)

    def image_condition(self, exemplar: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The inpainting UNet's image channels: the masked exemplar, and the whole exemplar after it when
        the UNet reads it (training builds them here; sampling in `encode_exemplar`, alike)."""
        if self.reference:
            return self.encode_exemplar(exemplar, mask)[0]
        return self.encode_images(exemplar * (1.0 - mask))

    def encode_exemplar(self, exemplar: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the UNet's image channels, the whole exemplar's latent), from one encoder call on the masked and
        the whole exemplar: sampling needs the latter outside the face (and a reference UNet reads it)."""
        masked, whole = self.encode_images(torch.cat([exemplar * (1.0 - mask), exemplar])).chunk(2)
        return (torch.cat([masked, whole], 1) if self.reference else masked), whole

    def encode_images(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [-1, 1] -> the diffusion space (VAE latents, or the pixels folded into p x p patches).

        A VAE latent is sampled with `generator` (training targets); without one it is the posterior's
        mode, so conditions (the exemplar, the masked image) never draw from torch's global RNG and a
        seed fixes the sample."""
        if self.vae is None:
            p = self.patch_size
            return F.pixel_unshuffle(x, p) if p > 1 else x
        dist = self.vae.encode(x.to(self.vae.dtype)).latent_dist
        z = dist.mode() if generator is None else dist.sample(generator)
        return z * self.vae.config.scaling_factor

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            p = self.patch_size
            return F.pixel_shuffle(z, p) if p > 1 else z
        return self.vae.decode(z.to(self.vae.dtype) / self.vae.config.scaling_factor).sample

    def language_init_(self) -> None:
        """Language initialisation: the AU queries from text embeddings of the 12 AU descriptions."""
        emb = core.description_embeddings(self.tokenizer, self.text_encoder, AU_TEXTS)
        self.label_decoder.language_init_(emb)

    # ------------------------------------------------------------------ sampling

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str],
        identity_image,
        num_inference_steps: int = 25,
        guidance_scale: float = 3.0,
        guidance_interval: tuple[float, float] = (0.0, 1.0),
        generator: torch.Generator | list[torch.Generator] | None = None,
        mask_image=None,
        height: int | None = None,
        width: int | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        return_au_condition: bool = False,
        on_nonfinite: str = "raise",
    ) -> MAUGenPipelineOutput | tuple:
        """`on_nonfinite`: "raise" fails the call when any sample has NaN/inf pixels or labels (fp16
        overflow, NaN weights); "mark" keeps the batch, blackens those samples, sets their labels to
        NaN and says which in `finite` (the factory rejects them one by one)."""
        if on_nonfinite not in ("raise", "mark"):
            raise ValueError(f"on_nonfinite must be 'raise' or 'mark', got {on_nonfinite!r}")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("prompt: give at least one prompt")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        lo, hi = guidance_interval
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(
                f"guidance_interval must be (lo, hi) with 0 <= lo < hi <= 1 (noise levels t/T), got {guidance_interval}"
            )
        if output_type not in ("np", "pil", "pt"):
            raise ValueError(f"output_type must be 'np', 'pil' or 'pt', got {output_type!r}")
        b = len(prompts)
        device = self._execution_device
        dtype = self.unet.dtype
        sf = self.vae_scale_factor
        height = height or self.unet.config.sample_size * sf
        width = width or self.unet.config.sample_size * sf
        size = (height, width)

        ident = to_image_tensor(identity_image, b, size, "identity_image").to(device)
        text, text_mask = core.encode_prompt(self.tokenizer, self.text_encoder, prompts, device)
        null_text, _ = core.encode_prompt(self.tokenizer, self.text_encoder, [""], device)
        id_emb = core.embed_identity(self.identity_encoder, ident)
        cond = core.Condition(text.to(dtype), text_mask, id_emb.to(dtype))

        mask_l = masked_l = None
        if self.inpainting:
            if mask_image is None:
                raise ValueError(
                    "this MAUGen is an inpainting model: pass mask_image (1 = the face region to generate)"
                )
            mask = to_mask_tensor(mask_image, b, size).to(device)
            masked_l, z_known = (z.to(dtype) for z in self.encode_exemplar(ident, mask))
            mask_l = core.latent_mask(mask, (height // sf, width // sf)).to(dtype)

        shape = (b, self.latent_channels, height // sf, width // sf)
        latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype) * self.scheduler.init_noise_sigma
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        if self.inpainting:
            # outside the face the model was never asked to denoise (eq. 10 is masked): there the
            # sample follows the exemplar, noised to each step's level, as x_t did in training
            known_noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)

        ld = self.label_decoder
        mutual = ld.config.mutual_conditioning
        state = ld.initial_queries(b).to(dtype)
        cfg = guidance_scale > 1.0
        uncond = self.conditioner.unconditional(null_text.to(dtype), b) if cfg else None
        invariants = ld.step_invariants(cond.text_tokens, cond.text_mask, cond.id_embedding, dtype)  # once a call
        trajectory: list[np.ndarray] = []
        labels = None
        for i, t in enumerate(self.progress_bar(timesteps)):
            x_in = core.unet_input(self.scheduler.scale_model_input(latents, t), mask_l, masked_l, self.inpainting)
            queries = state if mutual else ld.initial_queries(b).to(dtype)
            ehs = self.conditioner(cond.text_tokens, cond.id_embedding, queries)
            if return_au_condition:
                trajectory.append(ehs[:, -ld.config.num_aus :].float().cpu().numpy())
            if cfg and lo <= float(t) / self.scheduler.config.num_train_timesteps <= hi:
                eps = self.unet(
                    torch.cat([x_in, x_in]), t, encoder_hidden_states=torch.cat([ehs, uncond]).to(dtype)
                ).sample
                eps_c, eps_u = eps.chunk(2)
                eps = eps_u + guidance_scale * (eps_c - eps_u)
                feats, temb = self.tap.pop()
                feats, temb = [f[:b] for f in feats], temb[:b]
            else:
                eps = self.unet(x_in, t, encoder_hidden_states=ehs.to(dtype)).sample
                feats, temb = self.tap.pop()
            labels = ld(feats, temb, cond.text_tokens, cond.text_mask, cond.id_embedding, queries, invariants)
            if mutual:
                state = core.next_au_state(ld, state, labels.tokens)
            latents = self.scheduler.step(eps, t, latents, generator=generator).prev_sample
            if self.inpainting:
                if i + 1 < len(timesteps):
                    known = self.scheduler.add_noise(z_known, known_noise, timesteps[i + 1].repeat(b))
                else:
                    known = z_known
                latents = mask_l * latents + (1.0 - mask_l) * known

        x = self.decode_latents(latents).float().clamp(-1, 1)
        if self.inpainting:
            x = mask * x + (1.0 - mask) * ident  # the background, hair and clothes are the exemplar's
        occ = labels.occurrence.float().cpu().numpy()
        inten = labels.intensity.float().cpu().numpy()
        finite = (torch.isfinite(x).flatten(1).all(1).cpu().numpy() & np.isfinite(occ).all(1) & np.isfinite(inten).all(1))
        if not finite.all():
            if on_nonfinite == "raise":
                raise FloatingPointError(
                    f"MAUGen produced NaN/inf pixels or labels in {int((~finite).sum())} of {len(finite)} samples; on "
                    "fp16 try bf16 or fp32, or check the checkpoint for NaN weights"
                )
            bad = torch.from_numpy(~finite).to(x.device)
            x = torch.where(bad.view(-1, 1, 1, 1), torch.full_like(x, -1.0), x)
            occ[~finite], inten[~finite] = np.nan, np.nan
        if output_type == "pt":
            images = x
        else:
            arr = ((x + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
            images = [PIL.Image.fromarray(a) for a in arr] if output_type == "pil" else arr
        self.maybe_free_model_hooks()
        if not return_dict:
            return images, occ, inten
        return MAUGenPipelineOutput(
            images=images,
            au_occurrence=occ,
            au_intensity=inten,
            au_condition=trajectory if return_au_condition else None,
            finite=finite,
        )

    # ------------------------------------------------------------------ construction from Stable Diffusion

    @classmethod
    def from_stable_diffusion(
        cls,
        path: str | Path,
        identity_encoder,
        label_layers: Sequence[int] = (1, 2, 3),
        tokens_per_side: int = 16,
        num_id_tokens: int = 2,
        au_tokens_in_up_path: bool = False,
        **label_decoder_kwargs,
    ) -> MAUGenPipeline:
        """SD weights from a local diffusers-format directory + MAUGen's new parts with fresh weights.

        The AU queries take the text encoder's width (768 for SD 1.5), so language initialisation
        runs on the real CLIP text encoder. Works for the 4-channel and the 9-channel inpainting UNet.
        """
        from transformers import AutoTokenizer, CLIPTextModel

        root = Path(path)
        missing = [d for d in ("unet", "text_encoder", "tokenizer", "scheduler") if not (root / d).is_dir()]
        if missing:
            raise FileNotFoundError(
                f"{root} is not a Stable Diffusion directory in diffusers format: missing {', '.join(missing)}/ "
                "(save one with StableDiffusionPipeline.save_pretrained)"
            )
        unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet")
        vae = AutoencoderKL.from_pretrained(root, subfolder="vae") if (root / "vae").is_dir() else None
        text_encoder = CLIPTextModel.from_pretrained(root, subfolder="text_encoder")
        tokenizer = AutoTokenizer.from_pretrained(root, subfolder="tokenizer")
        scheduler = DDIMScheduler.from_pretrained(root, subfolder="scheduler")
        if scheduler.config.prediction_type != "epsilon":  # MAUGen's losses regress the noise (eq. 10)
            raise ValueError(
                f"{root}/scheduler predicts {scheduler.config.prediction_type!r}, but MAUGen trains epsilon "
                "prediction; use a Stable Diffusion 1.5 (inpainting) base"
            )
        return cls.assemble(
            unet,
            vae,
            text_encoder,
            tokenizer,
            identity_encoder,
            scheduler,
            label_layers,
            tokens_per_side,
            num_id_tokens,
            au_tokens_in_up_path,
            **label_decoder_kwargs,
        )

    @classmethod
    def assemble(
        cls,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL | None,
        text_encoder,
        tokenizer,
        identity_encoder,
        scheduler,
        label_layers: Sequence[int],
        tokens_per_side: int,
        num_id_tokens: int = 2,
        au_tokens_in_up_path: bool = False,
        **label_decoder_kwargs,
    ) -> MAUGenPipeline:
        """A pipeline around given base parts, with a fresh conditioner and label decoder sized to them."""
        conditioner, label_decoder = label_parts(
            unet,
            text_encoder.config.hidden_size,
            int(identity_encoder.config.dim),
            label_layers,
            tokens_per_side,
            num_id_tokens,
            au_tokens_in_up_path,
            **label_decoder_kwargs,
        )
        pipe = cls(
            unet=unet,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            identity_encoder=identity_encoder,
            conditioner=conditioner,
            label_decoder=label_decoder,
            scheduler=scheduler,
        )
        if label_decoder.config.language_init:
            pipe.language_init_()
        for m in pipe.components.values():
            if isinstance(m, torch.nn.Module):
                m.eval()  # as from_pretrained leaves them, so a fresh and a reloaded pipeline compute alike
        return pipe


def label_parts(
    unet: UNet2DConditionModel,
    text_dim: int,
    id_dim: int,
    label_layers: Sequence[int],
    tokens_per_side: int,
    num_id_tokens: int = 2,
    au_tokens_in_up_path: bool = False,
    **label_decoder_kwargs,
) -> tuple[MAUGenConditioner, ConditionalLabelDecoder]:
    """MAUGen's own parts, sized to a UNet and its text and identity encoders: the conditioner and the
    label decoder (AU queries of the text width, one patch grid of about `tokens_per_side` per tap)."""
    conditioner = MAUGenConditioner(
        cross_attention_dim=unet.config.cross_attention_dim,
        id_embed_dim=id_dim,
        num_id_tokens=num_id_tokens,
        query_dim=text_dim,
        au_tokens_in_up_path=au_tokens_in_up_path,
    )
    label_decoder = ConditionalLabelDecoder(
        label_layers=tuple(label_layers),
        feature_channels=core.tapped_channels(unet, label_layers),
        patch_sizes=tuple(max(1, s // tokens_per_side) for s in tapped_sides(unet, label_layers)),
        temb_dim=unet.time_embedding.linear_2.out_features,
        text_dim=text_dim,
        id_embed_dim=id_dim,
        query_dim=text_dim,
        **({"num_heads": 8, "head_hidden": 256} | label_decoder_kwargs),
    )
    return conditioner, label_decoder


def tapped_sides(unet: UNet2DConditionModel, layers: Sequence[int]) -> tuple[int, ...]:
    """Spatial side of each tapped up block's output (each up block but the last upsamples x2 at its end)."""
    n = len(unet.config.block_out_channels)
    base = unet.config.sample_size // 2 ** (n - 1)
    return tuple(base * 2 ** min(i + 1, n - 1) for i in layers)

"""DDIM and DPM-Solver++ 2M as small pure functions over a noise schedule.

Conventions follow diffusers (the reference in tests), driven by the checkpoint's scheduler config:
- schedule: ``scaled_linear`` betas = linspace(√β0, √β1, T)² (SD1.5: 0.00085 -> 0.012, T = 1000),
  ᾱ_t = Π(1 - β); ε-prediction; the model input needs no scaling (init σ = 1).
- DDIM (Song et al. 2021, eq. 12): ``leading`` spacing + ``steps_offset`` by default; ᾱ_prev of the last
  step is ᾱ_0 unless ``set_alpha_to_one``.
- DPM-Solver++ 2M (Lu et al. 2022, Alg. 2, "midpoint" form in diffusers): ``linspace`` spacing by default,
  first-order first step, final step to σ = 0 (``final="zero"``). ``final="official"`` reproduces diffusers
  0.14 as used by the LoRA-Composer paper: timesteps linspace(0, T-1, S+1) rounded, the last update going to
  t = 0 (ᾱ_0, σ small but not zero), second order throughout when S ≥ 15 (method.md §10).
All arithmetic runs in float64 on the schedule and float32 on latents.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class SchedulerConfig:
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    steps_offset: int = 1
    set_alpha_to_one: bool = False
    clip_sample: bool = False
    prediction_type: str = "epsilon"
    timestep_spacing: str | None = None  # None: each sampler's diffusers default

    @classmethod
    def from_diffusers(cls, cfg: dict) -> "SchedulerConfig":
        if cfg.get("prediction_type", "epsilon") != "epsilon":
            raise ValueError(f"scheduler config: prediction_type={cfg['prediction_type']!r} (an SD2.x v-model?); "
                             "only epsilon prediction (SD1.x) is supported")
        if cfg.get("beta_schedule", "scaled_linear") not in ("scaled_linear", "linear"):
            raise ValueError(f"scheduler config: beta_schedule={cfg['beta_schedule']!r} not supported")
        return cls(**{k: cfg[k] for k in cls.__dataclass_fields__ if k in cfg and cfg[k] is not None})

    def to_diffusers(self) -> dict:
        d = {"_class_name": "PNDMScheduler", **self.__dict__, "skip_prk_steps": True, "trained_betas": None}
        if d["timestep_spacing"] is None:
            d.pop("timestep_spacing")
        return d

    def alphas_cumprod(self) -> np.ndarray:
        T = self.num_train_timesteps
        if self.beta_schedule == "scaled_linear":
            betas = np.linspace(self.beta_start ** 0.5, self.beta_end ** 0.5, T, dtype=np.float32) ** 2
        else:
            betas = np.linspace(self.beta_start, self.beta_end, T, dtype=np.float32)
        # diffusers keeps the schedule in fp32 torch tensors; match its rounding, then widen
        return torch.cumprod(1.0 - torch.from_numpy(betas), dim=0).double().numpy()


def timesteps(cfg: SchedulerConfig, steps: int, spacing: str, multistep: bool = False) -> np.ndarray:
    """Descending integer timesteps for ``steps`` denoising steps (diffusers' spacing rules; the multistep
    DPM scheduler's "leading" divides by steps + 1)."""
    T = cfg.num_train_timesteps
    if steps < 1 or steps > T:
        raise ValueError(f"steps must be in 1..{T}, got {steps}")
    if spacing == "leading" and multistep:
        ratio = T // (steps + 1)
        return (np.arange(0, steps + 1) * ratio).round()[::-1][:-1].astype(np.int64) + cfg.steps_offset
    if spacing == "leading":
        ratio = T // steps
        return (np.arange(0, steps) * ratio).round()[::-1].astype(np.int64) + cfg.steps_offset
    if spacing == "trailing":
        return np.round(np.arange(T, 0, -T / steps)).astype(np.int64) - 1
    if spacing == "linspace":
        return np.linspace(0, T - 1, steps + 1).round()[::-1][:-1].copy().astype(np.int64)
    raise ValueError(f"unknown timestep_spacing {spacing!r}")


class DDIM:
    """Deterministic (eta = 0) or stochastic (eta > 0) DDIM."""

    def __init__(self, cfg: SchedulerConfig, steps: int, eta: float = 0.0):
        self.cfg, self.eta = cfg, float(eta)
        self.ac = cfg.alphas_cumprod()
        self.final_ac = 1.0 if cfg.set_alpha_to_one else self.ac[0]
        self.timesteps = timesteps(cfg, steps, cfg.timestep_spacing or "leading")
        self.ratio = cfg.num_train_timesteps // steps

    def step(self, i: int, eps: torch.Tensor, x: torch.Tensor, generator=None) -> torch.Tensor:
        t = int(self.timesteps[i])
        prev = t - self.ratio
        a_t, a_prev = self.ac[t], (self.ac[prev] if prev >= 0 else self.final_ac)
        eps, x = eps.float(), x.float()
        x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5
        if self.cfg.clip_sample:
            x0 = x0.clamp(-1, 1)
        var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
        std = self.eta * var ** 0.5
        out = a_prev ** 0.5 * x0 + (1 - a_prev - std ** 2) ** 0.5 * eps
        if self.eta > 0:
            noise = torch.randn(eps.shape, generator=generator, dtype=eps.dtype,
                                device=generator.device if generator is not None else eps.device).to(eps.device)
            out = out + std * noise
        return out


class DPMSolverPP2M:
    """DPM-Solver++ (2M, midpoint) for ε-models, in the log-SNR variable λ = log(α/σ)."""

    def __init__(self, cfg: SchedulerConfig, steps: int, final: str = "zero"):
        if final not in ("zero", "official"):
            raise ValueError(f"final must be 'zero' or 'official', got {final!r}")
        self.cfg, self.final = cfg, final
        ac = cfg.alphas_cumprod()
        spacing = "linspace" if final == "official" else (cfg.timestep_spacing or "linspace")
        self.timesteps = timesteps(cfg, steps, spacing, multistep=True)
        if final == "official":  # diffusers 0.14: (α, σ) read off ᾱ at each t, and the last target is t = 0
            a = np.concatenate([ac[self.timesteps], ac[:1]])
            self.alpha, self.sigma = np.sqrt(a), np.sqrt(1 - a)
            self.first_order_last = steps < 15
        else:  # current diffusers: σ_k = sqrt((1-ᾱ)/ᾱ) interpolated at t, then a final σ = 0
            s_all = np.sqrt((1 - ac) / ac)
            s = np.interp(self.timesteps.astype(np.float64), np.arange(len(s_all)), s_all)
            s = np.concatenate([s, [0.0]]).astype(np.float32).astype(np.float64)
            self.alpha = 1.0 / np.sqrt(s ** 2 + 1)
            self.sigma = s * self.alpha
            self.first_order_last = True
        with np.errstate(divide="ignore"):
            self.lam = np.log(self.alpha) - np.log(self.sigma)
        self.prev_x0 = None

    def step(self, i: int, eps: torch.Tensor, x: torch.Tensor, generator=None) -> torch.Tensor:
        eps, x = eps.float(), x.float()
        a_s, s_s, a_t, s_t = self.alpha[i], self.sigma[i], self.alpha[i + 1], self.sigma[i + 1]
        x0 = (x - s_s * eps) / a_s  # data prediction
        last = i == len(self.timesteps) - 1
        if s_t == 0:  # final step to σ = 0: the first-order update reduces to x0
            out = x0
        else:
            h = self.lam[i + 1] - self.lam[i]
            e = np.expm1(-h)  # exp(-h) - 1
            out = (s_t / s_s) * x - a_t * e * x0
            if self.prev_x0 is not None and not (last and self.first_order_last):
                r = (self.lam[i] - self.lam[i - 1]) / h
                out = out - 0.5 * a_t * e * (x0 - self.prev_x0) / r
        self.prev_x0 = x0
        return out


SAMPLERS = ("ddim", "dpm++2m")


def make_sampler(name: str, cfg: SchedulerConfig, steps: int, *, eta: float = 0.0, final: str = "zero"):
    if name == "ddim":
        return DDIM(cfg, steps, eta)
    if name in ("dpm++2m", "dpmpp2m", "dpm-solver++"):
        if eta:
            raise ValueError("eta applies to DDIM only")
        return DPMSolverPP2M(cfg, steps, final)
    raise ValueError(f"unknown sampler {name!r}; expected one of {SAMPLERS}")

"""Samplers as small pure classes over a noise schedule, each pinned to one diffusers scheduler.

Every sampler offers the same interface, which the denoising loop relies on:

- ``timesteps[i]``: what the UNet receives at step i (int64; float32 for the σ-interpolated Euler schedules);
- ``init_noise_sigma``: the initial latent is ``randn × init_noise_sigma``;
- ``scale_model_input(i, x)``: the UNet's input at step i (identity for the ᾱ-parameterised samplers,
  x / sqrt(σ_i² + 1) for the Euler family, which keeps its latent in the σ-scaled "VE" form);
- ``step(i, eps, x, generator=None) -> x``: one update from the guided ε; call it for i = 0, 1, … in order
  (multistep solvers keep state). Stochastic samplers draw ``torch.randn(x.shape, generator=generator)``
  exactly when and as diffusers draws it, so a seed gives the same image; ``generator`` may be a list with one
  generator per image of x (a batch of seeds: each image draws its [1, ...] noise from its own, as diffusers
  does with a list of generators);
- ``sigmas[i]`` (float64, length steps + 1): the noise level σ = sqrt((1 − ᾱ)/ᾱ) of the latent entering step
  i, ``sigmas[-1]`` that of the result; ``alpha_bars`` = 1/(1 + σ²) is the same level as ᾱ, and
  ``noise_timesteps()`` as a continuous training timestep τ ∈ [0, T−1].

Conventions follow diffusers (the reference in tests), driven by the checkpoint's scheduler config:
- schedule: ``scaled_linear`` betas = linspace(√β0, √β1, T)² (SD1.5: 0.00085 -> 0.012, T = 1000),
  ᾱ_t = Π(1 - β) and σ_t = sqrt((1 − ᾱ_t)/ᾱ_t) kept in fp32 as diffusers does; ε-prediction.
- DDIM (Song et al. 2021, eq. 12): ``leading`` spacing + ``steps_offset`` by default; ᾱ_prev of the last
  step is ᾱ_0 unless ``set_alpha_to_one``; the previous timestep is t − T // steps for every spacing.
- DPM-Solver++ 2M (Lu et al. 2022, Alg. 2, "midpoint" form in diffusers): ``linspace`` spacing by default,
  first-order first step, final step to σ = 0 (``final="zero"``). ``final="official"`` reproduces diffusers
  0.14 as used by the LoRA-Composer paper: timesteps linspace(0, T-1, S+1) rounded, the last update going to
  t = 0 (ᾱ_0, σ small but not zero), second order throughout when S ≥ 15 (method.md §10).
  ``karras=True`` (DPMSolverMultistepScheduler(use_karras_sigmas=True)): σ on Karras et al. 2022's ρ = 7
  ramp (eq. 5) between σ(0) and σ(T−1) of the training table; the UNet gets the timestep whose log σ is
  nearest by linear interpolation, rounded; the solver uses the ramp's σ itself.
- Euler (EulerDiscreteScheduler; Karras et al. 2022 Alg. 1 without churn): ``linspace`` spacing over S points
  (fractional timesteps), σ linearly interpolated in t, a final σ = 0; x ← x + (σ_{i+1} − σ_i)·ε.
  init_noise_sigma = σ_max (linspace/trailing) or sqrt(σ_max² + 1) (leading). ``karras=True``: the ρ = 7
  ramp between the interpolated σ's ends; the UNet gets the (unrounded) interpolated timestep.
- Euler ancestral (EulerAncestralDiscreteScheduler): the same σ's; each step goes down to
  σ_down = sqrt(σ_{i+1}² − σ_up²) deterministically, then adds σ_up·z with
  σ_up = sqrt(σ_{i+1}²(σ_i² − σ_{i+1}²)/σ_i²); z is drawn on every step, the last included (σ_up = 0 there).
- LCM (LCMScheduler; Luo et al. 2023): the distillation schedule (k·j − 1 for j = 1..``original_steps``,
  k = T // original_steps) subsampled evenly to S steps; the consistency function
  f(x, t) = c_skip(t)·x + c_out(t)·x0(x, ε) with c_skip = σ_d²/((s·t)² + σ_d²), c_out = s·t/sqrt((s·t)² + σ_d²),
  σ_d = 0.5, s = 10 (Song et al. 2023, consistency models, eq. 4 with the LCM timestep scaling); between steps
  the estimate is re-noised to the next timestep with fresh z. The config's spacing and offset do not apply.
- TCD (TCDScheduler; Zheng et al. 2024, "strategic stochastic sampling"): LCM's timesteps; from t the model's
  x0 and ε give the point at s = floor((1 − γ)·t_next), which is re-noised forward to t_next with fresh z
  (γ = ``eta``, 0.3 by default; γ = 0 is deterministic, and the last step is never re-noised).
Schedule arithmetic runs in float64 on fp32 tables (float32 where diffusers' rounding decides an index);
latents stay float32.
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
        # diffusers keeps the schedule in fp32 torch tensors; match its rounding (torch.linspace, not numpy's,
        # which differs in the last bit for a third of the betas), then widen
        if self.beta_schedule == "scaled_linear":
            betas = torch.linspace(self.beta_start ** 0.5, self.beta_end ** 0.5, T, dtype=torch.float32) ** 2
        else:
            betas = torch.linspace(self.beta_start, self.beta_end, T, dtype=torch.float32)
        return torch.cumprod(1.0 - betas, dim=0).double().numpy()

    def train_sigmas(self) -> np.ndarray:
        """σ_t = sqrt((1 − ᾱ_t)/ᾱ_t) for t = 0..T-1, computed in fp32 like diffusers' σ-based schedulers [T]."""
        ac = torch.from_numpy(self.alphas_cumprod()).float()
        return (((1 - ac) / ac) ** 0.5).numpy()


def timesteps(cfg: SchedulerConfig, steps: int, spacing: str, multistep: bool = False) -> np.ndarray:
    """Descending integer timesteps for ``steps`` denoising steps (diffusers' spacing rules; the multistep
    DPM scheduler's "leading" and "linspace" place steps + 1 points and drop the last)."""
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
        if multistep:
            return np.linspace(0, T - 1, steps + 1).round()[::-1][:-1].copy().astype(np.int64)
        return np.linspace(0, T - 1, steps).round()[::-1].copy().astype(np.int64)
    raise ValueError(f"unknown timestep_spacing {spacing!r} (expected 'leading', 'trailing' or 'linspace')")


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022, eq. 5: σ_i = (σ_max^(1/ρ) + i/(n−1)·(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ, descending [n]."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def sigma_to_t(sigmas: np.ndarray, log_train_sigmas: np.ndarray) -> np.ndarray:
    """Fractional timesteps whose log σ, linearly interpolated on the training table, equals log σ (clamped to
    [0, T−1]). ``log_train_sigmas`` ascending in t [T]."""
    ls = np.log(np.maximum(np.asarray(sigmas, dtype=np.float64), 1e-10))
    table = log_train_sigmas.astype(np.float64)
    low = np.clip(np.searchsorted(table, ls, side="right") - 1, 0, len(table) - 2)
    w = np.clip((table[low] - ls) / (table[low] - table[low + 1]), 0.0, 1.0)
    return low + w


def _noise(like: torch.Tensor, generator) -> torch.Tensor:
    """z ~ N(0, I) shaped like ``like`` [B, ...], drawn on the generator's device (as diffusers' randn_tensor does).

    ``generator`` is one generator (or None) for the whole batch, or a list of B, one per image: image b's noise
    [1, ...] is then drawn from generator b alone, so a batch of seeds draws what each seed draws on its own."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != like.shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {like.shape[0]} latents")
        return torch.cat([_noise(like[b:b + 1], g) for b, g in enumerate(generator)])
    dev = generator.device if generator is not None else like.device
    return torch.randn(like.shape, generator=generator, dtype=like.dtype, device=dev).to(like.device)


class Sampler:
    """The interface shared by every sampler (see the module docstring)."""

    init_noise_sigma: float = 1.0
    timesteps: np.ndarray
    sigmas: np.ndarray

    def scale_model_input(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return x

    @property
    def alpha_bars(self) -> np.ndarray:
        """ᾱ of the latent entering step i (last entry: of the result) [steps + 1]."""
        return 1.0 / (1.0 + self.sigmas ** 2)

    def noise_timesteps(self) -> np.ndarray:
        """The continuous training timestep τ_i ∈ [0, T−1] whose σ is sigmas[i] [steps + 1]: one noise-level
        scale for every sampler and step count (τ = t_i wherever the UNet gets an integer t of the table)."""
        return sigma_to_t(self.sigmas, np.log(self.cfg.train_sigmas()))

    def __len__(self) -> int:
        return len(self.timesteps)

    def step(self, i: int, eps: torch.Tensor, x: torch.Tensor, generator=None) -> torch.Tensor:
        raise NotImplementedError


def _ve_sigma(ac) -> np.ndarray:
    ac = np.asarray(ac, dtype=np.float64)
    return np.sqrt((1 - ac) / ac)


class DDIM(Sampler):
    """Deterministic (eta = 0) or stochastic (eta > 0) DDIM."""

    def __init__(self, cfg: SchedulerConfig, steps: int, eta: float = 0.0):
        self.cfg, self.eta = cfg, float(eta)
        self.ac = cfg.alphas_cumprod()
        self.final_ac = 1.0 if cfg.set_alpha_to_one else self.ac[0]
        self.timesteps = timesteps(cfg, steps, cfg.timestep_spacing or "leading")
        self.ratio = cfg.num_train_timesteps // steps
        self.sigmas = _ve_sigma([*self.ac[self.timesteps], self._a_prev(int(self.timesteps[-1]))])

    def _a_prev(self, t: int) -> float:
        prev = t - self.ratio
        return self.ac[prev] if prev >= 0 else self.final_ac

    def step(self, i: int, eps: torch.Tensor, x: torch.Tensor, generator=None) -> torch.Tensor:
        t = int(self.timesteps[i])
        a_t, a_prev = self.ac[t], self._a_prev(t)
        eps, x = eps.float(), x.float()
        x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5
        if self.cfg.clip_sample:
            x0 = x0.clamp(-1, 1)
        var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
        std = self.eta * var ** 0.5
        out = a_prev ** 0.5 * x0 + (1 - a_prev - std ** 2) ** 0.5 * eps
        if self.eta > 0:
            out = out + std * _noise(eps, generator)
        return out


class DPMSolverPP2M(Sampler):
    """DPM-Solver++ (2M, midpoint) for ε-models, in the log-SNR variable λ = log(α/σ).
    ``alpha``/``sigma`` [steps + 1] are the VP coefficients (x = α·x0 + σ·ε) of each step's input and target."""

    def __init__(self, cfg: SchedulerConfig, steps: int, final: str = "zero", karras: bool = False):
        if final not in ("zero", "official"):
            raise ValueError(f"final must be 'zero' or 'official', got {final!r}")
        if karras and final == "official":
            raise ValueError("the official (diffusers 0.14) schedule has no Karras sigmas")
        self.cfg, self.final = cfg, final
        ac = cfg.alphas_cumprod()
        spacing = "linspace" if final == "official" else (cfg.timestep_spacing or "linspace")
        self.timesteps = timesteps(cfg, steps, spacing, multistep=True)
        if final == "official":  # diffusers 0.14: (α, σ) read off ᾱ at each t, and the last target is t = 0
            a = np.concatenate([ac[self.timesteps], ac[:1]])
            self.alpha, self.sigma = np.sqrt(a), np.sqrt(1 - a)
            self.sigmas = _ve_sigma(a)
            self.first_order_last = steps < 15
        else:  # current diffusers: σ_k = sqrt((1-ᾱ)/ᾱ) at t (or on the Karras ramp), then a final σ = 0
            if karras:
                train = cfg.train_sigmas()
                s = karras_sigmas(float(train[0]), float(train[-1]), steps)
                self.timesteps = np.round(sigma_to_t(s, np.log(train))).astype(np.int64)
            else:
                s_all = np.sqrt((1 - ac) / ac)
                s = np.interp(self.timesteps.astype(np.float64), np.arange(len(s_all)), s_all)
            s = np.concatenate([s, [0.0]]).astype(np.float32).astype(np.float64)
            self.sigmas = s
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


class Euler(Sampler):
    """Euler (``ancestral=False``) or Euler ancestral on the σ ("VE") form of the latent: x_σ = x / sqrt(ᾱ)."""

    def __init__(self, cfg: SchedulerConfig, steps: int, *, karras: bool = False, ancestral: bool = False):
        if karras and ancestral:
            raise ValueError("Euler ancestral has no Karras-sigma option in diffusers; use 'euler-karras'")
        T = cfg.num_train_timesteps
        spacing = cfg.timestep_spacing or "linspace"
        if spacing == "linspace":  # S points (not S + 1), fractional
            if steps < 1 or steps > T:
                raise ValueError(f"steps must be in 1..{T}, got {steps}")
            ts = np.linspace(0, T - 1, steps, dtype=np.float32)[::-1].copy()
        else:
            ts = timesteps(cfg, steps, spacing).astype(np.float32)
        train = cfg.train_sigmas()
        s = np.interp(ts, np.arange(T), train)
        if karras:  # the ramp spans the interpolated ends (so it depends on the spacing, as in diffusers)
            s = karras_sigmas(float(s[-1]), float(s[0]), steps)
            ts = sigma_to_t(s, np.log(train)).astype(np.float32)
        s32 = np.concatenate([s, [0.0]]).astype(np.float32)
        self.cfg = cfg
        self.timesteps, self.sigmas, self.ancestral = ts, s32.astype(np.float64), ancestral
        self._in_scale = np.sqrt(s32 * s32 + np.float32(1.0))  # fp32, as diffusers divides
        smax = s32.max()
        self.init_noise_sigma = float(smax if spacing in ("linspace", "trailing")
                                      else np.sqrt(smax * smax + np.float32(1.0)))

    def scale_model_input(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return x / float(self._in_scale[i])

    def step(self, i: int, eps: torch.Tensor, x: torch.Tensor, generator=None) -> torch.Tensor:
        eps, x = eps.float(), x.float()
        s, s_next = self.sigmas[i], self.sigmas[i + 1]
        if not self.ancestral:  # dx/dσ = (x − x0)/σ = ε
            return x + (s_next - s) * eps
        s_up = (s_next ** 2 * (s ** 2 - s_next ** 2) / s ** 2) ** 0.5
        s_down = (s_next ** 2 - s_up ** 2) ** 0.5
        return x + (s_down - s) * eps + s_up * _noise(eps, generator)


def lcm_timesteps(cfg: SchedulerConfig, steps: int, original_steps: int = 50) -> np.ndarray:
    """LCM/TCD inference timesteps: the distillation schedule k·j − 1 (j = 1..original_steps, k = T //
    original_steps), descending, at the evenly spaced indices floor(linspace(0, original_steps, steps))."""
    T = cfg.num_train_timesteps
    if not 1 <= original_steps <= T:
        raise ValueError(f"original_steps must be in 1..{T}, got {original_steps}")
    if not 1 <= steps <= original_steps:
        raise ValueError(f"steps must be in 1..{original_steps} (the distillation schedule's original_steps) "
                         f"for LCM/TCD, got {steps}")
    k = T // original_steps
    origin = (np.arange(1, original_steps + 1) * k - 1)[::-1]
    return origin[np.floor(np.linspace(0, original_steps, steps, endpoint=False)).astype(np.int64)]


class LCM(Sampler):
    """Latent consistency multistep sampling: boundary-conditioned x0 estimate, re-noised to the next step."""

    sigma_data = 0.5

    def __init__(self, cfg: SchedulerConfig, steps: int, original_steps: int = 50, timestep_scaling: float = 10.0):
        self.cfg, self.scaling = cfg, float(timestep_scaling)
        self.ac = cfg.alphas_cumprod()
        self.timesteps = lcm_timesteps(cfg, steps, original_steps)
        self.sigmas = np.concatenate([_ve_sigma(self.ac[self.timesteps]), [0.0]])

    def boundary(self, t: int) -> tuple[float, float]:
        """(c_skip, c_out) at discrete t (fp32, as diffusers computes them from a tensor timestep)."""
        st = np.float32(t) * np.float32(self.scaling)
        d2 = np.float32(self.sigma_data ** 2)
        return float(d2 / (st * st + d2)), float(st / np.sqrt(st * st + d2))

    def step(self, i: int, eps: torch.Tensor, x: torch.Tensor, generator=None) -> torch.Tensor:
        eps, x = eps.float(), x.float()
        t = int(self.timesteps[i])
        a_t = self.ac[t]
        x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5
        if self.cfg.clip_sample:
            x0 = x0.clamp(-1, 1)
        c_skip, c_out = self.boundary(t)
        denoised = c_out * x0 + c_skip * x
        if i == len(self.timesteps) - 1:  # no noise after the last step (nor for one-step sampling)
            return denoised
        a_next = self.ac[int(self.timesteps[i + 1])]
        return a_next ** 0.5 * denoised + (1 - a_next) ** 0.5 * _noise(denoised, generator)


class TCD(Sampler):
    """Trajectory consistency distillation sampling with stochasticity γ (``gamma``, diffusers' ``eta``)."""

    def __init__(self, cfg: SchedulerConfig, steps: int, gamma: float = 0.3, original_steps: int = 50):
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"TCD gamma (eta) must be in [0, 1], got {gamma}")
        self.cfg, self.gamma = cfg, float(gamma)
        self.ac = cfg.alphas_cumprod()
        self.timesteps = lcm_timesteps(cfg, steps, original_steps)
        nxt = np.concatenate([self.timesteps[1:], [0]])
        # s = floor((1 − γ)·t_next), computed in fp32 as diffusers does (0.7·700 is 490 there, 489.99… in fp64)
        self.s = np.floor(np.float32(1.0 - self.gamma) * nxt.astype(np.float32)).astype(np.int64)
        last_s = self.ac[self.s[-1]]
        self.sigmas = _ve_sigma([*self.ac[self.timesteps], last_s])

    def step(self, i: int, eps: torch.Tensor, x: torch.Tensor, generator=None) -> torch.Tensor:
        eps, x = eps.float(), x.float()
        t, s = int(self.timesteps[i]), int(self.s[i])
        a_t, a_s = self.ac[t], self.ac[s]
        x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5
        xs = a_s ** 0.5 * x0 + (1 - a_s) ** 0.5 * eps  # the trajectory point at s
        if self.gamma == 0 or i == len(self.timesteps) - 1:
            return xs
        a_next = self.ac[int(self.timesteps[i + 1])]
        return (a_next / a_s) ** 0.5 * xs + (1 - a_next / a_s) ** 0.5 * _noise(xs, generator)


# name -> (diffusers scheduler it reproduces, constructor)
SAMPLERS = ("ddim", "dpm++2m", "dpm++2m-karras", "euler", "euler-karras", "euler-a", "lcm", "tcd")
DIFFUSERS_EQUIVALENT = {
    "ddim": "DDIMScheduler",
    "dpm++2m": "DPMSolverMultistepScheduler",
    "dpm++2m-karras": "DPMSolverMultistepScheduler(use_karras_sigmas=True)",
    "euler": "EulerDiscreteScheduler",
    "euler-karras": "EulerDiscreteScheduler(use_karras_sigmas=True)",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "lcm": "LCMScheduler",
    "tcd": "TCDScheduler",
}
_ALIASES = {"dpmpp2m": "dpm++2m", "dpm-solver++": "dpm++2m", "dpmpp2m-karras": "dpm++2m-karras",
            "euler_a": "euler-a", "euler-ancestral": "euler-a"}


def make_sampler(name: str, cfg: SchedulerConfig, steps: int, *, eta: float | None = None, final: str = "zero",
                 original_steps: int = 50) -> Sampler:
    """A sampler by name (``SAMPLERS``). ``eta``: DDIM's η (default 0) or TCD's γ (default 0.3); other samplers
    take none. ``final``: DPM-Solver++ 2M's last step ("official": diffusers 0.14). ``original_steps``: the
    LCM/TCD distillation schedule length."""
    key = _ALIASES.get(name, name)
    if key not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; expected one of {SAMPLERS}")
    if eta and key not in ("ddim", "tcd"):
        raise ValueError(f"eta applies to DDIM (η) and TCD (γ) only, not {key!r}")
    if final != "zero" and key != "dpm++2m":
        raise ValueError(f"final={final!r} applies to 'dpm++2m' only")
    if key == "ddim":
        return DDIM(cfg, steps, eta or 0.0)
    if key in ("dpm++2m", "dpm++2m-karras"):
        return DPMSolverPP2M(cfg, steps, final, karras=key.endswith("karras"))
    if key in ("euler", "euler-karras", "euler-a"):
        return Euler(cfg, steps, karras=key == "euler-karras", ancestral=key == "euler-a")
    if key == "lcm":
        return LCM(cfg, steps, original_steps)
    return TCD(cfg, steps, 0.3 if eta is None else eta, original_steps)

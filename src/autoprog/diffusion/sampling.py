"""Noise schedules and sampling: diffusers' DDPM for training noise (Eq. 11), DDIM with classifier-free guidance."""

from __future__ import annotations

import math

import torch

from ..data import same_device, to_device
from ..models.dit import DiffusionBackbone

NUM_TRAIN_TIMESTEPS = 1000


def training_scheduler(config: dict | None = None):
    """The training noise (DDPM): a model's own schedule (``config``, e.g. a Stable Diffusion pipeline's
    ``scheduler/`` config, whatever its scheduler class), else DiT's linear β (1e-4 → 0.02 over 1000 steps);
    ε-prediction only."""
    from diffusers import DDPMScheduler

    if config is None:
        return DDPMScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_schedule="linear",
                             prediction_type="epsilon", clip_sample=True)
    return DDPMScheduler.from_config({k: v for k, v in dict(config).items() if not k.startswith("_")})


def diffusion_loss(model, x0: torch.Tensor, y: torch.Tensor, scheduler, null_class: int | torch.Tensor,
                   generator: torch.Generator | None = None, class_dropout: float = 0.0,
                   weights: torch.Tensor | None = None, variance: bool = False) -> torch.Tensor:
    """Eq. 11: MSE between the true and the predicted noise at a uniformly drawn timestep.

    ``model`` is called as ``model(x_t, t, y)`` (a backbone, or its DDP wrapper); ``y`` is a condition batch
    (class labels ``(B,)`` or token ids ``(B, L)``). With ``class_dropout`` > 0 that fraction of conditions
    becomes the null condition: ``null_class`` (a class id, or a condition such as the backbone's
    ``null_condition(y)``; classifier-free guidance). ``weights`` ``(B,)``: the mean of the per-sample losses
    times these (DreamBooth's prior-preservation loss). ``variance``: the model returns ε and its variance values
    (2C channels) and the loss is DiT's hybrid one, the MSE plus :func:`variational_bound`.
    """
    b = x0.shape[0]
    dev = x0.device
    # drawn where the batch is when the generator is that device's (no copy, no host work), else on the host
    # and copied: a CPU generator gives the same numbers on any device
    here = generator is None or same_device(generator.device, dev)
    draw_on = dev if here else torch.device("cpu")
    noise = to_device(torch.randn(x0.shape, generator=generator, device=draw_on), dev)
    t = to_device(torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=generator, device=draw_on),
                  dev)
    if class_dropout > 0:
        drop = to_device(torch.rand(b, generator=generator, device=draw_on) < class_dropout, dev)
        null = torch.full_like(y, null_class) if isinstance(null_class, int) else null_class.to(dev).expand_as(y)
        y = torch.where(drop.view(-1, *([1] * (y.ndim - 1))), null, y)
    xt = scheduler.add_noise(x0, noise, t)
    if variance:
        per_sample = hybrid_loss(model(xt, t, y), noise, scheduler, x0, xt, t)
    elif weights is None:
        return torch.nn.functional.mse_loss(model(xt, t, y), noise)
    else:
        per_sample = torch.nn.functional.mse_loss(model(xt, t, y), noise, reduction="none").flatten(1).mean(1)
    if weights is None:
        return per_sample.mean()
    return (per_sample * to_device(weights, dev).to(per_sample.dtype)).mean()


def hybrid_loss(out: torch.Tensor, noise: torch.Tensor, scheduler, x0: torch.Tensor, xt: torch.Tensor,
                t: torch.Tensor) -> torch.Tensor:
    """DiT's hybrid loss per sample: the noise MSE of ``out``'s first C channels plus :func:`variational_bound`
    of its variance values (the other C)."""
    c = x0.shape[1]
    if out.shape[1] != 2 * c:
        raise ValueError(f"the hybrid loss needs the noise and the variance values ({2 * c} channels), the model "
                         f"returned {out.shape[1]}")
    eps = out[:, :c]
    per_sample = torch.nn.functional.mse_loss(eps, noise, reduction="none").flatten(1).mean(1)
    return per_sample + variational_bound(scheduler, x0, xt, t, eps.detach(), out[:, c:])


_TERMS: dict = {}  # (scheduler, device) → the posterior's coefficients, computed once


def _posterior_terms(scheduler, device) -> dict[str, torch.Tensor]:
    """q(x_{t-1} | x_t, x_0)'s coefficients over the schedule (improved DDPM's, as DiT's gaussian_diffusion)."""
    key = (id(scheduler), str(device))
    if key not in _TERMS:
        # from the betas, on the host, as diffusers makes alphas_cumprod: its add_noise moves alphas_cumprod to each
        # batch's device (a GPU's) while the betas stay here
        betas = scheduler.betas.cpu()
        ac = torch.cumprod(1.0 - betas, dim=0).double()
        betas = betas.double()
        ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])
        post_var = betas * (1 - ac_prev) / (1 - ac)
        terms = {"log_beta": betas.log(), "sqrt_recip_ac": (1 / ac).sqrt(), "sqrt_recipm1_ac": (1 / ac - 1).sqrt(),
                 "post_log_var": torch.cat([post_var[1:2], post_var[1:]]).log(),  # clipped: no log 0 at t = 0
                 "coef1": betas * ac_prev.sqrt() / (1 - ac), "coef2": (1 - ac_prev) * (1 - betas).sqrt() / (1 - ac)}
        _TERMS[key] = (scheduler, {k: v.float().to(device) for k, v in terms.items()})  # keeps the id valid
    return _TERMS[key][1]


def variational_bound(scheduler, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
                      v: torch.Tensor) -> torch.Tensor:
    """Per-sample L_vlb term in bits per dimension of a learned-range variance (Nichol & Dhariwal 2021, as DiT
    trains it): the model's log variance interpolates log β_t and the posterior's log β̃_t by (v + 1) / 2, its mean
    comes from ``eps`` (passed detached, so only the variance learns from this term); the KL to the true posterior
    for t > 0, the discretized Gaussian decoder NLL of ``x0`` (in [-1, 1]) at t = 0."""
    k = _posterior_terms(scheduler, x0.device)
    shape = (-1,) + (1,) * (x0.ndim - 1)

    def at(name):
        return k[name][t].view(shape)

    x0, xt, eps, v = x0.float(), xt.float(), eps.float(), v.float()
    true_mean = at("coef1") * x0 + at("coef2") * xt
    true_log_var = at("post_log_var")
    frac = (v + 1) / 2
    log_var = frac * at("log_beta") + (1 - frac) * true_log_var
    pred_x0 = at("sqrt_recip_ac") * xt - at("sqrt_recipm1_ac") * eps
    mean = at("coef1") * pred_x0 + at("coef2") * xt
    kl = 0.5 * (-1.0 + log_var - true_log_var + (true_log_var - log_var).exp()
                + (true_mean - mean) ** 2 * (-log_var).exp())
    kl = kl.flatten(1).mean(1) / math.log(2.0)
    nll = -_discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var).flatten(1).mean(1) / math.log(2.0)
    return torch.where(t == 0, nll, kl)


def _discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log p(x) of data in [-1, 1] quantised to 256 levels under N(mean, exp(log_scale)²) (improved DDPM's decoder)."""
    def cdf(z):  # the standard normal's, by its tanh approximation (as the reference code)
        return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z ** 3)))

    centred = x - mean
    inv_std = (-log_scale).exp()
    cdf_plus = cdf(inv_std * (centred + 1.0 / 255.0))
    cdf_min = cdf(inv_std * (centred - 1.0 / 255.0))
    log_cdf_plus = cdf_plus.clamp(min=1e-12).log()
    log_one_minus_cdf_min = (1.0 - cdf_min).clamp(min=1e-12).log()
    log_probs = torch.where(x < -0.999, log_cdf_plus, torch.where(
        x > 0.999, log_one_minus_cdf_min, (cdf_plus - cdf_min).clamp(min=1e-12).log()))
    return log_probs


SAMPLE_BATCH = 500  # samples denoised together (per process, at most: a shard takes its part of each batch)


def shard_bounds(n: int, rank: int, world: int, batch_size: int = SAMPLE_BATCH) -> list[tuple[int, int]]:
    """The sample indices ``[lo, hi)`` that process ``rank`` of ``world`` denoises of each batch of ``n``
    samples: an even, contiguous share of every ``batch_size`` batch (possibly empty)."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not one of {world} processes")
    out = []
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        out.append((start + b * rank // world, start + b * (rank + 1) // world))
    return out


def shard_indices(n: int, rank: int, world: int, batch_size: int = SAMPLE_BATCH) -> torch.Tensor:
    """The indices, in order, of the samples process ``rank`` returns from :func:`sample` with ``shard``."""
    return torch.cat([torch.arange(lo, hi) for lo, hi in shard_bounds(n, rank, world, batch_size)]
                     or [torch.empty(0, dtype=torch.long)])


@torch.no_grad()
def sample(model: DiffusionBackbone, conditions: torch.Tensor, steps: int = 50, cfg_scale: float = 1.5,
           resolution: int | None = None, seed: int = 0, batch_size: int = SAMPLE_BATCH, progress=None,
           eta: float = 1.0, shard: tuple[int, int] | None = None) -> torch.Tensor:
    """DDIM samples for ``conditions`` (class labels or token ids; floats in [-1, 1]) with classifier-free
    guidance ``cfg_scale``.

    ``eta`` = 0 is deterministic DDIM; 1 (the default) adds the ancestral noise of DDPM at each of the
    ``steps``. The small models autoprog trains on a CPU sample markedly better with η = 1: measured on the
    default base DiT, η = 0 left grey noise where η = 1 gave recognisable garments.

    ``shard`` = ``(rank, world)``: this process denoises only its share of each batch (:func:`shard_bounds`)
    and returns those samples (:func:`shard_indices`). Every process draws the whole batch's noise from the
    one seeded stream and keeps its part, so the samples are those of one process, whatever the number of
    processes (up to the float rounding of a smaller batch).
    """
    sched = sampling_scheduler(getattr(model, "noise_config", None))
    check_sample_steps(steps, sched)
    sched.set_timesteps(steps)
    dev = next(model.parameters()).device
    res = resolution or model.image_size
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    on_device = to_device(sched.timesteps, dev)  # once, not a blocking copy at every denoising step
    out = []
    try:
        n = len(conditions)
        for start, (first, end) in zip(range(0, n, batch_size), shard_bounds(n, *(shard or (0, 1)), batch_size)):
            b, lo, hi = min(batch_size, n - start), first - start, end - start  # this process's share of the batch
            y = conditions[first:end].to(dev)
            x = torch.randn((b, model.in_chans, res, res), generator=gen)[lo:hi].to(dev)
            # the conditions of every step, made once: a text model encodes them once (its prompt cache reads the
            # ids back to the host), not at each step
            cond = (y if cfg_scale == 1.0 else torch.cat([y, model.null_condition(y)])) if hi > lo else None
            for t, t_dev in zip(sched.timesteps, on_device):
                eps = _guided_eps(model, x, t_dev, cond, cfg_scale) if hi > lo else x
                # the step's ancestral noise for the whole batch, as diffusers would draw it, then this share's
                noise = torch.randn((b, *eps.shape[1:]), generator=gen, dtype=eps.dtype)[lo:hi] if eta > 0 else None
                if hi > lo:
                    noise = to_device(noise, dev) if noise is not None else None
                    x = sched.step(eps, t, x, eta=eta, variance_noise=noise).prev_sample
            out.append(x.clamp(-1, 1).cpu())
            if progress is not None:
                progress(len(y))
    finally:
        model.train(was_training)
        if hasattr(model, "forget_encodings"):  # a text model's encodings of this call's prompts
            model.forget_encodings()
    return torch.cat(out) if out else torch.empty(0, model.in_chans, res, res)


def _guided_eps(model, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    """ε with classifier-free guidance; ``cond``: the conditions, followed by the null ones unless ``cfg_scale``
    is 1."""
    if cfg_scale == 1.0:
        return model(x, t, cond)
    c, uncond = model(torch.cat([x, x]), t, cond).chunk(2)
    return uncond + cfg_scale * (c - uncond)


def sampling_scheduler(config: dict | None = None):
    """DDIM on the training schedule's β (``config`` as in :func:`training_scheduler`); what sampling and an
    exported pipeline use."""
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(training_scheduler(config).config)


def check_sample_steps(steps: int, scheduler) -> None:
    """DDIM takes at most as many steps as the noise schedule has; more is a one-line error."""
    from ..errors import ConfigError

    most = scheduler.config.num_train_timesteps
    if not 1 <= steps <= most:
        raise ConfigError(f"--sample-steps {steps}: the model's noise schedule has {most} steps; sample with 1 to "
                          f"{most}")


def balanced_labels(classes: tuple[int, ...], n: int) -> torch.Tensor:
    """``n`` labels cycling through ``classes`` (equal numbers per class when ``n`` divides evenly)."""
    return torch.tensor([classes[i % len(classes)] for i in range(n)], dtype=torch.long)

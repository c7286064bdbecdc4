"""Noise schedules and the forward process: ``orthodiff_nnunet.diffusion`` vs MONAI's ``DDPMScheduler``, one run.

Measures, for the cosine (the pretraining default) and the linear schedule of T steps, on the CPU:

* construction time of the schedule (``make_schedule`` vs ``DDPMScheduler(...)``), median of many;
* the forward process ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` on a batch of patches
  (``q_sample`` vs ``add_noise``) and the v-target (``training_target(..., "v")`` vs ``get_velocity``),
  alternating the two, median per call, and the ratio MONAI / ours;
* the largest absolute differences of ``alphas_cumprod``, of the coefficients and of x_t, v;
* what MONAI does with a half-precision input (it casts its stored ``alphas_cumprod`` to it);
* the lines of code each option needs: the schedule and forward-process part of the pure module
  (``make_schedule`` with its beta functions and ``NoiseSchedule``, ``q_sample``, ``training_target``), and
  the smallest MONAI-based replacement that keeps the module's API (:data:`MONAI_VARIANT`, below).
  ``predict_x0``, ``predict_eps``, ``min_snr_weights``, ``diffusion_loss`` and DDIM sampling have no MONAI
  counterpart of that form and stay either way.

Usage (from the repository root)::

    OMP_NUM_THREADS=1 python -m bench.bench_noise_schedule

Shape of every bench script: :func:`parse_args`, :func:`run` (the measurement), :func:`record` (prints the
section: machine, command, date, tables, and appends it to ``--out``), :func:`main`.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import statistics
import textwrap
import time
from pathlib import Path

from bench import common

RESULT_FILE = Path(__file__).resolve().parent / "results" / "noise_schedule.md"

#: The smallest MONAI-based schedule module with the pure module's API (counted, and checked to run).
MONAI_VARIANT = '''
from dataclasses import dataclass
import torch
from monai.networks.schedulers import DDPMScheduler

@dataclass(frozen=True)
class NoiseSchedule:
    name: str
    scheduler: DDPMScheduler
    @property
    def num_steps(self):
        return self.scheduler.num_train_timesteps
    @property
    def alphas_cumprod(self):
        return self.scheduler.alphas_cumprod
    @property
    def sqrt_alphas_cumprod(self):
        return self.alphas_cumprod.sqrt()
    @property
    def sqrt_one_minus_alphas_cumprod(self):
        return (1 - self.alphas_cumprod).sqrt()
    @property
    def snr(self):
        return self.alphas_cumprod / (1 - self.alphas_cumprod)
    def to_dict(self):
        return {"name": self.name, "num_steps": self.num_steps}

def make_schedule(name="cosine", num_steps=1000):
    if num_steps < 2:
        raise ValueError(f"num_steps must be >= 2, got {num_steps}")
    if name == "cosine":
        return NoiseSchedule(name, DDPMScheduler(num_steps, schedule="cosine"))
    if name == "linear":
        scale = 1000.0 / num_steps
        return NoiseSchedule(name, DDPMScheduler(num_steps, schedule="linear_beta", beta_start=scale * 1e-4,
                                                 beta_end=scale * 0.02))
    raise ValueError(f"unknown schedule {name!r}: use 'cosine' or 'linear'")

def q_sample(schedule, x0, t, noise):
    acp = schedule.scheduler.alphas_cumprod
    try:
        return schedule.scheduler.add_noise(x0, noise, t)
    finally:
        schedule.scheduler.alphas_cumprod = acp  # add_noise casts the stored schedule to x0's dtype

def training_target(schedule, x0, t, noise, prediction="epsilon"):
    if prediction == "epsilon":
        return noise
    if prediction == "v":
        acp = schedule.scheduler.alphas_cumprod
        try:
            return schedule.scheduler.get_velocity(x0, noise, t)
        finally:
            schedule.scheduler.alphas_cumprod = acp
    raise ValueError(f"unknown prediction type {prediction!r}: use 'epsilon' or 'v'")
'''


def code_lines(source: str) -> int:
    """Lines of code: not blank, not a comment, not a docstring."""
    tree = ast.parse(textwrap.dedent(source))
    doc = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and \
                isinstance(getattr(body[0], "value", None), ast.Constant) and isinstance(body[0].value.value, str):
            doc.update(range(body[0].lineno, body[0].end_lineno + 1))
    lines = textwrap.dedent(source).splitlines()
    return sum(1 for i, line in enumerate(lines, 1)
               if line.strip() and not line.strip().startswith("#") and i not in doc)


def ours_lines() -> int:
    from orthodiff_nnunet.diffusion import process, schedules

    # process._gather stays either way (predict_x0, predict_eps use it)
    parts = [schedules.cosine_betas, schedules.linear_betas, schedules.NoiseSchedule, schedules.make_schedule,
             process.q_sample, process.training_target]
    return sum(code_lines(inspect.getsource(p)) for p in parts)


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def compare(name: str, steps: int, shape: tuple[int, ...], repeats: int) -> dict:
    """Differences and timings of one schedule."""
    import torch
    from monai.networks.schedulers import DDPMScheduler

    from orthodiff_nnunet.diffusion import make_schedule, q_sample, training_target

    monai_kwargs = {"schedule": "cosine"} if name == "cosine" else \
        {"schedule": "linear_beta", "beta_start": 1e-4 * 1000 / steps, "beta_end": 0.02 * 1000 / steps}
    ours, theirs = make_schedule(name, steps), DDPMScheduler(steps, **monai_kwargs)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(shape, generator=g)
    noise = torch.randn(shape, generator=g)
    t = torch.randint(0, steps, (shape[0],), generator=g)
    all_t = torch.arange(steps)
    acp_o, acp_m = ours.alphas_cumprod.double(), theirs.alphas_cumprod.double()
    out = {
        "alphas_cumprod": (acp_o - acp_m).abs().max().item(),
        "sqrt_alphas_cumprod": (ours.sqrt_alphas_cumprod.double() - acp_m.sqrt()).abs().max().item(),
        "sqrt_one_minus": (ours.sqrt_one_minus_alphas_cumprod.double() - (1 - acp_m).sqrt()).abs().max().item(),
        # float64 reference: how far each float32 sqrt(1 - abar_0) is from the exact value, relative
        "rel t=0": tuple(abs(v / exact - 1) for exact in [float((1 - _acp64(name, steps)[0]) ** 0.5)]
                         for v in (float(ours.sqrt_one_minus_alphas_cumprod[0]),
                                   float((1 - theirs.alphas_cumprod[0]) ** 0.5))),
    }
    # x_t and v at every timestep for one unit-variance sample, and at random ones for the batch
    one = x0[:1].flatten(2)[..., :4096].expand(steps, -1, -1)  # 4096 voxels of one sample, at every t
    eps1 = noise[:1].flatten(2)[..., :4096].expand(steps, -1, -1)
    out["x_t every t"] = (q_sample(ours, one, all_t, eps1) - theirs.add_noise(one, eps1, all_t)).abs().max().item()
    out["v every t"] = (training_target(ours, one, all_t, eps1, "v") - theirs.get_velocity(one, eps1, all_t)).abs().max().item()
    # timings, alternating
    build_o = median_seconds(lambda: make_schedule(name, steps), repeats * 20)
    build_m = median_seconds(lambda: DDPMScheduler(steps, **monai_kwargs), repeats * 20)
    qo, qm, vo, vm = [], [], [], []
    for _ in range(repeats):
        qo.append(median_seconds(lambda: q_sample(ours, x0, t, noise), 1))
        qm.append(median_seconds(lambda: theirs.add_noise(x0, noise, t), 1))
        vo.append(median_seconds(lambda: training_target(ours, x0, t, noise, "v"), 1))
        vm.append(median_seconds(lambda: theirs.get_velocity(x0, noise, t), 1))
    out.update(build=(build_o, build_m), q=(statistics.median(qo), statistics.median(qm)),
               v=(statistics.median(vo), statistics.median(vm)))
    # half precision: what each leaves in its stored schedule
    theirs.add_noise(x0[:1].half(), noise[:1].half(), t[:1])
    q_sample(ours, x0[:1].half(), t[:1], noise[:1].half())
    out["stored dtype after a float16 call"] = (str(ours.alphas_cumprod.dtype).replace("torch.", ""),
                                                str(theirs.alphas_cumprod.dtype).replace("torch.", ""))
    return out


def _acp64(name: str, steps: int):
    """abar_t in float64 from the pure module's float64 betas (the reference)."""
    import numpy as np

    from orthodiff_nnunet.diffusion.schedules import cosine_betas, linear_betas

    return np.cumprod(1.0 - (cosine_betas(steps) if name == "cosine" else linear_betas(steps)))


def monai_variant_runs(steps: int) -> float:
    """Execute :data:`MONAI_VARIANT` and return its largest x_t difference to the pure module (cosine)."""
    import torch

    from orthodiff_nnunet.diffusion import make_schedule, q_sample

    ns: dict = {}
    exec(compile(MONAI_VARIANT, "monai_variant", "exec"), ns)
    x0, noise = torch.randn(4, 1, 8, 8, 8), torch.randn(4, 1, 8, 8, 8)
    t = torch.tensor([0, 10, steps // 2, steps - 1])
    sched = ns["make_schedule"]("cosine", steps)
    ns["q_sample"](sched, x0.half(), t, noise.half())
    assert sched.alphas_cumprod.dtype == torch.float32  # the guard works
    return (ns["q_sample"](sched, x0, t, noise) - q_sample(make_schedule("cosine", steps), x0, t, noise)).abs().max().item()


def report(args, results: dict, variant_diff: float) -> str:
    """The Markdown section of one run."""
    fmt_ms = lambda s: f"{1000 * s:.3f} ms"  # noqa: E731
    rows = []
    for name, r in results.items():
        for what, key in (("schedule construction", "build"), ("q_sample / add_noise", "q"),
                          ("v target / get_velocity", "v")):
            o, m = r[key]
            rows.append([name, what, fmt_ms(o), fmt_ms(m), f"{m / o:.2f}"])
    diffs = [[name, f"{r['alphas_cumprod']:.2e}", f"{r['sqrt_alphas_cumprod']:.2e}", f"{r['sqrt_one_minus']:.2e}",
              f"{r['rel t=0'][0]:.1e} / {r['rel t=0'][1]:.1e}",
              f"{r['x_t every t']:.2e}", f"{r['v every t']:.2e}", " / ".join(r["stored dtype after a float16 call"])]
             for name, r in results.items()]
    ours_n, monai_n = ours_lines(), code_lines(MONAI_VARIANT)
    return "\n".join([
        f"## Run of {common.now()}",
        "",
        f"- machine: {common.machine()}; MONAI {_version('monai')}; load average at the end {common.load_average()}",
        f"- command: `{common.command_line()}`",
        f"- T = {args.steps}; batch {tuple(args.shape)} float32; {args.repeats} alternating repeats (median)",
        "",
        "Time per call (CPU), ours = `orthodiff_nnunet.diffusion`, MONAI = `DDPMScheduler`:",
        "",
        common.markdown_table(["schedule", "operation", "ours", "MONAI", "MONAI / ours"], rows),
        "",
        "Largest absolute difference, ours - MONAI (ours: float64 maths stored in float32; MONAI: float32 maths), "
        "x_t and v for 4096 voxels of one unit-Gaussian sample at every t; the relative error of sqrt(1 - abar_0) "
        "(the noise level of the first step) is against the float64 value; last column: the stored `alphas_cumprod` dtype after "
        "one float16 call (ours / MONAI):",
        "",
        common.markdown_table(["schedule", "alphas_cumprod", "sqrt(abar)", "sqrt(1-abar)",
                                          "sqrt(1-abar_0) relative error, ours / MONAI", "x_t", "v", "stored dtype"],
                              diffs),
        "",
        f"Lines of code (no blanks, comments, docstrings): the pure module's schedule and forward-process part "
        f"{ours_n}; the smallest MONAI-based replacement with the same API {monai_n} (it runs: max |x_t| difference "
        f"to ours {variant_diff:.2e}); saved {ours_n - monai_n}.",
    ])


def _version(pkg: str) -> str:
    from importlib.metadata import version

    return version(pkg)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1000, help="T, the number of diffusion steps")
    p.add_argument("--shape", type=int, nargs="+", default=[2, 1, 32, 64, 64], help="batch shape (B, C, *spatial)")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--out", type=Path, default=RESULT_FILE, help="Markdown file to append the section to")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    """Both schedules compared, and the MONAI-based variant's difference to the pure module."""
    results = {name: compare(name, args.steps, tuple(args.shape), args.repeats) for name in ("cosine", "linear")}
    return {"schedules": results, "variant_diff": monai_variant_runs(args.steps)}


def record(result: dict, args: argparse.Namespace) -> str:
    """Print the section and append it to ``args.out``."""
    text = report(args, result["schedules"], result["variant_diff"])
    print(text)
    common.append_markdown(args.out, text, title="# Noise schedules: the pure module vs MONAI's DDPMScheduler")
    return text


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    record(run(args), args)


if __name__ == "__main__":
    main()

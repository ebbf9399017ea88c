"""Learned weight rounding (AdaRound, Nagel et al. 2020) per convolution, on unlabelled calibration images.

Rounding each weight to the nearest INT8 step is not what keeps a convolution's output closest to FP32's: the
errors of neighbouring weights add up over the input they multiply. AdaRound learns, per weight, whether to round
down or up (a soft rounding variable annealed to 0/1) so that the convolution's output on the calibration images
is closest to the FP32 model's output (`||conv(x_int8, W~) - y_fp32||^2`), where x_int8 is the input that reaches
the convolution in the INT8 graph with everything upstream already refined: the rounding also compensates part
of the upstream quantization error. Weight scales and the graph stay ModelOpt's; only the FP32 weight
initializers change, to values the weight QuantizeLinear rounds to exactly the learned INT8 values
(W' = q * scale), so TensorRT sees the same graph and gets the learned INT8 weights.

Runs after the activation scales are final (the learned rounding adapts to the quantized inputs they give), in
one pass over the graph in torch (torch_graph.py): each convolution's input is what reaches it with every upstream
convolution already rounded. On a GPU when there is one (yolov8n, 64 images, 1,500 steps per convolution: 167 s on
one H200); on a 2-core CPU it takes far longer, hence opt-in (`yqpack build --adaround`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from packager.core.contracts import QuantizationError
from packager.quantize.qdq_sites import INT8_MAX, INT8_MIN, conv_sites, read, write

ZETA, GAMMA = 1.1, -0.1  # rectified sigmoid stretch (the paper's values)


@dataclass
class AdaRoundOptions:
    iterations: int = 1500
    batch_images: int = 8  # images per optimisation step
    learning_rate: float = 1e-2
    regularization: float = 0.01  # weight of the push towards 0/1
    beta: tuple[float, float] = (20.0, 2.0)  # annealed exponent of the regulariser
    warmup: float = 0.2  # share of iterations without the regulariser
    device: str = "auto"  # auto: the first CUDA GPU when torch sees one, else the CPU


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise QuantizationError(f"--adaround-device {device}: torch sees no CUDA GPU here")
    return device


@dataclass
class AdaRoundRecord:
    convolutions: int = 0
    images: int = 0
    iterations: int = 0
    device: str = "cpu"
    seconds: float = 0.0
    layers: dict = field(default_factory=dict)  # conv -> {"mse_nearest", "mse_learned", "flipped"}

    def as_dict(self) -> dict:
        ratios = [v["mse_learned"] / v["mse_nearest"] for v in self.layers.values() if v["mse_nearest"] > 0]
        return {"convolutions": self.convolutions, "images": self.images, "iterations": self.iterations,
                "device": self.device, "seconds": self.seconds,
                "median_output_mse_vs_nearest": round(float(np.median(ratios)), 4) if ratios else None,
                "per_layer": {k: {n: round(x, 6) for n, x in v.items()} for k, v in self.layers.items()}}


def learn_rounding(quantized, fp32, images: np.ndarray, options: AdaRoundOptions | None = None,
                   show_progress: bool = True, chunk: int = 16) -> AdaRoundRecord:
    """Learn the INT8 rounding of every quantized convolution of `quantized` (in place), in graph order."""
    import torch

    options = options or AdaRoundOptions()
    device = resolve_device(options.device)
    # TF32 convolutions (torch's default on Ampere and later) would blur the FP32 targets by ~1e-3.
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        return _learn_all(quantized, fp32, images, options, device, show_progress, chunk)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32


def _learn_all(quantized, fp32, images, options: AdaRoundOptions, device: str, show_progress: bool,
               chunk: int) -> AdaRoundRecord:
    from rich.progress import Progress

    from packager.quantize.torch_graph import TorchGraph

    started = time.perf_counter()
    sites = {s.conv: s for s in conv_sites(quantized) if s.quantized}
    record = AdaRoundRecord(len(sites), len(images), options.iterations, device)
    options = AdaRoundOptions(**{**options.__dict__, "device": device})
    targets = _fp32_outputs(fp32, [s.output for s in sites.values()], images, options.device, chunk)
    graph = TorchGraph(quantized, options.device)
    with Progress(disable=not show_progress, transient=True) as progress:
        task = progress.add_task("AdaRound (learned INT8 rounding per convolution)", total=len(sites))

        def pre_hook(node, args):
            if node.op_type == "Conv" and node.name in sites:
                site = sites[node.name]
                weight, stats = _learn_one(quantized, site, args[0], args[2] if len(args) > 2 else None,
                                           targets.pop(site.output), node, options)
                record.layers[node.name] = stats
                args = [args[0], weight, *args[2:]]
                progress.advance(task)
            return args

        last = max((s.output for s in sites.values()), key=lambda n: graph.producer[n])
        graph.run({quantized.graph.input[0].name: images}, [last], pre_hook=pre_hook)
    record.seconds = round(time.perf_counter() - started, 1)
    return record


def _fp32_outputs(fp32, names: list[str], images: np.ndarray, device: str, chunk: int) -> dict:
    """FP32 outputs of the named tensors for all images, on `device` (the reconstruction targets)."""
    import torch

    from packager.quantize.torch_graph import TorchGraph

    graph = TorchGraph(fp32, device)
    parts: dict[str, list] = {name: [] for name in names}
    for start in range(0, len(images), chunk):
        values = graph.run({fp32.graph.input[0].name: images[start:start + chunk]}, names)
        for name in names:
            parts[name].append(values[name])
    return {name: torch.cat(parts[name]) for name in names}


def _learn_one(quantized, site, x, bias, target, node, options: AdaRoundOptions):
    """The learned INT8 weight of one convolution, written into `quantized`; returns (dequantized weight, stats)."""
    import torch
    import torch.nn.functional as F

    from packager.quantize.torch_graph import _attributes

    attrs = _attributes(node)
    pads = attrs.get("pads", [0, 0, 0, 0])
    if pads[:2] != pads[2:]:
        x = F.pad(x, [pads[1], pads[3], pads[0], pads[2]])
        pads = [0, 0, 0, 0]
    conv = dict(stride=attrs.get("strides", 1), padding=pads[:2], dilation=attrs.get("dilations", 1),
                groups=attrs.get("group", 1))
    device = x.device
    weight = torch.from_numpy(read(quantized, site.weight).astype(np.float32)).to(device)
    scale = torch.from_numpy(read(quantized, site.weight_scale).astype(np.float32)).to(device)
    scale = scale.reshape(-1, *([1] * (weight.dim() - 1)))
    floor = torch.floor(weight / scale)
    rest = (weight / scale - floor).clamp(1e-4, 1 - 1e-4)
    v = (-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1)).requires_grad_(True)

    def soft():
        return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def dequantized(h):
        return torch.clamp(floor + h, INT8_MIN, INT8_MAX) * scale

    def error(w, index):
        return ((F.conv2d(x[index], w, bias, **conv) - target[index]) ** 2).sum(1).mean()

    generator = torch.Generator(device="cpu").manual_seed(0)
    warmup = int(options.warmup * options.iterations)
    with torch.enable_grad():  # the graph pass around this runs under no_grad
        _optimize(v, soft, dequantized, error, generator, warmup, len(x), device, options)
    with torch.no_grad():
        hard = (soft() >= 0.5).float()
        learned = torch.clamp(floor + hard, INT8_MIN, INT8_MAX)
        nearest = torch.clamp(torch.round(weight / scale), INT8_MIN, INT8_MAX)
        index = torch.arange(min(len(x), 16), device=device)
        stats = {"mse_nearest": float(error(nearest * scale, index)),
                 "mse_learned": float(error(learned * scale, index)),
                 "flipped": float((learned != nearest).float().mean())}
        stored = read(quantized, site.weight)
        if stored.dtype == np.int8:  # dq_only: the INT8 weight itself is the initializer
            write(quantized, site.weight, learned.cpu().numpy().astype(np.int8))
        else:  # QuantizeLinear(learned * scale) rounds back to exactly `learned`
            write(quantized, site.weight, (learned * scale).cpu().numpy().astype(np.float32))
    return learned * scale, stats


def _optimize(v, soft, dequantized, error, generator, warmup: int, images: int, device,
              options: AdaRoundOptions) -> None:
    """Adam on the rounding variables (written out: torch.optim's first step imports torch._dynamo, ~8 s)."""
    import torch

    first, second = torch.zeros_like(v), torch.zeros_like(v)
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    for step in range(options.iterations):
        index = torch.randperm(images, generator=generator)[:options.batch_images].to(device)
        h = soft()
        loss = error(dequantized(h), index)
        if step >= warmup:
            progress = (step - warmup) / max(options.iterations - warmup, 1)
            beta = options.beta[1] + 0.5 * (options.beta[0] - options.beta[1]) * (1 + math.cos(math.pi * progress))
            loss = loss + options.regularization * (1 - (2 * h - 1).abs().pow(beta)).sum()
        (gradient,) = torch.autograd.grad(loss, v)
        with torch.no_grad():
            first.mul_(beta1).add_(gradient, alpha=1 - beta1)
            second.mul_(beta2).addcmul_(gradient, gradient, value=1 - beta2)
            corrected = (second / (1 - beta2 ** (step + 1))).sqrt_().add_(eps)
            v.addcdiv_(first, corrected, value=-options.learning_rate / (1 - beta1 ** (step + 1)))

"""The ``fastperc`` command (also ``python -m fastperc``).

    fastperc train     --style IMAGE --dataset DIR --out RUN_DIR [...]   train a style network
    fastperc stylize   --model MODEL INPUT... --out OUT [...]             apply one
    fastperc optimize  --content IMAGE --style IMAGE --out OUT [...]      the Gatys et al. baseline
    fastperc objective --content IMAGE --style IMAGE IMAGE [...]          equation 5 of any image
    fastperc upscale   --model MODEL INPUT... --out OUT [--match-histogram]  super-resolution
    fastperc sr-eval   --model MODEL|bicubic --hr-dir DIR --scale 4|8      mean PSNR/SSIM (Y channel)
    fastperc sr-train  --scale 4|8 --dataset DIR --out RUN_DIR [--loss perceptual|pixel]  train one
    fastperc bench     [--quick] [--device cpu|cuda] [--out JSON]          the benchmarks (fastperc.bench)

Bad input (a missing or unreadable file, an empty dataset, a model or weights file that does
not fit, an output that cannot be written) ends with one line on stderr naming the problem and
the path, and exit code 2.
"""
from __future__ import annotations

import argparse
import json
import sys

from fastperc.commands.images import InputError


def _loss_options(p: argparse.ArgumentParser, defaults: bool = True) -> None:
    """The equation-5 loss settings, shared by train, optimize and objective."""
    d = (lambda v: v) if defaults else (lambda v: None)
    p.add_argument("--preset", choices=["johnson2016", "pytorch-examples"], default=d("johnson2016"),
                   help="loss definition and default weights (default johnson2016: the paper's)")
    p.add_argument("--content-weight", type=float, help="lambda_c (default: the preset's)")
    p.add_argument("--style-weight", type=float, help="lambda_s (default: the preset's)")
    p.add_argument("--tv-weight", type=float, help="lambda_TV (default: the preset's)")
    p.add_argument("--vgg-weights", default=d("imagenet"), metavar="imagenet|random|PATH",
                   help="VGG-16 loss network weights: torchvision's ImageNet checkpoint (downloaded once "
                        "to the torch hub cache), random (tests only) or a local torchvision VGG-16 "
                        "checkpoint (default imagenet)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when present)")


def _equation5_options(p: argparse.ArgumentParser) -> None:
    """The inputs and settings of the equation-5 objective: optimize and objective."""
    p.add_argument("--content", required=True, metavar="IMAGE", help="the content image")
    p.add_argument("--style", required=True, metavar="IMAGE", help="the style image")
    p.add_argument("--style-size", type=int, default=256,
                   help="longer side of the style image; use the training run's (default 256)")
    _loss_options(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastperc", description="Perceptual-loss style transfer (Johnson et al. 2016) with fused kernels.")
    from fastperc import __version__

    parser.add_argument("--version", action="version", version=f"fastperc {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    # Train options default to None so that --resume can tell the given ones from the run's.
    t = sub.add_parser("train", help="train a style transfer network",
                       description="Train a TransformerNet on every image under --dataset to the style of "
                                   "--style. Writes RUN_DIR/checkpoint.pt, log.jsonl, loss.png and model.pth.")
    t.add_argument("--style", metavar="IMAGE", help="the style image")
    t.add_argument("--dataset", metavar="DIR", help="folder of content images (searched recursively)")
    t.add_argument("--out", metavar="RUN_DIR", required=True, help="the run directory")
    steps = t.add_mutually_exclusive_group()
    steps.add_argument("--iterations", type=int, metavar="N",
                       help="total optimizer steps (default 40000, the paper's)")
    steps.add_argument("--epochs", type=int, metavar="N", help="train for N passes over the dataset instead")
    t.add_argument("--batch-size", type=int, help="images per step and process (default 4)")
    t.add_argument("--image-size", type=int, help="training images are resized and centre-cropped to this "
                                                  "(default 256)")
    t.add_argument("--lr", type=float, help="Adam learning rate (default 1e-3)")
    _loss_options(t, defaults=False)
    t.add_argument("--style-size", type=int, help="longer side of the style image (default: --image-size)")
    t.add_argument("--checkpoint-every", type=int, metavar="N", help="save the checkpoint every N steps "
                                                                     "(default 1000)")
    t.add_argument("--log-every", type=int, metavar="N", help="log every N steps (default 10)")
    t.add_argument("--resume", action="store_true", help="continue the run in RUN_DIR (to --iterations)")
    t.add_argument("--amp", choices=["off", "bf16", "fp16"], help="mixed precision (default off)")
    t.add_argument("--channels-last", action="store_const", const=True, help="channels_last memory format")
    t.add_argument("--compile", action="store_const", const=True, help="torch.compile the network")
    t.add_argument("--seed", type=int, help="seed of the initial weights and the data order (default 0)")
    t.add_argument("--workers", type=int, help="data loading processes (default min(4, CPUs))")
    t.set_defaults(func=_train)

    s = sub.add_parser("stylize", help="apply a trained network to images, folders or videos",
                       description="Stylise images, folders (recursively) and videos with a trained model. "
                                   "Outputs have the size of their inputs.")
    s.add_argument("--model", required=True, help="model.pth, checkpoint.pt or a pytorch/examples model")
    s.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, video files or folders")
    s.add_argument("--out", required=True, metavar="OUT",
                   help="output image (or video) for one input file, else an output folder")
    s.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when present)")
    s.add_argument("--amp", choices=["off", "bf16", "fp16"], default="off", help="mixed precision (default off)")
    s.add_argument("--batch-size", type=int, default=4, help="images or frames per forward pass (default 4)")
    s.add_argument("--scale", type=float, default=1.0,
                   help="run the network on the input resized by this factor, then resize back (default 1)")
    s.set_defaults(func=_stylize)

    o = sub.add_parser("optimize", help="the optimisation baseline (Gatys et al.): L-BFGS on the image",
                       description="Minimise the paper's equation 5 over the image with L-BFGS from white "
                                   "noise, clipping to [0, 255] each iteration; writes the image and the "
                                   "objective per iteration as JSON.")
    _equation5_options(o)
    o.add_argument("--out", required=True, metavar="OUT", help="output image")
    o.add_argument("--iterations", type=int, default=500, help="L-BFGS iterations (default 500, the paper's)")
    o.add_argument("--json", metavar="PATH", help="objective per iteration (default: OUT with .json)")
    o.add_argument("--seed", type=int, default=0, help="seed of the white-noise start (default 0)")
    o.set_defaults(func=_optimize)

    b = sub.add_parser("objective", help="print the equation-5 objective of an image",
                       description="Print, as JSON, the paper's equation-5 objective (and its parts) of IMAGE "
                                   "for the content and style images: compare a network's output with the "
                                   "optimisation baseline's log.")
    _equation5_options(b)
    b.add_argument("image", metavar="IMAGE", help="the image to score (same size as the content image)")
    b.set_defaults(func=_objective)

    u = sub.add_parser("upscale", help="super-resolve images with a trained SuperResolutionNet",
                       description="Upscale images and folders (recursively) by the model's factor (x4 or x8).")
    u.add_argument("--model", required=True, help="a SuperResolutionNet state dict or training checkpoint")
    u.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders")
    u.add_argument("--out", required=True, metavar="OUT", help="output image for one input file, else a folder")
    u.add_argument("--match-histogram", action="store_true",
                   help="match each output's colour histogram to its input's")
    u.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when present)")
    u.set_defaults(func=_upscale)

    e = sub.add_parser("sr-eval", help="mean PSNR and SSIM of a super-resolution model (or bicubic)",
                       description="Degrade every image under --hr-dir as the paper does (Gaussian blur sigma 1, "
                                   "bicubic downsampling), upscale it, and report mean PSNR and SSIM on the Y "
                                   "channel with a border of --scale pixels removed.")
    e.add_argument("--model", required=True, metavar="MODEL|bicubic",
                   help="a SuperResolutionNet file, or bicubic for the bicubic-interpolation baseline")
    e.add_argument("--hr-dir", required=True, metavar="DIR", help="folder of high-resolution images")
    e.add_argument("--scale", type=int, default=4, help="4 or 8 (default 4)")
    e.add_argument("--out", metavar="JSON", help="also write the results as JSON")
    e.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when present)")
    e.set_defaults(func=_sr_eval)

    st = sub.add_parser("sr-train", help="train a super-resolution network (x4 or x8)",
                        description="Train a SuperResolutionNet on the images under --dataset, degraded as the "
                                    "paper does (Gaussian blur sigma 1, bicubic downsampling). Writes "
                                    "RUN_DIR/checkpoint.pt, log.jsonl, loss.png and model.pth.")
    st.add_argument("--scale", type=int, help="4 or 8")
    st.add_argument("--dataset", metavar="DIR", help="folder of high-resolution images (searched recursively)")
    st.add_argument("--out", metavar="RUN_DIR", required=True, help="the run directory")
    st.add_argument("--loss", help="perceptual (relu2_2 feature loss, the paper's; default) or pixel")
    st.add_argument("--iterations", type=int, metavar="N", help="optimizer steps (default 200000, the paper's)")
    st.add_argument("--batch-size", type=int, help="images per step (default 4)")
    st.add_argument("--image-size", type=int, help="high-resolution crop size, a multiple of the scale "
                                                   "(default 288)")
    st.add_argument("--lr", type=float, help="Adam learning rate (default 1e-3)")
    st.add_argument("--content-weight", type=float, help="weight of the perceptual or pixel term (default 1)")
    st.add_argument("--tv-weight", type=float, help="weight of the TV term (default 0)")
    st.add_argument("--vgg-weights", metavar="imagenet|random|PATH",
                    help="VGG-16 weights of the perceptual loss (default imagenet)")
    st.add_argument("--checkpoint-every", type=int, metavar="N", help="save the checkpoint every N steps (1000)")
    st.add_argument("--log-every", type=int, metavar="N", help="log every N steps (default 10)")
    st.add_argument("--resume", action="store_true", help="continue the run in RUN_DIR (to --iterations)")
    st.add_argument("--seed", type=int, help="seed of the initial weights and the data order (default 0)")
    st.add_argument("--workers", type=int, help="data loading processes (default min(4, CPUs))")
    st.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when present)")
    st.set_defaults(func=_sr_train)

    from fastperc.bench import runner as bench

    r = sub.add_parser("bench", help="time the fused ops and networks against eager torch and torch.compile",
                       description="Run every benchmark comparison, print one table and, with --out, "
                                   "write the results JSON.")
    bench.add_arguments(r)
    r.set_defaults(func=bench.main)
    return parser


def _loss_kwargs(args: argparse.Namespace) -> dict:
    return {"preset": args.preset, "content_weight": args.content_weight, "style_weight": args.style_weight,
            "tv_weight": args.tv_weight, "vgg_weights": args.vgg_weights}


def _train(args: argparse.Namespace) -> int:
    from fastperc.commands.train import FIELDS, train

    options = {k: v for k, v in vars(args).items() if k in FIELDS}
    return train(options, resume=args.resume)


def _stylize(args: argparse.Namespace) -> int:
    from fastperc.commands.stylize import stylize

    return stylize(args.model, args.inputs, args.out, device=args.device, amp=args.amp,
                   batch_size=args.batch_size, scale=args.scale)


def _optimize(args: argparse.Namespace) -> int:
    from fastperc.commands.optimize import optimize

    record = optimize(args.content, args.style, args.out, iterations=args.iterations, json_path=args.json,
                      style_size=args.style_size, seed=args.seed, device=args.device, **_loss_kwargs(args))
    print(f"objective after {record['iterations']} iterations: {record['history'][-1]['objective']:.6g} "
          f"(image {record['image']}, per-iteration log {record['log']})")
    return 0


def _objective(args: argparse.Namespace) -> int:
    from fastperc.commands.optimize import objective

    values = objective(args.content, args.style, args.image, style_size=args.style_size, device=args.device,
                       **_loss_kwargs(args))
    print(json.dumps({"image": args.image, **values}))
    return 0


def _upscale(args: argparse.Namespace) -> int:
    from fastperc.commands.upscale import upscale

    return upscale(args.model, args.inputs, args.out, match_hist=args.match_histogram, device=args.device)


def _sr_eval(args: argparse.Namespace) -> int:
    from fastperc.commands.upscale import sr_eval

    sr_eval(args.model, args.hr_dir, args.scale, out=args.out, device=args.device)
    return 0


def _sr_train(args: argparse.Namespace) -> int:
    from fastperc.commands.sr_train import FIELDS, sr_train

    return sr_train({k: v for k, v in vars(args).items() if k in FIELDS}, resume=args.resume)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fastperc`` console script; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error (already printed, status 2)
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return args.func(args)
    except InputError as exc:
        print(f"fastperc {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fastperc {args.command}: interrupted", file=sys.stderr)
        return 130

"""Command-line flags: the guide's (``--tome_r``, ``--do_train 1``, ...) and STOP's own, in one parser.

Deviations from STOP's ``params.py`` (each fixes a bug found by running it): ``--do_train``/``--do_eval`` accept a
bare flag as well as ``1``/``0``; ``--lora`` parses booleans (STOP's ``type=bool`` made it always True);
``--tome_prop_attn`` can be turned off (``--no-tome_prop_attn`` or ``--tome_prop_attn 0``);
``--temporal_prompt`` defaults to STOP itself (``group2-2``) instead of the DGL baseline.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from run_kit import OneLineArgumentParser, parse_args_explicit

from .fastconv import DEFAULT_MODE
from .fastconv import MODES as CONV_MODES

_TRUE = {"1", "true", "yes", "on", "y", "t"}
_FALSE = {"0", "false", "no", "off", "n", "f"}


def str2bool(text: str) -> bool:
    value = str(text).strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (1/0, true/false), got {text!r}")


def _int01(text: str) -> int:
    return int(str2bool(text))


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _nonneg_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


class _OptionalBool(argparse.Action):
    """``--flag`` -> True, ``--flag 0|1|true|false``, ``--no-flag`` -> False."""

    def __init__(self, option_strings, dest, default=None, **kwargs):
        extra = [f"--no-{s[2:]}" for s in option_strings if s.startswith("--")]
        super().__init__(option_strings + extra, dest, nargs="?", default=default, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string and option_string.startswith("--no-"):
            setattr(namespace, self.dest, False)
        elif values is None:
            setattr(namespace, self.dest, True)
        else:
            try:
                setattr(namespace, self.dest, str2bool(values))
            except argparse.ArgumentTypeError as exc:
                parser.error(f"argument {option_string}: {exc}")


def build_parser(prog: str = "stop-tome-main") -> argparse.ArgumentParser:
    p = OneLineArgumentParser(prog=prog, description="STOP / CLIP4Clip video-text retrieval with token merging")
    a = p.add_argument
    # modes
    a("--do_train", nargs="?", const=1, default=0, type=_int01, help="train (bare flag or 1/0)")
    a("--do_eval", nargs="?", const=1, default=0, type=_int01, help="evaluate only (bare flag or 1/0)")
    # data
    a("--datatype", default="msrvtt", choices=["msrvtt"])
    a("--data_path", default="data/MSRVTT_data.json", help="MSRVTT_data.json (captions)")
    a("--features_path", default="data/MSRVTT_Videos", help="folder of <video_id>.mp4")
    a("--train_csv", default=None, help="default: MSRVTT_train.9k.csv next to --data_path")
    a("--val_csv", default=None, help="default: MSRVTT_JSFUSION_test.csv next to --data_path")
    a("--expand_msrvtt_sentences", action="store_true", help="train on every caption (else one random per video)")
    a("--max_words", type=_positive_int, default=32)
    a("--max_frames", type=_positive_int, default=12)
    a("--frame_sampling", default="segments", choices=["segments", "fps"], help="STOP segments or CLIP4Clip fps")
    a("--feature_framerate", type=float, default=1.0)
    a("--slice_framepos", type=int, default=2, choices=[0, 1, 2])
    a("--train_frame_order", type=int, default=0, choices=[0], help="only 0 (original order)")
    a("--eval_frame_order", type=int, default=0, choices=[0], help="only 0 (original order)")
    a("--num_thread_reader", type=_nonneg_int, default=1)
    # optimisation
    a("--epochs", type=_positive_int, default=5)
    a("--batch_size", type=_positive_int, default=128, help="global batch (split over ranks)")
    a("--batch_size_val", type=_positive_int, default=16)
    a("--lr", type=float, default=1e-4)
    a("--coef_lr", type=float, default=1.0, help="lr multiplier of the pretrained CLIP parameters")
    a("--wd", type=float, default=0.2)
    a("--beta1", type=float, default=0.9)
    a("--beta2", type=float, default=0.98)
    a("--eps", type=float, default=1e-6)
    a("--optim", default="AdamW", choices=["AdamW", "BertAdam"])
    a("--warmup_proportion", type=float, default=0.1)
    a("--gradient_accumulation_steps", type=_positive_int, default=1)
    a("--clip_grad_norm", type=float, default=1.0)
    a("--seed", type=int, default=42)
    a("--precision", default="fp32", choices=["amp", "fp16", "fp32"])
    a("--max_train_steps", type=_nonneg_int, default=0, help="stop each epoch after this many steps (0: no limit)")
    a("--n_display", type=_positive_int, default=50)
    # model
    a("--pretrained_clip_name", default="ViT-B/32", help="ViT-B/32, ViT-B/16 or a file path")
    a("--pretrained_dir", default="~/models/pretrained", help="folder with ViT-B-32.pt / ViT-B-16.pt")
    a("--init_model", default=None, help="weights to start from (a state dict or one of our checkpoints)")
    a("--resume", default=None, help="checkpoint.pt (or its folder) of an interrupted run")
    a("--cross_model", default="cross-base", help="accepted for STOP compatibility; unused with meanP")
    a("--loose_type", action="store_true", help="accepted; meanP is always loose")
    a("--linear_patch", default="2d", choices=["2d"])
    a("--sim_header", default="meanP", choices=["meanP"], help="no effect with STOP prompts (one vector per video)")
    a("--freeze_clip", type=_int01, default=0)
    a("--temperature_new", type=float, default=1.0, help="if > 1, initial logit_scale")
    a("--shared_latent_space", default="transformer", choices=["transformer", "linear"])
    a("--lora", type=str2bool, default=True)
    a("--text_prompt_length", type=_nonneg_int, default=8)
    a("--local_each_frame_prompt_length", type=_positive_int, default=4)
    a("--global_visual_prompt_length", type=_positive_int, default=4)
    a("--unified_transformer_layers", type=_positive_int, default=None, help="must equal the ViT depth (default)")
    a(
        "--visual_output_type",
        default="global_prompt0",
        choices=["global_prompt0", "average_global_prompt", "average_frame_cls_token"],
    )
    a("--temporal_prompt", default="group2-2", choices=["group2-2", "DGL", "none"], help="group2-2 = STOP")
    a(
        "--region_pooling",
        default="patch",
        choices=["patch", "stop"],
        help="STOP's region mask pooled per patch (paper) or with STOP's code's strided reshape",
    )
    a(
        "--prompter_conv",
        default=DEFAULT_MODE,
        choices=list(CONV_MODES),
        help="execution of STOP's prompter Conv3d layers (same weights, same result up to rounding; fastconv.py): "
        "auto (default: fastest path per layer shape on CUDA, fold2d on CPU), native (STOP's exact op order), "
        "channels_last, padded, fold2d, fft (rfft2 over H, W; taps and channels as a complex matmul)",
    )
    # merging
    a("--tome_r", type=_nonneg_int, default=0, help="tokens merged per frame per layer (0: off)")
    a("--tome_trace_source", action="store_true", help="keep per-frame source maps; save pictures at eval")
    a("--tome_prop_attn", action=_OptionalBool, default=True, help="proportional attention (--no-tome_prop_attn)")
    a("--tome_cross_layers", default="", help="cross-frame joins at these layers, e.g. 8-9-10 (needs none)")
    a("--tome_cross_frames", default="", help="frames joined at each cross layer, e.g. 2-2-3")
    a("--tome_cross_ratio", type=float, default=0.3, help="share of a joined clip's tokens merged at the join")
    a("--tome_vis_count", type=_nonneg_int, default=4, help="merge pictures saved at eval with --tome_trace_source")
    # run
    a("--output_dir", required=True)
    a("--device", default="auto")
    a("--eval_block", type=_positive_int, default=1024, help="rows per similarity block in evaluation")
    a("--local_rank", type=int, default=0, help="ignored (torchrun sets LOCAL_RANK)")
    a("--no_tensorboard", action="store_true")
    return p


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, set[str]]:
    """Parse and validate; returns (args, flags given explicitly) for ``run_kit.reconcile_config``."""
    parser = build_parser()
    args, explicit = parse_args_explicit(parser, argv)
    if not args.do_train and not args.do_eval and not args.resume:
        parser.error("one of --do_train or --do_eval is required")
    if args.tome_cross_layers and args.temporal_prompt != "none":
        parser.error("argument --tome_cross_layers: cross-frame merging needs --temporal_prompt none")
    if args.tome_cross_layers and args.tome_r < 1:
        parser.error("argument --tome_cross_layers: needs --tome_r >= 1 (tome_r 0 switches all merging off)")
    if not 0.0 <= args.warmup_proportion < 1.0:
        parser.error(f"argument --warmup_proportion: expected a value in [0, 1), got {args.warmup_proportion}")
    return args, explicit

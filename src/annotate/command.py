"""`prefopt annotate`: resolve what to serve and where labels go, read and check it all, then serve the page.

    prefopt annotate experiments/quickstart.yaml [--round K] [--annotate.source=candidates]
    prefopt annotate --pairs runs/quickstart/pairs/pairs.jsonl --out labels/prefs.jsonl [--annotator alice]
    prefopt annotate --candidates runs/quickstart/generate --out labels/prefs.jsonl --port 0

Everything that can fail on bad input (the pairs file, the shards, an existing label file) is read before the
server starts: a bad file is a one-line DataError naming file, row and field, and exit code 3. Labels written
into an experiment folder hold its lock while the page serves (exit code 4 while another command holds it).
"""

from __future__ import annotations

import socket
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

from prefopt.annotate.config import AnnotateConfig
from prefopt.annotate.items import load_candidates, load_pair_file
from prefopt.annotate.session import Session
from prefopt.annotate.store import LabelStore
from prefopt.config import ConfigError

# command-line flag -> key of the annotate section it overrides
FLAGS = ("pairs", "candidates", "out", "annotator", "host", "port", "seed", "limit")


def resolve_section(args, rest: list[str]) -> AnnotateConfig:
    """The annotate section with its `stage:` paths resolved: from the experiment config when one is given (with
    its --annotate.KEY=VALUE overrides), else from the flags alone; flags win over both."""
    return resolve_target(args, rest)[0]


def resolve_target(args, rest: list[str]) -> tuple[AnnotateConfig, Path | None]:
    """The resolved section, and the experiment folder labels are written into (whose lock `main` takes): the
    config's run folder when `out` lies in it; without a config, the folder above `out` that holds an experiment
    lock file; else None."""
    flags = {k: getattr(args, k) for k in FLAGS if getattr(args, k, None) is not None}
    if args.candidates is not None:
        flags["source"] = "candidates"
    if args.config:
        from prefopt.config import load_config
        from prefopt.experiment import resolve

        cfg = load_config(args.config, rest)
        sec = replace(cfg.annotate, **flags)
        if not sec.out:
            sec.out = str(cfg.root / "annotate" / "preferences.jsonl")
        sec = replace(sec, pairs=resolve(cfg, sec.pairs, args.round, model=False),
                      candidates=resolve(cfg, sec.candidates, args.round, model=False),
                      out=resolve(cfg, sec.out, args.round, model=False))
        root = cfg.root.resolve()
        return sec, root if root in Path(sec.out).resolve().parents else None
    if rest:
        raise ConfigError(f"unrecognised arguments {rest}: --annotate.KEY=VALUE overrides need an experiment config")
    if "pairs" not in flags and "candidates" not in flags:
        raise ConfigError("give an experiment config, or --pairs FILE (or --candidates DIR) with --out FILE")
    if not flags.get("out"):
        raise ConfigError("--out FILE is needed without an experiment config (the preference JSONL to append to)")
    # `.lock` is left in every experiment folder a prefopt command has written into
    root = next((d for d in Path(flags["out"]).resolve().parents if (d / ".lock").is_file()), None)
    return AnnotateConfig(**flags), root


def prepare(sec: AnnotateConfig) -> Session:
    """Read and check the pairs and the existing labels; a Session ready to serve."""
    source = sec.pairs if sec.source == "pairs" else sec.candidates
    if Path(sec.out).resolve() == Path(source).resolve():
        raise ConfigError(f"annotate.out is the file being served ({sec.out}); give another file")
    if sec.source == "pairs":
        pairs, skipped = load_pair_file(sec.pairs, sec.template, sec.limit)
    else:
        pairs, skipped = load_candidates(sec.candidates, sec.seed, sec.limit)
    store = LabelStore(sec.out)  # reads (and checks) the labels already there: resume
    print(f"[prefopt] annotate: {len(pairs)} pairs from {source}"
          + (f" ({skipped} skipped: an empty answer or two identical ones)" if skipped else "")
          + f"; labels -> {store.out}, ties and skips -> {store.side}", flush=True)
    return Session(pairs, store, sec.seed)


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def main(args, rest: list[str]) -> int:
    from prefopt.pipeline import experiment_lock

    sec, root = resolve_target(args, rest)
    # labels written into an experiment folder take its lock, as `run` and the stage commands do: a stage reading
    # the file (reward on human labels) must not see it change under it
    with experiment_lock(root) if root is not None else nullcontext():
        session = prepare(sec)
        try:
            from prefopt.annotate.page import serve
        except ImportError as e:
            raise ConfigError(f"the feedback page needs gradio ({e}): pip install 'prefopt[annotate]'") from None
        port = sec.port or free_port(sec.host)
        print(f"[prefopt] annotate: serving on http://{sec.host}:{port} (Ctrl-C to stop)", flush=True)
        serve(session, sec.host, port, sec.annotator)
    return 0

"""`ich` command line: one subcommand per step of the data flow (see README's CLI reference).

The top of the house: it may import every room (ich, soups, sweeps); nothing imports it back. The parser is built
from argparse-only modules, and each command imports its heavy modules (torch, timm, MLflow, Ray) inside its
handler: `ich --help` and `ich ingest` load none of them (tests/test_layout.py)."""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path


from ich.home import ich_home


def cmd_demo_data(a) -> None:
    from ich.demo_data import write_digits
    counts = write_digits(a.out)
    print(f"wrote {sum(counts.values())} digit images in {len(counts)} classes to {a.out}")


def cmd_ingest(a) -> None:
    from ich.ingest import ingest
    m = ingest(a.src, a.out, size=a.size, val_frac=a.val_frac, test_frac=a.test_frac, seed=a.seed,
               workers=a.workers, overwrite=a.overwrite, progress=not a.quiet, strict=a.strict,
               max_file_bytes=int(a.max_file_mb * 2**20), max_aspect=a.max_aspect or None,
               decode_timeout=a.decode_timeout)
    n = m["num_images"]
    print(f"{a.out}: {m['num_classes']} classes, train/val/test = {n.get('train', 0)}/{n.get('val', 0)}/"
          f"{n.get('test', 0)}, {len(m['skipped'])} skipped, fingerprint {m['fingerprint'][:16]}")
    from ich.errors import printable
    for s in m["skipped"]:
        print(f"  skipped {printable(s['path'])}: {s['reason']}")


def cmd_train(a) -> None:
    """One trial's loop on one machine, no Ray, no MLflow: per-epoch val metrics, a checkpoint per epoch."""
    from ich.checkpoint import CheckpointMeta, save_checkpoint
    from ich.data import load_dataset
    from ich.train import Trainer
    from ich.errors import ConfigError
    from ich.train_config import RETIRED_OPTIONS, TrainConfig

    names = {f.name for f in dataclasses.fields(TrainConfig)} | set(RETIRED_OPTIONS)  # a retired one: from_dict says how
    flags = {k: v for k, v in vars(a).items() if k in names and v is not None}
    options, init_source = {}, a.init
    if a.set and not a.config:
        raise ConfigError("ich train: --set changes a sweep config's keys; give the config with --config")
    sources = []  # lowest first: the config's train: block, the trial's recorded params; the flags win
    if a.config:
        from sweeps.reproduce import from_config
        sources.append(from_config(a.config, a.set or ()))
    if a.trial:
        from mlflow import MlflowClient

        from soups.tracking_server import ensure_tracking_uri
        from sweeps.reproduce import from_trial
        experiment = a.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME")
        if not experiment:
            raise ConfigError("ich train --trial: name the sweep's experiment (--experiment or $MLFLOW_EXPERIMENT_NAME)")
        sources.append(from_trial(MlflowClient(ensure_tracking_uri(ich_home(), quiet=True)), experiment, a.trial))
    for source in sources:
        options.update(source.options)
        for line in source.said:
            print(line)
    if init_source is None:  # the trial's init first, else the config's
        init_source = next((s.init for s in reversed(sources) if s.init), None)
    cfg = TrainConfig.from_dict({**options, **flags})
    data = load_dataset(a.data)
    from sweeps.init_weights import resolve_init_source
    init = str(resolve_init_source(init_source)) if init_source else None  # an MLflow URI downloads here
    trainer = Trainer(cfg, data, init_weights=init)
    if a.resume:
        trainer.load_state(a.resume)
        print(f"resumed from {a.resume} at epoch {trainer.epoch}")
    out = Path(a.out) if a.out else None
    print(f"{cfg.model} on {data.num_classes} classes, {len(data.splits['train'])} train images, device {trainer.device}")
    print(f"{'epoch':>5} {'train_loss':>10} {'val_loss':>8} {'val_acc':>7} {'val_f1':>7} {'img/s':>7} {'wait':>5}")
    for r in trainer.fit():
        m = r.metrics
        print(f"{r.epoch:>5} {m['train_loss']:>10.4f} {m['val_loss']:>8.4f} {m['val_accuracy']:>7.4f} "
              f"{m['val_macro_f1']:>7.4f} {m['images_per_s']:>7.0f} {m['data_wait_share']:>5.1%}", flush=True)
        if out:
            meta = CheckpointMeta.for_training(cfg, data, init_fingerprint=trainer.init_fingerprint, epoch=r.epoch,
                                               metrics={k: float(v) for k, v in m.items()},
                                               preprocess=trainer.preprocess,
                                               extra={"config": dataclasses.asdict(cfg), "init": init_source})
            save_checkpoint(out / f"epoch_{r.epoch:03d}", r.weights(), meta)
            trainer.save_state(out / "state")
    test = trainer.evaluate("test")
    print(f"test: accuracy {test['test_accuracy']:.4f}, macro F1 {test['test_macro_f1']:.4f}")


def cmd_predict(a) -> None:
    """Classify image files with a served soup (a pyfunc model: URI or folder, verified before loading) or a
    checkpoint folder (checkpoint.json + model.safetensors). Both apply the preprocessing the model records."""
    import json

    from ich.errors import printable
    images = [(_read_image(p), p) for p in a.images]
    folder = Path(a.model)
    if (folder / "checkpoint.json").is_file():  # one checkpoint, straight from its folder
        from ich.checkpoint import load_checkpoint
        from ich.models import model_for_checkpoint
        from ich.preprocess import Preprocess
        state_dict, meta = load_checkpoint(folder)  # bounded, typed metadata; safetensors only, finite weights
        net = model_for_checkpoint(state_dict, meta, folder)  # weights that do not fit: one line naming it
        classes, pre = list(meta.class_names), Preprocess.from_meta(meta)
        logits = _checked_logits(net, pre, images)
        probs = _softmax(logits)
    else:
        from soups.serve.verify import load_soup_model
        from soups.tracking_server import ensure_tracking_uri
        if "://" in a.model or a.model.startswith(("models:", "runs:")):
            ensure_tracking_uri(ich_home(), quiet=True)
        # Verified first (MLmodel allowlist, code and weights hashes, no pickle); then our own SoupClassifier
        # is built from the weights: nothing from the model folder is imported. Refusals are one line, exit 2.
        served = load_soup_model(a.model)
        try:
            logits = served.logits(images)  # one forward pass for the classes, probabilities and --json's logits
        except ValueError as e:  # an unreadable image: one line naming it
            raise FileNotFoundError(str(e)) from None
        probs, classes = served.softmax(logits), list(served.classes)
    for i, path in enumerate(a.images):
        top = sorted(range(len(classes)), key=lambda k: -probs[i][k])[: a.top]
        if a.json:  # one object per line: what a program reads (logits as float32 values, exactly)
            print(json.dumps({"image": path, "class": classes[top[0]], "probabilities": [float(v) for v in probs[i]],
                              "logits": [float(v) for v in logits[i]]}, ensure_ascii=False))
        else:
            shown = ", ".join(f"{classes[k]}: {probs[i][k]:.3f}" for k in top)  # class names: checked printable
            print(f"{printable(path)}: {classes[top[0]]}  ({shown})")


def _read_image(path: str) -> bytes:
    """An image file's bytes, bounded before it is read whole: a regular file of at most ingest's size cap (a 2 GB
    sparse "png" is refused from its size, unread), then its header checked (pixel count, aspect ratio, bombs)."""
    import stat

    from ich.decode import MAX_FILE_BYTES
    from soups.serve.inputs import check_image_header
    try:
        st = os.stat(path)
    except OSError as e:
        raise FileNotFoundError(f"{path}: {'no such image file' if isinstance(e, FileNotFoundError) else e.strerror}") \
            from None
    if not stat.S_ISREG(st.st_mode):
        raise FileNotFoundError(f"{path}: not a regular file")
    if st.st_size > MAX_FILE_BYTES:
        raise FileNotFoundError(f"{path}: {st.st_size} bytes, over the {MAX_FILE_BYTES}-byte cap on an image file; "
                                f"not read")
    with open(path, "rb") as f:
        data = f.read(MAX_FILE_BYTES + 1)  # never more than the cap, even if the file grew since the stat
    if len(data) > MAX_FILE_BYTES:
        raise FileNotFoundError(f"{path}: over the {MAX_FILE_BYTES}-byte cap on an image file")
    try:
        check_image_header(data, path)
    except ValueError as e:
        raise FileNotFoundError(str(e)) from None
    return data


def _checked_logits(net, pre, images):
    from ich.preprocess import image_logits
    try:
        return image_logits(net, pre, images)
    except ValueError as e:  # an unreadable image: one line naming it
        raise FileNotFoundError(str(e)) from None


def _softmax(logits):
    import numpy as np
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def cmd_serve(a) -> None:
    """Verify a soup model, then serve exactly that verified copy as `mlflow models serve --env-manager local` does
    (MLflow's scoring server under uvicorn), behind soups.serve.app's guard on request bodies.

    The copy lives in a private temporary folder (removed on exit); the server runs with that folder's parent
    as its working directory, so nothing beside the model is importable from it. SIGTERM/SIGINT stop the server
    (its own process group, started here) and remove the copy."""
    import shutil
    import signal
    import subprocess
    import tempfile

    from ich.errors import ConfigError
    from soups.serve.inputs import MAX_BYTES_ENV, MAX_ROWS_ENV, PATH_ROOT_ENV, InputPolicy
    from soups.serve.verify import fetch_verified
    from soups.tracking_server import ensure_tracking_uri
    env = dict(os.environ)
    if a.path_root is not None:
        env[PATH_ROOT_ENV] = a.path_root
    if a.max_bytes is not None:
        env[MAX_BYTES_ENV] = str(a.max_bytes)
    if a.max_rows is not None:
        env[MAX_ROWS_ENV] = str(a.max_rows)
    try:
        policy = InputPolicy.from_env(env)  # checked here so a bad root fails before anything starts
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if a.model.startswith("models:"):
        ensure_tracking_uri(ich_home(), quiet=True)
    env["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # the server execs uvicorn
    tmp = tempfile.mkdtemp(prefix="ich-serve-")
    server = None

    def stop(signum, _frame):
        if server is not None and server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
    try:
        source, local, ckpt = fetch_verified(a.model, tmp)
        _check_servable(ckpt, source.label)  # what the server's load would trip on, refused here in one line
        roots = f"path column under {policy.path_root}" if policy.path_root else "path column off"
        print(f"verified {source.label}; serving it on http://{a.host}:{a.port}/invocations ({roots})", flush=True)
        # What `mlflow models serve --env-manager local` runs (uvicorn on MLflow's scoring server, the model folder
        # in its variable), with soups.serve.app in front: a body MLflow's parser would 500 on is one 400.
        from mlflow.environment_variables import MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT
        from mlflow.pyfunc import scoring_server
        env[scoring_server._SERVER_MODEL_PATH] = str(local)
        env[MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.name] = str(MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.get())
        cmd = [sys.executable, "-P", "-m", "uvicorn", "--host", a.host, "--port", str(a.port), "--workers",
               str(a.workers), "soups.serve.app:app"]  # -P: the private working folder is not on sys.path
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        server = subprocess.Popen(cmd, env=env, cwd=tmp, start_new_session=True, preexec_fn=_die_with_parent())
        rc = server.wait()
        if rc not in (0, -signal.SIGTERM, 128 + signal.SIGTERM):
            raise SystemExit(rc)
    finally:
        if server is not None and server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)


def _check_servable(ckpt: Path, label: str) -> None:
    """Load the verified checkpoint as the scoring server will (bounded metadata, finite safetensors weights, the
    network they fit), so a bad one is refused here in one line naming the model, not in the server's traceback."""
    from ich.checkpoint import CheckpointError, load_checkpoint
    from ich.models import model_for_checkpoint
    from soups.serve.verify import named_by_model
    try:
        state_dict, meta = load_checkpoint(ckpt)
        model_for_checkpoint(state_dict, meta, ckpt)
    except CheckpointError as e:
        raise named_by_model(e, ckpt, label) from None


def _die_with_parent():
    """A preexec_fn: the server gets SIGTERM if `ich serve` dies (even by SIGKILL), so no server outlives it.
    libc's prctl is looked up here, before the fork; the child only calls it."""
    import ctypes
    import signal
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG


def add_trust_key_arg(p) -> None:
    p.add_argument("--trust-key", action="append", default=[], metavar="KEY",
                   help="also trust models signed by this public key (base64 as `ich key show` prints it, or a file "
                        "holding it); repeatable. Always trusted: this machine's key and $ICH_HOME/trusted_keys")


def run_command(args) -> None:
    if not getattr(args, "trust_key", None):
        return args.func(args)
    from soups.store.signing import trust
    trust(getattr(args, "trust_key", None) or [])  # a bad key is one line, before anything is pulled
    args.func(args)


def cmd_key(a) -> None:
    """`ich key show` / `ich key trust KEY` (soups/store/signing.py)."""
    from soups.store import signing
    if a.key_command == "show":
        path = signing.key_path()
        made = not path.exists()
        print(signing.public_text(signing.own_key(path).public_key()))
        print(f"{'made' if made else 'kept'} at {path}; give the line above to whoever verifies this key's models "
              "(`ich key trust LINE`)", file=sys.stderr)
    else:
        kid, new = signing.add_trusted(a.key)
        print(f"{'trusted' if new else 'already trusted'}: key {kid} ({signing.trusted_file()})")


def cmd_ui(a) -> None:
    if a.optuna:  # optuna-dashboard on the sweep's study storage, started and stopped like the MLflow UI
        from sweeps.optuna_ui import run
        rc = run(data_dir=a.data_dir, stop=a.stop, storage=a.storage, sweep_run=a.sweep_run, host=a.host,
                 port=a.port)
        if rc:
            raise SystemExit(rc)
        return
    if a.storage or a.sweep_run or a.port is not None or a.host != "127.0.0.1":
        raise SystemExit("ich ui: --storage, --sweep-run, --host and --port go with --optuna")
    from soups.tracking_server import main_ui
    rc = main_ui((["--stop"] if a.stop else []) + (["--data-dir", a.data_dir] if a.data_dir else []))
    if rc:
        raise SystemExit(rc)


def cmd_sweep(a) -> None:
    """`ich sweep`: the main job, the same run as `python sweeps/coatnet.py` with the same options."""
    from sweeps.job import run_sweep
    code = run_sweep(a, ich_home())["exit_code"]
    if code:  # trials failed after their retries: the summary line is printed, the status says it
        raise SystemExit(code)


def cmd_soup(a) -> None:
    from soups.orchestrate import cmd_soup as run_cmd_soup
    run_cmd_soup(a)


def cmd_report(a) -> None:
    from soups.report.cli import cmd_report as run_cmd_report
    run_cmd_report(a)


def cmd_gc(a) -> None:
    """`ich gc`: the sweep config (a sweeps/ file) is read here; soups/store/gc.py gets its values."""
    from soups.store.gc import cmd_gc as run_cmd_gc
    if a.config:
        from sweeps.config import load_config
        cfg = load_config(a.config)
        a.from_config = {"keep_top_k": cfg.gc.keep_top_k, "keep_last_k": cfg.gc.keep_last_k, "metric": cfg.metric,
                         "mode": cfg.mode}
    run_cmd_gc(a)


def build_parser() -> argparse.ArgumentParser:
    from soups.options import VersionAction, help_formatter
    p = argparse.ArgumentParser(prog="ich", description="Model soups for ICH image classification.")
    p.add_argument("--version", action=VersionAction)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("demo-data", help="write scikit-learn's digits as an ImageFolder (offline demo data)")
    s.add_argument("out", help="folder to write (one sub-folder of PNG files per digit)")
    s.set_defaults(func=cmd_demo_data)

    s = sub.add_parser("ingest", help="ImageFolder -> validated, split, fingerprinted Parquet dataset")
    s.add_argument("src", help="ImageFolder: one sub-folder of images per class")
    s.add_argument("out", help="dataset folder to write (Parquet shards + manifest.json)")
    s.add_argument("--size", type=int, default=256, help="stored image size (shorter side resized, center crop)")
    s.add_argument("--val-frac", type=float, default=0.1, help="share of each class in the val split (default 0.1)")
    s.add_argument("--test-frac", type=float, default=0.1, help="share of each class in the test split (default 0.1)")
    s.add_argument("--seed", type=int, default=0, help="seed of the stratified split (default 0)")
    s.add_argument("--workers", type=int, default=os.cpu_count() or 2,
                   help="decoding processes (default: %(default)s, this machine's CPUs)")
    s.add_argument("--overwrite", action="store_true", help="replace OUT if it holds a dataset (kept if this fails)")
    s.add_argument("--strict", action="store_true", help="fail (exit 2) on any file that would be skipped")
    s.add_argument("--max-file-mb", type=float, default=50, help="skip (unread) source files larger than this")
    s.add_argument("--max-aspect", type=float, default=10, help="skip images whose long side exceeds this many "
                                                                "times the short side (0: no limit)")
    s.add_argument("--decode-timeout", type=float, default=300, help="seconds one file may take to decode before "
                                                                     "the ingest fails naming it")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_ingest)

    from ich.train_config import RETIRED_OPTIONS, TrainConfig  # no torch: the training loop loads in cmd_train
    s = sub.add_parser("train", help="train one trial locally (no Ray/MLflow), print per-epoch val metrics")
    s.add_argument("data", help="ingested dataset folder")
    s.add_argument("--init", help="initial weights: a .safetensors file, a checkpoint folder or an MLflow model URI")
    s.add_argument("--out", help="write a checkpoint per epoch here")
    s.add_argument("--resume", help="training-state folder to resume from (OUT/state)")
    s.add_argument("--config", default=None, help="a sweep YAML: its train: block and init.weights (default: none)")
    s.add_argument("--set", action="append", default=None, metavar="KEY=VALUE",
                   help="override a key of --config, dotted, repeatable: --set train.lr=3e-4 (default: none)")
    s.add_argument("--trial", default=None, help="reproduce this trial of a sweep: its recorded params and its "
                                                 "shared init from MLflow (default: none)")
    s.add_argument("--experiment", default=None, help="the sweep's experiment, for --trial "
                                                      "(default: $MLFLOW_EXPERIMENT_NAME)")
    for f in dataclasses.fields(TrainConfig):
        kind = {"int": int, "float": float, "str": str, "bool": lambda v: v.lower() in ("1", "true", "yes", "on")}[f.type]
        s.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=kind, default=None,
                       help=f"default {f.default}")
    for name in RETIRED_OPTIONS:  # accepted only to be refused with how to convert (cmd_train), not as unknown
        s.add_argument("--" + name.replace("_", "-"), dest=name, default=None, help=argparse.SUPPRESS)
    s.set_defaults(func=cmd_train)

    from sweeps.job import EXIT_CODES, add_sweep_args  # argparse only: `ich --help` imports no Ray or MLflow
    s = sub.add_parser("sweep", help="the main job: a Ray Tune sweep, every checkpoint in MLflow, then soups and "
                                     "the report (the same options as python sweeps/coatnet.py)", epilog=EXIT_CODES)
    add_sweep_args(s)
    s.set_defaults(func=cmd_sweep)

    # Flags from soups/options.py (argparse only); each command imports its MLflow side when it runs.
    from soups.options import add_gc_args, add_report_args, add_soup_args
    s = sub.add_parser("soup", help="uniform and greedy soups from a sweep's checkpoints in MLflow")
    add_soup_args(s)
    add_trust_key_arg(s)
    s.set_defaults(func=cmd_soup)

    s = sub.add_parser("report", help="the paper's tables and figures from one sweep's MLflow records")
    add_report_args(s)
    add_trust_key_arg(s)
    s.set_defaults(func=cmd_report)

    s = sub.add_parser("gc", help="delete the weights of checkpoints no soup uses beyond each trial's top-k/last-k "
                                  "(dry run unless --apply)")
    add_gc_args(s)
    s.set_defaults(func=cmd_gc)

    s = sub.add_parser("predict", help="class names and probabilities of images from a model (URI or folder)")
    s.add_argument("--model", required=True,
                   help="e.g. models:/ich17-soup@champion, a local pyfunc folder, or a checkpoint folder")
    s.add_argument("images", nargs="+", help="image files to classify")
    s.add_argument("--top", type=int, default=3, help="probabilities shown per image")
    s.add_argument("--json", action="store_true", help="one JSON object per image: class, probabilities, logits")
    add_trust_key_arg(s)
    s.set_defaults(func=cmd_predict)

    s = sub.add_parser("serve", help="verify a registered soup, then serve it over HTTP (MLflow's scoring server)")
    s.add_argument("--model", required=True, help="e.g. models:/ich17-soup@champion, or a local pyfunc folder")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s: loopback only)")
    s.add_argument("--port", type=int, default=5001, help="port to listen on (default 5001)")
    s.add_argument("--workers", type=int, default=1, help="server worker processes (default 1)")
    s.add_argument("--path-root", default=None,
                   help="allow the 'path' input column, for regular files under this folder only "
                        "(default: $ICH_SERVE_PATH_ROOT, else the column is refused)")
    s.add_argument("--max-bytes", type=int, default=None,
                   help="largest image file or base64 value accepted (default: $ICH_SERVE_MAX_BYTES, else 20 MiB)")
    s.add_argument("--max-rows", type=int, default=None,
                   help="rows per request (default: $ICH_SERVE_MAX_ROWS, else 256; a request also stops at "
                        "$ICH_SERVE_MAX_REQUEST_BYTES, else 64 MiB, and $ICH_SERVE_MAX_REQUEST_PIXELS, else 100 MP)")
    add_trust_key_arg(s)
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("key", help="this machine's signing key: show its public half, trust another's "
                                   "(docs/cluster.md, Keys)")
    key_sub = s.add_subparsers(dest="key_command", required=True)
    key_sub.add_parser("show", help="print the public key line to give to others (makes the key on first use: "
                                    "$ICH_SIGNING_KEY, else $ICH_HOME/keys/signing_key)")
    t = key_sub.add_parser("trust", help="trust a public key (base64, or a file holding one): appended to "
                                         "$ICH_HOME/trusted_keys")
    t.add_argument("key", help="the public key line `ich key show` printed, or a file holding it")
    s.set_defaults(func=cmd_key)

    from sweeps.schedule import add_schedule_args, cmd_schedule
    s = sub.add_parser("schedule", help="run a sweep on a schedule (cron or systemd timer); each run extends it")
    add_schedule_args(s)
    s.set_defaults(func=cmd_schedule)

    s = sub.add_parser("ui", help="start (or reuse) the local MLflow server and print its UI address; with "
                                  "--optuna, the Optuna dashboard of the sweep's study")
    s.add_argument("--data-dir", help="project data folder (default $ICH_HOME or ./.ich)")
    s.add_argument("--stop", action="store_true", help="stop the local MLflow server (with --optuna: the dashboard)")
    s.add_argument("--optuna", action="store_true",
                   help="start (or reuse) optuna-dashboard on the sweep's Optuna study storage instead, and print its "
                        "address; `ich ui --optuna --stop` stops it")
    s.add_argument("--storage", default=None,
                   help="with --optuna: the study storage URL (default: sqlite:///<data dir>/optuna.db, where "
                        "sweeps keep their studies)")
    s.add_argument("--sweep-run", default=None,
                   help="with --optuna: a sweep run id; its ich.optuna_storage tag must name the data folder's "
                        "study database (another is shown, never followed: give it with --storage)")
    s.add_argument("--host", default="127.0.0.1",
                   help="with --optuna: the address the dashboard listens on (default %(default)s: loopback only; "
                        "it has no login)")
    s.add_argument("--port", type=int, default=None,
                   help="with --optuna: its port (default 8080 when free, else any free port)")
    s.set_defaults(func=cmd_ui)
    help_formatter(p)  # every option's default in every --help
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv == ["--version"]:  # before build_parser: `ich --version` needs no parser at all
        from soups.options import version_line
        print(version_line())
        return 0
    from ich.errors import exit_on_user_error, run_cli
    with exit_on_user_error("ich"):  # e.g. a module named in ICH_RECIPES (soups/recipes/) that cannot be imported
        parser = build_parser()
    args = parser.parse_args(argv)
    args.func = _garbled_answers_in_one_line(args.func)
    try:
        return run_cli(f"ich {args.command}", lambda: run_command(args))  # bad input: one line, exit 2
    except KeyboardInterrupt:
        return 130


def _garbled_answers_in_one_line(func):
    """A command whose MLflow server answered with a body MLflow's client cannot read into its protobuf messages
    (google.protobuf's ParseError: a broken or impersonated server) fails in one line naming the server, exit 2,
    as a refused connection does; a garbled JSON body is already an MlflowException each command reports."""
    def run(a):
        try:
            return func(a)
        except Exception as e:
            parse_error = getattr(sys.modules.get("google.protobuf.json_format"), "ParseError", None)
            if parse_error is None or not isinstance(e, parse_error):
                raise
            from soups.store.retry import RegistryError
            mlflow = sys.modules.get("mlflow")
            server = mlflow.get_tracking_uri() if mlflow is not None else "the MLflow server"
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise RegistryError(f"{server}: the MLflow server's answer is not a valid MLflow response ({reason})") \
                from None
    return run


if __name__ == "__main__":
    sys.exit(main())

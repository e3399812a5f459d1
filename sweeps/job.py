"""The main job: a Ray Tune sweep of fine-tuning variants (CoAtNet, or the baselines a config names), every
checkpoint in MLflow, then soups and the report.

    python sweeps/coatnet.py --demo                          # embedded default: digits, local Ray + MLflow
    ich sweep --demo --set train.lr=3e-4                     # the same job and options through `ich`
    python sweeps/coatnet.py --config sweeps/configs/gpu.yaml --data /data/ich17-ds --experiment ich17
    ray submit cluster.yaml sweeps/coatnet.py -- --config sweeps/configs/gpu.yaml --data ...

Ray: local when RAY_ADDRESS is unset, the running cluster when it is set (or under `ray submit`).
MLflow: MLFLOW_TRACKING_URI, or a local `mlflow server` on 127.0.0.1 started/reused by the project. When Ray
spans more than one machine the sweep refuses, in one line, a URI some node cannot reach (loopback, a local
store, or unset without --mlflow-host).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from soups.store.tags import (KIND_SWEEP, KIND_TRIAL, TAG_DATA, TAG_DATASET, TAG_FAILED_TRIALS, TAG_INIT_PREFIX, TAG_KIND,
                              TAG_STATUS, TAG_SWEEP, TAG_TRIAL, TAG_TUNE_PATH)


def add_sweep_args(p: argparse.ArgumentParser) -> None:
    """The sweep's options, one list for `python sweeps/coatnet.py` (and `ray submit`) and `ich sweep`."""
    from soups.options import VersionAction, add_experiment_arg  # argparse only
    p.add_argument("--version", action=VersionAction)
    p.add_argument("--config", help="sweep YAML (default: sweeps/configs/cpu.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, dotted for sections, value read as YAML; repeatable: "
                        "--set train.lr=3e-4 --set soups.metric=accuracy --set asha.grace_period=1 "
                        "--set search.cutmix=null (null drops a training or search key)")
    p.add_argument("--data", help="ingested dataset folder (ich ingest SRC OUT)")
    add_experiment_arg(p, "MLflow experiment (and sweep name unless the config sets `sweep:`); wins over the "
                          "config's `experiment:` and --set experiment=", required=False,
                       otherwise="the config's `experiment:`")
    p.add_argument("--num-samples", type=int, help="number of trials")
    p.add_argument("--max-concurrent", type=int, help="trials running at once")
    p.add_argument("--cpus-per-trial", type=float, help="CPUs each trial reserves")
    p.add_argument("--gpus-per-trial", type=float, help="GPUs each trial reserves; fractions share a GPU, e.g. 0.5")
    p.add_argument("--storage", help="Ray Tune storage: a path, s3://bucket/prefix, gs://... (default $ICH_STORAGE "
                                     "or $ICH_HOME/ray_results)")
    p.add_argument("--seed", type=int, help="Optuna TPE sampler seed")
    p.add_argument("--mlflow-host", metavar="ADDRESS",
                   help="with no MLFLOW_TRACKING_URI, start the project's MLflow server on this address instead of "
                        "127.0.0.1 ('auto': this machine's outward address) so that every Ray node reaches it; "
                        "it has no authentication: a private network only")
    p.add_argument("--resume", action="store_true", help="continue the last interrupted run of this sweep")
    p.add_argument("--no-soups", action="store_true", help="skip the soups (and the report) after the sweep")
    p.add_argument("--no-report", action="store_true", help="skip the report after the soups")
    p.add_argument("--report", action="store_true",
                   help="accepted for compatibility: the report is built after the soups unless --no-report")
    p.add_argument("--demo", action="store_true", help="write and ingest the digits demo data if --data is not given")
    p.add_argument("--verbose", action="store_true",
                   help="Ray Tune's status tables and trial boxes, Ray's and Optuna's info logs, a line per "
                        "warm-start epoch (default: a progress bar on a terminal and one line per finished trial)")
    p.add_argument("--allow-failed-trials", type=int, metavar="N",
                   help=f"exit 0 when at most N trials failed after their retries (default 0, config key "
                        f"allow_failed_trials); more: soups and report of the others, then exit {EXIT_TRIALS_FAILED}")


# Exit status is the truth (docs/design.md#17): what cron, `ray job submit` and a RayJob see.
EXIT_TRIALS_FAILED = 3  # 2 is bad input (ich/errors.py)
EXIT_CODES = (f"exit status: 0 ok; 2 bad input (one line on stderr); {EXIT_TRIALS_FAILED} trials failed after their "
              "retries (soups and report of the others were built; one summary line on stderr)")


def parse_args(argv=None) -> argparse.Namespace:
    from soups.options import DefaultsHelpFormatter
    p = argparse.ArgumentParser(description=__doc__, epilog=EXIT_CODES, formatter_class=DefaultsHelpFormatter)
    add_sweep_args(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from ich.home import ich_home
    from ich.errors import run_cli
    summary = {}
    code = run_cli("sweep", lambda: summary.update(run_sweep(args, ich_home())))  # bad input: one line, exit 2
    return code or summary["exit_code"]


def demo_dataset(home: Path) -> Path:
    """The embedded default: scikit-learn's digits as an ImageFolder, ingested at 32 px (offline)."""
    from ich.demo_data import write_digits
    from ich.ingest import ingest
    folder, ds = home / "demo" / "digits", home / "demo" / "digits-ds"
    if not (ds / "manifest.json").is_file():
        if not folder.is_dir():
            write_digits(folder)
        ingest(folder, ds, size=32, progress=False, overwrite=True)
    return ds


def run_sweep(args: argparse.Namespace, home: Path) -> dict:
    """The whole job: config, Ray and the tracking server, the sweep run, inits, Tune, then soups and report."""
    from mlflow import MlflowClient
    from soups.store import registry, retry
    from soups.tracking_server import initial_tracking_uri
    from sweeps.cluster import check_tracking_reaches_nodes, ray_started_here, start_ray
    from sweeps.init_weights import check_resources
    from sweeps.progress import quiet_driver, tune_output
    from sweeps.resume import find_resume_run

    t_start = time.time()
    cfg, dataset = load_job_config(args, home)
    # The job's runtime_env is shown by the dashboard: MLflow knobs only. The tracking URI reaches trials in
    # the sweep context (object store); credentials come from each node's own environment.
    quiet_driver(args.verbose)
    joining = bool(os.environ.get("RAY_ADDRESS"))
    if joining:  # a running cluster: every node must reach the tracking server before anything talks to it
        start_ray(args.verbose)
        if not os.environ.get("MLFLOW_TRACKING_URI") and not args.mlflow_host:  # refuse before starting one
            check_tracking_reaches_nodes(None, "http://127.0.0.1:5000")
    tracking_uri, autostarted = initial_tracking_uri(home, args.mlflow_host)
    if joining:
        check_tracking_reaches_nodes(None if autostarted else tracking_uri, tracking_uri)
    client = MlflowClient(tracking_uri)
    experiment_id = registry.get_or_create_experiment(client, cfg.experiment)
    # --resume picks up the last unfinished run with its Tune state, checked to lie under the storage root
    # before Ray starts and before anything is read from it.
    storage = cfg.storage or os.environ.get("ICH_STORAGE") or str(home / "ray_results")
    sweep = cfg.sweep or cfg.experiment
    resume_run = find_resume_run(client, experiment_id, sweep, cfg.experiment, storage) if args.resume else None
    if not joining:  # the local default: Ray starts only now, after the checks above
        start_ray(args.verbose)
        check_tracking_reaches_nodes(None if autostarted else tracking_uri, tracking_uri)
    check_resources(cfg, ray_started_here())  # a cluster (RAY_ADDRESS, `ray submit`) checks nothing locally

    parent_run_id, tune_path = open_sweep_run(client, experiment_id, cfg, args, home, dataset, storage, resume_run)
    print(f"sweep {sweep}: run {parent_run_id}, Ray Tune state at {tune_path}", flush=True)
    tuner = make_tuner(cfg, args, home, dataset, client, experiment_id, parent_run_id, tracking_uri, tune_path)
    with tune_output(args.verbose):
        results = tuner.fit()

    summary = finish_trials(client, experiment_id, sweep, results, cfg)
    failed = [r for r in summary if r["status"] == "FAILED"]
    if failed:  # on the sweep run too: what the MLflow UI shows of an unattended run
        retry.call_with_retry("tag failed trials", client.set_tag, parent_run_id, TAG_FAILED_TRIALS,
                                 " ".join(r["trial"] for r in failed))
    retry.call_with_retry("finish sweep run", client.set_terminated, parent_run_id, "FINISHED")
    if args.verbose:  # by default the progress callback printed a line per trial as it ended
        print_summary(summary, cfg)
    print(f"sweep {sweep} took {time.time() - t_start:.0f} s; MLflow UI: {tracking_uri}/#/experiments/{experiment_id}",
          flush=True)
    soups = None if args.no_soups else soups_and_report(cfg, args, home, sweep, tracking_uri, parent_run_id)
    note_sweep_run(client, parent_run_id, sweep, cfg, summary, soups)
    exit_code = 0
    if failed:  # last, after what could be built: the line an unattended run's log ends with
        exit_code = sweep_exit_code(len(failed), cfg.allow_failed_trials)
        print(failed_trials_line(f"sweep {sweep}", summary, cfg, built="no soups (--no-soups)" if args.no_soups else
                                 "soups" + ("" if args.no_report else " and report") + f" built from the "
                                 f"{len(summary) - len(failed)} others", exit_code=exit_code),
              file=sys.stderr, flush=True)
    return {"experiment_id": experiment_id, "parent_run_id": parent_run_id, "trials": summary, "tune_path": tune_path,
            "soups": soups, "failed_trials": [r["trial"] for r in failed], "exit_code": exit_code}


def load_job_config(args: argparse.Namespace, home: Path):
    """The sweep's config (file, flags, --set) and its dataset; bad input refused before anything starts."""
    from ich.data import load_dataset
    from ich.errors import ConfigError
    from sweeps.config import load_config

    cfg = load_config(args.config, {"data": args.data, "experiment": args.experiment, "num_samples": args.num_samples,
                                    "max_concurrent": args.max_concurrent, "cpus_per_trial": args.cpus_per_trial,
                                    "gpus_per_trial": args.gpus_per_trial, "storage": args.storage, "seed": args.seed,
                                    "allow_failed_trials": args.allow_failed_trials},
                      sets=args.set)
    if cfg.data is None and args.demo:
        cfg.data = str(demo_dataset(home))
    if cfg.data is None:
        raise ConfigError("no dataset: pass --data DIR (an `ich ingest` output) or --demo")
    if not Path(cfg.data).exists() and "://" not in cfg.data:
        raise ConfigError(f"{cfg.data}: dataset folder does not exist")
    dataset = load_dataset(cfg.data)
    if not os.environ.get("RAY_ADDRESS"):  # local Ray: refuse impossible resources before starting anything
        if cfg.cpus_per_trial > (os.cpu_count() or 1):
            raise ConfigError(f"cpus_per_trial={cfg.cpus_per_trial:g} but this machine has {os.cpu_count()} CPUs")
    return cfg, dataset


def open_sweep_run(client, experiment_id: str, cfg, args: argparse.Namespace, home: Path, dataset, storage: str,
                   resume_run) -> tuple[str, str]:
    """(run id, Tune state path) of the sweep run: one per invocation, or the resumed one, re-tagged with the
    code that runs now."""
    from mlflow.entities import Param, RunTag
    from ray import tune
    from ich.errors import ConfigError
    from soups.store import provenance, retry
    from soups.store.lineage import run_inputs
    from sweeps.study import optuna_storage_tag

    sweep = cfg.sweep or cfg.experiment
    if resume_run is not None:
        tune_path = resume_run.data.tags[TAG_TUNE_PATH]
        if not tune.Tuner.can_restore(tune_path):
            raise ConfigError(f"--resume: no Ray Tune state at {tune_path}")
        retry.call_with_retry("mark sweep running", client.update_run, resume_run.info.run_id, status="RUNNING")
        retry.call_with_retry("tag sweep provenance", client.log_batch, resume_run.info.run_id, tags=[  # code now
            RunTag(k, v) for k, v in provenance.run_tags("sweeps/coatnet.py").items()])
        return resume_run.info.run_id, tune_path
    name = f"{sweep}-{time.strftime('%Y%m%d-%H%M%S')}"
    tune_path = f"{storage.rstrip('/')}/{name}"
    parent = retry.call_with_retry(
        "create sweep run", client.create_run, experiment_id, run_name=name,
        tags={TAG_KIND: KIND_SWEEP, TAG_SWEEP: sweep, TAG_TUNE_PATH: tune_path, TAG_DATA: cfg.data,
              TAG_DATASET: dataset.fingerprint, **({} if cfg.grid else optuna_storage_tag(cfg, home)),
              **provenance.run_tags("sweeps/coatnet.py")})
    # The dataset's splits first, on the sweep run: its lineage, and the rows the trials' inputs then find (MLflow
    # inserts a new dataset check-then-write: parallel trials would race to create it).
    retry.call_with_retry("log sweep inputs", client.log_inputs, parent.info.run_id, **run_inputs(
        dataset.fingerprint, ("train", "val", "test"), source=str(cfg.data or ""), classes=dataset.classes,
        sizes={k: len(v) for k, v in dataset.splits.items()}))
    retry.call_with_retry("log sweep config", client.log_batch, parent.info.run_id, params=[
        Param(k, str(v)[:6000]) for k, v in [("config", args.config or "cpu.yaml"), ("metric", cfg.metric),
                                              ("objective", cfg.objective),
                                              ("num_samples", cfg.num_samples), ("train", cfg.train),
                                              ("search", cfg.search), ("grid", cfg.grid), ("asha", cfg.asha),
                                              ("init", cfg.init)]
                                             + ([("set", " ".join(args.set))] if args.set else [])])
    return parent.info.run_id, tune_path


def make_tuner(cfg, args: argparse.Namespace, home: Path, dataset, client, experiment_id: str, parent_run_id: str,
               tracking_uri: str, tune_path: str):
    """The shared inits (recorded on the sweep run), the trainable with its data in the object store, and Tune:
    a grid or Optuna TPE (its study continued across runs), ASHA on val, or the restored state on --resume."""
    from mlflow.entities import RunTag
    from optuna.samplers import TPESampler
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch
    from soups.store import retry
    from sweeps.config import tune_space
    from sweeps.init_weights import shared_inits
    from sweeps.progress import progress_callbacks
    from sweeps.study import optuna_study_storage, study_size
    from sweeps.trainable import SweepContext, faults_from_env, system_metrics_interval, train_trial

    sweep = cfg.sweep or cfg.experiment
    resources = {"cpu": cfg.cpus_per_trial, "gpu": cfg.gpus_per_trial}
    inits = shared_inits(cfg, cfg.models, dataset, client, experiment_id, parent_run_id, sweep, resources,
                         verbose=args.verbose)
    retry.call_with_retry("tag sweep inits", client.log_batch, parent_run_id, tags=[
        RunTag(f"{TAG_INIT_PREFIX}{m}", i.fingerprint) for m, i in inits.items()])

    from soups.store.signing import key_path, own_key
    own_key()  # made here, once, before any trial signs with it (docs/design.md#14)
    ctx = SweepContext(sweep=sweep, experiment_id=experiment_id, parent_run_id=parent_run_id,
                       tracking_uri=tracking_uri, train=dict(cfg.train),
                       faults=faults_from_env(),
                       fault_marker_dir=str(home / "faults" / sweep), objective=cfg.objective,
                       system_metrics_s=system_metrics_interval(cfg), data=str(cfg.data or ""),
                       signing_key=str(key_path()))
    # Dataset and inits go into the object store once; every trial on a node maps the same copy.
    trainable = tune.with_resources(tune.with_parameters(train_trial, dataset=dataset, inits=inits, ctx=ctx), resources)

    if args.resume:
        return tune.Tuner.restore(tune_path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    if cfg.grid:  # every combination once (Optuna takes no grid_search; config.validate refuses grid + search)
        search_alg = BasicVariantGenerator(max_concurrent=cfg.max_concurrent)
    else:
        searcher = OptunaSearch(metric=cfg.tune_metric, mode=cfg.mode, study_name=sweep,
                                storage=optuna_study_storage(cfg, home),
                                sampler=TPESampler(seed=cfg.seed + study_size(cfg, home, sweep)))
        search_alg = ConcurrencyLimiter(searcher, max_concurrent=cfg.max_concurrent)
    scheduler = ASHAScheduler(time_attr="training_iteration", metric=cfg.tune_metric, mode=cfg.mode,
                              max_t=cfg.max_epochs, grace_period=cfg.asha.grace_period,
                              reduction_factor=cfg.asha.reduction_factor)
    storage_path = str(Path(tune_path).parent) if "://" not in tune_path else tune_path.rsplit("/", 1)[0]
    return tune.Tuner(
        trainable, param_space=tune_space(cfg),
        tune_config=tune.TuneConfig(search_alg=search_alg,
                                    scheduler=scheduler, num_samples=cfg.num_samples, reuse_actors=True),
        run_config=tune.RunConfig(name=Path(tune_path).name, storage_path=storage_path,
                                  failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                                  verbose=1 if args.verbose else 0,
                                  callbacks=progress_callbacks(cfg, args.verbose) + soup_callbacks(
                                      cfg, tracking_uri, experiment_id, sweep, parent_run_id)))


def soups_and_report(cfg, args: argparse.Namespace, home: Path, sweep: str, tracking_uri: str,
                     parent_run_id: str) -> dict:
    """The soups of the finished sweep, then its report (every sweep ends with one unless --no-report)."""
    soups = run_soups(cfg, sweep, tracking_uri)
    if cfg.soup_so_far:  # the soup built while the sweep ran beside the post-hoc one (sweeps/soup_callback.py)
        from sweeps.soup_callback import compare_with_posthoc
        compare_with_posthoc(tracking_uri, parent_run_id, soups)
    if not args.no_report:  # --report is accepted, a no-op
        from soups.report.build import build_report
        from sweeps.study import optuna_storage_url
        out = home / "reports" / cfg.experiment
        report = build_report(cfg.experiment, str(out), tracking_uri=tracking_uri, data=cfg.data,
                              registered_model=cfg.soups.registered_model,  # where the champion alias lives
                              optuna_storage=optuna_storage_url(cfg, home))  # the study's figures
        soups["report_run_id"] = report.get("run_id")  # the sweep run's note points to it
        print(f"report: {out / 'report.md'} (and report.html); also logged to MLflow", flush=True)
    return soups


def note_sweep_run(client, parent_run_id: str, sweep: str, cfg, summary: list[dict], soups: dict | None) -> None:
    """The sweep run's description in the MLflow UI: the trials, the soups and where the report is."""
    from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE

    from soups.store import retry
    from soups.store.lineage import sweep_note
    report_run = (soups or {}).get("report_run_id")
    where = f"run {report_run} (artifacts report.md, report.html)" if report_run else None
    retry.call_with_retry("note sweep run", client.set_tag, parent_run_id, MLFLOW_RUN_NOTE,
                             sweep_note(sweep, cfg.metric, summary, (soups or {}).get("soups"), where))


def soup_callbacks(cfg, tracking_uri: str, experiment_id: str, sweep: str, parent_run_id: str) -> list:
    """`soup_so_far: true`: the across-run greedy soup grows on the driver as trials end (sweeps/soup_callback.py)."""
    if not cfg.soup_so_far:
        return []
    from sweeps.soup_callback import SoupSoFar
    return [SoupSoFar(tracking_uri=tracking_uri, experiment_id=experiment_id, sweep=sweep, parent_run_id=parent_run_id,
                      data=cfg.data, metric=cfg.soups.metric, tie_rule=cfg.soups.tie_rule, device="auto",
                      soups=dict(vars(cfg.soups)))]  # within soups as Ray tasks with the sweep's soup options


def finish_trials(client, experiment_id: str, sweep: str, results, cfg) -> list[dict]:
    """Give every trial run its final status: FINISHED, KILLED (stopped by ASHA) or FAILED."""
    from soups.store import registry, retry
    rows = []
    for r in results:
        trial_id = r.metrics.get("trial_id") if r.metrics else None
        trial_id = trial_id or Path(r.path).name
        epochs_planned = int((r.config or {}).get("epochs", cfg.train.get("epochs", 0)))
        done = int((r.metrics or {}).get("training_iteration", 0))
        last_epoch = int((r.metrics or {}).get("epoch", 0))
        status = "FAILED" if r.error else ("FINISHED" if last_epoch >= epochs_planned else "KILLED")
        error = error_summary(r.error) if r.error else None
        run = registry.find_run_by_tags(client, experiment_id, {TAG_KIND: KIND_TRIAL, TAG_SWEEP: sweep,
                                                                TAG_TRIAL: trial_id})
        if run is not None:
            retry.call_with_retry("set trial status", client.set_terminated, run.info.run_id, status)
            retry.call_with_retry("tag trial status", client.set_tag, run.info.run_id, TAG_STATUS,
                                     "stopped by ASHA" if status == "KILLED" else status.lower())
        rows.append({"trial": trial_id, "status": status, "error": error, "epochs": last_epoch, "iterations": done,
                     "run_id": run.info.run_id if run else None,
                     cfg.metric: (r.metrics or {}).get(cfg.metric), "config": r.config,
                     **({cfg.tune_metric: (r.metrics or {}).get(cfg.tune_metric)} if cfg.tune_metric != cfg.metric
                        else {})})
    return rows


def error_summary(error, limit: int = 160) -> str:
    """A trial's error in a few words: the exception Ray wrapped (its type and first line), not the traceback."""
    cause = getattr(error, "cause", None) or error
    if isinstance(cause, BaseException):
        text = f"{type(cause).__name__}: {cause}"
    else:  # Tune's text trace (an error it could not pickle): its last line names the exception
        text = next((line for line in reversed(str(cause).splitlines()) if line.strip()), "unknown error")
    text = next((line.strip() for line in text.splitlines() if line.strip()), text)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def sweep_exit_code(failed: int, allowed: int) -> int:
    """0, or EXIT_TRIALS_FAILED when more trials failed after their retries than --allow-failed-trials accepts."""
    return EXIT_TRIALS_FAILED if failed > allowed else 0


def failed_trials_line(prog: str, rows: list[dict], cfg, built: str, exit_code: int) -> str:
    """The one summary line of a sweep whose trials failed after their retries (stderr, the job log's last line)."""
    failed = [r for r in rows if r["status"] == "FAILED"]
    names = ", ".join(f"{r['trial']} ({r['error']})" for r in failed)
    verdict = (f"exit {exit_code} (--allow-failed-trials {len(failed)} to accept)" if exit_code else
               f"accepted by --allow-failed-trials {cfg.allow_failed_trials}, exit 0")
    return (f"{prog}: {len(failed)} of {len(rows)} trials failed after {cfg.max_failures} retries: {names}; "
            f"{built}; {verdict}")


def print_summary(rows: list[dict], cfg) -> None:
    keys = [k for k in cfg.search if k not in ("model", "seed")] + list(cfg.grid)
    print(f"\n{'trial':<16} {'status':<9} {'ep':>3} {cfg.metric:>13}  " + "  ".join(f"{k:>10}" for k in keys))
    for r in sorted(rows, key=lambda r: -(r[cfg.metric] or 0) if cfg.mode == "max" else (r[cfg.metric] or 0)):
        vals = "  ".join(f"{_fmt((r['config'] or {}).get(k)):>10}" for k in keys)
        m = r[cfg.metric]
        print(f"{r['trial']:<16} {r['status']:<9} {r['epochs']:>3} {m if m is None else f'{m:.4f}':>13}  {vals}")
    print(flush=True)


def _fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def run_soups(cfg, sweep: str, tracking_uri: str) -> dict:
    from soups.orchestrate import SoupOptions, run_soups as build  # an ImportError here fails the sweep, loudly
    return build(SoupOptions(experiment=cfg.experiment, sweep=sweep, tracking_uri=tracking_uri, **vars(cfg.soups)))
